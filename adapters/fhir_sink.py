"""Writes FHIR resources to the EHR's FHIR server by conditional update.

Each envelope's payload is one resource (JSON); its ``fhir.conditional``
header holds the search that identifies it, e.g. ``identifier=sys|value``.
The request is ``PUT [base]/[type]?[search]`` (FHIR R4 conditional update):
no match creates, one match updates, several matches is a 412 -- so writing
the same prediction twice never makes two Observations.

Errors are translated here: timeouts, connection errors, 429 and 5xx are
:class:`UpstreamUnavailable` (retried); other 4xx are :class:`RemoteRejected`
carrying the server's OperationOutcome for the dead-letter store.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote

import httpx

from ehrbridge.pipelines.contracts import BatchError, Envelope
from ehrbridge.pipelines.errors import EhrbridgeError, RemoteRejected, UpstreamUnavailable

CONDITIONAL_HEADER = "fhir.conditional"
RESOURCE_TYPE_HEADER = "fhir.resource_type"
FHIR_JSON = "application/fhir+json"


class FhirSink:
    name = "fhir"

    def __init__(
        self, base_url: str, *, timeout_s: float = 5.0, client: httpx.Client | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout_s)

    def write(self, batch: Sequence[Envelope]) -> None:
        errors: dict[int, EhrbridgeError] = {}
        for index, envelope in enumerate(batch):
            try:
                self._put(envelope)
            except EhrbridgeError as error:
                errors[index] = error
        if len(errors) == len(batch) == 1:
            raise errors[0]
        if errors:
            raise BatchError(errors)

    def _put(self, envelope: Envelope) -> None:
        resource_type = envelope.headers[RESOURCE_TYPE_HEADER]
        condition = envelope.headers[CONDITIONAL_HEADER]
        url = f"{self.base_url}/{resource_type}?{quote(condition, safe='=&')}"
        try:
            response = self._client.put(
                url,
                content=envelope.payload,
                headers={"content-type": FHIR_JSON, "accept": FHIR_JSON},
            )
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable("FHIR server timed out") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"FHIR server unreachable: {type(exc).__name__}") from exc
        check_response(response, f"PUT {resource_type}")

    def close(self) -> None:
        self._client.close()


def check_response(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if status < 300:
        return
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"{what}: FHIR server answered {status}")
    raise RemoteRejected(
        f"{what}: FHIR server refused it ({status}): {_diagnostics(response)}",
        reason=f"fhir.http_{status}",
        status=status,
        body=response.content[:16384],
    )


def _diagnostics(response: httpx.Response) -> str:
    """The OperationOutcome's issue diagnostics, which name the problem precisely."""
    try:
        outcome = response.json()
        issues = outcome.get("issue", []) if isinstance(outcome, dict) else []
        texts = [str(i.get("diagnostics") or i.get("code")) for i in issues if isinstance(i, dict)]
        return "; ".join(texts)[:500] or "no OperationOutcome"
    except ValueError:
        return "no OperationOutcome"
