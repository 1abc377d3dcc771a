"""The console's models page in real Chromium: an admin promotes, a viewer cannot.

A sandbox in shadow with a real evaluation (tests/evaluated_site.py). The page
loads with no console error and no request leaving 127.0.0.1; an admin clicks
"Promote to live", the page shows the route's answer and reloads live, the
mode API and the mode file say live and the audit trail has the decision; a
viewer sees the criteria and no button, and a POST from the page's own
session is refused. Screenshots: console-models (docs/ keeps it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from evaluated_site import MODEL, evaluate_cohort, in_shadow_with_criteria, keep_evaluation
from selenium.webdriver.common.by import By

from ehrbridge.audit import AuditTrail
from ehrbridge.config import ApiRole
from ehrbridge.promotion import effective_mode
from ehrbridge.sandbox.credentials import api_token
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

from .browser_session import Browser, wait_for
from .test_console import open_page, send, sign_in

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    kept = evaluate_cohort(tmp_path_factory.mktemp("evaluated"))
    data = tmp_path_factory.mktemp("models")
    keep_evaluation(kept, data)
    with BackgroundSandbox(data, configure=in_shadow_with_criteria, fhir_site=False) as running:
        yield running


def api_mode(site: BackgroundSandbox) -> str:
    viewer = {"Authorization": f"Bearer {api_token(site.sandbox.data_dir, ApiRole.VIEWER)}"}
    return str(
        httpx.get(f"{site.sandbox.api_url}/api/models/{MODEL}/mode", headers=viewer).json()["mode"]
    )


def send_traffic(site: BackgroundSandbox) -> None:
    """Eight patients over MLLP, two without a UACR: the monitoring charts have a day."""
    ehr = SyntheticEhr(patients=1)
    for i, egfr in enumerate((14.0, 22.0, 28.0, 35.0, 41.0, 48.0, 52.0, 57.0)):
        message = ehr.renal_oru_for(
            age=55 + i * 3,
            female=i % 2 == 0,
            at=datetime(2026, 1, 10, tzinfo=UTC),
            egfr=egfr,
            uacr_mg_g=None if i in (2, 5) else 30.0 * (i + 1) ** 2,
            mrn=f"M{uuid.uuid4().hex[:8]}",
            control_id=f"C{uuid.uuid4().hex[:10]}",
        )
        assert send(site, message) == "AA"
    admin = {"Authorization": f"Bearer {api_token(site.sandbox.data_dir, ApiRole.ADMIN)}"}

    def monitored() -> int:
        drift = httpx.get(f"{site.sandbox.api_url}/api/monitoring/drift", headers=admin).json()
        return sum(d["records"] for d in drift["models"].get(MODEL, {}).get("days", []))

    wait_for(lambda: monitored() >= 8, what="the monitoring to count the records")


def full_page_screenshot(browser: Browser, name: str) -> None:
    height = browser.driver.execute_script("return document.documentElement.scrollHeight")
    browser.driver.set_window_size(1280, min(int(height) + 120, 4000))
    browser.screenshot(name)
    browser.driver.set_window_size(1280, 900)


def test_a_viewer_sees_the_criteria_but_no_button_and_a_post_is_refused(
    browser: Browser, site: BackgroundSandbox
) -> None:
    sign_in(browser, site, ApiRole.VIEWER)
    browser.driver.find_element(By.LINK_TEXT, "Models").click()
    browser.assert_clean()
    text = browser.driver.find_element(By.TAG_NAME, "main").text
    assert "Promotion criteria: pass" in text and "min_auroc_lower_ci" in text
    assert browser.driver.find_elements(By.CSS_SELECTOR, "form.mode-switch") == []
    answer = browser.driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch("/api/models/kfre-4var/mode", {method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json",
                    "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content},
          body: JSON.stringify({mode: "live", override: true, reason: "viewer"})})
          .then(r => done(r.status));
        """
    )
    assert answer == 403 and api_mode(site) == "shadow"


def test_an_admin_promotes_a_shadow_model_from_the_page(
    browser: Browser, site: BackgroundSandbox
) -> None:
    send_traffic(site)
    sign_in(browser, site, ApiRole.ADMIN)
    text = open_page(browser, f"{site.sandbox.api_url}/console/models")
    assert "shadow" in text and "ROC at 2y" in text and "Calibration at 5y" in text
    assert browser.driver.find_elements(By.CSS_SELECTOR, "svg[aria-label^='ROC curve']")
    missing = browser.driver.find_element(By.CSS_SELECTOR, "svg[aria-label^='Share of feature']")
    assert "uacr" in missing.get_attribute("innerHTML")  # two of eight lacked it
    full_page_screenshot(browser, "console-models")
    form = browser.driver.find_element(By.CSS_SELECTOR, "form.mode-switch")
    form.find_element(By.NAME, "reason").send_keys("criteria pass after 30 days of shadow")
    form.find_element(By.CSS_SELECTOR, "button[data-target='live']").click()
    status = browser.driver.find_element(By.CSS_SELECTOR, ".mode-status")
    wait_for(lambda: "now live" in status.text, what="the route's answer")
    wait_for(
        lambda: browser.driver.find_elements(By.CSS_SELECTOR, "button[data-target='shadow']"),
        what="the page reloaded live",
    )
    browser.assert_clean()
    assert api_mode(site) == "live"
    assert effective_mode(site.sandbox.config).value == "live"  # the mode file
    [entry] = [
        e
        for e in AuditTrail(site.sandbox.data_dir / "audit").entries()
        if e["action"] == f"promote {MODEL}"
    ]
    assert entry["who"] == "sandbox-admin" and entry["outcome"] == "live"
    assert entry["detail"]["reason"] == "criteria pass after 30 days of shadow"

    # Demoting needs a reason: the route refuses, the page says why, nothing switches.
    browser.driver.find_element(By.CSS_SELECTOR, "button[data-target='shadow']").click()
    status = browser.driver.find_element(By.CSS_SELECTOR, ".mode-status")
    wait_for(lambda: "a demotion needs a reason" in status.text, what="the refusal")
    assert api_mode(site) == "live"
