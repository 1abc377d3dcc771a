"""The console's models page over real HTTP: what each role sees, and the switch it offers.

A sandbox in shadow with a real evaluation (tests/evaluated_site.py): the page
shows the mode, the criteria judged (pass), calibration and ROC; a viewer gets
no button and the mode route refuses a viewer's POST even with the session's
CSRF token; an admin's POST without the token is refused, with it the model
goes live, the mode file and the API say so, and the audit trail holds the
decision under the admin's name. The monitoring charts are drawn from a real
DriftMonitor's series.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from evaluated_site import MODEL, evaluate_cohort, in_shadow_with_criteria, keep_evaluation

from ehrbridge.adapters.prometheus_metrics import _series
from ehrbridge.audit import AuditTrail
from ehrbridge.config import ApiRole, Mode
from ehrbridge.console_models import monitoring_view
from ehrbridge.pipelines.drift import DriftMonitor
from ehrbridge.promotion import mode_path
from ehrbridge.sandbox.credentials import api_token
from ehrbridge.sandbox.run import BackgroundSandbox


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    kept = evaluate_cohort(tmp_path_factory.mktemp("evaluated"))
    data = tmp_path_factory.mktemp("models")
    keep_evaluation(kept, data)
    with BackgroundSandbox(data, configure=in_shadow_with_criteria, fhir_site=False) as running:
        yield running


def signed_in(site: BackgroundSandbox, role: ApiRole) -> tuple[httpx.Client, str]:
    """A console session of ``role``, and the CSRF token its pages carry."""
    client = httpx.Client(base_url=site.sandbox.api_url, follow_redirects=False)
    token = api_token(site.sandbox.data_dir, role)
    assert client.post("/console/login", data={"token": token}).status_code == 303
    page = client.get("/console/models")
    assert page.status_code == 200, page.text
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert found is not None
    return client, found.group(1)


def mode_now(site: BackgroundSandbox) -> str:
    viewer = {"Authorization": f"Bearer {api_token(site.sandbox.data_dir, ApiRole.VIEWER)}"}
    answer = httpx.get(f"{site.sandbox.api_url}/api/models/{MODEL}/mode", headers=viewer)
    return str(answer.json()["mode"])


def test_a_viewer_sees_criteria_and_curves_but_no_button_and_cannot_promote(
    site: BackgroundSandbox,
) -> None:
    client, csrf = signed_in(site, ApiRole.VIEWER)
    page = client.get("/console/models").text
    assert '<a href="/console/models" aria-current="page">Models</a>' in page
    assert "data-mode>shadow</span>" in page and "data-overall>pass</span>" in page
    for criterion in ("min_days", "min_scored_patients", "min_auroc_lower_ci"):
        assert f"<code>{criterion}</code>" in page
    assert 'aria-label="ROC curve at 2y"' in page and "<polyline" in page
    assert 'aria-label="Calibration at 5y' in page and "AUROC (95% CI)" in page
    assert "p50 2018-01: 8%" in page  # the cohort's first month: median 2-year risk 8.1 %
    assert 'aria-label="Flagged predictions per month at each band (2y)"' in page
    assert "Promote to live" not in page and "mode-switch" not in page
    body = {"mode": "live", "override": True, "reason": "a viewer tries"}
    refused = client.post(f"/api/models/{MODEL}/mode", json=body, headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 403
    assert mode_now(site) == "shadow"
    assert not mode_path(site.sandbox.data_dir, MODEL).exists()


def test_an_admin_promotes_with_the_csrf_token_and_the_audit_trail_records_it(
    site: BackgroundSandbox,
) -> None:
    client, csrf = signed_in(site, ApiRole.ADMIN)
    assert "Promote to live" in client.get("/console/models").text
    url = f"/api/models/{MODEL}/mode"
    forged = client.post(url, json={"mode": "live"})  # the cookie alone: no CSRF token
    assert forged.status_code == 403 and mode_now(site) == "shadow"
    answer = client.post(url, json={"mode": "live"}, headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 200, answer.text
    assert answer.json()["overall"] == "pass" and answer.json()["outcome"] == "live"
    assert mode_now(site) == "live"
    written = orjson.loads(mode_path(site.sandbox.data_dir, MODEL).read_bytes())
    assert written["mode"] == "live" and written["by"] == "sandbox-admin"
    [entry] = [
        e
        for e in AuditTrail(site.sandbox.data_dir / "audit").entries()
        if e["action"] == f"promote {MODEL}"
    ]
    assert entry["who"] == "sandbox-admin" and entry["outcome"] == "live"
    assert entry["seq"] == written["audit_seq"]
    page = client.get("/console/models").text
    assert "data-mode>live</span>" in page and "Demote to shadow" in page
    assert f"(audit entry {entry['seq']})" in page


def test_the_monitoring_charts_come_from_the_drift_series() -> None:
    monitor = DriftMonitor(reference_days=2, min_count=5)
    start = date(2026, 11, 1)
    for day in range(4):
        today = start + timedelta(days=day)
        shifted = 20.0 if day == 3 else 50.0  # eGFR falls on the last day: drift there
        for i in range(20):
            uacr = None if day == 2 and i < 10 else 40.0  # half the records lack UACR on day 3
            monitor.add_features(today, {"age": 60.0, "sex": 1.0, "egfr": shifted, "uacr": uacr})
            monitor.add_score(today, "H" if i < day else "N", 0.15)
    view = monitoring_view(_series(monitor), ["age", "sex", "egfr", "uacr"])
    assert view["days"] == 4 and view["records"] == 80
    psi = str(view["psi_chart"])
    assert "egfr 2026-11-04: " in psi and "egfr 2026-11-03: 0.00" in psi
    assert "uacr 2026-11-03: 50%" in str(view["missing_chart"])
    assert "albumin" not in str(view["missing_chart"])  # not this model's input
    flags = str(view["flags_chart"])
    assert "<title>2026-11-01: 0</title>" in flags and "<title>2026-11-04: 3</title>" in flags
    assert "0.1–0.2: 100.0% (80)" in str(view["score_chart"])
    assert [d["feature"] for d in view["latest"]][:3] == ["age", "sex", "egfr"]
    assert next(d for d in view["latest"] if d["feature"] == "egfr")["level"] == "alarm"


def two_models_in_shadow(toy: Path) -> Any:
    """tests/e2e/test_several_models.py's two models (KFRE-4 and a toy), the site in shadow."""
    from test_several_models import two_models

    both = two_models(toy)
    return lambda config: both(config).model_copy(update={"mode": Mode.SHADOW})


