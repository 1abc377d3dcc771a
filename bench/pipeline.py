"""A running ehrbridge site (or the naive baseline) under MLLP load, measured end to end.

:class:`SiteUnderTest` starts the model server, the FHIR stand-in and the
site -- all roles in one ``ehrbridge run`` process on the embedded
transport; on Kafka, ingest, N processing workers and write-back as
processes of their own, as a site scales out -- warms it up, then runs
trials: MLLP senders at a rate for some seconds.

How event→Observation latency is measured: each sender notes the wall-clock
time just before it writes a message to the socket; the FHIR stand-in stamps
each Observation version with ``meta.lastUpdated`` (wall clock, µs) when the
write-back transaction commits. Every Observation names its input results in
``derivedFrom`` as ``<MSH-10>/OBX/<n>``, so each Observation is matched to the
message that produced it; latency = ``lastUpdated`` − send time. Both clocks
are the same host clock. Nothing polls during the trial except one
``Observation?_count=0`` (a count) every 0.2 s to see when all have arrived;
the Observations themselves are read once, after the trial.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from ehrbridge.bench.common import CpuMeter, free_port, latency_summary
from ehrbridge.bench.load import Sent, run_senders
from ehrbridge.bench.services import Services, delete_topics, kafka_bootstrap
from ehrbridge.config import ModelEndpoint


def _progress(result: dict[str, Any]) -> None:
    """One line per trial on stderr, so a long run shows where it is."""
    e2e = result.get("e2e_latency", {})
    print(
        f"  trial: offered {result['offered_rate'] or 'max'}/s, accepted {result['accepted']}, "
        f"ACK p99 {result['ack_latency']['p99_ms']} ms, delivered/s "
        f"{result.get('delivered_rate', '-')}, e2e p99 {e2e.get('p99_ms', '-')} ms",
        file=sys.stderr,
        flush=True,
    )


def fhir_total(client: httpx.Client, fhir_base: str) -> int:
    """How many Observations the server holds, asked for explicitly.

    Searchset pages need not carry ``Bundle.total``: HAPI leaves it out unless
    ``_total=accurate`` is sent, and ``_summary=count`` asks for the count alone.
    """
    params: dict[str, str | int] = {"_summary": "count", "_total": "accurate", "_count": 0}
    response = client.get(f"{fhir_base}/Observation", params=params)
    if response.status_code != 200:
        return 0  # down (a fault test's outage): nothing counted yet; pollers ask again
    total = response.json().get("total")
    if not isinstance(total, int):
        raise RuntimeError(f"{fhir_base} answered an Observation count without Bundle.total")
    return total


def observations(fhir_base: str) -> Iterator[dict[str, Any]]:
    """Every Observation in the FHIR stand-in, following the searchset's next links."""
    url: str | None = f"{fhir_base}/Observation"
    params: dict[str, Any] | None = {"_count": 1000}
    with httpx.Client(timeout=60) as client:
        while url:
            bundle = client.get(url, params=params).json()
            params = None
            for entry in bundle.get("entry", []):
                yield entry["resource"]
            url = next((x["url"] for x in bundle.get("link", []) if x["relation"] == "next"), None)


