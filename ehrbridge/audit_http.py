"""Auditing the HTTP API: every call of a route that reads patient data gets an entry.

:class:`AuditMiddleware` is plain ASGI around the whole app. For a request
whose route is in :data:`AUDITED` it puts an :class:`AuditNote` in the ASGI
scope, where the handler writes the patients its answer holds; the auth
dependency (``ehrbridge/auth.py``) puts the caller beside it. When the response starts --
whatever its status: a 200, a 403, a 401 -- the entry is written
(``ehrbridge/audit.py``), and only then is the response sent. If the entry
cannot be written the caller gets 503 instead of the data.

Every route is on exactly one of :data:`AUDITED`, :data:`NOT_AUDITED` (with
why it reads no patient data) or ``auth.PUBLIC_ROUTES`` (:data:`CONFIGURED_ONLY`
lists those served only where a site sets them up);
``tests/facade/test_audit.py`` walks the route table to hold that.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from ehrbridge.audit import SCOPE_KEY, AuditEvent, AuditNote, AuditTrail, AuditUnavailable
from ehrbridge.auth import PRINCIPAL_KEY, Principal
from ehrbridge.cds_hooks import SERVICE_ID

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# (method, path template): routes whose answers hold patient-level data.
AUDITED: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/api/results"),  # patient ids and risks
        ("GET", "/api/results/{identifier}"),  # one result's Observation
        ("GET", "/api/patients/{patient_id}"),  # birth date, sex, labs
        ("GET", "/ui/patients/{patient_id}"),  # the clinician's risk page: risks, labs, dates
        # The same page at the end of a SMART EHR launch; who is the EHR's user (fhirUser).
        ("GET", "/ui/launch/callback"),
        ("GET", "/api/dlq"),  # dead letters: source ids, reasons (the patients are named)
        ("GET", "/api/dlq/{offset}"),  # one dead letter with its raw bytes
        ("POST", "/api/dlq/replay"),  # sends PHI back through the pipeline
        ("GET", "/api/messages"),  # message search over the raw log
        ("GET", "/api/messages/{offset}"),  # one stored message with its raw bytes
        ("GET", "/api/audit"),  # the audit trail itself names patients
        ("GET", "/console/messages"),  # the console's message search: MRNs, control ids
        ("GET", "/console/messages/{topic}/{offset}"),  # a message's trace, raw to operators
        ("GET", "/console/dead-letters"),  # dead letters with their MRNs and details
        ("POST", f"/cds-services/{SERVICE_ID}"),  # a card: risk, eGFR, UACR, dates
        # Promote/demote: every attempt (a 403 too); the decision itself, with its
        # evidence, is a second entry (ehrbridge/promotion.py). At promotion it may
        # send shadow results through write-back, as a replay does.
        ("POST", "/api/models/{model}/mode"),
        ("POST", "/api/models/{model}/alerts"),  # Alertmanager: may demote, as above
    }
)
# Served only where the site configures them (smart_launch:), so not on the sandbox.
CONFIGURED_ONLY: frozenset[tuple[str, str]] = frozenset({("GET", "/ui/launch/callback")})
# Routes that need a token but answer nothing about any one patient.
NOT_AUDITED: dict[tuple[str, str], str] = {
    ("GET", "/metrics"): "counters and histograms, no patient",
    ("GET", "/api/monitoring/feeds"): "message counts per feed and hour",
    ("GET", "/api/monitoring/drift"): "feature distributions per day",
    ("GET", "/api/fhir"): "ingest counters, Subscription event numbers",
    ("GET", "/console/sites"): "the console's counts per site, model and feed",
    ("GET", "/console/sites/data"): "the same counts as JSON (the page's refresh)",
    ("GET", "/console/models"): "per model: mode, drift, score distribution, criteria",
    ("GET", "/api/models/{model}/mode"): "the model's mode and the last decision",
    ("GET", "/api/evaluation"): "which evaluations exist: model, source, counts",
    ("GET", "/api/evaluation/{model}"): "aggregates of the last evaluate: no patient id",
    ("GET", "/fhir/{resource_type}"): "not served (405): ehrbridge is not a FHIR server",
    ("GET", "/fhir/{resource_type}/{resource_id}"): "not served (405)",
    ("POST", "/fhir"): "ingest (a write by the EHR), kept in the log",
    ("POST", "/fhir/"): "ingest, as POST /fhir",
    ("POST", "/fhir/{resource_type}"): "ingest, as POST /fhir",
    ("PUT", "/fhir/{resource_type}/{resource_id}"): "ingest, as POST /fhir",
    ("POST", "/fhir/subscription-notification"): "ingest: a notification from the EHR",
    ("POST", f"/cds-services/{SERVICE_ID}/feedback"): "the EHR's feedback on a card: no data out",
}


class AuditMiddleware:
    """Write an audit entry before the response of an audited route goes out."""

    def __init__(self, app: App, trail: AuditTrail, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.trail = trail
        self._routes = routes
        self._table: list[tuple[str, re.Pattern[str], str]] | None = None

    def action(self, method: str, path: str) -> str | None:
        """``"GET /api/patients/{patient_id}"`` when the request is one to audit."""
        if self._table is None:  # the app's routes are all added by the first request
            self._table = [
                (m, route.path_regex, route.path)
                for route in self._routes()
                for m in getattr(route, "methods", None) or ()
                if (m, route.path) in AUDITED
            ]
        for known, pattern, template in self._table:
            if known == method and pattern.match(path):
                return f"{method} {template}"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        action = None
        if scope["type"] == "http":
            action = self.action(scope["method"], scope["path"])
        if action is None:
            await self.app(scope, receive, send)
            return
        note = scope[SCOPE_KEY] = AuditNote()
        refused = False

        async def audited(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start":
                event = _event(scope, note, action, int(message["status"]))
                try:
                    await asyncio.to_thread(self.trail.record, event)
                except AuditUnavailable:
                    refused = True
                    await _unavailable(send)
                    return
            if not refused:
                await send(message)

        await self.app(scope, receive, audited)


def _event(scope: Scope, note: AuditNote, action: str, status: int) -> AuditEvent:
    who = scope.get(PRINCIPAL_KEY)
    if not isinstance(who, Principal):
        who = None
    client = scope.get("client")
    return AuditEvent(
        who=who.name if who else "-",
        via=who.via if who else "",
        roles=tuple(sorted(r.value for r in who.roles)) if who else (),
        action=action,
        outcome=status,
        patients=tuple(note.patients or _asked_about(scope)),
        source=str(client[0]) if client else "",
        detail=note.detail,
    )


def _asked_about(scope: Scope) -> list[str]:
    """The patient a refused or failed request named (path or ``?patient=``)."""
    asked = scope.get("path_params", {}).get("patient_id")
    if asked:
        return [str(asked)]
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("patient", [])[:1]


async def _unavailable(send: Send) -> None:
    body = b'{"detail":"the audit trail cannot be written; no patient data without it"}'
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"30")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
