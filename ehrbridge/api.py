"""The ehrbridge HTTP API (default 127.0.0.1:8080).

What a site operator or integration engineer looks at:

* ``GET /health/live``, ``GET /health/ready``, ``GET /metrics``,
  ``GET /api/monitoring/{feeds,drift}``: ``ehrbridge/monitoring.py``;
  ``GET /api/evaluation[/{model}]``: ``ehrbridge/evaluation_api.py``;
  ``GET|POST /api/models/{model}/mode``: promote/demote, ``ehrbridge/promotion_api.py``;
* ``GET /health``: liveness plus the site's mode and counts: results, records
  not scored (not enough data, or outside the model's domain) where this
  process runs the processing role, and in the ingest role the MLLP
  connections (open, refused over the limit, closed by a limit) and the
  HL7v2 messages filtered by type (``message_types``);
* ``GET /api/results``: predictions kept locally (all of them in shadow mode),
  newest first, optionally ``?patient=``; paged by ``?limit=`` (default 100,
  at most 1000) and ``?offset=``, with ``total`` and ``links.next``/``prev``;
  ``?model=`` keeps one of the site's models' results (``models:``);
  each output of the model file in percent (``<output>_percent``) and, as before,
  as a fraction (``<output>``), and all of them under ``outputs``;
* ``GET /api/results/{identifier}``: one result's FHIR Observation;
* ``GET /api/patients/{id}``: what ehrbridge knows of one patient: the
  latest feature record or the reason there is none ("not enough data",
  or ``out_of_domain: egfr 71.9 >= 60``). Only where this process can read
  patient state: on the embedded log always (one SQLite file per site), on
  Kafka only in a process that also runs the processing role (the state is
  its changelog-backed store). Elsewhere it is not served: a 404 problem
  (``application/problem+json``, RFC 9457) names the role that serves it. The
  risk page (``/ui/patients/{id}``) is answered the same way: it withholds a
  score once the newest record left the model's domain, known only from the state;
* ``GET /api/dlq``: dead-lettered records: reason, stage, time, size, oldest
  first, paged by ``?limit=`` (default 100) and the ``?after=`` cursor, with
  ``next_after`` and ``links.next`` while more follow (null on the last page); the raw
  bytes, replay and message search are ``ehrbridge/operator_api.py``'s
  (operator role), the audit trail too (admin role);
* ``GET /api/fhir``: FHIR ingest counters, and each FHIR Subscription's
  status, last event number and gaps (missed notifications);
* ``/fhir/...``: FHIR R4 ingest and Subscription notifications
  (``ehrbridge/fhir_api.py``);
* ``GET /ui/patients/{id}``: the clinician's risk page for one patient (HTML:
  trend chart, inputs, the model, why there is no score), the CDS card's link
  target (``ehrbridge/patient_page.py``);
* ``GET /ui/launch``, ``/ui/launch/callback``: the same page as a SMART on FHIR
  app the EHR launches, where ``smart_launch:`` is set (``ehrbridge/smart_launch.py``);
* ``/docs``, ``/redoc``: the API's description, self-hosted (``ehrbridge/api_docs.py``);
* ``/cds-services``: the CDS Hooks service (``ehrbridge/cds_hooks.py``);
* ``/console``: the operator console's pages (``ehrbridge/console.py``): sign in
  with a token for a session cookie, sites, message search and trace, dead letters.

Every route but the public ones (``ehrbridge.auth.PUBLIC_ROUTES``: health,
CDS discovery, the API description) needs a bearer token whose role the route
names (``ehrbridge/auth.py``): ``viewer`` for results, patients and
monitoring, ``operator`` for dead letters and stored messages, ``admin`` for
the audit trail and for promoting or demoting the model. Every read of
patient data is written to the audit trail before its answer goes out
(``ehrbridge/audit_http.py``). It binds to localhost by default. Access logs
are off because request paths carry patient ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from ehrbridge.adapters.patient_links import PatientLinks
from ehrbridge.api_docs import add_docs_routes
from ehrbridge.audit import AuditTrail, audit_note
from ehrbridge.audit_http import AuditMiddleware
from ehrbridge.auth import Authenticator
from ehrbridge.body_cap import BodyCap
from ehrbridge.cds_auth import CdsClientAuth
from ehrbridge.cds_hooks import CdsService, add_cds_routes
from ehrbridge.config import ApiRole, SiteConfig
from ehrbridge.console import ConsoleParts, add_console_routes
from ehrbridge.core.contracts import utcnow
from ehrbridge.core.version import __version__
from ehrbridge.evaluation_api import add_evaluation_routes
from ehrbridge.fhir_api import FhirEndpoint, add_fhir_routes
from ehrbridge.monitoring import SiteMonitoring, add_monitoring_routes
from ehrbridge.operator_api import add_audit_routes, add_operator_routes
from ehrbridge.patient_page import PATH as PATIENT_PAGE_PATH
from ehrbridge.patient_page import add_patient_page
from ehrbridge.pipelines.results import ResultStore
from ehrbridge.pipelines.state import StateStore
from ehrbridge.pipelines.transport import Log, topic_name
from ehrbridge.promotion import ModeSwitch
from ehrbridge.promotion_api import add_promotion_routes
from ehrbridge.smart_launch import add_smart_launch

# Paging positions are SQLite INTEGERs (64-bit); a larger one is a 422, not a 500.
MAX_OFFSET = 2**62
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such item here"}}
PATIENT_STATE_ROLE = "process"  # the role whose store holds per-patient state


@dataclass(frozen=True, slots=True)
class ApiParts:
    """What the API answers from. A route whose part this process lacks is not served."""

    config: SiteConfig
    auth: Authenticator
    cds_clients: CdsClientAuth
    monitoring: SiteMonitoring
    results: ResultStore
    log: Log  # dead letters and raw messages for the operator routes
    audit: AuditTrail  # who read which patient's data
    patient_links: PatientLinks
    state: StateStore | None = None  # patient state, where this process can read it
    roles: frozenset[str] = frozenset()  # this process's roles, named when a route is elsewhere
    fhir: FhirEndpoint | None = None  # the FHIR ingest endpoint
    counts: Callable[[], dict[str, Any]] = dict  # role counters for /health


def page_links(request: Request, total: int, limit: int, offset: int) -> dict[str, str | None]:
    """Absolute self/next/prev URLs of a ``?limit=&offset=`` page (None past either end)."""

    def at(start: int) -> str:
        return str(request.url.include_query_params(limit=limit, offset=start))

    return {
        "self": at(offset),
        "next": at(offset + limit) if offset + limit < total else None,
        "prev": at(max(offset - limit, 0)) if offset > 0 else None,
    }


def create_api(parts: ApiParts) -> FastAPI:
    app = FastAPI(
        title="ehrbridge",
        version=__version__,
        docs_url=None,  # self-hosted below: FastAPI's pages load from public CDNs
        redoc_url=None,
    )
    add_docs_routes(app, "ehrbridge")
    config, results_store = parts.config, parts.results
    mode = ModeSwitch(config)  # the mode in force: promote/demote switch it while running
    app.add_middleware(AuditMiddleware, trail=parts.audit, routes=lambda: app.routes)
    # Outermost, so nothing below it reads past the ceiling (see body_cap.py). FHIR
    # ingest and CDS Hooks read their bodies with read_limited, in their own formats.
    ceiling = max(config.http.max_body_bytes, config.cds_hooks.max_body_bytes)
    app.add_middleware(BodyCap, limit=ceiling, own_limits=("/fhir", "/cds-services"))
    viewer = [Depends(parts.auth.require(ApiRole.VIEWER))]
    operator = [Depends(parts.auth.require(ApiRole.OPERATOR))]
    admin = [Depends(parts.auth.require(ApiRole.ADMIN))]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "site": config.site,
            "mode": mode().value,
            "version": __version__,
            "results": results_store.count(),
            **parts.counts(),
        }

    @app.get("/api/results", dependencies=viewer)
    def results(
        request: Request,
        patient: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        model: str | None = Query(None, description="one of the site's models (`models:`)"),
    ) -> dict[str, Any]:
        found = results_store.list(patient_id=patient, limit=limit, offset=offset, model=model)
        audit_note(request.scope).patients.extend(r.patient_id for r in found)
        total = results_store.count(patient_id=patient, model=model)
        return {
            "site": config.site,
            "mode": mode().value,
            "total": total,
            "offset": offset,
            "limit": limit,
            "links": page_links(request, total, limit, offset),
            "results": [r.summary() for r in found],
        }

    @app.get("/api/results/{identifier}", responses=NOT_FOUND, dependencies=viewer)
    def result(request: Request, identifier: str) -> dict[str, Any]:
        stored = results_store.get(identifier)
        if stored is None:
            raise HTTPException(404, f"no result {identifier}")
        audit_note(request.scope).patients.append(stored.patient_id)
        return {**stored.summary(), "observation": stored.observation}

    @app.get("/api/fhir", responses=NOT_FOUND, dependencies=viewer)
    def fhir_status() -> dict[str, Any]:
        """FHIR ingest counters and every Subscription's state and event-number gaps."""
        endpoint = parts.fhir
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
        # One past the page: whether more follow is known, not guessed from a full page.
        records = parts.log.read(topic_name(config.site, "dlq"), after=after, limit=limit + 1)
        more, records = len(records) > limit, records[:limit]
        audit_note(request.scope).patients.extend(r.key for r in records)
        next_after = records[-1].offset if more else None
        return {
            "limit": limit,
            "after": after,
            "next_after": next_after,
            "links": {
                "self": str(request.url),
                "next": None
                if next_after is None
                else str(request.url.include_query_params(limit=limit, after=next_after)),
            },
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
            ],
        }

    add_operator_routes(app, parts.log, config.site, operator)
    add_audit_routes(app, parts.audit, admin)
    add_monitoring_routes(app, parts.monitoring, viewer)
    add_evaluation_routes(app, config, viewer)
    add_promotion_routes(app, (config, parts.log, results_store, parts.state), viewer, admin)
    add_smart_launch(app, (config, mode), results_store, parts.state, parts.patient_links)
    if parts.state is not None:
        _add_patient_route(app, parts.config, parts.state, results_store, viewer)
        add_patient_page(app, (config, mode), results_store, parts.state, viewer)
    else:
        # The risk page too: whether the newest record left the model's domain is on the
        # state, and a score that cannot be checked against it is not shown.
        why = "on the Kafka transport the patient state lives with that role's partitions"
        for path in ("/api/patients/{patient_id}", PATIENT_PAGE_PATH):
            elsewhere = ServedElsewhere(path, PATIENT_STATE_ROLE, why)
            _add_served_elsewhere(app, elsewhere, parts.roles, viewer)
    if parts.fhir is not None:
        add_fhir_routes(app, parts.fhir)
    console = ConsoleParts(
        config=config,
        auth=parts.auth,
        log=parts.log,
        results=results_store,
        metrics=parts.monitoring.metrics,
        index_path=config.data_dir / "message-index.sqlite",
        mode=mode,
    )
    add_console_routes(app, console)
    if config.cds_hooks.enabled:
        service = CdsService(
            config, results_store, parts.patient_links, state=parts.state, mode=mode
        )
        add_cds_routes(app, service, parts.cds_clients)
    return app


