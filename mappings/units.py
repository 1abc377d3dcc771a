"""What ehrbridge knows about the units labs use for each feature.

The mapping states every conversion factor explicitly (``umol/L: {divide:
88.4}``); this table exists so that ``ehrbridge mappings check`` can verify
those factors instead of trusting them, and can say *why* a unit cannot be
converted (``mmol/L`` is a concentration, a UACR is a ratio).

Factors are "multiply a value in this unit by the factor to get the
feature's canonical unit":

* creatinine, canonical mg/dL: molar mass 113.12 g/mol, so
  1 mg/dL = 88.4 umol/L (the factor every lab and KDIGO use);
* UACR, canonical mg/g: 1 mmol creatinine = 113.12 mg, so
  1 mg/mmol = 8.84 mg/g;
* eGFR, canonical mL/min/{1.73_m2}: 1 mL/s/1.73 m2 = 60 mL/min/1.73 m2.
  ``mL/min`` (a clearance *not* indexed to body surface area) is a different
  quantity; a site that labels indexed eGFR as ``mL/min`` must say so with
  ``accept_as``.

The four serum analytes the 8-variable KFRE adds (Tangri 2011) are canonical
in US conventional units, the units the equation is centred in:

* albumin, canonical g/dL: 1 g/L = 0.1 g/dL (albumin is reported by mass;
  a molar albumin concentration is not something labs print);
* phosphate (reported as phosphorus), canonical mg/dL: P = 30.973762 g/mol,
  so 1 mmol/L = 30.97 mg/L = 3.097 mg/dL;
* bicarbonate, canonical mmol/L: a monovalent ion, so 1 mEq/L = 1 mmol/L;
* total calcium, canonical mg/dL: Ca = 40.078 g/mol, so 1 mmol/L = 4.008
  mg/dL; divalent, so 1 mEq/L = 0.5 mmol/L = 2.004 mg/dL.

Molar masses are IUPAC standard atomic weights; the rounded clinic factors
(4, 3.1) are within the lint's 1 % tolerance, a swapped factor is not.

Units compare the way labs write them: µ/μ as u, case-insensitive, trimmed,
inner spaces removed (:func:`normalise_unit`).
"""

from __future__ import annotations

from dataclasses import dataclass

CREATININE_MG_PER_MMOL = 113.12
_UMOL_PER_MG_DL = 88.4  # umol/L per mg/dL
_MG_G_PER_MG_MMOL = 8.84
CALCIUM_G_PER_MOL = 40.078  # IUPAC standard atomic weight of Ca
PHOSPHORUS_G_PER_MOL = 30.973762  # of P: serum phosphate is reported as phosphorus
# mg/dL per mmol/L = (g/mol = mg/mmol) / (10 dL per L): 4.0078 and 3.0973762.
CALCIUM_MG_DL_PER_MMOL_L = CALCIUM_G_PER_MOL / 10
PHOSPHATE_MG_DL_PER_MMOL_L = PHOSPHORUS_G_PER_MOL / 10


def normalise_unit(unit: str) -> str:
    """Compare units the way labs write them: µ/μ as u, case-insensitive, trimmed.

    UCUM is case-sensitive in principle, but senders write ``umol/l`` and
    ``mg/dl``; no unit we map differs from another only by case.
    """
    return unit.strip().replace("µ", "u").replace("μ", "u").casefold()


def _key(unit: str) -> str:
    return normalise_unit(unit).replace(" ", "")


@dataclass(frozen=True, slots=True)
class KnownUnit:
    dimension: str
    factor: float | None = None  # to the feature's canonical unit; None: not convertible


_MASS_CONC = "mass concentration"
_SUBSTANCE_CONC = "substance concentration"
_CHARGE_CONC = "charge concentration"  # mEq/L: mmol/L times the ion's charge
_MASS_RATIO = "mass ratio (per g creatinine)"
_SUBSTANCE_RATIO = "mass per substance ratio (per mmol creatinine)"
_INDEXED_RATE = "flow rate per 1.73 m2 body surface area"
_RATE = "flow rate, not indexed to body surface area"
_EXCRETION = "excretion rate"

_CREATININE = {
    "mg/dl": KnownUnit(_MASS_CONC, 1.0),
    "mg/l": KnownUnit(_MASS_CONC, 0.1),
    "g/l": KnownUnit(_MASS_CONC, 100.0),
    "ug/ml": KnownUnit(_MASS_CONC, 0.1),
    "umol/l": KnownUnit(_SUBSTANCE_CONC, 1 / _UMOL_PER_MG_DL),
    "mmol/l": KnownUnit(_SUBSTANCE_CONC, 1000 / _UMOL_PER_MG_DL),
    "mg/g": KnownUnit(_MASS_RATIO),
    "mg/mmol": KnownUnit(_SUBSTANCE_RATIO),
    "ml/min": KnownUnit(_RATE),
    "ml/min/{1.73_m2}": KnownUnit(_INDEXED_RATE),
    "mg/24h": KnownUnit(_EXCRETION),
}

