"""Writes results to the EHR's FHIR server as transactions.

Each envelope's payload is one result's transaction Bundle
(``pipelines/provenance.py``: Devices by conditional create, the Observation
by conditional update on its identifier, its Provenance by id), so each
result is all-or-nothing and a replay never duplicates anything.

Batching: up to ``results_per_request`` results travel in **one** transaction
(their entries concatenated; the shared Devices once). A transaction is
atomic, so the EHR answers for all of them at once:

* 200 with a ``transaction-response`` Bundle: every entry's
  ``response.status`` is checked; all results are delivered;
* 429, 5xx, timeouts, connection errors: :class:`UpstreamUnavailable` for
  the whole batch (retried; nothing was written);
* another 4xx: one result may be at fault, so each result is sent again in
  its own transaction, and only those the EHR refuses again fail
  (:class:`BatchError`, carrying the server's OperationOutcome for the
  dead-letter store). A batch of healthy results costs one request; a bad
  one costs one more request per result of its batch.

A FHIR ``batch`` Bundle would give per-entry outcomes in one request, but it
cannot keep an Observation and its Provenance together (batch entries may
not reference each other), so transactions it is.

Errors are translated here: timeouts, connection errors, 429, 5xx and 409
(a concurrent write of the same conditional resource) are
:class:`UpstreamUnavailable` (retried); other 4xx -- 422 from a validating
server among them -- are :class:`RemoteRejected`, kept with the server's
OperationOutcome in the dead-letter store.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from ehrbridge.adapters.smart_auth import HttpxAuth, TokenSource
from ehrbridge.core.contracts import BatchError, Envelope
from ehrbridge.core.errors import (
    EhrbridgeError,
    PermanentError,
    RemoteRejected,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"


class FhirSink:
    name = "fhir"

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        auth: TokenSource | None = None,
        results_per_request: int = 20,
        verify: ssl.SSLContext | bool = True,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.results_per_request = results_per_request
        self._client = client or httpx.Client(timeout=timeout_s, verify=verify)
        self._auth = HttpxAuth(auth) if auth is not None else None
        self.requests = 0  # transactions sent (tests and progress output)

    def write(self, batch: Sequence[Envelope]) -> None:
        errors: dict[int, EhrbridgeError] = {}
        indexed, size = list(enumerate(batch)), self.results_per_request
        for start in range(0, len(indexed), size):
            errors.update(self._write_chunk(indexed[start : start + size]))
        if len(errors) == len(batch) == 1:
            raise errors[0]
        if errors:
            raise BatchError(errors)

    def _write_chunk(self, chunk: list[tuple[int, Envelope]]) -> dict[int, EhrbridgeError]:
        # Each payload is parsed once, here: the check and the merged request share it.
        unreadable, bundles = _read(chunk)
        return unreadable | self._send_chunk(bundles) if bundles else unreadable

    def _send_chunk(self, chunk: list[tuple[int, dict[str, Any]]]) -> dict[int, EhrbridgeError]:
        try:
            self._post([bundle for _, bundle in chunk])
            return {}
        except UpstreamUnavailable as error:
            return {index: error for index, _ in chunk}
        except RemoteRejected as error:
            if len(chunk) == 1:
                return {chunk[0][0]: error}
        log.info("FHIR transaction of %d results refused; sending them one by one", len(chunk))
        errors: dict[int, EhrbridgeError] = {}
        for index, bundle in chunk:
            try:
                self._post([bundle])
            except EhrbridgeError as error:
                errors[index] = error
        return errors

    def transaction(self, results: Sequence[Envelope]) -> dict[str, Any]:
        """POST the results' transactions as one; return the transaction-response Bundle."""
        return self._post([orjson.loads(e.payload) for e in results])

    def _post(self, bundles: Sequence[dict[str, Any]]) -> dict[str, Any]:
        bundle = merge_transactions(bundles)
        try:
            response = self._client.post(
                self.base_url,
                content=orjson.dumps(bundle),
                headers={
                    "content-type": FHIR_JSON,
                    "accept": FHIR_JSON,
                    "prefer": "return=minimal",
                },
                auth=self._auth if self._auth is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable("FHIR server timed out") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"FHIR server unreachable: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:  # an answer that cannot be read (bad content-encoding)
            raise RemoteRejected(
                f"FHIR server's answer could not be read: {type(exc).__name__}",
                reason="fhir.bad_response",
            ) from exc
        finally:
            self.requests += 1
        check_response(response, f"transaction of {len(bundles)} result(s)")
        return _checked_transaction_response(response, len(bundle["entry"]))

    def close(self) -> None:
        self._client.close()


def _read(
    chunk: list[tuple[int, Envelope]],
) -> tuple[dict[int, EhrbridgeError], list[tuple[int, dict[str, Any]]]]:
    """Each item's transaction Bundle; one whose payload is not one is refused alone,
    never sent."""
    errors: dict[int, EhrbridgeError] = {}
    bundles: list[tuple[int, dict[str, Any]]] = []
    for index, envelope in chunk:
        bundle = _bundle(envelope.payload)
        if bundle is None:
            errors[index] = PermanentError(
                f"{envelope.describe()}: the record is not a FHIR transaction Bundle",
                reason="fhir.bad_record",
            )
        else:
            bundles.append((index, bundle))
    return errors, bundles


def _bundle(payload: bytes) -> dict[str, Any] | None:
    try:
        bundle = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    readable = isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("request"), dict) for e in entries
    )
    return bundle if readable else None


