"""Each role builds only what it uses, and the API answers only what its role can
answer (issue 12): an ingest-only process on Kafka has no ``/api/patients``,
because the patient state lives with the processing role's partitions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from auth_tokens import localize, token_headers
from fastapi.testclient import TestClient

from ehrbridge.api import create_api
from ehrbridge.auth import Authenticator
from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.run import sandbox_site_file


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
