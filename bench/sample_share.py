"""What share of a profiled run's CPU samples the monitoring code takes (issue 15's cost).

Reads py-spy's raw (collapsed) output of a whole ``ehrbridge bench e2e`` run, all
processes sampled::

    py-spy record --subprocesses --format raw -o e2e.txt -- \\
        .venv/bin/ehrbridge bench e2e --rate 200 --seconds 30 --no-baselines
    python -m ehrbridge.bench.sample_share e2e.txt

and prints, per process, its on-CPU samples and those with a metrics or drift
frame on the stack (Prometheus counters, feed clocks, drift bins, the
prometheus_client library). Imports are left out: a one-off start-up cost, not
a per-message one. A sampling profile measures the share inside one run, so it
needs no second run without metrics, whose noise on a shared machine would be
larger than the effect.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

MONITORING = re.compile(
    r"prometheus_client/|adapters/prometheus_metrics\.py|pipelines/(drift|feeds|metrics)\.py"
    r"|ehrbridge/monitoring\.py"
)
# A command line with a ';' in it (multiprocessing's children) is cut there by the format.
PROCESS = re.compile(r'process \d+:"(?P<command>[^"]*)"?')


def process_of(frames: list[str]) -> str:
    """The innermost process label of a stack (children are nested under their parent)."""
    labels = [m.group("command") for f in frames if (m := PROCESS.match(f))]
    return labels[-1] if labels else "?"


def is_monitoring(frames: list[str]) -> bool:
    if any("importlib._bootstrap" in f for f in frames):
        return False  # an import: start-up, not per message
    return any(MONITORING.search(f) for f in frames if not PROCESS.match(f))


def shares(lines: list[str]) -> tuple[Counter[str], Counter[str]]:
    """Samples per process, and those inside monitoring code."""
    total: Counter[str] = Counter()
    monitoring: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total[process_of(frames)] += int(count)
        if is_monitoring(frames):
            monitoring[process_of(frames)] += int(count)
    return total, monitoring


def main(argv: list[str]) -> int:
    total, monitoring = shares(Path(argv[0]).read_text().splitlines())
    for command, samples in total.most_common():
        share = 100 * monitoring[command] / samples
        print(f"{samples:8d} {monitoring[command]:6d} {share:6.2f}%  {command[:100]}")
    everything = sum(total.values())
    inside = sum(monitoring.values())
    print(f"{everything:8d} {inside:6d} {100 * inside / max(everything, 1):6.2f}%  all processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
