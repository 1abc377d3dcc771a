"""A message that carries a patient's history becomes one prediction per episode.

An HL7v2 ORU^R01 brings the results of one visit; a FHIR Bundle may bring a
patient's whole record (a Synthea export, a search result, a bulk export):
decades of creatinine, eGFR and UACR. Processed as one message it would give
one prediction, at its newest results. Split here into its episodes -- the
mapping's debounce groups, a visit or a day (``features.episode_of``) --
oldest first, each merged and evaluated in turn, it gives the patient's
**risk history**: one prediction per episode, each from the data known at
that episode (``latest_in_window`` never looks past the anchor).

Re-processing stays idempotent: every episode keeps its prediction identity.
"""

from __future__ import annotations

from ehrbridge.mappings.schema import Mapping
from ehrbridge.pipelines.facts import Extraction, Fact, PatientExtract
from ehrbridge.pipelines.features import episode_of


def by_episode(extraction: Extraction, mapping: Mapping) -> Extraction:
    """The same extraction with each patient's facts split into episodes, oldest first."""
    tz = mapping.tz
    patients: list[PatientExtract] = []
    for patient in extraction.patients:
        groups: dict[str, list[Fact]] = {}
        for fact in sorted(patient.facts, key=lambda f: (f.effective, f.ref)):
            groups.setdefault(episode_of(fact, tz), []).append(fact)
        if len(groups) <= 1:
            patients.append(patient)
            continue
        for number, facts in enumerate(groups.values()):
            patients.append(
                PatientExtract(
                    patient.patient_id,
                    patient.demographics,
                    facts=facts,
                    unused=patient.unused if number == 0 else [],
                )
            )
    return Extraction(extraction.control_id, extraction.message_type, patients)
