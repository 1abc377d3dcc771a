"""Client for a model server speaking the Open Inference Protocol v2 (KServe v2).

``POST {url}/v2/models/{name}/infer`` with one FP64/BOOL tensor per model
input, shape ``[N]`` for a batch of N feature records, and the calibration as
a request parameter. Inputs and outputs are the site's model file's (or the
shipped one of the model it names, ``models/*.yaml``), never code. The sync
httpx client is used on purpose: measured on a 2-core machine it costs about
0.5 ms of CPU per request, while the async
client degraded badly at 32 concurrent requests. Workers call it from their
own threads and batch records, so one request serves many patients.

HTTP failures are translated at this boundary: connection errors, timeouts,
429 and 5xx become :class:`UpstreamUnavailable` (retried); other 4xx, and
answers that are not OIP v2 results (no JSON, a missing output, the wrong row
count, a risk outside 0..1), become :class:`RemoteRejected` (dead-lettered
with the server's answer). ``tests/conformance/test_model_contract.py``
holds it to the Model contract (``core/contracts.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from ehrbridge.adapters.tls import httpx_verify
from ehrbridge.config import ModelEndpoint
from ehrbridge.core.errors import ConfigError, RemoteRejected, UpstreamUnavailable
from ehrbridge.mappings.model_file import ModelFile
from ehrbridge.pipelines.features import FeatureRecord
from ehrbridge.pipelines.model import InferenceResult


class InferenceClient:
    def __init__(self, endpoint: ModelEndpoint, *, client: httpx.Client | None = None) -> None:
        self.endpoint = endpoint
        # Certificates are always verified: system CAs, or model.tls.ca_file.
        verify = httpx_verify(endpoint.tls, "model.tls")
        self._client = client or httpx.Client(timeout=endpoint.timeout_s, verify=verify)
        self._url = f"{endpoint.url.rstrip('/')}/v2/models/{endpoint.name}/infer"
        if endpoint.calibration is None:
            # KFRE's calibrations differ by up to 3.5 points: never let the server pick one.
            raise ConfigError("required for KFRE; state the site's", field="model.calibration")
        self._calibration = endpoint.calibration.value
        self.definition = endpoint.declared

    def infer(self, records: Sequence[FeatureRecord], request_id: str = "") -> InferenceResult:
        """Risks for each record, in order. One HTTP request for the whole batch."""
        body = orjson.dumps(_request(self.definition, records, self._calibration, request_id))
        try:
            response = self._client.post(
                self._url, content=body, headers={"content-type": "application/json"}
            )
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable(
                f"model server timed out after {self.endpoint.timeout_s}s"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"model server unreachable: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:  # an answer that cannot be read (bad content-encoding)
            raise RemoteRejected(
                f"model server answer could not be read: {type(exc).__name__}",
                reason="model.bad_response",
            ) from exc
        return _parse(response, len(records), self.definition)

    def ready(self) -> bool:
        try:
            response = self._client.get(f"{self.endpoint.url.rstrip('/')}/v2/health/ready")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def close(self) -> None:
        self._client.close()


def _request(
    definition: ModelFile, records: Sequence[FeatureRecord], calibration: str, request_id: str
) -> dict[str, Any]:
    n = len(records)
    return {
        "id": request_id,
        "parameters": {"calibration": calibration},
        "inputs": [
            {
                "name": i.sent_as,
                "shape": [n],
                "datatype": "BOOL" if i.type == "boolean" else "FP64",
                "data": [bool(r[i.name]) if i.type == "boolean" else r[i.name] for r in records],
            }
            for i in definition.inputs
        ],
    }


def _parse(response: httpx.Response, expected: int, definition: ModelFile) -> InferenceResult:
    status = response.status_code
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"model server answered {status}")
    if status >= 400:
        raise RemoteRejected(
            f"model server refused the request ({status})",
            reason="model.rejected",
            status=status,
            body=response.content[:4096],
        )
    try:
        data = orjson.loads(response.content)
        outputs = {o["name"]: [float(x) for x in o["data"]] for o in data["outputs"]}
        result = InferenceResult(
            model_name=str(data["model_name"]),
            model_version=str(data.get("model_version") or "unversioned"),
            outputs={o.name: outputs[o.from_] for o in definition.outputs},
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        names = "/".join(o.from_ for o in definition.outputs)
        raise RemoteRejected(
            f"model server answer is not an OIP v2 response with {names}: {exc!r}",
            reason="model.bad_response",
            status=status,
            body=response.content[:4096],
        ) from exc
    counts = {len(values) for values in result.outputs.values()}
    if counts != {expected}:
        raise RemoteRejected(
            f"model server returned {min(counts)} rows for {expected} inputs",
            reason="model.bad_response",
            status=status,
        )
    if not all(0.0 <= risk <= 1.0 for values in result.outputs.values() for risk in values):
        # A probability outside [0, 1] is a broken model; shown to a clinician it misleads.
        raise RemoteRejected(
            "model server returned risks that are not probabilities between 0 and 1",
            reason="model.bad_response",
            status=status,
        )
    return result
