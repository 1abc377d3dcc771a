"""The clinician's risk page in real headless Chromium (Debian's, tests/browser/conftest.py).

Renal panels go in over MLLP to a running sandbox; the page, opened as the
CDS card links it, must show the stored predictions' values, log no console
error, make no request off 127.0.0.1, let the keyboard reach every link, and
keep WCAG 2.1 AA text contrast. A screenshot is kept for the README.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_tokens import cds_headers, headers

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.cds_hooks import SERVICE_ID
from ehrbridge.config import ApiRole
from ehrbridge.sandbox.credentials import api_token
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

pytestmark = pytest.mark.browser

DOCS = Path(__file__).resolve().parents[2] / "docs"
# WCAG 2.1 contrast of every element's own text against the first opaque background
# behind it (1.4.3: 4.5:1, 3:1 from 24px or from 18.66px bold).
CONTRAST = """
function lum(c) {
  const v = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map(x => x / 255)
    .map(x => x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4));
  return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2];
}
function bg(el) {
  for (; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor;
    const a = c.match(/[\\d.]+/g);
    if (a && (a.length < 4 || Number(a[3]) > 0.99)) return c;
  }
  return 'rgb(255, 255, 255)';
}
const low = [];
for (const el of document.querySelectorAll('body *')) {
  const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  if (!own || el.closest('svg') || el.getClientRects().length === 0) continue;
  const s = getComputedStyle(el);
  const [a, b] = [lum(s.color), lum(bg(el))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const large = parseFloat(s.fontSize) >= 24 ||
    (parseFloat(s.fontSize) >= 18.66 && Number(s.fontWeight) >= 700);
  if (ratio < (large ? 3 : 4.5)) low.push(el.tagName + ' ' + ratio.toFixed(2));
}
return low;
"""


@pytest.fixture
def as_viewer(browser: Any, sandbox: BackgroundSandbox) -> Iterator[Any]:
    """The browser sending the sandbox's viewer token on every request it makes."""
    driver = browser.driver
    driver.execute_cdp_cmd("Network.enable", {})
    token = headers(sandbox, "viewer")
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": token})
    yield browser
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})


def send_visits(sandbox: BackgroundSandbox, mrn: str) -> list[dict[str, Any]]:
    """Three renal panels months apart over MLLP; the stored results, newest first."""
    ehr, visits = SyntheticEhr(patients=1), ((38.0, 150.0), (30.0, 400.0), (22.0, 900.0))
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        for month, (egfr, uacr) in zip((3, 9, 12), visits, strict=True):
            at = datetime(2025, month, 1, tzinfo=UTC)
            control_id = f"C{uuid.uuid4().hex[:10]}"
            message = ehr.renal_oru_for(
                age=66, female=True, at=at, egfr=egfr, uacr_mg_g=uacr, mrn=mrn,
                control_id=control_id,
            )  # fmt: skip
            assert client.send(message).code == "AA"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        results: list[dict[str, Any]] = httpx.get(
            f"{sandbox.sandbox.api_url}/api/results",
            params={"patient": mrn},
            headers=headers(sandbox, "viewer"),
        ).json()["results"]
        if len(results) == len(visits):
            return results
        time.sleep(0.1)
    raise AssertionError("the three scores were not stored")


def card_link(sandbox: BackgroundSandbox, mrn: str) -> str:
    """The "Risk details" link of the card the EHR gets when this patient's chart opens."""
    api = sandbox.sandbox.api_url
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": mrn},
    }
    service = f"{api}/cds-services/{SERVICE_ID}"
    answer = httpx.post(service, json=body, headers=cds_headers(sandbox, api), timeout=10)
    [card] = answer.json()["cards"]
    url: str = card["links"][0]["url"]
    return url


