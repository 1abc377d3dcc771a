"""Concurrent HTTP clients, each a process of its own, closed loop with keep-alive."""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from ehrbridge.bench.common import latency_summary


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    json: Any = None
    # (sandbox credentials dir, audience): each request carries a fresh CDS Hooks JWT.
    cds_signed_by: tuple[str, str] | None = None

    def headers(self) -> dict[str, str]:
        if self.cds_signed_by is None:
            return {}
        from ehrbridge.sandbox.credentials import cds_token

        folder, audience = self.cds_signed_by
        return {"Authorization": f"Bearer {cds_token(Path(folder), audience)}"}


def _client_main(request: Request, seconds: float, conn: Connection) -> None:
    latencies: list[float] = []
    failures = 0
    with httpx.Client(timeout=30) as client:
        warm = request.headers()
        client.request(request.method, request.url, json=request.json, headers=warm)  # connect
        conn.send("ready")
        start: float = conn.recv()
        while time.time() < start:
            time.sleep(0.001)
        cpu0 = time.process_time()
        deadline = start + seconds
        while time.time() < deadline:
            headers = request.headers()  # signing is the EHR's cost, not timed
            t0 = time.perf_counter()
            response = client.request(
                request.method, request.url, json=request.json, headers=headers
            )
            latencies.append(time.perf_counter() - t0)
            failures += response.status_code != 200
    conn.send({"latencies": latencies, "failures": failures, "cpu_s": time.process_time() - cpu0})


def http_load(request: Request, *, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients for ``seconds``: requests/s and latency percentiles."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(concurrency):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client_main, args=(request, seconds, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    start = time.time() + 0.3
    for pipe in pipes:
        pipe.send(start)
    results = [pipe.recv() for pipe in pipes]
    for proc in procs:
        proc.join(30)
    latencies = [x for r in results for x in r["latencies"]]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failures": sum(r["failures"] for r in results),
        "rate": round(len(latencies) / seconds, 1),
        "latency": latency_summary(latencies),
        "client_cpu_s": round(sum(r["cpu_s"] for r in results), 3),
    }
