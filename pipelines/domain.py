"""A model's validated domain: a record outside it gets no score, and a reason.

A risk equation answers only for the patients it was developed and validated
in. KFRE's are adults with CKD G3-G5 (eGFR < 60 mL/min/1.73 m2): for an eGFR
of 146 it still returns a number, about 0 %, and an Observation saying
"0.0 %, Normal" reads as reassurance where the honest answer is "no score".
So a feature record is checked against the domain before the model is asked,
and one outside it becomes :class:`OutOfDomain`: no Observation, no ORU^R01,
no CDS card; the reason is kept on the patient's state (``/api/patients/{id}``)
and counted.

The rules are data, not code: ``mapping.applicability`` (default: the
model's own, ``ModelSpec.applicability`` in ``mappings/schema.py``), each a
comparison of one model input with a number (``age >= 18``, ``egfr < 60``).

Bounded values. Under the ``bound`` comparator policy a result sent as
``<0.2`` is used as 0.2, but all that is known is that it is at most 0.2.
Each rule is therefore tested at both ends of what the input may be (the
bound, and the open end); creatinine bounds give eGFR bounds the other way
round, since CKD-EPI 2021 falls as creatinine rises. A rule that holds at
both ends holds; otherwise the bounded value decided the domain question,
and the record is not scored, with the reason
``<input>_from_bounded_value`` rather than a score resting on a number
nobody measured. A record inside the domain may still use a bounded value
(a UACR of ``<3``): its result then says so (:func:`bounded_note`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ehrbridge.mappings.schema import DomainRule
from ehrbridge.pipelines.facts import Fact

if TYPE_CHECKING:  # features.py calls this module
    from ehrbridge.pipelines.features import FeatureRecord

_SIDE = {"<": "<", "<=": "<", ">": ">", ">=": ">"}  # where the true value may lie
_FLIPPED = {"<": ">", ">": "<"}
_OPEN_END = {"<": -math.inf, ">": math.inf}
_WORDS = {"<": "at most", ">": "at least"}


@dataclass(frozen=True, slots=True)
class OutOfDomain:
    """A record the model must not score, and each rule it breaks (or may break)."""

    anchor: datetime
    reasons: tuple[str, ...]
    episode: str = ""

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"anchor": self.anchor.isoformat(), "out_of_domain": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class Known:
    """What one input is known to be: a value, or a bound and the side the truth is on."""

    value: float
    side: str = ""  # "" exact, "<" at most the value, ">" at least the value
    source: str = ""  # the bounded result it comes from: "creatinine <0.2 mg/dL"

    def verdicts(self, rule: DomainRule) -> set[bool]:
        ends = (self.value, _OPEN_END[self.side]) if self.side else (self.value,)
        return {rule.holds(end) for end in ends}


# Derivations whose result falls as their source rises (CKD-EPI: eGFR as creatinine rises).
_INVERSE_METHODS = frozenset({"ckd-epi-2021"})


def known_inputs(record: FeatureRecord) -> dict[str, Known]:
    """Each numeric model input, with the bound it rests on when a comparator gave it."""
    return {name: _known(record, name, value) for name, value in record.values.items()}


def _known(record: FeatureRecord, name: str, value: float) -> Known:
    fact = record.source(name)
    side = _SIDE.get(fact.comparator, "") if fact is not None else ""
    if not side or fact is None:
        return Known(value)
    if record.method(name) in _INVERSE_METHODS:
        side = _FLIPPED[side]
    return Known(value, side, _shown(fact))


def check_domain(record: FeatureRecord, rules: tuple[DomainRule, ...]) -> OutOfDomain | None:
    """None when every rule holds for whatever the inputs may truly be."""
    inputs = known_inputs(record)
    reasons = [
        reason
        for rule in rules
        if rule.feature in inputs and (reason := _broken(rule, inputs[rule.feature])) is not None
    ]
    return OutOfDomain(record.anchor, tuple(reasons), record.episode) if reasons else None


def _broken(rule: DomainRule, known: Known) -> str | None:
    if rule.on_value_sent:  # a valid range: the value the model would be sent
        return None if rule.holds(known.value) else f"out_of_range: {rule.broken_by(known.value)}"
    verdicts = known.verdicts(rule)
    if verdicts == {True}:
        return None
    if not known.side:
        return f"out_of_domain: {rule.broken_by(known.value)}"
    bound = f"{known.source} gives {rule.feature} {_WORDS[known.side]} {known.value:.4g}"
    if verdicts == {False}:
        return f"{rule.feature}_from_bounded_value: {bound}, outside {rule}"
    return f"{rule.feature}_from_bounded_value: {bound}, which may or may not meet {rule}"


def bounded_note(record: FeatureRecord) -> str:
    """What a score computed from a bounded value must say ('' when none was)."""
    used = [f"{_shown(f)} was used as {f.value:g} {f.unit}" for f in record.inputs if f.comparator]
    if not used:
        return ""
    return (
        f"Computed from a bounded value: {'; '.join(used)}. "
        "The true value is beyond the bound, so the true risk may differ."
    )


def _shown(fact: Fact) -> str:
    return f"{fact.feature} {fact.comparator}{fact.value:g} {fact.unit}"
