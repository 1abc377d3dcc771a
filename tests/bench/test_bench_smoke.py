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

from ehrbridge.bench.load import SenderSpec, build_messages
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


def test_max_trials_each_start_with_a_fresh_population(tmp_path: Path) -> None:
    """`--max` measures the rate, not the order: no trial inherits an earlier one's patients."""
    e2e = run_bench(tmp_path, "e2e", "--max", "--no-baselines")["e2e"]
    trials = e2e["max"]["trials"]
    assert len(trials) >= 2
    for trial in trials:
        assert trial["patients"] > 0
        assert trial["patients_in_earlier_trials"] == 0
    assert e2e["ehrbridge"]["patients_in_earlier_trials"] == 0


def test_populations_are_the_same_patients_under_their_own_identifiers() -> None:
    def mrns(population: int) -> list[str]:
        spec = SenderSpec(0, 1, 0, 0, 0, 40, "T", patients=50, population=population)
        return [_mrn(raw) for _, raw in build_messages(spec)]

    first, second = mrns(1), mrns(2)
    assert len(first) == len(second) == 40
    assert not set(first) & set(second), "no patient is shared between populations"
    unchanged = mrns(0)
    assert [m.replace("P1", "", 1) for m in first] == unchanged, "same patients, in order"


def _mrn(message: bytes) -> str:
    """PID-3's MR repetition (the identifier the sandbox site keys patients on)."""
    pid = next(s for s in message.decode().split("\r") if s.startswith("PID|"))
    return next(cx for cx in pid.split("|")[3].split("~") if cx.endswith("^MR"))


def run_check(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "check.json"
    code = main(["bench", "stages", "--smoke", "--check", "--json", str(out), *extra])
    check: dict[str, Any] = orjson.loads(out.read_bytes())["scenarios"]["stages"]
    return code, check


def test_stages_cpu_check_passes_against_the_committed_baseline(tmp_path: Path) -> None:
    """CI's regression check: CPU µs/msg per stage within 30% of bench/baseline.json."""
    code, check = run_check(tmp_path)
    assert check["check"] == "pass", check["table"]
    assert code == 0
    measured = check["measured"]
    assert measured["repeats"] >= 3 and measured["calibration_us"] > 0
    assert all(us > 0 for us in measured["cpu_us_per_msg"].values())


def test_stages_cpu_check_fails_when_a_step_does_its_work_four_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real regression -- fact extraction run four times per message -- fails the check.

    Four, not two: the check widens its 30% allowance by how much slower a stdlib
    workload runs than when the baseline was recorded, so on a busy CI machine a mere
    doubling can sit inside the widened allowance (seen once in CI). Four times is a
    regression under any load this machine has shown (allowance widened up to 1.6x).
    """
    from ehrbridge.bench import stages

    original = stages.extract

    def extract_four_times(message: Any, rules: Any) -> Any:
        for _ in range(3):
            original(message, rules)
        return original(message, rules)

    monkeypatch.setattr(stages, "extract", extract_four_times)
    code, check = run_check(tmp_path)
    assert code == 1, check["table"]
    assert check["check"] == "fail"
    assert "facts (codes, units, values)" in check["regressed"]
    facts = next(row for row in check["table"]["rows"] if row[0].startswith("facts"))
    assert facts[4] >= 2.0, "well past the baseline (a quiet machine measures it below)"
