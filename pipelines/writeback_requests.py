"""What write-back sends each target for one result, built apart from sending it.

One builder per target kind, looked up by the target's name
(``writeback.fhir_base`` -> ``fhir``, ``writeback.hl7v2`` -> ``hl7v2``):

* ``fhir``: one transaction Bundle -- the result Observation by conditional
  update on its deterministic identifier, its Provenance and the Devices that
  produced it (``pipelines/provenance.py``; FHIR R4 §3.1.0.11.2 conditional
  update, so a repeat lands on the same resource);
* ``hl7v2``: one ORU^R01 (``pipelines/oru.py``), OBR-25/OBX-11 ``C`` when it
  corrects a result sent before with other values; its MSH-10 travels in
  ``CONTROL_ID_HEADER`` so the sink checks the ACK's MSA-2 against it.

A builder only builds: it does no I/O, and a target gains a kind by a new
entry in :data:`REQUESTS`, not by a branch in the stage. The sinks that send
these requests are ``adapters/fhir_sink.py`` and ``adapters/mllp_sink.py``,
each wrapped in :class:`~ehrbridge.pipelines.retry.RetryingSink` (in place)
and :class:`~ehrbridge.pipelines.retry.DeadLetteringSink` (what still fails
becomes data for a retry tier or the dead-letter topic).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import orjson

from ehrbridge.config import SiteConfig
from ehrbridge.core.contracts import CONTROL_ID_HEADER, Envelope, Kind
from ehrbridge.pipelines.oru import build_oru
from ehrbridge.pipelines.provenance import result_transaction
from ehrbridge.pipelines.records import Prediction

FHIR_TARGET = "fhir"
HL7V2_TARGET = "hl7v2"


class ResultToSend(Protocol):
    """One result as the write-back stage hands it to a builder."""

    @property
    def envelope(self) -> Envelope: ...  # the prediction record, for provenance
    @property
    def prediction(self) -> Prediction: ...
    @property
    def observation(self) -> dict[str, Any]: ...  # as kept in the result store
    @property
    def corrected(self) -> bool: ...  # sent before with other values


RequestBuilder = Callable[[ResultToSend, SiteConfig], Envelope]


def fhir_transaction(result: ResultToSend, config: SiteConfig) -> Envelope:
    """The Observation, its Provenance and Devices, as one FHIR transaction."""
    bundle = result_transaction(result.prediction, config, result.observation)
    return result.envelope.derive(orjson.dumps(bundle), Kind.FHIR)


def oru_message(result: ResultToSend, config: SiteConfig) -> Envelope:
    """The result as an ORU^R01, its MSH-10 in a header for the ACK check."""
    message, control_id = build_oru(result.prediction, config, corrected=result.corrected)
    derived = result.envelope.derive(message, Kind.HL7V2)
    return replace(derived, headers={**derived.headers, CONTROL_ID_HEADER: control_id})


REQUESTS: Mapping[str, RequestBuilder] = {
    FHIR_TARGET: fhir_transaction,
    HL7V2_TARGET: oru_message,
}
