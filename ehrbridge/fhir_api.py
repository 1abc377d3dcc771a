"""FHIR R4 in: the REST ingest endpoint and the Subscription notification endpoint.

Routes (JSON only, ``application/fhir+json``; ``application/json`` is taken too)::

    GET  /fhir/metadata                      CapabilityStatement: what is taken
    POST /fhir                               Bundle: transaction, batch or collection
    POST /fhir/{type}                        one resource (Patient, Observation, any other)
    PUT  /fhir/{type}/{id}                   the same, as an update
    POST /fhir/subscription-notification     Subscription notifications (Backport IG / R5)

The delivery rule is MLLP's: a 2xx only after the input is durable in the
site's log (``<site>.raw``, group-committed with the MLLP traffic); refused
input is kept in the dead-letter store with its reason before the error goes
out; a storage failure is a 503 (resend). Nothing is half-stored: a resource,
a transaction or a collection is one record, checked whole first
(``pipelines/fhir_ingest.py``); a batch's entries are records of their own.

Answers, as FHIR's RESTful API has them (https://hl7.org/fhir/R4/http.html):

* a resource: **201** with ``Location`` (``200`` for PUT), the body per the
  ``Prefer`` header (``return=representation`` -- the default --, ``minimal``
  or ``OperationOutcome``);
* a transaction: **200** with a ``transaction-response`` Bundle, one entry
  per input entry (``201 Created`` and ``location`` for what is stored);
* a batch: **200** with a ``batch-response`` Bundle, each entry stored or
  refused on its own (its ``response.outcome`` says why);
* a collection: **200** with an OperationOutcome counting what was stored;
* resource types this site does not read: **200**, counted, not stored;
* bad input: **400** (not FHIR), **422** (FHIR this site cannot use),
  **413** (over ``http.max_body_bytes``), **415** (not JSON) -- each an
  OperationOutcome whose issues name the element (``expression``).

Subscription notifications are handled by their type and payload
(``pipelines/subscriptions.py``): handshakes and heartbeats are noted;
full-resource notifications are stored like a collection; id-only ones are
first fetched from the EHR's FHIR server (``subscriptions.fhir_base``, with
its authentication and retries); empty ones announce events whose content
the subscriber reads: with ``$events``, as missed events are asked for again
(``ehrbridge/subscription_backfill.py``), or, without a FHIR server to read
from, they are only noted. Event numbers are tracked per subscription and
gaps logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ehrbridge.adapters.fhir_client import FhirReader
from ehrbridge.adapters.fhir_http import (
    FHIR_JSON,
    BodyTooLarge,
    FhirProblem,
    Preferences,
    check_media_type,
    fhir_response,
    information,
    outcome_response,
    read_limited,
    status_text,
)
from ehrbridge.adapters.patient_links import PatientLinks
from ehrbridge.adapters.smart_auth import read_secret
from ehrbridge.adapters.subscription_ledger import SubscriptionLedger
from ehrbridge.auth import Authenticator, AuthFailure, Principal, bearer_token, token_digest
from ehrbridge.config import ApiRole, SiteConfig, Subscriptions
from ehrbridge.core.contracts import Envelope, Kind
from ehrbridge.core.errors import (
    EhrbridgeError,
    PermanentError,
    RemoteRejected,
    TransientError,
)
from ehrbridge.core.version import __version__
from ehrbridge.pipelines.fhir_ingest import (
    READ_TYPES,
    Checked,
    Checker,
    FhirUnprocessable,
    Issue,
    http_status,
    issues_of,
    operation_outcome,
    reject,
    unprocessable,
)
from ehrbridge.pipelines.ingest import Ingest, innermost_frame
from ehrbridge.pipelines.jsonshape import obj
from ehrbridge.pipelines.subscriptions import (
    EVENT_TYPES,
    MISSED,
    Gap,
    Notification,
    parse_notification,
)
from ehrbridge.subscription_backfill import Backfill

log = logging.getLogger(__name__)

_DLQ_PREFIX_BYTES = 65536  # what of an oversize body is kept in the dead-letter store
_IN_LOOP_BYTES = 65536  # larger bodies are checked in a worker thread
T = TypeVar("T")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
NOTIFICATION_PATH = "/fhir/subscription-notification"


class FhirStats:
    """Counters since start: what came in, by resource type and by outcome."""

    def __init__(self) -> None:
        self.resources: Counter[str] = Counter()  # accepted resources by type
        self.stored_records = 0
        self.refused: Counter[str] = Counter()  # by reason
        self.notifications: Counter[str] = Counter()  # by type / payload content

    def snapshot(self) -> dict[str, Any]:
        return {
            "resources_accepted": dict(sorted(self.resources.items())),
            "records_stored": self.stored_records,
            "refused": dict(sorted(self.refused.items())),
            "notifications": dict(sorted(self.notifications.items())),
        }


class FhirEndpoint:
    """The FHIR ingest of one site: checks, durable storage, FHIR answers."""

    def __init__(
        self,
        config: SiteConfig,
        ingest: Ingest,
        links: PatientLinks,
        ledger: SubscriptionLedger,
        auth: Authenticator,
        *,
        reader: FhirReader | None = None,
    ) -> None:
        self.config = config
        self.auth = auth
        self.ingest = ingest
        self.checker: Checker = ingest.fhir
        self.links = links
        self.ledger = ledger
        self.reader = reader
        self.stats = FhirStats()
        self.subscriptions_known = KnownSubscriptions(config.subscriptions)
        self.backfill: Backfill | None = None
        if reader is not None and config.subscriptions.backfill:
            retry_s = config.subscriptions.backfill_retry_s
            self.backfill = Backfill(ledger, reader, self._recovered, retry_s)

    def start(self) -> None:
        """Background work: the sweep over Subscriptions' open ranges (``$events``)."""
        if self.backfill is not None:
            self.backfill.start()

    async def close(self) -> None:
        """Stop background work (missed-event requests still running)."""
        if self.backfill is not None:
            await self.backfill.close()

    def subscriptions(self) -> list[dict[str, Any]]:
        """Each Subscription's state and gaps, with why a gap's backfill has failed so far."""
        listed = self.ledger.subscriptions()
        errors = self.backfill.errors if self.backfill is not None else {}
        for item in listed:
            item["backfill"] = {
                str(gap): reason
                for gap, reason in errors.items()
                if gap.subscription == item["subscription"]
                and str(gap) in item["gaps" if gap.kind == MISSED else "unread"]
            }
        return listed

    # -- plumbing ---------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        """The body within ``http.max_body_bytes``; 413 and 415 as FHIR errors."""
        check_media_type(request)
        try:
            return await read_limited(request, self.config.http.max_body_bytes, _DLQ_PREFIX_BYTES)
        except BodyTooLarge as over:
            await self._refuse_oversize(over.prefix, over.size)

    async def _refuse_oversize(self, prefix: bytes, size: int) -> NoReturn:
        limit = self.config.http.max_body_bytes
        error = reject(
            "too-costly",
            f"the body ({size} bytes or more) exceeds this site's limit of {limit} bytes "
            "(http.max_body_bytes); split the Bundle",
            "fhir.too_large",
        )
        await self._dead_letter(prefix, f"oversize-{uuid.uuid4()}", error)
        raise FhirProblem(413, error.issues[0], {"Connection": "close"})

    def _envelope(self, payload: bytes, source_id: str, key: str, via: str) -> Envelope:
        return Envelope(
            site=self.config.site,
            source_id=source_id,
            payload=payload,
            kind=Kind.FHIR,
            key=key,
            headers={"ingest.via": via},
        )

    async def _dead_letter(self, payload: bytes, source_id: str, error: PermanentError) -> None:
        self.stats.refused[error.reason] += 1
        try:
            await self.ingest.dead_letter(
                self._envelope(payload, source_id, source_id, "fhir"), error
            )
        except TransientError as failure:  # the answer still goes out; the copy is lost
            log.error("could not keep refused FHIR input %s: %s", source_id, failure)

    async def _refused(self, payload: bytes, source_id: str, error: PermanentError) -> Response:
        await self._dead_letter(payload, source_id, error)
        return outcome_response(http_status(error), issues_of(error))

    async def _store(self, checked: Checked, payload: bytes, via: str) -> None:
        """Durably store a checked record (nothing if it holds nothing this site reads)."""
        self.stats.resources.update(checked.counts)
        if not checked.stored:
            return
        envelope = self._envelope(payload, checked.source_id, checked.keys[0], via)
        await self.ingest.store(envelope, checked.keys)
        self.stats.stored_records += 1
        if checked.patient_links:
            await asyncio.to_thread(self.links.add, checked.patient_links)

    async def guarded(
        self,
        request: Request,
        handler: Callable[[Request], Awaitable[Response]],
        role: ApiRole | None,
    ) -> Response:
        """``handler``'s answer, once the caller holds ``role`` (None: public)."""
        try:
            if role is not None:
                await self._authorized(request, role)
            return await handler(request)
        except AuthFailure as failure:
            issue = Issue("security" if failure.status != 503 else "transient", failure.message)
            return outcome_response(failure.status, [issue], failure.headers)
        except FhirProblem as problem:
            return outcome_response(problem.status, [problem.issue], problem.headers)
        except TransientError as error:
            log.warning("FHIR input not stored: %s", error.reason)
            return outcome_response(
                503,
                [Issue("transient", "the input could not be stored now; send it again")],
                {"Retry-After": "5"},
            )
        except Exception as bug:  # after the checks (their bugs are dead-lettered): still FHIR
            return outcome_response(500, _internal(bug).issues)

    async def _authorized(self, request: Request, role: ApiRole) -> Principal:
        # Off the loop: a JWT's first use may fetch its issuer's JWK Set.
        header = request.headers.get("authorization")
        return await asyncio.to_thread(self.auth.authorize, header, role)

    # -- REST ingest --------------------------------------------------------------------

    async def metadata(self, request: Request) -> Response:
        return fhir_response(200, capability_statement(self.config, str(request.base_url)))

    async def not_served(self, request: Request) -> Response:
        """Reads are not served: ehrbridge takes FHIR in; results are read from the EHR."""
        raise FhirProblem(
            405,
            Issue(
                "not-supported",
                "this endpoint only receives FHIR (POST, PUT); risk results are written to the "
                "EHR, and ehrbridge's own view is GET /api/results",
            ),
            {"Allow": "POST, PUT"},
        )

    async def create(self, request: Request) -> Response:
        resource_type = _path_type(request)
        payload = await self.read_body(request)
        return await self._single(request, payload, resource_type, None)

    async def update(self, request: Request) -> Response:
        resource_type = _path_type(request)
        resource_id = request.path_params["resource_id"]
        if not _ID.match(resource_id):
            raise FhirProblem(400, Issue("value", "the id in the URL is not a FHIR id"))
        payload = await self.read_body(request)
        return await self._single(request, payload, resource_type, resource_id)

    async def _single(
        self, request: Request, payload: bytes, resource_type: str, put_id: str | None
    ) -> Response:
        try:
            checked = await _checked(self._check_single, payload, resource_type, put_id)
        except PermanentError as error:
            return await self._refused(payload, _record_id(payload), error)
        await self._store(checked, payload, "fhir-rest")
        if not checked.stored:
            return outcome_response(200, [information(_not_read(checked.counts))])
        status = 200 if put_id is not None else 201
        resource_id = (
            checked.source_id if resource_type == "Bundle" else checked.entries[0].resource_id
        )
        location = f"{_base(request)}/{resource_type}/{resource_id}"
        return _created(request, status, location, payload, checked)

    def _check_single(self, payload: bytes, resource_type: str, put_id: str | None) -> Checked:
        doc = _parse(payload)
        if put_id is not None and doc.get("id") != put_id:
            raise reject(
                "invalid",
                f"Resource.id must equal the id in the URL ({put_id}) for an update",
                "fhir.id_mismatch",
                f"{resource_type}.id",
            )
        if resource_type == "Bundle" and doc.get("resourceType") == "Bundle":
            return self.checker.check_bundle(doc, payload)
        return self.checker.check_resource(doc, resource_type)

    async def bundle(self, request: Request) -> Response:
        payload = await self.read_body(request)
        try:
            checked = await _checked(self._check_bundle_post, payload)
            if isinstance(checked, list):
                return await self._batch(request, checked)
        except PermanentError as error:
            return await self._refused(payload, _record_id(payload), error)
        await self._store(checked, payload, "fhir-rest")
        if checked.bundle_type == "collection":
            return outcome_response(200, [information(_stored_summary(checked))])
        return fhir_response(200, self._response_bundle(request, "transaction-response", checked))

    def _check_bundle_post(
        self, payload: bytes
    ) -> Checked | list[tuple[Any, Checked | PermanentError]]:
        """``POST /fhir``: a transaction or collection checked whole, a batch entry by entry."""
        doc = _parse(payload)
        if doc["resourceType"] != "Bundle":
            raise reject(
                "invalid",
                f"POST /fhir takes a Bundle; post a {doc['resourceType']} to "
                f"/fhir/{doc['resourceType']}",
                "fhir.wrong_type",
                "resourceType",
            )
        if doc.get("type") == "batch":
            return self.checker.check_batch(doc)
        return self.checker.check_bundle(doc, payload)

    def _response_bundle(self, request: Request, kind: str, checked: Checked) -> dict[str, Any]:
        base = _base(request)
        entries = []
        for entry in checked.entries:
            if entry.read:
                status = 201 if entry.method == "POST" else 200
                response = {
                    "status": status_text(status),
                    "location": f"{base}/{entry.resource_type}/{entry.resource_id}",
                }
            else:
                response = {"status": status_text(200)}
            entries.append({"response": response})
        return {"resourceType": "Bundle", "type": kind, "entry": entries}

    async def _batch(
        self, request: Request, results: list[tuple[Any, Checked | PermanentError]]
    ) -> Response:
        # Concurrently, so that the entries share one group commit.
        stored = await asyncio.gather(
            *(self._batch_entry(raw, result) for raw, result in results), return_exceptions=True
        )
        base = _base(request)
        entries = [
            {"response": _batch_response(base, result, outcome)}
            for (_, result), outcome in zip(results, stored, strict=True)
        ]
        bundle = {"resourceType": "Bundle", "type": "batch-response", "entry": entries}
        return fhir_response(200, bundle)

    async def _batch_entry(self, raw: Any, result: Checked | PermanentError) -> None:
        if isinstance(result, PermanentError):
            # The resource itself, so that a replay after a fix can process it.
            resource = raw.get("resource") if isinstance(raw, dict) else None
            kept = orjson.dumps(resource if isinstance(resource, dict) else raw)
            await self._dead_letter(kept, f"fhir-batch-{uuid.uuid4()}", result)
            return
        await self._store(result, orjson.dumps(result.doc), "fhir-batch")

    # -- Subscription notifications -----------------------------------------------------

    async def notification(self, request: Request) -> Response:
        allowed = await self._notifier(request)
        payload = await self.read_body(request)
        try:
            notification = await _checked(_notification_of, payload)
        except PermanentError as error:
            self.stats.notifications["non-conformant"] += 1
            return await self._refused(payload, _record_id(payload), error)
        self._known_or_refuse(notification.subscription, allowed)
        source_id = notification.bundle_id or f"notification-{uuid.uuid4()}"
        kind = notification.type
        if kind not in EVENT_TYPES:
            self.stats.notifications[kind] += 1
            gaps = await self._record(notification)
            return outcome_response(200, [information(f"{kind} received"), *_gap_issues(gaps)])
        self.stats.notifications[notification.content] += 1
        if notification.content == "empty" and self.backfill is not None and notification.events:
            # No content: the subscriber reads it, here with $events, like a missed event.
            gaps = await self._record(notification, unread=True)
            numbers = ", ".join(str(e.number) for e in notification.events)
            text = f"empty notification: event(s) {numbers} will be read from the EHR ($events)"
            return outcome_response(200, [information(text), *_gap_issues(gaps)])
        try:
            warnings, stored = await self._event(notification)
        except PermanentError as error:
            return await self._refused(payload, source_id, error)
        except EhrbridgeError:
            raise  # transient: 503, sent again
        except Exception as bug:
            return await self._refused(payload, source_id, _internal(bug))
        gaps = await self._record(notification)
        text = f"{notification.content} notification: {stored}"
        return outcome_response(200, [information(text), *warnings, *_gap_issues(gaps)])

    async def _record(self, notification: Notification, *, unread: bool = False) -> list[Gap]:
        """Note a handled notification; ask at once for events it shows we lack.

        Ranges that stay open are retried by the backfill's sweep, so a
        notification that opens none costs no backfill work.
        """
        gaps = await asyncio.to_thread(self.ledger.record, notification, unread=unread)
        if self.backfill is not None and (gaps or unread):
            self.backfill.schedule(notification.subscription)
        return gaps

    async def _recovered(self, notification: Notification) -> None:
        """A ``$events`` answer: stored like a notification, then recorded (closes gaps)."""
        self.stats.notifications[f"recovered {notification.content}"] += 1
        if notification.content == "empty":  # recording it would close ranges never read
            raise RemoteRejected(
                "the server answered $events without content (empty)",
                reason="subscription.events_empty",
            )
        await self._event(notification)
        await asyncio.to_thread(self.ledger.record, notification)

    async def _notifier(self, request: Request) -> frozenset[str] | None:
        """Which Subscriptions the caller may notify for (None: every known one).

        A Subscription's own header token speaks for that Subscription only;
        ``subscriptions.token_env`` and API tokens of role sender for all known.
        """
        header = request.headers.get("authorization")
        token = bearer_token(header)
        found, references = self.subscriptions_known.token_scope(token)
        if not found:
            await self._authorized(request, ApiRole.SENDER)
        return references

    def _known_or_refuse(self, reference: str, allowed: frozenset[str] | None) -> None:
        """Only Subscriptions this site made may notify it; checked before any EHR read."""
        known = self.subscriptions_known.find(reference)
        if known is not None and (allowed is None or known in allowed):
            return
        self.stats.notifications["unknown-subscription"] += 1
        log.warning(
            "notification refused: %s is not a known Subscription of this caller", reference
        )
        raise FhirProblem(
            403,
            Issue(
                "forbidden",
                "the notification names a Subscription this site does not know, or the token "
                "is not that Subscription's (subscriptions.known)",
                "Bundle.entry[0].resource",
            ),
        )

    async def _event(self, notification: Notification) -> tuple[list[Issue], str]:
        """Store what an event notification carries or points at; return (warnings, summary)."""
        if notification.content == "empty":
            return [], "nothing to read (an empty notification carries no resources)"
        warnings: list[Issue] = []
        if notification.content == "full-resource":
            resources = [
                (u, r) for u, r in notification.resources if r.get("resourceType") in READ_TYPES
            ]
            skipped = Counter(
                str(r.get("resourceType"))
                for _, r in notification.resources
                if r.get("resourceType") not in READ_TYPES
            )
        else:
            resources, skipped = await self._fetch_focus(notification, warnings)
        self.stats.resources.update(skipped)
        if resources:
            resources += await self._fetch_subjects(resources, warnings)
        if not resources:
            return warnings, _not_read(skipped) if skipped else "nothing this site reads"
        collection = _collection(notification, resources, self.reader)
        checked = self.checker.check_bundle(collection)
        await self._store(checked, orjson.dumps(collection), "fhir-subscription")
        if not checked.stored:
            return warnings, _not_read(checked.counts + skipped)
        return warnings, _stored_summary(checked)

    async def _fetch_focus(
        self, notification: Notification, warnings: list[Issue]
    ) -> tuple[list[tuple[str, dict[str, Any]]], Counter[str]]:
        wanted, skipped = [], Counter[str]()
        for reference in notification.focus_references():
            kind = _reference_type(reference)
            if kind in READ_TYPES:
                wanted.append(reference)
            else:
                skipped[kind or "unknown"] += 1
        if not wanted:
            return [], skipped
        reader = self._reader_or_refuse()
        return await self._read_all(reader, wanted, warnings), skipped

    def _reader_or_refuse(self) -> FhirReader:
        if self.reader is None:
            raise unprocessable(
                "not-supported",
                "an id-only notification needs a FHIR server to read from; set "
                "subscriptions.fhir_base (or writeback.fhir_base)",
                "subscription.no_fhir_base",
            )
        return self.reader

    async def _read_all(
        self, reader: FhirReader, references: Sequence[str], warnings: list[Issue]
    ) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for reference in references:
            try:
                resource = await asyncio.to_thread(reader.read, reference)
            except TransientError:
                raise  # 503: the server sends the notification again later
            except PermanentError as error:
                log.warning("subscription resource not read: %s", error.reason)
                warnings.append(
                    Issue("not-found", f"{error.reason}: {error.detail}", severity="warning")
                )
                continue
            found.append((f"{reader.base_url}/{reader.relative(reference)}", resource))
        return found

    async def _fetch_subjects(
        self, resources: list[tuple[str, dict[str, Any]]], warnings: list[Issue]
    ) -> list[tuple[str, dict[str, Any]]]:
        """The Patients that Observations name only by reference, read from the EHR."""
        known = {
            f"Patient/{r.get('id')}" for _, r in resources if r.get("resourceType") == "Patient"
        }
        system = self.config.mapping.patient.fhir_system
        missing: dict[str, None] = {}
        for _, resource in resources:
            if resource.get("resourceType") != "Observation":
                continue
            subject = obj(resource.get("subject"))
            if obj(subject.get("identifier")).get("system") == system:
                continue
            reference = str(subject.get("reference") or "")
            relative = "/".join(reference.rstrip("/").split("/")[-2:])
            if relative.startswith("Patient/") and relative not in known:
                missing.setdefault(reference, None)
        if not missing or self.reader is None:
            return []
        return await self._read_all(self.reader, list(missing), warnings)


