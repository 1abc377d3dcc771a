"""The ehrbridge HTTP API (default 127.0.0.1:8080).

What a site operator or integration engineer looks at:

* ``GET /health/live``, ``GET /health/ready``, ``GET /metrics``,
  ``GET /api/monitoring/{feeds,drift}``: ``ehrbridge/monitoring.py``;
* ``GET /health``: liveness plus the site's mode and counts: results, records
  not scored (not enough data, or outside the model's domain) where this
  process runs the processing role, and in the ingest role the MLLP
  connections (open, refused over the limit, closed by a limit) and the
  HL7v2 messages filtered by type (``message_types``);
* ``GET /api/results``: predictions kept locally (all of them in shadow mode),
  newest first, optionally ``?patient=``; paged by ``?limit=`` (default 100,
  at most 1000) and ``?offset=``, with ``total`` and ``links.next``/``prev``;
  risks in percent (``risk_2y_percent``) and, as before, as fractions (``risk_2y``);
* ``GET /api/results/{identifier}``: one result's FHIR Observation;
* ``GET /api/patients/{id}``: what ehrbridge knows of one patient: the
  latest feature record or the reason there is none ("not enough data",
  or ``out_of_domain: egfr 71.9 >= 60``);
* ``GET /api/dlq``: dead-lettered records: reason, stage, time, size; the raw
  bytes, replay and message search are ``ehrbridge/operator_api.py``'s
  (operator role), the audit trail too (admin role);
* ``GET /api/fhir``: FHIR ingest counters, and each FHIR Subscription's
  status, last event number and gaps (missed notifications);
* ``/fhir/...``: FHIR R4 ingest and Subscription notifications
  (``ehrbridge/fhir_api.py``);
* ``/cds-services``: the CDS Hooks service (``ehrbridge/cds_hooks.py``).

Every route but the public ones (``ehrbridge.auth.PUBLIC_ROUTES``: health,
CDS discovery, the API description) needs a bearer token whose role the route
names (``ehrbridge/auth.py``): ``viewer`` for results, patients and
monitoring, ``operator`` for dead letters and stored messages, ``admin`` for
the audit trail. Every read of patient data is written to the audit trail
before its answer goes out (``ehrbridge/audit_http.py``). It binds to
localhost by default. Access logs are off because request paths carry
patient ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request

from ehrbridge import __version__
from ehrbridge.audit import audit_note
from ehrbridge.audit_http import AuditMiddleware
from ehrbridge.auth import Authenticator
from ehrbridge.cds_auth import CdsClientAuth
from ehrbridge.cds_hooks import CdsService, add_cds_routes
from ehrbridge.config import ApiRole
from ehrbridge.core.contracts import utcnow
from ehrbridge.fhir_api import add_fhir_routes
from ehrbridge.monitoring import add_monitoring_routes
from ehrbridge.operator_api import add_audit_routes, add_operator_routes

if TYPE_CHECKING:
    from ehrbridge.runtime import SiteRuntime

# Paging positions are SQLite INTEGERs (64-bit); a larger one is a 422, not a 500.
MAX_OFFSET = 2**62
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such item here"}}


def _ingest_counts(runtime: SiteRuntime) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    if runtime.mllp is not None:
        counts["mllp"] = runtime.mllp.stats.snapshot()
    if runtime.ingest is not None:
        counts["filtered"] = dict(sorted(runtime.ingest.message_types.filtered.items()))
    return counts


def page_links(request: Request, total: int, limit: int, offset: int) -> dict[str, str | None]:
    """Absolute self/next/prev URLs of a ``?limit=&offset=`` page (None past either end)."""

    def at(start: int) -> str:
        return str(request.url.include_query_params(limit=limit, offset=start))

    return {
        "self": at(offset),
        "next": at(offset + limit) if offset + limit < total else None,
        "prev": at(max(offset - limit, 0)) if offset > 0 else None,
    }


def create_api(runtime: SiteRuntime, auth: Authenticator, cds_clients: CdsClientAuth) -> FastAPI:
    app = FastAPI(
        title="ehrbridge",
        version=__version__,
        docs_url="/docs",
    )
    config = runtime.config
    app.add_middleware(AuditMiddleware, trail=runtime.audit, routes=lambda: app.routes)
    viewer = [Depends(auth.require(ApiRole.VIEWER))]
    operator = [Depends(auth.require(ApiRole.OPERATOR))]
    admin = [Depends(auth.require(ApiRole.ADMIN))]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "site": config.site,
            "mode": config.mode.value,
            "version": __version__,
            "results": runtime.results.count(),
            "not_scored": _not_scored(runtime),
            **_ingest_counts(runtime),
        }

    @app.get("/api/results", dependencies=viewer)
    def results(
        request: Request,
        patient: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
    ) -> dict[str, Any]:
        found = runtime.results.list(patient_id=patient, limit=limit, offset=offset)
        audit_note(request.scope).patients.extend(r.patient_id for r in found)
        total = runtime.results.count(patient_id=patient)
        return {
            "site": config.site,
            "mode": config.mode.value,
            "total": total,
            "offset": offset,
            "limit": limit,
            "links": page_links(request, total, limit, offset),
            "results": [r.summary() for r in found],
        }

    @app.get("/api/results/{identifier}", responses=NOT_FOUND, dependencies=viewer)
    def result(request: Request, identifier: str) -> dict[str, Any]:
        stored = runtime.results.get(identifier)
        if stored is None:
            raise HTTPException(404, f"no result {identifier}")
        audit_note(request.scope).patients.append(stored.patient_id)
        return {**stored.summary(), "observation": stored.observation}

    @app.get("/api/patients/{patient_id}", responses=NOT_FOUND, dependencies=viewer)
    def patient(patient_id: str) -> dict[str, Any]:
        state = runtime.state.get(patient_id)
        if state is None:
            raise HTTPException(404, "no data for this patient")
        latest = runtime.results.latest(
            patient_id, utcnow() + config.mapping.values.future_tolerance
        )
        return {
            "patient_id": patient_id,
            "birth_date": state.birth_date.isoformat() if state.birth_date else None,
            "sex": state.sex,
            "facts": {k: [f.to_json() for f in v] for k, v in state.facts.items()},
            "last_outcome": state.last_outcome,
            "latest_result": latest.summary() if latest else None,
        }

    @app.get("/api/fhir", responses=NOT_FOUND, dependencies=viewer)
    def fhir_status() -> dict[str, Any]:
        """FHIR ingest counters and every Subscription's state and event-number gaps."""
        endpoint = runtime.fhir
        if endpoint is None:
            raise HTTPException(404, "this process does not run the ingest role")
        return {
            "site": config.site,
            "ingest": endpoint.stats.snapshot(),
            "subscriptions": endpoint.subscriptions(),
        }

    @app.get("/api/dlq", dependencies=operator)
    def dlq(
        request: Request,
        limit: int = Query(100, ge=1, le=1000),
        after: int = Query(-1, ge=-1, le=MAX_OFFSET),
    ) -> dict[str, Any]:
        records = runtime.log.read(runtime.topic("dlq"), after=after, limit=limit)
        audit_note(request.scope).patients.extend(r.key for r in records)
        return {
            "records": [
                {
                    "offset": r.offset,
                    "source_id": r.headers.get("source_id"),
                    "reason": r.headers.get("error.reason"),
                    "detail": r.headers.get("error.detail"),
                    "stage": r.headers.get("error.stage"),
                    "at": r.headers.get("error.at"),
                    "bytes": len(r.value),
                }
                for r in records
            ]
        }

    add_operator_routes(app, runtime, operator)
    add_audit_routes(app, runtime.audit, admin)
    add_monitoring_routes(app, runtime.monitoring, viewer)
    if runtime.fhir is not None:
        add_fhir_routes(app, runtime.fhir)
    if config.cds_hooks.enabled:
        service = CdsService(config, runtime.results, runtime.patient_links, state=runtime.state)
        add_cds_routes(app, service, cds_clients)
    return app


def _not_scored(runtime: SiteRuntime) -> dict[str, int] | None:
    """Records the model was not asked about since start, by why (processing role only).

    ``out_of_domain``: outside the model's validated domain (pipelines/domain.py);
    each patient's own reason is on ``/api/patients/{id}``.
    """
    stage = runtime.process_stage
    if stage is None:
        return None
    return {"not_enough_data": stage.not_enough_data, "out_of_domain": stage.out_of_domain}
