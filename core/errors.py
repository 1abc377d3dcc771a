"""The ehrbridge exception tree.

Every error that crosses a stage boundary is one of these. Third-party
exceptions (httpx, kafka-python, sqlite3, yaml, pydantic) are translated at the
adapter boundary with ``raise X(...) from exc`` so that the pipeline only ever
has to decide between *retry* and *dead-letter*::

    EhrbridgeError
    ├── ConfigError                 a site/mapping file is wrong; nothing starts
    ├── TransientError              retry with backoff, then delayed retry, then DLQ
    │   └── UpstreamUnavailable     model server 503/timeout, FHIR 5xx, broker or disk down
    └── PermanentError              straight to the dead-letter store, raw bytes kept
        ├── MessageRejected         cannot be parsed as HL7v2/FHIR at all -> MLLP AR
        ├── MessageUnusable         valid HL7 but unusable (no PID, bad number) -> MLLP AE
        └── RemoteRejected          the EHR / model answered 4xx (OperationOutcome kept)

``reason`` is a short, stable, machine-readable code (``hl7.missing_pid``) used
for DLQ selection and metrics.  ``detail`` is the human sentence.  Neither may
contain PHI: they name segments and fields, never their patient-bearing values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hl7Location:
    """Where in a message a problem sits, as HL7 ERR-2 (ERL) expresses it."""

    segment: str
    sequence: int = 1  # 1-based occurrence of the segment in the message
    field: int | None = None
    component: int | None = None

    def __str__(self) -> str:
        parts = [f"{self.segment}"]
        if self.sequence != 1:
            parts[0] += f"[{self.sequence}]"
        if self.field is not None:
            parts.append(str(self.field))
            if self.component is not None:
                parts.append(str(self.component))
        return "-".join(parts)


class EhrbridgeError(Exception):
    """Base of every error ehrbridge raises on purpose."""

    reason: str = "error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class ConfigError(EhrbridgeError):
    """A configuration or mapping file is invalid. Names the file, line and field."""

    reason = "config.invalid"

    def __init__(
        self,
        detail: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.field = field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        at = f"{field}: " if field else ""
        super().__init__(f"{prefix}{at}{detail}", reason=reason)


class TransientError(EhrbridgeError):
    """Might succeed if tried again later. The record is retried, never dropped."""

    reason = "transient"


class UpstreamUnavailable(TransientError):
    """A system we depend on is down, overloaded or slow (503, timeout, broker down)."""

    reason = "upstream.unavailable"


class PermanentError(EhrbridgeError):
    """Will fail the same way every time. The record goes to the dead-letter store."""

    reason = "permanent"


class MessageRejected(PermanentError):
    """The bytes are not a parseable message. An MLLP sender gets AR.

    ``hl7_error_code`` is from HL7 table 0357 (100 segment sequence error,
    102 data type error, 207 application internal error).
    """

    reason = "hl7.unparseable"

    def __init__(
        self,
        detail: str,
        *,
        reason: str | None = None,
        location: Hl7Location | None = None,
        hl7_error_code: int = 100,
    ) -> None:
        super().__init__(detail, reason=reason)
        self.location = location
        self.hl7_error_code = hl7_error_code


class MessageUnusable(PermanentError):
    """A well-formed message that ehrbridge cannot use. An MLLP sender gets AE.

    ``hl7_error_code`` is from HL7 table 0357 (101 required field missing,
    102 data type error, 200 unsupported message type, 207 application error).
    """

    reason = "hl7.unusable"

    def __init__(
        self,
        detail: str,
        *,
        reason: str | None = None,
        location: Hl7Location | None = None,
        hl7_error_code: int = 207,
    ) -> None:
        super().__init__(detail, reason=reason)
        self.location = location
        self.hl7_error_code = hl7_error_code


class RemoteRejected(PermanentError):
    """A remote system refused the request for good (HTTP 4xx). Keeps its answer."""

    reason = "remote.rejected"

    def __init__(
        self,
        detail: str,
        *,
        reason: str | None = None,
        status: int | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(detail, reason=reason)
        self.status = status
        self.body = body
