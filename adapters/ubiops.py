"""UbiOps deployment requests (API v2.1), the direct (synchronous) kind.

``POST {url}/projects/{project}/deployments/{model}[/versions/{version}]/requests``
with ``?timeout=`` in whole seconds, ``Authorization: Token <token>`` (the
service-user token; configure ``auth.scheme: Token``). A structured
deployment takes one JSON object of input fields per row. With
``max_batch_rows: 1`` (the default here) each row is one request; a
deployment that implements UbiOps' ``requests`` function takes a list of
objects and answers a list of result objects, which a larger limit uses.

The answer is ``{"id", "status", "result", "error_message", ...}``: status
``completed`` carries the output fields in ``result``; ``failed`` is the
deployment's own error (dead-lettered, reason ``model.failed``); any other
status (``pending``, ``processing``, ``cancelled``) means it did not finish
in time and is retried. Errors, timeouts and auth otherwise follow
:mod:`ehrbridge.adapters.model_http`.
"""

from __future__ import annotations

import math
from typing import Any

import httpx

from ehrbridge.adapters.mlflow_scoring import predictions_as_outputs
from ehrbridge.adapters.model_http import (
    FeatureBatch,
    HttpModelClient,
    ModelAnswer,
    ModelEndpointSettings,
)
from ehrbridge.core.errors import RemoteRejected, UpstreamUnavailable

__all__ = ["UbiOpsClient"]


class UbiOpsClient(HttpModelClient):
    protocol = "UbiOps"

    def __init__(
        self,
        settings: ModelEndpointSettings,
        *,
        project: str,
        client: httpx.Client | None = None,
    ) -> None:
        super().__init__(settings, client=client)
        self.project = project

    def _request(self, chunk: FeatureBatch) -> tuple[str, object]:
        path = f"/projects/{self.project}/deployments/{self.settings.model}"
        if self.settings.version:
            path += f"/versions/{self.settings.version}"
        # UbiOps wants whole seconds and at least 1; it stops the request then.
        path += f"/requests?timeout={max(1, math.ceil(self.settings.timeout_s))}"
        objects = [dict(zip(chunk.columns, row, strict=True)) for row in chunk.rows]
        return path, objects[0] if len(objects) == 1 else objects

    def _answer(self, document: Any, rows: int) -> ModelAnswer:
        status = document["status"]
        if status == "failed":
            raise RemoteRejected(
                "UbiOps deployment request failed",
                reason="model.failed",
                body=str(document.get("error_message") or "")[:4096].encode(),
            )
        if status != "completed":
            raise UpstreamUnavailable(f"UbiOps request is '{_short(status)}', not completed")
        result = document["result"]
        records = result if isinstance(result, list) else [result]
        outputs = predictions_as_outputs(records, rows)
        version = str(document.get("version") or self.settings.version or "default")
        return ModelAnswer(str(document.get("deployment") or self.settings.model), version, outputs)


def _short(value: object) -> str:
    return str(value)[:40]