def _instant(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class ModelLatency:
    """A slower model endpoint: each call answered after ``request_ms + rows x row_ms``.

    The sandbox model server waits with ``asyncio.sleep``, so it serves other
    callers meanwhile: the model call, not the model server's CPU, is the limit.
    """

    request_ms: float = 0.0
    row_ms: float = 0.0

    def server_args(self) -> list[str]:
        return ["--latency-ms", str(self.request_ms), "--row-latency-ms", str(self.row_ms)]

    def site_updates(self) -> dict[str, Any]:
        """The site's model timeout, raised so a slow but healthy call never times out."""
        batch = ModelEndpoint.model_fields["batch_size"].default  # sandbox/site.yaml's
        slowest_s = (self.request_ms + batch * self.row_ms) / 1000
        return {"model": {"timeout_s": max(2.0, 3 * slowest_s + 1)}} if slowest_s else {}


@dataclass
class Delivered:
    """The Observations one trial's messages produced."""

    latencies: list[float] = field(default_factory=list)  # event→Observation, seconds
    last: float = 0.0  # when the last one was stored (epoch seconds)
    subjects: set[str] = field(default_factory=set)  # the patients they are about


def _subject(resource: dict[str, Any]) -> str:
    """Observation.subject as a key: a literal reference, else its logical identifier."""
    subject = resource.get("subject", {})
    identifier = subject.get("identifier", {})
    return str(subject.get("reference") or f"{identifier.get('system')}|{identifier.get('value')}")


def match_latencies(fhir_base: str, sent: Sent) -> Delivered:
    """Latency of each Observation produced by a message of ``sent``; last arrival time."""
    sent_at = dict(zip(sent.control_ids, sent.sent_at, strict=True))
    found = Delivered()
    for resource in observations(fhir_base):
        refs = [d.get("identifier", {}).get("value", "") for d in resource.get("derivedFrom", [])]
        times = [sent_at[c] for c in (r.split("/OBX/")[0] for r in refs) if c in sent_at]
        if not times:
            continue  # warm-up or an earlier trial
        stored = _instant(resource["meta"]["lastUpdated"])
        found.latencies.append(stored - max(times))
        found.last = max(found.last, stored)
        found.subjects.add(_subject(resource))
    return found


def wait_delivered(fhir_base: str, target: int, stall_s: float = 30.0) -> int:
    """Poll the Observation count until ``target`` or no progress for ``stall_s``."""
    with httpx.Client(timeout=30) as client:
        seen, progress_at = -1, time.monotonic()
        while True:
            total = fhir_total(client, fhir_base)
            if total >= target:
                return total
            if total != seen:
                seen, progress_at = total, time.monotonic()
            elif time.monotonic() - progress_at > stall_s:
                return total
            time.sleep(0.2)


class SiteUnderTest:
    """Model server + FHIR stand-in + a site (ehrbridge, or the naive pipeline)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        transport: str = "embedded",
        workers: int = 1,
        naive: str | None = None,  # "ingest" | "e2e": the naive pipeline instead
        roles: tuple[str, ...] = (),  # embedded: run only these roles (ingest scenario)
        split: bool = False,  # embedded: each role a process of its own, sharing the files
        model_latency: ModelLatency | None = None,  # a slower model endpoint
    ) -> None:
        self.services = Services(run_dir)
        self.transport = transport
        self.workers = workers
        self.naive = naive
        self.roles = roles
        self.split = split
        self.model_latency = model_latency or ModelLatency()
        self.bootstrap = kafka_bootstrap() if transport == "kafka" else ""
        self.trials = 0
        self.mllp_port = 0
        self.subjects_seen: set[str] = set()  # patients of the measured trials so far

    def start(self) -> SiteUnderTest:
        svc = self.services
        svc.start_servers("model", "fhir", args={"model": self.model_latency.server_args()})
        if self.naive:
            self._start_naive(self.naive)
            return self
        kafka = (
            {"kind": "kafka", "bootstrap": self.bootstrap} if self.transport == "kafka" else None
        )
        config = svc.write_site_config(transport=kafka, updates=self.model_latency.site_updates())
        if self.transport == "kafka" or self.split:
            # As a site scales out: each role its own process, N processing workers
            # (embedded: one processing worker, as one consumer group member reads a topic).
            roles = self.roles or ("ingest", "process", "writeback")
            if "ingest" in roles:
                svc.spawn_site(config, "ingest", ["ingest"])
            workers = self.workers if self.transport == "kafka" else 1
            for n in range(workers if "process" in roles else 0):
                svc.spawn_site(config, f"process-{n + 1}", ["process"])
            if "writeback" in roles:
                svc.spawn_site(config, "writeback", ["writeback"])
            if "ingest" in roles:
                svc.wait_ingest("ingest")
        else:
            svc.start_site(config, "site", self.roles)
        self.mllp_port = svc.ports["mllp"]
        return self

    def _start_naive(self, mode: str) -> None:
        port = free_port()
        self.services._spawn(  # the naive pipeline is a process like the site
            "naive",
            [
                "-m",
                "ehrbridge.bench.naive",
                mode,
                "--port",
                str(port),
                "--data",
                str(self.services.run_dir / "naive"),
                "--model",
                self.services.model_url,
                "--fhir",
                self.services.fhir_base,
            ],
        )
        self.services.wait_listening("naive", port)
        self.mllp_port = port

    @property
    def delivers(self) -> bool:
        """Observations are expected (not the ingest-only runs)."""
        return self.naive != "ingest" and (not self.roles or "writeback" in self.roles)

    def warm_up(self, messages: int = 100, seconds: float = 5.0) -> None:
        """A few messages through everything (imports, connections, Kafka group joins)."""
        sent = self._send(senders=1, rate=messages / seconds, seconds=seconds, prefix="warm")
        if self.delivers:
            total = wait_delivered(self.services.fhir_base, sent.accepted, stall_s=90)
            if total < sent.accepted:
                raise TimeoutError("warm-up messages never all reached the FHIR stand-in")

    def _observations(self) -> int:
        with httpx.Client(timeout=30) as client:
            return fhir_total(client, self.services.fhir_base)

    def _send(
        self, *, senders: int, rate: float, seconds: float, prefix: str, cap: int = 20000
    ) -> Sent:
        self.trials += 1
        results = run_senders(
            self.mllp_port,
            senders=senders,
            rate=rate,
            seconds=seconds,
            prefix=f"{prefix}{self.trials}",
            # A fresh population per trial, from the same first day: every trial starts with
            # no per-patient state and the same patients, so a rate passes or fails on its
            # own and not by its place in the order (earlier trials' state would weigh on it).
            population=self.trials,
            closed_loop_cap=cap,
        )
        self.services.check_alive()
        return Sent.merge(results)

    def trial(
        self, *, rate: float, seconds: float, senders: int, cap: int = 20000
    ) -> dict[str, Any]:
        """Send at ``rate`` (0: closed loop) for ``seconds``; measure ACKs, delivery, CPU."""
        before = self._observations() if self.delivers else 0
        model_before = self._model_stats()
        pids = self.services.pids(broker=self.transport == "kafka")
        meter = CpuMeter(pids)
        meter.start()
        sent = self._send(senders=senders, rate=rate, seconds=seconds, prefix="m", cap=cap)
        result: dict[str, Any] = {
            "offered_rate": rate or None,
            "senders": senders,
            "seconds": seconds,
            "sent": sent.count,
            "accepted": sent.accepted,
            "not_accepted": sent.count - sent.accepted,
            "send_rate": round(sent.count / seconds, 1),
            "accepted_rate": round(sent.accepted / sent.span_s(), 1) if sent.span_s() else 0.0,
            "ack_latency": latency_summary(sent.ack_s),
        }
        if self.delivers:
            total = wait_delivered(self.services.fhir_base, before + sent.accepted)
            meter.stop()
            found = match_latencies(self.services.fhir_base, sent)
            span = found.last - min(sent.sent_at) if found.latencies else 0.0
            result.update(
                observations=len(found.latencies),
                missing=sent.accepted - (total - before),
                delivered_rate=round(len(found.latencies) / span, 1) if span else 0.0,
                e2e_latency=latency_summary(found.latencies),
                # The yardstick's own check: a trial's patients are new to the site.
                patients=len(found.subjects),
                patients_in_earlier_trials=len(found.subjects & self.subjects_seen),
            )
            self.subjects_seen |= found.subjects
        else:
            meter.stop()
        result["cpu"] = meter.report(sent.accepted, {"senders": sent.cpu_s})
        result["model_calls"] = _model_calls(model_before, self._model_stats())
        _progress(result)
        return result

    def _model_stats(self) -> dict[str, int]:
        """The model server's infer counters (``/_admin/stats``)."""
        return dict(httpx.get(f"{self.services.model_url}/_admin/stats", timeout=30).json())

    def close(self) -> None:
        self.services.close()
        if self.transport == "kafka":
            delete_topics(self.bootstrap, self.services.site)


def _model_calls(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Infer calls answered in a trial and their mean rows: how the workers batch."""
    calls = after["infer_ok"] - before["infer_ok"]
    rows = after["rows_served"] - before["rows_served"]
    return {"calls": calls, "rows": rows, "rows_per_call": round(rows / calls, 1) if calls else 0}


@contextmanager
def site_under_test(run_dir: Path, **kwargs: Any) -> Iterator[SiteUnderTest]:
    site = SiteUnderTest(run_dir, **kwargs)
    try:
        yield site.start()
    finally:
        site.close()
