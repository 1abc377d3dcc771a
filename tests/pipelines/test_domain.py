"""A model's validated domain (issue 10, finding 9): outside it there is no score, and a reason.

KFRE is validated for adults with CKD G3-G5 (eGFR < 60). The rules are data
(``mapping.applicability``, default ``ModelSpec.applicability``); records
outside them are not scored; a comparator-bounded input that decides the
domain question is named, and a score that rests on a bounded value says so.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from ehrbridge.config import Hl7v2Writeback, load_site_config, parse_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.mappings.schema import MODELS, Mapping
from ehrbridge.pipelines.domain import OutOfDomain, bounded_note
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import Demographics, Fact, FactRules, PatientExtract, extract
from ehrbridge.pipelines.features import FeatureRecord, NotEnoughData, evaluate
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.oru import build_oru
from ehrbridge.pipelines.process import site_prediction
from ehrbridge.pipelines.records import ModelInfo
from ehrbridge.pipelines.state import PatientState
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

SITE = Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml"
CONFIG = load_site_config(SITE)
MAPPING = CONFIG.mapping
T0 = datetime(2026, 1, 10, tzinfo=UTC)
UNITS = {"creatinine": "mg/dL", "egfr": "mL/min/{1.73_m2}", "uacr": "mg/g"}
CODES = {"creatinine": "2160-0", "egfr": "98979-8", "uacr": "9318-7"}


def fact(feature: str, value: float, comparator: str = "") -> Fact:
    return Fact(
        feature=feature,
        value=value,
        unit=UNITS[feature],
        effective=T0,
        ref=f"M-{feature}/OBX/1",
        source_id="M",
        system="LN",
        code=CODES[feature],
        comparator=comparator,
    )


def outcome(
    *facts: Fact, birth: date = date(1960, 1, 1), mapping: Mapping = MAPPING
) -> FeatureRecord | NotEnoughData | OutOfDomain | None:
    patient = PatientExtract("P1", Demographics(birth, "F", T0), list(facts))
    return evaluate(PatientState("P1"), patient, mapping)


def with_mapping(**changes: object) -> Mapping:
    data = CONFIG.model_dump(mode="json")
    data["mapping"].update(changes)
    return parse_site_config(yaml.safe_dump(data)).mapping


# --------------------------------------------------------------------------- the rules


def test_kfre_domain_is_data_on_the_model_spec() -> None:
    assert MODELS["kfre-4var"].applicability == ("age >= 18", "egfr < 60")
    assert [str(r) for r in MAPPING.domain] == ["age >= 18", "egfr < 60"]


def test_a_site_can_state_its_own_rules() -> None:
    mapping = with_mapping(applicability=["age >= 18", "egfr < 45"])
    result = outcome(fact("egfr", 50.0), fact("uacr", 300.0), mapping=mapping)
    assert isinstance(result, OutOfDomain)
    assert result.reasons == ("out_of_domain: egfr 50 >= 45",)


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ("sex < 3", "a domain rule tests one of age, albumin, bicarbonate, calcium, egfr,"),
        ("bmi < 30", "not 'bmi'"),
        ("egfr ~ 60", "INPUT OP NUMBER"),
        ("egfr < sixty", "INPUT OP NUMBER"),
    ],
)
def test_a_malformed_rule_is_a_config_error_naming_the_field(rule: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        with_mapping(applicability=[rule])
    assert "applicability" in str(error.value) and says in str(error.value)


# --------------------------------------------------------------------------- outside the domain


def test_egfr_above_60_is_not_scored_and_says_why() -> None:
    state = PatientState("P1")
    patient = PatientExtract(
        "P1", Demographics(date(1960, 1, 1), "F", T0), [fact("egfr", 71.9), fact("uacr", 30.0)]
    )
    result = evaluate(state, patient, MAPPING)
    assert isinstance(result, OutOfDomain)
    assert result.reasons == ("out_of_domain: egfr 71.9 >= 60",)
    assert state.last_outcome == {
        "anchor": T0.isoformat(),
        "out_of_domain": ["out_of_domain: egfr 71.9 >= 60"],
    }


def test_a_child_is_not_scored_even_with_a_reported_egfr() -> None:
    result = outcome(fact("egfr", 30.0), fact("uacr", 300.0), birth=date(2012, 6, 1))
    assert isinstance(result, OutOfDomain)
    [reason] = result.reasons
    assert reason.startswith("out_of_domain: age 13.") and reason.endswith("< 18")


def test_in_the_domain_a_record_is_scored() -> None:
    result = outcome(fact("egfr", 59.9), fact("uacr", 30.0))
    assert isinstance(result, FeatureRecord) and bounded_note(result) == ""


# --------------------------------------------------------------------------- bounded values


def test_creatinine_below_a_bound_does_not_give_a_normal_score() -> None:
    """The issue's case: creatinine <0.2 read as 0.2 gave eGFR 146 and '0.0 %, Normal'."""
    result = outcome(fact("creatinine", 0.2, "<"), fact("uacr", 30.0))
    assert isinstance(result, OutOfDomain)
    [reason] = result.reasons
    assert reason.startswith("egfr_from_bounded_value: creatinine <0.2 mg/dL gives egfr at least")
    assert reason.endswith("outside egfr < 60")