# --------------------------------------------------------------------------- helpers


class KnownSubscriptions:
    """``subscriptions.known``: references, and the header tokens each may use."""

    def __init__(self, config: Subscriptions) -> None:
        self.references = [k.reference.rstrip("/") for k in config.known]
        # (token digest, the references it may notify for; None: every known one)
        self._tokens: list[tuple[bytes, frozenset[str] | None]] = []
        if config.token_env is not None:
            secret = read_secret(
                config.token_env, None, "the notification token", "subscriptions.token_env"
            )
            self._tokens.append((token_digest(secret), None))
        for index, known in enumerate(config.known):
            if known.token_env is not None or known.token_file is not None:
                where = f"subscriptions.known.{index}"
                secret = read_secret(
                    known.token_env, known.token_file, "the Subscription token", where
                )
                self._tokens.append((token_digest(secret), frozenset({self.references[index]})))

    def token_scope(self, token: str) -> tuple[bool, frozenset[str] | None]:
        """(whether ``token`` is a Subscription token, the references it may notify for)."""
        digest = token_digest(token)
        found: tuple[bool, frozenset[str] | None] = (False, None)
        for known, scope in self._tokens:  # every one compared: no early exit
            if hmac.compare_digest(digest, known):
                found = (True, scope)
        return found

    def find(self, reference: str) -> str | None:
        """The configured reference that ``reference`` names, if any.

        A relative entry (``Subscription/abc``) matches the last two segments
        of the notification's reference, an absolute one the whole URL.
        """
        given = reference.split("/_history/", maxsplit=1)[0].rstrip("/")
        tail = "/".join(given.split("/")[-2:])
        for known in self.references:
            if given == known or (not known.startswith(("http:", "https:")) and tail == known):
                return known
        return None


