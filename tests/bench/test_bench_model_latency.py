"""A slower model endpoint for the benchmarks: the real model server, really slower.

``ehrbridge bench scale --model-latency-ms MS --model-row-latency-ms MS`` starts
the sandbox model server (``python -m ehrbridge.bench.serve model``) answering
each infer call after ``MS + rows x MS``, so that a second processing worker
can be measured where the model call, not the CPU, is the limit. These tests
check, on real processes and sockets, that the server waits as long as asked,
that it waits for several callers at once (not one after another: it must not
become the cap itself), and that a scale run with it delivers every message
(the site's model timeout is raised to fit). Never how fast anything was.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_bench_smoke import assert_mllp_run, run_bench

from ehrbridge.bench.pipeline import ModelLatency
from ehrbridge.bench.services import Services
from ehrbridge.sandbox.model_server import Latency


def _infer_body(rows: int) -> dict[str, Any]:
    def tensor(name: str, datatype: str, value: Any) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": [rows], "data": [value] * rows}

    return {
        "inputs": [
            tensor("age", "FP64", 65.0),
            tensor("male", "BOOL", True),
            tensor("egfr", "FP64", 19.0),
            tensor("uacr", "FP64", 30.0),
        ]
    }


def _timed_infer(url: str, rows: int) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v2/models/kfre-4var/infer", json=_infer_body(rows), timeout=30)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"][0]["data"]) == rows
    return elapsed


def test_latency_is_per_request_plus_per_row() -> None:
    latency = Latency(per_request_s=0.04, per_row_s=0.005)
    assert latency.seconds(0) == pytest.approx(0.04)
    assert latency.seconds(64) == pytest.approx(0.04 + 64 * 0.005)
    with pytest.raises(ValueError, match="negative"):
        Latency(per_row_s=-0.001)


def test_bench_model_server_answers_after_the_latency_asked(tmp_path: Path) -> None:
    with Services(tmp_path) as services:
        services.start_servers(
            "model", args={"model": ModelLatency(request_ms=200, row_ms=50).server_args()}
        )
        one_row = _timed_infer(services.model_url, 1)
        ten_rows = _timed_infer(services.model_url, 10)
    assert one_row >= 0.200 + 0.050
    assert ten_rows >= 0.200 + 10 * 0.050, "the per-row part grows with the call's rows"


def test_slow_model_server_waits_for_concurrent_callers_at_once(tmp_path: Path) -> None:
    """Four 1 s calls side by side take about 1 s, not 4: the wait does not hold the server."""
    with Services(tmp_path) as services:
        services.start_servers("model", args={"model": ModelLatency(request_ms=1000).server_args()})
        _timed_infer(services.model_url, 1)  # connections, first-request imports
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            each = list(pool.map(lambda _: _timed_infer(services.model_url, 1), range(4)))
        together = time.perf_counter() - started
    assert min(each) >= 1.0
    assert together < 3.0, f"4 calls of 1 s took {together:.1f} s: served one after another"


def test_slow_model_raises_the_site_model_timeout_to_fit_a_full_batch() -> None:
    assert ModelLatency().site_updates() == {}
    timeout = ModelLatency(request_ms=40, row_ms=40).site_updates()["model"]["timeout_s"]
    assert timeout > (40 + 64 * 40) / 1000, "a healthy 64-row call must not time out"


@pytest.mark.kafka
def test_scale_with_a_slow_model_delivers_everything_through_slow_calls(
    tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", kafka_bootstrap)
    scale = run_bench(
        tmp_path, "scale", "--no-baselines", "--model-latency-ms", "30",
        "--model-row-latency-ms", "20",
    )["scale"]  # fmt: skip
    assert scale["params"]["model_latency_ms"] == 30
    assert scale["params"]["model_row_latency_ms"] == 20
    for run in (scale["workers_1"], scale["workers_2"]):
        assert_mllp_run(run, delivers=True)
        calls = run["model_calls"]
        # One prediction per message (each is one patient-day), in batched calls.
        assert calls["rows"] >= run["observations"] > 0
        assert 0 < calls["calls"] <= calls["rows"]
        # Each Observation waited at least one call's latency after its message was sent.
        assert run["e2e_latency"]["p50_ms"] >= 30 + 20
