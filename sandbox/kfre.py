"""The 4-variable Kidney Failure Risk Equation (KFRE), plain Python.

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
by 0.113, i.e. multiply by 8.84, before calling). The constants live here, in
code, so the product never reads a data file to compute a risk; the test-suite
cross-checks them against the transcription in the shared corpus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
