"""Each role builds only what it uses, and the API answers only what its role can
answer (issue 12): an ingest-only process on Kafka has no ``/api/patients``,
because the patient state lives with the processing role's partitions; asked
anyway, it answers 404 with a problem body naming the role that serves it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from auth_tokens import cds_headers, headers, localize, token_headers
from conftest import wait_for
from fastapi.testclient import TestClient

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.api import create_api
from ehrbridge.auth import Authenticator
from ehrbridge.cds_hooks import SERVICE_ID, WITHHELD
from ehrbridge.config import KafkaTransport, SiteConfig, load_site_config
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


def site_config(tmp_path: Path, transport: dict[str, object] | None = None) -> SiteConfig:
    config = yaml.safe_load(sandbox_site_file().read_text())
    data_dir = tmp_path / "data"
    localize(config, data_dir)
    config["data_dir"] = str(data_dir)
    if transport is not None:
        config["transport"] = transport
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_site_config(path)


def patient_answer(runtime: SiteRuntime, data_dir: Path) -> tuple[int, set[str]]:
    """The status of GET /api/patients/M1 with a viewer token, and the API's paths."""
    auth = Authenticator(runtime.config.auth)
    app = create_api(runtime.api_parts(auth))
    with TestClient(app) as client:
        response = client.get("/api/patients/M1", headers=token_headers(data_dir, "viewer"))
        return response.status_code, set(client.get("/openapi.json").json()["paths"])


@pytest.mark.kafka
def test_an_ingest_only_process_on_kafka_serves_no_patient_route(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    transport = {"kind": "kafka", "bootstrap": kafka_bootstrap, "state_dir": str(tmp_path / "st")}
    config = site_config(tmp_path, transport)
    runtime = SiteRuntime(config, {Role.INGEST})
    try:
        assert runtime.readable_state() is None
        status, paths = patient_answer(runtime, config.data_dir)
        assert status == 404
        assert "/api/patients/{patient_id}" not in paths
        assert "/api/results" in paths  # results are read from the local result store
        assert not (config.data_dir / "state.sqlite").exists()  # no store nothing writes
    finally:
        runtime.log.close()
        runtime.results.close()
        runtime.patient_links.close()


@contextmanager
def running(runtime: SiteRuntime) -> Iterator[SiteRuntime]:
    """A runtime started on its own event loop thread, its listeners on real sockets."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(runtime.start(), loop).result(60)
        yield runtime
    finally:
        asyncio.run_coroutine_threadsafe(runtime.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def renal_oru(mrn: str, egfr: float = 24.0, month: int = 3) -> bytes:
    at = datetime(2026, month, 1, tzinfo=UTC)
    ehr = SyntheticEhr(patients=1)
    return ehr.renal_oru_for(age=61, female=True, at=at, egfr=egfr, uacr_mg_g=380.0, mrn=mrn)


@pytest.mark.kafka
def test_on_kafka_each_role_answers_patients_as_it_can_over_real_sockets(
    tmp_path: Path, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    site, mrn = f"roles{uuid.uuid4().hex[:8]}", f"M{uuid.uuid4().hex[:10]}"
    transport = KafkaTransport(kind="kafka", bootstrap=kafka_bootstrap, state_dir=tmp_path / "st")

    def on_kafka(config: SiteConfig) -> SiteConfig:
        return config.model_copy(update={"site": site, "transport": transport})

    with BackgroundSandbox(tmp_path / "all", configure=on_kafka, fhir_site=False) as sandbox:
        # The processing role's process (here with ingest and write-back): it holds the state.
        with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
            assert client.send(renal_oru(mrn)).code == "AA"
        viewer = headers(sandbox, "viewer")
        url = f"{sandbox.sandbox.api_url}/api/patients/{mrn}"
        known = wait_for(
            lambda: (r := httpx.get(url, headers=viewer)).status_code == 200 and r.json(),
            60,
            "the patient's state through the processing process's API",
        )
        assert known["patient_id"] == mrn and known["facts"]
        # An ingest-only process of the same site: own data dir, own ports.
        base = sandbox.sandbox.config
        only = base.model_copy(
            update={
                "data_dir": tmp_path / "ingest-only",
                "http": base.http.model_copy(update={"port": 0}),
                "mllp": base.mllp.model_copy(update={"port": 0}),
            }
        )
        with running(SiteRuntime(only, {Role.INGEST})) as ingest:
            assert ingest.http is not None
            api = f"{ingest.http.scheme}://127.0.0.1:{ingest.http_port}"
            answer = httpx.get(f"{api}/api/patients/{mrn}", headers=viewer)
            assert answer.status_code == 404
            assert answer.headers["content-type"] == "application/problem+json"
            problem = answer.json()
            assert problem["status"] == 404 and problem["served_by_role"] == "process"
            assert problem["this_process_roles"] == ["ingest"]
            assert "process role" in problem["detail"] and mrn not in problem["detail"]
            assert httpx.get(f"{api}/api/patients/{mrn}").status_code == 401  # token first
            assert httpx.get(f"{api}/api/results", headers=viewer).status_code == 200
            ready = httpx.get(f"{api}/health/ready").json()
            assert ready["checks"]["log"] == "ok"  # the broker answers the raw topic's metadata
            assert not (only.data_dir / "state.sqlite").exists()
        # Its CDS cards cannot check the model's domain against the newest record: said.
        blind = [r for r in caplog.records if "cannot see the patient state" in r.getMessage()]
        assert len(blind) == 1 and mrn not in blind[0].getMessage()


def hook(sandbox: BackgroundSandbox, api: str, patient_id: str) -> httpx.Response:
    """The patient-view hook on ``api``, signed by the sandbox's EHR."""
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/example", "patientId": patient_id},
    }
    url = f"{api}/cds-services/{SERVICE_ID}"
    return httpx.post(url, json=body, headers=cds_headers(sandbox, api), timeout=10)


