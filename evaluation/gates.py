"""Promotion criteria judged against an evaluation: pass, fail or inconclusive, with evidence.

Argo Rollouts' analysis runs answer Successful, Failed or Inconclusive; so do
these. A criterion is *inconclusive* when the evidence it needs is not there
yet (too few outcomes for discrimination or calibration, no scored patient),
never a silent pass. The criteria are the site's (``evaluation.promotion`` in
the site file); a criterion left out is not judged. Each verdict carries the
number it was decided on, so a decision can be audited later.

This module judges; switching a model to live is the runtime's business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
MISSING_INPUT = "missing input"  # the coverage reason prefix (ehrbridge/evaluate.py)


@dataclass(frozen=True, slots=True)
class Verdict:
    criterion: str
    status: str
    evidence: str

    def to_json(self) -> dict[str, str]:
        return {"criterion": self.criterion, "status": self.status, "evidence": self.evidence}


def judge(criteria: Mapping[str, Any], evaluation: Mapping[str, Any]) -> list[Verdict]:
    """Every criterion set (not None) in ``criteria``, in a fixed order."""
    out = []
    for name, check in _CHECKS.items():
        limit = criteria.get(name)
        if limit is not None:
            out.append(Verdict(name, *check(limit, evaluation)))
    return out


def overall(verdicts: list[Verdict]) -> str:
    statuses = {v.status for v in verdicts}
    if FAIL in statuses:
        return FAIL
    return INCONCLUSIVE if INCONCLUSIVE in statuses or not verdicts else PASS


def _days(limit: int, e: Mapping[str, Any]) -> tuple[str, str]:
    first, last = e.get("first_prediction"), e.get("last_prediction")
    if not first or not last:
        return INCONCLUSIVE, "no prediction yet"
    days = (date.fromisoformat(last) - date.fromisoformat(first)).days + 1
    return (PASS if days >= limit else FAIL), f"{days} days of predictions ({first}..{last})"


def _patients(limit: int, e: Mapping[str, Any]) -> tuple[str, str]:
    n = int(e.get("patients", 0))
    return (PASS if n >= limit else FAIL), f"{n} scored patients"


def _missing(limit: float, e: Mapping[str, Any]) -> tuple[str, str]:
    cov = e.get("coverage") or {}
    seen = cov.get("patients_seen") or 0
    if not seen:
        return INCONCLUSIVE, "no coverage data (no patient state)"
    missing = sum(
        n
        for reason, n in cov.get("not_scored_by_reason", {}).items()
        if reason.startswith(MISSING_INPUT)
    )
    rate = missing / seen
    return (
        PASS if rate <= limit else FAIL
    ), f"{missing}/{seen} patients missing an input ({rate:.1%})"


def _flags(limit: float, e: Mapping[str, Any]) -> tuple[str, str]:
    worst = max(
        (
            (t["flags_per_day"] or 0.0, t["band"])
            for h in e["horizons"].values()
            for t in h["thresholds"]
        ),
        default=None,
    )
    if worst is None:
        return INCONCLUSIVE, "no band or no prediction"
    return (PASS if worst[0] <= limit else FAIL), f"{worst[0]:.2f} flags/day at {worst[1]}"


def _per_horizon(
    e: Mapping[str, Any],
    pick: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    ok: Callable[[Mapping[str, Any]], bool],
    label: str,
) -> tuple[str, str]:
    statuses, evidence = [], []
    for horizon, h in e["horizons"].items():
        est = pick(h)
        if est.get("value") is None or h["events"] < 10:
            statuses.append(INCONCLUSIVE)
            evidence.append(f"{horizon}: {h['events']} events, too few")
            continue
        statuses.append(PASS if ok(est) else FAIL)
        evidence.append(
            f"{horizon}: {label} {est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}]"
        )
    status = FAIL if FAIL in statuses else INCONCLUSIVE if INCONCLUSIVE in statuses else PASS
    return status, "; ".join(evidence)


def _auroc(limit: float, e: Mapping[str, Any]) -> tuple[str, str]:
    return _per_horizon(
        e, lambda h: h["discrimination"]["auroc"], lambda est: est["low"] >= limit, "AUROC"
    )


def _slope(limit: list[float], e: Mapping[str, Any]) -> tuple[str, str]:
    low, high = limit
    return _per_horizon(
        e,
        lambda h: h["calibration"]["calibration_slope"],
        lambda est: low <= est["value"] <= high,
        "slope",
    )


def _citl(limit: float, e: Mapping[str, Any]) -> tuple[str, str]:
    return _per_horizon(
        e,
        lambda h: h["calibration"]["calibration_in_the_large"],
        lambda est: abs(est["value"]) <= limit,
        "calibration-in-the-large",
    )


_CHECKS: dict[str, Callable[[Any, Mapping[str, Any]], tuple[str, str]]] = {
    "min_days": _days,
    "min_scored_patients": _patients,
    "max_missing_input_rate": _missing,
    "max_flags_per_day": _flags,
    "min_auroc_lower_ci": _auroc,
    "calibration_slope": _slope,
    "max_abs_calibration_in_the_large": _citl,
}
