"""The load generator: MLLP senders, each a process of its own.

Every sender process holds persistent MLLP connections (as an interface
engine does; one thread each, enough of them for the rate) and sends renal
ORU^R01 messages from the synthetic EHR on an open-loop schedule: message
*i* is due at ``start + i / rate``; a connection that falls behind sends at
once and never skips, and stops at the deadline. With ``rate == 0`` it is
closed-loop: the next message goes as soon as the ACK of the last one is in.

Messages are built before the clock starts. Each is a complete renal panel
plus urine albumin/creatinine ratio for one patient on a day of its own, so
each message triggers exactly one prediction and one Observation (the
prediction episode is the result day). Senders share one synthetic patient
population (same seed) and split it, so a patient's messages come from one
sender, in order. ``population`` renames that population's patients (PID-3
MRN): the same people on the same trajectories under identifiers no other
population uses, so every trial can start with no per-patient state at the
site and the same workload as the trial before it.

Each sender reports, per message: MSH-10, the wall-clock send time (for
event→Observation latency, measured against the FHIR stand-in's
``meta.lastUpdated``, same host clock), the ACK latency and the ACK code;
and its own CPU seconds.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr, SyntheticPatient

FIRST_DAY = datetime(2024, 1, 1, 8, 0, tzinfo=UTC)
IN_DOMAIN_EGFR = 50.0  # true eGFR below which every measured one is below 60


@dataclass(frozen=True, slots=True)
class SenderSpec:
    index: int
    senders: int  # how many share the population
    port: int
    rate: float  # this sender's messages/s; 0 = closed loop
    seconds: float
    messages: int  # built in advance
    prefix: str  # MSH-10 prefix, unique per run
    patients: int = 2000
    seed: int = 42
    first_day: int = 0  # day offset: warm-up and measured runs use separate days
    connections: int = 1  # MLLP connections (threads) in this process
    population: int = 0  # 0: the seed's own MRNs; N: the same patients, MRNs of their own


@dataclass
class SenderResult:
    control_ids: list[str]
    sent_at: list[float]  # wall clock, seconds since the epoch
    ack_s: list[float]
    codes: list[str]
    cpu_s: float
    peak_rss_mb: float


def build_messages(spec: SenderSpec) -> list[tuple[str, bytes]]:
    """This sender's messages: its patients in turn, one new day per round."""
    ehr = SyntheticEhr(seed=spec.seed, patients=spec.patients)
    # Sex U patients get no eGFR and no CKD-EPI: no prediction, so they are left out; so
    # are those outside KFRE's domain (eGFR < 60, pipelines/domain.py) on the first day.
    # True eGFR only falls, and 50 leaves room for the measurement noise.
    first = FIRST_DAY + timedelta(days=spec.first_day)
    usable = [p for p in ehr.patients if p.sex != "U" and p.true_egfr(first) < IN_DOMAIN_EGFR]
    mine = [fresh_identity(p, spec.population) for p in usable[spec.index :: spec.senders]]
    messages = []
    for n in range(spec.messages):
        patient = mine[n % len(mine)]
        day = spec.first_day + n // len(mine)
        at = FIRST_DAY + timedelta(days=day, minutes=(n % len(mine)) % 600)
        control_id = f"{spec.prefix}-{spec.index}-{n}"
        messages.append((control_id, ehr.oru(patient, at, panel="both", control_id=control_id)))
    return messages


def fresh_identity(patient: SyntheticPatient, population: int) -> SyntheticPatient:
    """The same patient under an MRN of population ``population`` (0: unchanged).

    The site keys patient state on PID-3's MR identifier (sandbox/site.yaml), so a
    new MRN is a new patient there. A prefix keeps the MRN's last digits, which the
    synthetic address is built from, so messages keep their shape and size.
    """
    if population == 0:
        return patient
    return replace(patient, mrn=f"P{population}{patient.mrn}")


