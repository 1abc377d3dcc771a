"""KServe v1 (TensorFlow Serving style) ``:predict``.

``POST {url}/v1/models/{model}:predict`` with ``{"instances": [[...], ...]}``
(one list of feature values per row, in column order) and the answer
``{"predictions": ...}``, read like MLflow's (numbers, lists or records).
KServe v1 names no version in the path; a configured version is reported
only. Errors, timeouts, auth and batching are those of
:mod:`ehrbridge.adapters.model_http`.
"""

from __future__ import annotations

from typing import Any

import httpx

from ehrbridge.adapters.mlflow_scoring import predictions_as_outputs
from ehrbridge.adapters.model_http import FeatureBatch, HttpModelClient, ModelAnswer

__all__ = ["KserveV1Client"]


class KserveV1Client(HttpModelClient):
    protocol = "KServe v1"

    def _request(self, chunk: FeatureBatch) -> tuple[str, object]:
        body: dict[str, Any] = {"instances": [list(row) for row in chunk.rows]}
        if chunk.parameters:
            body["parameters"] = dict(chunk.parameters)
        return f"/v1/models/{self.settings.model}:predict", body

    def _answer(self, document: Any, rows: int) -> ModelAnswer:
        outputs = predictions_as_outputs(document["predictions"], rows)
        return ModelAnswer(self.settings.model, self.settings.version or "unversioned", outputs)

    def ready(self) -> bool:
        """``GET /v1/models/{model}`` answered 200 with ``"ready": true`` (never raises)."""
        url = f"{self.settings.url.rstrip('/')}/v1/models/{self.settings.model}"
        try:
            response = self._client.get(url)
            return response.status_code == 200 and response.json().get("ready") is True
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