def _record_id(payload: bytes) -> str:
    """What names refused input in logs and the DLQ: its id, never a Patient's (PHI-adjacent)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        doc = None
    value = doc.get("id") if isinstance(doc, dict) else None
    if not isinstance(value, str) or not value or doc.get("resourceType") == "Patient":
        return f"fhir-{uuid.uuid4()}"
    return value[:64]


async def _off_loop(check: Callable[..., T], payload: bytes, *args: Any) -> T:
    """Checks of large bodies (a Synthea patient: ~40 ms) run off the event loop,
    which also serves MLLP; small ones are cheaper to run in place."""
    if len(payload) > _IN_LOOP_BYTES:
        return await asyncio.to_thread(check, payload, *args)
    return check(payload, *args)


class FhirInternalError(FhirUnprocessable):
    """A bug met while checking input: 500, and the input kept (reason ``internal``)."""

    status = 500


async def _checked(check: Callable[..., T], payload: bytes, *args: Any) -> T:
    """``check``'s result; a bug in it is a :class:`FhirInternalError`, never a bare 500.

    So that, as on MLLP, the sender gets a well-formed answer and the input a
    dead letter an operator can replay once the bug is fixed.
    """
    try:
        return await _off_loop(check, payload, *args)
    except EhrbridgeError:
        raise
    except Exception as bug:
        raise _internal(bug) from bug


def _internal(bug: Exception) -> FhirInternalError:
    """Logged by type and place only: an exception's text may quote the input (PHI)."""
    where = innermost_frame(bug)
    log.error("FHIR input: internal error %s at %s", type(bug).__name__, where)
    issue = Issue(
        "exception",
        f"internal error ({type(bug).__name__} at {where}); the input is kept for replay",
        status=500,
        reason="internal",
    )
    return FhirInternalError([issue], reason="internal")


