"""Nothing ACKed is lost when the roles of an embedded site run as processes.

``transport.processes: per-role``: ``ehrbridge run`` supervises an ingest, a
processing and a write-back child sharing the SQLite files. Each test uses
real processes and sockets:

* kill -9 of every process of the site after an AA (the model down, so the
  message cannot have been processed): after a restart it becomes one
  Observation;
* kill -9 of the processing child alone: the supervisor reports it, starts
  it again, and the AA'd messages all arrive, each once;
* kill -9 of the supervisor: its children stop (the lifeline), no orphans;
* a role that cannot start (its port in use) stops the site, exit 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import all_resources, wait_for
from role_processes import alive, at_least, children, kill_all, per_role_site_file, start_supervisor

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.bench.common import free_port
from ehrbridge.sandbox.fhir_server import create_fhir_app
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


@pytest.fixture
def fhir() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_fhir_app()) as server:
        yield server


def renal_oru(n: int = 0) -> tuple[str, bytes]:
    mrn = f"M{uuid.uuid4().hex[:10]}"
    message = SyntheticEhr(patients=1).renal_oru_for(
        age=64,
        female=False,
        at=datetime(2026, 2, 1, tzinfo=UTC) + timedelta(days=n),
        egfr=28.0,
        uacr_mg_g=420.0,
        mrn=mrn,
        control_id=f"C{uuid.uuid4().hex[:10]}",
    )
    return mrn, message


def send_all(port: int, messages: list[bytes]) -> list[str]:
    with MllpClient("127.0.0.1", port) as client:
        return [client.send(message).code for message in messages]


def test_an_acked_message_survives_kill_9_of_every_role_process(
    tmp_path: Path, fhir: ThreadedServer
) -> None:
    model_port = free_port()  # nothing listens here yet: the model is down
    config, mllp_port, _ = per_role_site_file(tmp_path, f"{fhir.base_url}/fhir", model_port)
    log = tmp_path / "site.log"
    site = start_supervisor(config, mllp_port, log)
    pids = [site.pid, *children(site.pid).values()]
    mrn, message = renal_oru()
    try:
        assert send_all(mllp_port, [message]) == ["AA"]
    finally:
        kill_all(pids, signal.SIGKILL)  # the whole site at once, as a power cut would
        site.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "every site process gone")
    observations = f"{fhir.base_url}/fhir/Observation"
    assert all_resources(observations) == []  # not processed before the kill

    with ThreadedServer(create_model_app(), port=model_port):
        site = start_supervisor(config, mllp_port, log)
        try:
            found = wait_for(
                lambda: all_resources(observations), 60, "the Observation after restart"
            )
        finally:
            site.send_signal(signal.SIGTERM)
            site.wait(60)
    assert [r["subject"]["identifier"]["value"] for r in found] == [mrn]
    assert site.returncode == 0, log.read_text()[-3000:]


def test_a_killed_role_process_is_restarted_and_loses_nothing(
    tmp_path: Path, fhir: ThreadedServer
) -> None:
    with ThreadedServer(create_model_app()) as model:
        config, mllp_port, _ = per_role_site_file(tmp_path, f"{fhir.base_url}/fhir", model.port)
        log = tmp_path / "site.log"
        site = start_supervisor(config, mllp_port, log)
        try:
            first = children(site.pid)["process"]
            os.kill(first, signal.SIGKILL)
            batch = [renal_oru(n) for n in range(10)]
            # Ingest keeps ACKing while processing is down: the records wait in the log.
            assert send_all(mllp_port, [m for _, m in batch]) == ["AA"] * len(batch)
            again = wait_for(
                lambda: (pid := children(site.pid).get("process")) != first and pid, 30,
                "the processing role started again",
            )  # fmt: skip
            observations = f"{fhir.base_url}/fhir/Observation"
            found = wait_for(
                lambda: at_least(observations, len(batch)),
                60,
                "an Observation per AA'd message",
            )
            assert alive(again)
        finally:
            site.send_signal(signal.SIGTERM)
            site.wait(60)
    mrns = sorted(r["subject"]["identifier"]["value"] for r in found)
    assert mrns == sorted(mrn for mrn, _ in batch)  # each once
    text = log.read_text()
    assert "role process exited with -9; starting it again" in text
    assert site.returncode == 0, text[-3000:]


def test_kill_9_of_the_supervisor_leaves_no_orphans(tmp_path: Path, fhir: ThreadedServer) -> None:
    config, mllp_port, _ = per_role_site_file(tmp_path, f"{fhir.base_url}/fhir", free_port())
    log = tmp_path / "site.log"
    site = start_supervisor(config, mllp_port, log)
    roles = children(site.pid)
    os.kill(site.pid, signal.SIGKILL)
    site.wait(10)
    try:
        wait_for(lambda: not any(alive(p) for p in roles.values()), 60, "the children to stop")
    finally:
        kill_all(list(roles.values()), signal.SIGKILL)
    assert log.read_text().count("the supervising process is gone") == len(roles)


def test_a_role_that_cannot_start_stops_the_site(tmp_path: Path, fhir: ThreadedServer) -> None:
    """A port in use: the ingest child fails at each start; after three the site exits 1."""
    config, mllp_port, _ = per_role_site_file(tmp_path, f"{fhir.base_url}/fhir", free_port())
    log = tmp_path / "site.log"
    with socket.create_server(("127.0.0.1", mllp_port)):  # someone else has the MLLP port
        site = subprocess.Popen(
            [sys.executable, "-m", "ehrbridge.cli", "run", "--config", str(config)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        try:
            site.wait(120)
        finally:
            if site.poll() is None:
                site.kill()
    text = log.read_text()
    assert site.returncode == 1, text[-3000:]
    assert text.count("role ingest exited with 2; starting it again") == 2
    assert "role ingest exited with 2 3 times within 30 s of its start" in text
    assert "mllp.port: cannot listen" in text  # the child's own error says why
