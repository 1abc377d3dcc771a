"""Shared fixtures: a running sandbox on free ports, and small waiting helpers."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from oru_conformance import strict_errors

from ehrbridge.sandbox.mllp_peer import MllpPeer
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

pytest_plugins = ["kafka_fixture", "hapi_fixture", "model_servers_fixture"]

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"

# tests/ mirrors the product's folders (pipelines/, adapters/, facade/, ...,
# e2e/, faults/). Some test modules share helpers with tests in other folders
# (``from test_mllp import send``), as they did when tests/ was flat: each
# folder is on the path so that a helper need not move with its first user.
# Test file names stay unique across folders (pytest's default import mode).
MIRRORED = ("pipelines", "mappings", "adapters", "facade", "evaluation", "sandbox", "bench")
MIRRORED += ("e2e", "faults", "project")
sys.path[1:1] = [str(Path(__file__).parent / folder) for folder in MIRRORED]
T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout_s: float = 20.0, what: str = "condition") -> T:
    """Poll until ``probe`` returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def all_resources(url: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every resource of a FHIR search, following the Bundle's next links."""
    found: list[dict[str, Any]] = []
    next_url: str | None = url
    query = params
    with httpx.Client(timeout=10) as client:
        while next_url:
            bundle = client.get(next_url, params=query).json()
            query = None
            found.extend(entry["resource"] for entry in bundle.get("entry", []))
            next_url = next(
                (link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None
            )
    return found


@pytest.fixture(autouse=True)
def every_oru_conforms(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every ORU^R01 an MLLP peer (the EHR's results inbox) receives in a test is
    validated strictly for its HL7 version when the test ends (tests/oru_conformance.py)."""
    received: list[bytes] = []
    keep = MllpPeer._keep

    def keep_and_collect(peer: MllpPeer, message: bytes, code: str | None) -> None:
        if b"|ORU^R01" in message[:200]:
            received.append(message)
        keep(peer, message, code)

    monkeypatch.setattr(MllpPeer, "_keep", keep_and_collect)
    yield received
    failures = {}
    for message in dict.fromkeys(received):  # a resend is the same message: checked once
        errors = strict_errors(message)
        if errors:
            failures[message.split(b"\r", 1)[0].decode(errors="replace")] = errors
    assert not failures, f"ORU^R01 messages sent that fail strict HL7 validation: {failures}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("sandbox")) as running:
        yield running


@pytest.fixture
def ehr() -> SyntheticEhr:
    return SyntheticEhr(seed=11, patients=20)
