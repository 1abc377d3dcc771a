"""Adapters: every conversation with a system outside ehrbridge.

One module per system and role (``mllp_source.py`` receives HL7v2 over MLLP,
``fhir_sink.py`` writes to a FHIR server, ...). Third-party exceptions are
translated into ``ehrbridge.core.errors`` at this boundary, so the rest
of the pipeline only decides between retry and dead letter.

The registry below is the explicit list of what a site config can name.
"""

from __future__ import annotations

from ehrbridge.adapters.fhir_sink import FhirSink
from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.adapters.kafka_log import KafkaLog
from ehrbridge.adapters.memory import MemorySink, MemorySource
from ehrbridge.adapters.mllp_client import AsyncMllpClient, MllpClient
from ehrbridge.adapters.mllp_sink import MllpSink
from ehrbridge.adapters.mllp_source import MllpSource
from ehrbridge.adapters.sqlite_log import SqliteLog

REGISTRY: dict[str, dict[str, type]] = {
    "source": {"mllp": MllpSource, "memory": MemorySource},
    "sink": {"fhir": FhirSink, "hl7v2-mllp": MllpSink, "memory": MemorySink},
    "log": {"embedded": SqliteLog, "kafka": KafkaLog},  # `transport.kind` in the site config
    "model": {"oip-v2": InferenceClient},
    "client": {"mllp": MllpClient, "mllp-async": AsyncMllpClient},
}

__all__ = ["REGISTRY"]
