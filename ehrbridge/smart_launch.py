"""The patient risk page as a SMART on FHIR app the EHR launches (``smart_launch:``).

https://hl7.org/fhir/smart-app-launch/app-launch.html, EHR launch, as a
public client with PKCE (S256):

1. ``GET /ui/launch?iss=&launch=``: the EHR opens this. ``iss`` must be one
   of ``smart_launch.issuers`` exactly (otherwise 400: no request makes
   ehrbridge call, or send a browser to, a server the site did not name).
   Its ``.well-known/smart-configuration`` gives the endpoints; the browser
   goes to the authorization endpoint with ``response_type=code``, the
   client id, redirect URI, scope, ``launch``, ``aud=iss``, a random
   ``state`` and the PKCE challenge. The state and verifier stay here, in
   memory, for ten minutes and one use.
2. ``GET /ui/launch/callback?code=&state=``: the state is taken (once), the
   code exchanged with the verifier, and the token response's ``patient``
   (the EHR's FHIR id) becomes the site's patient id as the CDS service finds
   it: a learned link, else the identifier with the site's system on the
   EHR's ``Patient`` (read with the launch's access token), else the id
   itself. The answer is that patient's risk page
   (``ehrbridge/patient_page.py``).

The launch grants that one page, for that one patient: no session and no
API access follow from it, so each launch goes through the EHR's
authorization again. The caller in the audit trail is the ``id_token``'s
``fhirUser`` (else ``sub``) -- the ID token came straight from the token
endpoint over TLS, which OpenID Connect Core 3.1.3.7 accepts in place of its
signature -- with ``via`` naming the EHR. Failures are a short page that
names the step that failed, never a token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import urlencode

import jwt
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ehrbridge.adapters.patient_links import PatientLinks
from ehrbridge.adapters.smart_launch import (
    LaunchFailed,
    SmartEndpoints,
    discover,
    exchange,
    read_patient,
)
from ehrbridge.audit import audit_note
from ehrbridge.auth import PRINCIPAL_KEY, Principal
from ehrbridge.config import ApiRole, Mode, SiteConfig, SmartLaunch
from ehrbridge.patient_page import render
from ehrbridge.pipelines.results import ResultStore
from ehrbridge.pipelines.state import StateStore

LAUNCH_PATH, CALLBACK_PATH = "/ui/launch", "/ui/launch/callback"
PENDING_TTL_S = 600.0  # a user takes a while to sign in at the EHR
PENDING_LIMIT = 10_000  # launches started and not yet back; the oldest goes first


@dataclass(frozen=True, slots=True)
class Pending:
    iss: str
    endpoints: SmartEndpoints
    verifier: str
    redirect_uri: str
    expires: float


class PendingLaunches:
    """Launches sent to the EHR and not yet back, by their ``state``; each taken once."""

    def __init__(self) -> None:
        self._by_state: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def put(self, pending: Pending) -> str:
        state = secrets.token_urlsafe(24)
        with self._lock:
            while len(self._by_state) >= PENDING_LIMIT:
                del self._by_state[next(iter(self._by_state))]
            self._by_state[state] = pending
        return state

    def take(self, state: str) -> Pending | None:
        with self._lock:
            pending = self._by_state.pop(state, None)
        return pending if pending is not None and pending.expires > time.time() else None


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(SHA-256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


NO_STATE = (
    "This ehrbridge process cannot read the patient state, so it cannot check that the "
    "patient is inside the model's validated population. Launch the risk page from a "
    "process that also runs the process role."
)


def add_smart_launch(
    app: FastAPI,
    site: tuple[SiteConfig, Callable[[], Mode]],
    results: ResultStore,
    states: StateStore | None,
    links: PatientLinks,
) -> None:
    config = site[0]
    settings = config.smart_launch
    if settings is None:
        return
    pending = PendingLaunches()
    issuers = {i.rstrip("/") for i in settings.issuers}

    @app.get(LAUNCH_PATH, include_in_schema=False)
    async def launch(request: Request, iss: str = "", launch: str = "") -> Response:
        if states is None:  # no score it cannot check against the model's domain
            return _failure(NO_STATE, 404)
        if iss.rstrip("/") not in issuers or not launch:
            return _failure("This EHR is not set up to launch ehrbridge (iss), or no launch.")
        try:
            endpoints = await asyncio.to_thread(discover, iss, settings.timeout_s)
        except LaunchFailed as failed:
            return _failure(str(failed), 502)
        redirect_uri = settings.redirect_uri or str(request.url_for("smart_callback"))
        verifier = secrets.token_urlsafe(48)
        expires = time.time() + PENDING_TTL_S
        started = Pending(iss.rstrip("/"), endpoints, verifier, redirect_uri, expires)
        query = _authorize_query(settings, started, launch, pending.put(started))
        return RedirectResponse(f"{endpoints.authorize}?{query}", status_code=302)

    @app.get(CALLBACK_PATH, include_in_schema=False, name="smart_callback")
    async def callback(
        request: Request, code: str = "", state: str = "", error: str = ""
    ) -> Response:
        if states is None:
            return _failure(NO_STATE, 404)
        if error:
            return _failure(f"The EHR did not authorize the launch ({error[:100]}).", 403)
        started = pending.take(state) if state else None
        if started is None or not code:
            return _failure("This launch is unknown or expired: open it from the EHR again.")
        try:
            who, patient_id, fhir_id = await asyncio.to_thread(
                _complete, settings, started, code, (config, links)
            )
        except LaunchFailed as failed:
            return _failure(str(failed), 502)
        roles = frozenset({ApiRole.VIEWER})
        request.scope[PRINCIPAL_KEY] = Principal(who, roles, f"smart {started.iss}")
        audit_note(request.scope).patients.extend(dict.fromkeys((patient_id, fhir_id)))
        return await asyncio.to_thread(render, site, results, states, patient_id, launched=True)


def _authorize_query(settings: SmartLaunch, started: Pending, launch: str, state: str) -> str:
    return urlencode(
        {
            "response_type": "code",
            "client_id": settings.client_id,
            "redirect_uri": started.redirect_uri,
            "scope": settings.scope,
            "launch": launch,
            "aud": started.iss,
            "state": state,
            "code_challenge": pkce_challenge(started.verifier),
            "code_challenge_method": "S256",
        }
    )


def _complete(
    settings: SmartLaunch, started: Pending, code: str, site: tuple[SiteConfig, PatientLinks]
) -> tuple[str, str, str]:
    """Exchange the code; (who, the site's patient id, the EHR's patient id)."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": started.redirect_uri,
        "client_id": settings.client_id,
        "code_verifier": started.verifier,
    }
    token = exchange(started.endpoints, form, settings.timeout_s)
    fhir_id, access = token.get("patient"), token.get("access_token")
    if not isinstance(fhir_id, str) or not fhir_id or not isinstance(access, str):
        raise LaunchFailed("the EHR's token response names no patient (is 'launch' in scope?)")
    config, links = site
    patient_id = links.patient_for(fhir_id) or _site_identifier(
        read_patient(started.iss, fhir_id, access, settings.timeout_s),
        config.mapping.patient.fhir_system,
    )
    return _who(token, settings.client_id), patient_id or fhir_id, fhir_id


def _site_identifier(patient: dict[str, Any], system: str) -> str | None:
    identifiers = patient.get("identifier")
    for identifier in identifiers if isinstance(identifiers, list) else ():
        if isinstance(identifier, dict) and identifier.get("system") == system:
            value = identifier.get("value")
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _who(token: dict[str, Any], client_id: str) -> str:
    """The signed-in user from the ID token (fetched directly over TLS), else "smart-user"."""
    id_token = token.get("id_token")
    if not isinstance(id_token, str):
        return "smart-user"
    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return "smart-user"
    audience = claims.get("aud")
    if client_id not in (audience if isinstance(audience, list) else [audience]):
        return "smart-user"
    return str(claims.get("fhirUser") or claims.get("sub") or "smart-user")


def _failure(message: str, status: int = 400) -> HTMLResponse:
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Launch failed - ehrbridge</title></head><body><main>"
        f"<h1>The risk page could not be opened</h1><p>{escape(message)}</p>"
        "</main></body></html>"
    )
    return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})