def test_each_of_a_sites_models_has_its_own_section_and_switch(tmp_path: Path) -> None:
    from test_several_models import toy_model

    toy = tmp_path / "elsewhere" / "progression-toy.yaml"
    toy.parent.mkdir()
    toy.write_text(toy_model())
    configure = two_models_in_shadow(toy)
    with BackgroundSandbox(tmp_path / "site", configure=configure, fhir_site=False) as running:
        client, csrf = signed_in(running, ApiRole.ADMIN)
        page = client.get("/console/models").text
        assert 'id="model-kfre-4var"' in page and 'id="model-progression-toy"' in page
        assert page.count("Promote to live") == 2
        url, token = "/api/models/progression-toy/mode", {"X-CSRF-Token": csrf}
        refused = client.post(url, json={"mode": "live"}, headers=token)
        assert refused.status_code == 409 and "inconclusive" in refused.json()["why_refused"]
        body = {"mode": "live", "override": True, "reason": "pilot of the toy model"}
        assert client.post(url, json=body, headers=token).status_code == 200
        assert client.get(url).json()["mode"] == "live"
        assert client.get("/api/models/kfre-4var/mode").json()["mode"] == "shadow"
        assert client.get("/api/models/no-such-model/mode").status_code == 404
        data = running.sandbox.data_dir
        assert mode_path(data, "progression-toy").exists()
        assert not mode_path(data, "kfre-4var").exists()
        [entry] = [
            e
            for e in AuditTrail(data / "audit").entries()
            if e["action"] == "promote progression-toy" and e["outcome"] == "live"
        ]
        assert entry["detail"]["override"] is True
        page = client.get("/console/models").text
        sites = {m["name"]: m["mode"] for m in client.get("/console/sites/data").json()["models"]}
        assert sites == {"kfre-4var": "shadow", "progression-toy": "live"}
    toy_section = page[page.index('id="model-progression-toy"') :]
    kfre_section = page[
        page.index('id="model-kfre-4var"') : page.index('id="model-progression-toy"')
    ]
    assert "data-mode>live</span>" in toy_section and "Demote to shadow" in toy_section
    assert "data-mode>shadow</span>" in kfre_section and "Promote to live" in kfre_section
