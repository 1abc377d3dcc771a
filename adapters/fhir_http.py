"""FHIR HTTP plumbing, shared by ehrbridge's FHIR routes and the sandbox's FHIR stand-in.

One place for what every FHIR JSON endpoint does the same way:

- a request body read within a byte limit, counted as it streams in
  (:func:`read_limited`; 413 before the limit is passed, never after);
- the media types a FHIR JSON body may declare (:func:`check_media_type`,
  415 otherwise; R4 http.html#mime);
- answers that are OperationOutcomes (:class:`FhirProblem`,
  :func:`outcome_response`) or FHIR JSON (:func:`fhir_response`);
- the ``Prefer`` header (:class:`Preferences`): ``return=`` (R4 http.html#ops)
  and ``handling=`` (R4 search.html#errors).

The sandbox imports this module; nothing here may import the sandbox.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ehrbridge.pipelines.fhir_ingest import Issue, operation_outcome

FHIR_JSON: Final = "application/fhir+json"
FHIR_JSON_UTF8: Final = f"{FHIR_JSON}; charset=utf-8"
# application/json+fhir is the DSTU2 spelling some EHR clients still send.
JSON_MEDIA_TYPES: Final = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
FORM_MEDIA_TYPE: Final = "application/x-www-form-urlencoded"
_RETURNS = ("minimal", "representation", "OperationOutcome")


class BodyTooLarge(Exception):
    """A request body over the route's limit (answer 413); nothing past it was read."""

    def __init__(self, size: int, prefix: bytes) -> None:
        super().__init__(f"body of {size} bytes or more")
        self.size = size  # declared, or read so far
        self.prefix = prefix  # its first bytes, for a dead-letter record


async def read_limited(request: Request, limit: int, keep: int = 0) -> bytes:
    """The body, counted as it streams in; BodyTooLarge as soon as it passes ``limit``.

    A Content-Length over the limit is refused before anything is read;
    without one (chunked), reading stops at the first chunk past it, so no
    more than ``limit`` plus one chunk is ever held. ``keep``: how many of
    the first bytes BodyTooLarge carries.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared), b"")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size, b"".join(chunks)[:keep])
        chunks.append(chunk)
    return b"".join(chunks)


class FhirProblem(Exception):
    """A request that fails as a whole: an OperationOutcome with HTTP ``status``."""

    def __init__(self, status: int, issue: Issue, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(issue.diagnostics)
        self.status = status
        self.issue = issue
        self.headers = dict(headers or {})

    def outcome(self) -> dict[str, Any]:
        return operation_outcome([self.issue])

    def response(self) -> Response:
        return fhir_response(self.status, self.outcome(), self.headers or None)


def too_large(size: int, limit: int, advice: str = "") -> FhirProblem:
    """413 for a body of ``size`` bytes or more; the connection closes (rest unread)."""
    text = f"the body ({size} bytes or more) exceeds the limit of {limit} bytes{advice}"
    return FhirProblem(413, Issue("too-costly", text), {"Connection": "close"})


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case ('' if absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def check_media_type(request: Request, accepted: frozenset[str] = JSON_MEDIA_TYPES) -> None:
    """415 unless the body is declared as one of ``accepted`` (or not declared at all)."""
    declared = media_type(request)
    if declared and declared not in accepted:
        shown = declared if len(declared) <= 60 else declared[:60] + "..."
        wanted = FHIR_JSON if FHIR_JSON in accepted else " or ".join(sorted(accepted))
        raise FhirProblem(
            415, Issue("not-supported", f"content type {shown!r} is not supported; send {wanted}")
        )


def fhir_response(
    status: int, content: object, headers: Mapping[str, str] | None = None
) -> Response:
    """``content`` (bytes as they are, anything else as JSON) as FHIR JSON."""
    body = content if isinstance(content, bytes) else orjson.dumps(content)
    return Response(body, status_code=status, media_type=FHIR_JSON_UTF8, headers=headers)


def outcome_response(
    status: int, issues: Iterable[Issue], headers: Mapping[str, str] | None = None
) -> Response:
    return fhir_response(status, operation_outcome(issues), headers)


def information(text: str) -> Issue:
    """An informational issue, e.g. what a ``Prefer: return=OperationOutcome`` write did."""
    return Issue("informational", text, severity="information")


def status_text(status: int) -> str:
    """``Bundle.entry.response.status``: the code and its phrase, e.g. ``201 Created``."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


@dataclass(frozen=True, slots=True)
class Preferences:
    """The HTTP ``Prefer`` header (R4 http.html#ops, search.html#errors)."""

    returns: str = "representation"  # minimal | representation | OperationOutcome
    strict: bool = False  # handling=strict: unknown search parameters are errors

    @classmethod
    def of(cls, request: Request) -> Preferences:
        return cls.parse(request.headers.get("prefer", ""))

    @classmethod
    def parse(cls, header: str) -> Preferences:
        # Prefer is a list of token[=value] pairs (RFC 7240); unknown ones are ignored.
        returns, strict = "representation", False
        for token in re.split(r"[,;]", header):
            name, _, value = token.strip().partition("=")
            value = value.strip().strip('"')
            if name == "return" and value in _RETURNS:
                returns = value
            elif name == "handling":
                strict = value == "strict"
        return cls(returns, strict)


__all__ = [
    "FHIR_JSON",
    "FHIR_JSON_UTF8",
    "FORM_MEDIA_TYPE",
    "JSON_MEDIA_TYPES",
    "BodyTooLarge",
    "FhirProblem",
    "Preferences",
    "check_media_type",
    "fhir_response",
    "information",
    "media_type",
    "outcome_response",
    "read_limited",
    "status_text",
    "too_large",
]
