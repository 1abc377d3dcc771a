"""``ehrbridge bench SCENARIO``: run a benchmark scenario, print its table, write its JSON.

    ehrbridge bench ingest|e2e|stages|scale|cds|fhir-bundle|backfill|all
        [--rate R] [--seconds S] [--json FILE] [--transport embedded|kafka] [--split]
        [--senders N] [--max] [--smoke] [--no-baselines | --no-naive | --no-floor]
        [--model-latency-ms MS] [--model-row-latency-ms MS]   # e2e, scale: a slow model
    ehrbridge bench stages --check [--smoke] [--baseline FILE]   # exit 1 on a CPU regression
    ehrbridge bench stages --write-baseline [--smoke]            # after an intended change

``--smoke`` runs each scenario for a couple of seconds at a low rate (CI);
the JSON goes to ``--json`` or ``bench/results/<scenario>-<time>.json``.
Every scenario runs its baselines beside it (the naive pipeline, and Kafka
produce + consume of the same bytes from ``scripts/kafka``'s broker) unless
``--no-baselines``. ``--check`` compares the stages scenario's CPU µs per
message with ``bench/baseline.json`` (``bench/regression.py`` says how it
stays steady on a loaded machine).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ehrbridge.bench.common import table, write_json

SCENARIO_NAMES = ["ingest", "e2e", "stages", "scale", "cds", "fhir-bundle", "backfill", "search"]


def add_bench_command(sub: Any) -> None:
    """Register ``bench`` on the ``ehrbridge`` command's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, per-stage cost")
    bench.add_argument(
        "scenario", help=f"{', '.join(SCENARIO_NAMES)}, a comma-separated list, or all"
    )
    bench.add_argument("--rate", type=float, default=None, help="messages/s offered")
    bench.add_argument("--seconds", type=float, default=None, help="how long to send")
    bench.add_argument("--json", type=Path, default=None, help="write the result here")
    bench.add_argument("--transport", choices=["embedded", "kafka"], default="embedded")
    bench.add_argument(
        "--split",
        action="store_true",
        help="embedded e2e: ingest, processing and write-back as processes sharing the SQLite "
        "files (as transport.processes: per-role), not one process",
    )
    bench.add_argument(
        "--senders", type=int, default=None, help="MLLP sender processes (ingest 16, else 4)"
    )
    bench.add_argument("--concurrency", type=int, default=4, help="CDS Hooks clients")
    bench.add_argument("--workers", type=int, default=2, help="scale: workers to compare with 1")
    bench.add_argument("--max", action="store_true", help="e2e: find the highest rate, p99<=1s")
    bench.add_argument("--smoke", action="store_true", help="a few seconds each (CI)")
    bench.add_argument(
        "--no-baselines", dest="baselines", action="store_false", help="no naive, no floor"
    )
    bench.add_argument("--no-naive", dest="naive", action="store_false", help="no naive baseline")
    bench.add_argument(
        "--no-floor", dest="floor", action="store_false", help="no Kafka floor (no broker)"
    )
    bench.add_argument(
        "--check",
        action="store_true",
        help="stages: fail if a step's CPU µs/msg rises >30%% over the baseline",
    )
    bench.add_argument(
        "--write-baseline", action="store_true", help="stages: record the CPU baseline"
    )
    bench.add_argument(
        "--baseline", type=Path, default=None, help="stages: baseline file (bench/baseline.json)"
    )
    bench.add_argument(
        "--model-latency-ms",
        type=float,
        default=0.0,
        help="e2e, scale: the model server answers each call this much later",
    )
    bench.add_argument(
        "--model-row-latency-ms",
        type=float,
        default=0.0,
        help="e2e, scale: ...and this much more per row of the call",
    )
    bench.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ehrbridge.bench.pipeline import ModelLatency
    from ehrbridge.bench.scenarios import SCENARIOS, Options, machine

    # The CLI's INFO logs from kafka-python etc. would drown the tables.
    logging.getLogger().setLevel(logging.WARNING)
    names = SCENARIO_NAMES if args.scenario == "all" else args.scenario.split(",")
    unknown = set(names) - set(SCENARIO_NAMES)
    if unknown:
        print(f"error: unknown scenario(s) {sorted(unknown)}; choose from {SCENARIO_NAMES}")
        return 2
    if (args.check or args.write_baseline) and names != ["stages"]:
        print("error: --check and --write-baseline apply to the stages scenario alone")
        return 2
    if args.naive and args.baselines and not (args.check or args.write_baseline):
        from ehrbridge.bench import naive

        if not naive.can_run():
            print(f"error: {naive.MISSING_FHIR_RESOURCES}", file=sys.stderr)
            return 2
    run_dir = Path(tempfile.mkdtemp(prefix="ehrbridge-bench-"))
    results: dict[str, Any] = {"machine": machine(), "scenarios": {}}
    try:
        for name in names:
            opts = Options(
                rate=args.rate,
                seconds=args.seconds,
                senders=args.senders,
                transport=args.transport,
                split=args.split,
                smoke=args.smoke,
                max=args.max,
                concurrency=args.concurrency,
                workers=args.workers,
                baselines=args.naive and args.baselines,
                floor=args.floor and args.baselines,
                run_dir=run_dir / name,
                check=args.check,
                write_baseline=args.write_baseline,
                baseline=args.baseline,
                model_latency=ModelLatency(args.model_latency_ms, args.model_row_latency_ms),
            )
            started = time.monotonic()
            result = SCENARIOS[name](opts)
            result["wall_s"] = round(time.monotonic() - started, 1)
            headers, rows = result.pop("table")
            title = f"{name} ({args.transport if name not in ('scale',) else 'kafka'})"
            print(table(title, headers, rows), flush=True)
            if result.get("ratios"):
                shown = ", ".join(f"{k} {v}" for k, v in result["ratios"].items())
                print(f"ratios: {shown}", flush=True)
            result["table"] = {"headers": headers, "rows": rows}
            results["scenarios"][name] = result
    finally:
        if args.keep:
            print(f"run directory kept: {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    label = "-".join(names) if len(names) < len(SCENARIO_NAMES) else "all"
    label += "" if args.transport == "embedded" else f"-{args.transport}"
    path = write_json(args.json, label, results)
    print(f"\nJSON: {path}")
    return _check_status(results)


def _check_status(results: dict[str, Any]) -> int:
    """1 if ``--check`` found a regression (named on stderr), else 0."""
    regressed = [s for r in results["scenarios"].values() for s in r.get("regressed", [])]
    for step in regressed:
        print(f"CPU regression: {step}", file=sys.stderr)
    return 1 if regressed else 0