def copy_results(source: Path, target: Path) -> None:
    """The result store as another process of the site would hold it (SQLite's backup)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


@pytest.mark.kafka
def test_on_kafka_an_ingest_only_process_never_shows_a_score_it_cannot_check(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    site, mrn = f"safe{uuid.uuid4().hex[:8]}", f"M{uuid.uuid4().hex[:10]}"
    transport = KafkaTransport(kind="kafka", bootstrap=kafka_bootstrap, state_dir=tmp_path / "st")

    def on_kafka(config: SiteConfig) -> SiteConfig:
        return config.model_copy(update={"site": site, "transport": transport})

    with BackgroundSandbox(tmp_path / "all", configure=on_kafka, fhir_site=False) as sandbox:
        all_api, viewer = sandbox.sandbox.api_url, headers(sandbox, "viewer")
        base = sandbox.sandbox.config
        with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
            assert client.send(renal_oru(mrn)).code == "AA"  # eGFR 24: inside the domain
            wait_for(lambda: hook(sandbox, all_api, mrn).json()["cards"], 60, "the score's card")
            # Another process of the site holding that score, e.g. after a shared volume.
            only_dir = tmp_path / "ingest-only"
            copy_results(base.data_dir / "results.sqlite", only_dir / "results.sqlite")
            assert client.send(renal_oru(mrn, egfr=72.0, month=4)).code == "AA"  # now outside
        state_url = f"{all_api}/api/patients/{mrn}"

        def judged_outside() -> bool:
            outcome = httpx.get(state_url, headers=viewer).json()["last_outcome"] or {}
            return "out_of_domain" in outcome

        wait_for(judged_outside, 60, "the newest record judged outside the model's domain")
        assert hook(sandbox, all_api, mrn).json()["cards"] == []  # the process role withholds it
        only = base.model_copy(
            update={
                "data_dir": only_dir,
                "http": base.http.model_copy(update={"port": 0}),
                "mllp": base.mllp.model_copy(update={"port": 0}),
            }
        )
        with running(SiteRuntime(only, {Role.INGEST})) as ingest:
            assert ingest.http is not None
            api = f"{ingest.http.scheme}://127.0.0.1:{ingest.http_port}"
            held = httpx.get(f"{api}/api/results?patient={mrn}", headers=viewer).json()
            assert held["total"] == 1  # the stale score is in this process's result store
            # CDS Hooks: still discoverable, and no card, with why for the integration team.
            services = httpx.get(f"{api}/cds-services").json()["services"]
            assert [s["id"] for s in services] == [SERVICE_ID]
            answer = hook(sandbox, api, mrn)
            assert answer.status_code == 200 and answer.json()["cards"] == []
            why = answer.json()["extension"][WITHHELD]
            assert why["served_by_role"] == "process" and mrn not in why["reason"]
            unsigned = httpx.post(f"{api}/cds-services/{SERVICE_ID}", json={}, timeout=10)
            assert unsigned.status_code == 401  # the EHR's JWT is checked first
            # The risk page: the problem /api/patients answers, the token checked first.
            page = httpx.get(f"{api}/ui/patients/{mrn}", headers=viewer)
            assert page.status_code == 404
            assert page.headers["content-type"] == "application/problem+json"
            assert page.json()["served_by_role"] == "process" and mrn not in page.text
            assert httpx.get(f"{api}/ui/patients/{mrn}").status_code == 401


def test_on_the_embedded_log_the_ingest_role_reads_the_shared_state(tmp_path: Path) -> None:
    config = site_config(tmp_path)
    runtime = SiteRuntime(config, {Role.INGEST})
    try:
        status, paths = patient_answer(runtime, config.data_dir)
        assert "/api/patients/{patient_id}" in paths
        assert status == 404  # the route answers: this patient is unknown
        assert (config.data_dir / "state.sqlite").exists()
    finally:
        runtime.log.close()
        for store in ("results", "patient_links", "state"):
            getattr(runtime, store).close()


def test_a_role_opens_only_the_stores_it_uses(tmp_path: Path) -> None:
    config = site_config(tmp_path)
    runtime = SiteRuntime(config, {Role.PROCESS})
    runtime.log.close()
    opened = {p.name for p in config.data_dir.glob("*.sqlite")}
    assert opened == {"log.sqlite"}  # state opens when processing starts, results never


def test_loading_the_processing_stage_does_not_load_kafka() -> None:
    code = (
        "import sys, ehrbridge.runtime, ehrbridge.pipelines.process, ehrbridge.adapters; "
        "print(sorted(m for m in sys.modules if m == 'kafka' or m.startswith('kafka.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
