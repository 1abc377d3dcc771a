"""Metrics over linked predictions: discrimination, calibration, burden, fairness, coverage.

Estimates come from maintained libraries, never hand-rolled: AUROC and the ROC
curve from scikit-learn (``roc_auc_score``, ``roc_curve``), the Brier score
from ``brier_score_loss``, logistic recalibration from statsmodels' binomial
GLM, binomial intervals from ``proportion_confint`` (Wilson). What is ours is
the DeLong (1988) standard error of the AUROC, from the structural components
(midrank form, Sun & Xu 2014), because no maintained Python library ships it.

Calibration follows Van Calster et al. 2016/2019: *calibration-in-the-large*
is the intercept of ``logit(y) ~ offset(logit(p))`` (0 when the average risk is
right; negative when the model over-predicts), the *slope* that of
``logit(y) ~ a + b logit(p)`` (1 when the spread is right; < 1 when risks are
too extreme). The ECE uses 10 equal-width bins of predicted risk; the curve
uses up to 10 quantile bins so each point stands on about as many patients.

A metric that cannot be computed (no events, a group under the hiding size)
is ``None`` with a reason, never a number that looks meaningful.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from statsmodels.genmod.families import Binomial
from statsmodels.genmod.generalized_linear_model import GLM
from statsmodels.stats.proportion import proportion_confint

Array = npt.NDArray[np.float64]
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
_EPS = 1e-6  # risks are clipped to [eps, 1 - eps] before the logit
FAIR_LOW, FAIR_HIGH = 0.8, 1.25  # the four-fifths rule, both ways (seismometer's default)
HIDE_UNDER = 10  # groups smaller than this are not shown (re-identification, noise)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A number with its 95 % interval; ``value`` None means "not computable" (see reason)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    reason: str = ""

    @classmethod
    def missing(cls, reason: str) -> Estimate:
        return cls(None, reason=reason)

    def excludes(self, target: float) -> bool:
        """True when the interval exists and does not contain ``target``."""
        if self.low is None or self.high is None:
            return False
        return not self.low <= target <= self.high

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "low": self.low, "high": self.high}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True, slots=True)
class Row:
    """One linked prediction: its risk for a horizon and, when known, what happened."""

    patient_id: str
    day: date  # the prediction's anchor date
    risk: float  # 0..1
    label: int | None  # 1 event within horizon, 0 none, None pending or censored
    attributes: Mapping[str, str] = field(default_factory=dict)  # sex, age band, ...


def as_arrays(rows: Sequence[Row]) -> tuple[Array, Array]:
    """(labels, risks) of the labelled rows only."""
    known = [r for r in rows if r.label is not None]
    y = np.fromiter((float(r.label or 0) for r in known), dtype=np.float64, count=len(known))
    p = np.fromiter((r.risk for r in known), dtype=np.float64, count=len(known))
    return y, p


# --------------------------------------------------------------------------- discrimination


def _two_classes(y: Array) -> str:
    events = int(y.sum())
    if events < 2 or len(y) - events < 2:
        return f"needs at least 2 events and 2 non-events (have {events} and {len(y) - events})"
    return ""


def auroc(y: Array, p: Array) -> Estimate:
    """AUROC (scikit-learn) with a DeLong 95 % interval."""
    if problem := _two_classes(y):
        return Estimate.missing(problem)
    value = float(roc_auc_score(y, p))
    se = delong_se(y, p)
    return Estimate(value, max(0.0, value - Z95 * se), min(1.0, value + Z95 * se))


def delong_se(y: Array, p: Array) -> float:
    """DeLong's standard error of the AUROC, from midranks (Sun & Xu 2014, eq. 6-8)."""
    pos, neg = p[y == 1], p[y == 0]
    m, n = len(pos), len(neg)
    ranks_all = rankdata(np.concatenate([pos, neg]))
    v_pos = (ranks_all[:m] - rankdata(pos)) / n  # share of negatives each positive beats
    v_neg = 1.0 - (ranks_all[m:] - rankdata(neg)) / m  # share of positives above each negative
    variance = np.var(v_pos, ddof=1) / m + np.var(v_neg, ddof=1) / n
    return float(math.sqrt(max(variance, 0.0)))


def roc_points(y: Array, p: Array) -> dict[str, list[float]]:
    if _two_classes(y):
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thresholds = roc_curve(y, p)
    finite = np.where(np.isfinite(thresholds), thresholds, 1.0)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": finite.tolist()}


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True, slots=True)
class CurveBin:
    n: int
    mean_risk: float
    observed: Estimate  # event rate with its Wilson interval

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean_risk": self.mean_risk, "observed": self.observed.to_json()}


