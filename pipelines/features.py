"""Assemble the KFRE 4-variable feature record from a patient's state.

A record is anchored at a moment T (see :func:`trigger_for`): the newest
result time of the triggering *episode*, so a historical backfill builds the
history it describes, not today's view of it. Every feature is the latest
usable fact with ``T - window <= effective <= T``:

* age: from the birth date, at T, in years (days / 365.2425);
* sex: administrative sex M or F (KFRE has no other category);
* eGFR: with ``derived.egfr.prefer: reported`` (default) a reported eGFR in
  its window, otherwise derived from the latest creatinine in its window with
  CKD-EPI 2021, using age and sex at that creatinine's own specimen time;
  ``prefer: derived`` derives whenever a creatinine is in its window;
* UACR in mg/g.

"Usable" skips flagged facts (implausible values, withdrawal markers) and
results withdrawn by a marker with the same code and time; among results of
the same time, one in a proper unit wins over one accepted under another
label (``accept_as``).

When any feature is missing the result is :class:`NotEnoughData`, naming
each missing feature and why; a complete record outside the model's
validated domain (``pipelines/domain.py``: adults, eGFR < 60 for KFRE) is
:class:`~ehrbridge.pipelines.domain.OutOfDomain`. Either is stored on the
patient's state and shown by the HTTP API: a patient without a score always
has a visible reason.

No result timed later than the moment of processing (plus the site's
``values.future_tolerance_s``) triggers, anchors or feeds a record, even one
already in the state from a log written before ingest refused such results:
a result dated 3000-01-01 would otherwise be every later record's "latest".

Triggers and debounce (:func:`trigger_for`): a message triggers a prediction
when it carries a usable result of a trigger feature. Its results belong to an
*episode* -- the visit or order number when the mapping names a field
(``triggers.debounce: PV1-19``), else the calendar day of the result in the
site's time zone. All messages of one episode produce the *same* prediction
identity (:attr:`FeatureRecord.episode`), anchored at the newest trigger
result of the episode in the state, so a panel split over several messages
ends as one Observation, updated as each part arrives, whatever order the parts
come in. Nothing else depends on the wall clock, so a replay gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from ehrbridge.core.contracts import utcnow
from ehrbridge.mappings.ckd_epi import egfr_ckd_epi_2021
from ehrbridge.mappings.schema import Mapping
from ehrbridge.pipelines.domain import OutOfDomain, check_domain
from ehrbridge.pipelines.facts import IMPLAUSIBLE, Fact, PatientExtract
from ehrbridge.pipelines.state import PatientState

_DAYS_PER_YEAR = 365.2425
ADULT_AGE = 18.0  # CKD-EPI 2021 was developed in adults (the model's own domain is data)


@dataclass(frozen=True, slots=True)
class FeatureRecord:
    anchor: datetime
    age: float
    male: bool
    egfr: float
    uacr_mg_g: float
    egfr_method: str  # "reported" or "ckd-epi-2021"
    inputs: tuple[Fact, ...]  # the facts used, for derivedFrom and provenance
    episode: str = ""  # the debounce episode: one prediction identity per episode

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor.isoformat(),
            "age": self.age,
            "male": self.male,
            "egfr": self.egfr,
            "uacr_mg_g": self.uacr_mg_g,
            "egfr_method": self.egfr_method,
            "inputs": [f.to_json() for f in self.inputs],
            "episode": self.episode,
        }


@dataclass(frozen=True, slots=True)
class NotEnoughData:
    anchor: datetime
    missing: dict[str, str]  # feature -> why it is missing
    episode: str = ""

    @property
    def reason(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self.missing.items()))

    def to_json(self) -> dict[str, Any]:
        return {"anchor": self.anchor.isoformat(), "not_enough_data": self.missing}


@dataclass(frozen=True, slots=True)
class Trigger:
    """A prediction to make: the record's anchor and the episode it belongs to."""

    anchor: datetime
    episode: str


def age_at(birth_date: date, moment: datetime) -> float:
    return (moment.date() - birth_date).days / _DAYS_PER_YEAR


def episode_of(fact: Fact, tz: tzinfo) -> str:
    """The debounce key: the visit/order number read from the message, else the day."""
    if fact.episode:
        return f"visit {fact.episode}"
    return f"day {fact.effective.astimezone(tz).date().isoformat()}"


def trigger_for(
    state: PatientState, patient: PatientExtract, mapping: Mapping, now: datetime | None = None
) -> Trigger | None:
    """Whether this message's results trigger a prediction, and for which episode.

    Call after merging ``patient`` into ``state``. Decided from the message's
    own results (not from what was new to the state), so that re-processing a
    message after a crash makes the prediction it may not have delivered.
    Results timed after ``now`` (plus the tolerance) neither trigger nor anchor.
    """
    wanted = mapping.trigger_features
    latest = (now or utcnow()) + mapping.values.future_tolerance

    def counts(fact: Fact) -> bool:
        return not fact.flag.startswith(IMPLAUSIBLE) and fact.effective <= latest

    own = [f for f in patient.facts if f.feature in wanted and counts(f)]
    if not own:
        return None  # demographics only (ADT), nothing mapped, only implausible or future
    tz = mapping.tz
    newest = max(own, key=lambda f: (f.effective, f.ref))
    episode = episode_of(newest, tz)
    anchor = max(
        (
            f.effective
            for feature in wanted
            for f in state.facts.get(feature, ())
            if counts(f) and episode_of(f, tz) == episode
        ),
        default=newest.effective,
    )
    return Trigger(max(anchor, newest.effective), episode)


