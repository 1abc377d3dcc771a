"""What a headless Chromium saw of a page: console errors, every request, screenshots."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from conftest import wait_for as poll_until

SCREENSHOTS = Path(os.environ.get("EHRBRIDGE_SCREENSHOTS", "build/screenshots"))
LOCAL_HOSTS = frozenset({"127.0.0.1"})
# Schemes that never leave the machine: inline images, the page's own blobs.
LOCAL_SCHEMES = frozenset({"data", "blob", "about", "chrome", "chrome-extension", "devtools"})


class Browser:
    """One headless Chromium: the WebDriver plus what its logs say about each page."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.console: list[dict[str, Any]] = []
        self.requests: list[str] = []

    def get(self, url: str) -> None:
        self.driver.get(url)
        self.drain()

    def drain(self) -> None:
        """Move what the browser logged since the last call into ``console``/``requests``."""
        self.console.extend(self.driver.get_log("browser"))
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def console_errors(self) -> list[str]:
        self.drain()
        return [e["message"] for e in self.console if e.get("level") == "SEVERE"]

    def external_requests(self) -> list[str]:
        self.drain()
        return [url for url in self.requests if not _local(url)]

    def assert_clean(self) -> None:
        """No console error and no request off 127.0.0.1 since the browser started (or reset)."""
        assert self.console_errors() == [], "console errors"
        assert self.external_requests() == [], "requests leaving 127.0.0.1"

    def reset(self) -> None:
        self.drain()
        self.console.clear()
        self.requests.clear()

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def _local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or parts.hostname in LOCAL_HOSTS


# The suite's poller (tests/conftest.py), with the longer wait a browser round trip needs.
wait_for = partial(poll_until, timeout_s=30.0)
