"""An OIP v2 model server as an ``httpx.MockTransport`` handler, for unit tests.

Stage tests that are about triggers, state or batching -- not the model --
use it instead of starting the sandbox model server::

    http = httpx.Client(transport=httpx.MockTransport(OipDouble()))
    model = InferenceClient(ModelEndpoint(url="https://model.test", calibration=NA), client=http)

The model server itself is held to the Model contract by
``tests/conformance/test_model_contract.py`` over real HTTP.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson


class OipDouble:
    """An OIP v2 server in a MockTransport handler: risk_2y = eGFR/1000, risk_5y = UACR/1e4.

    Arbitrary on purpose: it checks the client's tensors and row order, not KFRE.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.faults: list[Callable[[httpx.Request], httpx.Response]] = []
        self.ready = True

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/health/ready"):
            return httpx.Response(200 if self.ready else 503)
        self.calls += 1
        if self.faults:
            return self.faults.pop(0)(request)
        inputs = {t["name"]: t["data"] for t in orjson.loads(request.content)["inputs"]}
        outputs = [
            {"name": "risk_2y", "datatype": "FP64", "shape": [len(inputs["egfr"])],
             "data": [e / 1000 for e in inputs["egfr"]]},
            {"name": "risk_5y", "datatype": "FP64", "shape": [len(inputs["uacr"])],
             "data": [u / 1e4 for u in inputs["uacr"]]},
        ]  # fmt: skip
        body = {"model_name": "kfre-4var", "model_version": "1.0.0", "outputs": outputs}
        return httpx.Response(200, json=body)
