"""The MLflow scoring server (``mlflow models serve``, MLflow 2 and 3).

``POST {url}/invocations`` with a pandas ``dataframe_split`` body::

    {"dataframe_split": {"columns": [...], "data": [[...], ...]}, "params": {...}}

and the answer ``{"predictions": ...}``: N numbers, N lists of K numbers, or N
records (one output per key). ``params`` carries inference parameters the model
signature declares (MLflow ignores, with a warning, parameters a signature
lacks). For probabilities from a scikit-learn model, save it with
``pyfunc_predict_fn="predict_proba"``. MLflow does not echo a model name or version; those of
the settings are reported. Errors answer ``{"error_code", "message"}`` with 400
(kept in the dead-letter body). Timeouts, auth and batching are those of
:mod:`ehrbridge.adapters.model_http`.
"""

from __future__ import annotations

from typing import Any

import httpx

from ehrbridge.adapters.model_http import (
    FeatureBatch,
    HttpModelClient,
    ModelAnswer,
    ModelEndpointSettings,
    rows_of,
)

__all__ = ["PREDICTIONS", "MlflowScoringClient", "predictions_as_outputs"]

PREDICTIONS = "predictions"


class MlflowScoringClient(HttpModelClient):
    protocol = "MLflow scoring"

    def __init__(
        self, settings: ModelEndpointSettings, *, client: httpx.Client | None = None
    ) -> None:
        super().__init__(settings, client=client)

    def _request(self, chunk: FeatureBatch) -> tuple[str, object]:
        frame = {"columns": list(chunk.columns), "data": [list(row) for row in chunk.rows]}
        body: dict[str, Any] = {"dataframe_split": frame}
        if chunk.parameters:
            body["params"] = dict(chunk.parameters)
        return "/invocations", body

    def _answer(self, document: Any, rows: int) -> ModelAnswer:
        outputs = predictions_as_outputs(document[PREDICTIONS], rows)
        return ModelAnswer(self.settings.model, self.settings.version or "unversioned", outputs)

    def ready(self) -> bool:
        """``GET /ping`` answered 200 (never raises)."""
        try:
            return self._client.get(self.settings.url.rstrip("/") + "/ping").status_code == 200
        except httpx.HTTPError:
            return False


def predictions_as_outputs(predictions: object, rows: int) -> dict[str, list[list[float]]]:
    """``predictions`` of MLflow or KServe v1 as named outputs of N rows."""
    if isinstance(predictions, list) and predictions and isinstance(predictions[0], dict):
        if not all(isinstance(record, dict) for record in predictions):
            raise ValueError("predictions mix records and values")
        names = list(predictions[0])
        return {name: rows_of([r[name] for r in predictions], rows, name) for name in names}
    if isinstance(predictions, dict):  # column-oriented: {"name": [N values]}
        return {str(k): rows_of(v, rows, str(k)) for k, v in predictions.items()}
    return {PREDICTIONS: rows_of(predictions, rows, PREDICTIONS)}