def merge_transactions(bundles: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One transaction holding the entries of several; an entry shared by fullUrl once.

    Results of the same prediction identifier (a replay inside one batch) keep
    only the last: a transaction may not touch one resource twice.
    """
    entries: dict[str, dict[str, Any]] = {}
    for bundle in bundles:
        for entry in bundle["entry"]:
            key = entry.get("fullUrl") or orjson.dumps(entry["request"]).decode()
            entries.pop(key, None)  # re-insert: the later version, in its place in order
            entries[key] = entry
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries.values())}


def _checked_transaction_response(response: httpx.Response, expected: int) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise RemoteRejected(
            "FHIR server answered the transaction without a JSON body",
            reason="fhir.bad_response",
            status=response.status_code,
        ) from exc
    if not isinstance(body, dict):
        body = {}
    entries = body.get("entry")
    if not isinstance(entries, list) or len(entries) != expected:
        raise RemoteRejected(
            f"FHIR server answered {len(entries) if isinstance(entries, list) else 'no'} entries "
            f"for a transaction of {expected}",
            reason="fhir.bad_response",
            status=response.status_code,
            body=response.content[:16384],
        )
    for position, entry in enumerate(entries):
        status = str((entry.get("response") or {}).get("status", ""))
        if not status[:1] == "2":
            raise RemoteRejected(
                f"transaction entry {position} answered {status or 'no status'}",
                reason="fhir.bad_response",
                status=response.status_code,
                body=response.content[:16384],
            )
    return body


def check_response(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if status < 300:
        return
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"{what}: FHIR server answered {status}")
    if status == 409:
        # Another writer took the same resource first (HAPI-2745, or HAPI-0550 on a
        # client-assigned id: concurrent conditional creates of one identifier). Nothing
        # was written; sent again, the conditional entries find what the winner wrote.
        raise UpstreamUnavailable(
            f"{what}: FHIR server answered 409, a concurrent write: {_diagnostics(response)}",
            reason="fhir.conflict",
        )
    if status == 401:
        # Still 401 after a fresh token: the credentials or their scopes are wrong. Wait
        # on the retry tiers for someone to fix them rather than dead-letter every result.
        raise UpstreamUnavailable(
            f"{what}: FHIR server refused our credentials (401): {_diagnostics(response)}",
            reason="auth.unauthorized",
        )
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
