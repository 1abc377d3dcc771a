"""The evaluation: every number in one JSON document, and the findings a reader must see.

:func:`evaluate` turns predictions, their links and the site's settings into
the JSON the report and ``/api/evaluation`` show. Per horizon:

- linkage counts (event, no event, censored, pending, prevalent);
- discrimination and calibration over one prediction per patient by default
  (``unit: patient-first``), since several predictions of one patient are not
  independent and would narrow every interval;
- at each interpretation band: burden over every prediction (flags per day,
  per 1,000 patients) and PPV, sensitivity, specificity, NNE;
- the subgroup audit at each band;
- ``findings``: what is wrong, in words (miscalibration whose interval
  excludes perfect, a subgroup outside [0.8, 1.25], too few outcomes yet).

The label-free view (score distribution by month, flags per day, coverage)
needs no outcomes, so it is there from the first day of shadow mode.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np

from ehrbridge.evaluation import metrics
from ehrbridge.evaluation.linkage import Link, LinkBook, PredictionRef, Status
from ehrbridge.evaluation.metrics import Row
from ehrbridge.evaluation.outcomes import OutcomeSpec

Unit = Literal["patient-first", "patient-last", "prediction"]
MIN_EVENTS = 10  # below this many events, discrimination and calibration are "inconclusive"


@dataclass(frozen=True, slots=True)
class Band:
    horizon: str  # the outcome's horizon key: 2y, 5y
    threshold: float
    code: str  # the interpretation code the band writes (H, HH)

    @property
    def name(self) -> str:
        return f"{self.horizon} >= {self.threshold:g} ({self.code})"


@dataclass(frozen=True, slots=True)
class EvaluationInput:
    site: str
    spec: OutcomeSpec
    predictions: Sequence[PredictionRef]
    book: LinkBook
    bands: Sequence[Band]
    as_of: datetime
    coverage: Mapping[str, str | None] = field(default_factory=dict)
    subgroups: Sequence[str] = ("sex", "age_band")
    references: Mapping[str, str] = field(default_factory=dict)
    unit: Unit = "patient-first"


def rows_for(inp: EvaluationInput, horizon: str) -> list[Row]:
    """Every prediction as a metrics row for one horizon; prevalent ones left out."""
    risk_field = inp.spec.horizons[horizon].risk
    out = []
    for p in sorted(inp.predictions, key=lambda p: (p.anchor, p.identifier)):
        link = inp.book.links.get((p.identifier, horizon))
        if link is None or link.status is Status.PREVALENT:
            continue
        out.append(
            Row(p.patient_id, p.anchor.date(), p.risks[risk_field], link.label, p.attributes)
        )
    return out


def one_per_patient(rows: Sequence[Row], unit: Unit) -> list[Row]:
    if unit == "prediction":
        return list(rows)
    chosen: dict[str, Row] = {}
    for r in rows:  # rows are in anchor order
        if unit == "patient-last" or r.patient_id not in chosen:
            chosen[r.patient_id] = r
    return list(chosen.values())


def evaluate(inp: EvaluationInput) -> dict[str, Any]:
    horizons = {h: _horizon(inp, h) for h in inp.spec.horizons}
    return {
        "site": inp.site,
        "model": inp.spec.model,
        "outcome": {"name": inp.spec.outcome, "description": inp.spec.description},
        "as_of": inp.as_of.isoformat(),
        "unit": inp.unit,
        "predictions": len(inp.predictions),
        "patients": len({p.patient_id for p in inp.predictions}),
        "first_prediction": _day(min((p.anchor for p in inp.predictions), default=None)),
        "last_prediction": _day(max((p.anchor for p in inp.predictions), default=None)),
        "coverage": metrics.coverage(inp.coverage) if inp.coverage else None,
        "horizons": horizons,
        "findings": [f for h in horizons.values() for f in h["findings"]],
    }


def _day(moment: datetime | None) -> str | None:
    return moment.date().isoformat() if moment else None


def _horizon(inp: EvaluationInput, horizon: str) -> dict[str, Any]:
    rows = rows_for(inp, horizon)
    unit_rows = one_per_patient(rows, inp.unit)
    y, p = metrics.as_arrays(unit_rows)
    bands = [b for b in inp.bands if b.horizon == horizon]
    result: dict[str, Any] = {
        "linkage": inp.book.counts(horizon),
        "labelled": len(y),
        "events": int(y.sum()),
        "discrimination": {"auroc": metrics.auroc(y, p).to_json(), "roc": metrics.roc_points(y, p)},
        "calibration": metrics.calibration(y, p).to_json(),
        "thresholds": [_band(b, rows, unit_rows) for b in bands],
        "subgroups": {b.name: _audit(inp, unit_rows, b) for b in bands},
        "label_free": _label_free(rows, bands),
    }
    result["findings"] = findings(horizon, result)
    return result


def _band(band: Band, rows: Sequence[Row], unit_rows: Sequence[Row]) -> dict[str, Any]:
    burden = metrics.at_threshold(rows, band.threshold)
    classified = metrics.at_threshold(unit_rows, band.threshold)
    merged = dataclasses.replace(
        classified,
        flagged=burden.flagged,
        flags_per_day=burden.flags_per_day,
        flagged_patients_per_1000=burden.flagged_patients_per_1000,
    )
    return {"band": band.name, "code": band.code, **merged.to_json()}


def _audit(inp: EvaluationInput, rows: Sequence[Row], band: Band) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in inp.subgroups:
        groups = metrics.subgroup_audit(
            rows, attribute, band.threshold, inp.references.get(attribute)
        )
        out[attribute] = [g.to_json() | {"oe": _group_oe(rows, attribute, g)} for g in groups]
    return out


def _group_oe(rows: Sequence[Row], attribute: str, group: metrics.GroupMetrics) -> Any:
    if group.hidden:
        return None
    members = [r for r in rows if r.attributes.get(attribute, "unknown") == group.group]
    y, p = metrics.as_arrays(members)
    return metrics.observed_expected(int(y.sum()), float(p.sum())).to_json()


def _label_free(rows: Sequence[Row], bands: Sequence[Band]) -> dict[str, Any]:
    by_month: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_month[r.day.strftime("%Y-%m")].append(r.risk)
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9)
    distribution = {
        month: {"n": len(v), **{f"p{int(q * 100)}": float(np.quantile(v, q)) for q in quantiles}}
        for month, v in sorted(by_month.items())
    }
    flags = {b.name: metrics.flags_by_day(rows, b.threshold) for b in bands}
    return {"score_distribution_by_month": distribution, "flags_by_day": flags}


def findings(horizon: str, result: Mapping[str, Any]) -> list[dict[str, str]]:
    """What a model owner must read first, each with the number behind it."""
    out: list[dict[str, str]] = []

    def say(kind: str, text: str) -> None:
        out.append({"horizon": horizon, "kind": kind, "text": text})

    linkage = result["linkage"]
    if result["events"] < MIN_EVENTS:
        say(
            "inconclusive",
            f"{result['events']} events among {result['labelled']} labelled "
            f"predictions ({linkage['pending']} pending): too few to judge discrimination "
            f"or calibration (needs {MIN_EVENTS})",
        )
    _calibration_findings(result["calibration"], say)
    for name, audit in result["subgroups"].items():
        for attribute, groups in audit.items():
            for g in groups:
                for metric in g["outside_fair_range"]:
                    say(
                        "subgroup",
                        f"{attribute}={g['group']} at {name}: {metric} ratio "
                        f"{g['ratios'][metric]:.2f} to the reference group, outside [0.8, 1.25]",
                    )
    return out


def _calibration_findings(cal: Mapping[str, Any], say: Any) -> None:
    citl = metrics.Estimate(**cal["calibration_in_the_large"])
    slope = metrics.Estimate(**cal["calibration_slope"])
    if citl.excludes(0.0) and citl.value is not None:
        way = "over-predicts" if citl.value < 0 else "under-predicts"
        say(
            "miscalibrated",
            f"calibration-in-the-large {citl.value:.2f} "
            f"[{citl.low:.2f}, {citl.high:.2f}] excludes 0: the model {way} risk at this site",
        )
    if slope.excludes(1.0) and slope.value is not None:
        way = "too extreme" if slope.value < 1 else "too moderate"
        say(
            "miscalibrated",
            f"calibration slope {slope.value:.2f} "
            f"[{slope.low:.2f}, {slope.high:.2f}] excludes 1: predicted risks are {way}",
        )


def link_summary(links: Mapping[tuple[str, str], Link]) -> list[dict[str, Any]]:
    """Each link as JSON (the evaluation store's rows; identifiers, no patient ids)."""
    return [{"prediction": k[0], **v.to_json()} for k, v in sorted(links.items())]
