"""Assemble a feature record -- the values a model is sent -- from a patient's state.

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
* every other mapped lab feature (UACR in mg/g, albumin, ...) in its
  canonical unit;
* an aggregate (``egfr_slope``: min, max, mean, count or slope per year of
  one lab feature's results in a window), declared by a model file input's
  ``aggregate`` (``pipelines/aggregates.py``);
  it rests on every result it was computed from (``inputs``, ``aggregated``).

One record holds every feature the site's models need, computed once per
message; each model is sent its own inputs (:meth:`FeatureRecord.only`).

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from ehrbridge.core.contracts import utcnow
from ehrbridge.mappings.ckd_epi import egfr_ckd_epi_2021
from ehrbridge.mappings.schema import (
    DERIVED_FROM,
    LEGACY_RECORD_KEYS,
    Aggregate,
    DomainRule,
    Mapping,
)
from ehrbridge.pipelines.aggregates import Aggregated, aggregate
from ehrbridge.pipelines.domain import OutOfDomain, check_domain
from ehrbridge.pipelines.facts import IMPLAUSIBLE, Fact, PatientExtract
from ehrbridge.pipelines.state import PatientState

_DAYS_PER_YEAR = 365.2425
ADULT_AGE = 18.0  # CKD-EPI 2021 was developed in adults (the model's own domain is data)


@dataclass(frozen=True, slots=True)
class FeatureRecord:
    """The values a model is sent, by feature name, and where each came from.

    ``values`` holds each feature in its canonical unit (``mappings/schema.py``;
    ``sex`` is 1 for male, 0 for female); which features a model takes, and
    under which names it is sent them, is the model file's business.
    """

    anchor: datetime
    values: dict[str, float]
    inputs: tuple[Fact, ...]  # the facts used, for derivedFrom and provenance
    episode: str = ""  # the debounce episode: one prediction identity per episode
    # How a feature was obtained when it was not read as reported ("ckd-epi-2021").
    methods: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # feature -> ref of its fact
    # An aggregate -> the refs of every fact it was computed from, oldest first.
    aggregated: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def method(self, name: str) -> str:
        return self.methods.get(name, "reported")

    def source(self, name: str) -> Fact | None:
        """The fact a value rests on (a creatinine for a derived eGFR), if any."""
        ref = self.sources.get(name)
        return next((f for f in self.inputs if f.ref == ref), None) if ref else None

    def only(self, names: Iterable[str]) -> FeatureRecord:
        """The record restricted to ``names`` (one model's inputs), with their facts."""
        kept = [n for n in names if n in self.values]
        refs = {self.sources[n] for n in kept if n in self.sources}
        refs.update(r for n in kept for r in self.aggregated.get(n, ()))
        return FeatureRecord(
            self.anchor,
            {n: self.values[n] for n in kept},
            tuple(f for f in self.inputs if f.ref in refs),
            self.episode,
            {n: m for n, m in self.methods.items() if n in kept},
            {n: r for n, r in self.sources.items() if n in kept},
            {n: r for n, r in self.aggregated.items() if n in kept},
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "anchor": self.anchor.isoformat(),
            "values": self.values,
            "methods": self.methods,
            "sources": self.sources,
            "inputs": [f.to_json() for f in self.inputs],
            "episode": self.episode,
        }
        if self.aggregated:  # absent without aggregates: such records are as they were
            data["aggregated"] = {n: list(refs) for n, refs in self.aggregated.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureRecord:
        inputs = tuple(Fact.from_json(i) for i in data.get("inputs", ()))
        if "values" in data:
            return cls(
                datetime.fromisoformat(data["anchor"]),
                dict(data["values"]),
                inputs,
                data.get("episode", ""),
                dict(data.get("methods", {})),
                dict(data.get("sources", {})),
                {n: tuple(r) for n, r in data.get("aggregated", {}).items()},
            )
        return _legacy_record(data, inputs)


def _legacy_record(data: dict[str, Any], inputs: tuple[Fact, ...]) -> FeatureRecord:
    """A record written before records were generic: each value under its own key."""
    values = {
        LEGACY_RECORD_KEYS.get(k, k): float(v)
        for k, v in data.items()
        if isinstance(v, int | float) and k not in ("anchor", "episode")
    }
    methods = {
        k.removesuffix("_method"): str(v)
        for k, v in data.items()
        if k.endswith("_method") and v != "reported"
    }
    sources = {
        name: fact.ref
        for fact in inputs
        for name in [_legacy_source_of(fact.feature, methods)]
        if name in values
    }
    episode = str(data.get("episode", ""))
    anchor = datetime.fromisoformat(data["anchor"])
    return FeatureRecord(anchor, values, inputs, episode, methods, sources)


def _legacy_source_of(feature: str, methods: dict[str, str]) -> str:
    derived = [name for name in methods if DERIVED_FROM.get(name) == feature]
    return derived[0] if derived else feature


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


@dataclass(slots=True)
class _Found:
    """What assembly found so far: values, how and from which fact, and what is missing."""

    values: dict[str, float] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Fact] = field(default_factory=dict)  # feature -> the fact it rests on
    missing: dict[str, str] = field(default_factory=dict)
    aggregated: dict[str, tuple[Fact, ...]] = field(default_factory=dict)

    def add(self, name: str, value: float, fact: Fact | None = None, method: str = "") -> None:
        self.values[name] = value
        if fact is not None:
            self.facts[name] = fact
        if method:
            self.methods[name] = method


def assemble(
    state: PatientState,
    anchor: datetime,
    mapping: Mapping,
    episode: str = "",
    needed: Iterable[str] | None = None,
    *,
    aggregates: dict[str, Aggregate] | None = None,
) -> FeatureRecord | NotEnoughData:
    """The record of ``needed`` (default: the mapping's model's inputs), or what is missing."""
    wanted = tuple(needed if needed is not None else mapping.spec.inputs)
    return _record(_find_all(state, anchor, mapping, aggregates), wanted, anchor, episode)


def _find_all(
    state: PatientState,
    anchor: datetime,
    mapping: Mapping,
    aggregates: dict[str, Aggregate] | None = None,
) -> _Found:
    """Every feature the site maps, and each model's aggregates, once, whichever model takes it."""
    found = _Found()
    _age(state, anchor, found)
    _sex(state, found)
    _egfr(state, anchor, mapping, found)
    for feature in mapping.features:
        if feature not in found.values and feature not in DERIVED_FROM.values():
            fact = _windowed(state, feature, anchor, mapping, found.missing)
            if fact is not None:
                found.add(feature, fact.value, fact)
    for name, rule in (aggregates or {}).items():
        _aggregate(state, anchor, mapping, found, name=name, rule=rule)
    return found


def _aggregate(
    state: PatientState,
    anchor: datetime,
    mapping: Mapping,
    found: _Found,
    *,
    name: str,
    rule: Aggregate,
) -> None:
    mapped = mapping.features.get(rule.of)
    if mapped is None:
        found.missing[name] = f"{rule.of} is not mapped for this site"
        return
    window = rule.window_days or mapped.window_days or 0.0
    result = aggregate(rule, state.facts.get(rule.of, []), anchor, window)
    if isinstance(result, Aggregated):
        found.add(name, result.value, method=f"{rule.aggregation} of {rule.of}, {window:g} days")
        found.aggregated[name] = result.facts
    else:
        found.missing[name] = result


def _record(
    found: _Found, wanted: tuple[str, ...], anchor: datetime, episode: str
) -> FeatureRecord | NotEnoughData:
    """One model's record from what was found: its inputs, and only their facts."""
    missing = {n: found.missing.get(n, "not mapped for this site") for n in wanted}
    missing = {n: why for n, why in missing.items() if n not in found.values}
    if missing:
        return NotEnoughData(anchor, missing, episode)
    facts = [found.facts[n] for n in wanted if n in found.facts]
    facts += [f for n in wanted for f in found.aggregated.get(n, ())]
    return FeatureRecord(
        anchor=anchor,
        values={n: found.values[n] for n in wanted},
        inputs=tuple(dict.fromkeys(facts)),
        episode=episode,
        methods={n: m for n, m in found.methods.items() if n in wanted},
        sources={n: f.ref for n, f in found.facts.items() if n in wanted},
        aggregated={
            n: tuple(f.ref for f in found.aggregated[n]) for n in wanted if n in found.aggregated
        },
    )


def _age(state: PatientState, anchor: datetime, found: _Found) -> None:
    if state.birth_date is None:
        found.missing["age"] = "no birth date received"
        return
    # An age the model does not take is the domain's question: pipelines/domain.py.
    found.add("age", age_at(state.birth_date, anchor))


def _sex(state: PatientState, found: _Found) -> None:
    if state.sex in ("M", "F"):
        found.add("sex", 1.0 if state.sex == "M" else 0.0)
        return
    found.missing["sex"] = (
        f"administrative sex is {state.sex!r}; KFRE needs M or F"
        if state.sex
        else "no administrative sex received"
    )


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


def _egfr(state: PatientState, anchor: datetime, mapping: Mapping, found: _Found) -> None:
    local: dict[str, str] = {}
    derivation = mapping.egfr_derivation()
    reported_first = derivation is None or derivation.prefer == "reported"
    if reported_first and "egfr" in mapping.features:
        reported = _windowed(state, "egfr", anchor, mapping, local)
        if reported is not None:
            return found.add("egfr", reported.value, reported)
    if derivation is not None:
        creatinine = _windowed(state, "creatinine", anchor, mapping, local)
        derived = _derive_egfr(state, creatinine, local)
        if derived is not None and creatinine is not None:
            return found.add("egfr", derived, creatinine, "ckd-epi-2021")
    if not reported_first and "egfr" in mapping.features:
        reported = _windowed(state, "egfr", anchor, mapping, local)
        if reported is not None:
            return found.add("egfr", reported.value, reported)
    found.missing["egfr"] = "; ".join(local.values()) or "neither eGFR nor creatinine is mapped"
    return None


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


Outcome = FeatureRecord | NotEnoughData | OutOfDomain


@dataclass(frozen=True, slots=True)
class ModelNeeds:
    """What one model takes from a record, and the domain it is scored in."""

    inputs: tuple[str, ...]
    domain: tuple[DomainRule, ...]
    name: str = ""  # the model's name, when a site runs several
    # Aggregates its model file declares on its inputs (``egfr_slope``), by name.
    aggregates: dict[str, Aggregate] = field(default_factory=dict)


def evaluate(
    state: PatientState,
    patient: PatientExtract,
    mapping: Mapping,
    now: datetime | None = None,
    needed: Iterable[str] | None = None,
) -> Outcome | None:
    """Merge one message's data for one patient; the record it triggers, if any.

    The one place the pipeline (``pipelines/process.py``) and the mapping
    tests (``workbench/testing.py``) decide a prediction, so a passing mapping
    test means the pipeline does the same. Only a :class:`FeatureRecord` is
    scored: one outside the model's domain becomes :class:`OutOfDomain`. The
    outcome is kept on the state (``last_outcome``), where the HTTP API shows it.
    ``now`` is the processing time (default: the clock); ``needed`` the model's
    inputs (default: those of the mapping's model).
    """
    wanted = tuple(needed if needed is not None else mapping.spec.inputs)
    outcomes = evaluate_each(state, patient, mapping, [ModelNeeds(wanted, mapping.domain)], now)
    return outcomes[0] if outcomes else None


def evaluate_each(
    state: PatientState,
    patient: PatientExtract,
    mapping: Mapping,
    models: Sequence[ModelNeeds],
    now: datetime | None = None,
) -> list[Outcome] | None:
    """:func:`evaluate` for each of a site's models; features are computed once for all.

    The first model's outcome is the one kept on the state (``last_outcome``);
    with several models, each one's is also kept under ``last_outcome["models"]``.
    """
    state.merge(patient)
    trigger = trigger_for(state, patient, mapping, now)
    if trigger is None:
        return None
    declared = {name: rule for model in models for name, rule in model.aggregates.items()}
    found = _find_all(state, trigger.anchor, mapping, declared)
    outcomes: list[Outcome] = []
    for model in models:
        result: Outcome = _record(found, model.inputs, trigger.anchor, trigger.episode)
        if isinstance(result, FeatureRecord):
            result = check_domain(result, model.domain) or result
        outcomes.append(result)
    state.last_outcome = outcomes[0].to_json()
    if len(models) > 1:
        each = {m.name: o.to_json() for m, o in zip(models, outcomes, strict=True)}
        state.last_outcome["models"] = each
    return outcomes
