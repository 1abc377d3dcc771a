"""Every route's body stops at one ceiling, before the token is checked.

FastAPI parses a JSON body before it solves the route's dependencies (the token
check among them), so the operator and admin JSON routes read whatever an
anonymous client sent. ``ehrbridge/body_cap.py`` answers 413 past the larger of
``http.max_body_bytes`` and ``cds_hooks.max_body_bytes``, whether the body
declares its length or streams in chunks. Real sockets, small limits.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from auth_tokens import headers

from ehrbridge.config import SiteConfig
from ehrbridge.sandbox.run import BackgroundSandbox

CEILING = 65536
JSON_ROUTES = ["/api/dlq/replay", "/api/models/kfre-4var/mode"]


def small_limits(config: SiteConfig) -> SiteConfig:
    http = config.http.model_copy(update={"max_body_bytes": CEILING})
    cds = config.cds_hooks.model_copy(update={"max_body_bytes": 4096})
    return config.model_copy(update={"http": http, "cds_hooks": cds})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(
        tmp_path_factory.mktemp("body-cap"), configure=small_limits, fhir_site=False
    ) as running:
        yield running


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_declared_oversize_body_is_refused_before_a_byte_of_it_is_sent(
    site: BackgroundSandbox, path: str
) -> None:
    where = urlsplit(site.sandbox.api_url)
    assert where.hostname and where.port
    with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 * 1024**3}\r\n\r\n".encode()
        )
        answer = b""
        while chunk := conn.recv(4096):  # no body sent: the answer cannot wait for one
            answer += chunk  # until the server closes (Connection: close)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert b"larger than 65536 bytes" in answer


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_streamed_oversize_body_is_cut_off_at_the_ceiling(
    site: BackgroundSandbox, path: str
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"reason": "'
        for _ in range(64):
            yield b"x" * 4096  # 256 KiB in all, no Content-Length
        yield b'"}'

    answer = httpx.post(f"{site.sandbox.api_url}{path}", content=chunks(), timeout=30)
    assert answer.status_code == 413


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_body_under_the_ceiling_still_meets_the_token_check(
    site: BackgroundSandbox, path: str
) -> None:
    api = site.sandbox.api_url
    assert httpx.post(f"{api}{path}", json={"reason": "x" * 1000}).status_code == 401
    viewer = headers(site, "viewer")
    assert httpx.post(f"{api}{path}", json={}, headers=viewer).status_code == 403
    assert httpx.get(f"{api}/health").status_code == 200  # and the API keeps serving
