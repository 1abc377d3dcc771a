"""``ehrbridge mappings check|test|explain|unmapped`` as an engineer runs them."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import CORPUS, wait_for

from ehrbridge.adapters.hl7_reference import field_name
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.cli import main
from ehrbridge.config import SiteConfig
from ehrbridge.core.contracts import Kind
from ehrbridge.core.errors import MessageRejected
from ehrbridge.mappings.loader import SITES_DIR
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import FactRules
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr
from ehrbridge.workbench.explain import explain_input
from ehrbridge.workbench.messages import read_inputs
from ehrbridge.workbench.site import SiteMapping, resolve_site

EU_SI = SITES_DIR / "eu-si-local-codes"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --------------------------------------------------------------------------- check and test


def test_check_passes_the_example_sites(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "mappings", "check", str(SITES_DIR))
    assert code == 0, out
    assert out.strip().endswith("0 error(s), 0 warning(s)")


def test_check_fails_with_file_line_messages(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    shutil.copytree(EU_SI, site)
    text = (site / "mapping.yaml").read_text()
    (site / "mapping.yaml").write_text(text.replace("{divide: 88.4}", "{multiply: 88.4}"))
    with (site / "local-codes.csv").open("a") as csv:
        csv.write("99UKC,CREA,LN,2160-0,again\n")
    code, out = run(capsys, "mappings", "check", str(site))
    assert code == 1
    line = 1 + text.splitlines().index(
        "      umol/L: {divide: 88.4}         # umol/L ÷ 88.4 -> mg/dL"
    )
    assert f"mapping.yaml:{line}: error: features.creatinine.units.umol/L:" in out
    assert "local-codes.csv:11: error: 99UKC|CREA is mapped twice (first at line 3)" in out


def test_check_strict_fails_on_warnings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    shutil.copy(EU_SI / "mapping.yaml", tmp_path / "mapping.yaml")
    shutil.copy(EU_SI / "local-codes.csv", tmp_path / "local-codes.csv")  # no tests: a warning
    assert run(capsys, "mappings", "check", str(tmp_path))[0] == 0
    code, out = run(capsys, "mappings", "check", "--strict", str(tmp_path))
    assert code == 1 and "no *_test.yaml" in out


def test_test_runs_every_site_case(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "mappings", "test", str(SITES_DIR))
    assert code == 0, out
    passed = int(re.search(r"(\d+) passed, 0 failed", out).group(1))  # type: ignore[union-attr]
    assert passed == out.count("PASS  ") and passed >= 20


def test_a_failing_case_prints_a_readable_diff(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    shutil.copytree(EU_SI, site)
    tests = site / "mapping_test.yaml"
    tests.write_text(tests.read_text().replace("egfr: 17.57 ", "egfr: 18.57 ", 1))
    code, out = run(capsys, "mappings", "test", "-q", str(site))
    assert code == 1
    assert "FAIL  KFRE vector" in out
    assert re.search(r"egfr:\s+expected 18.57 ± 0.005\n\s+got 17.568", out), out
    assert "PASS" not in out  # -q prints failures only


def test_test_reports_a_broken_test_file_with_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    shutil.copytree(EU_SI, site)
    tests = site / "mapping_test.yaml"
    text = tests.read_text().replace("    expect:\n", "    expects:\n", 1)
    tests.write_text(text)
    code, out = run(capsys, "mappings", "test", str(site))
    assert code == 1
    line = 1 + text.splitlines().index("    expects:")
    assert f"mapping_test.yaml:{line}: cases[0].expects: unknown field" in out


# --------------------------------------------------------------------------- explain


def test_explain_shows_rules_conversions_and_unused_results(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = run(
        capsys,
        "mappings",
        "explain",
        "--site",
        "eu-si-local-codes",
        str(EU_SI / "oru-kfre-vector.hl7"),
    )
    assert code == 0
    assert "patient U445566   (id from PID-3(2), assigning authority UKCLJ and type MR)" in out
    assert "sex F (ZPI-2)" in out
    assert re.search(r"USED\s+creatinine\s+via local-codes.csv:3 -> LN\|14682-9", out)
    assert "265 umol/L ÷ 88.4 = 2.99774 mg/dL" in out
    assert "(OBR-7 Observation date/time)" in out  # hl7apy names the field
    assert "199.3 mg/mmol × 8.84 = 1761.81 mg/g" in out
    assert re.search(r"UNUSED\s+code maps to LN\|14683-7 \(local-codes.csv:6\)", out)
    assert re.search(r"UNUSED\s+code not mapped", out)  # CRP
    assert "8 result(s): 2 used, 0 flagged, 0 withdrawing, 6 unused, 0 error(s)" in out
    assert "egfr 17.57 (ckd-epi-2021 from creatinine 2.99774 mg/dL)" in out


def test_explain_shows_what_would_make_the_sender_get_ae(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    message = tmp_path / "bad.hl7"
    message.write_text(
        "MSH|^~\\&|L|L|X|Y|20260101091500||ORU^R01|C9|P|2.5\n"
        "PID|1||U1^^^UKCLJ^MR||X^Y||19680921|F\n"
        "OBR|1|||B|||20260101083000\n"
        "OBX|1|NM|CREA^Kreatinin^99UKC||2.9|mg/dL|||||F\n"
        "OBX|2|NM|U-ACR^ACR^99UKC||30000|mg/mmol|||||F\n"
    )
    code, out = run(capsys, "mappings", "explain", "--site", str(EU_SI), str(message))
    assert code == 0
    assert re.search(r"ERROR\s+creatinine", out) and "mapping.unknown_unit" in out
    assert re.search(r"FLAGGED \(kept, never used\)\s+uacr", out)
    assert "outside 0.1–50000 mg/g" in out
    assert "the pipeline would refuse this message (AE)" in out


def test_explain_reads_fhir_and_counts_what_it_skips(capsys: pytest.CaptureFixture[str]) -> None:
    bundle = next((CORPUS / "fhir" / "synthea-ckd").glob("Dirk_*.json"))
    code, out = run(capsys, "mappings", "explain", "--site", "fhir-synthea", str(bundle))
    assert code == 0
    assert "(id from Patient.identifier system http://hospital.smarthealthit.org)" in out
    assert "× 1, accepted as mL/min/{1.73_m2}" in out
    assert re.search(r"resources not read \(no results in them\): .*Claim 29", out)


def corpus_oru_files() -> list[Path]:
    root = CORPUS / "hl7v2"
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in {".hl7", ".txt"} and b"ORU^R01" in p.read_bytes()
    )


def first_repetition(config: SiteConfig) -> SiteMapping:
    """Corpus senders use any PID-3 authority: take repetition 1, as test_corpus_mllp does."""
    patient = config.mapping.patient.model_copy(
        update={"assigning_authority": None, "type_code": None, "repetition": 1}
    )
    mapping = config.mapping.model_copy(update={"patient": patient})
    return SiteMapping("sandbox", mapping, sandbox_site_file(), config)


def test_explain_accounts_for_every_obx_of_the_corpus_oru_messages() -> None:
    site = resolve_site(sandbox_site_file())
    assert site.config is not None
    site = first_repetition(site.config)
    rules = FactRules(site.mapping)
    files = corpus_oru_files()
    assert len(files) > 50, f"corpus not found at {CORPUS}"
    outcomes: Counter[str] = Counter()
    explained = 0
    for path in files:
        for item in read_inputs(path):
            if item.kind is not Kind.HL7V2:
                continue
            try:
                message = Message.parse(item.payload)
            except MessageRejected:
                continue  # not one readable message: explain says REJECTED, nothing to account
            lines = list(explain_input(item, rules, site))
            if message.message_type[:2] != ("ORU", "R01") or any("UNUSABLE" in x for x in lines):
                continue
            obx = len(message.all("OBX"))
            heads = [i for i, line in enumerate(lines) if line.startswith("OBX #")]
            assert len(heads) == obx, f"{path}: {obx} OBX, {len(heads)} explained"
            for i in heads:  # every OBX line is followed by what happened to it
                outcomes[lines[i + 1].split()[0]] += 1
            explained += 1
    assert explained > 50
    assert outcomes["UNUSED"] > 500  # the corpus carries no renal labs: nearly all unused
    assert set(outcomes) <= {"USED", "UNUSED", "ERROR", "FLAGGED", "WITHDRAWS"}


def test_hl7apy_names_fields_and_z_segments_have_no_name() -> None:
    assert field_name("PID-3(2)", "2.5") == "Patient identifier list"
    assert field_name("OBX-14", "2.5.1") == "Date/time of the observation"
    assert field_name("ZPI-2", "2.5") == ""


# --------------------------------------------------------------------------- unmapped


def test_unmapped_lists_what_a_running_site_received_and_ignores(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ehr = SyntheticEhr(seed=5, patients=4)
    messages = [m for _, m in ehr.stream()][:25]
    bad_unit = ehr.renal_oru_for(
        age=60,
        female=True,
        at=datetime(2026, 1, 1, tzinfo=UTC),
        creatinine_umol_l=150,
        uacr_mg_g=30.0,
        control_id="BADUNIT",
    ).replace(b"umol/L", b"mmol/L")
    sodium = sum(
        1 for m in messages for s in Message.parse(m).all("OBX") if s.component(3, 1) == "2951-2"
    )
    assert sodium > 0
    data_dir = tmp_path / "data"
    with BackgroundSandbox(data_dir) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            codes = Counter(client.send(m).code for m in [*messages, bad_unit])
        assert codes["AE"] >= 1 and codes["AA"] >= 20
        runtime = running.sandbox.runtime
        assert runtime is not None
        wait_for(lambda: runtime.log.read(runtime.topic("dlq"), limit=10), what="the dead letter")
        site = tmp_path / "site.yaml"
        site.write_text(with_data_dir(sandbox_site_file().read_text(), data_dir))
        code, out = run(capsys, "mappings", "unmapped", "--site", str(site))
    assert code == 0, out
    row = next(line for line in out.splitlines() if " 2951-2 " in line)
    assert int(row.split()[0]) == sodium and "mmol/L" in row
    assert "Sodium" in row
    assert re.search(r"creatinine\s+unit 'mmol/L'\s+code LN\|2160-0\s+e\.g\. 150 mmol/L", out)


def with_data_dir(site_yaml: str, data_dir: Path) -> str:
    return re.sub(r"(?m)^data_dir: .*$", f"data_dir: {data_dir}", site_yaml)


def test_unmapped_needs_a_site_that_has_run_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(with_data_dir(sandbox_site_file().read_text(), tmp_path / "data"))
    code, out = run(capsys, "mappings", "unmapped", "--site", str(site))
    assert code == 2
    assert f"found no data for site 'sandbox': no log at {tmp_path / 'data' / 'log.sqlite'}" in out
    assert not (tmp_path / "data").exists()
