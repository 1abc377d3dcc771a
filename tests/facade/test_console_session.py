"""Console sign-in over real HTTP: the session cookie, CSRF, logout, redirects, escaping.

The browser tests (tests/browser/test_console.py) drive the pages; these hold
the security properties a browser hides: the cookie's flags, that a state
change on the cookie needs the session's CSRF token and this host's Origin,
that the login never redirects off the console, and that what a user types
comes back escaped.
"""

from __future__ import annotations

import re
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.config import ApiRole
from ehrbridge.pipelines.er7 import Message
from ehrbridge.sandbox.credentials import api_token
from ehrbridge.sandbox.run import BackgroundSandbox, example_message_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("console"), fhir_site=False) as running:
        yield running


def signed_in(site: BackgroundSandbox, role: ApiRole, **form: str) -> httpx.Client:
    client = httpx.Client(base_url=site.sandbox.api_url, follow_redirects=False)
    answer = client.post(
        "/console/login", data={"token": api_token(site.sandbox.data_dir, role), **form}
    )
    assert answer.status_code == 303, answer.text
    return client


def csrf_of(client: httpx.Client) -> str:
    page = client.get("/console/sites").text
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found is not None
    return found.group(1)


def test_login_sets_an_httponly_samesite_strict_session_cookie(site: BackgroundSandbox) -> None:
    client = httpx.Client(base_url=site.sandbox.api_url)
    token = api_token(site.sandbox.data_dir, ApiRole.OPERATOR)
    answer = client.post("/console/login", data={"token": token, "next": "/console/messages"})
    assert answer.status_code == 303 and answer.headers["location"] == "/console/messages"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert token not in answer.headers["set-cookie"]  # an opaque id, not the token
    assert "secure" not in cookie  # plain HTTP here; over TLS it is Secure
    page = client.get("/console/messages")
    assert page.status_code == 200 and "sandbox-operator" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


def test_the_server_root_leads_a_browser_to_the_console_login(site: BackgroundSandbox) -> None:
    client = httpx.Client(base_url=site.sandbox.api_url, follow_redirects=True)
    answer = client.get("/", headers={"Accept": "text/html"})
    assert answer.status_code == 401  # no session yet: the page that leads to the login
    assert 'href="/console/login?next=%2Fconsole%2Fsites"' in answer.text


def test_a_wrong_token_gets_no_session(site: BackgroundSandbox) -> None:
    client = httpx.Client(base_url=site.sandbox.api_url)
    answer = client.post("/console/login", data={"token": "not-a-token"})
    assert answer.status_code == 401 and "Not signed in" in answer.text
    assert "set-cookie" not in answer.headers
    refused = client.get("/console/sites")
    assert refused.status_code == 401 and "/console/login" in refused.text


def test_the_login_never_redirects_off_the_console(site: BackgroundSandbox) -> None:
    client = signed_in(site, ApiRole.VIEWER)
    for target in ("https://evil.example/", "//evil.example/x", "/api/audit"):
        answer = client.post(
            "/console/login",
            data={"token": api_token(site.sandbox.data_dir, ApiRole.VIEWER), "next": target},
        )
        assert answer.headers["location"] == "/console/sites", target


def test_a_state_change_on_the_cookie_needs_the_csrf_token_and_this_origin(
    site: BackgroundSandbox,
) -> None:
    client = signed_in(site, ApiRole.OPERATOR)
    body = {"all": True, "dry_run": True}
    assert client.post("/api/dlq/replay", json=body).status_code == 403
    wrong = {"X-CSRF-Token": "guess"}
    assert client.post("/api/dlq/replay", json=body, headers=wrong).status_code == 403
    good = {"X-CSRF-Token": csrf_of(client)}
    cross = {**good, "Origin": "https://evil.example"}
    assert client.post("/api/dlq/replay", json=body, headers=cross).status_code == 403
    answer = client.post("/api/dlq/replay", json=body, headers=good)
    assert answer.status_code == 200 and answer.json()["dry_run"] is True


def test_the_session_carries_the_role_on_api_routes_too(site: BackgroundSandbox) -> None:
    viewer = signed_in(site, ApiRole.VIEWER)
    assert viewer.get("/api/results").status_code == 200
    assert viewer.get("/api/dlq").status_code == 403
    assert viewer.get("/console/dead-letters").status_code == 403
    good = {"X-CSRF-Token": csrf_of(viewer)}
    replay = viewer.post("/api/dlq/replay", json={"all": True}, headers=good)
    assert replay.status_code == 403


