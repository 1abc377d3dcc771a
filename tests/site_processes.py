"""A site on Kafka as real OS processes, for the fault tests.

Each role runs as its own ``ehrbridge run --config F --role R`` process, as
a production site does when it scales out: one ingest process (MLLP + HTTP),
one or more processing workers (each with its own local state directory, so
a new one must restore from the changelog), one write-back process. The
model server and the FHIR stand-in run in the test process on real sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from conftest import wait_for

from ehrbridge.adapters.kafka_log import KafkaLog
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.config import KafkaTransport
from ehrbridge.pipelines.errors import EhrbridgeError
from ehrbridge.pipelines.transport import Record
from ehrbridge.sandbox.run import sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

PATIENT_SYSTEM = "urn:ehrbridge:sandbox:mrn"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RoleProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class KafkaSite:
    """One site's config and role processes; ``close`` stops everything."""

    root: Path
    bootstrap: str
    fhir_base: str
    model_port: int
    site: str = field(default_factory=lambda: f"fault{uuid.uuid4().hex[:8]}")
    partitions: int = 4
    mllp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    processes: list[RoleProcess] = field(default_factory=list)

    def config_file(self, name: str, state_dir: Path | None = None) -> Path:
        config = yaml.safe_load(sandbox_site_file().read_text())
        config["site"] = self.site
        config["data_dir"] = str(self.root / "data")
        config["mllp"]["port"] = self.mllp_port
        config["http"]["port"] = self.http_port
        config["model"]["url"] = f"http://127.0.0.1:{self.model_port}"
        config["writeback"]["fhir_base"] = self.fhir_base
        config["transport"] = {
            "kind": "kafka",
            "bootstrap": self.bootstrap,
            "partitions": self.partitions,
            "request_timeout_s": 2.0,
            "state_dir": str(state_dir or self.root / f"state-{name}"),
        }
        # Enough delayed retry to outlast a 30 s model outage, then the DLQ.
        config["retry"] = {
            "attempts": 3,
            "initial_backoff_s": 0.2,
            "max_backoff_s": 1.0,
            "delayed_s": [2.0, 4.0, 8.0, 15.0, 30.0],
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, role: str, name: str | None = None) -> RoleProcess:
        name = name or role
        log = self.root / f"{name}.log"
        env = {**os.environ, "EHRBRIDGE_LOG_LEVEL": "INFO"}
        config = self.config_file(name)
        process = subprocess.Popen(
            [sys.executable, "-m", "ehrbridge.cli", "run", "--role", role, "--config", str(config)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        started = RoleProcess(name, process, log)
        self.processes.append(started)
        if role == "ingest":
            wait_for(
                lambda: port_open(self.mllp_port) or process.poll() is not None,
                60,
                "the ingest process to listen",
            )
        assert process.poll() is None, started.tail()
        return started

    def start_all(self, workers: int = 1) -> None:
        self.start("ingest")
        for n in range(workers):
            self.start("process", f"process-{n}")
        self.start("writeback")

    def diagnostics(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def close(self) -> None:
        for role in self.processes:
            role.stop()

    def kafka(self) -> KafkaLog:
        # The site's partition count: whoever creates a topic first sets it for good.
        return KafkaLog(
            KafkaTransport(kind="kafka", bootstrap=self.bootstrap, partitions=self.partitions)
        )

    def dead_letters(self) -> list[Record]:
        log = self.kafka()
        try:
            return log.read(f"{self.site}.dlq", limit=100_000)
        finally:
            log.close()


# ------------------------------------------------------------------ traffic --


@dataclass(frozen=True)
class Sent:
    mrn: str
    control_id: str
    ack: str  # AA, AE, AR, or "none" (no answer: connection error, timeout)


def renal_messages(count: int, seed: int = 5) -> list[tuple[str, str, bytes]]:
    """``count`` complete renal ORU^R01, one patient each: (mrn, control id, bytes)."""
    ehr = SyntheticEhr(patients=1, seed=seed)
    tag = uuid.uuid4().hex[:6].upper()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for n in range(count):
        mrn, control_id = f"M{tag}{n:06d}", f"C{tag}{n:06d}"
        message = ehr.renal_oru_for(
            age=40 + n % 45,
            female=n % 2 == 0,
            at=start + timedelta(minutes=n),
            egfr=12.0 + n % 45,
            uacr_mg_g=30.0 + (n * 7) % 900,
            mrn=mrn,
            control_id=control_id,
        )
        out.append((mrn, control_id, message))
    return out


def send_all(
    port: int,
    messages: Iterable[tuple[str, str, bytes]],
    connections: int = 6,
    timeout_s: float = 15.0,
    resend_unanswered: int = 0,
) -> list[Sent]:
    """Send over several MLLP connections; every message gets a recorded outcome.

    ``resend_unanswered``: as an EHR's interface engine does, send a message
    with no answer (refused, reset, timed out) again, this many times.
    """
    items = list(messages)
    results: list[Sent] = []
    lock = threading.Lock()

    def sender(part: list[tuple[str, str, bytes]]) -> None:
        client: MllpClient | None = None
        for mrn, control_id, message in part:
            for attempt in range(resend_unanswered + 1):
                try:
                    if client is None:
                        client = MllpClient("127.0.0.1", port, timeout_s=timeout_s)
                        client.connect()
                    ack = client.send(message)
                    code = ack.code if ack.control_id == control_id else "none"
                except (OSError, EhrbridgeError):  # refused, reset, timed out: no answer
                    code = "none"
                    if client is not None:
                        client.close()
                    client = None
                if code != "none":
                    break
                if attempt < resend_unanswered:
                    time.sleep(0.5)
            with lock:
                results.append(Sent(mrn, control_id, code))
        if client is not None:
            client.close()

    threads = [
        threading.Thread(target=sender, args=(items[i::connections],)) for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def accepted(sent: Iterable[Sent]) -> set[str]:
    return {s.mrn for s in sent if s.ack == "AA"}


# ---------------------------------------------------------------- the EHR --


def observation_count(fhir_base: str) -> int:
    bundle = httpx.get(f"{fhir_base}/Observation", params={"_count": 0}, timeout=30).json()
    return int(bundle["total"])


def all_observations(fhir_base: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    url: str | None = f"{fhir_base}/Observation"
    params: dict[str, Any] | None = {"_count": 1000}
    with httpx.Client(timeout=60) as client:
        while url:
            bundle = client.get(url, params=params).json()
            params = None
            found.extend(e["resource"] for e in bundle.get("entry", []))
            url = next((x["url"] for x in bundle.get("link", []) if x["relation"] == "next"), None)
    return found


def subjects(observations: Iterable[dict[str, Any]]) -> list[str]:
    return [o["subject"]["identifier"]["value"] for o in observations]


def wait_for_observations(site: KafkaSite, expected: int, timeout_s: float = 240) -> None:
    try:
        wait_for(
            lambda: observation_count(site.fhir_base) >= expected,
            timeout_s,
            f"{expected} Observations",
        )
    except AssertionError as error:
        have = observation_count(site.fhir_base)
        dead = site.dead_letters()
        raise AssertionError(
            f"{error}: have {have}; {len(dead)} dead letters "
            f"{[r.headers.get('error.reason') for r in dead[:5]]}\n{site.diagnostics()}"
        ) from error
