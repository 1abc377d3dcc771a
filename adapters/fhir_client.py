"""Reads from the EHR's FHIR server: id-only notifications' resources, missed events.

``read("Observation/123")`` or ``read("https://ehr/fhir/Observation/123")``
returns the resource; ``subscription_events(subscription, 5, 9)`` asks the
server for notifications 5-9 again (Backport IG ``$events``). Both with the
site's authentication (``adapters/smart_auth.py``) and in-place retries with
backoff (``pipelines/retry.py``) for what may pass: timeouts, connection
errors, 429 and 5xx.

Only the configured FHIR base is ever read. A notification is input from
outside: an absolute reference to another host is refused
(:class:`RemoteRejected`), never fetched with our credentials attached.
"""

from __future__ import annotations

import re
import ssl
import threading
from typing import Any

import httpx

from ehrbridge.adapters.fhir_sink import FHIR_JSON, check_response
from ehrbridge.adapters.smart_auth import HttpxAuth, TokenSource
from ehrbridge.config import RetryPolicy
from ehrbridge.core.errors import RemoteRejected, UpstreamUnavailable
from ehrbridge.pipelines.retry import call_with_retry

_RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]+)?$")
# A notification arrives while its sender waits: retry briefly, then answer 503.
DEFAULT_POLICY = RetryPolicy(attempts=3, initial_backoff_s=0.2, max_backoff_s=1.0, delayed_s=[])


class FhirReader:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        auth: TokenSource | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        stop: threading.Event | None = None,
        verify: ssl.SSLContext | bool = True,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self.stop = stop
        self._client = client or httpx.Client(timeout=timeout_s, verify=verify)
        self._auth = HttpxAuth(auth) if auth is not None else None
        self.reads = 0

    def relative(self, reference: str) -> str:
        """``Type/id`` of a reference within our FHIR base; RemoteRejected otherwise."""
        text = reference.strip()
        if text.startswith(("http://", "https://")):
            if not text.startswith(self.base_url + "/"):
                raise RemoteRejected(
                    "the reference points outside the configured FHIR server "
                    "(subscriptions.fhir_base); it is not fetched",
                    reason="subscription.foreign_reference",
                )
            text = text[len(self.base_url) + 1 :]
        match = _RELATIVE.match(text)
        if match is None:
            raise RemoteRejected(
                "the reference is not of the form Type/id", reason="subscription.bad_reference"
            )
        return f"{match.group(1)}/{match.group(2)}"

    def read(self, reference: str) -> dict[str, Any]:
        relative = self.relative(reference)
        kind = relative.split("/", 1)[0]  # logs name the type only: ids can identify patients
        return call_with_retry(
            lambda: self._get(relative), self.policy, f"FHIR read ({kind})", self.stop
        )

    def subscription_events(self, subscription: str, first: int, last: int) -> dict[str, Any]:
        """Notifications ``first``..``last`` of a Subscription, sent again.

        ``GET [base]/Subscription/[id]/$events`` (Subscriptions Backport IG,
        operation backport-subscription-events): a history Bundle of type
        ``query-event``. ``content=full-resource`` is a hint the server may
        ignore; an id-only answer is followed up like any notification.
        """
        relative = self.relative(subscription)
        if not relative.startswith("Subscription/"):
            raise RemoteRejected(
                "the notification's subscription is not a Subscription reference",
                reason="subscription.bad_reference",
            )
        params = {
            "eventsSinceNumber": str(first),
            "eventsUntilNumber": str(last),
            "content": "full-resource",
        }
        return call_with_retry(
            lambda: self._get(f"{relative}/$events", params, expected="Bundle"),
            self.policy,
            "FHIR Subscription $events",
            self.stop,
        )

    def _get(
        self, relative: str, params: dict[str, str] | None = None, expected: str | None = None
    ) -> dict[str, Any]:
        self.reads += 1
        try:
            response = self._client.get(
                f"{self.base_url}/{relative}",
                params=params,
                headers={"accept": FHIR_JSON},
                auth=self._auth if self._auth is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable("FHIR server timed out") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"FHIR server unreachable: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:  # an answer that cannot be read (bad content-encoding)
            raise RemoteRejected(
                f"read {relative}: the answer could not be read ({type(exc).__name__})",
                reason="fhir.bad_response",
            ) from exc
        check_response(response, f"read {relative}")
        try:
            resource = response.json()
        except ValueError as exc:
            raise RemoteRejected(
                f"read {relative}: the answer is not JSON", reason="fhir.bad_response"
            ) from exc
        expected = expected or relative.split("/", 1)[0]
        if not isinstance(resource, dict) or resource.get("resourceType") != expected:
            raise RemoteRejected(
                f"read {relative}: the answer is not a {expected}", reason="fhir.bad_response"
            )
        return resource

    def close(self) -> None:
        self._client.close()


def read_with_grant(
    url: str, access_token: str | None, timeout_s: float, client: httpx.Client | None = None
) -> Any:
    """One GET of a resource with the caller's own bearer token, and no retry.

    What a CDS Hooks service does with the ``fhirAuthorization`` the EHR sent
    along with a hook (CDS Hooks 2.0, "FHIR Resource Access"): the EHR waits
    for the card, so a failed read is not retried. The parsed answer on 200,
    None for any other status; UpstreamUnavailable when the server cannot be
    reached or its answer is not JSON. Whether ``url`` may be read at all (a
    base the site trusts) is the caller's decision.
    """
    headers = {"accept": FHIR_JSON}
    if access_token:
        headers["authorization"] = f"Bearer {access_token}"
    try:
        get = client.get if client is not None else httpx.get
        response = get(url, headers=headers, timeout=timeout_s)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        raise UpstreamUnavailable(f"FHIR read failed: {type(exc).__name__}") from exc
