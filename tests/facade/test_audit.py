"""The audit trail: every read of patient data is recorded, on a running sandbox (real sockets).

Reads with the sandbox's real tokens (static API tokens, the EHR's CDS JWT)
must leave an entry naming who, which route, which patient, from where and
the outcome -- refusals (401, 403) too; public routes and routes without
patient data must leave none. The trail is private, hash-chained (an edit
is found), purged by whole months, safe with concurrent writers, and a read
is refused (503) when its entry cannot be written. The CLI's ``dlq show`` and
``audit list`` are audited as well.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from auth_tokens import cds_headers, headers
from conftest import wait_for
from test_cds_hooks import hook, send_renal

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.audit import AuditEvent, AuditTrail
from ehrbridge.audit_http import AUDITED, CONFIGURED_ONLY, NOT_AUDITED
from ehrbridge.auth import PUBLIC_ROUTES
from ehrbridge.cli import main
from ehrbridge.config import load_site_config
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import MessageUnusable
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.transport import dead_letter_record, topic_name
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr
from ehrbridge.stores import open_log

SERVICE = "/cds-services/kfre-patient-view"


def trail_of(sandbox: BackgroundSandbox) -> AuditTrail:
    runtime = sandbox.sandbox.runtime
    assert runtime is not None
    return runtime.audit


def entries_after(sandbox: BackgroundSandbox, seq: int) -> list[dict[str, Any]]:
    return [e for e in trail_of(sandbox).entries() if e["seq"] > seq]


def last_seq(sandbox: BackgroundSandbox) -> int:
    return max((e["seq"] for e in trail_of(sandbox).entries()), default=0)


@pytest.fixture(scope="module")
def scored(sandbox: BackgroundSandbox) -> str:
    """A patient with a stored result (its MRN)."""
    mrn = f"M{uuid.uuid4().hex[:10]}"
    send_renal(sandbox, mrn, 30.0, 300.0)
    api = sandbox.sandbox.api_url
    wait_for(
        lambda: httpx.get(
            f"{api}/api/results", params={"patient": mrn}, headers=headers(sandbox, "viewer")
        ).json()["results"],
        what="a score",
    )
    return mrn


def test_every_route_is_audited_public_or_declared_free_of_patient_data(
    sandbox: BackgroundSandbox,
) -> None:
    runtime = sandbox.sandbox.runtime
    assert runtime is not None and runtime.http is not None
    table = {
        (method, route.path)
        for route in runtime.http.config.app.routes
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    assert not AUDITED & set(NOT_AUDITED) and not AUDITED & PUBLIC_ROUTES
    audited = set(AUDITED) - CONFIGURED_ONLY  # tests/facade/test_smart_launch.py audits those
    assert table - PUBLIC_ROUTES - set(NOT_AUDITED) == audited, "a route undeclared"


def test_api_reads_are_recorded_with_who_what_which_patient_and_outcome(
    sandbox: BackgroundSandbox, scored: str
) -> None:
    api, before = sandbox.sandbox.api_url, last_seq(sandbox)
    viewer = headers(sandbox, "viewer")
    patient = httpx.get(f"{api}/api/patients/{scored}", headers=viewer)
    assert patient.status_code == 200
    listing = httpx.get(f"{api}/api/results", params={"patient": scored}, headers=viewer)
    [result] = listing.json()["results"]
    one = httpx.get(f"{api}/api/results/{result['identifier']}", headers=viewer)
    assert one.status_code == 200
    refused = httpx.get(f"{api}/api/patients/{scored}")  # no token
    forbidden = httpx.get(f"{api}/api/messages", params={"patient": scored}, headers=viewer)
    assert (refused.status_code, forbidden.status_code) == (401, 403)

    found = entries_after(sandbox, before)
    assert [(e["action"], e["outcome"]) for e in found] == [
        ("GET /api/patients/{patient_id}", 200),
        ("GET /api/results", 200),
        ("GET /api/results/{identifier}", 200),
        ("GET /api/patients/{patient_id}", 401),
        ("GET /api/messages", 403),
    ]
    for entry in found:
        assert entry["patients"] == [scored], entry
        assert entry["source"] == "127.0.0.1"
        assert datetime.fromisoformat(entry["at"]) <= datetime.now(UTC)
    by_viewer = [found[i] for i in (0, 1, 2, 4)]
    assert {(e["who"], e["via"], tuple(e["roles"])) for e in by_viewer} == {
        ("sandbox-viewer", "token", ("viewer",))
    }
    assert (found[3]["who"], found[3]["roles"]) == ("-", [])


def test_a_cds_hooks_call_is_recorded_with_the_ehr_and_the_patient(
    sandbox: BackgroundSandbox, scored: str
) -> None:
    api, before = sandbox.sandbox.api_url, last_seq(sandbox)
    answer = httpx.post(f"{api}{SERVICE}", json=hook(scored), headers=cds_headers(sandbox, api))
    assert answer.status_code == 200 and answer.json()["cards"]
    bad = httpx.post(f"{api}{SERVICE}", json=hook(scored), headers={"Authorization": "Bearer x"})
    assert bad.status_code == 401
    good, refused = entries_after(sandbox, before)
    assert good["action"] == f"POST {SERVICE}" and good["outcome"] == 200
    assert good["patients"] == [scored] and good["detail"] == {"cards": 1}
    assert good["via"].startswith("cds ") and good["who"] != "-"
    assert (refused["who"], refused["outcome"]) == ("-", 401)


def test_a_cds_call_by_the_ehrs_patient_id_names_the_sites_patient_id_too(
    sandbox: BackgroundSandbox, scored: str
) -> None:
    """So that "who looked at MRN X?" finds CDS views made under the EHR's own id."""
    api, before = sandbox.sandbox.api_url, last_seq(sandbox)
    system = sandbox.sandbox.config.mapping.patient.fhir_system
    patient = {"resourceType": "Patient", "id": "ehr-7", "identifier": [
        {"system": system, "value": scored}]}  # fmt: skip
    body = hook("ehr-7", prefetch={"patient": patient})
    answer = httpx.post(f"{api}{SERVICE}", json=body, headers=cds_headers(sandbox, api))
    assert answer.status_code == 200 and answer.json()["cards"]
    [entry] = entries_after(sandbox, before)
    assert entry["patients"] == ["ehr-7", scored]


