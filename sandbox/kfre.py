"""The 4- and 8-variable Kidney Failure Risk Equations (KFRE), plain Python.

References:

* Tangri N, Stevens LA, Griffith J, et al. A predictive model for progression
  of chronic kidney disease to kidney failure. JAMA 2011;305(15):1553-1559.
  doi:10.1001/jama.2011.451 -- the 4-variable model (age, sex, eGFR, UACR).
* Tangri N, Grams ME, Levey AS, et al. Multinational assessment of accuracy of
  equations for predicting risk of kidney failure: a meta-analysis.
  JAMA 2016;315(2):164-174. doi:10.1001/jama.2015.18202 -- the recalibrated
  baseline survivals for North American and non-North-American cohorts.

The model is a Cox model evaluated at 2 and 5 years::

    X    = -0.2201 (age/10 - 7.036) + 0.2467 (male - 0.5642)
           - 0.5567 (eGFR/5 - 7.222) + 0.4510 (ln UACR - 5.137)
    risk = 1 - S0 ^ exp(X)

age in years, male 1/0, eGFR in mL/min/1.73 m2, UACR in mg/g (divide mg/mmol
by 0.113, i.e. multiply by 8.84, before calling).

The 8-variable model (Tangri 2011, recalibrated in Tangri 2016) adds four serum
analytes, each centred in US conventional units::

    X8   = -0.1992 (age/10 - 7.036) + 0.1602 (male - 0.5642)
           - 0.4919 (eGFR/5 - 7.222) + 0.3364 (ln UACR - 5.137)
           - 0.3441 (albumin g/dL - 3.997) + 0.2604 (phosphate mg/dL - 3.916)
           - 0.07354 (bicarbonate mmol/L - 25.57) - 0.2228 (calcium mg/dL - 9.355)

Laboratories outside the US report calcium and phosphate in mmol/L and albumin
in g/L; :func:`to_equation_unit` converts them explicitly (by molar mass, never
by a guess from the magnitude). The constants live here, in
code, so the product never reads a data file to compute a risk; the test-suite
cross-checks them against the transcription in the shared corpus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, get_args


class Calibration(StrEnum):
    """Which baseline survival to use (Tangri 2016): where the patient is treated."""

    NORTH_AMERICAN = "north_american"
    NON_NORTH_AMERICAN = "non_north_american"


Horizon = Literal[2, 5]
HORIZONS: tuple[int, ...] = get_args(Horizon)

# Coefficients and centring values of the 4-variable model (Tangri 2011;
# unchanged by the 2016 recalibration).
BETA_AGE_PER_DECADE = -0.2201
BETA_MALE = 0.2467
BETA_EGFR_PER_5 = -0.5567
BETA_LN_UACR = 0.4510
MEAN_AGE_DECADES = 7.036
MEAN_MALE = 0.5642
MEAN_EGFR_DIV_5 = 7.222
MEAN_LN_UACR = 5.137

# Baseline survival S0 at 2 and 5 years (Tangri 2016 meta-analysis recalibration).
BASELINE_SURVIVAL: Mapping[Calibration, Mapping[int, float]] = {
    Calibration.NORTH_AMERICAN: {2: 0.9750, 5: 0.9240},
    Calibration.NON_NORTH_AMERICAN: {2: 0.9832, 5: 0.9365},
}

# ln(S0) precomputed: risk = -expm1(exp(X) * ln S0), which equals 1 - S0^exp(X)
# but keeps full precision for the small risks most patients have.
_LN_S0: Mapping[Calibration, tuple[float, float]] = {
    cal: (math.log(s0[2]), math.log(s0[5])) for cal, s0 in BASELINE_SURVIVAL.items()
}


# Positional order is the published API (age, sex, eGFR, UACR, horizon, calibration).
def kfre_4var(  # noqa: PLR0917
    age: float,
    male: bool,
    egfr: float,
    uacr_mg_g: float,
    years: Horizon,
    calibration: Calibration,
) -> float:
    """Probability (0..1) of kidney failure within ``years`` (2 or 5).

    Raises ValueError when age, eGFR or UACR is not a positive finite number,
    when ``years`` is not 2 or 5, or when ``calibration`` is unknown.
    """
    if years not in HORIZONS:
        raise ValueError("years must be 2 or 5")
    ln_s0_2y, ln_s0_5y = _ln_baseline(calibration)
    hazard_ratio = math.exp(_linear_predictor(age, male, egfr, uacr_mg_g, ""))
    return _risk(hazard_ratio, ln_s0_2y if years == 2 else ln_s0_5y)


def kfre_4var_batch(
    ages: Sequence[float],
    males: Sequence[bool],
    egfrs: Sequence[float],
    uacrs: Sequence[float],
    calibration: Calibration,
) -> tuple[list[float], list[float]]:
    """2-year and 5-year risks for a batch of patients (parallel sequences).

    Same rules as :func:`kfre_4var`; a ValueError names the offending row as
    ``egfr[3]`` (never its value) and unequal lengths are refused.
    """
    count = len(ages)
    if not len(males) == len(egfrs) == len(uacrs) == count:
        raise ValueError("ages, males, egfrs and uacrs must have the same length")
    ln_s0_2y, ln_s0_5y = _ln_baseline(calibration)
    risks_2y: list[float] = []
    risks_5y: list[float] = []
    for row in range(count):
        hazard_ratio = math.exp(
            _linear_predictor(ages[row], males[row], egfrs[row], uacrs[row], f"[{row}]")
        )
        risks_2y.append(_risk(hazard_ratio, ln_s0_2y))
        risks_5y.append(_risk(hazard_ratio, ln_s0_5y))
    return risks_2y, risks_5y


def _ln_baseline(calibration: Calibration) -> tuple[float, float]:
    try:
        return _LN_S0[Calibration(calibration)]
    except ValueError:
        allowed = ", ".join(c.value for c in Calibration)
        raise ValueError(f"unknown calibration; expected one of {allowed}") from None


def _linear_predictor(age: float, male: bool, egfr: float, uacr: float, where: str) -> float:
    _require_positive_finite("age" + where, age)
    _require_positive_finite("egfr" + where, egfr)
    _require_positive_finite("uacr" + where, uacr)
    if male not in (True, False):  # also admits 0/1, which compare equal to bool
        raise ValueError(f"male{where} must be a boolean (or 0/1)")
    return (
        BETA_AGE_PER_DECADE * (age / 10.0 - MEAN_AGE_DECADES)
        + BETA_MALE * (float(male) - MEAN_MALE)
        + BETA_EGFR_PER_5 * (egfr / 5.0 - MEAN_EGFR_DIV_5)
        + BETA_LN_UACR * (math.log(uacr) - MEAN_LN_UACR)
    )


def _risk(hazard_ratio: float, ln_s0: float) -> float:
    return -math.expm1(hazard_ratio * ln_s0)


def _require_positive_finite(name: str, value: float) -> None:
    # `nan <= 0` is False, so NaN needs its own check; the value is never echoed.
    if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number")


# ------------------------------------------------------------ 8-variable model

# Coefficients of the 8-variable model (Tangri 2011, table 3 "model 6"), with
# the centring of each term; the 2016 recalibration changed only S0.
KFRE8_BETA: Mapping[str, float] = {
    "age_per_decade": -0.1992,
    "male": 0.1602,
    "egfr_per_5": -0.4919,
    "ln_uacr": 0.3364,
    "albumin": -0.3441,
    "phosphate": 0.2604,
    "bicarbonate": -0.07354,
    "calcium": -0.2228,
}
KFRE8_MEAN_ALBUMIN_G_DL = 3.997
KFRE8_MEAN_PHOSPHATE_MG_DL = 3.916
KFRE8_MEAN_BICARBONATE_MMOL_L = 25.57
KFRE8_MEAN_CALCIUM_MG_DL = 9.355

# Baseline survival of the 8-variable model at 2 and 5 years (Tangri 2016).
KFRE8_BASELINE_SURVIVAL: Mapping[Calibration, Mapping[int, float]] = {
    Calibration.NORTH_AMERICAN: {2: 0.9780, 5: 0.9301},
    Calibration.NON_NORTH_AMERICAN: {2: 0.9827, 5: 0.9245},
}
_KFRE8_LN_S0: Mapping[Calibration, tuple[float, float]] = {
    cal: (math.log(s0[2]), math.log(s0[5])) for cal, s0 in KFRE8_BASELINE_SURVIVAL.items()
}

# Standard atomic weights (IUPAC 2021): 1 mmol/L of calcium is 40.078 mg/L,
# i.e. 4.0078 mg/dL; 1 mmol/L of phosphate (reported as phosphorus) is
# 30.973762 mg/L, i.e. 3.0973762 mg/dL. Rounded clinic factors (4, 3.1) would
# move a risk by up to ~0.1 percentage point at the extremes.
CALCIUM_MG_DL_PER_MMOL_L = 4.0078
PHOSPHATE_MG_DL_PER_MMOL_L = 3.0973762

Analyte = Literal["albumin", "phosphate", "bicarbonate", "calcium"]

# The unit each analyte enters the equation in (UCUM), and the factor from
# every other accepted UCUM unit to it. Bicarbonate is monovalent, so mmol/L
# and meq/L are the same number.
EQUATION_UNITS: Mapping[str, str] = {
    "albumin": "g/dL",
    "phosphate": "mg/dL",
    "bicarbonate": "mmol/L",
    "calcium": "mg/dL",
}
_FACTORS: Mapping[str, Mapping[str, float]] = {
    "albumin": {"g/dL": 1.0, "g/L": 0.1},
    "phosphate": {"mg/dL": 1.0, "mmol/L": PHOSPHATE_MG_DL_PER_MMOL_L},
    "bicarbonate": {"mmol/L": 1.0, "meq/L": 1.0, "mEq/L": 1.0},
    "calcium": {"mg/dL": 1.0, "mmol/L": CALCIUM_MG_DL_PER_MMOL_L},
}


def to_equation_unit(analyte: Analyte, value: float, ucum_unit: str) -> float:
    """``value`` in ``ucum_unit`` expressed in the unit the 8-variable KFRE uses.

    Raises ValueError for an unknown analyte or a unit this analyte cannot be
    converted from (e.g. calcium in g/L); the value is never echoed.
    """
    factors = _FACTORS.get(analyte)
    if factors is None:
        raise ValueError(f"unknown KFRE-8 analyte {analyte!r}")
    factor = factors.get(ucum_unit)
    if factor is None:
        allowed = ", ".join(factors)
        raise ValueError(f"{analyte} in {ucum_unit!r} cannot be used; expected one of {allowed}")
    return value * factor


def from_equation_unit(analyte: Analyte, value: float, ucum_unit: str) -> float:
    """The inverse of :func:`to_equation_unit` (for display and round-trip tests)."""
    return value / to_equation_unit(analyte, 1.0, ucum_unit)


@dataclass(frozen=True, slots=True)
class Kfre8Inputs:
    """One patient's 8-variable inputs, already in the equation's units."""

    age: float  # years
    male: bool
    egfr: float  # mL/min/1.73 m2
    uacr_mg_g: float
    albumin_g_dl: float
    phosphate_mg_dl: float
    bicarbonate_mmol_l: float
    calcium_mg_dl: float


def kfre_8var(inputs: Kfre8Inputs, years: Horizon, calibration: Calibration) -> float:
    """Probability (0..1) of kidney failure within ``years`` by the 8-variable KFRE.

    Raises ValueError when an input is not a positive finite number, when
    ``years`` is not 2 or 5, or when ``calibration`` is unknown.
    """
    if years not in HORIZONS:
        raise ValueError("years must be 2 or 5")
    ln_s0_2y, ln_s0_5y = _kfre8_ln_baseline(calibration)
    hazard_ratio = math.exp(_kfre8_linear_predictor(inputs, ""))
    return _risk(hazard_ratio, ln_s0_2y if years == 2 else ln_s0_5y)


def kfre_8var_batch(
    rows: Sequence[Kfre8Inputs], calibration: Calibration
) -> tuple[list[float], list[float]]:
    """2-year and 5-year 8-variable risks for a batch; errors name the row, not the value."""
    ln_s0_2y, ln_s0_5y = _kfre8_ln_baseline(calibration)
    risks_2y: list[float] = []
    risks_5y: list[float] = []
    for index, row in enumerate(rows):
        hazard_ratio = math.exp(_kfre8_linear_predictor(row, f"[{index}]"))
        risks_2y.append(_risk(hazard_ratio, ln_s0_2y))
        risks_5y.append(_risk(hazard_ratio, ln_s0_5y))
    return risks_2y, risks_5y


def _kfre8_ln_baseline(calibration: Calibration) -> tuple[float, float]:
    try:
        return _KFRE8_LN_S0[Calibration(calibration)]
    except ValueError:
        allowed = ", ".join(c.value for c in Calibration)
        raise ValueError(f"unknown calibration; expected one of {allowed}") from None


_KFRE8_POSITIVE = (
    "age",
    "egfr",
    "uacr_mg_g",
    "albumin_g_dl",
    "phosphate_mg_dl",
    "bicarbonate_mmol_l",
    "calcium_mg_dl",
)


def _kfre8_linear_predictor(row: Kfre8Inputs, where: str) -> float:
    for name in _KFRE8_POSITIVE:
        _require_positive_finite(name + where, getattr(row, name))
    if row.male not in (True, False):
        raise ValueError(f"male{where} must be a boolean (or 0/1)")
    beta = KFRE8_BETA
    return (
        beta["age_per_decade"] * (row.age / 10.0 - MEAN_AGE_DECADES)
        + beta["male"] * (float(row.male) - MEAN_MALE)
        + beta["egfr_per_5"] * (row.egfr / 5.0 - MEAN_EGFR_DIV_5)
        + beta["ln_uacr"] * (math.log(row.uacr_mg_g) - MEAN_LN_UACR)
        + beta["albumin"] * (row.albumin_g_dl - KFRE8_MEAN_ALBUMIN_G_DL)
        + beta["phosphate"] * (row.phosphate_mg_dl - KFRE8_MEAN_PHOSPHATE_MG_DL)
        + beta["bicarbonate"] * (row.bicarbonate_mmol_l - KFRE8_MEAN_BICARBONATE_MMOL_L)
        + beta["calcium"] * (row.calcium_mg_dl - KFRE8_MEAN_CALCIUM_MG_DL)
    )
