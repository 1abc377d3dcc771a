"""What a new user meets first: sandbox restarts, the CLI against the sandbox's data,
the first hand-sent message, the results API's pages, and the command-line help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from auth_tokens import headers as auth
from conftest import wait_for

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.cli import _parser, main
from ehrbridge.config import load_site_config
from ehrbridge.pipelines.results import Delivery
from ehrbridge.sandbox.fhir_server import FhirStore, parse_search
from ehrbridge.sandbox.run import (
    FHIR_JOURNAL,
    BackgroundSandbox,
    banner,
    example_message_file,
    progress,
    sandbox_fhir_site_file,
    sandbox_site_file,
)
from ehrbridge.workbench.unmapped import CodeStats, UnmappedReport, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "oru-r01-sandbox.hl7"


def example_message() -> bytes:
    return b"\r".join(example_message_file().read_bytes().splitlines())


def observations(running: BackgroundSandbox) -> int:
    return running.sandbox.fhir_store.counts().get("Observation", 0)


# --------------------------------------------------------------------------- restarts


def test_a_restarted_sandbox_still_holds_in_the_ehr_what_it_says_was_delivered(
    tmp_path: Path,
) -> None:
    with BackgroundSandbox(tmp_path, fhir_site=False) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            assert client.send(example_message()).code == "AA"
        runtime = running.sandbox.runtime
        assert runtime is not None
        wait_for(lambda: runtime.results.count(Delivery.DELIVERED) or None, what="delivery")
        before = observations(running)
    assert before >= 1
    with BackgroundSandbox(tmp_path, fhir_site=False) as restarted:
        runtime = restarted.sandbox.runtime
        assert runtime is not None
        assert observations(restarted) == before == runtime.results.count(Delivery.DELIVERED)
        found = httpx.get(f"{restarted.sandbox.fhir_base}/Observation").json()
        assert found["total"] == before


def test_the_banner_warns_when_the_ehr_lost_what_an_earlier_run_delivered(
    tmp_path: Path,
) -> None:
    with BackgroundSandbox(tmp_path, fhir_site=False) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            assert client.send(example_message()).code == "AA"
        runtime = running.sandbox.runtime
        assert runtime is not None
        wait_for(lambda: runtime.results.count(Delivery.DELIVERED) or None, what="delivery")
        assert "WARNING" not in banner(running.sandbox, traffic=False)
    (tmp_path / FHIR_JOURNAL).unlink()  # a data dir from before the stand-in kept its store
    with BackgroundSandbox(tmp_path, fhir_site=False) as restarted:
        shown = banner(restarted.sandbox, traffic=False)
    assert "WARNING: 1 result(s) were delivered by an earlier run" in shown
    # Another --data-dir than sandbox/site.yaml names: the dlq command says how to reach it.
    assert f"EHRBRIDGE_DATA_DIR={tmp_path} " in shown and "dlq list --config" in shown
    assert "--fresh" in shown


def test_the_fhir_store_journal_replays_versions_deletions_and_undone_writes(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "store.log"
    store = FhirStore(journal)
    first = store.write("Patient", "p1", {"identifier": [{"system": "s", "value": "1"}]})
    store.write("Patient", "p1", {"identifier": [{"system": "s", "value": "2"}]})
    store.write("Patient", "p2", {"active": True})
    store.write("Patient", "p2", None)  # a deletion
    undone = store.write("Patient", "p3", {"active": False})
    store.undo(undone)  # a failed transaction takes its write back
    store.close()
    with journal.open("ab") as torn:
        torn.write(b"W Patient p4 17")  # killed mid-line: never answered, never replayed

    again = FhirStore(journal)
    assert [v.version_id for v in again.history("Patient", "p1")] == [1, 2]
    assert again.history("Patient", "p1")[0].last_updated == first.last_updated
    assert again.read("Patient", "p1") == store.read("Patient", "p1")
    assert again.read("Patient", "p2") is None and again.current("Patient", "p2") is not None
    assert again.current("Patient", "p3") is None and again.current("Patient", "p4") is None
    query = parse_search([("identifier", "s|2")])
    assert [v.id for v in again.search("Patient", query).versions] == ["p1"]
    newer = again.write("Patient", "p5", {})
    assert newer.last_updated_us > again.history("Patient", "p1")[-1].last_updated_us


# --------------------------------------------------------------------------- your own message


def test_the_example_message_gets_aa_and_a_users_ae_shows_in_the_progress_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert EXAMPLE.read_bytes() == example_message_file().read_bytes()
    wrong_authority = EXAMPLE.read_text().replace("^^^SANDBOX^MR", "^^^OTHER^MR")
    (tmp_path / "wrong.hl7").write_text(wrong_authority)
    with BackgroundSandbox(tmp_path / "data", fhir_site=False) as running:
        port = str(running.sandbox.mllp_port)
        assert main(["send", str(EXAMPLE), "--port", port]) == 0
        assert capsys.readouterr().out.startswith("AA MY-0001")
        assert main(["send", str(tmp_path / "wrong.hl7"), "--port", port]) == 1
        assert capsys.readouterr().out.startswith("AE MY-0001")
        line = running.call(progress(running.sandbox))
    assert "synthetic EHR sent 0" in line and "AA 1, AE 1, AR 0" in line


def test_send_says_plainly_when_nothing_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ehrbridge.bench.common import free_port

    assert main(["send", str(EXAMPLE), "--port", str(free_port())]) == 1
    assert "is the sandbox or site running?" in capsys.readouterr().err


# ----------------------------------------------------------- CLI and the sandbox's data


def test_the_sandbox_site_files_name_the_data_dir_the_sandbox_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)  # scripts/sandbox runs from the repository's root
    default = _parser().parse_args(["sandbox"]).data_dir.resolve()
    assert load_site_config(sandbox_site_file()).data_dir.resolve() == default
    fhir_site = load_site_config(sandbox_fhir_site_file())
    assert fhir_site.data_dir.resolve() == default / fhir_site.site  # as Sandbox places it


def test_dlq_list_finds_a_running_sites_data_or_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.yaml"
    data = tmp_path / "data"
    text = sandbox_site_file().read_text()
    site.write_text(text.replace("data_dir: ../.ehrbridge-sandbox ", f"data_dir: {data} "))
    assert main(["dlq", "list", "--config", str(site)]) == 2
    assert f"found no data for site 'sandbox': no log at {data / 'log.sqlite'}" in (
        capsys.readouterr().err
    )
    assert main(["dlq", "show", "--config", str(site), "0"]) == 2
    assert not data.exists()  # nothing created: no empty store answering "0"
    with BackgroundSandbox(data, fhir_site=False) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            bad = example_message().replace(b"^^^SANDBOX^MR", b"^^^OTHER^MR")
            assert client.send(bad).code == "AE"
        capsys.readouterr()
        assert main(["dlq", "list", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "hl7.missing_patient_id" in out and "1 dead letter(s)" in out


def test_cli_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from ehrbridge import __version__

    assert capsys.readouterr().out.strip() == f"ehrbridge {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    described = capsys.readouterr().out
    assert "puts a clinical prediction model" in described and "send FILE" in described
    with pytest.raises(SystemExit):
        main(["sandbox", "--help"])
    options = capsys.readouterr().out.partition("options:")[2]
    entries = [" ".join(e.split()) for e in options.split("\n  -")[1:]]
    named = {e.split()[0].split(",")[0] for e in entries}
    assert {"h", "-no-traffic", "-data-dir", "-seed", "-tls"} <= named, named
    for entry in entries[1:]:
        assert "(default:" in entry, entry
        assert entry.split(" (default:")[0].count(" ") >= 2, f"no description: {entry}"


@pytest.mark.parametrize("module", ["model_server", "fhir_server"])
def test_the_sandbox_servers_run_alone_and_explain_themselves(module: str) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", f"ehrbridge.sandbox.{module}", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--port" in shown.stdout and "(default:" in shown.stdout


def test_unmapped_never_lists_a_translated_code_as_unmapped() -> None:
    report = UnmappedReport()
    report.messages["sandbox.raw"] = 3
    report.codes[("L", "CRP")] = CodeStats(
        "L", "CRP", "C-reactive protein", 2, reason="code not mapped"
    )
    report.codes[("L", "ALB")] = CodeStats(
        "L",
        "ALB",
        "Albumin",
        1,
        reason="code maps to LN|1751-7 (codes.csv:4), which no feature takes",
    )
    text = render(report, "site")
    unmapped, _, translated = text.partition("codes the code map translates")
    assert text.startswith("site 'site': read 3 from sandbox.raw")
    assert " CRP " in unmapped and " ALB " not in unmapped
    assert " ALB " in translated and "LN|1751-7 (codes.csv:4)" in translated


# --------------------------------------------------------------------------- /api/results


def test_results_pages_have_a_total_links_and_percent_risks(tmp_path: Path) -> None:
    with BackgroundSandbox(tmp_path, fhir_site=False) as running:
        runtime = running.sandbox.runtime
        assert runtime is not None
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            for day in (10, 11, 12):
                message = example_message().replace(b"20260110", b"202601%d" % day)
                message = message.replace(b"MY-0001", b"MY-00%d" % day)
                assert client.send(message).code == "AA"
        wait_for(lambda: runtime.results.count() == 3 or None, what="three results")
        api = f"{running.sandbox.api_url}/api/results"
        first = httpx.get(api, params={"limit": 2}, headers=auth(running)).json()
        second = httpx.get(first["links"]["next"], headers=auth(running)).json()
    assert first["total"] == second["total"] == 3
    assert len(first["results"]) == 2 and len(second["results"]) == 1
    assert first["links"]["prev"] is None and second["links"]["next"] is None
    assert httpx.URL(second["links"]["prev"]).params["offset"] == "0"
    [last] = second["results"]
    assert last["risk_2y_percent"] == pytest.approx(100 * last["risk_2y"], abs=1e-4)
    assert last["risk_5y_percent"] == pytest.approx(100 * last["risk_5y"], abs=1e-4)