def latest_in_window(facts: list[Fact], anchor: datetime, window_days: float) -> Fact | None:
    """The newest usable fact with ``anchor - window <= effective <= anchor``.

    ``facts`` are sorted by effective time. Flagged facts are skipped, and so
    are results withdrawn by a marker with the same code and time; at equal
    times a value in a proper unit (rank 0) wins over an ``accept_as`` one.
    """
    earliest = anchor - timedelta(days=window_days)
    withdrawn = {(f.code, f.effective) for f in facts if f.withdraws}
    best: Fact | None = None
    for fact in reversed(facts):
        if fact.effective > anchor:
            continue
        if fact.effective < earliest or (best is not None and fact.effective < best.effective):
            break
        if fact.flag or (withdrawn and (fact.code, fact.effective) in withdrawn):
            continue
        if best is None or fact.rank < best.rank:
            best = fact
    return best


def assemble(
    state: PatientState, anchor: datetime, mapping: Mapping, episode: str = ""
) -> FeatureRecord | NotEnoughData:
    missing: dict[str, str] = {}
    age = _age(state, anchor, missing)
    male = _male(state, missing)
    uacr = _windowed(state, "uacr", anchor, mapping, missing)
    egfr, method, egfr_inputs = _egfr(state, anchor, mapping, missing)
    if missing or age is None or male is None or uacr is None or egfr is None:
        return NotEnoughData(anchor, missing, episode)
    return FeatureRecord(
        anchor=anchor,
        age=age,
        male=male,
        egfr=egfr,
        uacr_mg_g=uacr.value,
        egfr_method=method,
        inputs=(*egfr_inputs, uacr),
        episode=episode,
    )


def _age(state: PatientState, anchor: datetime, missing: dict[str, str]) -> float | None:
    if state.birth_date is None:
        missing["age"] = "no birth date received"
        return None
    return age_at(state.birth_date, anchor)  # an age the model does not take: pipelines/domain.py


def _male(state: PatientState, missing: dict[str, str]) -> bool | None:
    if state.sex in ("M", "F"):
        return state.sex == "M"
    missing["sex"] = (
        f"administrative sex is {state.sex!r}; KFRE needs M or F"
        if state.sex
        else "no administrative sex received"
    )
    return None


def _windowed(
    state: PatientState, feature: str, anchor: datetime, mapping: Mapping, missing: dict[str, str]
) -> Fact | None:
    rule = mapping.features.get(feature)
    if rule is None:
        missing[feature] = "not mapped for this site"
        return None
    window = rule.window_days or 0.0  # the lint refuses a mapping without a window
    facts = state.facts.get(feature, [])
    fact = latest_in_window(facts, anchor, window)
    if fact is None:
        missing[feature] = f"no {feature} result in the {window:g} days up to {anchor.date()}"
        flagged = _flagged_in_window(facts, anchor, window)
        if flagged is not None:
            missing[feature] += f" (the latest is not usable: {flagged.flag})"
    return fact


def _flagged_in_window(facts: list[Fact], anchor: datetime, window_days: float) -> Fact | None:
    earliest = anchor - timedelta(days=window_days)
    for fact in reversed(facts):
        if earliest <= fact.effective <= anchor and fact.flag.startswith(IMPLAUSIBLE):
            return fact
    return None


def _egfr(
    state: PatientState, anchor: datetime, mapping: Mapping, missing: dict[str, str]
) -> tuple[float | None, str, tuple[Fact, ...]]:
    local: dict[str, str] = {}
    derivation = mapping.egfr_derivation()
    reported_first = derivation is None or derivation.prefer == "reported"
    if reported_first and "egfr" in mapping.features:
        reported = _windowed(state, "egfr", anchor, mapping, local)
        if reported is not None:
            return reported.value, "reported", (reported,)
    if derivation is not None:
        creatinine = _windowed(state, "creatinine", anchor, mapping, local)
        derived = _derive_egfr(state, creatinine, local)
        if derived is not None and creatinine is not None:
            return derived, "ckd-epi-2021", (creatinine,)
    if not reported_first and "egfr" in mapping.features:
        reported = _windowed(state, "egfr", anchor, mapping, local)
        if reported is not None:
            return reported.value, "reported", (reported,)
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


def evaluate(
    state: PatientState, patient: PatientExtract, mapping: Mapping, now: datetime | None = None
) -> FeatureRecord | NotEnoughData | OutOfDomain | None:
    """Merge one message's data for one patient; the record it triggers, if any.

    The one place the pipeline (``pipelines/process.py``) and the mapping
    tests (``workbench/testing.py``) decide a prediction, so a passing mapping
    test means the pipeline does the same. Only a :class:`FeatureRecord` is
    scored: one outside the model's domain becomes :class:`OutOfDomain`. The
    outcome is kept on the state (``last_outcome``), where the HTTP API shows it.
    ``now`` is the processing time (default: the clock).
    """
    state.merge(patient)
    trigger = trigger_for(state, patient, mapping, now)
    if trigger is None:
        return None
    result: FeatureRecord | NotEnoughData | OutOfDomain
    result = assemble(state, trigger.anchor, mapping, trigger.episode)
    if isinstance(result, FeatureRecord):
        result = check_domain(result, mapping.domain) or result
    state.last_outcome = result.to_json()
    return result
