"""The stateful processing stage: parse → facts → features → model → prediction.

One stage, because every step needs the same per-patient state and a hop
between them would cost a produce and a consume for nothing.

For a batch of raw messages it

1. takes the facts ingest extracted and carried on the record when they are
   still this site's (``pipelines/carry.py``: same mapping content, same
   bytes), else parses with the lean ER7 reader and extracts them (a message
   that cannot be used becomes a permanent :class:`Failure`, carried as data);
2. merges them into each patient's state, loading every patient once;
3. assembles one feature record per patient per message that brought a
   usable result of a trigger feature (``pipelines/features.py``: a panel of
   six OBX gives one prediction, not six, and the messages of one episode --
   a visit or a day -- share one prediction identity, the last in a batch
   replacing the earlier ones); a record without enough data, or outside the
   model's validated domain (``pipelines/domain.py``), is counted and its
   reason kept on the patient's state, and is not scored;
4. asks the model for the whole batch in one request;
5. emits one ``prediction`` envelope per record.

It is idempotent: facts merge by ``ref`` and the prediction identifier is
deterministic, so re-running a batch after a crash or a transient model
failure yields the same predictions, which write-back then upserts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ehrbridge.config import ModelEndpoint, SiteConfig
from ehrbridge.core.contracts import Envelope, Failure, Kind, Outcome
from ehrbridge.core.errors import EhrbridgeError, MessageUnusable, PermanentError
from ehrbridge.mappings.schema import DomainRule
from ehrbridge.pipelines.carry import Carry, without_carried
from ehrbridge.pipelines.domain import OutOfDomain
from ehrbridge.pipelines.drift import feature_values
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import (
    UNMAPPED,
    Extraction,
    FactRules,
    PatientExtract,
    PersonName,
    extract,
)
from ehrbridge.pipelines.features import FeatureRecord, ModelNeeds, NotEnoughData, evaluate_each
from ehrbridge.pipelines.fhir_facts import extract_fhir
from ehrbridge.pipelines.history import by_episode
from ehrbridge.pipelines.metrics import NO_METRICS, Metrics, error_outcome
from ehrbridge.pipelines.model import Model
from ehrbridge.pipelines.records import ModelInfo, Prediction, prediction_identifier
from ehrbridge.pipelines.rendering import Shown, shown
from ehrbridge.pipelines.state import PatientState, StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Pending:
    envelope: Envelope
    patient_id: str
    features: FeatureRecord
    revision: int
    name: PersonName | None
    run: int = 0  # which of the site's models (ProcessStage.runs)


@dataclass(frozen=True, slots=True)
class ModelRun:
    """One of the site's models: its client, what it takes, where it scores, how it shows."""

    endpoint: ModelEndpoint
    client: Model
    needs: ModelNeeds
    rendering: Shown

    @property
    def name(self) -> str:
        return self.endpoint.name


