"""Triggers and debounce in the processing stage: a unit test over the memory state
store and an OIP v2 model double (``httpx.MockTransport``); the model server itself has
its conformance suite (tests/conformance/test_model_contract.py).

The us-lab-loinc site debounces by visit number (PV1-19): chemistry and urine
of visit V2002 arrive as two ORU messages. Whatever the batching and order,
the EHR ends with one prediction per visit, and a replay changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from model_double import OipDouble

from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.config import SiteConfig, parse_site_config
from ehrbridge.core.contracts import Envelope, Kind
from ehrbridge.mappings.loader import SITES_DIR
from ehrbridge.pipelines.process import ProcessStage
from ehrbridge.pipelines.records import Prediction

SITE = SITES_DIR / "us-lab-loinc"
VISIT_1 = (SITE / "oru-visit-2001.hl7").read_bytes()
CHEMISTRY = (SITE / "oru-visit-2002-chemistry.hl7").read_bytes()
URINE = (SITE / "oru-visit-2002-urine.hl7").read_bytes()
PANEL = (SITE / "oru-bmp-uacr.hl7").read_bytes()


class Pipeline:
    """The processing stage of a us-lab-loinc site with its own state."""

    def __init__(self, data_dir: Path) -> None:
        config: SiteConfig = parse_site_config(
            f"site: us\ndata_dir: {data_dir}\nmapping: {{file: {SITE / 'mapping.yaml'}}}\n"
            "model: {url: 'https://model.test', calibration: north_american}\n"
        )
        self.state = MemoryStateStore()
        http = httpx.Client(transport=httpx.MockTransport(OipDouble()))
        self.model = InferenceClient(config.model, client=http)
        self.stage = ProcessStage(config, self.state, self.model)

    def run(self, *messages: bytes, key: str | None = None) -> list[Prediction]:
        """Process one batch; records keyed ``key`` (a patient id), else by message."""
        batch = [
            Envelope("us", f"m{i}", m, Kind.HL7V2, key or f"m{i}") for i, m in enumerate(messages)
        ]
        outcomes = self.stage.process(batch)
        assert all(isinstance(o, Envelope) for o in outcomes), outcomes
        return [Prediction.from_json(o.payload) for o in outcomes if isinstance(o, Envelope)]

    def close(self) -> None:
        self.model.close()
        self.state.close()


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    running = Pipeline(tmp_path)
    yield running
    running.close()


def test_a_panel_of_many_obx_gives_one_prediction(pipeline: Pipeline) -> None:
    [prediction] = pipeline.run(PANEL)  # 9 OBX, 3 of them mapped
    assert prediction.features["egfr"] == 33 and prediction.features["uacr"] == 320


def test_one_batch_gives_one_prediction_per_visit(pipeline: Pipeline) -> None:
    predictions = pipeline.run(VISIT_1, CHEMISTRY, URINE)
    assert [p.features.episode for p in predictions] == ["visit V2001", "visit V2002"]
    last = predictions[-1].features
    assert (last["egfr"], last["uacr"]) == (28, 410)  # the urine message's, not the chemistry's


def test_separate_batches_update_one_identity_per_visit(pipeline: Pipeline, tmp_path: Path) -> None:
    first = pipeline.run(VISIT_1)
    chemistry = pipeline.run(CHEMISTRY)
    urine = pipeline.run(URINE)
    assert chemistry[0].features["uacr"] == 380  # November's, the last in its window
    assert urine[0].features["uacr"] == 410
    assert chemistry[0].identifier == urine[0].identifier  # one Observation, updated
    assert first[0].identifier != urine[0].identifier  # another visit, another Observation
    # The same as one batch would give: batching does not change the outcome.
    other = Pipeline(tmp_path / "other")
    try:
        batched = other.run(VISIT_1, CHEMISTRY, URINE)
    finally:
        other.close()
    assert [p.identifier for p in batched] == [first[0].identifier, urine[0].identifier]
    assert batched[-1].features == urine[0].features


def test_the_result_does_not_depend_on_the_order_the_visit_arrives_in(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.run(VISIT_1)
    pipeline.run(CHEMISTRY)
    in_order = pipeline.run(URINE)[0]
    other = Pipeline(tmp_path / "reversed")
    try:
        other.run(VISIT_1)
        other.run(URINE)
        reversed_ = other.run(CHEMISTRY)[0]
    finally:
        other.close()
    assert reversed_.identifier == in_order.identifier
    assert reversed_.features == in_order.features  # anchored at the visit's newest result


def test_replaying_a_batch_gives_the_same_predictions(pipeline: Pipeline) -> None:
    once = pipeline.run(VISIT_1, CHEMISTRY, URINE)
    again = pipeline.run(VISIT_1, CHEMISTRY, URINE)  # after a crash before the commit
    assert [(p.identifier, p.features, p.outputs["risk_2y"]) for p in again] == [
        (p.identifier, p.features, p.outputs["risk_2y"]) for p in once
    ]


def test_an_adt_or_unmapped_results_trigger_nothing(pipeline: Pipeline) -> None:
    adt = (
        b"MSH|^~\\&|ADT|H|X|Y|20251103070000-0500||ADT^A08|A1|P|2.5.1\r"
        b"PID|1||MRN00123^^^MERCYHOSP^MR||Doe^John||19570602|M"
    )
    sodium = (
        b"MSH|^~\\&|LIS|H|X|Y|20251103070000-0500||ORU^R01|A2|P|2.5.1\r"
        b"PID|1||MRN00123^^^MERCYHOSP^MR||Doe^John||19570602|M\r"
        b"OBR|1|||P|||20251103070000-0500\r"
        b"OBX|1|NM|2951-2^Sodium^LN||140|mmol/L|||||F"
    )
    assert pipeline.run(adt, sodium) == []


def test_a_later_message_of_a_visit_gives_a_newer_state_revision(pipeline: Pipeline) -> None:
    # Write-back keeps the newest result of an episode by this revision, whatever
    # order retries bring them back in (tests/adapters/test_fhir_writeback.py).
    pipeline.run(VISIT_1)
    chemistry = pipeline.run(CHEMISTRY)[0]
    urine = pipeline.run(URINE)[0]
    replayed = pipeline.run(URINE)[0]  # redelivered after a crash: recomputed, newer
    assert chemistry.identifier == urine.identifier == replayed.identifier
    assert chemistry.state_revision < urine.state_revision < replayed.state_revision
    state = pipeline.state.get(urine.patient_id)
    assert state is not None and state.revision == replayed.state_revision


def two_patients(message: bytes) -> bytes:
    """``message``'s patient group, then the same results for a second patient, MRN00999."""
    lines = message.replace(b"\n", b"\r").rstrip(b"\r").split(b"\r")
    second = [line.replace(b"MRN00123", b"MRN00999") for line in lines[1:]]
    return b"\r".join([*lines, *second]) + b"\r"


def test_a_copy_keyed_by_one_patient_updates_only_that_patient(pipeline: Pipeline) -> None:
    """Ingest stores a two-patient message once per patient; each copy is one patient's."""
    message = two_patients(PANEL)
    [prediction] = pipeline.run(message, key="MRN00999")
    assert prediction.patient_id == "MRN00999"
    assert pipeline.state.get("MRN00123") is None, "the other patient's partition owns them"
    assert pipeline.state.get("MRN00999") is not None
    both = pipeline.run(message)  # keyed by neither (stored before the split): both, as before
    assert sorted(p.patient_id for p in both) == ["MRN00123", "MRN00999"]
