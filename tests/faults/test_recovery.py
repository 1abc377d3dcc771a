"""Nothing that got an AA is lost: kill -9 the site process after the ACK, restart it.

The site runs as a real ``ehrbridge run`` process. The model server is down
when the message arrives, so the message cannot have been processed before the
kill; after the restart (with the model back) it must still become an
Observation in the EHR stand-in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from auth_tokens import localize
from conftest import all_resources, wait_for

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.bench.common import free_port, port_open
from ehrbridge.sandbox.fhir_server import create_fhir_app
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.sandbox.run import sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


@pytest.fixture
def fhir() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_fhir_app()) as server:
        yield server


def site_file(tmp_path: Path, fhir_base: str, model_port: int) -> tuple[Path, int]:
    config = yaml.safe_load(sandbox_site_file().read_text())
    mllp_port = free_port()
    config["data_dir"] = str(tmp_path / "data")
    localize(config, tmp_path / "data")  # the API's token files
    config["mllp"]["port"] = mllp_port
    config["http"]["port"] = free_port()
    config["model"]["url"] = f"http://127.0.0.1:{model_port}"
    config["writeback"]["fhir_base"] = fhir_base
    config["retry"] = {
        "attempts": 3,
        "initial_backoff_s": 0.1,
        "max_backoff_s": 0.5,
        "delayed_s": [1.0, 2.0],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, mllp_port


def start_site(config: Path, mllp_port: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "ehrbridge.cli", "run", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: port_open(mllp_port) or process.poll() is not None, 30, "the site to listen")
    assert process.poll() is None, log.read_text()
    return process


def test_a_message_acked_before_kill_9_is_processed_after_restart(
    tmp_path: Path, fhir: ThreadedServer
) -> None:
    model_port = free_port()  # nothing listens here yet: the model is down
    config, mllp_port = site_file(tmp_path, f"{fhir.base_url}/fhir", model_port)
    log = tmp_path / "site.log"
    site = start_site(config, mllp_port, log)
    mrn, control_id = f"M{uuid.uuid4().hex[:10]}", f"C{uuid.uuid4().hex[:10]}"
    message = SyntheticEhr(patients=1).renal_oru_for(
        age=64,
        female=False,
        at=datetime(2026, 2, 1, tzinfo=UTC),
        egfr=28.0,
        uacr_mg_g=420.0,
        mrn=mrn,
        control_id=control_id,
    )
    try:
        with MllpClient("127.0.0.1", mllp_port) as client:
            ack = client.send(message)
        assert (ack.code, ack.control_id) == ("AA", control_id)
    finally:
        os.kill(site.pid, signal.SIGKILL)
        site.wait(10)
    assert site.returncode == -signal.SIGKILL
    observations = f"{fhir.base_url}/fhir/Observation"
    assert all_resources(observations) == []  # not processed before the kill

    with ThreadedServer(create_model_app(), port=model_port):
        site = start_site(config, mllp_port, log)
        try:
            found = wait_for(
                lambda: all_resources(observations), 60, "the Observation after restart"
            )
        finally:
            site.terminate()
            site.wait(20)
    assert len(found) == 1
    assert found[0]["subject"]["identifier"]["value"] == mrn
    assert found[0]["derivedFrom"][0]["identifier"]["value"].startswith(control_id)
    assert site.returncode == 0, log.read_text()  # SIGTERM is a clean shutdown
