"""Adapters: every conversation with a system outside ehrbridge.

One module per system and role (``mllp_source.py`` receives HL7v2 over MLLP,
``fhir_sink.py`` writes to a FHIR server, ...). Third-party exceptions are
translated into ``ehrbridge.core.errors`` at this boundary, so the rest
of the pipeline only decides between retry and dead letter.

Importing this package imports no adapter: a process loads only the ones its
roles build, so a processing-only process on the embedded log never loads
kafka-python. ``REGISTRY`` is the explicit list of what a site config names,
resolved by :func:`load` when the runtime builds it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

REGISTRY: dict[str, dict[str, str]] = {
    # `transport.kind` in the site config names the durable log and the state store.
    "log": {"embedded": "sqlite_log:SqliteLog", "kafka": "kafka_log:KafkaLog"},
    "state": {
        "embedded": "sqlite_state:SqliteStateStore",
        "kafka": "kafka_state:ChangelogStateStore",
    },
    # The `writeback:` sections a live site fills in: `fhir_base`, `hl7v2`.
    "sink": {"fhir": "fhir_sink:FhirSink", "hl7v2": "mllp_sink:MllpSink"},
    # `model:` without a model file: the KFRE inputs over the Open Inference Protocol v2.
    # With one (`model.file` / `model.definition`): DeclaredModel, over the protocol
    # client its `endpoint.protocol` names.
    "model": {
        "oip-v2": "inference_client:InferenceClient",
        "declared": "declared_model:DeclaredModel",
    },
    "model_protocol": {
        "oip-v2": "oip_v2:OipV2Client",
        "mlflow": "mlflow_scoring:MlflowScoringClient",
        "kserve-v1": "kserve_v1:KserveV1Client",
        "ubiops": "ubiops:UbiOpsClient",
    },
}


def load(kind: str, name: str) -> Any:
    """The adapter class ``REGISTRY[kind][name]``, imported now (KeyError if unknown)."""
    module, _, attr = REGISTRY[kind][name].partition(":")
    return getattr(import_module(f"{__name__}.{module}"), attr)


__all__ = ["REGISTRY", "load"]
