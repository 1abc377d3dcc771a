"""/docs and /redoc are served by ehrbridge itself, and /api/dlq pages honestly.

On a hospital network without internet FastAPI's default pages are blank:
they load Swagger UI, ReDoc and fonts from public CDNs. Every URL our pages
name must be on this host, and each asset must be served from it. (The
browser tests load the pages in Chromium and hold that no request leaves
127.0.0.1.)
"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from auth_tokens import token_headers
from fastapi.testclient import TestClient
from test_roles import site_config

from ehrbridge.api import create_api
from ehrbridge.api_docs import ASSETS
from ehrbridge.auth import Authenticator
from ehrbridge.monitoring import create_monitoring_api
from ehrbridge.pipelines.transport import Record, topic_name
from ehrbridge.runtime import Role, SiteRuntime


class Urls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("href", "src") and v]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, SiteRuntime]]:
    runtime = SiteRuntime(site_config(tmp_path), {Role.INGEST, Role.PROCESS})
    try:
        with TestClient(create_api(runtime.api_parts(Authenticator(runtime.config.auth)))) as c:
            yield c, runtime
    finally:
        runtime.log.close()
        for store in ("results", "patient_links", "state"):
            getattr(runtime, store).close()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_name_only_this_host_and_every_asset_is_served(
    api: tuple[TestClient, SiteRuntime], page: str
) -> None:
    client, _ = api
    response = client.get(page)  # public: no token
    assert response.status_code == 200
    html = response.text
    parser = Urls()
    parser.feed(html)
    scripts_and_styles = [u for u in parser.urls if not u.startswith("data:")]
    assert scripts_and_styles, "the page loads its assets"
    assert all(not urlsplit(u).netloc for u in scripts_and_styles), scripts_and_styles
    # Inline script too: no absolute URL at all (fonts, CDN, the online validator).
    assert "https://" not in html and "http://" not in html
    for url in scripts_and_styles:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert asset.headers["content-type"] == ASSETS[url.rsplit("/", 1)[1]]
    assert client.get("/openapi.json").status_code == 200


def test_only_the_listed_assets_are_served(api: tuple[TestClient, SiteRuntime]) -> None:
    client, _ = api
    assert client.get("/docs/assets/core.py").status_code == 404
    assert client.get("/docs/assets/..%2F__init__.py").status_code == 404
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    redoc = client.get("/docs/assets/redoc.standalone.js").text
    assert "cdn.redoc.ly" not in redoc and "/docs/assets/favicon.png" in redoc  # its logo


def test_swagger_ui_does_not_send_the_description_to_the_online_validator(
    api: tuple[TestClient, SiteRuntime],
) -> None:
    client, _ = api
    assert '"validatorUrl": null' in client.get("/docs").text


def test_dead_letters_page_with_a_cursor_and_say_when_more_follow(
    api: tuple[TestClient, SiteRuntime],
) -> None:
    client, runtime = api
    topic = topic_name(runtime.config.site, "dlq")
    runtime.log.append(
        [
            Record(topic=topic, key=f"P{i}", value=b"MSH|x", headers={"error.reason": "x"})
            for i in range(5)
        ]
    )
    operator = token_headers(runtime.config.data_dir, "operator")
    seen: list[int] = []
    url: str | None = "/api/dlq?limit=2"
    pages = 0
    while url is not None:
        answer = client.get(url, headers=operator).json()
        seen += [r["offset"] for r in answer["records"]]
        assert answer["limit"] == 2 and len(answer["records"]) <= 2
        url, pages = answer["links"]["next"], pages + 1
        if url is not None:
            assert answer["next_after"] == answer["records"][-1]["offset"]
    assert pages == 3 and len(seen) == 5 == len(set(seen)) and seen == sorted(seen)
    last = client.get("/api/dlq?limit=5", headers=operator).json()
    assert last["next_after"] is None and last["links"]["next"] is None  # exactly full: no more


def test_the_audit_export_pages_on_from_where_it_stopped(
    api: tuple[TestClient, SiteRuntime],
) -> None:
    client, runtime = api
    viewer = token_headers(runtime.config.data_dir, "viewer")
    for n in range(5):  # five audited reads (404: no such patient), five entries
        client.get(f"/api/patients/P{n}", headers=viewer)
    admin = token_headers(runtime.config.data_dir, "admin")
    seen: list[int] = []
    url: str | None = "/api/audit?who=sandbox-viewer&limit=2"
    while url is not None:
        answer = client.get(url, headers=admin).json()
        seen += [e["seq"] for e in answer["entries"]]
        assert answer["truncated"] == (answer["links"]["next"] is not None)
        url = answer["links"]["next"]
    assert len(seen) == 5 == len(set(seen)) and seen == sorted(seen)


def test_a_process_without_the_ingest_role_serves_its_docs_offline_too(
    api: tuple[TestClient, SiteRuntime],
) -> None:
    _, runtime = api
    with TestClient(create_monitoring_api(runtime.monitoring)) as monitoring:
        for page in ("/docs", "/redoc"):
            html = monitoring.get(page).text
            assert "/docs/assets/" in html and "https://" not in html and "http://" not in html
        assert monitoring.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
