"""A site that cannot start says why, names the setting, and leaves nothing running.

Also the test and benchmark harness's own port handling: a port picked for a
child process must not be one an outgoing connection can take before the
child binds it (that race once failed CI: a site never listened).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from auth_tokens import localize
from conftest import wait_for
from site_processes import OwnBroker

from ehrbridge.bench.common import ChildExited, ephemeral_port_range, free_port, wait_port
from ehrbridge.sandbox.run import sandbox_site_file


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process (here, this one) already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield int(sock.getsockname()[1])


def site_file(tmp_path: Path, *, mllp: int, http: int) -> Path:
    config = yaml.safe_load(sandbox_site_file().read_text())
    config.update(data_dir=str(tmp_path / "data"))
    localize(config, tmp_path / "data")  # the API's token files
    config["mllp"]["port"] = mllp
    config["http"]["port"] = http
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_site(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ehrbridge.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("listener", ["mllp", "http"])
def test_a_port_in_use_stops_the_site_with_the_setting_named(
    tmp_path: Path, busy_port: int, listener: str
) -> None:
    ports = {"mllp": free_port(), "http": free_port(), listener: busy_port}
    result = run_site(site_file(tmp_path, **ports))
    assert result.returncode == 2, result.stderr
    assert f"error: {listener}.port: cannot listen on 127.0.0.1:{busy_port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    ephemeral = ephemeral_port_range()
    ports = {free_port() for _ in range(20)}
    assert all(port < ephemeral.start for port in ports)
    for port in ports:  # and each is really free
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_waiting_for_a_child_that_exits_fails_at_once() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(ChildExited, match="exited with 3"):
        wait_port(free_port(), timeout_s=60, process=child)


def test_waiting_for_a_port_nobody_opens_times_out() -> None:
    with pytest.raises(TimeoutError, match="nothing listens"):
        wait_port(free_port(), timeout_s=0.3)


ROLE = ("--role", "process")


@pytest.mark.kafka
def test_a_role_started_before_the_broker_waits_for_it(tmp_path: Path) -> None:
    """Boot order is not ours to choose: processing comes up once Kafka does."""
    broker = OwnBroker(tmp_path / "broker")
    config = site_file(tmp_path, mllp=free_port(), http=free_port())
    document = yaml.safe_load(config.read_text())
    document.update(site=f"early-{uuid.uuid4().hex[:8]}")
    document["transport"] = {"kind": "kafka", "bootstrap": broker.bootstrap, "partitions": 2}
    config.write_text(yaml.safe_dump(document))
    log = tmp_path / "process.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ehrbridge.cli", "run", "--config", str(config), *ROLE],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "cannot start yet" in log.read_text(), 60, "a start-up retry")
        assert process.poll() is None, log.read_text()[-3000:]
        broker.start()
        wait_for(lambda: "started: roles=process" in log.read_text(), 120, "the role to start")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        broker.stop()
    assert "Traceback" not in log.read_text()