def test_the_patient_page_shows_the_stored_predictions(
    as_viewer: Any, sandbox: BackgroundSandbox
) -> None:
    from selenium.webdriver.common.by import By

    mrn = f"M{uuid.uuid4().hex[:10]}"
    results = send_visits(sandbox, mrn)
    as_viewer.get(card_link(sandbox, mrn))
    driver = as_viewer.driver
    title = sandbox.sandbox.config.model.declared.shown.code.display  # the model file's
    assert driver.find_element(By.TAG_NAME, "h1").text == title
    current = driver.find_element(By.CSS_SELECTOR, ".current").text
    assert f"Kidney failure risk within 2 years: {results[0]['risk_2y_percent']:.1f}%" in current
    rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == len(results)
    for row, result in zip(rows, results, strict=True):
        cells = row.text
        assert result["anchor"][:10] in cells
        assert f"{result['risk_2y_percent']:.1f}%" in cells
        assert f"{result['risk_5y_percent']:.1f}%" in cells
    chart = driver.find_element(By.CSS_SELECTOR, "svg.risk-chart")
    assert chart.size["width"] > 300 and chart.size["height"] > 100  # drawn, not empty
    as_viewer.assert_clean()
    assert driver.execute_script(CONTRAST) == []
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(height + 140, 4000))  # the whole page in the picture
    shot = as_viewer.screenshot("patient-risk-page")
    driver.set_window_size(1280, 900)
    if os.environ.get("EHRBRIDGE_KEEP_SCREENSHOTS") == "1":  # to refresh the README's
        shutil.copy(shot, DOCS / "screenshots" / "patient-risk-page.png")


def test_the_keyboard_reaches_every_link_in_order(
    as_viewer: Any, sandbox: BackgroundSandbox
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    mrn = f"M{uuid.uuid4().hex[:10]}"
    send_visits(sandbox, mrn)
    as_viewer.get(f"{sandbox.sandbox.api_url}/ui/patients/{mrn}")
    driver = as_viewer.driver
    focusable = driver.execute_script(
        "return [...document.querySelectorAll('a[href], button, input, select, textarea,"
        ' summary, [tabindex]:not([tabindex="-1"])\')].map(e => e.outerHTML)'
    )
    assert len(focusable) >= 4  # the skip link and each score's Observation link
    reached, skip_link_shown = [], False
    for _ in focusable:
        ActionChains(driver).send_keys(Keys.TAB).perform()
        reached.append(driver.execute_script("return document.activeElement.outerHTML"))
        if len(reached) == 1:  # the skip link: off-screen until focused, then visible
            skip_link_shown = driver.execute_script(
                "return document.activeElement.getBoundingClientRect().left >= 0"
            )
    assert reached == focusable
    assert skip_link_shown
    as_viewer.assert_clean()


def test_the_api_docs_load_offline(browser: Any, sandbox: BackgroundSandbox) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    api = sandbox.sandbox.api_url
    for page, ready in (("/docs", ".swagger-ui .info"), ("/redoc", "[role=search], .api-content")):
        browser.get(f"{api}{page}")
        WebDriverWait(browser.driver, 20).until(
            lambda d, css=ready: d.find_elements(By.CSS_SELECTOR, css)
        )
        assert "ehrbridge" in browser.driver.page_source
        browser.assert_clean()
    assert httpx.get(f"{api}/docs").status_code == 200


def test_a_clinician_without_a_session_signs_in_and_comes_back_to_the_page(
    browser: Any, sandbox: BackgroundSandbox
) -> None:
    from selenium.webdriver.common.by import By

    mrn = f"M{uuid.uuid4().hex[:10]}"
    results = send_visits(sandbox, mrn)
    link = card_link(sandbox, mrn)  # /ui/patients/<mrn>?result=<newest>
    browser.get(link)
    driver = browser.driver
    deadline = time.monotonic() + 10
    while "/console/login" not in driver.current_url and time.monotonic() < deadline:
        time.sleep(0.05)  # the 401 page moves on to the sign-in form
    field = driver.find_element(By.ID, "token")
    field.send_keys(api_token(sandbox.sandbox.data_dir, ApiRole.VIEWER))
    field.submit()
    while driver.current_url != link and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.current_url == link  # back where the card pointed, query and all
    selected = driver.find_element(By.CSS_SELECTOR, "tr.selected").text
    assert f"{results[0]['risk_2y_percent']:.1f}%" in selected
    browser.reset()  # the 401 on the way is expected; from here on, nothing may fail
    browser.get(link)
    browser.assert_clean()
