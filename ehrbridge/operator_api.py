"""The operator's and the admin's HTTP routes: dead letters, message search, the audit trail.

``operator`` (and ``admin``):

* ``GET /api/dlq/{offset}``: one dead letter: its headers and raw bytes (as
  text), what ``ehrbridge dlq show`` prints on the host;
* ``POST /api/dlq/replay``: send dead letters back after a fix, selected as
  ``ehrbridge dlq replay`` selects them (``offsets``, ``reason``, ``since``,
  ``until``, ``again``; ``dry_run`` only counts). A body that selects nothing
  is a 422, not "everything": that takes ``"all": true``;
* ``GET /api/messages``: search the stored inbound messages (the ``raw``
  topic) by ``control_id`` (MSH-10, or the FHIR id), ``patient`` (the key it
  is stored under) and time received. A search reads at most ``scan``
  records after ``after`` and answers ``next_after`` to go on, so a request
  costs the same on a large log;
* ``GET /api/messages/{offset}``: one stored message with its raw bytes.

``admin``: ``GET /api/audit``, the audit trail (``ehrbridge/audit.py``) as
JSON, filtered by ``patient``, ``who``, ``since``, ``until``, newest last, at
most ``limit`` entries after the sequence number ``after``; past the limit it
answers ``truncated``, ``next_after`` and ``links.next`` to go on.

Every one of them is audited (``ehrbridge/audit_http.py``); the patients are
the records' keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from fastapi import FastAPI, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from ehrbridge.audit import AuditTrail, audit_note, matching
from ehrbridge.dlq import Selection, dead_at, dead_letter, replay, replayed_offsets, selected
from ehrbridge.pipelines.carry import HEADER as CARRIED
from ehrbridge.pipelines.transport import Log, Record, topic_name

if TYPE_CHECKING:
    from fastapi.params import Depends

MAX_OFFSET = 2**62
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such item here"}}
# Log positions are SQLite INTEGERs (64-bit): a larger one is a 422, not a 500.
_OFFSET = Path(ge=0, le=MAX_OFFSET)


_SELECTORS = ("offsets", "reason", "since", "until", "all")


class ReplayRequest(BaseModel):
    """Which dead letters to send back: the selection of ``ehrbridge dlq replay``.

    At least one selector must be given (the schema says so too: ``anyOf``
    ``required``): an empty body is a mistake, not "everything".
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"anyOf": [{"required": [name]} for name in _SELECTORS]},
    )
    offsets: Annotated[list[int], Field(min_length=1)] | SkipJsonSchema[None] = None
    reason: Annotated[str, Field(min_length=1)] | SkipJsonSchema[None] = None  # or 'hl7.*'
    since: datetime | SkipJsonSchema[None] = None
    until: datetime | SkipJsonSchema[None] = None
    all: Literal[True] | SkipJsonSchema[None] = None  # every dead letter, said outright
    again: bool = False  # include records already replayed
    dry_run: bool = False  # only count

    @model_validator(mode="after")
    def says_which(self) -> Self:
        if all(getattr(self, name) is None for name in _SELECTORS):
            raise ValueError("select dead letters: offsets, reason, since/until, or all: true")
        return self


def _text(value: bytes) -> str:
    """Raw bytes as text, segments on their own lines (HL7v2 separates them with CR)."""
    text = value.decode("utf-8", errors="backslashreplace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _message(record: Record, raw: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = {
        "offset": record.offset,
        "patient": record.key,
        "control_id": record.headers.get("source_id"),
        "kind": record.headers.get("kind"),
        "received_at": record.headers.get("received_at"),
        "bytes": len(record.value),
    }
    if raw:
        # Provenance only: the facts ingest carried for processing (pipelines/carry.py) are a
        # work copy of what the raw bytes below already say.
        found["headers"] = {k: v for k, v in sorted(record.headers.items()) if k != CARRIED}
        found["raw"] = _text(record.value)
    return found


def add_operator_routes(app: FastAPI, log: Log, site: str, operator: Sequence[Depends]) -> None:
    _add_dead_letter_routes(app, log, site, operator)
    _add_message_routes(app, log, site, operator)


