"""``ehrbridge bench search``: the console's message search over a million stored messages.

The store is the message index (``adapters/sqlite_message_index.py``), filled
through :meth:`MessageIndex.add` -- the code path that indexes the log -- with
one record per message over 30 days: MRNs from a pool of 50,000 patients,
unique control ids, 2% refused at ingest (AE/AR, five reasons) and 0.5% failed
later. Each search is what the messages page runs per request: one page of 50
rows newest first plus the total (``search`` + ``count``).

Searches, each repeated with random arguments: by control id, by MRN, by MRN
within 7 days, one hour of everything, one day's AE, one reason over 30 days,
and the unfiltered first page. The baseline is the same statements with
SQLite told ``NOT INDEXED`` (a full scan per search): what the indexes buy.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ehrbridge.adapters.sqlite_message_index import MessageIndex, Search
from ehrbridge.pipelines.transport import Record

DAY_S = 86_400.0
START = 1_780_000_000.0  # 2026-05-28, a fixed origin: runs are comparable
REASONS = ("hl7.unit.unknown", "hl7.obx.value", "hl7.pid.missing", "hl7.msh.version", "parse")
PAGE = 50


def search_bench(
    run_dir: Path, messages: int, searches: int, baseline_searches: int
) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    index = MessageIndex(run_dir / "message-index.sqlite", "bench")
    try:
        fill_s = _fill(index, messages)
        kinds = _kinds(messages)
        rng = random.Random(7)
        indexed = {name: _timed(index, make, rng, searches) for name, make in kinds.items()}
        scan = {
            name: _timed(index, make, rng, baseline_searches, unindexed=True)
            for name, make in kinds.items()
        }
    finally:
        index.close()
    every = [ms for runs in indexed.values() for ms in runs]
    every_scan = [ms for runs in scan.values() for ms in runs]
    return {
        "params": {"messages": messages, "searches_each": searches, "page": PAGE},
        "fill_s": round(fill_s, 1),
        "fill_rate": round(messages / fill_s),
        "file_mb": round((run_dir / "message-index.sqlite").stat().st_size / 1e6, 1),
        "ehrbridge": {name: _summary(runs) for name, runs in indexed.items()},
        "all": _summary(every),
        "naive": {name: _summary(runs) for name, runs in scan.items()},
        "naive_all": _summary(every_scan),
        "ratios": {"p95_scan_over_indexed": round(_pct(every_scan, 95) / _pct(every, 95), 1)},
    }


def _fill(index: MessageIndex, messages: int, batch: int = 20_000) -> float:
    rng = random.Random(1)
    started = time.perf_counter()
    for first in range(0, messages, batch):
        raw: list[Record] = []
        dlq: list[Record] = []
        for n in range(first, min(first + batch, messages)):
            record, refused = _message(n, messages, rng)
            (dlq if refused else raw).append(record)
        for topic, records in (("raw", raw), ("dlq", dlq)):
            if records:
                index.add(topic, records)
    return time.perf_counter() - started


def _message(n: int, total: int, rng: random.Random) -> tuple[Record, bool]:
    received = START + n * (30 * DAY_S / total)
    headers = {
        "source_id": f"C{n:09d}",
        "kind": "hl7v2",
        "received_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(received)),
    }
    draw = rng.random()
    if draw < 0.025:
        stage = "ingest" if draw < 0.02 else "process"
        headers |= {"error.reason": rng.choice(REASONS), "error.stage": stage}
        headers["error.class"] = "MessageUnusable" if draw < 0.015 else "MessageRejected"
    key = f"MRN{rng.randrange(50_000):06d}"
    record = Record("bench.raw", key, b"x" * 600, headers, offset=n)
    return record, "error.reason" in headers


def _kinds(messages: int) -> dict[str, Callable[[random.Random], Search]]:
    def at(rng: random.Random) -> float:
        return START + rng.random() * 29 * DAY_S

    return {
        "control id": lambda r: Search(control_id=f"C{r.randrange(messages):09d}"),
        "MRN": lambda r: Search(patient=f"MRN{r.randrange(50_000):06d}"),
        "MRN, 7 days": lambda r: _window(Search(patient=f"MRN{r.randrange(50_000):06d}"), at(r), 7),
        "1 hour, any": lambda r: _window(Search(), at(r), 1 / 24),
        "AE, 1 day": lambda r: _window(Search(outcome="AE"), at(r), 1),
        "reason, 30 days": lambda r: Search(reason=r.choice(REASONS)),
        "no filter": lambda r: Search(),
    }


def _window(query: Search, since: float, days: float) -> Search:
    from dataclasses import replace

    return replace(query, since=since, until=since + days * DAY_S)


def _timed(
    index: MessageIndex,
    make: Callable[[random.Random], Search],
    rng: random.Random,
    times: int,
    unindexed: bool = False,
) -> list[float]:
    found = []
    for _ in range(times):
        query = make(rng)
        started = time.perf_counter()
        if unindexed:
            index.search_unindexed(query, limit=PAGE)
        else:
            index.search(query, limit=PAGE)
            index.count(query)
        found.append((time.perf_counter() - started) * 1000)
    return found


def _pct(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(_pct(values, 50), 2),
        "p95_ms": round(_pct(values, 95), 2),
        "p99_ms": round(_pct(values, 99), 2),
        "max_ms": round(max(values), 2),
    }