@dataclass(frozen=True, slots=True)
class ServedElsewhere:
    """A route another role's process answers, and why this one cannot."""

    path: str
    role: str
    why: str

    def problem(self, roles: frozenset[str]) -> dict[str, Any]:
        """An RFC 9457 problem body; ``about:blank``, so the title is the status phrase."""
        runs = ", ".join(sorted(roles)) or "no role"
        return {
            "type": "about:blank",
            "title": "Not Found",
            "status": 404,
            "detail": (
                f"GET {self.path} is served where the {self.role} role runs ({self.why}); "
                f"this process runs {runs}. Ask one that runs the ingest and {self.role} roles."
            ),
            "served_by_role": self.role,
            "this_process_roles": sorted(roles),
        }


def _add_served_elsewhere(
    app: FastAPI, elsewhere: ServedElsewhere, roles: frozenset[str], viewer: list[Any]
) -> None:
    """A route this process cannot answer: 404 with a problem naming the role that can.

    Left out of the API description, which lists what this process serves.
    The token is still checked first, so an anonymous caller learns nothing.
    """

    @app.get(elsewhere.path, include_in_schema=False, dependencies=viewer)
    def served_elsewhere() -> JSONResponse:
        body = elsewhere.problem(roles)
        return JSONResponse(body, status_code=404, media_type="application/problem+json")


def _add_patient_route(
    app: FastAPI,
    config: SiteConfig,
    states: StateStore,
    results_store: ResultStore,
    viewer: list[Any],
) -> None:
    @app.get("/api/patients/{patient_id}", responses=NOT_FOUND, dependencies=viewer)
    def patient(patient_id: str) -> dict[str, Any]:
        state = states.get(patient_id)
        if state is None:
            raise HTTPException(404, "no data for this patient")
        latest = results_store.latest(patient_id, utcnow() + config.mapping.values.future_tolerance)
        return {
            "patient_id": patient_id,
            "birth_date": state.birth_date.isoformat() if state.birth_date else None,
            "sex": state.sex,
            "facts": {k: [f.to_json() for f in v] for k, v in state.facts.items()},
            "last_outcome": state.last_outcome,
            "latest_result": latest.summary() if latest else None,
        }
