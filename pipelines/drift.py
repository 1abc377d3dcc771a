"""Data quality and drift of a model's inputs and scores, from fixed-bin counts.

Nothing here keeps a raw value: each feature value only increments the count
of the fixed bin it falls in (:data:`BINS`), per day. Drift compares a day's
bin proportions with a **reference** window's:

* the Population Stability Index, PSI = sum_i (c_i - r_i) * ln(c_i / r_i),
  with Evidently's thresholds: 0.1 is worth a look, 0.2 is drift
  (:data:`PSI_WARN`, :data:`PSI_ALARM`);
* the Jensen-Shannon distance, sqrt(JS divergence) with natural logarithms
  (as scipy.spatial.distance.jensenshannon computes it): 0 for the same
  distribution, at most sqrt(ln 2) ~ 0.833 for disjoint ones.

An empty bin on either side would make PSI infinite; as Evidently does, a
proportion of 0 is replaced by :data:`EMPTY_BIN` (1e-4) before PSI.

The reference is the first ``reference_days`` days the site ran (its shadow
period, before anyone acts on the scores), or a file exported from a
validation set (:meth:`DriftMonitor.load_reference`, same format as
``reference`` in :meth:`DriftMonitor.snapshot`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from ehrbridge.mappings.schema import DERIVED_FROM, DRIFT_BINS, LEGACY_DRIFT_KEYS
from ehrbridge.pipelines.domain import OutOfDomain
from ehrbridge.pipelines.features import FeatureRecord, NotEnoughData

PSI_WARN = 0.1
PSI_ALARM = 0.2
EMPTY_BIN = 1e-4
DAYS_KEPT = 60  # daily series kept for /api/monitoring (counts only)

# Upper-exclusive bin edges: a value v falls in bin i where edges[i-1] <= v < edges[i];
# below the first edge is bin 0, at or above the last is the last bin. Per feature, around
# the clinical cut points (mappings/schema.py); SCORE bins the model's score output
# (its model file's rendering.score).
BINS: dict[str, tuple[float, ...]] = DRIFT_BINS
SCORE = "score"
INPUTS = tuple(name for name in BINS if name != SCORE)  # the features monitored


def feature_values(
    result: FeatureRecord | NotEnoughData | OutOfDomain,
) -> dict[str, float | None]:
    """A record's monitored inputs as numbers (sex 1/0); for one without a score, the missing."""
    if isinstance(result, FeatureRecord):
        return {name: value for name, value in result.values.items() if name in BINS}
    if isinstance(result, OutOfDomain):
        return {}  # every input was there; the record does not carry their values
    # The inputs it did have are not assembled, so not binned: only the missing count.
    # A missing source (creatinine) leaves out what is derived from it (eGFR).
    derived = {source: name for name, source in DERIVED_FROM.items()}
    lacking = {derived.get(name, name) for name in result.missing}
    return {name: None for name in INPUTS if name in lacking}


def _current(name: str) -> str:
    """A bin's name as saved by an older version, as it is named now."""
    return LEGACY_DRIFT_KEYS.get(name, name)


def bin_index(edges: Sequence[float], value: float) -> int:
    """The bin ``value`` falls in: 0 .. len(edges)."""
    return bisect.bisect_right(edges, value)