def test_public_routes_and_reads_without_patient_data_leave_no_entry(
    sandbox: BackgroundSandbox,
) -> None:
    api, before = sandbox.sandbox.api_url, last_seq(sandbox)
    viewer = headers(sandbox, "viewer")
    for path in ("/health", "/health/live", "/health/ready", "/cds-services", "/openapi.json"):
        assert httpx.get(f"{api}{path}").status_code in (200, 503), path
    for path in ("/metrics", "/api/monitoring/feeds", "/api/monitoring/drift", "/api/fhir"):
        assert httpx.get(f"{api}{path}", headers=viewer).status_code == 200, path
    assert entries_after(sandbox, before) == []


def test_operator_reads_of_stored_messages_are_audited_and_show_raw_bytes(
    sandbox: BackgroundSandbox, scored: str
) -> None:
    api, operator = sandbox.sandbox.api_url, headers(sandbox, "operator")
    before = last_seq(sandbox)
    search = httpx.get(
        f"{api}/api/messages", params={"patient": scored, "scan": 100_000}, headers=operator
    ).json()
    [found] = search["messages"]
    assert found["patient"] == scored and "raw" not in found
    one = httpx.get(f"{api}/api/messages/{found['offset']}", headers=operator).json()
    assert one["raw"].startswith("MSH|") and scored in one["raw"]
    as_viewer = httpx.get(
        f"{api}/api/messages/{found['offset']}", headers=headers(sandbox, "viewer")
    )
    assert as_viewer.status_code == 403 and "raw" not in as_viewer.text
    entries = entries_after(sandbox, before)
    assert [(e["action"], e["outcome"], e["patients"]) for e in entries] == [
        ("GET /api/messages", 200, [scored]),
        ("GET /api/messages/{offset}", 200, [scored]),
        ("GET /api/messages/{offset}", 403, []),
    ]


