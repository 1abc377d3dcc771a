"""``GET /api/evaluation/...``: the numbers of the last ``ehrbridge evaluate``, for the console.

``ehrbridge evaluate`` keeps a copy of its ``evaluation.json`` in
``<data_dir>/evaluation/<model>.<source>.json`` (source ``site`` or
``backfill``); these routes serve it (role ``viewer``) so the console shows the
same numbers as the report. The document holds aggregates only: counts,
estimates, group labels, prediction-free figures' data; no patient
identifier, so reading it is not a patient-data read.

- ``GET /api/evaluation``: the site's models and which evaluations exist
  (model, source, as of, the promotion criteria's overall verdict), for every
  model of the site (``models:``), each evaluated on its own.
- ``GET /api/evaluation/{model}?source=site|backfill``: one, whole; 404 when
  none was run, or when ``model`` is not one of this site's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
from fastapi import FastAPI, HTTPException
from fastapi.params import Depends

from ehrbridge.config import SiteConfig

Source = Literal["site", "backfill"]
SOURCES: tuple[Source, ...] = ("site", "backfill")


def saved_path(data_dir: Path, model: str, source: str) -> Path:
    return data_dir / "evaluation" / f"{model}.{source}.json"


def add_evaluation_routes(app: FastAPI, config: SiteConfig, viewer: Sequence[Depends]) -> None:
    names = [m.name for m in config.site_models]

    @app.get("/api/evaluation", dependencies=list(viewer))
    def evaluations() -> dict[str, Any]:
        found = [
            _listed(path, model, source)
            for model in names
            for source in SOURCES
            if (path := saved_path(config.data_dir, model, source)).is_file()
        ]
        return {"site": config.site, "models": names, "evaluations": found}

    @app.get(
        "/api/evaluation/{model}",
        dependencies=list(viewer),
        responses={404: {"description": "No evaluation of this model here"}},
    )
    def evaluation(model: str, source: Source = "site") -> Any:
        # Only the site's own model names reach the file system: no path from the URL.
        known = next((name for name in names if name == model), None)
        path = saved_path(config.data_dir, known, source) if known is not None else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"no {source} evaluation of {model}: run ehrbridge evaluate")
        return orjson.loads(path.read_bytes())


def _listed(path: Path, model: str, source: str) -> dict[str, Any]:
    doc = orjson.loads(path.read_bytes())
    promotion = doc.get("promotion") or {}
    return {
        "model": model,
        "source": source,
        "as_of": doc.get("as_of"),
        "predictions": doc.get("predictions"),
        "findings": len(doc.get("findings", [])),
        "promotion": promotion.get("overall"),
    }
