"""bench/sample_share.py reads py-spy's collapsed stacks as py-spy writes them."""

from __future__ import annotations

from ehrbridge.bench.sample_share import shares

SITE = 'process 11:"python -m ehrbridge.cli run --config site.yaml"'
SENDER = 'process 12:"python -B -c from multiprocessing.spawn import spawn_main'  # cut at ';'
LINES = [
    f"{SITE};run (ehrbridge/runtime.py:10);process (pipelines/process.py:40) 90",
    f"{SITE};run (ehrbridge/runtime.py:10);features (adapters/prometheus_metrics.py:183) 6",
    f"{SITE};run (ehrbridge/runtime.py:10);add (pipelines/drift.py:77) 3",
    f"{SITE};inc (prometheus_client/metrics.py:300) 1",
    # An import of the monitoring module is start-up, not a per-message cost.
    f"{SITE};_find_and_load (<frozen importlib._bootstrap>:1);<module> "
    "(ehrbridge/monitoring.py:1) 50",
    f'{SENDER}; spawn_main(tracker_fd=5)";send (bench/load.py:9) 40',
]


def test_monitoring_samples_are_counted_per_process_without_imports() -> None:
    total, monitoring = shares(LINES)
    site, sender = SITE.split('"')[1], SENDER.split('"')[1]
    assert total == {site: 150, sender: 40}
    assert monitoring == {site: 10}
