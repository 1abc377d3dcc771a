"""The stateful processing stage: parse → facts → features → model → prediction.

One stage, because every step needs the same per-patient state and a hop
between them would cost a produce and a consume for nothing.

For a batch of raw messages it

1. parses each with the lean ER7 reader and extracts facts (a message that
   cannot be used becomes a permanent :class:`Failure`, carried as data);
2. merges them into each patient's state, loading every patient once;
3. assembles one feature record per patient per message that brought a
   usable result of a trigger feature (``pipelines/features.py``: a panel of
   six OBX gives one prediction, not six, and the messages of one episode --
   a visit or a day -- share one prediction identity, the last in a batch
   replacing the earlier ones);
4. asks the model for the whole batch in one request;
5. emits one ``prediction`` envelope per record.

It is idempotent: facts merge by ``ref`` and the prediction identifier is
deterministic, so re-running a batch after a crash or a transient model
failure yields the same predictions, which write-back then upserts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.config import SiteConfig
from ehrbridge.pipelines.contracts import Envelope, Failure, Kind, Outcome
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.errors import EhrbridgeError, MessageUnusable, PermanentError
from ehrbridge.pipelines.facts import Extraction, FactRules, extract
from ehrbridge.pipelines.features import FeatureRecord, evaluate
from ehrbridge.pipelines.fhir_facts import extract_fhir
from ehrbridge.pipelines.history import by_episode
from ehrbridge.pipelines.records import ModelInfo, Prediction, prediction_identifier
from ehrbridge.pipelines.state import PatientState, StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Pending:
    envelope: Envelope
    patient_id: str
    features: FeatureRecord
    revision: int


class ProcessStage:
    name = "process"

    def __init__(self, config: SiteConfig, state: StateStore, model: InferenceClient) -> None:
        self.config = config
        self.rules = FactRules(config.mapping)
        self.state = state
        self.model = model
        self.not_enough_data = 0  # feature records that could not be built, for progress output

    def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        extracted: list[tuple[Envelope, Extraction]] = []
        for envelope in batch:
            try:
                extracted.append((envelope, self.extract(envelope)))
            except PermanentError as error:
                outcomes.append(Failure(envelope, error, self.name))
        pending = self._merge_and_assemble(extracted)
        outcomes.extend(self._predict(pending))
        return outcomes

    def extract(self, envelope: Envelope) -> Extraction:
        """The facts of the patient this record is keyed by (ingest stores one copy each)."""
        if envelope.kind is Kind.FHIR:
            # A Bundle may hold a patient's whole history: one prediction per episode.
            extraction = by_episode(extract_fhir(envelope.payload, self.rules), self.config.mapping)
        elif envelope.kind is Kind.HL7V2:
            extraction = extract(Message.parse(envelope.payload), self.rules)
        else:
            raise MessageUnusable(
                f"cannot process {envelope.kind} records", reason="kind.unsupported"
            )
        return extraction.owned_by(envelope.key)

    def _merge_and_assemble(self, extracted: list[tuple[Envelope, Extraction]]) -> list[_Pending]:
        states: dict[str, PatientState] = {}
        # Debounce within the batch: one prediction per patient and episode, the last one
        # wins (it saw the most results). Across batches the shared identifier does it.
        pending: dict[tuple[str, str], _Pending] = {}
        for envelope, extraction in extracted:
            for patient in extraction.patients:
                state = states.get(patient.patient_id)
                if state is None:
                    state = self.state.get(patient.patient_id) or PatientState(patient.patient_id)
                    states[patient.patient_id] = state
                state.revision += 1
                result = evaluate(state, patient, self.config.mapping)
                if result is None:
                    continue  # no trigger: demographics only (ADT), nothing mapped or usable
                key = (patient.patient_id, result.episode)
                if isinstance(result, FeatureRecord):
                    pending.pop(key, None)  # re-insert: outputs keep processing order
                    pending[key] = _Pending(envelope, patient.patient_id, result, state.revision)
                else:
                    pending.pop(key, None)
                    self.not_enough_data += 1
                    log.debug("%s: not enough data: %s", envelope.describe(), result.reason)
        if states:
            self.state.put_many(states.values())
        return list(pending.values())

    def _predict(self, pending: list[_Pending]) -> list[Outcome]:
        if not pending:
            return []
        outcomes: list[Outcome] = []
        size = self.config.model.batch_size
        for start in range(0, len(pending), size):
            outcomes.extend(self._predict_chunk(pending[start : start + size]))
        return outcomes

    def _predict_chunk(self, chunk: list[_Pending]) -> list[Outcome]:
        try:
            result = self.model.infer([p.features for p in chunk], chunk[0].envelope.source_id)
        except EhrbridgeError as error:
            # Every message of the chunk failed the same way; report each once.
            unique = {id(p.envelope): p.envelope for p in chunk}
            return [Failure(env, error, self.name) for env in unique.values()]
        model = ModelInfo(result.model_name, result.model_version, self.config.model.calibration)
        outcomes: list[Outcome] = []
        for item, risk_2y, risk_5y in zip(chunk, result.risk_2y, result.risk_5y, strict=True):
            prediction = self._prediction(item, model, risk_2y, risk_5y)
            outcomes.append(
                item.envelope.derive(prediction.to_json(), Kind.PREDICTION, key=item.patient_id)
            )
        return outcomes

    def _prediction(
        self, item: _Pending, model: ModelInfo, risk_2y: float, risk_5y: float
    ) -> Prediction:
        return site_prediction(
            self.config,
            model,
            item.patient_id,
            item.features,
            (risk_2y, risk_5y),
            source_id=item.envelope.source_id,
            state_revision=item.revision,
        )


def site_prediction(
    config: SiteConfig,
    model: ModelInfo,
    patient_id: str,
    features: FeatureRecord,
    risks: tuple[float, float],
    *,
    source_id: str,
    state_revision: int = 0,
) -> Prediction:
    """The model's answer for one feature record, named and identified for ``config``'s site."""
    risk_2y, risk_5y = risks
    return Prediction(
        site=config.site,
        patient_id=patient_id,
        patient_system=config.mapping.patient.fhir_system,
        features=features,
        model=model,
        risk_2y=risk_2y,
        risk_5y=risk_5y,
        source_id=source_id,
        mapping_version=config.mapping.version,
        identifier=prediction_identifier(config.site, model, patient_id, features),
        state_revision=state_revision,
    )
