"""A model declared in a model file, called over the protocol its endpoint names.

The model file (``mappings/model_file.py``) says which feature-record values
the model takes, under which column names, what to send as parameters (the
site's calibration), and where each result is read from in the answer. This
adapter does that translation around one protocol client, found by name in
``adapters.REGISTRY["model_protocol"]`` -- so a site moves its model from the
sandbox server to MLServer, MLflow, KServe or UbiOps by editing YAML alone.

Every result is checked against its declared valid range before it is
returned: a risk of 1.7, or of -0.01, is a broken model, and an answer with
one is refused as :class:`RemoteRejected` (reason ``model.out_of_range``), so
it is dead-lettered with the server's numbers and never written to a chart.
Transport errors, timeouts and refusals are translated by the protocol
client (``adapters/model_http.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from ehrbridge.adapters import load
from ehrbridge.adapters.model_http import (
    FeatureBatch,
    HttpModelClient,
    ModelAnswer,
    ModelAuth,
    ModelEndpointSettings,
)
from ehrbridge.adapters.tls import httpx_verify
from ehrbridge.config import ModelEndpoint
from ehrbridge.core.errors import ConfigError, RemoteRejected
from ehrbridge.mappings.model_file import ModelFile, ModelInput, ModelOutput
from ehrbridge.pipelines.features import FeatureRecord
from ehrbridge.pipelines.model import InferenceResult

__all__ = ["DeclaredModel"]


class DeclaredModel:
    """The Model protocol (``pipelines/model.py``) for a model file's model."""

    def __init__(self, endpoint: ModelEndpoint, *, client: HttpModelClient | None = None) -> None:
        if endpoint.definition is None:
            raise ConfigError("no model file or definition", field="model.file")
        self.definition: ModelFile = endpoint.definition
        self._parameters = _parameters(self.definition, endpoint)
        self._client = client or _protocol_client(self.definition, endpoint)

    def infer(self, records: Sequence[FeatureRecord], request_id: str = "") -> InferenceResult:
        """Each record's results, in order; an out-of-range answer is refused."""
        inputs = self.definition.inputs
        batch = FeatureBatch(
            tuple(i.sent_as for i in inputs),
            [[_value(record, i) for i in inputs] for record in records],
            self._parameters,
        )
        answer = self._client.predict(batch)
        outputs = {o.name: _results(answer, o) for o in self.definition.outputs}
        # The model file's name (what the site runs); the version the server ran, if it says.
        identity = self.definition.model
        version = (
            identity.version if answer.model_version == "unversioned" else answer.model_version
        )
        return InferenceResult(identity.name, version, outputs)

    def ready(self) -> bool:
        """The protocol's readiness probe; UbiOps has none without side effects: assumed."""
        ready = getattr(self._client, "ready", None)
        return bool(ready()) if callable(ready) else True

    def close(self) -> None:
        self._client.close()


def _value(record: FeatureRecord, model_input: ModelInput) -> float:
    return float(record[model_input.name])  # a boolean (sex) is 1.0 or 0.0 already


def _results(answer: ModelAnswer, output: ModelOutput) -> list[float]:
    if output.from_ not in answer.outputs:
        raise RemoteRejected(
            f"the answer has no output '{output.from_}' (for {output.name})",
            reason="model.bad_response",
        )
    try:
        raw = answer.column(output.from_, output.index)
    except IndexError as exc:
        raise RemoteRejected(
            f"output '{output.from_}' has no column {output.index} (for {output.name})",
            reason="model.bad_response",
        ) from exc
    outside = [value for value in raw if not output.valid.holds(value)]
    if outside:
        # Shown to a clinician, a risk outside its valid range misleads: refuse the answer.
        valid = f"[{output.valid.min:g}, {output.valid.max:g}] {output.unit}"
        raise RemoteRejected(
            f"{output.name}: {len(outside)} of {len(raw)} answers outside the valid range {valid}",
            reason="model.out_of_range",
            body=orjson.dumps({output.from_: raw}),
        )
    return [output.as_fraction(value) for value in raw]


def _parameters(definition: ModelFile, endpoint: ModelEndpoint) -> dict[str, Any]:
    if definition.calibrations is None:
        return {}
    if endpoint.calibration is None:
        raise ConfigError("required for this model; state the site's", field="model.calibration")
    return {definition.calibrations.parameter: endpoint.calibration.value}


def _protocol_client(definition: ModelFile, endpoint: ModelEndpoint) -> HttpModelClient:
    declared = definition.endpoint
    auth = declared.auth
    settings = ModelEndpointSettings(
        url=endpoint.url,
        model=declared.model or definition.model.name,
        version=declared.version,
        timeout_s=declared.timeout_s,
        max_batch_rows=declared.max_batch_rows,
        auth=ModelAuth(**auth.model_dump()) if auth else None,
    )
    cls = load("model_protocol", declared.protocol)
    # Certificates are always verified: system CAs, or model.tls.ca_file.
    verify = httpx_verify(endpoint.tls, "model.tls")
    options: dict[str, Any] = {"client": httpx.Client(timeout=declared.timeout_s, verify=verify)}
    if declared.protocol == "oip-v2":
        options["layout"] = declared.layout
        options["outputs"] = tuple(dict.fromkeys(o.from_ for o in definition.outputs))
    if declared.protocol == "ubiops":
        options["project"] = declared.project
    client: HttpModelClient = cls(settings, **options)
    return client
