"""``POST /api/models/{model}/mode`` (admin): promote a model to live, or demote it to shadow.

What ``ehrbridge promote`` and ``ehrbridge demote`` call on the running site
(``ehrbridge/promotion.py`` has the decision, its record and the switch).
The body: ``{"mode": "live"|"shadow", "reason": ..., "override": false,
"source": "site"|"backfill"}``. The answer is the decision with each
criterion's verdict: 200 when the mode switched, 409 when it was refused
(criteria not passed, no reason, no write-back target), 404 for a model
the site does not run (each of ``models:`` has its own mode), 503 when the
audit trail cannot be written (nothing switches).
``GET /api/models/{model}/mode`` (viewer) says which mode is in force and why.
``POST /api/models/{model}/alerts`` (admin) is an Alertmanager webhook receiver:
an alert named in ``evaluation.promotion.demote_on_alerts`` reported firing
demotes the model, recorded like any demotion with the alert as its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ehrbridge.audit import AuditUnavailable
from ehrbridge.auth import PRINCIPAL_KEY, Principal
from ehrbridge.config import Mode, SiteConfig
from ehrbridge.pipelines.results import ResultStore
from ehrbridge.pipelines.state import StateStore
from ehrbridge.pipelines.transport import Log
from ehrbridge.promotion import (
    DEMOTE,
    PROMOTE,
    Caller,
    decide,
    effective_mode,
    for_model,
    mode_path,
    read_mode_file,
    shadow_results_at_promotion,
)

NOT_HERE: dict[int | str, dict[str, Any]] = {404: {"description": "Not this site's model"}}
DECIDED: dict[int | str, dict[str, Any]] = {
    **NOT_HERE,
    409: {"description": "Refused: criteria not passed, no reason, or no write-back target"},
    503: {"description": "The audit trail cannot be written: nothing switched"},
}


class AlertLabels(BaseModel):
    model_config = ConfigDict(extra="allow")
    alertname: str = ""


class Alert(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str = ""
    labels: AlertLabels = AlertLabels()


class AlertmanagerWebhook(BaseModel):
    """Alertmanager's webhook body (version 4); only what a demotion needs is read."""

    model_config = ConfigDict(extra="allow")
    status: str = ""
    alerts: list[Alert] = Field(default_factory=list, max_length=10_000)


class ModeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Mode
    reason: str | None = Field(None, min_length=1, max_length=2000)
    override: bool = False  # go live although the criteria did not pass (needs a reason)
    source: Literal["site", "backfill"] = "site"  # which evaluation is judged


def add_promotion_routes(
    app: FastAPI,
    parts: tuple[SiteConfig, Log, ResultStore, StateStore | None],
    viewer: Sequence[Depends],
    admin: Sequence[Depends],
) -> None:
    site, log, results, state = parts

    def this_model(model: str) -> SiteConfig:
        """The site's config as ``model`` sees it; 404 for a model the site does not run."""
        config = for_model(site, model)
        if config is None:
            names = ", ".join(m.name for m in site.site_models)
            raise HTTPException(404, f"this site runs {names}, not {model!r}")
        return config

    @app.get("/api/models/{model}/mode", dependencies=list(viewer), responses=NOT_HERE)
    def current_mode(model: str) -> dict[str, Any]:
        config = this_model(model)
        decided = read_mode_file(mode_path(config.data_dir, model))
        mode = decided["mode"] if decided else config.mode.value
        return {
            "model": model,
            "mode": mode,
            "site_file_mode": config.mode.value,
            "decision": decided,
        }

    @app.post("/api/models/{model}/mode", dependencies=list(admin), responses=DECIDED)
    def switch_mode(model: str, body: ModeRequest, request: Request) -> JSONResponse:
        config = this_model(model)
        principal: Principal = request.scope[PRINCIPAL_KEY]
        caller = Caller(
            who=principal.name,
            via=principal.via,
            roles=tuple(sorted(r.value for r in principal.roles)),
            source=request.client.host if request.client else "",
        )
        action = PROMOTE if body.mode is Mode.LIVE else DEMOTE
        try:
            decision = decide(
                config,
                caller,
                action,
                reason=body.reason,
                override=body.override,
                source=body.source,
                on_live=lambda: shadow_results_at_promotion(config, log, results, state),
            )
        except AuditUnavailable as error:
            raise HTTPException(503, str(error)) from None
        status = 409 if decision.outcome == "refused" else 200
        return JSONResponse(decision.to_json(), status_code=status)

    @app.post("/api/models/{model}/alerts", dependencies=list(admin), responses=DECIDED)
    def alert_webhook(model: str, body: AlertmanagerWebhook, request: Request) -> Any:
        """Alertmanager's webhook: a firing alert the site lists demotes the model."""
        config = this_model(model)
        listed = set(
            config.evaluation.promotion.demote_on_alerts if config.evaluation.promotion else ()
        )
        firing = sorted(
            {
                a.labels.alertname
                for a in body.alerts
                if a.status == "firing" and a.labels.alertname in listed
            }
        )
        if not firing or effective_mode(config) is Mode.SHADOW:
            return {"demoted": False, "firing": firing}
        principal: Principal = request.scope[PRINCIPAL_KEY]
        caller = Caller(
            principal.name,
            principal.via,
            tuple(sorted(r.value for r in principal.roles)),
            request.client.host if request.client else "",
        )
        reason = "alert firing: " + ", ".join(firing)
        try:
            decision = decide(config, caller, DEMOTE, reason=reason)
        except AuditUnavailable as error:
            raise HTTPException(503, str(error)) from None
        return {"demoted": decision.outcome == Mode.SHADOW.value, "firing": firing}
