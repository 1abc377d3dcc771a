"""Estimated GFR from serum creatinine: the CKD-EPI 2021 race-free equation.

Reference: Inker LA, Eneanya ND, Coresh J, et al. New creatinine- and
cystatin C-based equations to estimate GFR without race. N Engl J Med
2021;385(19):1737-1749. doi:10.1056/NEJMoa2102953 (the "CKD-EPI 2021" refit)::

    eGFR = 142 x min(Scr/k, 1)^a x max(Scr/k, 1)^-1.200 x 0.9938^age x 1.012 [if female]

    k = 0.7 (female) / 0.9 (male)      a = -0.241 (female) / -0.302 (male)

with Scr in mg/dL and eGFR in mL/min/1.73 m2. Results belong under LOINC
98979-8 (creatinine-based eGFR, CKD-EPI 2021). The older CKD-EPI 2009 equation
(141 x ... x 0.993^age x 1.018 [female], with a race term) is deliberately *not*
implemented: it gives different numbers for the same patient.

The equation was derived and validated in adults only, so ages below 18 years
are refused rather than extrapolated (children need the CKiD/Schwartz
equations). Values are returned unrounded; rounding is a display concern.
"""

from __future__ import annotations

import math

# 1 mg/dL creatinine = 88.4 umol/L (molar mass of creatinine 113.12 g/mol).
CREATININE_UMOL_PER_MG_DL = 88.4

ADULT_AGE_YEARS = 18.0

_SCALE = 142.0
_FEMALE_FACTOR = 1.012
_AGE_BASE = 0.9938
_HIGH_EXPONENT = -1.200
_KAPPA_FEMALE, _KAPPA_MALE = 0.7, 0.9
_ALPHA_FEMALE, _ALPHA_MALE = -0.241, -0.302


def creatinine_umol_l_to_mg_dl(x: float) -> float:
    """Convert a serum creatinine from umol/L (SI, most of the world) to mg/dL.

    Raises ValueError for a non-positive or non-finite value: a creatinine of
    zero or below is a data error, never a measurement.
    """
    _require_positive_finite("creatinine", x)
    return x / CREATININE_UMOL_PER_MG_DL


def egfr_ckd_epi_2021(creatinine_mg_dl: float, age_years: float, female: bool) -> float:
    """CKD-EPI 2021 race-free eGFR in mL/min/1.73 m2, unrounded.

    ``creatinine_mg_dl`` is serum creatinine in mg/dL (convert umol/L with
    :func:`creatinine_umol_l_to_mg_dl`). Raises ValueError when creatinine is
    not a positive finite number or the patient is younger than 18 years (or
    the age is not finite): the equation is only valid for adults.
    """
    _require_positive_finite("creatinine", creatinine_mg_dl)
    if not math.isfinite(age_years) or age_years < ADULT_AGE_YEARS:
        raise ValueError("CKD-EPI 2021 is defined for adults: age must be a finite number >= 18")
    kappa = _KAPPA_FEMALE if female else _KAPPA_MALE
    alpha = _ALPHA_FEMALE if female else _ALPHA_MALE
    ratio = creatinine_mg_dl / kappa
    egfr = (
        _SCALE
        * math.pow(min(ratio, 1.0), alpha)
        * math.pow(max(ratio, 1.0), _HIGH_EXPONENT)
        * math.pow(_AGE_BASE, age_years)
    )
    return egfr * _FEMALE_FACTOR if female else egfr


def _require_positive_finite(name: str, value: float) -> None:
    # `nan <= 0` is False, so NaN needs its own check.
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number")