def _sender_main(spec: SenderSpec, conn: Connection) -> None:
    messages = build_messages(spec)
    patients = min(len(messages), spec.patients)
    # One thread per connection; a patient's messages always go down the same one.
    lanes: list[list[tuple[int, str, bytes]]] = [[] for _ in range(spec.connections)]
    for n, (control_id, message) in enumerate(messages):
        lanes[(n % patients) % spec.connections].append((n, control_id, message))
    clients = [MllpClient("127.0.0.1", spec.port, timeout_s=60) for _ in lanes]
    for client in clients:
        client.connect()
    cpu0 = time.process_time()
    conn.send("ready")
    start: float = conn.recv()
    results = [SenderResult([], [], [], [], 0.0, 0.0) for _ in lanes]
    threads = [
        threading.Thread(target=_lane, args=(spec, start, lane, client, result))
        for lane, client, result in zip(lanes, clients, results, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = SenderResult([], [], [], [], 0.0, 0.0)
    for r in results:
        merged.control_ids += r.control_ids
        merged.sent_at += r.sent_at
        merged.ack_s += r.ack_s
        merged.codes += r.codes
    merged.cpu_s = time.process_time() - cpu0
    merged.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    conn.send(merged)
    conn.close()


def _lane(
    spec: SenderSpec,
    start: float,
    lane: list[tuple[int, str, bytes]],
    client: MllpClient,
    result: SenderResult,
) -> None:
    """One connection: its messages at their scheduled times, each waiting for its ACK."""
    interval = 1.0 / spec.rate if spec.rate > 0 else 0.0
    deadline = start + spec.seconds
    _sleep_until(start)
    for n, control_id, message in lane:
        if time.time() >= deadline:
            break
        if interval:
            _sleep_until(start + n * interval)
        sent = time.time()
        t0 = time.perf_counter()
        ack = client.send(message)
        result.ack_s.append(time.perf_counter() - t0)
        result.control_ids.append(control_id)
        result.sent_at.append(sent)
        result.codes.append(ack.code)
    client.close()


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def messages_needed(rate: float, seconds: float, closed_loop_cap: int) -> int:
    return math.ceil(rate * seconds) + 1 if rate > 0 else closed_loop_cap


def run_senders(
    port: int,
    *,
    senders: int,
    rate: float,
    seconds: float,
    prefix: str,
    first_day: int = 0,
    closed_loop_cap: int = 20000,
    patients: int = 2000,
    connections: int = 0,
    population: int = 0,
) -> list[SenderResult]:
    """Start the sender processes, start them together, wait for their results.

    MLLP has one message in flight per connection, so an open-loop rate needs
    enough connections to cover rate x ACK latency: by default one per 10
    messages/s (100 ms each), at least one per process.
    """
    ctx = mp.get_context("spawn")
    per_sender = rate / senders if rate > 0 else 0.0
    connections = connections or max(1, math.ceil(per_sender / 10))
    specs = [
        SenderSpec(
            index=i,
            senders=senders,
            port=port,
            rate=per_sender,
            seconds=seconds,
            messages=messages_needed(per_sender, seconds, closed_loop_cap),
            prefix=prefix,
            patients=patients,
            first_day=first_day,
            connections=connections,
            population=population,
        )
        for i in range(senders)
    ]
    pipes: list[Connection] = []
    procs = []
    for spec in specs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_sender_main, args=(spec, child), daemon=True)
        proc.start()
        procs.append(proc)
        pipes.append(parent)
    for pipe in pipes:
        if pipe.recv() != "ready":
            raise RuntimeError("sender failed to start")
    start = time.time() + 0.5
    for pipe in pipes:
        pipe.send(start)
    results: list[SenderResult] = [pipe.recv() for pipe in pipes]
    for proc in procs:
        proc.join(30)
    return results


@dataclass
class Sent:
    """All senders' results together."""

    control_ids: list[str]
    sent_at: list[float]
    ack_s: list[float]
    codes: list[str]
    cpu_s: float
    peak_rss_mb: float

    @classmethod
    def merge(cls, results: list[SenderResult]) -> Sent:
        merged = cls([], [], [], [], 0.0, 0.0)
        for r in results:
            merged.control_ids += r.control_ids
            merged.sent_at += r.sent_at
            merged.ack_s += r.ack_s
            merged.codes += r.codes
            merged.cpu_s += r.cpu_s
            merged.peak_rss_mb = max(merged.peak_rss_mb, r.peak_rss_mb)
        return merged

    @property
    def count(self) -> int:
        return len(self.control_ids)

    @property
    def accepted(self) -> int:
        return self.codes.count("AA") + self.codes.count("CA")

    def span_s(self) -> float:
        """First send to last ACK."""
        if not self.sent_at:
            return 0.0
        ends = [s + a for s, a in zip(self.sent_at, self.ack_s, strict=True)]
        return max(ends) - min(self.sent_at)
