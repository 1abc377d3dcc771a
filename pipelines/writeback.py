"""The write-back stage: prediction → Observation → local store (+ EHR when live).

Every prediction is kept in the local result store. In **shadow** mode that
is all: nothing is written to the EHR until the site is promoted. In
**live** mode the Observation is also written to the EHR's FHIR server by
conditional update on its deterministic identifier, so at-least-once
delivery becomes effectively-once in the EHR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson

from ehrbridge.adapters.fhir_sink import CONDITIONAL_HEADER, RESOURCE_TYPE_HEADER
from ehrbridge.config import Mode, SiteConfig
from ehrbridge.pipelines.contracts import BatchError, Envelope, Failure, Kind, Outcome, Sink
from ehrbridge.pipelines.errors import EhrbridgeError, MessageUnusable
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.results import Delivery, ResultStore


class WritebackStage:
    name = "writeback"

    def __init__(self, config: SiteConfig, results: ResultStore, ehr: Sink | None) -> None:
        if config.mode is Mode.LIVE and ehr is None:
            raise ValueError("live mode needs an EHR sink")
        self.config = config
        self.results = results
        self.ehr = ehr if config.mode is Mode.LIVE else None

    def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        failures: list[Outcome] = []
        built: list[tuple[Envelope, Prediction, dict[str, Any]]] = []
        for envelope in batch:
            try:
                prediction = Prediction.from_json(envelope.payload)
            except (ValueError, KeyError, TypeError) as exc:
                error = MessageUnusable(
                    f"not a prediction record: {exc!r}", reason="record.invalid"
                )
                failures.append(Failure(envelope, error, self.name))
                continue
            built.append((envelope, prediction, build_observation(prediction, self.config)))
        status = Delivery.PENDING if self.ehr else Delivery.SHADOW
        try:
            self.results.upsert([(p, o) for _, p, o in built], status)
        except EhrbridgeError as error:
            return failures + [Failure(e, error, self.name) for e, _, _ in built]
        if self.ehr is not None and built:
            failures.extend(self._deliver(built))
        return failures

    def _deliver(self, built: list[tuple[Envelope, Prediction, dict[str, Any]]]) -> list[Outcome]:
        assert self.ehr is not None
        system = self.config.prediction_identifier_system
        requests = [
            replace(
                envelope.derive(orjson.dumps(observation), Kind.FHIR),
                headers={
                    RESOURCE_TYPE_HEADER: "Observation",
                    CONDITIONAL_HEADER: f"identifier={system}|{prediction.identifier}",
                },
            )
            for envelope, prediction, observation in built
        ]
        errors: dict[int, EhrbridgeError] = {}
        try:
            self.ehr.write(requests)
        except BatchError as batch_error:
            errors = batch_error.errors
        except EhrbridgeError as error:
            errors = dict.fromkeys(range(len(built)), error)
        delivered = [p.identifier for i, (_, p, _) in enumerate(built) if i not in errors]
        self.results.mark_delivered(delivered)
        return [Failure(built[i][0], error, self.name) for i, error in errors.items()]
