"""Aggregates over a window of results: min, max, mean, count, slope per year.

Expectations are computed by hand in the comments. Times are whole years of
365.2425 days before the anchor, so least squares is easy to follow.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_features import MAPPING, T0, fact, state_with

from ehrbridge.core.errors import ConfigError
from ehrbridge.mappings.model_file import load_model_file
from ehrbridge.mappings.schema import Aggregate
from ehrbridge.pipelines.facts import Fact
from ehrbridge.pipelines.features import FeatureRecord, NotEnoughData, assemble

YEAR = 365.2425  # days
REPO = Path(__file__).resolve().parents[2]


class Declared:
    """The site's mapping and the aggregates its models declare (as model file inputs do)."""

    def __init__(self, **rules: dict[str, Any]) -> None:
        self.rules = {name: Aggregate.model_validate(rule) for name, rule in rules.items()}

    def assemble(self, *facts: Fact, needed: list[str]) -> FeatureRecord | NotEnoughData:
        return assemble(state_with(*facts), T0, MAPPING, needed=needed, aggregates=self.rules)


def slope_rule(**extra: Any) -> dict[str, Any]:
    return {"of": "egfr", "aggregation": "slope_per_year", "min_span_days": 180, **extra}


def three_egfrs() -> list[Fact]:
    """50 two years ago, 44 half a year ago, 41 at the anchor."""
    return [
        fact("egfr", 50, days_before=2 * YEAR),
        fact("egfr", 44, days_before=0.5 * YEAR),
        fact("egfr", 41, days_before=0),
    ]


def record_of(declared: Declared, *facts: Fact, name: str) -> FeatureRecord:
    result = declared.assemble(*facts, fact("uacr", 30), needed=[name])
    assert isinstance(result, FeatureRecord), result
    return result


def missing_of(declared: Declared, *facts: Fact, name: str) -> str:
    result = declared.assemble(*facts, needed=[name])
    assert isinstance(result, NotEnoughData), result
    return result.missing[name]


def test_slope_over_three_egfrs_is_least_squares_in_years() -> None:
    # t = -2, -0.5, 0 (mean -5/6); v = 50, 44, 41 (mean 45).
    # sum dt*dv = (-7/6)(5) + (1/3)(-1) + (5/6)(-4) = -9.5; sum dt^2 = 13/6.
    # slope = -9.5 / (13/6) = -57/13 = -4.3846 per year (the end points alone give -4.5).
    mapping = Declared(egfr_slope=slope_rule(window_days=3 * YEAR))
    record = record_of(mapping, *three_egfrs(), name="egfr_slope")
    assert record["egfr_slope"] == pytest.approx(-57 / 13, abs=1e-9)
    assert record.method("egfr_slope") == "slope_per_year of egfr, 1095.73 days"
    # Provenance: the value rests on all three results, and they are the record's inputs.
    refs = [f.ref for f in three_egfrs()]
    assert list(record.aggregated["egfr_slope"]) == refs
    assert [f.ref for f in record.inputs] == refs
    again = FeatureRecord.from_json(record.to_json())
    assert again == record and again.only(["egfr_slope"]).inputs == record.inputs


def test_min_max_mean_count_over_the_window() -> None:
    mapping = Declared(
        egfr_min={"of": "egfr", "aggregation": "min", "window_days": 3 * YEAR},
        egfr_max={"of": "egfr", "aggregation": "max", "window_days": 3 * YEAR},
        egfr_mean={"of": "egfr", "aggregation": "mean", "window_days": 3 * YEAR},
        egfr_count={"of": "egfr", "aggregation": "count", "window_days": 3 * YEAR},
        egfr_last_year={"of": "egfr", "aggregation": "count"},  # the feature's window: 365 d
    )
    names = ["egfr_min", "egfr_max", "egfr_mean", "egfr_count", "egfr_last_year"]
    result = mapping.assemble(*three_egfrs(), needed=names)
    assert isinstance(result, FeatureRecord), result
    # mean = (50 + 44 + 41) / 3 = 45; two of the three are within 365 days.
    assert [result[n] for n in names] == [41, 50, 45, 3, 2]


def test_count_of_nothing_is_zero_and_latest_is_the_plain_feature() -> None:
    mapping = Declared(
        uacr_count={"of": "uacr", "aggregation": "count"},
        egfr_latest={"of": "egfr"},  # latest is the default
    )
    result = mapping.assemble(*three_egfrs(), needed=["uacr_count"])
    assert isinstance(result, FeatureRecord) and result["uacr_count"] == 0
    both = mapping.assemble(*three_egfrs(), needed=["egfr", "egfr_latest"])
    assert isinstance(both, FeatureRecord) and both["egfr"] == both["egfr_latest"] == 41


