"""Assemble the KFRE 4-variable feature record from a patient's state.

A record is anchored at a moment T: the newest observation time among the
facts that triggered it (so a historical backfill builds the history it
describes, not today's view of it). Every feature is the latest fact with
``T - window <= effective <= T``:

* age: from the birth date, at T, in years (days / 365.2425);
* sex: administrative sex M or F (KFRE has no other category);
* eGFR: a reported eGFR when one is in its window; otherwise derived from
  the latest creatinine in its window with CKD-EPI 2021, using age and sex
  at that creatinine's own specimen time;
* UACR in mg/g.

When any feature is missing the result is :class:`NotEnoughData`, naming
each missing feature and why. It is stored on the patient's state and shown
by the HTTP API: a patient without a score always has a visible reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from ehrbridge.config import Mapping
from ehrbridge.mappings.ckd_epi import egfr_ckd_epi_2021
from ehrbridge.pipelines.facts import Fact
from ehrbridge.pipelines.state import PatientState

_DAYS_PER_YEAR = 365.2425
ADULT_AGE = 18.0  # KFRE and CKD-EPI 2021 were developed and validated in adults


@dataclass(frozen=True, slots=True)
class FeatureRecord:
    anchor: datetime
    age: float
    male: bool
    egfr: float
    uacr_mg_g: float
    egfr_method: str  # "reported" or "ckd-epi-2021"
    inputs: tuple[Fact, ...]  # the facts used, for derivedFrom and provenance

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor.isoformat(),
            "age": self.age,
            "male": self.male,
            "egfr": self.egfr,
            "uacr_mg_g": self.uacr_mg_g,
            "egfr_method": self.egfr_method,
            "inputs": [f.to_json() for f in self.inputs],
        }


@dataclass(frozen=True, slots=True)
class NotEnoughData:
    anchor: datetime
    missing: dict[str, str]  # feature -> why it is missing

    @property
    def reason(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self.missing.items()))

    def to_json(self) -> dict[str, Any]:
        return {"anchor": self.anchor.isoformat(), "not_enough_data": self.missing}


def age_at(birth_date: date, moment: datetime) -> float:
    return (moment.date() - birth_date).days / _DAYS_PER_YEAR


def latest_in_window(facts: list[Fact], anchor: datetime, window_days: float) -> Fact | None:
    earliest = anchor - timedelta(days=window_days)
    for fact in reversed(facts):  # facts are sorted by effective time
        if earliest <= fact.effective <= anchor:
            return fact
    return None


def assemble(
    state: PatientState, anchor: datetime, mapping: Mapping
) -> FeatureRecord | NotEnoughData:
    missing: dict[str, str] = {}
    age = _age(state, anchor, missing)
    male = _male(state, missing)
    uacr = _windowed(state, "uacr", anchor, mapping, missing)
    egfr, method, egfr_inputs = _egfr(state, anchor, mapping, missing)
    if missing or age is None or male is None or uacr is None or egfr is None:
        return NotEnoughData(anchor, missing)
    return FeatureRecord(
        anchor=anchor,
        age=age,
        male=male,
        egfr=egfr,
        uacr_mg_g=uacr.value,
        egfr_method=method,
        inputs=(*egfr_inputs, uacr),
    )


def _age(state: PatientState, anchor: datetime, missing: dict[str, str]) -> float | None:
    if state.birth_date is None:
        missing["age"] = "no birth date (PID-7) received"
        return None
    age = age_at(state.birth_date, anchor)
    if age < ADULT_AGE:
        missing["age"] = f"patient is under {ADULT_AGE:g}; KFRE applies to adults"
        return None
    return age


def _male(state: PatientState, missing: dict[str, str]) -> bool | None:
    if state.sex in ("M", "F"):
        return state.sex == "M"
    missing["sex"] = (
        f"administrative sex is {state.sex!r}; KFRE needs M or F"
        if state.sex
        else "no administrative sex (PID-8) received"
    )
    return None


def _windowed(
    state: PatientState, feature: str, anchor: datetime, mapping: Mapping, missing: dict[str, str]
) -> Fact | None:
    rule = mapping.features.get(feature)  # type: ignore[call-overload]
    if rule is None:
        missing[feature] = "not mapped for this site"
        return None
    fact = latest_in_window(state.facts.get(feature, []), anchor, rule.window_days)
    if fact is None:
        missing[feature] = (
            f"no {feature} result in the {rule.window_days:g} days up to {anchor.date()}"
        )
    return fact


def _egfr(
    state: PatientState, anchor: datetime, mapping: Mapping, missing: dict[str, str]
) -> tuple[float | None, str, tuple[Fact, ...]]:
    local: dict[str, str] = {}
    if "egfr" in mapping.features:
        reported = _windowed(state, "egfr", anchor, mapping, local)
        if reported is not None:
            return reported.value, "reported", (reported,)
    if "creatinine" in mapping.features:
        creatinine = _windowed(state, "creatinine", anchor, mapping, local)
        derived = _derive_egfr(state, creatinine, local)
        if derived is not None and creatinine is not None:
            return derived, "ckd-epi-2021", (creatinine,)
    missing["egfr"] = "; ".join(local.values()) or "neither eGFR nor creatinine is mapped"
    return None, "", ()


def _derive_egfr(
    state: PatientState, creatinine: Fact | None, missing: dict[str, str]
) -> float | None:
    if creatinine is None:
        return None
    if state.birth_date is None or state.sex not in ("M", "F"):
        missing["creatinine"] = "cannot give eGFR without a birth date and sex M or F"
        return None
    age = age_at(state.birth_date, creatinine.effective)
    if age < ADULT_AGE:
        missing["creatinine"] = "cannot give eGFR: CKD-EPI 2021 applies to adults"
        return None
    return egfr_ckd_epi_2021(creatinine.value, age, female=state.sex == "F")
