"""The browser fixture itself: it sees console errors and requests that leave 127.0.0.1.

A fixture that saw neither would let every console test pass; these pages make
it see both, served on a real local socket.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .browser_session import Browser

pytestmark = pytest.mark.browser

PAGES = {
    "/clean": b'<!doctype html><title>clean</title><link rel="icon" href="data:,"><p>ok</p>',
    "/error": b"<!doctype html><title>error</title><script>undefinedFunction()</script>",
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so nothing really leaves.
    "/external": b'<!doctype html><title>x</title><img src="http://192.0.2.1/pixel.png">',
}


class _Pages(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGES.get(self.path, b"")
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_clean_page_is_clean(browser: Browser, site: str) -> None:
    browser.get(f"{site}/clean")
    browser.assert_clean()
    assert browser.requests == [f"{site}/clean"]


def test_a_script_error_is_a_console_error(browser: Browser, site: str) -> None:
    browser.get(f"{site}/error")
    assert any("undefinedFunction" in e for e in browser.console_errors())


def test_a_request_off_the_machine_is_seen(browser: Browser, site: str) -> None:
    browser.get(f"{site}/external")
    assert browser.external_requests() == ["http://192.0.2.1/pixel.png"]
