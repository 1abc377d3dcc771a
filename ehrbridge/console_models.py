"""The console's models page: ``/console/models`` (viewer), per model of the site.

What a model owner decides with, on one page:

* the mode in force (the mode file's decision, else the site file's ``mode:``)
  and who decided it when;
* from the site's running monitoring (``GET /api/monitoring/drift``, daily
  fixed-bin counts, ``pipelines/drift.py``): each feature's PSI against the
  reference per day, each feature's missing rate per day, the score
  distribution against the reference, and the flag burden (predictions in a
  band other than ``N``) per day;
* from the last ``ehrbridge evaluate`` (``GET /api/evaluation/{model}``), once
  outcomes exist: AUROC and calibration per horizon with the calibration curve
  and the ROC curve;
* the promotion criteria (``evaluation.promotion``) judged now against that
  evaluation, pass/fail/inconclusive each, as ``ehrbridge promote`` judges them.

Admins get promote and demote buttons. They call the same route as
``ehrbridge promote`` does, ``POST /api/models/{model}/mode``, from
``static/models.js`` with the session's CSRF token: the decision, its audit
entry and the switch are that route's (``ehrbridge/promotion_api.py``), so the
page adds no second way to change a mode. Anyone else sees the criteria and no
button, and the route refuses them (403). The page shows aggregates only (no
patient), so reading it is not a patient-data read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup

from ehrbridge.auth import PRINCIPAL_KEY, Principal
from ehrbridge.config import ApiRole, SiteConfig
from ehrbridge.console import Console, page_caller
from ehrbridge.console_charts import (
    ALARM,
    WARN,
    bars_over_days,
    histogram,
    lines_over_days,
    unit_square,
)
from ehrbridge.evaluation_api import SOURCES, saved_path
from ehrbridge.pipelines.drift import BINS, PSI_ALARM, PSI_WARN, SCORE
from ehrbridge.promotion import (
    effective_mode,
    for_model,
    judge_saved,
    mode_path,
    read_mode_file,
)

NOT_FLAGGED = "N"  # the band of a prediction below every threshold (adapters/prometheus_metrics.py)


def add_model_routes(app: FastAPI, console: Console) -> None:
    viewer = Depends(page_caller(console.parts.auth, ApiRole.VIEWER))

    @app.get("/console/models", include_in_schema=False, dependencies=[viewer])
    def models(request: Request) -> HTMLResponse:
        user = request.scope.get(PRINCIPAL_KEY)
        admin = isinstance(user, Principal) and user.may(ApiRole.ADMIN)
        drift = console.parts.metrics.drift_json() if console.parts.metrics else {}
        site = console.parts.config
        views = [model_view(site, m.name, drift) for m in site.site_models]
        return console.render(
            request, "models.html", "Models", models=views, admin=admin, estimate=estimate
        )


def model_view(site: SiteConfig, name: str, drift: Mapping[str, Any]) -> dict[str, Any]:
    """One of the site's models: its mode, monitoring, evaluations and criteria."""
    config = for_model(site, name)
    assert config is not None  # name is one of site.site_models
    return {
        "name": name,
        "mode": effective_mode(config).value,
        "site_file_mode": config.mode.value,
        "decision": read_mode_file(mode_path(config.data_dir, name)),
        "monitoring": monitoring_view(
            drift.get(name, {}), [i.name for i in config.model.declared.inputs]
        ),
        "evaluations": [e for s in SOURCES if (e := evaluation_view(config, name, s))],
        "criteria": criteria_view(config),
    }


# ---------------------------------------------------------------------- monitoring


def monitoring_view(monitored: Mapping[str, Any], inputs: Sequence[str]) -> dict[str, Any]:
    """Charts over the monitoring's daily series (at most its 60 kept days).

    ``inputs``: the model's inputs (its model file); drift is drawn for those
    the monitoring bins, missingness for all.
    """
    days_data: list[dict[str, Any]] = list(monitored.get("days", []))
    days = [d["date"] for d in days_data]
    binned = [f for f in inputs if f in BINS and f != SCORE]
    psi = {f: [_psi(d, f) for d in days_data] for f in (*binned, SCORE)}
    missing = {f: [_missing(d, f) for d in days_data] for f in inputs}
    flags = [
        sum(n for band, n in d.get("bands", {}).items() if band != NOT_FLAGGED) for d in days_data
    ]
    scores = [sum(d["bins"][SCORE][i] for d in days_data) for i in range(len(BINS[SCORE]) + 1)]
    reference = monitored.get("reference", {}).get("counts", {}).get(SCORE, [])
    limits = ((PSI_WARN, WARN), (PSI_ALARM, ALARM))
    return {
        "days": len(days),
        "records": sum(int(d.get("records", 0)) for d in days_data),
        "reference_from": monitored.get("reference_from"),
        "reference_days": monitored.get("reference_days"),
        "reference_frozen": bool(monitored.get("reference_frozen")),
        "latest": _latest_levels(days_data, (*binned, SCORE)),
        "psi_chart": lines_over_days(
            "PSI per feature per day against the reference",
            days,
            psi,
            floor_top=0.25,
            limits=limits,
        ),
        "missing_chart": lines_over_days(
            "Share of feature records missing each input, per day",
            days,
            missing,
            fmt=".0%",
            floor_top=0.1,
        ),
        "score_chart": histogram(
            "Score distribution over the kept days, with the reference's share per bin",
            BINS[SCORE],
            scores,
            reference,
        ),
        "flags_chart": bars_over_days("Flagged predictions per day", days, flags),
        "flags_per_day": round(sum(flags) / len(days), 2) if days else None,
    }


