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
    # `model:` is called over the Open Inference Protocol v2 today; the other protocol
    # adapters (mlflow_scoring.py, kserve_v1.py, ubiops.py) join when the config names them.
    "model": {"oip-v2": "inference_client:InferenceClient"},
}


def load(kind: str, name: str) -> Any:
    """The adapter class ``REGISTRY[kind][name]``, imported now (KeyError if unknown)."""
    module, _, attr = REGISTRY[kind][name].partition(":")
    return getattr(import_module(f"{__name__}.{module}"), attr)


__all__ = ["REGISTRY", "load"]