def _notification_of(payload: bytes) -> Notification:
    return parse_notification(_parse(payload))


def _parse(payload: bytes) -> dict[str, Any]:
    from ehrbridge.pipelines.fhir_ingest import parse

    return parse(payload)


def _path_type(request: Request) -> str:
    resource_type = str(request.path_params["resource_type"])
    if not _TYPE.match(resource_type):
        raise FhirProblem(404, Issue("not-found", f"{resource_type!r} is not a FHIR resource type"))
    return resource_type


def _base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}/fhir"


def _created(
    request: Request, status: int, location: str, payload: bytes, checked: Checked
) -> Response:
    headers = {"Location": location}
    returns = Preferences.of(request).returns
    if returns == "minimal":
        return Response(status_code=status, headers=headers)
    if returns == "OperationOutcome":
        return outcome_response(status, [information(_stored_summary(checked))], headers)
    return fhir_response(status, payload, headers)


def _not_read(counts: Counter[str]) -> str:
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    return (
        f"accepted and counted, not stored: nothing in it is used by this site ({kinds}); "
        "it reads Patients and the Observations its mapping names"
    )


def _stored_summary(checked: Checked) -> str:
    read = Counter(e.resource_type for e in checked.entries if e.read)
    other = Counter(e.resource_type for e in checked.entries if not e.read)
    if not checked.entries:
        return "accepted: the Bundle has no entries, nothing was stored"
    if len(checked.entries) == 1 and not checked.entries[0].read:
        return _not_read(other)
    stored = ", ".join(f"{n} {t}" for t, n in sorted(read.items())) or "nothing"
    text = f"stored {stored} as record {checked.source_id}"
    if other:
        text += f"; {sum(other.values())} other resource(s) counted, not used"
    return text


