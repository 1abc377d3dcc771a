"""A real headless Chromium for the console's browser tests (Debian's, via chromium-driver).

``browser`` drives the system browser (``scripts/chromium install``) through
``/usr/bin/chromedriver``; Selenium is given both paths, so Selenium Manager
never tries to download a browser or driver. The driver keeps two logs that
the tests assert on after every page:

* the page console (``goog:loggingPrefs`` ``browser``): any ``SEVERE`` entry
  -- a script error, a failed load, a CSP violation -- is a console error;
* the DevTools network events (``performance``): every request the page made,
  so a test can hold that nothing left 127.0.0.1 (no CDN, no font service).

Without the browser the tests skip; under ``CI=true`` they fail instead, since
a CI run that skipped them would say nothing about the console.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .browser_session import Browser

BROWSER = Path(os.environ.get("EHRBRIDGE_CHROMIUM", "/usr/bin/chromium"))
DRIVER = Path(os.environ.get("EHRBRIDGE_CHROMEDRIVER", "/usr/bin/chromedriver"))
# Chromium's own background traffic (updates, safe browsing, sync) is switched off.
_QUIET_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the tests run as root in a container
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--window-size=1280,900",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--ignore-certificate-errors",  # the sandbox's TLS is self-signed; the host is 127.0.0.1
)


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}: run scripts/chromium install (CI must run the browser tests)")
    pytest.skip(f"{reason} (scripts/chromium install)")


def _options() -> Any:
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.binary_location = str(BROWSER)
    for flag in _QUIET_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return options


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """The session's WebDriver (one browser start: ~1 s of CPU each)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    for needed in (BROWSER, DRIVER):
        if not (needed.exists() and shutil.which(str(needed))):
            _missing(f"{needed} is not installed")
    driver = webdriver.Chrome(options=_options(), service=Service(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Browser]:
    """A clean page: no cookies, empty logs. Asserts nothing itself (tests call assert_clean)."""
    chromium.delete_all_cookies()
    page = Browser(chromium)
    page.reset()
    yield page
