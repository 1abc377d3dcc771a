"""KFRE 8-variable (Tangri 2011, recalibrated 2016): vectors, an oracle, units.

Three independent checks, each to 1e-4 absolute risk:

* the published example rows of the shared corpus (lshpaner/kfre README,
  non-North-American calibration);
* the PyPI ``kfre`` package as an oracle at test time only (a dev
  dependency, never imported by the product), on generated patients, both
  calibrations and both horizons;
* the SI-to-conventional conversions, by molar mass, against the same
  patient written in both unit systems.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kfre import RiskPredictor  # the oracle (dev dependency)

from ehrbridge.sandbox.kfre import (
    CALCIUM_MG_DL_PER_MMOL_L,
    KFRE8_BASELINE_SURVIVAL,
    PHOSPHATE_MG_DL_PER_MMOL_L,
    Calibration,
    Kfre8Inputs,
    from_equation_unit,
    kfre_4var,
    kfre_8var,
    kfre_8var_batch,
    to_equation_unit,
)

CORPUS = Path("/work/shared/corpus/kfre/lshpaner-kfre")
VECTORS = json.loads((CORPUS / "test_vectors.json").read_text())["vectors"]
CONSTANTS = json.loads((CORPUS / "constants.json").read_text())
EIGHT_VAR_ROWS = [v for v in VECTORS if isinstance(v.get("expected"), dict)]
TOLERANCE = 1e-4
YEARS: tuple[Literal[2, 5], ...] = (2, 5)


def _inputs(row: dict[str, Any]) -> Kfre8Inputs:
    return Kfre8Inputs(
        age=row["age"],
        male=bool(row["male"]),
        egfr=row["eGFR"],
        uacr_mg_g=row["uACR_mg_g"],
        albumin_g_dl=row["albumin_g_dL"],
        phosphate_mg_dl=row["phosphorous_mg_dL"],
        bicarbonate_mmol_l=row["bicarbonate_mEq_L"],
        calcium_mg_dl=row["calcium_mg_dL"],
    )


def _calibration(north_american: bool) -> Calibration:
    return Calibration.NORTH_AMERICAN if north_american else Calibration.NON_NORTH_AMERICAN


def _oracle(patient: Kfre8Inputs, years: int, calibration: Calibration) -> float:
    risk = RiskPredictor().kfre_person(
        patient.age,
        patient.male,
        patient.egfr,
        patient.uacr_mg_g,
        calibration is Calibration.NORTH_AMERICAN,
        years=years,
        albumin=patient.albumin_g_dl,
        phosphorous=patient.phosphate_mg_dl,
        bicarbonate=patient.bicarbonate_mmol_l,
        calcium=patient.calcium_mg_dl,
    )
    return float(risk)


# ---------------------------------------------------------------- published rows


def test_the_corpus_has_eight_variable_rows() -> None:
    assert len(EIGHT_VAR_ROWS) >= 5  # guards against an empty parametrisation


@pytest.mark.parametrize("vector", EIGHT_VAR_ROWS, ids=lambda v: v["id"])
@pytest.mark.parametrize("years", YEARS)
def test_published_rows(vector: dict[str, Any], years: Literal[2, 5]) -> None:
    row = vector["inputs"]
    risk = kfre_8var(_inputs(row), years, _calibration(row["north_american"]))
    assert abs(risk - vector["expected"][f"8var_{years}y"]) < TOLERANCE


def test_batch_equals_single_rows() -> None:
    patients = [_inputs(v["inputs"]) for v in EIGHT_VAR_ROWS]
    for calibration in Calibration:
        risks_2y, risks_5y = kfre_8var_batch(patients, calibration)
        assert risks_2y == [kfre_8var(p, 2, calibration) for p in patients]
        assert risks_5y == [kfre_8var(p, 5, calibration) for p in patients]


def test_constants_match_the_corpus_transcription() -> None:
    model = CONSTANTS["models"]["8var"]
    for calibration, key in (
        (Calibration.NORTH_AMERICAN, "north_american"),
        (Calibration.NON_NORTH_AMERICAN, "non_north_american"),
    ):
        survival = model["baseline_survival"][key]
        assert KFRE8_BASELINE_SURVIVAL[calibration] == {2: survival["2y"], 5: survival["5y"]}


# ------------------------------------------------------------------- the oracle

PATIENTS = st.builds(
    Kfre8Inputs,
    age=st.floats(18, 100),
    male=st.booleans(),
    egfr=st.floats(5, 59.9),
    uacr_mg_g=st.floats(1, 5000),
    albumin_g_dl=st.floats(1.5, 5.5),
    phosphate_mg_dl=st.floats(1.5, 10),
    bicarbonate_mmol_l=st.floats(10, 40),
    calcium_mg_dl=st.floats(6, 13),
)


@settings(max_examples=150, deadline=None)
@given(patient=PATIENTS, calibration=st.sampled_from(list(Calibration)))
def test_agrees_with_the_kfre_package(patient: Kfre8Inputs, calibration: Calibration) -> None:
    for years in YEARS:
        ours = kfre_8var(patient, years, calibration)
        assert abs(ours - _oracle(patient, years, calibration)) < TOLERANCE


def test_calibration_matters_and_the_oracle_sees_it_too() -> None:
    patient = _inputs(EIGHT_VAR_ROWS[0]["inputs"])
    north = kfre_8var(patient, 5, Calibration.NORTH_AMERICAN)
    other = kfre_8var(patient, 5, Calibration.NON_NORTH_AMERICAN)
    assert abs(north - other) > 0.01
    assert abs(north - _oracle(patient, 5, Calibration.NORTH_AMERICAN)) < TOLERANCE


def test_eight_variables_differ_from_four() -> None:
    # The extra analytes carry weight: a low albumin, high phosphate patient.
    patient = Kfre8Inputs(65, True, 25, 300, 2.8, 6.0, 18, 8.4)
    four = kfre_4var(65, True, 25, 300, 5, Calibration.NORTH_AMERICAN)
    assert kfre_8var(patient, 5, Calibration.NORTH_AMERICAN) > four + 0.1


# ------------------------------------------------------------------------ units


def test_si_units_convert_by_molar_mass() -> None:
    assert to_equation_unit("calcium", 2.5, "mmol/L") == pytest.approx(10.0195, abs=1e-12)
    assert to_equation_unit("phosphate", 1.0, "mmol/L") == pytest.approx(3.0973762)
    assert to_equation_unit("albumin", 40.0, "g/L") == pytest.approx(4.0)
    assert to_equation_unit("bicarbonate", 24.0, "meq/L") == 24.0
    assert to_equation_unit("calcium", 9.5, "mg/dL") == 9.5
    # Atomic weights: Ca 40.078, P 30.973762 (g/mol); mg/dL = mmol/L * M / 10.
    assert pytest.approx(40.078 / 10) == CALCIUM_MG_DL_PER_MMOL_L
    assert pytest.approx(30.973762 / 10) == PHOSPHATE_MG_DL_PER_MMOL_L


@given(
    analyte_unit=st.sampled_from(
        [
            ("calcium", "mmol/L"),
            ("phosphate", "mmol/L"),
            ("albumin", "g/L"),
            ("bicarbonate", "mEq/L"),
        ]
    ),
    value=st.floats(0.01, 1000),
)
def test_conversions_round_trip(analyte_unit: tuple[Any, str], value: float) -> None:
    analyte, unit = analyte_unit
    there = to_equation_unit(analyte, value, unit)
    assert math.isclose(from_equation_unit(analyte, there, unit), value, rel_tol=1e-12)


def test_the_same_patient_in_si_units_gets_the_same_risk() -> None:
    conventional = Kfre8Inputs(70, False, 28, 450, 3.6, 4.8, 21, 9.1)
    si = Kfre8Inputs(
        70,
        False,
        28,
        450,
        to_equation_unit("albumin", 36.0, "g/L"),
        to_equation_unit("phosphate", 4.8 / PHOSPHATE_MG_DL_PER_MMOL_L, "mmol/L"),
        to_equation_unit("bicarbonate", 21, "mmol/L"),
        to_equation_unit("calcium", 9.1 / CALCIUM_MG_DL_PER_MMOL_L, "mmol/L"),
    )
    for calibration in Calibration:
        assert kfre_8var(si, 2, calibration) == pytest.approx(
            kfre_8var(conventional, 2, calibration), abs=1e-12
        )


def test_forgetting_to_convert_calcium_is_not_silently_close() -> None:
    # 2.3 mmol/L read as mg/dL would be hypocalcaemia far outside any cohort;
    # the risk moves by tens of points, which is why units are explicit.
    right = Kfre8Inputs(60, True, 30, 200, 4.0, 3.9, 25, to_equation_unit("calcium", 2.3, "mmol/L"))
    wrong = Kfre8Inputs(60, True, 30, 200, 4.0, 3.9, 25, 2.3)
    assert (
        kfre_8var(wrong, 5, Calibration.NORTH_AMERICAN)
        - kfre_8var(right, 5, Calibration.NORTH_AMERICAN)
        > 0.3
    )


@pytest.mark.parametrize(
    ("analyte", "unit"),
    [("calcium", "g/L"), ("albumin", "mmol/L"), ("phosphate", "mEq/L"), ("sodium", "mmol/L")],
)
def test_unknown_units_and_analytes_are_refused(analyte: Any, unit: str) -> None:
    with pytest.raises(ValueError, match=r"cannot be used|unknown") as caught:
        to_equation_unit(analyte, 123.456, unit)
    assert "123.456" not in str(caught.value)


@pytest.mark.parametrize(
    "field", ["age", "egfr", "uacr_mg_g", "albumin_g_dl", "phosphate_mg_dl", "calcium_mg_dl"]
)
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_non_positive_or_non_finite_inputs_are_refused(field: str, bad: float) -> None:
    values = {
        "age": 60.0,
        "male": True,
        "egfr": 30.0,
        "uacr_mg_g": 200.0,
        "albumin_g_dl": 4.0,
        "phosphate_mg_dl": 3.9,
        "bicarbonate_mmol_l": 25.0,
        "calcium_mg_dl": 9.4,
    }
    values[field] = bad
    with pytest.raises(ValueError, match=field):
        kfre_8var(Kfre8Inputs(**values), 2, Calibration.NORTH_AMERICAN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{field}\[1\]"):
        kfre_8var_batch(
            [Kfre8Inputs(**{**values, field: 50.0}), Kfre8Inputs(**values)],  # type: ignore[arg-type]
            Calibration.NORTH_AMERICAN,
        )