def _add_dead_letter_routes(app: FastAPI, log: Log, site: str, operator: Sequence[Depends]) -> None:

    @app.get("/api/dlq/{offset}", responses=NOT_FOUND, dependencies=list(operator))
    def dead_letter_detail(request: Request, offset: int = _OFFSET) -> dict[str, Any]:
        """One dead letter with its raw bytes (PHI: operator role, audited)."""
        record = dead_letter(log, site, offset)
        if record is None:
            raise HTTPException(404, f"no dead letter at offset {offset}")
        audit_note(request.scope).patients.append(record.key)
        replayed = offset in replayed_offsets(log, site)
        return {
            **_message(record, raw=True),
            "reason": record.headers.get("error.reason"),
            "detail": record.headers.get("error.detail"),
            "stage": record.headers.get("error.stage"),
            "dead_lettered_at": dead_at(record).isoformat(),
            "replayed": replayed,
        }

    @app.post("/api/dlq/replay", dependencies=list(operator))
    def dead_letter_replay(request: Request, body: ReplayRequest) -> dict[str, Any]:
        """Send the selected dead letters back to the topic their stage reads."""
        selection = Selection(
            frozenset(body.offsets or ()), body.reason, _utc(body.since), _utc(body.until)
        )
        if body.dry_run:
            done = set() if body.again else replayed_offsets(log, site)
            chosen = [r for r in selected(selection, log, site) if r.offset not in done]
        else:
            chosen = replay(log, site, selection, again=body.again)
        note = audit_note(request.scope)
        note.patients.extend(r.key for r in chosen)
        note.detail.update(offsets=[r.offset for r in chosen], dry_run=body.dry_run)
        return {"dry_run": body.dry_run, "replayed": [r.offset for r in chosen]}


def _add_message_routes(app: FastAPI, log: Log, site: str, operator: Sequence[Depends]) -> None:
    raw_topic = topic_name(site, "raw")

    @app.get("/api/messages", dependencies=list(operator))
    def messages(
        request: Request,
        *,
        control_id: str | None = None,
        patient: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: int = Query(-1, ge=-1, le=MAX_OFFSET),
        scan: int = Query(10_000, ge=1, le=100_000),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Stored inbound messages matching every filter given (no raw bytes here)."""
        found: list[Record] = []
        position, scanned = after, 0
        while scanned < scan and len(found) < limit:
            batch = log.read(raw_topic, after=position, limit=min(500, scan - scanned))
            if not batch:
                break
            for record in batch:
                position, scanned = record.offset, scanned + 1
                if _matches(record, control_id, patient, _utc(since), _utc(until)):
                    found.append(record)
                    if len(found) == limit:
                        break
        audit_note(request.scope).patients.extend(r.key for r in found)
        return {
            "messages": [_message(r) for r in found],
            "scanned": scanned,
            "next_after": position if scanned else None,
        }

    @app.get("/api/messages/{offset}", responses=NOT_FOUND, dependencies=list(operator))
    def message(request: Request, offset: int = _OFFSET) -> dict[str, Any]:
        """One stored inbound message with its raw bytes (PHI: operator role, audited)."""
        batch = log.read(raw_topic, after=offset - 1, limit=1)
        if not batch or batch[0].offset != offset:
            raise HTTPException(404, f"no stored message at offset {offset}")
        audit_note(request.scope).patients.append(batch[0].key)
        return _message(batch[0], raw=True)


def _matches(
    record: Record,
    control_id: str | None,
    patient: str | None,
    since: datetime | None,
    until: datetime | None,
) -> bool:
    if control_id is not None and record.headers.get("source_id") != control_id:
        return False
    if patient is not None and record.key != patient:
        return False
    if since is None and until is None:
        return True
    received = datetime.fromisoformat(record.headers.get("received_at", "1970-01-01T00:00:00Z"))
    return not ((since and received < since) or (until and received >= until))


def add_audit_routes(app: FastAPI, trail: AuditTrail, admin: Sequence[Depends]) -> None:
    @app.get("/api/audit", dependencies=list(admin))
    def audit(
        request: Request,
        *,
        patient: str | None = None,
        who: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = Query(1000, ge=1, le=10_000),
        after: int = Query(0, ge=0, le=MAX_OFFSET),
    ) -> dict[str, Any]:
        """The audit trail's entries after sequence number ``after``, oldest first;
        ``truncated``, ``next_after`` and ``links.next`` when more matched."""
        if patient is not None:
            audit_note(request.scope).patients.append(patient)
        found: list[dict[str, Any]] = []
        window = {"since": _utc(since), "until": _utc(until)}
        later = (e for e in trail.entries() if _seq(e) > after)
        for entry in matching(later, patient=patient, who=who, **window):
            if len(found) == limit:
                following = _seq(found[-1])
                next_url = request.url.include_query_params(limit=limit, after=following)
                return {
                    "entries": found,
                    "truncated": True,
                    "next_after": following,
                    "links": {"next": str(next_url)},
                }
            found.append(entry)
        return {"entries": found, "truncated": False, "next_after": None, "links": {"next": None}}


def _seq(entry: dict[str, Any]) -> int:
    seq = entry.get("seq")
    return seq if isinstance(seq, int) else 0


def _utc(moment: datetime | None) -> datetime | None:
    """A time without a zone is taken as UTC (the stores keep UTC)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
