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
    """One risk per record for each horizon, in the order the records were sent."""

    model_name: str
    model_version: str
    risk_2y: list[float]
    risk_5y: list[float]


class Model(Protocol):
    def infer(self, records: Sequence[FeatureRecord], request_id: str = "") -> InferenceResult:
        """Risks for ``records``; ``request_id`` ties the call to the message in logs."""
        ...
