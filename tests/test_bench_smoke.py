"""The benchmark harness in smoke mode: every scenario runs for a moment, on real processes.

``ehrbridge bench ... --smoke`` starts the real model server, FHIR stand-in,
site processes and MLLP sender processes, as the full benchmarks do, for a
second or two. These tests check the JSON it writes is sane -- rates above
zero, percentiles in order, every accepted message delivered as an
Observation -- never how fast anything was (speed belongs to the benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from ehrbridge.cli import main


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert main(["bench", *args, "--smoke", "--json", str(out)]) == 0
    result: dict[str, Any] = orjson.loads(out.read_bytes())
    assert result["machine"]["cores"] >= 1
    return result["scenarios"]


def assert_ordered(latency: dict[str, float]) -> None:
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]


def assert_mllp_run(run: dict[str, Any], *, delivers: bool) -> None:
    assert run["sent"] > 0
    assert run["accepted"] == run["sent"], "every sample message is valid: all AA"
    assert run["accepted_rate"] > 0
    assert_ordered(run["ack_latency"])
    assert run["cpu"]["total"]["cpu_s"] > 0
    if delivers:
        assert run["observations"] == run["accepted"], "one Observation per message"
        assert run["missing"] == 0
        assert run["delivered_rate"] > 0
        assert_ordered(run["e2e_latency"])


def assert_floor(floor: dict[str, Any]) -> None:
    assert floor["sent"] > 0
    assert floor["consumed"] == floor["sent"]
    assert floor["produce_rate"] > 0 and floor["end_to_end_rate"] > 0
    assert_ordered(floor["ack_latency"])
    assert_ordered(floor["produce_to_consume_latency"])


def assert_table(scenario: dict[str, Any]) -> None:
    rows = scenario["table"]["rows"]
    assert rows and all(len(r) == len(scenario["table"]["headers"]) for r in rows)


def test_embedded_scenarios_with_naive_baseline(tmp_path: Path) -> None:
    scenarios = run_bench(tmp_path, "ingest,e2e,stages,cds,fhir-bundle", "--no-floor")
    assert set(scenarios) == {"ingest", "e2e", "stages", "cds", "fhir-bundle"}
    for scenario in scenarios.values():
        assert_table(scenario)
        assert "floor" not in scenario

    assert_mllp_run(scenarios["ingest"]["ehrbridge"], delivers=False)
    assert_mllp_run(scenarios["ingest"]["naive"], delivers=False)
    assert scenarios["ingest"]["ratios"]["accepted_rate_vs_naive"] > 0

    assert_mllp_run(scenarios["e2e"]["ehrbridge"], delivers=True)
    assert_mllp_run(scenarios["e2e"]["naive"], delivers=True)

    stages = {row["step"]: row for row in scenarios["stages"]["stages"]}
    assert all(row["us_per_msg"] > 0 for row in stages.values())
    parse = stages["ER7 parse (lean reader)"]
    assert parse["naive_us_per_msg"] > 0 and parse["naive_vs_ours"] > 0
    assert any(step.startswith("inference, batched") for step in stages)
    assert any(step.startswith("write-back, batched") for step in stages)

    cds = scenarios["cds"]
    for service in ("ehrbridge", "naive", "floor_http"):
        assert cds[service]["requests"] > 0 and cds[service]["failures"] == 0
        assert_ordered(cds[service]["latency"])

    bundles = scenarios["fhir-bundle"]["bundles"]
    assert bundles
    for bundle in bundles:
        assert bundle["entries"] > 0 and bundle["bytes"] > 0
        assert 0 < bundle["post_median_ms"] <= bundle["post_max_ms"]
        assert bundle["naive_ms"] > 0


@pytest.mark.kafka
def test_kafka_scenarios_with_floor(
    tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", kafka_bootstrap)
    scenarios = run_bench(tmp_path, "ingest,e2e,scale", "--transport", "kafka", "--no-naive")
    for scenario in scenarios.values():
        assert_table(scenario)
        assert_floor(scenario["floor"])
        assert "naive" not in scenario
    assert_mllp_run(scenarios["ingest"]["ehrbridge"], delivers=False)
    assert_mllp_run(scenarios["e2e"]["ehrbridge"], delivers=True)
    assert scenarios["e2e"]["params"]["transport"] == "kafka"
    assert_mllp_run(scenarios["scale"]["workers_1"], delivers=True)
    assert_mllp_run(scenarios["scale"]["workers_2"], delivers=True)
    assert scenarios["scale"]["ratios"]["throughput_second_worker"] > 0