@dataclass(frozen=True, slots=True)
class Calibration:
    n: int
    events: int
    expected: float  # sum of predicted risks
    in_the_large: Estimate  # intercept with logit(p) as offset; 0 is perfect
    slope: Estimate  # 1 is perfect
    observed_expected: Estimate  # O/E ratio
    brier: float | None
    ece: float | None
    curve: tuple[CurveBin, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "events": self.events,
            "expected_events": self.expected,
            "calibration_in_the_large": self.in_the_large.to_json(),
            "calibration_slope": self.slope.to_json(),
            "observed_expected": self.observed_expected.to_json(),
            "brier": self.brier,
            "ece_10_bins": self.ece,
            "curve": [b.to_json() for b in self.curve],
        }


def logit(p: Array) -> Array:
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


def calibration(y: Array, p: Array, bins: int = 10) -> Calibration:
    empty = len(y) == 0
    return Calibration(
        n=len(y),
        events=int(y.sum()),
        expected=float(p.sum()),
        in_the_large=calibration_in_the_large(y, p),
        slope=calibration_slope(y, p),
        observed_expected=observed_expected(int(y.sum()), float(p.sum())),
        brier=None if empty else float(brier_score_loss(y, p)),
        ece=None if empty else expected_calibration_error(y, p, bins),
        curve=calibration_curve(y, p, bins),
    )


def _fit(y: Array, exog: Array, offset: Array | None) -> tuple[float, float, float] | str:
    """Binomial GLM; the last coefficient and its 95 % CI, or why it failed."""
    try:
        result = GLM(y, exog, family=Binomial(), offset=offset).fit()
    except Exception as error:  # statsmodels raises several types on separation
        return f"logistic fit failed: {type(error).__name__}"
    low, high = np.asarray(result.conf_int(alpha=0.05))[-1]
    value = float(np.asarray(result.params)[-1])
    if not all(math.isfinite(v) for v in (value, low, high)):
        return "logistic fit did not converge (separation?)"
    return value, float(low), float(high)


def calibration_in_the_large(y: Array, p: Array) -> Estimate:
    if problem := _two_classes(y):
        return Estimate.missing(problem)
    fitted = _fit(y, np.ones((len(y), 1)), offset=logit(p))
    return Estimate.missing(fitted) if isinstance(fitted, str) else Estimate(*fitted)


def calibration_slope(y: Array, p: Array) -> Estimate:
    if problem := _two_classes(y):
        return Estimate.missing(problem)
    exog = np.column_stack([np.ones(len(y)), logit(p)])
    fitted = _fit(y, exog, offset=None)
    return Estimate.missing(fitted) if isinstance(fitted, str) else Estimate(*fitted)


def observed_expected(observed: int, expected: float) -> Estimate:
    """O/E with an exact (Garwood) Poisson interval on O."""
    if expected <= 0:
        return Estimate.missing("no expected events")
    from scipy.stats import chi2

    low = 0.0 if observed == 0 else chi2.ppf(0.025, 2 * observed) / 2
    high = chi2.ppf(0.975, 2 * (observed + 1)) / 2
    return Estimate(observed / expected, float(low) / expected, float(high) / expected)


