"""Link each prediction to what happened next: event, no event, censored, pending, prevalent.

For a prediction made at ``anchor`` with a horizon of ``h`` days, the window is
``(anchor, anchor + h]``. Evaluated "as of" a time (the evaluation's now), and
using only events dated at or before it -- nothing dated later is known yet:

1. *prevalent*: an outcome code at or before the anchor (the patient already
   had dialysis or a transplant); left out of the metrics, not counted a hit.
2. *event*: the first outcome code inside the window, or the first of two lab
   values past the threshold (eGFR < 15) at least ``confirm_days`` apart with
   no value back over it in between, the first inside the window (the second
   may fall after the window's end; it confirms, the first dates the event).
3. *censored*: died inside the window without the event (death is censoring,
   as in KFRE's development and validations), or the window has ended and the
   last contact came before its end (lost to follow-up).
4. *pending*: the window has not ended, or a low lab value inside it awaits
   confirmation; the report counts these and leaves them out of the metrics.
5. *no event*: followed past the window's end (a contact or death after it)
   with no event inside it.

Incremental: :class:`Linker` keeps each patient's timeline; :meth:`Linker.add`
says whose changed, and :class:`LinkBook` re-links only those patients'
predictions plus the ones still pending (their window may have closed).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from ehrbridge.evaluation.outcomes import Event, EventKind, LabRule, OutcomeSpec


class Status(StrEnum):
    EVENT = "event"
    NO_EVENT = "no_event"
    CENSORED = "censored"
    PENDING = "pending"
    PREVALENT = "prevalent"


@dataclass(frozen=True, slots=True)
class Link:
    status: Status
    horizon: str
    at: datetime | None = None  # event, censoring or (pending) window end
    reason: str = ""

    @property
    def label(self) -> int | None:
        """1 event, 0 no event; None when the outcome is unknown (left out of metrics)."""
        return {Status.EVENT: 1, Status.NO_EVENT: 0}.get(self.status)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "horizon": self.horizon,
            "at": self.at.isoformat() if self.at else None,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class PredictionRef:
    """What linkage and metrics need of a stored prediction."""

    identifier: str
    patient_id: str
    anchor: datetime
    risks: Mapping[str, float]  # risk field -> fraction: {"risk_2y": 0.12, ...}
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Timeline:
    """One patient's events in time order."""

    outcomes: list[datetime] = field(default_factory=list)
    labs: list[tuple[datetime, float]] = field(default_factory=list)
    deaths: list[datetime] = field(default_factory=list)
    contacts: list[datetime] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if event.kind is EventKind.OUTCOME:
            bisect.insort(self.outcomes, event.at)
        elif event.kind is EventKind.LAB and event.value is not None:
            bisect.insort(self.labs, (event.at, event.value))
        elif event.kind is EventKind.DEATH:
            bisect.insort(self.deaths, event.at)
        bisect.insort(self.contacts, event.at)  # every dated event shows the patient was seen

    def death(self, as_of: datetime) -> datetime | None:
        known = [d for d in self.deaths if d <= as_of]
        return known[0] if known else None

    def last_contact(self, as_of: datetime) -> datetime | None:
        i = bisect.bisect_right(self.contacts, as_of)
        return self.contacts[i - 1] if i else None


def first_sustained_low(
    labs: Sequence[tuple[datetime, float]], rule: LabRule, after: datetime, as_of: datetime
) -> tuple[datetime | None, datetime | None]:
    """(event time, awaiting-confirmation-until) for the lab rule, from labs after ``after``."""
    known = [(t, v) for t, v in labs if after < t <= as_of]
    awaiting: datetime | None = None
    for i, (t1, v1) in enumerate(known):
        if v1 >= rule.below:
            continue
        due = t1 + timedelta(days=rule.confirm_days)
        for t2, v2 in known[i + 1 :]:
            if v2 >= rule.below:
                break  # back over the threshold: not sustained from t1
            if t2 >= due:
                return t1, None
        else:
            if as_of < due and awaiting is None:
                awaiting = t1  # nothing has contradicted it yet; confirmation may still come
    return None, awaiting