def test_future_dated_results_never_count() -> None:
    # A result dated after the anchor (from a log older than ingest's refusal) is left out.
    mapping = Declared(
        egfr_slope=slope_rule(window_days=3 * YEAR),
        egfr_count={"of": "egfr", "aggregation": "count", "window_days": 3 * YEAR},
    )
    future = fact("egfr", 5, days_before=-30, ref="FUTURE/OBX/1")
    result = mapping.assemble(*three_egfrs(), future, needed=["egfr_slope", "egfr_count"])
    assert isinstance(result, FeatureRecord), result
    assert result["egfr_slope"] == pytest.approx(-57 / 13) and result["egfr_count"] == 3
    assert "FUTURE/OBX/1" not in {f.ref for f in result.inputs}


def test_one_specimen_reported_twice_counts_once_flagged_ones_never() -> None:
    mapping = Declared(egfr_count={"of": "egfr", "aggregation": "count"})
    same_time = [fact("egfr", 41, ref="A/OBX/1"), fact("egfr", 40, ref="A/OBX/2")]
    flagged = replace(fact("egfr", 900, days_before=10), flag="implausible: above 250")
    record = record_of(mapping, *same_time, flagged, name="egfr_count")
    assert record["egfr_count"] == 1 and record.aggregated["egfr_count"] == ("A/OBX/2",)


def test_bounds_are_kept_by_min_and_max_and_refused_by_mean_and_slope() -> None:
    mapping = Declared(
        egfr_max={"of": "egfr", "aggregation": "max", "window_days": 3 * YEAR},
        egfr_mean={"of": "egfr", "aggregation": "mean", "window_days": 3 * YEAR},
        egfr_slope=slope_rule(window_days=3 * YEAR),
    )
    bounded = replace(fact("egfr", 90, days_before=YEAR), comparator=">")
    facts = [*three_egfrs(), bounded]
    maximum = record_of(mapping, *facts, name="egfr_max")
    assert maximum["egfr_max"] == 90 and bounded in maximum.inputs  # >90 kept as its bound
    for name, aggregation in (("egfr_mean", "mean"), ("egfr_slope", "slope_per_year")):
        why = missing_of(mapping, *facts, name=name)
        expected = (
            f"the egfr result of {bounded.effective.date()} is >90, a bound: no {aggregation}"
        )
        assert why.startswith(expected)


def test_not_enough_data_for_a_slope_says_why() -> None:
    mapping = Declared(egfr_slope=slope_rule())  # 365 days, span 180
    assert (
        missing_of(mapping, name="egfr_slope") == "no egfr result in the 365 days up to 2026-01-01"
    )
    one = [fact("egfr", 41)]
    assert missing_of(mapping, *one, name="egfr_slope") == (
        "1 egfr result in the window; a slope needs results at 2 or more times"
    )
    close = [fact("egfr", 44, days_before=90), fact("egfr", 41)]
    assert missing_of(mapping, *close, name="egfr_slope") == (
        "egfr results span 90 days; a slope needs at least 180"
    )
    # Two results at the same time are one result, not a slope of 0 over no time.
    twice = [fact("egfr", 44, ref="A/OBX/1"), fact("egfr", 41, ref="A/OBX/2")]
    assert missing_of(mapping, *twice, name="egfr_slope").startswith("1 egfr result")


def test_a_window_the_state_may_not_hold_whole_is_refused() -> None:
    # The state keeps the newest 64 results per feature: 64 daily eGFRs fill it.
    mapping = Declared(
        egfr_count={"of": "egfr", "aggregation": "count"},  # 365 days
        egfr_max_60={"of": "egfr", "aggregation": "max", "window_days": 60},
        egfr_latest={"of": "egfr"},
    )
    daily = [fact("egfr", 30 + i % 7, days_before=i, ref=f"D{i}/OBX/1") for i in range(80)]
    names = ["egfr_count", "egfr_max_60", "egfr_latest"]
    result = mapping.assemble(*daily, needed=names)
    assert isinstance(result, NotEnoughData) and list(result.missing) == ["egfr_count"]
    assert result.missing["egfr_count"] == (
        "the state keeps a patient's newest 64 egfr results and the oldest kept (2025-10-30) "
        "is inside the 365-day window: older results of the window may be missing"
    )
    # A window inside what is kept (60 days back; the oldest kept is 63 days back) is whole,
    # and latest needs only the newest.
    whole = mapping.assemble(*daily, needed=["egfr_max_60", "egfr_latest"])
    assert isinstance(whole, FeatureRecord)
    assert whole["egfr_max_60"] == 36 and whole["egfr_latest"] == 30


def test_aggregate_of_a_feature_the_site_does_not_map() -> None:
    features = {k: v for k, v in MAPPING.features.items() if k != "albumin"}
    mapping = MAPPING.model_copy(update={"features": features})
    rules = {"albumin_min": Aggregate(of="albumin", aggregation="min")}
    result = assemble(state_with(), T0, mapping, needed=["albumin_min"], aggregates=rules)
    assert isinstance(result, NotEnoughData)
    assert result.missing["albumin_min"] == "albumin is not mapped for this site"