def proportions(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("no counts")
    return [c / total for c in counts]


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """Population Stability Index of ``current`` against ``reference`` (bin counts)."""
    ref = [max(p, EMPTY_BIN) for p in proportions(reference)]
    cur = [max(p, EMPTY_BIN) for p in proportions(current)]
    return sum((c - r) * math.log(c / r) for r, c in zip(ref, cur, strict=True))


def js_distance(reference: Sequence[float], current: Sequence[float]) -> float:
    """Jensen-Shannon distance (natural log) between two bin-count vectors."""
    p, q = proportions(reference), proportions(current)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    divergence = (_kl(p, m) + _kl(q, m)) / 2
    return math.sqrt(max(divergence, 0.0))


def _kl(p: Sequence[float], m: Sequence[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, m, strict=True) if a > 0)


def empty_counts() -> dict[str, list[int]]:
    return {name: [0] * (len(edges) + 1) for name, edges in BINS.items()}


@dataclass
class DayStats:
    """One day's counts for one model: bins, missing inputs, results, bands."""

    records: int = 0  # feature records evaluated (scored or not)
    missing: dict[str, int] = field(default_factory=dict)  # input -> records without it
    bins: dict[str, list[int]] = field(default_factory=empty_counts)
    bands: dict[str, int] = field(default_factory=dict)  # interpretation code -> predictions
    results_mapped: int = 0
    results_unmapped: int = 0

    def add_features(self, values: dict[str, float | None]) -> None:
        self.records += 1
        for name, value in values.items():
            if value is None:
                self.missing[name] = self.missing.get(name, 0) + 1
            elif name in BINS:
                self.bins[name][bin_index(BINS[name], value)] += 1

    def add_score(self, band: str, risk: float) -> None:
        self.bands[band] = self.bands.get(band, 0) + 1
        self.bins[SCORE][bin_index(BINS[SCORE], risk)] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "missing": dict(sorted(self.missing.items())),
            "bins": self.bins,
            "bands": dict(sorted(self.bands.items())),
            "results_mapped": self.results_mapped,
            "results_unmapped": self.results_unmapped,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DayStats:
        bins = empty_counts()
        for old, counts in data.get("bins", {}).items():
            name = _current(old)
            if name in bins and len(counts) == len(bins[name]):
                bins[name] = [int(c) for c in counts]
        return cls(
            records=int(data.get("records", 0)),
            missing={_current(str(k)): int(v) for k, v in data.get("missing", {}).items()},
            bins=bins,
            bands={str(k): int(v) for k, v in data.get("bands", {}).items()},
            results_mapped=int(data.get("results_mapped", 0)),
            results_unmapped=int(data.get("results_unmapped", 0)),
        )


@dataclass
class Comparison:
    """One feature's drift on one day against the reference."""

    psi: float
    js_distance: float
    count: int

    @property
    def level(self) -> str:
        if self.psi >= PSI_ALARM:
            return "alarm"
        return "warn" if self.psi >= PSI_WARN else "ok"


class DriftMonitor:
    """Daily fixed-bin statistics for one model, and their drift from a reference.

    ``reference_days``: the first that many days (counted from the first day
    seen) accumulate into the reference, unless a reference was loaded.
    ``min_count``: a day compares a feature only once it has that many values,
    so the first records of a day do not raise a false alarm.
    """

    def __init__(self, reference_days: int = 14, min_count: int = 100) -> None:
        self.reference_days = reference_days
        self.min_count = min_count
        self.days: dict[date, DayStats] = {}
        self.reference: dict[str, list[int]] = empty_counts()
        self.reference_from: date | None = None  # None: loaded from a file, frozen
        self.reference_frozen = False

    def day(self, today: date) -> DayStats:
        stats = self.days.get(today)
        if stats is None:
            stats = self.days[today] = DayStats()
            self._forget_old(today)
        if self.reference_from is None and not self.reference_frozen:
            self.reference_from = today
        return stats

    def _forget_old(self, today: date) -> None:
        for old in [d for d in self.days if (today - d).days >= DAYS_KEPT]:
            del self.days[old]

    def in_reference(self, today: date) -> bool:
        if self.reference_frozen or self.reference_from is None:
            return False
        return (today - self.reference_from).days < self.reference_days

    def add_features(self, today: date, values: dict[str, float | None]) -> None:
        self.day(today).add_features(values)
        if self.in_reference(today):
            for name, value in values.items():
                if value is not None and name in BINS:
                    self.reference[name][bin_index(BINS[name], value)] += 1

    def add_score(self, today: date, band: str, risk: float) -> None:
        self.day(today).add_score(band, risk)
        if self.in_reference(today):
            self.reference[SCORE][bin_index(BINS[SCORE], risk)] += 1

    def compare(self, today: date, name: str) -> Comparison | None:
        """``name``'s drift on ``today``; None until both sides have ``min_count`` values."""
        stats = self.days.get(today)
        if stats is None or self.in_reference(today):
            return None
        current, reference = stats.bins[name], self.reference[name]
        if sum(current) < self.min_count or sum(reference) < self.min_count:
            return None
        return Comparison(psi(reference, current), js_distance(reference, current), sum(current))

    def load_reference(self, data: dict[str, Any]) -> None:
        """A reference exported from a validation set: ``{"bins": {...}, "counts": {...}}``."""
        for old, edges in data.get("bins", {}).items():
            name = _current(old)
            if name in BINS and tuple(float(e) for e in edges) != BINS[name]:
                raise ValueError(f"reference bins for {name} differ from this version's")
        for old, counts in data.get("counts", {}).items():
            name = _current(old)
            if name in BINS and len(counts) == len(BINS[name]) + 1:
                self.reference[name] = [int(c) for c in counts]
        self.reference_frozen = True

    def reference_json(self) -> dict[str, Any]:
        return {"bins": {k: list(v) for k, v in BINS.items()}, "counts": self.reference}

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference_json(),
            "reference_from": self.reference_from.isoformat() if self.reference_from else None,
            "reference_frozen": self.reference_frozen,
            "days": {d.isoformat(): s.to_json() for d, s in sorted(self.days.items())},
        }

    def restore(self, data: dict[str, Any]) -> None:
        """State saved by :meth:`to_json` (a restart keeps the reference and the series)."""
        self.load_reference(data.get("reference", {}))
        self.reference_frozen = bool(data.get("reference_frozen"))
        start = data.get("reference_from")
        self.reference_from = date.fromisoformat(start) if start else None
        for day, stats in data.get("days", {}).items():
            self.days[date.fromisoformat(day)] = DayStats.from_json(stats)