def test_dead_letter_reads_and_replays_over_http_are_audited(sandbox: BackgroundSandbox) -> None:
    api, operator = sandbox.sandbox.api_url, headers(sandbox, "operator")
    message = SyntheticEhr(seed=3, patients=1).bad_messages()["unknown_unit"]
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        assert client.send(message).code == "AE"
    control_id = Message.parse(message).control_id
    listing = wait_for(
        lambda: [
            r
            for r in httpx.get(f"{api}/api/dlq", headers=operator).json()["records"]
            if r["source_id"] == control_id
        ],
        what="the dead letter",
    )
    offset, before = listing[0]["offset"], last_seq(sandbox)
    viewer = httpx.get(f"{api}/api/dlq/{offset}", headers=headers(sandbox, "viewer"))
    assert viewer.status_code == 403 and "MSH" not in viewer.text  # raw bytes: operator only
    shown = httpx.get(f"{api}/api/dlq/{offset}", headers=operator).json()
    assert shown["raw"].startswith("MSH|") and shown["control_id"] == control_id
    replay = {"offsets": [offset], "dry_run": True}
    counted = httpx.post(f"{api}/api/dlq/replay", json=replay, headers=operator).json()
    assert counted == {"dry_run": True, "replayed": [offset]}
    patient = shown["patient"]
    assert [(e["action"], e["outcome"], e["who"], e["patients"]) for e in
            entries_after(sandbox, before)] == [
        ("GET /api/dlq/{offset}", 403, "sandbox-viewer", []),
        ("GET /api/dlq/{offset}", 200, "sandbox-operator", [patient]),
        ("POST /api/dlq/replay", 200, "sandbox-operator", [patient]),
    ]  # fmt: skip
    assert entries_after(sandbox, before)[-1]["detail"] == {"offsets": [offset], "dry_run": True}


def test_the_admin_exports_the_trail_and_no_one_else_may(
    sandbox: BackgroundSandbox, scored: str
) -> None:
    api = sandbox.sandbox.api_url
    httpx.get(f"{api}/api/patients/{scored}", headers=headers(sandbox, "viewer"))
    for role in ("viewer", "operator", "sender"):
        assert httpx.get(f"{api}/api/audit", headers=headers(sandbox, role)).status_code == 403
    export = httpx.get(
        f"{api}/api/audit", params={"patient": scored}, headers=headers(sandbox, "admin")
    ).json()
    assert export["entries"] and all(scored in e["patients"] for e in export["entries"])
    assert any(e["who"] == "sandbox-viewer" for e in export["entries"])
    last = entries_after(sandbox, last_seq(sandbox) - 1)[0]
    assert (last["action"], last["who"], last["patients"]) == (
        "GET /api/audit",
        "sandbox-admin",
        [scored],
    )


def test_the_trail_is_private_and_its_chain_holds(sandbox: BackgroundSandbox) -> None:
    trail = trail_of(sandbox)
    assert stat.S_IMODE(trail.directory.stat().st_mode) == 0o700
    for path in trail.files():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    report = trail.verify()
    assert report.intact, report.problems
    assert report.entries > 0


def test_a_read_whose_entry_cannot_be_written_is_refused(
    sandbox: BackgroundSandbox, scored: str, tmp_path: Path
) -> None:
    trail = trail_of(sandbox)
    saved = trail.directory
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    trail.directory = blocker / "audit"  # every write fails: ENOTDIR
    try:
        answer = httpx.get(
            f"{sandbox.sandbox.api_url}/api/patients/{scored}", headers=headers(sandbox, "viewer")
        )
    finally:
        trail.directory = saved
    assert answer.status_code == 503
    assert scored not in answer.text and "birth_date" not in answer.text


# -- the trail itself -------------------------------------------------------------------


def event(patient: str = "P1", who: str = "alice") -> AuditEvent:
    return AuditEvent(
        who=who, action="GET /api/patients/{patient_id}", outcome=200, patients=(patient,)
    )


