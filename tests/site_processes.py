"""A site as real OS processes, for the fault tests (tests/faults/test_kafka_faults.py).

What runs where:

* the sandbox model server and FHIR stand-in: each its own ``python``
  process on a free port (:class:`ServerProcess`), so a test can kill one
  and start it again on the same port;
* the site: each role its own ``ehrbridge run --config F --role R`` process
  (:class:`KafkaSite`), as a production site scales out; every processing
  worker has its own local state directory, so a new one must restore its
  patients' state from the changelog topic;
* the EHR's interface engine: :class:`MllpTraffic`, several MLLP
  connections sending renal ORU^R01 from the synthetic EHR, recording every
  answer (AA, AE, AR, or none) with its time.

Every process is started in its own session and killed by process group,
so a failing test leaves nothing running (:class:`ProcessRegistry`).

What the EHR should hold at the end is derived with the product's own
functions (:func:`expected_observations`): the AA'd messages, in the order
the EHR sent them per patient, run through fact extraction, the per-patient
state merge, the trigger/episode rule and the deterministic prediction
identifier. So the tests compare Observation identifiers exactly: one per
patient episode that an AA'd message triggered, none lost, none extra, and
no identifier on two resources.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from conftest import wait_for
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka_fixture import KAFKA_SCRIPT

from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.adapters.kafka_log import KafkaLog
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.bench.common import free_port, port_open
from ehrbridge.bench.pipeline import fhir_total, observations
from ehrbridge.config import KafkaTransport, SiteConfig, load_site_config
from ehrbridge.core.errors import EhrbridgeError
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import FactRules, extract
from ehrbridge.pipelines.features import FeatureRecord, evaluate
from ehrbridge.pipelines.records import ModelInfo, prediction_identifier
from ehrbridge.pipelines.state import PatientState
from ehrbridge.pipelines.transport import Record
from ehrbridge.sandbox.credentials import localize_yaml
from ehrbridge.sandbox.run import sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

DAYS_PER_YEAR = 365.2425
HISTORY_START = datetime(2026, 1, 5, tzinfo=UTC)
RETRY_TIERS_S = [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
BIN = Path(sys.executable).parent
EHRBRIDGE = (
    [str(BIN / "ehrbridge")]
    if (BIN / "ehrbridge").exists()
    else [
        sys.executable,
        "-m",
        "ehrbridge.cli",
    ]
)


def wait_until(
    probe: Callable[[], Any], timeout_s: float, what: str, why: Callable[[], str]
) -> Any:
    """:func:`conftest.wait_for`, failing with the diagnostics ``why()`` as well."""
    try:
        return wait_for(probe, timeout_s, what)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{why()}") from None


# ----------------------------------------------------------------- processes --


@dataclass
class ManagedProcess:
    """One OS process in its own session; output (stdout and stderr) goes to ``log``."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        assert not self.alive, f"{self.name} is already running"
        with self.log.open("ab") as out:
            out.write(f"\n=== start {datetime.now(UTC).isoformat()} {self.argv}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: killpg reaches everything
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL to the whole process group: no shutdown code runs."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it is not gone within ``timeout_s``."""
        if not self.alive:
            return
        self._signal(signal.SIGTERM)
        assert self.process is not None
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()

    def terminate(self) -> None:
        """SIGTERM to the process group, without waiting."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        state = "running" if self.alive else f"exited {self.process and self.process.returncode}"
        body = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.name} ({state}; {self.log}) ---\n{body}"


class ProcessRegistry:
    """Every process a test started; :meth:`close` ends them all (fixture finalizer)."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []
        self.cleanups: list[Callable[[], None]] = []  # run after the processes are gone

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process)
        return process

    def close(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to all at once, then SIGKILL to whatever is still there after ``timeout_s``."""
        running = [p for p in self.processes if p.alive]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in running:
            assert process.process is not None
            try:
                process.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill9()
        for cleanup in self.cleanups:
            cleanup()

    def tails(self, lines: int = 25) -> str:
        return "\n".join(p.tail(lines) for p in self.processes)


_SERVE = (
    "import sys, uvicorn; from {module} import {factory}; "
    "uvicorn.run({factory}(), host='127.0.0.1', port=int(sys.argv[1]), "
    "log_level='warning', access_log=False, lifespan='off')"
)


@dataclass
class ServerProcess:
    """A sandbox HTTP server (model server, FHIR stand-in) as its own process."""

    process: ManagedProcess
    port: int
    ready_path: str

    @classmethod
    def create(
        cls, registry: ProcessRegistry, root: Path, kind: str, port: int | None = None
    ) -> ServerProcess:
        module, factory, ready = {
            "model": ("ehrbridge.sandbox.model_server", "create_model_app", "/v2/health/ready"),
            "fhir": ("ehrbridge.sandbox.fhir_server", "create_fhir_app", "/fhir/metadata"),
        }[kind]
        port = port or free_port()
        code = _SERVE.format(module=module, factory=factory)
        argv = [sys.executable, "-c", code, str(port)]
        managed = registry.add(ManagedProcess(f"{kind}-server", argv, root / f"{kind}-server.log"))
        server = cls(managed, port, ready)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process.start()
        wait_until(self.ready, 60, f"{self.process.name} on port {self.port}", self.process.tail)

    def ready(self) -> bool:
        if not self.process.alive:
            raise AssertionError(f"{self.process.name} exited\n{self.process.tail()}")
        try:
            return httpx.get(self.url + self.ready_path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


# ---------------------------------------------------------------------- site --


ROLES = ("ingest", "process", "writeback")


@dataclass
class KafkaSite:
    """One site on Kafka: a YAML file per role process, and those processes."""

    root: Path
    bootstrap: str
    fhir_base: str
    model_url: str
    registry: ProcessRegistry
    partitions: int = 4
    site: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:10]}")
    mllp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    roles: dict[str, ManagedProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry.cleanups.append(self.delete_topics)
        self.config_path = self.write_config("site")

    def write_config(self, name: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
        """The sandbox site (sandbox/site.yaml), live, on Kafka; ``edit`` changes it further."""
        config: dict[str, Any] = yaml.safe_load(sandbox_site_file().read_text())
        config.update(site=self.site, mode="live", data_dir=str(self.root / "data"))
        config["mllp"]["port"] = self.mllp_port
        config["http"]["port"] = self.http_port
        config["model"]["url"] = self.model_url
        config["writeback"]["fhir_base"] = self.fhir_base
        localize_yaml(config, self.root / "data")  # API tokens (tests/auth_tokens.py)
        config["transport"] = {
            "kind": "kafka",
            "bootstrap": self.bootstrap,
            "partitions": self.partitions,
            # A stopped broker must cost the sender an AR within seconds, not 5 s.
            "request_timeout_s": 2.0,
            # Each processing worker keeps its own local state: a worker that takes
            # over partitions has only what it restores from the changelog.
            "state_dir": str(self.root / f"state-{name}"),
        }
        # Short delayed-retry tiers, about 70 s in all: they outlast a 30 s model outage,
        # and a record never waits more than 15 s after its cause went away.
        config["retry"] = {
            "attempts": 3,
            "initial_backoff_s": 0.2,
            "max_backoff_s": 1.0,
            "delayed_s": RETRY_TIERS_S,
        }
        if edit is not None:
            edit(config)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def config(self) -> SiteConfig:
        return load_site_config(self.config_path)

    def start(
        self,
        role: str,
        name: str | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> ManagedProcess:
        """Start (or restart) one role process; the same name reuses its state directory."""
        assert role in ROLES, role
        name = name or role
        config = self.write_config(name, edit)
        process = self.roles.get(name)
        if process is None:
            argv = [*EHRBRIDGE, "run", "--config", str(config), "--role", role]
            process = self.registry.add(ManagedProcess(name, argv, self.root / f"{name}.log"))
            self.roles[name] = process
        process.start()
        if role == "ingest":
            wait_until(
                lambda: port_open(self.mllp_port) or not process.alive,
                60,
                "the ingest process to listen for MLLP",
                self.diagnostics,
            )
        assert process.alive, f"{name} exited at start\n{process.tail()}"
        return process

    def start_all(self, workers: int = 1) -> None:
        for n in range(workers):
            self.start("process", f"process-{n}")
        self.start("writeback")
        self.start("ingest")

    def traffic(self, **options: Any) -> MllpTraffic:
        """An EHR sending to this site's MLLP port; stopped with the site's processes."""
        traffic = MllpTraffic(self.mllp_port, **options)
        self.registry.cleanups.insert(0, traffic.stop)
        return traffic

    def kill9(self, name: str) -> None:
        self.roles[name].kill9()

    def restart(self, name: str) -> None:
        role = self.roles[name].argv[-1]
        self.start(role, name)

    def stop_all(self) -> None:
        """A clean shutdown (SIGTERM) of every role process."""
        for process in self.roles.values():
            process.stop()

    def log_text(self, name: str) -> str:
        return self.roles[name].log.read_text(errors="replace")

    # -- what the log holds --------------------------------------------------------------

    def kafka(self) -> KafkaLog:
        return KafkaLog(KafkaTransport(kind="kafka", bootstrap=self.bootstrap))

    def dead_letters(self) -> list[Record]:
        log = self.kafka()
        try:
            letters: list[Record] = log.read(f"{self.site}.dlq", limit=1_000_000)
            return letters
        finally:
            log.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ehrbridge ARGS --config <site.yaml>``, as an operator runs it."""
        return subprocess.run(
            [*EHRBRIDGE, *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def lag(self) -> dict[str, int]:
        """Records not yet committed, per consumer group of the site."""
        return group_lag(self.bootstrap, self.group_topics())

    def records_on(self, topics: Iterable[str]) -> int:
        """How many records these topics have received (end offsets; missing topics: 0)."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            existing = set(consumer.topics())
            partitions = [
                TopicPartition(t, p)
                for t in topics
                if t in existing
                for p in consumer.partitions_for_topic(t) or []
            ]
            return sum(consumer.end_offsets(partitions).values()) if partitions else 0
        finally:
            consumer.close()

    def delete_topics(self) -> None:
        """Remove this site's topics from the broker (best effort, at the end of a test)."""
        with contextlib.suppress(Exception):
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
            try:
                mine = [t for t in admin.list_topics() if t.startswith(f"{self.site}.")]
                if mine:
                    admin.delete_topics(mine)
            finally:
                admin.close()

    def retry_topics(self) -> list[str]:
        return self.group_topics()[f"{self.site}.retry-forwarder"]

    def group_topics(self) -> dict[str, list[str]]:
        tiers = [f"{self.site}.retry.{n}" for n in range(1, len(RETRY_TIERS_S) + 1)]
        return {
            f"{self.site}.process": [f"{self.site}.raw"],
            f"{self.site}.writeback": [f"{self.site}.predictions"],
            f"{self.site}.retry-forwarder": tiers,
        }

    def diagnostics(self) -> str:
        parts = [f"site {self.site}"]
        with contextlib.suppress(Exception):
            parts.append(f"consumer lag: {self.lag()}")
        with contextlib.suppress(Exception):
            dead = self.dead_letters()
            reasons = Counter(r.headers.get("error.reason", "?") for r in dead)
            parts.append(f"dead letters: {len(dead)} {dict(reasons)}")
        with contextlib.suppress(Exception):
            parts.append(f"Observations in the EHR: {observation_total(self.fhir_base)}")
        parts.append(self.registry.tails())
        return "\n".join(parts)

    def wait_drained(self, timeout_s: float = 240.0, why: Callable[[], str] | None = None) -> None:
        """Wait until every group of the site has committed everything (twice in a row)."""
        snapshots: list[dict[str, int]] = []

        def drained() -> bool:
            lag = self.lag()
            snapshots.append(lag)
            return (
                len(snapshots) >= 2
                and not any(snapshots[-1].values())
                and not any(snapshots[-2].values())
            )

        wait_until(drained, timeout_s, "the pipeline to drain", why or self.diagnostics)


def group_lag(bootstrap: str, groups: dict[str, list[str]]) -> dict[str, int]:
    """Per group: end offsets minus committed offsets, summed over its topics' partitions.

    A topic that does not exist yet counts as empty.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        existing = set(consumer.topics())
        lag: dict[str, int] = {}
        for group, topics in groups.items():
            partitions = [
                TopicPartition(t, p)
                for t in topics
                if t in existing
                for p in sorted(consumer.partitions_for_topic(t) or [])
            ]
            ends = consumer.end_offsets(partitions) if partitions else {}
            committed = admin.list_group_offsets({group: None}).get(group, {})
            lag[group] = sum(
                max(0, end - (committed[tp].offset if tp in committed else 0))
                for tp, end in ends.items()
            )
        return lag
    finally:
        consumer.close()
        admin.close()


# ------------------------------------------------------------------- traffic --


@dataclass(frozen=True)
class Outgoing:
    patient: str
    control_id: str
    payload: bytes
    at: datetime  # specimen collection time (OBR-7)


@dataclass(frozen=True)
class Answer:
    control_id: str
    code: str  # AA, AE, AR, or "none": refused, reset, timed out, or not this message's ACK
    started: float  # time.monotonic()
    finished: float


def renal_message(
    ehr: SyntheticEhr,
    mrn: str,
    control_id: str,
    *,
    at: datetime,
    birth: date,
    female: bool,
    **results: float | None,
) -> Outgoing:
    """One renal ORU^R01 with exactly these results (``egfr``, ``uacr_mg_g``, ...)."""
    payload = ehr.renal_oru_for(
        age=(at.date() - birth).days / DAYS_PER_YEAR,  # PID-7 comes out as ``birth``
        female=female,
        at=at,
        mrn=mrn,
        control_id=control_id,
        **results,  # type: ignore[arg-type,unused-ignore]
    )
    return Outgoing(mrn, control_id, payload, at)


def birth_date_of(n: int, start: datetime) -> date:
    return (start - timedelta(days=round((35 + n % 50) * DAYS_PER_YEAR))).date()


def renal_histories(
    patients: int, *, seed: int = 5, tag: str | None = None, self_contained: bool = False
) -> list[list[Outgoing]]:
    """Per patient, in the order an EHR sends them: five renal ORU^R01 over four episodes.

    The episode (the sandbox mapping's debounce) is the calendar day:

    ====  ======  ============  =====================================================
    msg   day     results       what it needs from the patient's state
    ====  ======  ============  =====================================================
    1     0       eGFR, UACR    nothing: complete in itself
    2     40      eGFR          UACR of day 0 (window 730 days)
    3     80      UACR          eGFR of day 40 (window 365 days)
    4     120     eGFR          UACR of day 80
    5     120     UACR          same day as 4: the same Observation, updated
    ====  ======  ============  =====================================================

    So 4 Observations per patient from 5 messages, and 3 of them are wrong or
    missing if a worker processes a message without the state the earlier ones
    built. ``self_contained``: every message carries eGFR and UACR (the
    broker test, where a message may legitimately be lost unacknowledged).
    """
    ehr = SyntheticEhr(patients=1, seed=seed)
    tag = tag or uuid.uuid4().hex[:6].upper()
    plan = [(0, 9, True, True), (40, 9, True, False), (80, 9, False, True), (120, 9, True, False),
            (120, 15, False, True)]  # fmt: skip
    start = HISTORY_START
    histories: list[list[Outgoing]] = []
    for n in range(patients):
        mrn = f"P{tag}{n:05d}"
        birth = birth_date_of(n, start)
        history = []
        for k, (day, hour, with_egfr, with_uacr) in enumerate(plan):
            at = start + timedelta(days=day + n % 7, hours=hour, minutes=n % 60)
            egfr = 15.0 + (n * 7 + k * 3) % 45
            uacr = 30.0 + (n * 37 + k * 11) % 1500
            history.append(
                renal_message(
                    ehr,
                    mrn,
                    f"C{tag}{n:05d}-{k}",
                    at=at,
                    birth=birth,
                    female=n % 2 == 0,
                    egfr=egfr if with_egfr or self_contained else None,
                    uacr_mg_g=uacr if with_uacr or self_contained else None,
                )
            )
        histories.append(history)
    return histories


def stream_histories(
    ehr: SyntheticEhr, config: SiteConfig, visits: int = 4
) -> list[list[Outgoing]]:
    """The synthetic EHR's realistic stream (ADT, panels, preliminaries, corrections) per patient.

    Each patient's messages stay in the stream's order; the partition key is
    the one ingest derives (the patient id).
    """
    rules = FactRules(config.mapping)
    by_patient: dict[str, list[Outgoing]] = {}
    for at, payload in ehr.stream(visits_per_patient=visits):
        extraction = extract(Message.parse(payload), rules)
        (key,) = extraction.keys  # the synthetic EHR writes one patient per message
        outgoing = Outgoing(key, extraction.control_id, payload, at)
        by_patient.setdefault(key, []).append(outgoing)
    return list(by_patient.values())


class MllpTraffic:
    """The EHR's interface engine: several MLLP connections, every answer recorded.

    Each patient's messages go over one connection, in order, as an EHR does
    (per-patient order is what the MLLP ACK protocol preserves). With
    ``resend``, a message without AA is sent again until it gets one (until
    ``give_up_s``), as interface engines do; otherwise each is sent once.
    """

    def __init__(
        self,
        port: int,
        *,
        connections: int = 8,
        timeout_s: float = 10.0,
        resend: bool = True,
        give_up_s: float = 180.0,
    ) -> None:
        self.port = port
        self.connections = connections
        self.timeout_s = timeout_s
        self.resend = resend
        self.give_up_s = give_up_s
        self.answers: list[Answer] = []
        self.order: dict[str, list[Outgoing]] = {}  # per patient, in sending order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- sending -------------------------------------------------------------------------

    def start(self, histories: Sequence[list[Outgoing]]) -> MllpTraffic:
        """Send in the background; patients are spread over the connections."""
        for history in histories:
            self.order.setdefault(history[0].patient, []).extend(history)
        for lane in range(self.connections):
            mine = histories[lane :: self.connections]
            thread = threading.Thread(target=self._lane, args=(mine,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def send(self, histories: Sequence[list[Outgoing]]) -> MllpTraffic:
        self.start(histories)
        return self.join()

    def join(self, timeout_s: float = 600.0) -> MllpTraffic:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in self._threads if t.is_alive()]
        assert not stuck, f"{len(stuck)} MLLP senders still busy after {timeout_s:g}s"
        return self

    def stop(self) -> None:
        """Stop sending (a failed test must not leave senders behind)."""
        self._stop.set()

    def _lane(self, histories: list[list[Outgoing]]) -> None:
        """Round-robin over this lane's patients: a patient's next message comes much later."""
        client = MllpClient("127.0.0.1", self.port, timeout_s=self.timeout_s)
        try:
            rounds = max((len(h) for h in histories), default=0)
            for k in range(rounds):
                for history in histories:
                    if k < len(history) and not self._stop.is_set():
                        self._deliver(client, history[k])
        finally:
            client.close()

    def _deliver(self, client: MllpClient, message: Outgoing) -> None:
        deadline = time.monotonic() + self.give_up_s
        while True:
            started = time.monotonic()
            try:
                ack = client.send(message.payload)
                code = ack.code if ack.control_id == message.control_id else "none"
            except (OSError, EhrbridgeError):  # refused, reset, no ACK in time
                code = "none"
                client.close()
            with self._lock:
                self.answers.append(Answer(message.control_id, code, started, time.monotonic()))
            if code == "AA" or not self.resend or time.monotonic() > deadline:
                return
            if self._stop.wait(0.2):
                return

    # -- what happened -------------------------------------------------------------------

    def accepted_ids(self) -> set[str]:
        with self._lock:
            return {a.control_id for a in self.answers if a.code == "AA"}

    def answers_between(self, since: float, until: float) -> list[Answer]:
        """Answers to sends that started at or after ``since`` and ended by ``until``."""
        with self._lock:
            return [a for a in self.answers if a.started >= since and a.finished <= until]

    def accepted_count(self) -> int:
        return len(self.accepted_ids())

    def accepted_in_order(self) -> list[Outgoing]:
        """The AA'd messages, each patient's in sending order (what the EHR considers sent)."""
        aa = self.accepted_ids()
        return [m for history in self.order.values() for m in history if m.control_id in aa]

    def all_sent(self) -> list[Outgoing]:
        return [m for history in self.order.values() for m in history]

    def summary(self) -> str:
        with self._lock:
            codes = Counter(a.code for a in self.answers)
        return (
            f"{len(self.all_sent())} messages, answers {dict(codes)}, AA'd {self.accepted_count()}"
        )


# ------------------------------------------------------------------- the EHR --


def observation_total(fhir_base: str) -> int:
    with httpx.Client(timeout=30) as client:
        return fhir_total(client, fhir_base)


def all_observations(fhir_base: str) -> list[dict[str, Any]]:
    """Every current Observation of the stand-in, following the searchset's next links."""
    return list(observations(fhir_base))


def model_info(config: SiteConfig, probe: FeatureRecord) -> ModelInfo:
    """The model name and version the pipeline sees: one call with the product's client."""
    client = InferenceClient(config.model)
    try:
        result = client.infer([probe], "fault-test-probe")
    finally:
        client.close()
    return ModelInfo(result.model_name, result.model_version, config.model.calibration)


def expected_observations(
    config: SiteConfig, messages: Iterable[Outgoing]
) -> dict[str, FeatureRecord]:
    """Prediction identifier -> the feature record its current Observation must show.

    The product's own steps (``pipelines/process.py``): extract facts, merge
    them into the patient's state, decide the trigger and episode, assemble
    the features; the last record of an episode is the current one.
    """
    rules = FactRules(config.mapping)
    states: dict[str, PatientState] = {}
    by_episode: dict[tuple[str, str], FeatureRecord] = {}
    for message in messages:
        for patient in extract(Message.parse(message.payload), rules).patients:
            state = states.setdefault(patient.patient_id, PatientState(patient.patient_id))
            result = evaluate(state, patient, config.mapping)
            if isinstance(result, FeatureRecord):
                by_episode[(patient.patient_id, result.episode)] = result
    if not by_episode:
        return {}
    model = model_info(config, next(iter(by_episode.values())))
    return {
        prediction_identifier(config.site, model, patient_id, features): features
        for (patient_id, _), features in by_episode.items()
    }


def ehr_problems(
    config: SiteConfig,
    observations: list[dict[str, Any]],
    expected: dict[str, FeatureRecord],
    may_also_hold: dict[str, FeatureRecord] | None = None,
) -> list[str]:
    """What is wrong with the EHR's Observations, compared with ``expected`` (empty: nothing).

    ``may_also_hold``: Observations that may exist but need not (from
    messages that were sent but never acknowledged: stored or not, the sender
    cannot know).
    """
    system = config.prediction_identifier_system
    ids = [
        i["value"] for o in observations for i in o.get("identifier", []) if i["system"] == system
    ]
    problems = []
    duplicated = {i: n for i, n in Counter(ids).items() if n > 1}
    if duplicated:
        problems.append(f"{len(duplicated)} identifiers on more than one Observation: "
                        f"{list(duplicated.items())[:5]}")  # fmt: skip
    if len(ids) != len(observations):
        problems.append(f"{len(observations) - len(ids)} Observations without a {system} id")
    allowed = {**(may_also_hold or {}), **expected}
    lost = expected.keys() - set(ids)
    unexpected = set(ids) - allowed.keys()
    if lost:
        problems.append(f"{len(lost)} of {len(expected)} expected Observations missing")
    if unexpected:
        problems.append(f"{len(unexpected)} Observations nobody asked for")
    wrong = [
        o["identifier"][0]["value"]
        for o in observations
        if o["identifier"][0]["value"] in allowed
        and not shows(o, allowed[o["identifier"][0]["value"]])
    ]
    if wrong:
        first = next(o for o in observations if o["identifier"][0]["value"] == wrong[0])
        want = allowed[wrong[0]]
        problems.append(
            f"{len(wrong)} Observations show other inputs than expected, e.g. {wrong[0]}: "
            f"{first['effectiveDateTime']} {sorted(derived_from(first))}, expected "
            f"{want.anchor.isoformat()} {sorted(f.ref for f in want.inputs)}"
        )
    return problems


def shows(observation: dict[str, Any], features: FeatureRecord) -> bool:
    """The Observation is the one for these features: same anchor time, same input results."""
    effective = datetime.fromisoformat(observation["effectiveDateTime"])
    refs = sorted(derived_from(observation))
    return effective == features.anchor and refs == sorted(f.ref for f in features.inputs)


def derived_from(observation: dict[str, Any]) -> list[str]:
    """The input results' identifiers (``<MSH-10>/OBX/<n>``)."""
    return [d["identifier"]["value"] for d in observation.get("derivedFrom", [])]


def risk_view(observations: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """A site-independent view of what clinicians see (identifiers include the site name)."""
    return {
        (o["subject"]["identifier"]["value"], o["effectiveDateTime"]): (
            tuple(c["valueQuantity"]["value"] for c in o["component"]),
            o["interpretation"][0]["coding"][0]["code"],
            tuple(sorted(derived_from(o))),
        )
        for o in observations
    }


@contextlib.contextmanager
def failure_context(describe: Callable[[], str]) -> Iterator[None]:
    """Re-raise an AssertionError with the diagnostics appended."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe()}") from error


# -------------------------------------------------------------------- broker --


@dataclass
class OwnBroker:
    """A broker of this test's own (scripts/kafka with its own data dir and port).

    Never the shared one: other tests and people use that broker.
    """

    data: Path
    port: int = field(default_factory=free_port)  # below the ephemeral range

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def script(self, command: str, timeout_s: float = 300.0) -> str:
        env = {
            **os.environ,
            "EHRBRIDGE_KAFKA_DATA": str(self.data),
            "EHRBRIDGE_KAFKA_PORT": str(self.port),
            "EHRBRIDGE_KAFKA_HEAP_OPTS": "-Xmx384m -Xms128m",
        }
        env.pop("KAFKA_BOOTSTRAP", None)
        done = subprocess.run(
            [str(KAFKA_SCRIPT), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, f"scripts/kafka {command}: {done.stderr[-3000:]}"
        return done.stdout.strip()

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        address = self.script("start").splitlines()[-1]
        assert address == self.bootstrap, (address, self.bootstrap)

    def stop(self) -> None:
        self.script("stop")

    def log_tail(self, lines: int = 30) -> str:
        log = self.data / "logs" / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return f"--- broker {self.bootstrap} ({log}) ---\n" + "\n".join(text.splitlines()[-lines:])
