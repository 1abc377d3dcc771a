"""Per-patient state merging and KFRE feature assembly with windows."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from ehrbridge.config import load_site_config
from ehrbridge.mappings.ckd_epi import egfr_ckd_epi_2021
from ehrbridge.pipelines.facts import Demographics, Fact, PatientExtract
from ehrbridge.pipelines.features import FeatureRecord, NotEnoughData, age_at, assemble
from ehrbridge.pipelines.state import PatientState

MAPPING = load_site_config(Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml").mapping
T0 = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
UNITS = {"creatinine": "mg/dL", "egfr": "mL/min/{1.73_m2}", "uacr": "mg/g"}


def fact(
    feature: str, value: float, days_before: float = 0, ref: str | None = None, **kw: str
) -> Fact:
    when = T0 - timedelta(days=days_before)
    return Fact(
        feature=feature,
        value=value,
        unit=UNITS[feature],
        effective=when,
        ref=ref or f"M{feature}{days_before}/OBX/1",
        source_id="M",
        system="LN",
        code=kw.get("code", {"creatinine": "2160-0", "egfr": "98979-8", "uacr": "9318-7"}[feature]),
        status=kw.get("status", "F"),
    )


def state_with(
    *facts: Fact, birth: date | None = date(1968, 9, 21), sex: str | None = "F"
) -> PatientState:
    state = PatientState("P1")
    state.merge(PatientExtract("P1", Demographics(birth, sex, T0), list(facts)))
    return state


def test_reported_egfr_is_used_when_present() -> None:
    result = assemble(
        state_with(fact("egfr", 40.0), fact("creatinine", 3.0), fact("uacr", 300)), T0, MAPPING
    )
    assert isinstance(result, FeatureRecord)
    assert (result["egfr"], result.method("egfr"), result["uacr"], bool(result["sex"])) == (
        40.0,
        "reported",
        300,
        False,
    )
    assert [f.feature for f in result.inputs] == ["egfr", "uacr"]


def test_egfr_is_derived_from_creatinine_at_its_own_time() -> None:
    creatinine = fact("creatinine", 2.997737556561086, days_before=30)
    result = assemble(state_with(creatinine, fact("uacr", 1761.812)), T0, MAPPING)
    assert isinstance(result, FeatureRecord)
    age_then = age_at(date(1968, 9, 21), creatinine.effective)
    assert result["egfr"] == pytest.approx(
        egfr_ckd_epi_2021(2.997737556561086, age_then, True), abs=1e-12
    )
    assert result.method("egfr") == "ckd-epi-2021"
    assert result["age"] == pytest.approx(age_at(date(1968, 9, 21), T0))


def test_age_is_taken_at_the_anchor() -> None:
    assert age_at(date(1968, 9, 21), datetime(2026, 1, 1, tzinfo=UTC)) == pytest.approx(
        57.28, abs=0.005
    )


def test_windows_are_measured_back_from_the_anchor_not_the_clock() -> None:
    old_anchor = datetime(2019, 6, 1, tzinfo=UTC)
    egfr = replace(fact("egfr", 30), effective=old_anchor - timedelta(days=10))
    uacr = replace(fact("uacr", 100), effective=old_anchor - timedelta(days=700))
    result = assemble(state_with(egfr, uacr), old_anchor, MAPPING)
    assert isinstance(result, FeatureRecord)  # 2019 history still assembles in 2026


def test_a_fact_outside_its_window_is_missing_with_a_reason() -> None:
    result = assemble(state_with(fact("egfr", 30), fact("uacr", 100, days_before=731)), T0, MAPPING)
    assert isinstance(result, NotEnoughData)
    assert result.missing == {"uacr": "no uacr result in the 730 days up to 2026-01-01"}


def test_facts_after_the_anchor_are_not_used() -> None:
    later = replace(fact("egfr", 99), effective=T0 + timedelta(days=1), ref="later/OBX/1")
    result = assemble(
        state_with(fact("egfr", 30, days_before=5), later, fact("uacr", 100)), T0, MAPPING
    )
    assert isinstance(result, FeatureRecord) and result["egfr"] == 30


@pytest.mark.parametrize(
    ("birth", "sex", "missing"),
    [
        (None, "F", {"age", "egfr"}),
        (date(1968, 1, 1), "U", {"sex", "egfr"}),
        (date(1968, 1, 1), None, {"sex", "egfr"}),
        # A child: CKD-EPI 2021 gives no eGFR. The model's own age limit is a domain
        # rule (mapping.applicability), tested in tests/pipelines/test_domain.py.
        (date(2010, 1, 1), "M", {"egfr"}),
    ],
)
def test_missing_demographics_are_named(
    birth: date | None, sex: str | None, missing: set[str]
) -> None:
    result = assemble(
        state_with(fact("creatinine", 1.2), fact("uacr", 30), birth=birth, sex=sex), T0, MAPPING
    )
    assert isinstance(result, NotEnoughData)
    assert set(result.missing) == missing
    assert result.reason  # a readable sentence for the API


def test_merging_the_same_message_twice_changes_nothing() -> None:
    state = state_with(fact("creatinine", 1.2))
    again = PatientExtract("P1", Demographics(None, None, None), [fact("creatinine", 1.2)])
    assert state.merge(again) == []
    assert len(state.facts["creatinine"]) == 1


def test_a_correction_replaces_the_result_it_corrects() -> None:
    state = state_with(fact("creatinine", 1.2, ref="A/OBX/1"))
    corrected = replace(fact("creatinine", 1.4, ref="B/OBX/1"), status="C")
    state.merge(PatientExtract("P1", Demographics(None, None, None), [corrected]))
    assert [f.value for f in state.facts["creatinine"]] == [1.4]


def test_newer_demographics_win_and_late_old_ones_do_not() -> None:
    state = state_with(birth=date(1960, 1, 1), sex="M")
    state.merge(
        PatientExtract("P1", Demographics(date(1961, 2, 2), "F", T0 + timedelta(days=1)), [])
    )
    state.merge(
        PatientExtract("P1", Demographics(date(1950, 1, 1), "M", T0 - timedelta(days=1)), [])
    )
    assert (state.birth_date, state.sex) == (date(1961, 2, 2), "F")


def test_state_is_bounded_per_feature() -> None:
    facts = [
        fact("creatinine", 1.0 + i / 100, days_before=i, ref=f"R{i}/OBX/1") for i in range(100)
    ]
    state = state_with(*facts)
    assert len(state.facts["creatinine"]) == 64
    assert state.facts["creatinine"][-1].effective == T0  # the newest are kept


def test_state_round_trips_through_json() -> None:
    state = state_with(fact("creatinine", 1.2), fact("uacr", 30))
    state.last_outcome = {"not_enough_data": {"egfr": "x"}}
    assert PatientState.from_json(state.to_json()) == state