def _psi(day: Mapping[str, Any], feature: str) -> float | None:
    found = day.get("drift", {}).get(feature)
    return float(found["psi"]) if found else None


def _missing(day: Mapping[str, Any], feature: str) -> float | None:
    if not day.get("records"):
        return None  # no feature record that day: no rate, not 0 %
    return float(day.get("missing_rate", {}).get(feature, 0.0))


def _latest_levels(
    days: Sequence[Mapping[str, Any]], features: Sequence[str]
) -> list[dict[str, Any]]:
    """Each feature's last compared day: PSI and its level (ok / warn / alarm)."""
    last: dict[str, dict[str, Any]] = {}
    for day in days:
        for feature, found in day.get("drift", {}).items():
            last[feature] = {"feature": feature, "date": day["date"], **found}
    return [last[f] for f in features if f in last]


# ---------------------------------------------------------------------- evaluation


def evaluation_view(config: SiteConfig, model: str, source: str) -> dict[str, Any] | None:
    """The saved evaluation's outcome-based numbers, per horizon; None if never run."""
    path = saved_path(config.data_dir, model, source)
    if model != config.model.name or not path.is_file():
        return None
    doc = orjson.loads(path.read_bytes())
    horizons = [_horizon(h, data) for h, data in doc.get("horizons", {}).items()]
    return {
        "source": source,
        "as_of": doc.get("as_of"),
        "predictions": doc.get("predictions"),
        "patients": doc.get("patients"),
        "horizons": horizons,
        "findings": doc.get("findings", []),
    }


def _horizon(name: str, h: Mapping[str, Any]) -> dict[str, Any]:
    calibration, roc = h["calibration"], h["discrimination"]["roc"]
    curve = calibration.get("curve", [])
    points = [(b["mean_risk"], b["observed"]["value"]) for b in curve]
    whiskers = [(b["observed"]["low"], b["observed"]["high"]) for b in curve]
    return {
        "horizon": name,
        "labelled": h["labelled"],
        "events": h["events"],
        "pending": h["linkage"].get("pending", 0),
        "auroc": h["discrimination"]["auroc"],
        "slope": calibration["calibration_slope"],
        "citl": calibration["calibration_in_the_large"],
        "brier": calibration.get("brier"),
        "calibration_chart": unit_square(
            f"Calibration at {name}: observed event rate against mean predicted risk",
            points,
            whiskers=whiskers,
            x_name="predicted",
            y_name="observed",
        ),
        "roc_chart": unit_square(
            f"ROC curve at {name}",
            list(zip(roc["fpr"], roc["tpr"], strict=True)),
            joined=True,
            x_name="false positive rate",
            y_name="true positive rate",
        ),
        "thresholds": h.get("thresholds", []),
        **_label_free(name, h.get("label_free", {})),
    }


def _label_free(name: str, label_free: Mapping[str, Any]) -> dict[str, Markup]:
    """The evaluation's view before outcomes: score quantiles and flags, per month."""
    by_month = label_free.get("score_distribution_by_month", {})
    months = list(by_month)
    quantiles = {q: [by_month[m][q] for m in months] for q in ("p10", "p50", "p90")}
    flags: dict[str, list[float | None]] = {}
    for band, per_day in label_free.get("flags_by_day", {}).items():
        per_month: dict[str, float] = dict.fromkeys(months, 0.0)
        for day, count in per_day.items():
            per_month[day[:7]] = per_month.get(day[:7], 0.0) + count
        flags[band] = [per_month.get(m) for m in months]
    return {
        "score_months_chart": lines_over_days(
            f"Predicted risk at {name} by month: 10th, 50th and 90th percentiles",
            months,
            quantiles,
            fmt=".0%",
        ),
        "flags_months_chart": lines_over_days(
            f"Flagged predictions per month at each band ({name})", months, flags, fmt=".0f"
        ),
    }


def estimate(value: Mapping[str, Any] | None) -> str:
    """``0.812 [0.771, 0.853]``, or why there is none."""
    if not value or value.get("value") is None:
        return str((value or {}).get("reason") or "—")
    return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


# ---------------------------------------------------------------------- criteria


def criteria_view(config: SiteConfig) -> dict[str, Any]:
    """The site's promotion criteria judged now against the site evaluation, as promote does."""
    overall, verdicts, evidence = judge_saved(config, "site")
    return {"overall": overall, "verdicts": verdicts, "evidence": evidence}