def _batch_response(
    base: str, result: Checked | PermanentError, stored: BaseException | None
) -> dict[str, Any]:
    if isinstance(result, PermanentError):
        status = http_status(result)
        return {"status": status_text(status), "outcome": operation_outcome(issues_of(result))}
    if isinstance(stored, EhrbridgeError):
        issue = Issue("transient", "the entry could not be stored now; send it again")
        return {"status": status_text(503), "outcome": operation_outcome([issue])}
    if isinstance(stored, BaseException):
        raise stored
    entry = result.entries[0]
    if not entry.read:
        return {"status": status_text(200)}
    status = 201 if entry.method == "POST" else 200
    return {
        "status": status_text(status),
        "location": f"{base}/{entry.resource_type}/{entry.resource_id}",
    }


def _gap_issues(gaps: Sequence[Any]) -> list[Issue]:
    return [
        Issue("incomplete", f"events {gap} of {gap.subscription} never arrived", severity="warning")
        for gap in gaps
    ]


def _reference_type(reference: str) -> str | None:
    parts = reference.split("/_history/", maxsplit=1)[0].rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and _TYPE.match(parts[-2]) else None


def _collection(
    notification: Notification,
    resources: list[tuple[str, dict[str, Any]]],
    reader: FhirReader | None,
) -> dict[str, Any]:
    numbers = "-".join(str(e.number) for e in notification.events)
    record_id = f"{notification.bundle_id or 'notification'}-{numbers}"
    entries = []
    for url, resource in resources:
        full_url = url or (
            f"{reader.base_url}/{resource['resourceType']}/{resource['id']}"
            if reader is not None and resource.get("id")
            else ""
        )
        entries.append(
            {"fullUrl": full_url, "resource": resource} if full_url else {"resource": resource}
        )
    return {
        "resourceType": "Bundle",
        "id": _safe_id(record_id),
        "type": "collection",
        "entry": entries,
    }


