"""`GET /api/evaluation/...` serves what `ehrbridge evaluate` computed, to viewers only."""

from __future__ import annotations

from pathlib import Path

import orjson
import yaml
from auth_tokens import localize, token_headers
from fastapi.testclient import TestClient
from test_evaluate_cli import AS_OF, make_cohort, store_predictions, write_export

from ehrbridge.api import create_api
from ehrbridge.auth import Authenticator
from ehrbridge.cli import main
from ehrbridge.config import load_site_config
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.run import sandbox_site_file


def test_the_console_gets_the_reports_numbers(tmp_path: Path) -> None:
    raw = yaml.safe_load(sandbox_site_file().read_text())
    data_dir = tmp_path / "data"
    localize(raw, data_dir)
    raw["data_dir"] = str(data_dir)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(raw))
    config = load_site_config(site)
    runtime = SiteRuntime(config, {Role.INGEST})
    try:
        app = create_api(runtime.api_parts(Authenticator(config.auth)))
        with TestClient(app) as client:
            viewer = token_headers(data_dir, "viewer")
            assert client.get("/api/evaluation/kfre-4var", headers=viewer).status_code == 404
            store_predictions(data_dir, make_cohort(60, seed=2))
            out = tmp_path / "report"
            assert (
                main(
                    [
                        "evaluate",
                        "--site",
                        str(site),
                        "--model",
                        "kfre-4var",
                        "--out",
                        str(out),
                        "--as-of",
                        AS_OF.isoformat(),
                    ]
                )
                == 0
            )
            served = client.get("/api/evaluation/kfre-4var", headers=viewer)
            assert served.status_code == 200
            assert served.json() == orjson.loads((out / "evaluation.json").read_bytes())
            listed = client.get("/api/evaluation", headers=viewer).json()["evaluations"]
            assert [(e["model"], e["source"], e["predictions"]) for e in listed] == [
                ("kfre-4var", "site", 60)
            ]
            assert client.get("/api/evaluation/kfre-4var").status_code == 401
            assert client.get("/api/evaluation/other", headers=viewer).status_code == 404
            backfill = client.get("/api/evaluation/kfre-4var?source=backfill", headers=viewer)
            assert backfill.status_code == 404
            bad = client.get("/api/evaluation/kfre-4var?source=../x", headers=viewer)
            assert bad.status_code == 422
    finally:
        runtime.log.close()
        for store in ("results", "patient_links", "state"):
            getattr(runtime, store).close()


def test_each_model_of_a_site_is_served_and_promoted_on_its_own_evaluation(
    tmp_path: Path,
) -> None:
    """Two models, one calibrated and one with risks x2, evaluated by the CLI (no --model):
    the API lists both, and ``POST /api/models/{model}/mode`` judges each model's own
    numbers: KFRE-8 is refused on a fail (not inconclusive), KFRE-4 goes live."""
    from test_evaluate_models import CRITERIA, KFRE8, two_model_site

    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    site = two_model_site(tmp_path, {"promotion": CRITERIA})
    raw = yaml.safe_load(site.read_text())
    localize(raw, data_dir)
    site.write_text(yaml.safe_dump(raw))
    people = make_cohort(1500, seed=5)
    store_predictions(data_dir, people, 1.0)
    store_predictions(data_dir, people, 2.0, model=KFRE8)
    write_export(tmp_path / "export", people)
    evaluate = ["evaluate", "--site", str(site), "--out", str(tmp_path / "report")]
    assert (
        main([*evaluate, "--events", str(tmp_path / "export"), "--as-of", AS_OF.isoformat()]) == 0
    )
    config = load_site_config(site)
    runtime = SiteRuntime(config, {Role.INGEST})
    try:
        app = create_api(runtime.api_parts(Authenticator(config.auth)))
        with TestClient(app) as client:
            viewer, admin = token_headers(data_dir, "viewer"), token_headers(data_dir, "admin")
            listed = client.get("/api/evaluation", headers=viewer).json()
            assert [(e["model"], e["promotion"]) for e in listed["evaluations"]] == [
                ("kfre-4var", "pass"),
                ("kfre-8var", "fail"),
            ]
            served = client.get("/api/evaluation/kfre-8var", headers=viewer).json()
            kept = tmp_path / "report" / "kfre-8var" / "evaluation.json"
            assert served == orjson.loads(kept.read_bytes())
            live = {"mode": "live"}
            refused = client.post("/api/models/kfre-8var/mode", json=live, headers=admin)
            assert refused.status_code == 409, refused.text
            assert refused.json()["overall"] == "fail"
            statuses = {c["criterion"]: c["status"] for c in refused.json()["criteria"]}
            assert (
                statuses["calibration_slope"] == "fail" and "inconclusive" not in statuses.values()
            )
            passed = client.post("/api/models/kfre-4var/mode", json=live, headers=admin)
            assert passed.status_code == 200 and passed.json()["outcome"] == "live"
            modes = {
                m: client.get(f"/api/models/{m}/mode", headers=viewer).json()
                for m in ("kfre-4var", "kfre-8var")
            }
            assert modes["kfre-4var"]["mode"] == "live" and modes["kfre-8var"]["mode"] == "shadow"
    finally:
        runtime.log.close()
        for store in ("results", "patient_links", "state"):
            getattr(runtime, store).close()
