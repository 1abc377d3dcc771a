"""The README walk-through's follow-up: what the synthetic trajectories say happened, as HL7v2.

The figures under docs/walkthrough/ are only as honest as these messages: a
patient whose eGFR trajectory falls below 15 gets exactly one outcome (DG1
N18.6, dated when it fell) and no visit after it; a death is PID-29 and ends
the follow-up; everyone else is seen until the as-of date.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import yaml

from ehrbridge.bench.walkthrough import AS_OF, SPLIT, follow_up
from ehrbridge.config import load_site_config
from ehrbridge.evaluation.outcomes import EventKind, OutcomeSpec, Recogniser, builtin_outcome
from ehrbridge.hl7_outcomes import Hl7OutcomeReader
from ehrbridge.pipelines.facts import FactRules
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

REPO = Path(__file__).resolve().parents[2]


def reader() -> Hl7OutcomeReader:
    """The sandbox site's outcome reader, as `ehrbridge evaluate --events` builds it."""
    spec = OutcomeSpec.model_validate(yaml.safe_load(builtin_outcome("kfre-4var").read_text()))
    config = load_site_config(REPO / "sandbox" / "site.yaml")
    return Hl7OutcomeReader(Recogniser.of(spec), FactRules(config.mapping))


def test_follow_up_outcomes_follow_the_trajectories() -> None:
    ehr = SyntheticEhr(seed=16, patients=60, start=SPLIT)
    events = list(reader().events(follow_up(ehr, 16)))
    by_patient = {p.mrn: p for p in ehr.patients}
    outcomes = [e for e in events if e.kind is EventKind.OUTCOME]
    deaths = [e for e in events if e.kind is EventKind.DEATH]
    assert outcomes, "some trajectories must cross 15 before the as-of date"
    assert len({e.patient_id for e in outcomes}) == len(outcomes)  # one outcome each
    for event in outcomes:
        patient = by_patient[event.patient_id]
        assert patient.true_egfr(event.at) < 15
        assert event.code == "ICD-10|N18.6"
        last_contact = max(e.at for e in events if e.patient_id == event.patient_id)
        assert last_contact == event.at  # no visit after the outcome
    for event in deaths:
        assert SPLIT < event.at < AS_OF
        assert event.patient_id not in {e.patient_id for e in outcomes}
    for patient in ehr.patients:
        seen = [e.at for e in events if e.patient_id == patient.mrn]
        assert seen, "every patient is followed after the split"
        ended = patient.mrn in {e.patient_id for e in [*outcomes, *deaths]}
        if not ended:  # followed until within a visit interval of the as-of date
            assert max(seen) > AS_OF - timedelta(days=241)
