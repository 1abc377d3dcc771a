"""The operator console in real Chromium against a real sandbox (HTTP API, MLLP, model, EHR).

Every page is loaded signed in and asserted free of console errors and of
requests leaving 127.0.0.1; the message search finds a message this test sent
over MLLP; a replay clicked on the dead-letters page produces the Observation
the model outage had kept from the EHR; a viewer sees neither raw messages
nor the replay. Screenshots land in build/screenshots/ (docs/ keeps a few).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from selenium.webdriver.common.by import By

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.config import ApiRole, SiteConfig
from ehrbridge.sandbox.credentials import api_token
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.sandbox.run import BackgroundSandbox, count_observations
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

from .browser_session import Browser, wait_for

pytestmark = pytest.mark.browser


def quick_dead_letters(config: SiteConfig) -> SiteConfig:
    """One attempt and no delayed retries: a model outage dead-letters at once."""
    retry = config.retry.model_copy(update={"attempts": 1, "delayed_s": []})
    return config.model_copy(update={"retry": retry})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    data = tmp_path_factory.mktemp("console")
    with BackgroundSandbox(data, configure=quick_dead_letters, fhir_site=False) as running:
        yield running


def renal_message(mrn: str, control_id: str) -> bytes:
    return SyntheticEhr(patients=1).renal_oru_for(
        age=66,
        female=True,
        at=datetime(2026, 1, 10, tzinfo=UTC),
        egfr=30.0,
        uacr_mg_g=300.0,
        mrn=mrn,
        control_id=control_id,
    )


def send(site: BackgroundSandbox, message: bytes) -> str:
    with MllpClient("127.0.0.1", site.sandbox.mllp_port) as client:
        return client.send(message).code


def sign_in(browser: Browser, site: BackgroundSandbox, role: ApiRole) -> None:
    browser.get(f"{site.sandbox.api_url}/console/login")
    field = browser.driver.find_element(By.ID, "token")
    field.send_keys(api_token(site.sandbox.data_dir, role))
    field.submit()
    wait_for(lambda: "/console/sites" in browser.driver.current_url, what="the sites page")
    browser.drain()


def open_page(browser: Browser, url: str) -> str:
    """Load ``url``; its text, after asserting no console error and nothing off the host."""
    browser.get(url)
    browser.assert_clean()
    return str(browser.driver.find_element(By.TAG_NAME, "main").text)


def test_signed_in_every_page_loads_clean_and_search_finds_a_message_sent_over_mllp(
    browser: Browser, site: BackgroundSandbox
) -> None:
    api = site.sandbox.api_url
    mrn, control_id = f"M{uuid.uuid4().hex[:8]}", f"C{uuid.uuid4().hex[:10]}"
    assert send(site, renal_message(mrn, control_id)) == "AA"
    browser.get(f"{api}/console/sites")
    assert "/console/login" in browser.driver.current_url  # no session: the login page
    browser.reset()
    sign_in(browser, site, ApiRole.OPERATOR)
    sites = open_page(browser, f"{api}/console/sites")
    assert "Messages per minute" in sites and "kfre" in sites
    browser.screenshot("console-sites")

    found = open_page(browser, f"{api}/console/messages?control_id={control_id}")
    assert "1 message;" in found and mrn in found
    by_mrn = open_page(browser, f"{api}/console/messages?patient={mrn}")
    assert control_id in by_mrn
    browser.screenshot("console-messages")

    browser.driver.find_element(By.LINK_TEXT, control_id).click()
    browser.assert_clean()
    trace = browser.driver.find_element(By.TAG_NAME, "main").text
    raw = browser.driver.find_element(By.ID, "raw").text
    assert raw.startswith("MSH|") and control_id in raw
    assert "AA" in trace and "used" in trace  # the ACK, and the OBX the mapping used
    wait_for(lambda: "%" in open_page(browser, browser.driver.current_url), what="the prediction")
    browser.screenshot("console-trace")

    letters = open_page(browser, f"{api}/console/dead-letters")
    assert "Dead letters" in letters


def test_the_sites_page_numbers_move_without_a_reload(
    browser: Browser, site: BackgroundSandbox
) -> None:
    sign_in(browser, site, ApiRole.VIEWER)
    accepted = browser.driver.find_element(By.CSS_SELECTOR, "[data-key='acks.aa']")
    before = int(accepted.text)
    browser.driver.execute_script("window.notReloaded = true")
    mrn, control_id = f"M{uuid.uuid4().hex[:8]}", f"C{uuid.uuid4().hex[:10]}"
    assert send(site, renal_message(mrn, control_id)) == "AA"
    wait_for(lambda: int(accepted.text) == before + 1, what="the AA count to move")
    assert browser.driver.execute_script("return window.notReloaded") is True
    assert float(browser.driver.find_element(By.CSS_SELECTOR, "[data-key='per_minute']").text) >= 0
    browser.assert_clean()


def test_a_replay_clicked_on_the_dead_letters_page_produces_its_observation(
    browser: Browser, site: BackgroundSandbox
) -> None:
    api, sandbox = site.sandbox.api_url, site.sandbox
    mrn, control_id = f"M{uuid.uuid4().hex[:8]}", f"C{uuid.uuid4().hex[:10]}"
    port = int(sandbox.model_url.rsplit(":", 1)[1])  # the port the site calls
    site.call(sandbox.model.stop())  # the model server goes away: processing dead-letters
    assert send(site, renal_message(mrn, control_id)) == "AA"
    operator = {"Authorization": f"Bearer {api_token(sandbox.data_dir, ApiRole.OPERATOR)}"}
    wait_for(
        lambda: any(
            r["source_id"] == control_id
            for r in httpx.get(f"{api}/api/dlq", headers=operator, verify=False).json()["records"]
        ),
        what="the dead letter",
    )
    restart_model(site, port)
    before = site.call(count_observations(sandbox.fhir_base))

    sign_in(browser, site, ApiRole.OPERATOR)
    open_page(browser, f"{api}/console/dead-letters")
    row = browser.driver.find_element(By.XPATH, f"//tr[td/a[text()='{control_id}']]")
    assert "calls the model again" in row.text  # the preview: the mapping reads it now
    browser.screenshot("console-dead-letters")
    row.find_element(By.CSS_SELECTOR, "button[data-replay='one']").click()
    status = browser.driver.find_element(By.ID, "replay-status")
    wait_for(lambda: "Replayed 1" in status.text, what="the replay's answer")

    wait_for(
        lambda: site.call(count_observations(sandbox.fhir_base)) > before, what="the Observation"
    )
    results = httpx.get(
        f"{api}/api/results", params={"patient": mrn}, headers=operator, verify=False
    ).json()["results"]
    assert results and results[0]["status"] == "delivered"
    browser.assert_clean()


def restart_model(site: BackgroundSandbox, port: int) -> None:
    from ehrbridge._http import EmbeddedServer

    server = EmbeddedServer(create_model_app(), "127.0.0.1", port, field="--model-port")
    site.call(server.start())
    site.sandbox.model = server


def test_a_viewer_sees_no_raw_message_and_cannot_replay(
    browser: Browser, site: BackgroundSandbox
) -> None:
    api = site.sandbox.api_url
    mrn, control_id = f"M{uuid.uuid4().hex[:8]}", f"C{uuid.uuid4().hex[:10]}"
    assert send(site, renal_message(mrn, control_id)) == "AA"
    sign_in(browser, site, ApiRole.VIEWER)
    nav = browser.driver.find_element(By.TAG_NAME, "nav").text
    assert "Messages" in nav and "Dead letters" not in nav
    open_page(browser, f"{api}/console/messages?control_id={control_id}")
    browser.driver.find_element(By.LINK_TEXT, control_id).click()
    browser.assert_clean()
    assert browser.driver.find_elements(By.ID, "raw") == []
    assert "Withheld" in browser.driver.find_element(By.ID, "raw-withheld").text
    assert "MSH|" not in browser.driver.page_source
    browser.screenshot("console-trace-viewer")

    browser.get(f"{api}/console/dead-letters")
    assert "Not allowed" in browser.driver.find_element(By.TAG_NAME, "main").text
    answer = browser.driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch("/api/dlq/replay", {method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json",
                    "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content},
          body: JSON.stringify({all: true, dry_run: true})}).then(r => done(r.status));
        """
    )
    assert answer == 403