def test_logout_ends_the_session_only_with_its_csrf_token(site: BackgroundSandbox) -> None:
    client = signed_in(site, ApiRole.OPERATOR)
    token = csrf_of(client)
    client.post("/console/logout", data={"csrf": "wrong"})
    assert client.get("/console/sites").status_code == 200  # a forged logout does nothing
    session = client.cookies["ehrbridge_session"]
    answer = client.post("/console/logout", data={"csrf": token})
    assert 'ehrbridge_session=""' in answer.headers["set-cookie"]  # the browser drops it
    kept = httpx.Client(base_url=site.sandbox.api_url, cookies={"ehrbridge_session": session})
    assert kept.get("/console/sites").status_code == 401  # and the server forgot it


def audit_after(site: BackgroundSandbox, seq: int) -> list[dict[str, Any]]:
    runtime = site.sandbox.runtime
    assert runtime is not None
    return [e for e in runtime.audit.entries() if e["seq"] > seq]


def test_console_reads_of_patient_data_are_audited_with_the_session_user(
    site: BackgroundSandbox,
) -> None:
    runtime = site.sandbox.runtime
    assert runtime is not None
    control_id = f"C{uuid.uuid4().hex[:10]}"
    with MllpClient("127.0.0.1", site.sandbox.mllp_port) as mllp:
        assert mllp.send(example_oru(control_id)).code == "AA"
    before = max((e["seq"] for e in runtime.audit.entries()), default=0)
    viewer = signed_in(site, ApiRole.VIEWER)
    found = viewer.get("/console/messages", params={"control_id": control_id}).text
    offset = re.search(r'href="/console/messages/raw/(\d+)"', found)
    assert offset is not None
    viewer.get(f"/console/messages/raw/{offset.group(1)}")
    viewer.get("/console/dead-letters")
    viewer.get("/console/sites")  # counts only: not an audited read
    entries = [(e["action"], e["outcome"], e["who"]) for e in audit_after(site, before)]
    assert entries == [
        ("GET /console/messages", 200, "sandbox-viewer"),
        ("GET /console/messages/{topic}/{offset}", 200, "sandbox-viewer"),
        ("GET /console/dead-letters", 403, "sandbox-viewer"),
    ]
    patients = [e["patients"] for e in audit_after(site, before)][:2]
    assert patients == [["MRN900001"], ["MRN900001"]]  # the example message's PID-3


def test_over_tls_the_session_cookie_is_secure(tmp_path: Path) -> None:
    with BackgroundSandbox(tmp_path / "tls", fhir_site=False, tls=True) as running:
        sandbox = running.sandbox
        assert sandbox.tls is not None and sandbox.api_url.startswith("https://")
        trust = ssl.create_default_context(cafile=sandbox.tls.ca_file)
        client = httpx.Client(base_url=sandbox.api_url, verify=trust)
        token = api_token(sandbox.data_dir, ApiRole.VIEWER)
        answer = client.post("/console/login", data={"token": token})
        assert answer.status_code == 303 and "secure" in answer.headers["set-cookie"].lower()


def test_the_dead_letters_page_previews_a_replay_with_the_current_mapping(
    site: BackgroundSandbox,
) -> None:
    message = SyntheticEhr(seed=5, patients=1).bad_messages()["unknown_unit"]
    with MllpClient("127.0.0.1", site.sandbox.mllp_port) as mllp:
        assert mllp.send(message).code == "AE"
    control_id = Message.parse(message).control_id
    page = signed_in(site, ApiRole.OPERATOR).get("/console/dead-letters").text
    row = next(r for r in page.split("<tr") if f">{control_id}<" in r)
    assert "still fails with the current mapping:" in row and "unit" in row


def test_what_a_user_types_comes_back_escaped(site: BackgroundSandbox) -> None:
    client = signed_in(site, ApiRole.OPERATOR)
    hostile = '"><script>alert(1)</script>'
    page = client.get("/console/messages", params={"control_id": hostile, "patient": hostile})
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)" in page.text


def example_oru(control_id: str) -> bytes:
    """The README's sandbox ORU^R01 under a control id of this test's."""
    message = example_message_file().read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    header, rest = message.split(b"\r", 1)
    fields = header.split(b"|")
    fields[9] = control_id.encode()
    return b"|".join(fields) + b"\r" + rest
