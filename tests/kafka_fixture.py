"""Session fixtures that hand tests a real Apache Kafka broker.

Where the broker comes from, first match wins:

1. ``KAFKA_BOOTSTRAP`` is set: that already running broker, left as found.
2. ``EHRBRIDGE_KAFKA=testcontainers`` and a Docker engine answers: testcontainers'
   ``KafkaContainer`` (KRaft). testcontainers is optional and imported lazily.
3. Otherwise ``scripts/kafka start``: Kafka 4.x from the official Maven Central
   jars on the local Java 17. A broker this fixture started is stopped at the
   end of the session (``EHRBRIDGE_KAFKA_KEEP=1`` keeps it for the next run);
   one that was already running is reused and left running.

When no broker can be had, the tests that need one are skipped, except under
``CI=true`` where the session fails: CI must never go green without Kafka.

Use from ``tests/conftest.py`` with ``pytest_plugins = ["kafka_fixture"]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO_ROOT / "scripts" / "kafka"
# A cold start resolves ~45 jars (~43 MB) from Maven Central before booting.
SCRIPT_START_TIMEOUT_S = 600.0
SCRIPT_STOP_TIMEOUT_S = 60.0
SERVING_TIMEOUT_S = 60.0

BrokerSource = Literal["env", "testcontainers", "script"]


class BrokerUnavailableError(RuntimeError):
    """No Kafka broker could be started or reached."""


@dataclass(frozen=True)
class KafkaBroker:
    """A reachable broker: where clients connect, and who provided it."""

    bootstrap: str
    source: BrokerSource


Cleanup = Callable[[], None]


def _nothing_to_clean() -> None:
    return None


# ------------------------------------------------------------ scripts/kafka --


def run_kafka_script(command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/kafka COMMAND``; its stdout is the bootstrap address or empty."""
    try:
        return subprocess.run(
            [str(KAFKA_SCRIPT), command],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerUnavailableError(f"scripts/kafka {command}: {exc}") from exc


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def script_status() -> str | None:
    """The bootstrap address of the scripts/kafka broker, or None if it is not up."""
    result = run_kafka_script("status", timeout_s=30.0)
    return _last_line(result.stdout) if result.returncode == 0 else None


def script_start() -> str:
    """Start (or reuse) the scripts/kafka broker; return its bootstrap address."""
    result = run_kafka_script("start", timeout_s=SCRIPT_START_TIMEOUT_S)
    address = _last_line(result.stdout)
    if result.returncode != 0 or not address:
        tail = "\n".join(result.stderr.strip().splitlines()[-40:])
        raise BrokerUnavailableError(f"scripts/kafka start exited {result.returncode}:\n{tail}")
    return address


def script_stop() -> None:
    result = run_kafka_script("stop", timeout_s=SCRIPT_STOP_TIMEOUT_S)
    if result.returncode != 0:
        warnings.warn(f"scripts/kafka stop failed: {result.stderr.strip()}", stacklevel=2)


def _broker_from_script() -> tuple[KafkaBroker, Cleanup]:
    already_running = script_status() is not None
    broker = KafkaBroker(bootstrap=script_start(), source="script")
    keep = already_running or os.environ.get("EHRBRIDGE_KAFKA_KEEP") == "1"
    return broker, (_nothing_to_clean if keep else script_stop)


# ---------------------------------------------------------- testcontainers --


def docker_engine_reachable(timeout_s: float = 2.0) -> bool:
    """True when the Docker engine of DOCKER_HOST (or the default socket) answers /_ping."""
    url = urlparse(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    try:
        if url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(url.path)
        elif url.scheme == "tcp" and url.hostname and url.port:
            sock = socket.create_connection((url.hostname, url.port), timeout=timeout_s)
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
    except OSError:
        return False


def _broker_from_testcontainers() -> tuple[KafkaBroker, Cleanup]:
    try:
        from testcontainers.kafka import KafkaContainer
    except ImportError as exc:
        raise BrokerUnavailableError("testcontainers[kafka] is not installed") from exc
    image = os.environ.get("EHRBRIDGE_KAFKA_IMAGE")
    container = KafkaContainer(image) if image else KafkaContainer()
    try:
        container.with_kraft()
        container.start()
    except Exception as exc:  # docker and image errors come in many types
        raise BrokerUnavailableError(f"testcontainers Kafka did not start: {exc}") from exc
    broker = KafkaBroker(bootstrap=str(container.get_bootstrap_server()), source="testcontainers")
    return broker, container.stop


# ---------------------------------------------------------------- common --


def wait_until_serving(bootstrap: str, timeout_s: float = SERVING_TIMEOUT_S) -> None:
    """Block until the broker answers a metadata request (proves more than an open port)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        except KafkaError as exc:
            last_error = exc
            time.sleep(0.5)
            continue
        try:
            admin.list_topics()
            return
        except KafkaError as exc:
            last_error = exc
            time.sleep(0.5)
        finally:
            admin.close()
    raise BrokerUnavailableError(f"{bootstrap} did not serve within {timeout_s}s: {last_error}")


def acquire_broker() -> tuple[KafkaBroker, Cleanup]:
    """Find or start a broker (see the module docstring for the order)."""
    env_bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if env_bootstrap:
        # scripts/test starts the broker with scripts/kafka and passes it on: still "script"
        source = "script" if _script_broker_address() == env_bootstrap else "env"
        return KafkaBroker(bootstrap=env_bootstrap, source=source), _nothing_to_clean
    if os.environ.get("EHRBRIDGE_KAFKA") == "testcontainers":
        if docker_engine_reachable():
            try:
                return _broker_from_testcontainers()
            except BrokerUnavailableError as exc:
                warnings.warn(f"{exc}; falling back to scripts/kafka", stacklevel=2)
        else:
            warnings.warn(
                "EHRBRIDGE_KAFKA=testcontainers but no Docker engine answers; "
                "falling back to scripts/kafka",
                stacklevel=2,
            )
    return _broker_from_script()


def _script_broker_address() -> str:
    """The address ``scripts/kafka status`` reports, or "" when its broker is not running."""
    status = run_kafka_script("status", timeout_s=30.0)
    return status.stdout.strip() if status.returncode == 0 else ""


def running_in_ci() -> bool:
    """CI sets ``CI=true``: there a missing prerequisite fails the run instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A real, serving Kafka broker for the whole test session."""
    cleanup: Cleanup = _nothing_to_clean
    try:
        broker, cleanup = acquire_broker()
        wait_until_serving(broker.bootstrap)
    except BrokerUnavailableError as exc:
        with contextlib.suppress(Exception):
            cleanup()
        message = f"no Kafka broker: {exc}"
        if running_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    LOG.info("Kafka broker %s from %s", broker.bootstrap, broker.source)
    try:
        yield broker
    finally:
        cleanup()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """The ``host:port`` bootstrap address of the session's Kafka broker."""
    return kafka_broker.bootstrap
