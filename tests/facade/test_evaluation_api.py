"""`GET /api/evaluation/...` serves what `ehrbridge evaluate` computed, to viewers only."""

from __future__ import annotations

from pathlib import Path

import orjson
import yaml
from auth_tokens import localize, token_headers
from fastapi.testclient import TestClient
from test_evaluate_cli import AS_OF, make_cohort, store_predictions

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
