"""The prediction record: what the processing stage hands to write-back.

It travels as JSON on the ``predictions`` topic and is kept in the local
result store, so it carries everything write-back needs and everything a
clinician or auditor may ask later: the features, the exact input facts, the
model name/version/calibration and the risks.

Its ``identifier`` is deterministic in (site, model, model version,
calibration, patient, episode) -- the episode being the mapping's debounce
group, a visit or a day (``pipelines/features.py``). Re-processing the same
messages -- after a crash, a replay, or a mapping fix that changes a unit
factor -- yields the same identifier, and write-back updates the Observation
with that identifier instead of adding a second one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ehrbridge.pipelines.facts import Fact, PersonName
from ehrbridge.pipelines.features import FeatureRecord


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    calibration: str


@dataclass(frozen=True, slots=True)
class Prediction:
    site: str
    patient_id: str
    patient_system: str  # FHIR Identifier.system of the patient id
    features: FeatureRecord
    model: ModelInfo
    risk_2y: float  # fractions, 0..1
    risk_5y: float
    source_id: str  # MSH-10 / FHIR id of the message that triggered it
    mapping_version: str
    identifier: str
    state_revision: int = 0  # the patient state's revision it was computed from
    # The name the EHR sent, for the ORU's PID-5 (PHI like patient_id: never logged).
    patient_name: PersonName | None = None

    @property
    def anchor(self) -> datetime:
        return self.features.anchor

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "site": self.site,
                "patient_id": self.patient_id,
                "patient_system": self.patient_system,
                "features": self.features.to_json(),
                "model": {
                    "name": self.model.name,
                    "version": self.model.version,
                    "calibration": self.model.calibration,
                },
                "risk_2y": self.risk_2y,
                "risk_5y": self.risk_5y,
                "source_id": self.source_id,
                "mapping_version": self.mapping_version,
                "identifier": self.identifier,
                "state_revision": self.state_revision,
                "patient_name": self.patient_name.to_json() if self.patient_name else None,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Prediction:
        data: dict[str, Any] = orjson.loads(raw)
        f = data["features"]
        features = FeatureRecord(
            anchor=datetime.fromisoformat(f["anchor"]),
            age=f["age"],
            male=f["male"],
            egfr=f["egfr"],
            uacr_mg_g=f["uacr_mg_g"],
            egfr_method=f["egfr_method"],
            inputs=tuple(Fact.from_json(i) for i in f["inputs"]),
            episode=f.get("episode", ""),
        )
        return cls(
            site=data["site"],
            patient_id=data["patient_id"],
            patient_system=data["patient_system"],
            features=features,
            model=ModelInfo(**data["model"]),
            risk_2y=data["risk_2y"],
            risk_5y=data["risk_5y"],
            source_id=data["source_id"],
            mapping_version=data["mapping_version"],
            identifier=data["identifier"],
            state_revision=data.get("state_revision", 0),
            patient_name=PersonName.from_json(data.get("patient_name")),
        )


def prediction_identifier(
    site: str, model: ModelInfo, patient_id: str, features: FeatureRecord
) -> str:
    """A stable id for "this model's answer for this episode" (else "for these input facts").

    With an episode (the mapping's debounce: one visit or day), every message
    of the episode gives the same identifier, so the Observation is updated as
    the rest of the visit's results arrive instead of being duplicated.
    """
    inputs: object = features.episode or sorted(f.ref for f in features.inputs)
    material = orjson.dumps(
        [site, model.name, model.version, model.calibration, patient_id, inputs]
    )
    return hashlib.sha256(material).hexdigest()[:32]