def expected_calibration_error(y: Array, p: Array, bins: int = 10) -> float:
    """Weighted mean |mean risk - event rate| over equal-width bins of risk."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() / len(p) * abs(p[inside].mean() - y[inside].mean())
    return float(total)


def calibration_curve(y: Array, p: Array, bins: int = 10) -> tuple[CurveBin, ...]:
    """Quantile bins of predicted risk: mean risk vs observed rate (Wilson 95 % CI)."""
    if len(p) == 0:
        return ()
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    out = []
    for b in np.unique(which):
        inside = which == b
        out.append(CurveBin(int(inside.sum()), float(p[inside].mean()), _rate(y[inside])))
    return tuple(out)


def proportion(successes: int, total: int) -> Estimate:
    if total == 0:
        return Estimate.missing("no cases")
    low, high = proportion_confint(successes, total, alpha=0.05, method="wilson")
    return Estimate(successes / total, float(low), float(high))


def _rate(y: Array) -> Estimate:
    return proportion(int(y.sum()), len(y))


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True, slots=True)
class ThresholdMetrics:
    threshold: float
    flagged: int  # predictions at or above the threshold
    flags_per_day: float | None
    flagged_patients_per_1000: float | None
    ppv: Estimate
    sensitivity: Estimate
    specificity: Estimate
    nne: float | None  # number needed to evaluate: 1 / PPV

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "flagged": self.flagged,
            "flags_per_day": self.flags_per_day,
            "flagged_patients_per_1000": self.flagged_patients_per_1000,
            "ppv": self.ppv.to_json(),
            "sensitivity": self.sensitivity.to_json(),
            "specificity": self.specificity.to_json(),
            "nne": self.nne,
        }


def days_spanned(rows: Sequence[Row]) -> int:
    if not rows:
        return 0
    days = [r.day for r in rows]
    return (max(days) - min(days)).days + 1


def at_threshold(rows: Sequence[Row], threshold: float) -> ThresholdMetrics:
    """Burden over every prediction; PPV and sensitivity over the labelled ones."""
    flagged = [r for r in rows if r.risk >= threshold]
    patients = {r.patient_id for r in rows}
    span = days_spanned(rows)
    known = [r for r in rows if r.label is not None]
    tp = sum(1 for r in known if r.risk >= threshold and r.label == 1)
    fp = sum(1 for r in known if r.risk >= threshold and r.label == 0)
    fn = sum(1 for r in known if r.risk < threshold and r.label == 1)
    tn = sum(1 for r in known if r.risk < threshold and r.label == 0)
    ppv = proportion(tp, tp + fp)
    return ThresholdMetrics(
        threshold=threshold,
        flagged=len(flagged),
        flags_per_day=len(flagged) / span if span else None,
        flagged_patients_per_1000=(
            1000 * len({r.patient_id for r in flagged}) / len(patients) if patients else None
        ),
        ppv=ppv,
        sensitivity=proportion(tp, tp + fn),
        specificity=proportion(tn, tn + fp),
        nne=1 / ppv.value if ppv.value else None,
    )


def flags_by_day(rows: Iterable[Row], threshold: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for r in rows:
        counts[r.day.isoformat()] += r.risk >= threshold
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- subgroups


def age_band(age: float | None) -> str:
    if age is None:
        return "unknown"
    for upper, name in ((45, "18-44"), (65, "45-64"), (75, "65-74")):
        if age < upper:
            return name if age >= 18 else "<18"
    return "75+"


@dataclass(frozen=True, slots=True)
class GroupMetrics:
    attribute: str
    group: str
    patients: int
    hidden: bool  # under HIDE_UNDER patients: no numbers shown
    metrics: dict[str, float | None]
    ratios: dict[str, float | None]  # to the reference group
    flagged: tuple[str, ...]  # metrics whose ratio is outside [0.8, 1.25]
    reference: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "attribute": self.attribute,
            "group": self.group,
            "patients": self.patients if not self.hidden else f"<{HIDE_UNDER}",
            "hidden": self.hidden,
            "reference": self.reference,
            "metrics": {} if self.hidden else self.metrics,
            "ratios": {} if self.hidden else self.ratios,
            "outside_fair_range": list(self.flagged),
        }


def group_metrics(rows: Sequence[Row], threshold: float) -> dict[str, float | None]:
    """The audited numbers of one group: burden, sensitivity, PPV and O/E."""
    at = at_threshold(rows, threshold)
    known = [r for r in rows if r.label is not None]
    y, p = as_arrays(known)
    oe = observed_expected(int(y.sum()), float(p.sum()))
    flagged = sum(1 for r in rows if r.risk >= threshold)
    return {
        "flag_rate": flagged / len(rows) if rows else None,
        "sensitivity": at.sensitivity.value,
        "ppv": at.ppv.value,
        "observed_expected": oe.value,
        "auroc": auroc(y, p).value,
    }


def subgroup_audit(
    rows: Sequence[Row],
    attribute: str,
    threshold: float,
    reference: str | None = None,
) -> list[GroupMetrics]:
    """Each group's metrics and their ratio to the reference group (default: the largest)."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.attributes.get(attribute, "unknown")].append(r)
    size = {g: len({r.patient_id for r in members}) for g, members in groups.items()}
    visible = [g for g in groups if size[g] >= HIDE_UNDER]
    ref = reference if reference in visible else max(visible, key=size.__getitem__, default=None)
    values = {g: group_metrics(groups[g], threshold) for g in groups}
    out = []
    for g in sorted(groups):
        hidden = size[g] < HIDE_UNDER
        ratios = {} if hidden or ref is None else _ratios(values[g], values[ref])
        flagged = tuple(k for k, v in ratios.items() if v is not None and not _fair(v))
        out.append(
            GroupMetrics(attribute, g, size[g], hidden, values[g], ratios, flagged, g == ref)
        )
    return out


def _fair(ratio: float) -> bool:
    return FAIR_LOW <= ratio <= FAIR_HIGH


def _ratios(
    group: Mapping[str, float | None], ref: Mapping[str, float | None]
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in group.items():
        base = ref.get(key)
        out[key] = value / base if value is not None and base else None
    return out


# --------------------------------------------------------------------------- coverage


def coverage(patients: Mapping[str, str | None]) -> dict[str, Any]:
    """Share of patients scored; ``patients`` maps each seen patient to None or why unscored."""
    reasons = Counter(reason for reason in patients.values() if reason is not None)
    scored = sum(1 for reason in patients.values() if reason is None)
    total = len(patients)
    return {
        "patients_seen": total,
        "patients_scored": scored,
        "share_scored": scored / total if total else None,
        "not_scored_by_reason": dict(reasons.most_common()),
    }


def by_key(rows: Iterable[Row], key: Callable[[Row], str]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)