def test_records_without_aggregates_serialise_as_before() -> None:
    record = record_of(Declared(), *three_egfrs(), name="egfr")
    assert "aggregated" not in record.to_json()


# ----------------------------------------------------------------------- configuration errors


def model_file_with(tmp_path: Path, extra_input: dict[str, Any], name: str = "model") -> Path:
    data = yaml.safe_load((REPO / "models" / "kfre-4.yaml").read_text())
    data["model"]["name"] = name
    data["inputs"].append(extra_input)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def slope_input(**aggregate: Any) -> dict[str, Any]:
    return {
        "name": "egfr_slope",
        "type": "number",
        "unit": "mL/min/{1.73_m2}/a",
        "aggregate": aggregate or slope_rule(window_days=730),
    }


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"of": "egfr", "aggregation": "slope_per_year"}, "slope_per_year needs 'min_span_days'"),
        ({"of": "egfr", "aggregation": "median"}, "aggregate.aggregation"),
        ({"of": "egfr", "aggregation": "max", "span_days": 3}, "aggregate.span_days"),
        ({"of": "egfr", "aggregation": "max", "min_span_days": 3}, "'min_span_days' is for slope"),
        ({"of": "weight", "aggregation": "max"}, "not a lab feature"),
    ],
)
def test_a_wrong_aggregate_names_file_line_and_field(
    tmp_path: Path, rule: dict[str, Any], expected: str
) -> None:
    path = model_file_with(tmp_path, {**slope_input(), "aggregate": rule})
    line = path.read_text().splitlines().index("  aggregate:") + 1
    with pytest.raises(ConfigError) as caught:
        load_model_file(path)
    text = str(caught.value)
    assert expected in text and "inputs[4]" in text, text
    assert any(f"model.yaml:{n}" in text for n in range(line, line + 5)), text


def test_a_model_input_declares_its_aggregate_in_the_aggregates_unit(tmp_path: Path) -> None:
    loaded = load_model_file(model_file_with(tmp_path, slope_input()))
    assert loaded.inputs[-1].aggregate == Aggregate.model_validate(slope_rule(window_days=730))
    assert Aggregate(of="uacr", aggregation="count").unit == "1"
    assert Aggregate(of="uacr", aggregation="mean").unit == "mg/g"
    wrong_unit = {**slope_input(), "unit": "mL/min/{1.73_m2}"}
    with pytest.raises(ConfigError, match=r"model\.yaml:\d+.*inputs\[4\].*given in"):
        load_model_file(model_file_with(tmp_path, wrong_unit))
    plain_name = {**slope_input(), "name": "egfr"}
    with pytest.raises(ConfigError, match="that name is a feature already"):
        load_model_file(model_file_with(tmp_path, plain_name))


def site_with_models(tmp_path: Path, *models: Path) -> Path:
    text = (REPO / "sandbox" / "site.yaml").read_text()
    block = (
        "model:\n  url: http://127.0.0.1:8091\n  name: kfre-4var\n"
        "  calibration: north_american\n  timeout_s: 2.0\n"
    )
    assert block in text
    listed = "".join(
        f"  - {{file: {m}, url: 'http://127.0.0.1:8091', calibration: north_american}}\n"
        for m in models
    )
    text = text.replace(block, f"models:\n{listed}", 1)
    site = tmp_path / "site.yaml"
    site.write_text(text)
    return site


def test_two_models_defining_one_aggregate_differently_are_refused(tmp_path: Path) -> None:
    from ehrbridge.config import load_site_config

    first = model_file_with(tmp_path, slope_input(), name="first")
    second = model_file_with(tmp_path, slope_input(**slope_rule(window_days=365)), name="second")
    same = model_file_with(tmp_path, slope_input(), name="same")
    assert load_site_config(site_with_models(tmp_path, first, same)).models
    with pytest.raises(ConfigError, match="model second defines it unlike model first"):
        load_site_config(site_with_models(tmp_path, first, second))


def test_an_aggregate_over_a_feature_the_site_does_not_map_is_refused(tmp_path: Path) -> None:
    from ehrbridge.config import load_site_config

    albumin = {"name": "albumin_min", "type": "number", "unit": "g/dL",
               "aggregate": {"of": "albumin", "aggregation": "min"}}  # fmt: skip
    site = site_with_models(tmp_path, model_file_with(tmp_path, albumin))
    text = site.read_text()
    start = text.index("    albumin:\n")
    end = text.index("    phosphate:\n")
    site.write_text(text[:start] + text[end:])
    with pytest.raises(ConfigError, match="over albumin, which the mapping does not map"):
        load_site_config(site)