def test_an_edited_or_removed_entry_breaks_the_chain_where_it_was(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit")
    for n in range(5):
        trail.record(event(f"P{n}"))
    [path] = trail.files()
    lines = path.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["patients"] = ["someone-else"]
    path.write_text("\n".join([*lines[:2], json.dumps(edited), *lines[3:]]) + "\n")
    assert [p.split(":")[0] for p in trail.verify().problems] == ["seq 3"]
    path.write_text("\n".join([*lines[:2], *lines[3:]]) + "\n")  # entry 3 removed
    assert [p.split(":")[0] for p in trail.verify().problems] == ["seq 4"]
    path.write_text("\n".join(lines) + "\n")
    assert trail.verify().intact


def test_concurrent_writers_keep_one_unbroken_chain(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit")
    other = AuditTrail(tmp_path / "audit")  # as a CLI process would: its own object

    def write(which: AuditTrail, who: str) -> None:
        for _ in range(100):
            which.record(event(who=who))

    writers = enumerate([trail, other, trail, other])
    threads = [threading.Thread(target=write, args=(t, f"w{i}")) for i, t in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = trail.verify()
    assert report.intact, report.problems[:3]
    assert [e["seq"] for e in trail.entries()] == list(range(1, 401))


def test_first_writers_racing_to_create_the_directory_each_keep_their_entry(
    tmp_path: Path,
) -> None:
    trails = [AuditTrail(tmp_path / "audit") for _ in range(16)]
    start = threading.Barrier(len(trails))

    def write(trail: AuditTrail) -> None:
        start.wait()
        trail.record(event(who="first"))

    threads = [threading.Thread(target=write, args=(t,)) for t in trails]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e["seq"] for e in trails[0].entries()] == list(range(1, 17))
    assert trails[0].verify().intact


def test_the_purge_removes_whole_old_months_and_keeps_the_newest(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit")
    for month in (1, 2, 3):
        trail.record(event(f"P{month}"), now=datetime(2020, month, 15, tzinfo=UTC))
    assert trail.purge(datetime(2020, 3, 1, tzinfo=UTC)) == 2  # January and February
    assert [p.name for p in trail.files()] == ["audit-2020-03.jsonl"]
    assert trail.purge(datetime(2030, 1, 1, tzinfo=UTC)) == 0  # the newest file stays
    assert trail.verify().intact  # the oldest kept entry starts the chain
    trail.record(event("P4"))
    assert trail.verify().intact


# -- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def site_file(tmp_path: Path) -> tuple[Path, int]:
    """A site whose log holds one dead letter (of patient MRN-CLI); its offset."""
    data = yaml.safe_load(sandbox_site_file().read_text())
    data["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_site_config(path)
    os.makedirs(config.data_dir, mode=0o700)
    log = open_log(config)
    envelope = Envelope(
        site=config.site,
        payload=b"MSH|^~\\&|LAB|H|||20260101||ORU^R01|C1|P|2.5.1\rPID|1||MRN-CLI\r",
        kind=Kind.HL7V2,
        source_id="C1",
        key="MRN-CLI",
    )
    error = MessageUnusable("OBX-6 unit not known")
    dlq = topic_name(config.site, "dlq")
    log.append([dead_letter_record(Failure(envelope, error, "ingest"), dlq)])
    [stored] = log.read(dlq)
    log.close()
    return path, stored.offset


def test_cli_reads_are_audited(
    site_file: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    path, offset = site_file
    site = str(path)
    assert main(["dlq", "show", "--config", site, str(offset)]) == 0
    assert "MRN-CLI" in capsys.readouterr().out
    assert main(["audit", "list", "--config", site, "--json"]) == 0
    [shown] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown["action"] == "cli dlq show" and shown["patients"] == ["MRN-CLI"]
    assert shown["who"].startswith("cli:") and shown["detail"] == {"offsets": [offset]}
    assert main(["audit", "list", "--config", site, "--patient", "MRN-CLI"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 entry"
    assert main(["audit", "list", "--config", site]) == 0
    listing = capsys.readouterr().out
    assert listing.count("cli audit list") == 2  # the two listings before this one
    assert listing.splitlines()[-1] == "3 entries"
    assert main(["dlq", "replay", "--config", site, "--offset", str(offset)]) == 0
    assert main(["audit", "list", "--config", site, "--json", "--patient", "MRN-CLI"]) == 0
    replayed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (replayed["action"], replayed["patients"]) == ("cli dlq replay", ["MRN-CLI"])
    assert main(["audit", "verify", "--config", site]) == 0
    assert "6 entries from seq 1: intact" in capsys.readouterr().out


def test_audit_list_of_a_site_that_never_ran_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load(sandbox_site_file().read_text())
    data["data_dir"] = str(tmp_path / "nowhere")
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["audit", "list", "--config", str(path)]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # nothing created