def test_a_bound_that_may_fall_either_side_is_not_scored() -> None:
    result = outcome(fact("egfr", 50.0, ">"), fact("uacr", 30.0))
    assert isinstance(result, OutOfDomain)
    assert result.reasons == (
        "egfr_from_bounded_value: egfr >50 mL/min/{1.73_m2} gives egfr at least 50, "
        "which may or may not meet egfr < 60",
    )


def test_a_bound_that_keeps_the_record_inside_is_scored_and_the_result_says_so() -> None:
    # creatinine >15 mg/dL: eGFR is at most about 3, inside egfr < 60 whatever the truth
    result = outcome(fact("creatinine", 15.0, ">"), fact("uacr", 3.0, "<"))
    assert isinstance(result, FeatureRecord)
    note = bounded_note(result)
    assert "creatinine >15 mg/dL was used as 15 mg/dL" in note
    assert "uacr <3 mg/g was used as 3 mg/g" in note
    prediction = site_prediction(
        CONFIG, ModelInfo("kfre-4var", "1", "north_american"), "P1", result,
        {"risk_2y": 0.5, "risk_5y": 0.8}, source_id="M",
    )  # fmt: skip
    observation = build_observation(prediction, CONFIG)
    assert observation["note"] == [{"text": note}]
    target = Hl7v2Writeback(host="127.0.0.1", port=1)
    oru_site = CONFIG.model_copy(
        update={"writeback": CONFIG.writeback.model_copy(update={"hl7v2": target})}
    )
    oru, _ = build_oru(prediction, oru_site)
    assert b"Computed from a bounded value" in oru


def test_a_record_without_bounds_has_no_note() -> None:
    result = outcome(fact("egfr", 30.0), fact("uacr", 300.0))
    assert isinstance(result, FeatureRecord)
    prediction = site_prediction(
        CONFIG, ModelInfo("kfre-4var", "1", "north_american"), "P1", result,
        {"risk_2y": 0.1, "risk_5y": 0.2}, source_id="M",
    )  # fmt: skip
    assert "note" not in build_observation(prediction, CONFIG)


def test_the_hl7v2_message_of_the_issue_is_not_scored() -> None:
    """ORU^R01 with creatinine '<0.2' (NM) and no reported eGFR, through extraction."""
    message = SyntheticEhr(patients=1).renal_oru_for(
        age=45, female=False, at=T0, creatinine_mg_dl="<0.2", uacr_mg_g=30.0, mrn="M9"
    )
    [patient] = extract(Message.parse(message), FactRules(MAPPING)).patients
    result = evaluate(PatientState("M9"), patient, MAPPING, now=T0 + timedelta(days=1))
    assert isinstance(result, OutOfDomain)
    assert result.reasons[0].startswith("egfr_from_bounded_value: creatinine <0.2 mg/dL")


# --------------------------------------------------------------------------- valid ranges


def test_a_valid_range_tests_the_value_sent_so_a_bounded_value_inside_is_scored() -> None:
    """A model file's `valid` range (`uacr in [0.1, 50000]`) asks whether the number the
    model would be sent is valid: UACR `<3` is sent as 3 and scored, with its note."""
    ranged = with_mapping(applicability=["egfr < 60", "uacr in [0.1, 50000]"])
    result = outcome(fact("egfr", 30.0), fact("uacr", 3.0, "<"), mapping=ranged)
    assert isinstance(result, FeatureRecord)
    assert "uacr <3 mg/g was used as 3 mg/g" in bounded_note(result)


def test_a_value_outside_a_valid_range_is_not_scored_and_says_why() -> None:
    ranged = with_mapping(applicability=["egfr < 60", "uacr in [0.1, 1000]"])
    result = outcome(fact("egfr", 30.0), fact("uacr", 2500.0), mapping=ranged)
    assert isinstance(result, OutOfDomain)
    assert result.reasons == ("out_of_range: uacr 2500 outside [0.1, 1000]",)


@pytest.mark.parametrize("rule", ["uacr in [5, 1]", "uacr in [1]", "sex in [0, 1]"])
def test_a_malformed_range_is_refused(rule: str) -> None:
    with pytest.raises(ConfigError):
        with_mapping(applicability=[rule])
