"""``ehrbridge sandbox --ehr hapi``: the sandbox writes to a real HAPI FHIR JPA server.

The default EHR is the in-process stand-in; with ``--ehr hapi`` no stand-in
starts and every result goes to the server ``scripts/hapi`` runs, where the
README's Observation search finds it. Each test uses patients of its own (a
fresh MRN), since the server's database outlives test runs.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from auth_tokens import headers as auth
from conftest import all_resources, wait_for
from hapi_fixture import HapiServer

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.pipelines.results import Delivery
from ehrbridge.sandbox.run import BackgroundSandbox, banner, count_observations
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


@pytest.fixture(scope="module")
def on_hapi(
    hapi_server: HapiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundSandbox]:
    data_dir = tmp_path_factory.mktemp("sandbox-hapi")
    with BackgroundSandbox(data_dir, fhir_site=False, ehr_base=hapi_server.base) as running:
        yield running


def send_renal_result(running: BackgroundSandbox) -> str:
    """One ORU^R01 inside KFRE's population, for a patient no earlier run has used."""
    mrn = f"M{uuid.uuid4().hex[:9]}"
    message = SyntheticEhr(patients=1).renal_oru_for(
        age=64,
        female=True,
        at=datetime.now(UTC) - timedelta(days=1),
        egfr=41,
        uacr_mg_g=120.0,
        mrn=mrn,
    )
    with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
        assert client.send(message).code == "AA"
    return mrn


@pytest.mark.hapi
def test_results_go_to_hapi_and_the_readme_search_finds_them(
    on_hapi: BackgroundSandbox, hapi_server: HapiServer
) -> None:
    sandbox = on_hapi.sandbox
    assert sandbox.fhir is None and sandbox.fhir_store is None  # no stand-in started
    assert sandbox.fhir_base == hapi_server.base
    before = on_hapi.call(count_observations(hapi_server.base))
    mrn = send_renal_result(on_hapi)
    results = sandbox.runtime.results  # type: ignore[union-attr]

    def delivered() -> str | None:
        found = results.list(patient_id=mrn)
        return found[0].identifier if found and found[0].status == Delivery.DELIVERED else None

    identifier = wait_for(delivered, timeout_s=60, what="the result delivered to HAPI")
    system = sandbox.config.mapping.patient.fhir_system
    # README, Write-back to a real FHIR server: the search that works on HAPI.
    found = all_resources(
        f"{hapi_server.base}/Observation", {"patient.identifier": f"{system}|{mrn}"}
    )
    assert [o["identifier"][0]["value"] for o in found] == [identifier]
    assert on_hapi.call(count_observations(hapi_server.base)) >= before + 1
    shown = banner(sandbox, traffic=False)
    assert f"{hapi_server.base}/Observation   <- the real FHIR server (--ehr hapi)" in shown
    assert auth(on_hapi)  # the API still has its tokens: nothing else changed


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ehrbridge.cli", "sandbox", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_ehr_hapi_without_a_server_url_says_how_to_start_one(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = run_cli("--ehr", "hapi", "--no-traffic", "--data-dir", str(tmp_path / "d"), env=env)
    assert done.returncode == 2
    assert "--ehr hapi needs the server's FHIR base" in done.stderr
    assert "scripts/hapi start" in done.stderr


def test_ehr_hapi_refuses_a_server_that_does_not_answer(tmp_path: Path) -> None:
    silent = "http://127.0.0.1:9/fhir"  # the discard port: nothing answers FHIR there
    done = run_cli(
        "--ehr", "hapi", "--ehr-url", silent, "--no-traffic", "--data-dir", str(tmp_path / "d")
    )
    assert done.returncode == 2, done.stderr
    assert f"the FHIR server at {silent} does not answer" in done.stderr
