"""The clinician's risk page (``GET /ui/patients/{id}``) on a running sandbox, real sockets.

Renal results go in over MLLP; the page must then state the stored
predictions' values (as ``/api/results`` gives them), chart them with the
site's thresholds, list each score's inputs with units and dates, name the
model's population and citation, and say why there is no score for a patient
outside the model's population. It needs the viewer role, is audited, and
refers to nothing off the host. The CDS card's "Risk details" link opens it.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from auth_tokens import headers, localize, token_headers
from conftest import wait_for
from fastapi.testclient import TestClient
from test_cds_hooks import call, hook, send_renal

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.api import create_api
from ehrbridge.auth import Authenticator
from ehrbridge.config import load_site_config
from ehrbridge.patient_page import readable_unit
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

# (when, eGFR, UACR mg/g): a patient whose kidney function falls over a year.
VISITS = (
    (datetime(2025, 3, 1, tzinfo=UTC), 38.0, 150.0),
    (datetime(2025, 9, 1, tzinfo=UTC), 30.0, 400.0),
    (datetime(2026, 2, 1, tzinfo=UTC), 22.0, 900.0),
)


class Links(HTMLParser):
    """Every URL the page would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("href", "src", "action") and v]


def external(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    # The SVG's namespace is a name, not a request.
    return [u for u in parser.urls if urlsplit(u).netloc and urlsplit(u).hostname != "127.0.0.1"]


def send_visits(sandbox: BackgroundSandbox, mrn: str) -> list[dict[str, Any]]:
    """Three renal panels months apart over MLLP; the stored results, newest first."""
    ehr = SyntheticEhr(patients=1)
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        for at, egfr, uacr in VISITS:
            message = ehr.renal_oru_for(
                age=66, female=True, at=at, egfr=egfr, uacr_mg_g=uacr, mrn=mrn,
                control_id=f"C{uuid.uuid4().hex[:10]}",
            )  # fmt: skip
            assert client.send(message).code == "AA"
    api = sandbox.sandbox.api_url

    def stored() -> list[dict[str, Any]] | None:
        answer = httpx.get(
            f"{api}/api/results", params={"patient": mrn}, headers=headers(sandbox, "viewer")
        ).json()
        return answer["results"] if len(answer["results"]) == len(VISITS) else None

    return wait_for(stored, what="three scores")


def page(sandbox: BackgroundSandbox, mrn: str, role: str | None = "viewer") -> httpx.Response:
    auth = headers(sandbox, role) if role else {}
    return httpx.get(f"{sandbox.sandbox.api_url}/ui/patients/{mrn}", headers=auth)


@pytest.fixture(scope="module")
def trended(sandbox: BackgroundSandbox) -> tuple[str, list[dict[str, Any]]]:
    mrn = f"M{uuid.uuid4().hex[:10]}"
    return mrn, send_visits(sandbox, mrn)


def test_the_page_states_every_stored_score_with_its_inputs_and_the_model(
    sandbox: BackgroundSandbox, trended: tuple[str, list[dict[str, Any]]]
) -> None:
    mrn, results = trended
    response = page(sandbox, mrn)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    text = response.text
    newest = results[0]
    assert f"Kidney failure risk within 2 years: {newest['risk_2y_percent']:.1f}%" in text
    for result in results:
        for key in ("risk_2y_percent", "risk_5y_percent"):
            assert f"<td>{result[key]:.1f}%</td>" in text
        assert f'<th scope="row">{result["anchor"][:10]}</th>' in text
    for _, egfr, uacr in VISITS:  # each score's inputs, with units
        assert f"{egfr:g} mL/min/1.73 m²" in text
        assert f"{uacr:g} mg/g" in text
    assert "Adults (18 or older) with chronic kidney disease" in text  # population
    assert "Tangri N et al. JAMA 2011" in text  # citation
    assert "No current score" not in text


def test_the_chart_draws_each_score_and_the_sites_thresholds(
    sandbox: BackgroundSandbox, trended: tuple[str, list[dict[str, Any]]]
) -> None:
    mrn, results = trended
    text = page(sandbox, mrn).text
    [chart] = re.findall(r"<svg class=\"risk-chart\".*?</svg>", text, re.S)
    assert chart.count("<polyline") == 2  # 2-year and 5-year risk
    assert chart.count("<title>Kidney failure risk within 2 years") == len(results)
    rendering = sandbox.sandbox.config.model.declared.rendering  # the model file's bands
    assert rendering is not None and rendering.interpretation
    for band in rendering.interpretation:
        assert escape(band.display) in text  # named under the chart
        assert 'stroke-dasharray="3 5"' in chart
    assert f"the latest {results[0]['risk_5y_percent']:.1f}%" in chart  # the description


def test_the_page_says_why_there_is_no_score_outside_the_population(
    sandbox: BackgroundSandbox,
) -> None:
    mrn = f"M{uuid.uuid4().hex[:10]}"
    send_renal(sandbox, mrn, 75.0, 40.0)  # eGFR 75: not CKD G3-G5
    api = sandbox.sandbox.api_url
    wait_for(
        lambda: (
            httpx.get(f"{api}/api/patients/{mrn}", headers=headers(sandbox))
            .json()
            .get("last_outcome")
        ),
        what="the outcome",
    )
    text = page(sandbox, mrn).text
    assert "outside the population the model was validated for" in text
    assert "egfr 75 &gt;= 60 (outside the validated population)" in text
    assert '<svg class="risk-chart"' not in text  # no score, nothing to chart


def test_it_needs_a_viewer_is_audited_and_loads_nothing_from_elsewhere(
    sandbox: BackgroundSandbox, trended: tuple[str, list[dict[str, Any]]]
) -> None:
    mrn, _ = trended
    assert page(sandbox, mrn, role=None).status_code == 401
    assert page(sandbox, mrn, role="sender").status_code == 403
    response = page(sandbox, mrn)
    assert external(response.text) == []
    assert response.headers["cache-control"] == "no-store"
    assert "script-src 'none'" in response.headers["content-security-policy"]
    runtime = sandbox.sandbox.runtime
    assert runtime is not None
    entries = [e for e in runtime.audit.entries() if e["action"] == "GET /ui/patients/{patient_id}"]
    assert [(e["outcome"], e["patients"]) for e in entries[-3:]] == [
        (401, [mrn]),
        (403, [mrn]),
        (200, [mrn]),
    ]


def test_the_cds_cards_link_opens_the_page_on_that_result(
    sandbox: BackgroundSandbox, trended: tuple[str, list[dict[str, Any]]]
) -> None:
    mrn, results = trended
    api = sandbox.sandbox.api_url
    [card] = call(sandbox, api, hook(mrn)).json()["cards"]
    [link] = card["links"]
    assert link["url"] == f"{api}/ui/patients/{mrn}?result={results[0]['identifier']}"
    text = httpx.get(link["url"], headers=headers(sandbox, "viewer")).text
    assert 'class="selected" aria-current="true"' in text


def test_units_read_as_people_write_them() -> None:
    assert readable_unit("mL/min/{1.73_m2}") == "mL/min/1.73 m²"
    assert readable_unit("mg/g") == "mg/g"


def test_in_shadow_mode_the_page_says_the_scores_are_not_for_clinical_use(
    tmp_path: Path,
) -> None:
    config = yaml.safe_load(sandbox_site_file().read_text())
    localize(config, tmp_path / "data")
    config.update(data_dir=str(tmp_path / "data"), mode="shadow")
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(config))
    runtime = SiteRuntime(load_site_config(tmp_path / "site.yaml"), {Role.INGEST, Role.PROCESS})
    try:
        app = create_api(runtime.api_parts(Authenticator(runtime.config.auth)))
        with TestClient(app) as client:
            viewer = token_headers(tmp_path / "data", "viewer")
            text = client.get("/ui/patients/NOBODY", headers=viewer).text
    finally:
        runtime.log.close()
        for store in ("results", "patient_links", "state"):
            getattr(runtime, store).close()
    assert "Shadow mode: not for clinical use." in text
    assert "No score: ehrbridge holds no results for this patient." in text