@dataclass(frozen=True, slots=True)
class OutcomeRule:
    spec: OutcomeSpec

    def link(self, anchor: datetime, horizon: str, timeline: Timeline, as_of: datetime) -> Link:
        end = anchor + timedelta(days=self.spec.horizons[horizon].days)
        codes = [t for t in timeline.outcomes if t <= as_of]
        if self.spec.exclude_prevalent and codes and codes[0] <= anchor:
            return Link(Status.PREVALENT, horizon, codes[0], "outcome recorded before prediction")
        if event := self._event(anchor, end, codes, timeline, as_of):
            return Link(Status.EVENT, horizon, event[0], event[1])
        return self._no_event(anchor, end, horizon, timeline, as_of)

    def _event(
        self, anchor: datetime, end: datetime, codes: list[datetime], tl: Timeline, as_of: datetime
    ) -> tuple[datetime, str] | None:
        found = [(t, "outcome code") for t in codes if anchor < t <= end]
        if self.spec.lab:
            low, _ = first_sustained_low(tl.labs, self.spec.lab, anchor, as_of)
            if low is not None and low <= end:
                found.append((low, f"sustained {self.spec.lab.name} < {self.spec.lab.below:g}"))
        return min(found) if found else None

    def _no_event(
        self, anchor: datetime, end: datetime, horizon: str, tl: Timeline, as_of: datetime
    ) -> Link:
        death = tl.death(as_of)
        if death is not None and death <= end:
            return Link(Status.CENSORED, horizon, death, "death")
        if self.spec.lab:
            _, awaiting = first_sustained_low(tl.labs, self.spec.lab, anchor, as_of)
            if awaiting is not None and awaiting <= end:
                return Link(Status.PENDING, horizon, awaiting, "low value awaiting confirmation")
        if as_of < end:
            return Link(Status.PENDING, horizon, end, "horizon not ended")
        last = max(filter(None, (tl.last_contact(as_of), death)), default=None)
        if last is not None and last >= end:
            return Link(Status.NO_EVENT, horizon, end, "followed past horizon")
        return Link(Status.CENSORED, horizon, last, "last contact before horizon end")


class Linker:
    """Patients' timelines, fed event by event (history replay or live traffic)."""

    def __init__(self, spec: OutcomeSpec) -> None:
        self.rule = OutcomeRule(spec)
        self.timelines: dict[str, Timeline] = {}

    def add(self, events: Iterable[Event]) -> set[str]:
        changed: set[str] = set()
        for event in events:
            self.timelines.setdefault(event.patient_id, Timeline()).add(event)
            changed.add(event.patient_id)
        return changed

    def link(self, prediction: PredictionRef, horizon: str, as_of: datetime) -> Link:
        timeline = self.timelines.get(prediction.patient_id, Timeline())
        return self.rule.link(prediction.anchor, horizon, timeline, as_of)


@dataclass(slots=True)
class LinkBook:
    """The current link of every (prediction, horizon); refreshed incrementally."""

    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    relinked: int = 0  # links computed by the last refresh (what incremental saves)

    def refresh(
        self,
        linker: Linker,
        predictions: Iterable[PredictionRef],
        changed: set[str],
        as_of: datetime,
    ) -> None:
        self.relinked = 0
        for p in predictions:
            for horizon in linker.rule.spec.horizons:
                old = self.links.get((p.identifier, horizon))
                stale = old is None or old.status is Status.PENDING or p.patient_id in changed
                if stale:
                    self.links[(p.identifier, horizon)] = linker.link(p, horizon, as_of)
                    self.relinked += 1

    def counts(self, horizon: str) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for (_, h), link in self.links.items():
            if h == horizon:
                out[link.status.value] += 1
        return out
