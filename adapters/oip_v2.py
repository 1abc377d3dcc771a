"""Open Inference Protocol v2 (KServe v2, MLServer, Triton, the sandbox server).

``POST {url}/v2/models/{model}[/versions/{version}]/infer``. Two request
layouts, because servers differ in what a model's signature is:

* ``columns`` -- one FP64 tensor of shape ``[N]`` per feature, named after the
  feature (the sandbox KFRE server; Triton ensembles with named inputs);
* ``matrix`` -- one FP64 tensor of shape ``[N, F]`` named ``input_tensor``
  (MLServer's scikit-learn runtime, KServe sklearn/xgboost servers).

``outputs`` names the tensors to ask for (MLServer's scikit-learn runtime
answers ``predict`` unless ``predict_proba`` is requested). Each answered
tensor becomes N rows: ``data`` is row-major and flat (OIP v2 "Tensor Data"),
reshaped by its ``shape``. Errors, timeouts, auth and batching are those of
:mod:`ehrbridge.adapters.model_http`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import httpx

from ehrbridge.adapters.model_http import (
    FeatureBatch,
    HttpModelClient,
    ModelAnswer,
    ModelEndpointSettings,
)

__all__ = ["OipV2Client"]


class OipV2Client(HttpModelClient):
    protocol = "OIP v2"

    def __init__(
        self,
        settings: ModelEndpointSettings,
        *,
        layout: Literal["columns", "matrix"] = "columns",
        input_tensor: str = "input-0",
        outputs: tuple[str, ...] = (),
        client: httpx.Client | None = None,
    ) -> None:
        super().__init__(settings, client=client)
        self.layout = layout
        self.input_tensor = input_tensor
        self.outputs = outputs

    def _request(self, chunk: FeatureBatch) -> tuple[str, object]:
        body: dict[str, Any] = {"inputs": self._inputs(chunk)}
        if chunk.parameters:
            body["parameters"] = dict(chunk.parameters)
        if self.outputs:
            body["outputs"] = [{"name": name} for name in self.outputs]
        return self._model_path() + "/infer", body

    def _model_path(self) -> str:
        path = f"/v2/models/{self.settings.model}"
        if self.settings.version:
            path += f"/versions/{self.settings.version}"
        return path

    def _inputs(self, chunk: FeatureBatch) -> list[dict[str, Any]]:
        n = len(chunk.rows)
        if self.layout == "matrix":
            flat = [float(value) for row in chunk.rows for value in row]
            shape = [n, len(chunk.columns)]
            return [{"name": self.input_tensor, "datatype": "FP64", "shape": shape, "data": flat}]
        return [
            {
                "name": name,
                "datatype": "FP64",
                "shape": [n],
                "data": [float(row[index]) for row in chunk.rows],
            }
            for index, name in enumerate(chunk.columns)
        ]

    def _answer(self, document: Any, rows: int) -> ModelAnswer:
        outputs = {o["name"]: _tensor_rows(o, rows) for o in document["outputs"]}
        missing = [name for name in self.outputs if name not in outputs]
        if missing:
            raise ValueError(f"output(s) {', '.join(missing)} missing")
        version = document.get("model_version") or self.settings.version or "unversioned"
        return ModelAnswer(str(document["model_name"]), str(version), outputs)

    def ready(self) -> bool:
        """``GET /v2/models/{model}/ready`` answered 200 (never raises)."""
        url = self.settings.url.rstrip("/") + self._model_path() + "/ready"
        try:
            return self._client.get(url).status_code == 200
        except httpx.HTTPError:
            return False


def _tensor_rows(tensor: dict[str, Any], rows: int) -> list[list[float]]:
    name = str(tensor["name"])
    shape = tensor["shape"]
    data = _flatten(tensor["data"])
    if not shape or shape[0] != rows or math.prod(shape) != len(data):
        raise ValueError(f"output '{name}' has shape {shape} for {rows} rows")
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    values = [_number(value, name) for value in data]
    return [values[row * width : (row + 1) * width] for row in range(rows)]


def _flatten(data: object) -> list[object]:
    # The protocol allows nested JSON arrays; row-major flattening is equivalent.
    if not isinstance(data, list):
        raise ValueError("'data' is not an array")
    flat: list[object] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"output '{name}' holds a non-number")
    if not math.isfinite(value):
        raise ValueError(f"output '{name}' holds a non-finite number")
    return float(value)
