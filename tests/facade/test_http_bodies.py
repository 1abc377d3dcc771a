"""Request bodies over a route's limit are refused unread: 413, and the API keeps serving.

Issue 10, finding 7: the CDS Hooks POST and its /feedback read bodies of any
size (a 50 MB body got 200 and 102 MB of RSS). They now stop at
``cds_hooks.max_body_bytes`` as the FHIR routes stop at
``http.max_body_bytes``, whether the body declares its length or streams in
chunks. Runs on a real socket with a small limit.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from auth_tokens import cds_headers

from ehrbridge.cds_hooks import SERVICE_ID
from ehrbridge.config import SiteConfig
from ehrbridge.sandbox.run import BackgroundSandbox

LIMIT = 65536
HOOK = f"/cds-services/{SERVICE_ID}"
PATHS = [HOOK, f"{HOOK}/feedback"]


def small_cds_limit(config: SiteConfig) -> SiteConfig:
    cds = config.cds_hooks.model_copy(update={"max_body_bytes": LIMIT})
    return config.model_copy(update={"cds_hooks": cds})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    data_dir = tmp_path_factory.mktemp("http-bodies")
    with BackgroundSandbox(data_dir, configure=small_cds_limit, fhir_site=False) as running:
        yield running


def post(site: BackgroundSandbox, path: str, content: bytes | Iterator[bytes]) -> httpx.Response:
    api = site.sandbox.api_url
    return httpx.post(api + path, content=content, headers=cds_headers(site, api), timeout=30)


def hook_body(pad: int = 0) -> bytes:
    return (
        b'{"hook": "patient-view", "hookInstance": "d1577c69", '
        b'"context": {"userId": "Practitioner/1", "patientId": "nobody"}, "pad": "'
        + b"x" * pad
        + b'"}'
    )


def streamed(size: int) -> Iterator[bytes]:  # no Content-Length: counted while reading
    for _ in range(size // 65536):
        yield b" " * 65536


@pytest.mark.parametrize("path", PATHS)
def test_a_body_over_the_cds_limit_is_413_with_a_reason(site: BackgroundSandbox, path: str) -> None:
    declared = post(site, path, hook_body(LIMIT))
    assert declared.status_code == 413
    assert "cds_hooks.max_body_bytes" in declared.json()["error"]
    chunked = post(site, path, streamed(16 * LIMIT))
    assert chunked.status_code == 413
    assert len(chunked.content) < 1000


@pytest.mark.parametrize("path", PATHS)
def test_bodies_within_the_limit_are_still_answered(site: BackgroundSandbox, path: str) -> None:
    assert post(site, path, hook_body(LIMIT - 1000)).status_code == 200
    assert post(site, path, b"{not json").status_code == 400
