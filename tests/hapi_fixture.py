"""Session fixture that hands tests a real HAPI FHIR JPA server (``scripts/hapi``).

Where the server comes from, first match wins:

1. ``HAPI_BASE_URL`` is set (``scripts/test`` starts the server once per run
   and exports it): that server, left as found.
2. Otherwise ``scripts/hapi start``: built from ``hapi/`` with Maven Central's
   jars and started (about 25 s and 48 CPU-seconds on 2 cores). A server this
   fixture started is stopped at the end of the session
   (``EHRBRIDGE_HAPI_KEEP=1`` keeps it for the next run); one that was
   already running is reused and left running.

Without a server the ``hapi`` tests skip, except under ``CI=true`` where the
session fails: CI must never go green without the real server.

Use from ``tests/conftest.py`` with ``pytest_plugins = ["hapi_fixture"]``.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from kafka_fixture import REPO_ROOT, running_in_ci

HAPI_SCRIPT = REPO_ROOT / "scripts" / "hapi"
# A cold start builds the server first (~340 MB from Maven Central once).
START_TIMEOUT_S = 900.0


class HapiUnavailableError(RuntimeError):
    """No HAPI FHIR server could be started or reached."""


@dataclass(frozen=True)
class HapiServer:
    """A running server: its plain base and the base that validates every request."""

    base: str

    @property
    def validating_base(self) -> str:
        return f"{self.base}-validating"  # the same database, the instance validator on


def run_hapi_script(command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [str(HAPI_SCRIPT), command],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HapiUnavailableError(f"scripts/hapi {command}: {exc}") from exc


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _start() -> tuple[str, bool]:
    """Start (or reuse) the scripts/hapi server: its base URL, and whether it was running."""
    already_running = run_hapi_script("status", 30.0).returncode == 0
    result = run_hapi_script("start", START_TIMEOUT_S)
    base = _last_line(result.stdout)
    if result.returncode != 0 or not base:
        tail = "\n".join(result.stderr.strip().splitlines()[-40:])
        raise HapiUnavailableError(f"scripts/hapi start exited {result.returncode}:\n{tail}")
    return base, already_running


def _answers(base: str) -> None:
    try:
        response = httpx.get(f"{base}/metadata", timeout=30.0)
    except httpx.HTTPError as exc:
        raise HapiUnavailableError(f"{base} does not answer: {exc!r}") from exc
    if response.status_code != 200:
        raise HapiUnavailableError(f"{base}/metadata answered {response.status_code}")


@pytest.fixture(scope="session")
def hapi_server() -> Iterator[HapiServer]:
    """A real, answering HAPI FHIR JPA server for the whole test session."""
    stop = False
    try:
        base = os.environ.get("HAPI_BASE_URL", "").strip().rstrip("/")
        if not base:
            base, running = _start()
            stop = not running and os.environ.get("EHRBRIDGE_HAPI_KEEP") != "1"
        _answers(base)
    except HapiUnavailableError as exc:
        message = f"no HAPI FHIR server: {exc}"
        if running_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield HapiServer(base)
    finally:
        if stop:
            result = run_hapi_script("stop", 60.0)
            if result.returncode != 0:
                warnings.warn(f"scripts/hapi stop failed: {result.stderr.strip()}", stacklevel=2)
