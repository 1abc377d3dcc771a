"""The EHR side of a SMART on FHIR EHR launch: discovery, the code exchange, a Patient read.

https://hl7.org/fhir/smart-app-launch/app-launch.html. The flow itself (PKCE,
state, which issuers may launch) is ``ehrbridge/smart_launch.py``; here are
only the HTTP calls, each with the site's timeout, and their failures as one
:class:`LaunchFailed` naming the step, never the token or the patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class LaunchFailed(Exception):
    """A step of the launch failed; the message says which, for the page and the log."""


@dataclass(frozen=True, slots=True)
class SmartEndpoints:
    authorize: str
    token: str


def discover(iss: str, timeout_s: float) -> SmartEndpoints:
    """The EHR's endpoints from ``<iss>/.well-known/smart-configuration``."""
    url = f"{iss.rstrip('/')}/.well-known/smart-configuration"
    found = _json(_call("GET", url, timeout=timeout_s, headers={"accept": "application/json"}))
    authorize, token = found.get("authorization_endpoint"), found.get("token_endpoint")
    if not isinstance(authorize, str) or not isinstance(token, str):
        raise LaunchFailed("the EHR's smart-configuration names no authorization or token endpoint")
    return SmartEndpoints(authorize, token)


def exchange(endpoints: SmartEndpoints, form: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """The token response for an authorization code (``form``: code, verifier, client...)."""
    answer = _call("POST", endpoints.token, data=form, timeout=timeout_s)
    if answer.status_code != 200:
        raise LaunchFailed(f"the EHR's token endpoint refused the code ({answer.status_code})")
    return _json(answer)


def read_patient(iss: str, fhir_id: str, access_token: str, timeout_s: float) -> dict[str, Any]:
    """``Patient/<id>`` from the launching EHR, with the launch's access token."""
    answer = _call(
        "GET",
        f"{iss.rstrip('/')}/Patient/{fhir_id}",
        headers={"accept": "application/fhir+json", "authorization": f"Bearer {access_token}"},
        timeout=timeout_s,
    )
    return _json(answer) if answer.status_code == 200 else {}


def _call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return httpx.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise LaunchFailed(f"the EHR cannot be reached ({type(exc).__name__})") from None


def _json(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        raise LaunchFailed(f"the EHR answered {answer.url.path} with no JSON") from None
    if answer.status_code != 200 or not isinstance(body, dict):
        raise LaunchFailed(f"the EHR answered {answer.url.path} with {answer.status_code}")
    return body