class ProcessStage:
    name = "process"

    def __init__(
        self,
        config: SiteConfig,
        state: StateStore,
        model: Model,
        metrics: Metrics = NO_METRICS,
        others: Mapping[str, Model] | None = None,
    ) -> None:
        """``model`` runs the site's model; ``others`` the rest of ``models:``, by name."""
        self.config = config
        self.rules = FactRules(config.mapping)
        self.carry = Carry(self.rules, config.mllp.charset)
        self.state = state
        self.model = model
        clients = {config.model.name: model, **(others or {})}
        self.runs = [_run(config, i, e, clients[e.name]) for i, e in enumerate(config.site_models)]
        self.metrics = metrics
        self.not_enough_data = 0  # feature records that could not be built, for progress output
        self.out_of_domain = 0  # records outside the model's validated domain, not scored

    def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        extracted: list[tuple[Envelope, Extraction]] = []
        for record in batch:
            carried = self.carry.reuse(record)
            envelope = without_carried(record)  # predictions, retries, dead letters: bytes only
            try:
                extracted.append((envelope, carried or self.extract(envelope)))
            except PermanentError as error:
                outcomes.append(Failure(envelope, error, self.name))
        pending = self._merge_and_assemble(extracted)
        outcomes.extend(self._predict(pending))
        return outcomes

    def extract(self, envelope: Envelope) -> Extraction:
        """The facts of the patient this record is keyed by (ingest stores one copy each).

        Result times are judged against the record's ``received_at``, as ingest
        judged them: a future-dated result stored before ingest refused such
        results is dead-lettered here instead of reaching patient state.
        """
        if envelope.kind is Kind.FHIR:
            # A Bundle may hold a patient's whole history: one prediction per episode.
            facts = extract_fhir(envelope.payload, self.rules, received_at=envelope.received_at)
            extraction = by_episode(facts, self.config.mapping)
        elif envelope.kind is Kind.HL7V2:
            # The site's charset, as ingest read it: a message without MSH-18 reads alike.
            message = Message.parse(envelope.payload, self.config.mllp.charset)
            extraction = extract(message, self.rules, received_at=envelope.received_at)
            self.carry.extracted += 1
        else:
            raise MessageUnusable(
                f"cannot process {envelope.kind} records", reason="kind.unsupported"
            )
        return extraction.owned_by(envelope.key)

    def _merge_and_assemble(self, extracted: list[tuple[Envelope, Extraction]]) -> list[_Pending]:
        states: dict[str, PatientState] = {}
        # Debounce within the batch: one prediction per patient and episode, the last one
        # wins (it saw the most results). Across batches the shared identifier does it.
        pending: dict[tuple[str, str, int], _Pending] = {}
        for envelope, extraction in extracted:
            for patient in extraction.patients:
                state = states.get(patient.patient_id)
                if state is None:
                    state = self.state.get(patient.patient_id) or PatientState(patient.patient_id)
                    states[patient.patient_id] = state
                state.revision += 1
                needs = [run.needs for run in self.runs]
                results = evaluate_each(state, patient, self.config.mapping, needs)
                self._observe(patient, results[0] if results else None)
                for index, result in enumerate(results or ()):
                    key = (patient.patient_id, result.episode, index)
                    pending.pop(key, None)  # re-insert: outputs keep processing order
                    if isinstance(result, FeatureRecord):
                        pending[key] = _Pending(
                            envelope, patient.patient_id, result, state.revision, state.name, index
                        )
                    else:
                        self._not_scored(envelope, result, self.runs[index].name)
        if states:
            self.state.put_many(states.values())
        return list(pending.values())

    def _not_scored(
        self, envelope: Envelope, result: NotEnoughData | OutOfDomain, model: str
    ) -> None:
        """Counted, and kept on the state by ``evaluate``; never sent to the model."""
        if isinstance(result, OutOfDomain):
            self.out_of_domain += 1
            self.metrics.not_scored(model, "out_of_domain")
            log.debug("%s: outside the model's domain: %s", envelope.describe(), result.reason)
        else:
            self.not_enough_data += 1
            self.metrics.not_scored(model, "not_enough_data")
            log.debug("%s: not enough data: %s", envelope.describe(), result.reason)

    def _observe(
        self,
        patient: PatientExtract,
        result: FeatureRecord | NotEnoughData | OutOfDomain | None,
    ) -> None:
        """Data quality for monitoring: unmapped codes, missing inputs."""
        unmapped = sum(1 for unused in patient.unused if unused.reason == UNMAPPED)
        self.metrics.lab_results(len(patient.facts), unmapped)
        if result is not None:
            self.metrics.features(self.config.model.name, feature_values(result))

    def _predict(self, pending: list[_Pending]) -> list[Outcome]:
        if not pending:
            return []
        outcomes: list[Outcome] = []
        for index, run in enumerate(self.runs):
            mine = [p for p in pending if p.run == index]
            size = run.endpoint.batch_size
            for start in range(0, len(mine), size):
                outcomes.extend(self._predict_chunk(run, mine[start : start + size]))
        return outcomes

    def _predict_chunk(self, run: ModelRun, chunk: list[_Pending]) -> list[Outcome]:
        started = time.perf_counter()
        try:
            result = run.client.infer([p.features for p in chunk], chunk[0].envelope.source_id)
        except EhrbridgeError as error:
            self._model_request(run, error, started)
            # Every message of the chunk failed the same way; report each once.
            unique = {id(p.envelope): p.envelope for p in chunk}
            return [Failure(env, error, self.name) for env in unique.values()]
        self._model_request(run, None, started)
        calibration = run.endpoint.calibration or ""  # "" for a model that has none
        model = ModelInfo(result.model_name, result.model_version, calibration)
        outcomes: list[Outcome] = []
        score = run.rendering.model.shown.score_output
        for item, outputs in zip(chunk, result.rows(), strict=True):
            prediction = self._prediction(item, model, outputs)
            band, _ = run.rendering.band(outputs)
            self.metrics.prediction(run.name, band, outputs[score])
            outcomes.append(
                item.envelope.derive(prediction.to_json(), Kind.PREDICTION, key=item.patient_id)
            )
        return outcomes

    def _model_request(self, run: ModelRun, error: EhrbridgeError | None, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.model_request(run.name, error_outcome(error), seconds)

    def _prediction(
        self, item: _Pending, model: ModelInfo, outputs: dict[str, float]
    ) -> Prediction:
        return site_prediction(
            self.config,
            model,
            item.patient_id,
            item.features,
            outputs,
            source_id=item.envelope.source_id,
            state_revision=item.revision,
            patient_name=item.name,
        )


def _run(config: SiteConfig, index: int, endpoint: ModelEndpoint, client: Model) -> ModelRun:
    """The first model scores in the mapping's domain (its own unless the mapping sets one);
    every other in its model file's."""
    declared = endpoint.declared
    if index == 0:
        domain = config.mapping.domain
    else:
        domain = tuple(DomainRule.parse(text) for text in declared.domain)
    aggregates = {i.name: i.aggregate for i in declared.inputs if i.aggregate is not None}
    needs = ModelNeeds(tuple(i.name for i in declared.inputs), domain, endpoint.name, aggregates)
    return ModelRun(endpoint, client, needs, shown(config, declared))


def site_prediction(
    config: SiteConfig,
    model: ModelInfo,
    patient_id: str,
    features: FeatureRecord,
    outputs: dict[str, float],
    *,
    source_id: str,
    state_revision: int = 0,
    patient_name: PersonName | None = None,
) -> Prediction:
    """The model's answer for one feature record, named and identified for ``config``'s site."""
    return Prediction(
        site=config.site,
        patient_id=patient_id,
        patient_system=config.mapping.patient.fhir_system,
        features=features,
        model=model,
        outputs=outputs,
        source_id=source_id,
        mapping_version=config.mapping.version,
        identifier=prediction_identifier(config.site, model, patient_id, features),
        state_revision=state_revision,
        patient_name=patient_name,
    )
