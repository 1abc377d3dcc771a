"""The embedded site with its roles as processes (``transport.processes: per-role``).

Real sockets and real processes: ``ehrbridge run`` supervises one child per
role, sharing the site's SQLite files; the sandbox model server and FHIR
stand-in serve on free ports. ORU^R01 sent over MLLP to the ingest child
become Observations written by the write-back child, and the HTTP API,
served by the ingest child, reads the results the write-back child stored.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from auth_tokens import token_headers
from conftest import wait_for
from role_processes import alive, at_least, children, per_role_site_file, start_supervisor

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.sandbox.fhir_server import create_fhir_app
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


@pytest.fixture
def fhir() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_fhir_app()) as server:
        yield server


@pytest.fixture
def model() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_model_app()) as server:
        yield server


def renal_messages(count: int) -> list[tuple[str, bytes]]:
    """(MRN, ORU^R01) for ``count`` patients, one renal panel each."""
    ehr = SyntheticEhr(patients=1)
    out = []
    for n in range(count):
        mrn = f"M{uuid.uuid4().hex[:10]}"
        message = ehr.renal_oru_for(
            age=60 + n % 20,
            female=n % 2 == 0,
            at=datetime(2026, 2, 1, tzinfo=UTC) + timedelta(days=n),
            egfr=25.0 + n % 10,
            uacr_mg_g=300.0 + n,
            mrn=mrn,
            control_id=f"C{uuid.uuid4().hex[:10]}",
        )
        out.append((mrn, message))
    return out


def drift_records(api: str, headers: dict[str, str]) -> list[int]:
    """Per model: the feature records the drift monitor counted (all days)."""
    models = httpx.get(f"{api}/api/monitoring/drift", headers=headers).json()["models"]
    return [sum(day["records"] for day in model["days"]) for model in models.values()]


def test_messages_over_mllp_become_observations_and_results_the_api_reads(
    tmp_path: Path, fhir: ThreadedServer, model: ThreadedServer
) -> None:
    config, mllp_port, http_port = per_role_site_file(
        tmp_path, f"{fhir.base_url}/fhir", model.port, monitoring={"save_interval_s": 0.5}
    )
    log = tmp_path / "site.log"
    site = start_supervisor(config, mllp_port, log)
    sent = renal_messages(20)
    try:
        roles = children(site.pid)
        assert len(set(roles.values()) | {site.pid}) == 4  # three children and the supervisor
        with MllpClient("127.0.0.1", mllp_port) as client:
            codes = [client.send(message).code for _, message in sent]
        assert codes == ["AA"] * len(sent)
        observations = f"{fhir.base_url}/fhir/Observation"
        found = wait_for(
            lambda: at_least(observations, len(sent)),
            60,
            "an Observation per message",
        )
        mrns = sorted(r["subject"]["identifier"]["value"] for r in found)
        assert mrns == sorted(mrn for mrn, _ in sent)
        # The API is the ingest child's; the results are the write-back child's writes.
        api = f"http://127.0.0.1:{http_port}"
        headers = token_headers(tmp_path / "data", "viewer")
        body = httpx.get(f"{api}/api/results", params={"limit": 100}, headers=headers).json()
        assert body["total"] == len(sent)
        assert sorted(r["patient_id"] for r in body["results"]) == mrns
        one = body["results"][0]["identifier"]
        detail = httpx.get(f"{api}/api/results/{one}", headers=headers)
        assert detail.status_code == 200
        assert detail.json()["observation"]["resourceType"] == "Observation"
        # Drift is counted by the processing child; the ingest child's API shows what it saved.
        wait_for(
            lambda: len(sent) in drift_records(api, headers), 10, "the drift counts in the API"
        )
    finally:
        site.send_signal(signal.SIGTERM)
        site.wait(60)
    assert site.returncode == 0, log.read_text()[-3000:]  # every child stopped cleanly
    assert not any(alive(pid) for pid in roles.values())


def test_a_second_process_for_a_role_is_refused(
    tmp_path: Path, fhir: ThreadedServer, model: ThreadedServer
) -> None:
    """One consumer-group member per role on the embedded log: a second would redo the work."""
    config, mllp_port, _ = per_role_site_file(tmp_path, f"{fhir.base_url}/fhir", model.port)
    log = tmp_path / "site.log"
    site = start_supervisor(config, mllp_port, log)
    try:
        command = [sys.executable, "-m", "ehrbridge.cli", "run", "--config", str(config)]
        second = subprocess.run(
            [*command, "--role", "process"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        site.send_signal(signal.SIGTERM)
        site.wait(60)
    assert second.returncode == 2
    assert "another process already runs the process role" in second.stderr
