"""CKD-EPI 2021 and KFRE 4-variable against published vectors and their maths.

Vectors come from the read-only shared corpus (lshpaner/kfre README and unit
tests; ellessenne/SCREAM CKD-EPI 2009 tests). The product never reads the
corpus; only these tests do.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ehrbridge.mappings.ckd_epi import (
    CREATININE_UMOL_PER_MG_DL,
    creatinine_umol_l_to_mg_dl,
    egfr_ckd_epi_2021,
)
from ehrbridge.sandbox import kfre
from ehrbridge.sandbox.kfre import Calibration, kfre_4var, kfre_4var_batch

CORPUS = Path("/work/shared/corpus/kfre")
KFRE_VECTORS = json.loads((CORPUS / "lshpaner-kfre" / "test_vectors.json").read_text())["vectors"]
KFRE_CONSTANTS = json.loads((CORPUS / "lshpaner-kfre" / "constants.json").read_text())
CKD_EPI_2009 = json.loads(
    (CORPUS / "egfr_ckd_epi_reference_vectors" / "SCREAM_ckd_epi_2009_vectors.json").read_text()
)

DEFAULT_TOLERANCE = 1e-4
MG_G_PER_MG_MMOL = 8.84  # 1 mmol creatinine = 113.12 mg, so 1 mg/mmol = 8.84 mg/g

YEARS: tuple[Literal[2, 5], ...] = (2, 5)

SINGLE_VECTORS = [v for v in KFRE_VECTORS if v.get("model") == "4var" and "years" in v]
BATCH_ROWS = [v for v in KFRE_VECTORS if isinstance(v.get("expected"), dict)]


def _calibration(inputs: dict[str, Any]) -> Calibration:
    if inputs["north_american"]:
        return Calibration.NORTH_AMERICAN
    return Calibration.NON_NORTH_AMERICAN


def _tolerance(vector: dict[str, Any]) -> float:
    """1e-4, unless the vector carries a looser tolerance that its origin documents."""
    own = vector.get("tolerance")
    if own is not None and own > DEFAULT_TOLERANCE and "tolerance" in vector.get("origin", ""):
        return float(own)
    return DEFAULT_TOLERANCE


def _risk(inputs: dict[str, Any], years: int) -> float:
    return kfre_4var(
        inputs["age"],
        bool(inputs["male"]),
        inputs["eGFR"],
        inputs["uACR_mg_g"],
        2 if years == 2 else 5,
        _calibration(inputs),
    )


# ------------------------------------------------------------------ KFRE vectors


def test_corpus_has_the_vectors_this_file_expects() -> None:
    # Guards against a silently empty parametrisation.
    assert len(SINGLE_VECTORS) >= 3
    assert len(BATCH_ROWS) >= 5


@pytest.mark.parametrize("vector", SINGLE_VECTORS, ids=lambda v: v["id"])
def test_kfre_single_vectors(vector: dict[str, Any]) -> None:
    risk = _risk(vector["inputs"], vector["years"])
    assert abs(risk - vector["expected"]) < _tolerance(vector)


@pytest.mark.parametrize("vector", BATCH_ROWS, ids=lambda v: v["id"])
@pytest.mark.parametrize("years", [2, 5])
def test_kfre_batch_row_vectors_one_at_a_time(vector: dict[str, Any], years: int) -> None:
    expected = vector["expected"][f"4var_{years}y"]
    assert abs(_risk(vector["inputs"], years) - expected) < DEFAULT_TOLERANCE


def test_kfre_batch_function_matches_every_batch_row() -> None:
    rows = [v["inputs"] for v in BATCH_ROWS]
    assert {_calibration(r) for r in rows} == {Calibration.NON_NORTH_AMERICAN}
    risks_2y, risks_5y = kfre_4var_batch(
        [r["age"] for r in rows],
        [bool(r["male"]) for r in rows],
        [r["eGFR"] for r in rows],
        [r["uACR_mg_g"] for r in rows],
        Calibration.NON_NORTH_AMERICAN,
    )
    for vector, got_2y, got_5y in zip(BATCH_ROWS, risks_2y, risks_5y, strict=True):
        assert abs(got_2y - vector["expected"]["4var_2y"]) < DEFAULT_TOLERANCE
        assert abs(got_5y - vector["expected"]["4var_5y"]) < DEFAULT_TOLERANCE


def test_batch_equals_single_for_both_calibrations() -> None:
    ages, males, egfrs, uacrs = (
        [45.0, 80.5, 62.0],
        [True, False, True],
        [12.0, 44.0, 29.5],
        [3000.0, 8.0, 410.0],
    )
    for calibration in Calibration:
        risks_2y, risks_5y = kfre_4var_batch(ages, males, egfrs, uacrs, calibration)
        for row, (r2, r5) in enumerate(zip(risks_2y, risks_5y, strict=True)):
            args = (ages[row], males[row], egfrs[row], uacrs[row])
            assert r2 == kfre_4var(*args, 2, calibration)
            assert r5 == kfre_4var(*args, 5, calibration)


def test_constants_in_code_match_the_corpus_transcription() -> None:
    model = KFRE_CONSTANTS["models"]["4var"]
    centering = KFRE_CONSTANTS["centering"]
    in_code = {
        "beta_age": kfre.BETA_AGE_PER_DECADE,
        "beta_male": kfre.BETA_MALE,
        "beta_egfr": kfre.BETA_EGFR_PER_5,
        "beta_ln_uacr": kfre.BETA_LN_UACR,
        "mean_age": kfre.MEAN_AGE_DECADES,
        "mean_male": kfre.MEAN_MALE,
        "mean_egfr": kfre.MEAN_EGFR_DIV_5,
        "mean_ln_uacr": kfre.MEAN_LN_UACR,
    }
    published = {
        "beta_age": model["coef"]["age"],
        "beta_male": model["coef"]["male"],
        "beta_egfr": model["coef"]["eGFR"],
        "beta_ln_uacr": model["coef"]["ln_uACR"],
        "mean_age": centering["age_div10"],
        "mean_male": centering["male"],
        "mean_egfr": centering["eGFR_div5"],
        "mean_ln_uacr": centering["ln_uACR"],
    }
    assert in_code == published
    for calibration in Calibration:
        survival = model["baseline_survival"][calibration.value]
        assert kfre.BASELINE_SURVIVAL[calibration] == {2: survival["2y"], 5: survival["5y"]}


# ---------------------------------------------------------------- CKD-EPI 2021


def test_ckd_epi_2021_male_55_creatinine_1_2() -> None:
    egfr = egfr_ckd_epi_2021(1.2, 55, female=False)
    assert abs(egfr - 71.42) <= 0.01  # as printed
    # Hand derivation (male: kappa 0.9, alpha -0.302; Scr/kappa = 1.2/0.9 = 1.33333):
    #   min(1.3333, 1)^-0.302          = 1
    #   max(1.3333, 1)^-1.200          = exp(-1.2 * ln 1.33333) = exp(-1.2 * 0.2876821)
    #                                  = exp(-0.3452185)       = 0.7080656
    #   0.9938^55                      = exp(55 * ln 0.9938)    = exp(55 * -0.0062193)
    #                                  = exp(-0.3420615)       = 0.7103045
    #   142 * 1 * 0.7080656 * 0.7103045 = 71.41780
    assert abs(egfr - 71.41780) < 1e-4


def test_ckd_epi_2021_woman_in_umol_then_kfre_non_north_american() -> None:
    creatinine = creatinine_umol_l_to_mg_dl(265)
    assert creatinine == 265 / CREATININE_UMOL_PER_MG_DL
    egfr = egfr_ckd_epi_2021(creatinine, 57.28, female=True)
    assert round(egfr, 2) == 17.57

    # The unrounded eGFR feeds the KFRE, as a lab system would pass it on.
    uacr_mg_g = 199.3 * MG_G_PER_MG_MMOL
    args = (57.28, False, egfr, uacr_mg_g)
    risk_2y = kfre_4var(*args, 2, Calibration.NON_NORTH_AMERICAN)
    risk_5y = kfre_4var(*args, 5, Calibration.NON_NORTH_AMERICAN)
    assert abs(round(100 * risk_2y, 2) - 35.89) < 1e-9
    assert abs(round(100 * risk_5y, 2) - 82.12) < 1e-9


def test_ckd_epi_female_factor_and_kappa() -> None:
    # Below kappa the female branch uses alpha -0.241 and the 1.012 factor.
    expected = 142 * (0.6 / 0.7) ** -0.241 * 0.9938**40 * 1.012
    assert egfr_ckd_epi_2021(0.6, 40, female=True) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("creatinine", "age"),
    [(0.0, 50), (-1.0, 50), (math.nan, 50), (math.inf, 50), (1.0, 17.99), (1.0, math.nan)],
)
def test_ckd_epi_refuses_invalid_inputs(creatinine: float, age: float) -> None:
    with pytest.raises(ValueError):
        egfr_ckd_epi_2021(creatinine, age, female=False)


@pytest.mark.parametrize("value", [0.0, -88.4, math.nan])
def test_creatinine_conversion_refuses_non_positive(value: float) -> None:
    with pytest.raises(ValueError):
        creatinine_umol_l_to_mg_dl(value)


# ------------------------------------------- CKD-EPI 2009 contrast (test-only reference)


def _egfr_ckd_epi_2009(creatinine_umol_l: float, age: float, female: bool, kappa: float) -> float:
    """CKD-EPI 2009 without race term; ``kappa`` in the same unit as creatinine."""
    alpha = -0.329 if female else -0.411
    ratio = creatinine_umol_l / kappa
    egfr = 141 * min(ratio, 1) ** alpha * max(ratio, 1) ** -1.209 * 0.993**age
    return float(egfr * 1.018 if female else egfr)


def _kappa_umol(female: bool) -> float:
    return 62.0 if female else 80.0  # the SCREAM package's SI kappas


@pytest.mark.parametrize("vector", CKD_EPI_2009["vectors"], ids=str)
def test_2009_reference_reproduces_its_vectors(vector: dict[str, Any]) -> None:
    female = bool(vector["female"])
    egfr = _egfr_ckd_epi_2009(
        vector["creatinine_umol_L"], vector["age"], female, _kappa_umol(female)
    )
    assert math.floor(egfr) == vector["expected_floor_eGFR"]


def test_2021_differs_from_2009_for_every_2009_vector() -> None:
    # The corpus notes give the 2021 floors for the same inputs, independently computed.
    notes = " ".join(CKD_EPI_2009["verification_notes"])
    match = re.search(r"gives e\.g\. ([\d/]+) \(floor\)", notes)
    assert match is not None
    floors_2021 = [int(x) for x in match.group(1).split("/")]
    vectors = CKD_EPI_2009["vectors"]
    assert len(floors_2021) == len(vectors)
    for vector, expected_2021 in zip(vectors, floors_2021, strict=True):
        mg_dl = creatinine_umol_l_to_mg_dl(vector["creatinine_umol_L"])
        ours = math.floor(egfr_ckd_epi_2021(mg_dl, vector["age"], bool(vector["female"])))
        assert ours == expected_2021
        assert ours != vector["expected_floor_eGFR"]


def test_2009_reference_is_sensitive_to_the_unit_of_kappa() -> None:
    # With mg/dL kappas (0.7/0.9) and 88.4 umol/L per mg/dL, two SCREAM vectors
    # drop by one (the corpus notes say 50/40/M -> 128 and 60/60/M -> 103).
    shifted = {}
    for vector in CKD_EPI_2009["vectors"]:
        female = bool(vector["female"])
        mg_dl = creatinine_umol_l_to_mg_dl(vector["creatinine_umol_L"])
        floor = math.floor(_egfr_ckd_epi_2009(mg_dl, vector["age"], female, 0.7 if female else 0.9))
        if floor != vector["expected_floor_eGFR"]:
            shifted[(vector["creatinine_umol_L"], vector["age"], female)] = floor
    assert shifted == {(50, 40, False): 128, (60, 60, False): 103}


# ----------------------------------------------------------------- KFRE input rules


@pytest.mark.parametrize(
    ("age", "egfr", "uacr"),
    [
        (60, 0.0, 30),
        (60, -5.0, 30),
        (60, 20, 0.0),
        (60, 20, -1.0),
        (60, math.nan, 30),
        (60, 20, math.inf),
        (0.0, 20, 30),
        (math.nan, 20, 30),
    ],
)
def test_kfre_refuses_out_of_domain_inputs(age: float, egfr: float, uacr: float) -> None:
    with pytest.raises(ValueError):
        kfre_4var(age, True, egfr, uacr, 2, Calibration.NORTH_AMERICAN)


def test_kfre_refuses_unknown_horizon_and_calibration() -> None:
    with pytest.raises(ValueError, match="years"):
        kfre_4var(60, True, 20, 30, 3, Calibration.NORTH_AMERICAN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration"):
        kfre_4var(60, True, 20, 30, 2, "european")  # type: ignore[arg-type]


def test_kfre_batch_names_the_bad_row_and_checks_lengths() -> None:
    with pytest.raises(ValueError, match=r"egfr\[1\]"):
        kfre_4var_batch([60, 61], [True, False], [20, 0], [30, 30], Calibration.NORTH_AMERICAN)
    with pytest.raises(ValueError, match="same length"):
        kfre_4var_batch([60, 61], [True], [20, 25], [30, 30], Calibration.NORTH_AMERICAN)


def test_kfre_accepts_string_calibration_value() -> None:
    as_enum = kfre_4var(60, True, 20, 30, 5, Calibration.NON_NORTH_AMERICAN)
    as_text = kfre_4var(60, True, 20, 30, 5, "non_north_american")  # type: ignore[arg-type]
    assert as_enum == as_text


# -------------------------------------------------------------- properties

# The clinical range where KFRE is used (CKD G3-G5, adults). Beyond it the
# 5-year risk of extreme inputs rounds to exactly 1.0 in float64 and strict
# inequalities stop being representable, so the strict properties stay inside.
age_range = st.floats(min_value=18, max_value=100)
egfr_range = st.floats(min_value=10, max_value=60)
uacr_range = st.floats(min_value=0.5, max_value=10_000)
calibrations = st.sampled_from(list(Calibration))
factors = st.floats(min_value=1.01, max_value=20)


@given(
    age=age_range,
    male=st.booleans(),
    egfr=egfr_range,
    uacr=uacr_range,
    factor=factors,
    calibration=calibrations,
)
def test_risk_increases_with_uacr(
    *, age: float, male: bool, egfr: float, uacr: float, factor: float, calibration: Calibration
) -> None:
    for years in YEARS:
        low = kfre_4var(age, male, egfr, uacr, years, calibration)
        high = kfre_4var(age, male, egfr, uacr * factor, years, calibration)
        assert low < high


@given(
    age=age_range,
    male=st.booleans(),
    egfr=egfr_range,
    uacr=uacr_range,
    factor=factors,
    calibration=calibrations,
)
def test_risk_decreases_with_egfr(
    *, age: float, male: bool, egfr: float, uacr: float, factor: float, calibration: Calibration
) -> None:
    for years in YEARS:
        low_egfr = kfre_4var(age, male, egfr, uacr, years, calibration)
        high_egfr = kfre_4var(age, male, egfr * factor, uacr, years, calibration)
        assert high_egfr < low_egfr


@given(age_range, st.booleans(), egfr_range, uacr_range, calibrations)
def test_five_year_risk_exceeds_two_year_and_stays_in_open_interval(
    age: float, male: bool, egfr: float, uacr: float, calibration: Calibration
) -> None:
    risk_2y = kfre_4var(age, male, egfr, uacr, 2, calibration)
    risk_5y = kfre_4var(age, male, egfr, uacr, 5, calibration)
    assert 0 < risk_2y < risk_5y < 1


@given(age_range, st.booleans(), egfr_range, uacr_range)
def test_north_american_calibration_gives_higher_risk(
    age: float, male: bool, egfr: float, uacr: float
) -> None:
    for years in YEARS:
        na = kfre_4var(age, male, egfr, uacr, years, Calibration.NORTH_AMERICAN)
        non_na = kfre_4var(age, male, egfr, uacr, years, Calibration.NON_NORTH_AMERICAN)
        assert na > non_na


@given(
    st.floats(min_value=1e-3, max_value=1e6),
    st.booleans(),
    st.floats(min_value=1e-6, max_value=1e6),
    st.floats(min_value=1e-6, max_value=1e9),
    calibrations,
)
def test_risk_is_a_probability_for_any_valid_input(
    age: float, male: bool, egfr: float, uacr: float, calibration: Calibration
) -> None:
    risk_2y, risk_5y = (r[0] for r in kfre_4var_batch([age], [male], [egfr], [uacr], calibration))
    assert 0 <= risk_2y <= risk_5y <= 1
