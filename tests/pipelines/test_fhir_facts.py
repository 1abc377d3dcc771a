"""FHIR R4 Bundles / Observations → facts, on the shared Synthea CKD corpus."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import CORPUS

from ehrbridge.core.errors import MessageRejected, MessageUnusable
from ehrbridge.pipelines.facts import FactRules, Trace
from ehrbridge.pipelines.features import FeatureRecord, assemble, evaluate
from ehrbridge.pipelines.fhir_facts import extract_fhir
from ehrbridge.pipelines.state import PatientState
from ehrbridge.workbench.site import resolve_site

SYNTHEA = CORPUS / "fhir" / "synthea-ckd"
BUNDLES = sorted(SYNTHEA.glob("*.json"))
RULES = FactRules(resolve_site("fhir-synthea").mapping)
MRN_SYSTEM = "http://hospital.smarthealthit.org"
CODES = {"38483-4": "creatinine", "33914-3": "egfr", "14959-1": "uacr"}


def entries(path: Path) -> list[dict[str, Any]]:
    return [e["resource"] for e in json.loads(path.read_bytes())["entry"]]


def mrn(path: Path) -> str:
    patient = next(r for r in entries(path) if r["resourceType"] == "Patient")
    return str(next(i["value"] for i in patient["identifier"] if i.get("system") == MRN_SYSTEM))


def test_the_corpus_is_there() -> None:
    assert len(BUNDLES) == 4, f"Synthea CKD bundles not found at {SYNTHEA}"


@pytest.mark.parametrize("path", BUNDLES, ids=[p.stem.split("_")[0] for p in BUNDLES])
def test_every_renal_observation_becomes_a_fact(path: Path) -> None:
    resources = entries(path)
    # Counted independently of the reader: renal codes by status in the raw JSON.
    expected = Counter(
        CODES[r["code"]["coding"][0]["code"]]
        for r in resources
        if r["resourceType"] == "Observation"
        and r["code"]["coding"][0]["code"] in CODES
        and r["status"] == "final"
    )
    observations = sum(r["resourceType"] == "Observation" for r in resources)
    extraction = extract_fhir(path.read_bytes(), RULES)
    [patient] = extraction.patients
    assert patient.patient_id == mrn(path)
    assert Counter(f.feature for f in patient.facts) == expected
    # every other Observation is accounted for as unused: nothing is dropped silently
    assert len(patient.facts) + len(patient.unused) == observations
    assert all(
        f.unit == {"creatinine": "mg/dL", "egfr": "mL/min/{1.73_m2}", "uacr": "mg/g"}[f.feature]
        for f in patient.facts
    )


def test_ml_min_egfr_is_accepted_but_loses_to_a_proper_label_at_the_same_time() -> None:
    path = next(p for p in BUNDLES if p.name.startswith("Dirk"))
    [patient] = extract_fhir(path.read_bytes(), RULES).patients
    egfr = [f for f in patient.facts if f.feature == "egfr"]
    accepted = [f for f in egfr if f.raw_unit == "mL/min"]
    assert accepted and all(f.rank == 1 for f in accepted)
    assert all(f.rank == 0 for f in egfr if f.raw_unit == "mL/min/{1.73_m2}")
    state = PatientState(patient.patient_id)
    state.merge(patient)
    labels_at: dict[datetime, set[str]] = {}
    for fact in egfr:
        labels_at.setdefault(fact.effective, set()).add(fact.raw_unit)
    both = [t for t, units in labels_at.items() if len(units) == 2]
    assert both, "the corpus sends both labels at one time for this patient"
    for moment in both:
        record = assemble(state, moment, RULES.mapping)
        assert isinstance(record, FeatureRecord), record
        assert record.inputs[0].raw_unit == "mL/min/{1.73_m2}"


@pytest.mark.parametrize("path", BUNDLES, ids=[p.stem.split("_")[0] for p in BUNDLES])
def test_a_whole_patient_bundle_gives_a_record_or_a_reason(path: Path) -> None:
    [patient] = extract_fhir(path.read_bytes(), RULES).patients
    state = PatientState(patient.patient_id)
    result = evaluate(state, patient, RULES.mapping)
    if not patient.facts:
        assert result is None
        return
    assert result is not None
    if isinstance(result, FeatureRecord):
        assert result.anchor == max(f.effective for f in patient.facts)
        assert 0 < result["egfr"] < 250 and result["uacr"] > 0
    else:
        assert result.reason  # not enough data, or outside the model's domain: a stated reason


def test_explain_mode_counts_the_resources_it_skips() -> None:
    path = BUNDLES[0]
    trace = Trace()
    extract_fhir(path.read_bytes(), RULES, trace)
    kinds = Counter(r["resourceType"] for r in entries(path))
    assert trace.skipped == Counter(
        {k: v for k, v in kinds.items() if k not in ("Observation", "Patient")}
    )
    assert len(trace.observations) == kinds["Observation"]
    assert {o.outcome for o in trace.observations} <= {"used", "unused", "flagged"}


def observation(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "14959-1"}]},
        "subject": {"identifier": {"system": MRN_SYSTEM, "value": "P1"}},
        "effectiveDateTime": "2021-03-15T09:00:00",
        "valueQuantity": {"value": 30, "unit": "mg/g", "code": "mg/g"},
    }
    base.update(changes)
    return base


def test_a_single_observation_with_a_comparator_and_a_naive_time() -> None:
    resource = observation(valueQuantity={"value": 3, "comparator": "<", "code": "mg/g"})
    [patient] = extract_fhir(json.dumps(resource), RULES).patients
    [fact] = patient.facts
    assert (patient.patient_id, fact.comparator, fact.value) == ("P1", "<", 3.0)
    assert fact.effective.utcoffset() is not None  # the site's zone (UTC) was applied
    assert fact.ref == "Observation/o1"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [("preliminary", "unused"), ("amended", "used"), ("entered-in-error", "withdrawn")],
)
def test_fhir_statuses_follow_the_value_policy(status: str, outcome: str) -> None:
    trace = Trace()
    extract_fhir(json.dumps(observation(status=status)), RULES, trace)
    assert trace.observations[0].outcome == outcome


@pytest.mark.parametrize(
    ("payload", "error", "reason"),
    [
        (b"not json", MessageRejected, "fhir.unparseable"),
        (b'{"hello": 1}', MessageRejected, "fhir.not_a_resource"),
        (b'{"resourceType": "Claim"}', MessageUnusable, "fhir.unsupported_type"),
        (
            json.dumps(observation(valueQuantity={"value": 3, "code": "mg/mmol"})),
            MessageUnusable,
            "mapping.unknown_unit",
        ),
        (
            json.dumps(observation(subject={"reference": "Patient/x"})),
            MessageUnusable,
            "fhir.missing_patient_id",
        ),
        (json.dumps(observation(effectiveDateTime=None)), MessageUnusable, "fhir.missing_time"),
        (json.dumps(observation(status="done")), MessageUnusable, "fhir.missing_status"),
        (
            json.dumps(observation(valueQuantity={"value": "n/a", "code": "mg/g"})),
            MessageUnusable,
            "fhir.bad_number",
        ),
    ],
)
def test_unusable_fhir_says_why(payload: bytes | str, error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as caught:
        extract_fhir(payload, RULES)
    assert getattr(caught.value, "reason", None) == reason


def test_an_unmapped_observation_with_garbage_never_fails_the_message() -> None:
    garbage = observation(
        id="o2",
        code={"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        valueQuantity={"value": "n/a", "code": "???"},
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": garbage}, {"resource": observation()}],
    }
    [patient] = extract_fhir(json.dumps(bundle), RULES).patients
    assert [f.feature for f in patient.facts] == ["uacr"]
    assert [u.code for u in patient.unused] == ["2339-0"]
