"""What the process stage needs from a model: ``infer`` over a batch of feature records.

The stage depends on this protocol, not on an adapter; the Open Inference
Protocol v2 client (``adapters/inference_client.py``) is one implementation.
Errors follow ``core/errors.py``: ``UpstreamUnavailable`` is retried,
``RemoteRejected`` dead-letters the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ehrbridge.pipelines.features import FeatureRecord


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """Each output's values, one per record in the order the records were sent.

    Outputs are named as the model file names them (``outputs``); risks are fractions.
    """

    model_name: str
    model_version: str
    outputs: dict[str, list[float]]

    def rows(self) -> list[dict[str, float]]:
        """One ``{output: value}`` per record."""
        names = list(self.outputs)
        columns = zip(*self.outputs.values(), strict=True)
        return [dict(zip(names, row, strict=True)) for row in columns]


class Model(Protocol):
    def infer(self, records: Sequence[FeatureRecord], request_id: str = "") -> InferenceResult:
        """Risks for ``records``; ``request_id`` ties the call to the message in logs."""
        ...