def _safe_id(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9\-.]", "-", text)[:64]
    return cleaned or "notification"


def capability_statement(config: SiteConfig, base_url: str) -> dict[str, Any]:
    """What this endpoint takes (https://hl7.org/fhir/R4/capabilitystatement.html)."""
    documentation = (
        "Stored once durable and processed into risk predictions. Other resource types are "
        "accepted and counted, not stored."
    )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "ehrbridge", "version": __version__},
        "implementation": {
            "description": f"ehrbridge FHIR ingest, site {config.site}",
            "url": f"{base_url.rstrip('/')}/fhir",
        },
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": documentation,
                "resource": [
                    {
                        "type": kind,
                        "interaction": [{"code": "create"}, {"code": "update"}],
                        "updateCreate": True,
                    }
                    for kind in sorted(READ_TYPES)
                ],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


Handler = Callable[[Request], Awaitable[Response]]


def add_fhir_routes(app: FastAPI, endpoint: FhirEndpoint) -> None:
    """The FHIR routes, each with the role it needs (None: public; see ehrbridge/auth.py)."""

    def route(path: str, method: str, handler: Handler, role: ApiRole | None) -> None:
        async def serve(request: Request) -> Response:
            return await endpoint.guarded(request, handler, role)

        # Plain Starlette routes: the handlers read the body themselves (size limit).
        app.add_route(path, serve, methods=[method], include_in_schema=False)

    sender = ApiRole.SENDER
    route("/fhir/metadata", "GET", endpoint.metadata, None)
    for path in ("/fhir/{resource_type}", "/fhir/{resource_type}/{resource_id}"):
        route(path, "GET", endpoint.not_served, sender)
    # Its own check: a Subscription's header token, or a sender's API token.
    route(NOTIFICATION_PATH, "POST", endpoint.notification, None)
    route("/fhir", "POST", endpoint.bundle, sender)
    route("/fhir/", "POST", endpoint.bundle, sender)
    route("/fhir/{resource_type}", "POST", endpoint.create, sender)
    route("/fhir/{resource_type}/{resource_id}", "PUT", endpoint.update, sender)
