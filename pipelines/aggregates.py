"""Aggregates: a feature computed over a window of one lab feature's results.

Declared by a site mapping (``aggregates:``) or a model file input
(``aggregate:``); see :class:`~ehrbridge.mappings.schema.Aggregate` and
docs/config.md, "Aggregates". The results taken are those a plain feature
could be: usable (no flag, not withdrawn), in ``[anchor - window, anchor]`` --
so never one dated after the anchor, which itself is never later than the
moment of processing plus the site's future tolerance -- in the canonical
unit, and one per result time (the one ``latest`` would pick: a proper unit
over an ``accept_as`` label), so one specimen reported twice counts once.

Comparator-bounded results (``<3``, ``>90``): ``latest``, ``min`` and ``max``
use the bound as the value (as a plain feature does, ``values.comparators:
bound``), and ``count`` counts them; ``mean`` and ``slope_per_year`` refuse a
window holding one, because a bound has no value to average or fit and any
number put in its place would be invented.

The patient state keeps a feature's newest ``MAX_FACTS_PER_FEATURE`` results
(``pipelines/state.py``, a memory bound). When it is full and its oldest kept
result is inside the window, older results of the window may have been
dropped: every aggregation but ``latest`` then refuses, with that reason,
rather than count, average or fit part of the window as if it were all of it.

The answer is the value and the facts it rests on (they become the record's
``inputs``, and so the Observation's ``derivedFrom``), or why there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ehrbridge.mappings.schema import Aggregate
from ehrbridge.pipelines.facts import Fact
from ehrbridge.pipelines.state import MAX_FACTS_PER_FEATURE

__all__ = ["Aggregated", "aggregate", "usable_in_window"]

_SECONDS_PER_YEAR = 365.2425 * 86_400


@dataclass(frozen=True, slots=True)
class Aggregated:
    value: float
    facts: tuple[Fact, ...]  # what the value rests on, oldest first


def usable_in_window(facts: Sequence[Fact], anchor: datetime, window_days: float) -> list[Fact]:
    """Usable facts with ``anchor - window <= effective <= anchor``, one per time, oldest first."""
    earliest = anchor - timedelta(days=window_days)
    withdrawn = {(f.code, f.effective) for f in facts if f.withdraws}
    by_time: dict[datetime, Fact] = {}
    for fact in facts:
        if not earliest <= fact.effective <= anchor or fact.flag:
            continue
        if withdrawn and (fact.code, fact.effective) in withdrawn:
            continue
        kept = by_time.get(fact.effective)
        if kept is None or fact.rank <= kept.rank:  # as latest_in_window: the last of the best
            by_time[fact.effective] = fact
    return sorted(by_time.values(), key=lambda f: f.effective)


def aggregate(
    rule: Aggregate, facts: Sequence[Fact], anchor: datetime, window_days: float
) -> Aggregated | str:
    """The aggregate over ``facts`` (sorted by time), or why there is not enough data."""
    used = usable_in_window(facts, anchor, window_days)
    truncated = _truncated(rule, facts, anchor, window_days)
    if truncated and rule.aggregation != "latest":
        return truncated
    if rule.aggregation == "count":
        return Aggregated(float(len(used)), tuple(used))
    if not used:
        return f"no {rule.of} result in the {window_days:g} days up to {anchor.date()}"
    return _BY_AGGREGATION[rule.aggregation](rule, used, anchor)


def _truncated(rule: Aggregate, facts: Sequence[Fact], anchor: datetime, window_days: float) -> str:
    """Why the window may be incomplete: the state is full and its oldest kept result is in it."""
    if len(facts) < MAX_FACTS_PER_FEATURE:
        return ""
    oldest = facts[0].effective
    if oldest < anchor - timedelta(days=window_days):
        return ""
    return (
        f"the state keeps a patient's newest {MAX_FACTS_PER_FEATURE} {rule.of} results and "
        f"the oldest kept ({oldest.date()}) is inside the {window_days:g}-day window: "
        f"older results of the window may be missing"
    )


def _latest(rule: Aggregate, used: list[Fact], anchor: datetime) -> Aggregated | str:
    return Aggregated(used[-1].value, (used[-1],))


def _min(rule: Aggregate, used: list[Fact], anchor: datetime) -> Aggregated | str:
    return Aggregated(min(f.value for f in used), tuple(used))


def _max(rule: Aggregate, used: list[Fact], anchor: datetime) -> Aggregated | str:
    return Aggregated(max(f.value for f in used), tuple(used))


def _mean(rule: Aggregate, used: list[Fact], anchor: datetime) -> Aggregated | str:
    bounded = _bounded(rule, used)
    if bounded:
        return bounded
    return Aggregated(sum(f.value for f in used) / len(used), tuple(used))


def _slope(rule: Aggregate, used: list[Fact], anchor: datetime) -> Aggregated | str:
    """Ordinary least squares of value on time in years (365.2425 days)."""
    bounded = _bounded(rule, used)
    if bounded:
        return bounded
    if len(used) < 2:
        return f"1 {rule.of} result in the window; a slope needs results at 2 or more times"
    span = (used[-1].effective - used[0].effective).total_seconds() / 86_400
    needed = rule.min_span_days or 0.0
    if span < needed:
        return f"{rule.of} results span {span:.0f} days; a slope needs at least {needed:g}"
    years = [(f.effective - anchor).total_seconds() / _SECONDS_PER_YEAR for f in used]
    mean_t = sum(years) / len(years)
    mean_v = sum(f.value for f in used) / len(used)
    spread = sum((t - mean_t) ** 2 for t in years)
    covariance = sum((t - mean_t) * (f.value - mean_v) for t, f in zip(years, used, strict=True))
    return Aggregated(covariance / spread, tuple(used))


def _bounded(rule: Aggregate, used: list[Fact]) -> str:
    """Why a mean or slope refuses the window: a result that is a bound, not a value."""
    fact = next((f for f in used if f.comparator), None)
    if fact is None:
        return ""
    when = fact.effective.date()
    return (
        f"the {rule.of} result of {when} is {fact.comparator}{fact.value:g}, a bound: "
        f"no {rule.aggregation} is computed over a bound"
    )


_BY_AGGREGATION: dict[str, Callable[[Aggregate, list[Fact], datetime], Aggregated | str]] = {
    "latest": _latest,
    "min": _min,
    "max": _max,
    "mean": _mean,
    "slope_per_year": _slope,
}
