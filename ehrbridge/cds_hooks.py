"""CDS Hooks: the latest result of the site's model as a card when a clinician opens a chart.

Routes (https://cds-hooks.hl7.org/2.0/)::

    GET  /cds-services                              discovery
    POST /cds-services/kfre-patient-view            the patient-view hook
    POST /cds-services/kfre-patient-view/feedback   card feedback (counted)

The hook never calls the model. Its card comes from the **precomputed**
latest prediction in the local result store (``pipelines/results.py``), so
it costs one indexed SQLite read and answers in about a millisecond -- far
inside the specification's budget, and the EHR's chart opening never waits
on a model server. No stored score means 200 with no cards.

Which patient: ``context.patientId`` is the EHR's FHIR id, ehrbridge keys
results by the site's patient identifier (``mapping.patient``). It is found,
in order, from

1. ``prefetch.patient`` (discovery asks for ``Patient/{{context.patientId}}``):
   its identifier with the site's system;
2. the links learned from FHIR input (a Patient with both its id and the
   site's identifier, ``adapters/patient_links.py``);
3. a read of ``Patient/<id>`` from ``fhirServer`` with the request's
   ``fhirAuthorization`` -- only when ``fhirServer`` is the site's own
   configured FHIR base (no request makes us call an arbitrary URL);
4. ``context.patientId`` itself (sites whose FHIR ids are their MRNs).

The card: ``summary`` (under 140 characters), the model file's template
(``rendering.card.summary``) with each output in percent;
``indicator`` from the interpretation band the Observation got (``HH``
critical, ``H`` warning, ``N`` info); ``detail`` (markdown) with the inputs
and their dates; ``source`` naming ehrbridge, the model and its version; a
link to the patient's risk page with this result highlighted
(``/ui/patients/{id}?result=``, ``ehrbridge/patient_page.py``; a site may
point it elsewhere with ``cds_hooks.details_url``). In shadow mode
there are no cards unless ``cds_hooks.cards_in_shadow_mode`` is set:
clinicians see nothing of a site that is still being validated.

No score is ever shown for a patient outside the model's validated domain
(``pipelines/domain.py``): such a record is never scored, so it has no
stored result, and a patient whose newest record fell outside the domain
after an earlier score gets no card either (no card rather than an info
card: "no score" needs no interruption, and the reason is on the patient's
record, ``/api/patients/{id}``). A result anchored in the future is never the
"latest" a card shows. Whether the newest record fell outside the domain is
read from the patient state, so a process that cannot read it (an ingest-only
process on Kafka: the state lives with the processing role's partitions) shows
no card at all rather than a score it cannot check: the hook answers 200 with
no cards and says why in the response's ``extension`` (``WITHHELD``), and
discovery still lists the service.

Request bodies (the hook and its feedback) are read up to
``cds_hooks.max_body_bytes`` and no further: a larger one is answered 413
with the same ``{"error": ...}`` body as the other refusals, as the FHIR
routes answer theirs (``adapters/fhir_http.py``, ``read_limited``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ehrbridge.adapters.fhir_client import read_with_grant
from ehrbridge.adapters.fhir_http import BodyTooLarge, read_limited
from ehrbridge.adapters.patient_links import PatientLinks
from ehrbridge.audit import audit_note
from ehrbridge.auth import PRINCIPAL_KEY, AuthFailure, Principal
from ehrbridge.cds_auth import CdsClientAuth
from ehrbridge.config import Mode, SiteConfig
from ehrbridge.core.contracts import utcnow
from ehrbridge.core.errors import EhrbridgeError
from ehrbridge.mappings.model_file import ModelFile
from ehrbridge.pipelines.ingest import innermost_frame
from ehrbridge.pipelines.jsonshape import items, obj
from ehrbridge.pipelines.observation import percent
from ehrbridge.pipelines.rendering import Shown
from ehrbridge.pipelines.rendering import shown as rendering
from ehrbridge.pipelines.rendering import shown_for as rendering_for
from ehrbridge.pipelines.results import ResultStore, StoredResult
from ehrbridge.pipelines.state import StateStore
from ehrbridge.promotion import ModeSwitch

log = logging.getLogger(__name__)

SERVICE_ID = "kfre-patient-view"
SUMMARY_LIMIT = 140
_NAMESPACE = uuid.UUID("0d3c0b4e-55a1-4a43-9d61-3f3b2b8a6c11")
_CRITICAL = frozenset({"HH", "LL", "AA", "HU", "LU"})
_WARNING = frozenset({"H", "L", "A"})
# CDS Hooks 2.0 response extensions are named in reverse-domain notation.
WITHHELD = "org.ehrbridge.cards-withheld"


class CdsError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CdsService:
    def __init__(
        self,
        config: SiteConfig,
        results: ResultStore,
        links: PatientLinks | None = None,
        *,
        state: StateStore | None,  # None: this process cannot read it, so no card (required)
        timeout_s: float = 2.0,
        mode: Callable[[], Mode] | None = None,
    ) -> None:
        self.config = config
        self.mode = mode or (lambda: config.mode)  # promote/demote switch it while running
        self._modes: dict[str, Callable[[], Mode]] = {}  # further models' (``models:``)
        self.results = results
        self.links = links
        self.state = state
        self.timeout_s = timeout_s
        self.system = config.mapping.patient.fhir_system
        self.trusted_bases = {
            b.rstrip("/")
            for b in (config.writeback.fhir_base, config.subscriptions.fhir_base)
            if b is not None
        }
        self.feedback = 0
        self.max_body_bytes = config.cds_hooks.max_body_bytes

    async def read_json(self, request: Request) -> Any:
        """The request body as JSON; CdsError 413 past the limit, 400 if it is not JSON."""
        try:
            raw = await read_limited(request, self.max_body_bytes)
        except BodyTooLarge as over:
            detail = (
                f"the body ({over.size} bytes or more) exceeds this service's limit of "
                f"{self.max_body_bytes} bytes (cds_hooks.max_body_bytes)"
            )
            raise CdsError(413, detail) from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CdsError(400, "the request body is not JSON") from None

    def service_url(self, request: Request) -> str:
        """This service's URL as the EHR calls it: what the JWT's ``aud`` must be."""
        base = self.config.cds_hooks.service_base_url or str(request.base_url)
        return f"{base.rstrip('/')}/cds-services/{SERVICE_ID}"

    def discovery(self) -> dict[str, Any]:
        return {
            "services": [
                {
                    "hook": "patient-view",
                    "id": SERVICE_ID,
                    "title": rendering(self.config).code.display,
                    "description": (
                        f"The patient's latest result of {self.config.model.name}, computed by "
                        "ehrbridge. "
                        + self.config.model.declared.model.intended_use.strip().rstrip(".")
                        + "."
                    ),
                    "prefetch": {"patient": "Patient/{{context.patientId}}"},
                    "usageRequirements": "Needs results already processed by ehrbridge.",
                }
            ]
        }

    def patient_view(
        self, body: Any, base_url: str, read: list[str] | None = None
    ) -> dict[str, Any]:
        """The cards for the hook; ``read`` gets the site's own patient id, once resolved
        (the audit trail names both it and the EHR's ``patientId``)."""
        context = _context(body)
        if self.state is None:
            return self._withheld()
        # Each model's mode read once per hook, so one answer sees one switch position.
        shown = [model.name for model in self.config.site_models if self._shows(model.name)]
        if not shown:
            return {"cards": []}  # every model in shadow: nothing to look up
        patient_id = self._patient_id(body, str(context["patientId"]))
        if patient_id and read is not None:
            read.append(patient_id)
        not_after = utcnow() + self.config.mapping.values.future_tolerance
        if not patient_id:
            return {"cards": []}
        cards = []
        for model in shown:  # one card per model, in its own mode
            latest = self.results.latest(patient_id, not_after, model=model)
            if latest is not None and not self._now_out_of_domain(patient_id, latest, model):
                cards.append(self.card(latest, base_url))
        return {"cards": cards}

    def _withheld(self) -> dict[str, Any]:
        """No card: this process cannot see whether the newest record left the domain.

        Fail-safe, and the answer every CDS client handles quietly: CDS Hooks 2.0
        defines 200 with an empty ``cards`` array as "no decision support", while a
        4xx/5xx is left to each client (some show the clinician an error, some stop
        calling a failing service), and the service stays discoverable. Why is said in
        a response ``extension`` for the EHR's integration team (no patient named).
        """
        why = (
            "this process cannot read the patient state, so it cannot check that the "
            "patient's newest record is inside the model's validated domain; the CDS "
            "service of a process that also runs the process role shows the card"
        )
        return {"cards": [], "extension": {WITHHELD: {"reason": why, "served_by_role": "process"}}}

    def _shows(self, model: str) -> bool:
        """Whether a model's cards are shown: live, or shadow cards are asked for.

        Each model in its own mode: a first model in shadow must not hide the
        cards of a second one that is live.
        """
        if self.config.cds_hooks.cards_in_shadow_mode:
            return True
        if model == self.config.model.name:
            return self.mode() is Mode.LIVE
        switch = self._modes.get(model)
        if switch is None:
            switch = self._modes[model] = ModeSwitch(self.config, model)
        return switch() is Mode.LIVE

    def _now_out_of_domain(self, patient_id: str, latest: StoredResult, model: str = "") -> bool:
        """Whether the patient's newest record fell outside the model's domain since ``latest``.

        Then no score is shown, not even the older one: the model no longer
        answers for this patient (``pipelines/domain.py``). Only asked where this
        process holds the patient state (the embedded transport, or the process role).
        """
        state = self.state.get(patient_id) if self.state is not None else None
        outcome = state.last_outcome if state is not None else None
        if outcome and model in outcome.get("models", {}):
            outcome = outcome["models"][model]  # this model's own outcome (several models)
        if not outcome or "out_of_domain" not in outcome:
            return False
        return datetime.fromisoformat(outcome["anchor"]) >= datetime.fromisoformat(latest.anchor)

    def _patient_id(self, body: dict[str, Any], fhir_id: str) -> str | None:
        prefetch = body.get("prefetch")
        patient = prefetch.get("patient") if isinstance(prefetch, dict) else None
        found = self._from_patient(patient)
        if found is None and self.links is not None:
            found = self.links.patient_for(fhir_id)
        if found is None:
            found = self._from_patient(self._read_patient(body, fhir_id))
        return found or fhir_id

    def _from_patient(self, patient: Any) -> str | None:
        if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
            return None
        identifiers = patient.get("identifier")
        for identifier in identifiers if isinstance(identifiers, list) else ():
            if isinstance(identifier, dict) and identifier.get("system") == self.system:
                value = identifier.get("value")
                if isinstance(value, str) and value.strip():
                    return value.strip()
        return None

    def _read_patient(self, body: dict[str, Any], fhir_id: str) -> Any:
        server = str(body.get("fhirServer") or "").rstrip("/")
        if not server or server not in self.trusted_bases:
            return None
        grant = body.get("fhirAuthorization")
        token = grant.get("access_token") if isinstance(grant, dict) else None
        try:
            return read_with_grant(f"{server}/Patient/{fhir_id}", token or None, self.timeout_s)
        except EhrbridgeError as error:
            log.warning("CDS Hooks: patient read failed: %s", error.reason)
            return None

    def card(self, result: StoredResult, base_url: str) -> dict[str, Any]:
        observation = result.observation
        code, meaning = _interpretation(observation)
        view = rendering_for(self.config, result.model_name)
        shown_values = {name: shown(percent(v)) for name, v in result.outputs.items()}
        name, version = [*result.model.split(), "", ""][:2]
        summary = view.card.summary.format_map(shown_values)  # the model file's template
        if code not in ("", "N"):
            summary += f" - {meaning}"
        return {
            "uuid": str(uuid.uuid5(_NAMESPACE, result.identifier)),
            "summary": _clip(summary),
            "indicator": indicator(code),
            "detail": _detail(result, observation, view, meaning) + _about(view.model),
            "source": {
                "label": f"{view.card.label} {name} {version}".strip(),
                "topic": {
                    "system": "urn:ehrbridge:codes",
                    "code": name or view.model.model.name,
                    "display": f"{view.card.topic}, model {name} version {version}",
                },
            },
            "links": [
                {
                    "label": "Risk details and the results it was computed from",
                    "url": self._details_url(result, base_url),
                    "type": "absolute",
                }
            ],
        }

    def _details_url(self, result: StoredResult, base_url: str) -> str:
        template = self.config.cds_hooks.details_url
        if template:
            return template.format(identifier=result.identifier, patient=result.patient_id)
        # The clinician's page (ehrbridge/patient_page.py), with this result highlighted.
        patient, identifier = quote(result.patient_id, safe=""), quote(result.identifier, safe="")
        return f"{base_url.rstrip('/')}/ui/patients/{patient}?result={identifier}"


def shown(percent_value: float) -> str:
    """A risk in percent as a card shows it: one decimal, ``<0.1%`` below that."""
    return "<0.1%" if percent_value < 0.05 else f"{percent_value:.1f}%"


def indicator(code: str) -> str:
    """CDS Hooks card indicator from the Observation's interpretation code."""
    if code in _CRITICAL:
        return "critical"
    if code in _WARNING:
        return "warning"
    return "info"


def _context(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise CdsError(400, "the request body is not a JSON object")
    if body.get("hook") != "patient-view":
        raise CdsError(400, f"this service answers the patient-view hook, not {body.get('hook')!r}")
    if not isinstance(body.get("hookInstance"), str):
        raise CdsError(400, "hookInstance is required")
    context = body.get("context")
    if not isinstance(context, dict) or not isinstance(context.get("patientId"), str):
        raise CdsError(400, "context.patientId is required")
    return context


def _interpretation(observation: dict[str, Any]) -> tuple[str, str]:
    for concept in items(observation.get("interpretation")):
        for coding in items(concept.get("coding")):
            return str(coding.get("code", "")), str(concept.get("text") or coding.get("code", ""))
    return "", ""


def _clip(text: str) -> str:
    return text if len(text) < SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 2] + "…"


def _about(model: ModelFile) -> str:
    """What the model is for and whom it is valid for, in the model file's words."""
    identity = model.model
    return (
        f"{identity.intended_use.rstrip('.')}. **Valid for:** "
        f"{identity.intended_population.rstrip('.')}. Source: {identity.citation}"
    )


def _detail(result: StoredResult, observation: dict[str, Any], view: Shown, meaning: str) -> str:
    inputs = "\n".join(
        f"- {item.get('display', '')}" for item in items(observation.get("derivedFrom"))
    )
    method = obj(observation.get("method")).get("text", result.model)
    notes = "".join(f"**Note:** {n.get('text', '')}\n\n" for n in items(observation.get("note")))
    values = "".join(
        f"**{c.code.display}:** {percent(result.outputs[c.output]):.2f}%  \n"
        for c in view.components
        if c.output in result.outputs
    )
    return (
        f"{values}**Interpretation:** {meaning or 'not classified'}\n\n{notes}"
        f"Computed for results up to {result.anchor[:10]} by {method}, from:\n\n{inputs}\n\n"
    )


def add_cds_routes(app: FastAPI, service: CdsService, clients: CdsClientAuth) -> None:
    """The hook and feedback need the EHR's JWT (``ehrbridge/cds_auth.py``); discovery is open."""

    @app.get("/cds-services", include_in_schema=False)
    def discovery() -> JSONResponse:
        return JSONResponse(service.discovery())

    @app.post(f"/cds-services/{SERVICE_ID}", include_in_schema=False)
    async def patient_view(request: Request) -> Response:
        note = audit_note(request.scope)
        try:
            request.scope[PRINCIPAL_KEY] = await _caller(
                request, clients, service.service_url(request)
            )
            body = await service.read_json(request)
            note.patients.append(str(_context(body)["patientId"]))
            # In a thread: a store read, and possibly a FHIR read, must not stall the loop
            # that also serves MLLP.
            cards = await asyncio.to_thread(
                service.patient_view, body, str(request.base_url), note.patients
            )
        except AuthFailure as failure:
            return _refusal(failure)
        except CdsError as error:
            return _error_response(error)
        except Exception as bug:  # the EHR still gets the contract's JSON, and no card
            log.error(
                "CDS Hooks: internal error %s at %s", type(bug).__name__, innermost_frame(bug)
            )
            return _error_response(CdsError(500, "internal error; no card"))
        note.detail["cards"] = len(cards["cards"])
        return Response(orjson.dumps(cards), media_type="application/json")

    @app.post(f"/cds-services/{SERVICE_ID}/feedback", include_in_schema=False)
    async def feedback(request: Request) -> Response:
        url = service.service_url(request)
        try:
            await _caller(request, clients, url, f"{url}/feedback")
            await service.read_json(request)
        except AuthFailure as failure:
            return _refusal(failure)
        except CdsError as error:
            return _error_response(error)
        service.feedback += 1
        return Response(status_code=200)


async def _caller(request: Request, clients: CdsClientAuth, *audiences: str) -> Principal:
    # Off the loop: the first call of an issuer may fetch its JWK Set.
    header = request.headers.get("authorization")
    return await asyncio.to_thread(clients.verify, header, list(audiences))


def _refusal(failure: AuthFailure) -> Response:
    return JSONResponse({"error": failure.message}, failure.status, failure.headers)


def _error_response(error: CdsError) -> JSONResponse:
    # A 413 closes the connection: the rest of the body was never read.
    headers = {"Connection": "close"} if error.status == 413 else None
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)
