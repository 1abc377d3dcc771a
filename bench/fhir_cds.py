"""Benchmark: FHIR ingest of whole Synthea patients, and CDS Hooks latency.

    .venv/bin/python bench/fhir_cds.py [--rounds 5] [--cds-calls 2000]

Starts the sandbox (no synthetic traffic) on free ports and measures, on
real sockets:

* ``POST /fhir`` of each Synthea CKD patient Bundle (0.3-2 MB, 73-676
  entries): the time to the transaction-response, i.e. checked, fact
  extraction run, durably stored (fsync); and the checks alone, in process;
* the time from the POST to the patient's whole risk history delivered to
  the FHIR stand-in and the HL7v2 inbox;
* ``POST /cds-services/kfre-patient-view`` for a scored patient, one client
  with keep-alive, sequential: p50, p95, p99, max.

Prints a table and writes it to ``bench/results/fhir_cds.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from ehrbridge.pipelines.facts import FactRules
from ehrbridge.pipelines.fhir_ingest import Checker
from ehrbridge.sandbox.run import BackgroundSandbox

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "fhir" / "synthea-ckd"
RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def bench_ingest(sandbox: BackgroundSandbox, rounds: int) -> list[dict[str, Any]]:
    api = sandbox.sandbox.fhir_site_url
    runtime = sandbox.sandbox.fhir_runtime
    assert runtime is not None
    checker = Checker(FactRules(runtime.config.mapping))
    rows = []
    posted = 0
    with httpx.Client(timeout=60) as client:
        for path in sorted(SYNTHEA.glob("*.json")):
            raw = path.read_bytes()
            entries = len(orjson.loads(raw)["entry"])
            mrn = path.stem.split("_")[-1]
            started = time.perf_counter()
            posts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                response = client.post(
                    f"{api}/fhir", content=raw, headers={"content-type": "application/fhir+json"}
                )
                posts.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text[:200]
            posted += rounds
            history = _wait_delivered(
                client, api, mrn, lambda n=posted: runtime.workers[0].processed >= n
            )
            done = time.perf_counter() - started
            checks = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                checker.check_payload(raw)
                checks.append(time.perf_counter() - t0)
            rows.append(
                {
                    "bundle": path.name[:24],
                    "bytes": len(raw),
                    "entries": entries,
                    "post_median_ms": ms(statistics.median(posts)),
                    "post_max_ms": ms(max(posts)),
                    "checks_median_ms": ms(statistics.median(checks)),
                    "results": history,
                    "all_delivered_s": round(done, 2),
                }
            )
    return rows


def _wait_delivered(client: httpx.Client, api: str, mrn: str, processed: Callable[[], bool]) -> int:
    """How many results the patient has, once all are delivered (0: not enough data)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = client.get(f"{api}/api/results", params={"patient": mrn, "limit": 1000}).json()
        results = found["results"]
        if processed() and all(r["status"] == "delivered" for r in results):
            return len(results)
        time.sleep(0.02)
    raise TimeoutError(f"results for {mrn} not delivered")


def bench_cds(sandbox: BackgroundSandbox, calls: int) -> dict[str, Any]:
    api = sandbox.sandbox.fhir_site_url
    body = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {
            "userId": "Practitioner/1",
            "patientId": "ecaea95c-46de-4ac9-a58d-4847d1a3e574",
        },
    }
    latencies = []
    with httpx.Client(timeout=10) as client:
        for _ in range(50):  # warm up
            client.post(f"{api}/cds-services/kfre-patient-view", json=body)
        for _ in range(calls):
            t0 = time.perf_counter()
            response = client.post(f"{api}/cds-services/kfre-patient-view", json=body)
            latencies.append(time.perf_counter() - t0)
            assert response.status_code == 200 and response.json()["cards"]
    return {
        "calls": calls,
        "p50_ms": ms(percentile(latencies, 0.50)),
        "p95_ms": ms(percentile(latencies, 0.95)),
        "p99_ms": ms(percentile(latencies, 0.99)),
        "max_ms": ms(max(latencies)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cds-calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, BackgroundSandbox(Path(tmp)) as sandbox:
        ingest = bench_ingest(sandbox, args.rounds)
        cds = bench_cds(sandbox, args.cds_calls)
    for row in ingest:
        print(row)
    print("cds-hooks", cds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fhir_cds.json").write_bytes(
        orjson.dumps({"ingest": ingest, "cds_hooks": cds}, option=orjson.OPT_INDENT_2)
    )


if __name__ == "__main__":
    main()