_EGFR = {
    "ml/min/{1.73_m2}": KnownUnit(_INDEXED_RATE, 1.0),
    "ml/min/1.73_m2": KnownUnit(_INDEXED_RATE, 1.0),
    "ml/min/1.73m2": KnownUnit(_INDEXED_RATE, 1.0),
    "ml/min/{1.73m2}": KnownUnit(_INDEXED_RATE, 1.0),
    "ml/min/1.73m^2": KnownUnit(_INDEXED_RATE, 1.0),
    "ml/min/1.73m²": KnownUnit(_INDEXED_RATE, 1.0),
    "ml/min/1.73": KnownUnit(_INDEXED_RATE, 1.0),
    "ml/s/{1.73_m2}": KnownUnit(_INDEXED_RATE, 60.0),
    "ml/s/1.73m2": KnownUnit(_INDEXED_RATE, 60.0),
    "ml/min": KnownUnit(_RATE),
    "ml/s": KnownUnit(_RATE),
    "mg/dl": KnownUnit(_MASS_CONC),
    "umol/l": KnownUnit(_SUBSTANCE_CONC),
    "mmol/l": KnownUnit(_SUBSTANCE_CONC),
}

_UACR = {
    "mg/g": KnownUnit(_MASS_RATIO, 1.0),
    "mg/g{creat}": KnownUnit(_MASS_RATIO, 1.0),
    "mg/g{cre}": KnownUnit(_MASS_RATIO, 1.0),
    "mg/gcreat": KnownUnit(_MASS_RATIO, 1.0),
    "ug/mg": KnownUnit(_MASS_RATIO, 1.0),
    "ug/mg{creat}": KnownUnit(_MASS_RATIO, 1.0),
    "g/g": KnownUnit(_MASS_RATIO, 1000.0),
    "mg/mg": KnownUnit(_MASS_RATIO, 1000.0),
    "mg/mmol": KnownUnit(_SUBSTANCE_RATIO, _MG_G_PER_MG_MMOL),
    "mg/mmol{creat}": KnownUnit(_SUBSTANCE_RATIO, _MG_G_PER_MG_MMOL),
    "mg/mmolcreat": KnownUnit(_SUBSTANCE_RATIO, _MG_G_PER_MG_MMOL),
    "g/mol": KnownUnit(_SUBSTANCE_RATIO, _MG_G_PER_MG_MMOL),
    "g/mol{creat}": KnownUnit(_SUBSTANCE_RATIO, _MG_G_PER_MG_MMOL),
    "mg/l": KnownUnit(_MASS_CONC),
    "mg/dl": KnownUnit(_MASS_CONC),
    "mmol/l": KnownUnit(_SUBSTANCE_CONC),
    "umol/l": KnownUnit(_SUBSTANCE_CONC),
    "mg/24h": KnownUnit(_EXCRETION),
    "mg/d": KnownUnit(_EXCRETION),
}

_ALBUMIN = {
    "g/dl": KnownUnit(_MASS_CONC, 1.0),
    "g/l": KnownUnit(_MASS_CONC, 0.1),
    "mg/dl": KnownUnit(_MASS_CONC, 0.001),
    "umol/l": KnownUnit(_SUBSTANCE_CONC),  # needs albumin's 66.5 kDa: no lab reports it
}

_PHOSPHATE = {
    "mg/dl": KnownUnit(_MASS_CONC, 1.0),
    "mg/l": KnownUnit(_MASS_CONC, 0.1),
    "mmol/l": KnownUnit(_SUBSTANCE_CONC, PHOSPHATE_MG_DL_PER_MMOL_L),
    # Phosphate's charge depends on pH (HPO4 2-, H2PO4 -): no fixed mEq factor.
    "meq/l": KnownUnit(_CHARGE_CONC + ", pH-dependent for phosphate"),
}

_BICARBONATE = {
    "mmol/l": KnownUnit(_SUBSTANCE_CONC, 1.0),
    "meq/l": KnownUnit(_CHARGE_CONC, 1.0),  # HCO3-: one charge per ion
    "mg/dl": KnownUnit(_MASS_CONC),
}

_CALCIUM = {
    "mg/dl": KnownUnit(_MASS_CONC, 1.0),
    "mg/l": KnownUnit(_MASS_CONC, 0.1),
    "mmol/l": KnownUnit(_SUBSTANCE_CONC, CALCIUM_MG_DL_PER_MMOL_L),
    "meq/l": KnownUnit(_CHARGE_CONC, CALCIUM_MG_DL_PER_MMOL_L / 2),  # Ca2+: two per ion
}

KNOWN_UNITS: dict[str, dict[str, KnownUnit]] = {
    "creatinine": _CREATININE,
    "egfr": _EGFR,
    "uacr": _UACR,
    "albumin": _ALBUMIN,
    "phosphate": _PHOSPHATE,
    "bicarbonate": _BICARBONATE,
    "calcium": _CALCIUM,
}


def known_unit(feature: str, unit: str) -> KnownUnit | None:
    """What ehrbridge knows about ``unit`` as a unit of ``feature`` (None: nothing)."""
    return KNOWN_UNITS.get(feature, {}).get(_key(unit))


def same_unit(a: str, b: str) -> bool:
    """True when two spellings name the same unit (``mL/min/1.73m2`` and ``mL/min/{1.73_m2}``)."""
    if _key(a) == _key(b):
        return True
    for table in KNOWN_UNITS.values():
        ka, kb = table.get(_key(a)), table.get(_key(b))
        if ka and kb and ka.dimension == kb.dimension and ka.factor and ka.factor == kb.factor:
            return True
    return False


def describe_factor(factor: float) -> str:
    """``× 8.84`` or ``÷ 88.4``: whichever reads as the published number."""
    if factor >= 1:
        return f"× {factor:.6g}"
    return f"÷ {1 / factor:.6g}"
