"""The prediction record: what the processing stage hands to write-back.

It travels as JSON on the ``predictions`` topic and is kept in the local
result store, so it carries everything write-back needs and everything a
clinician or auditor may ask later: the features, the exact input facts, the
model name/version/calibration and its outputs, by the names the model file
gives them (``outputs``), as fractions.

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

from ehrbridge.pipelines.facts import PersonName
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
    outputs: dict[str, float]  # by the model file's output names; risks as fractions, 0..1
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
                "outputs": self.outputs,
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
        features = FeatureRecord.from_json(data["features"])
        return cls(
            site=data["site"],
            patient_id=data["patient_id"],
            patient_system=data["patient_system"],
            features=features,
            model=ModelInfo(**data["model"]),
            outputs=outputs_of(data),
            source_id=data["source_id"],
            mapping_version=data["mapping_version"],
            identifier=data["identifier"],
            state_revision=data.get("state_revision", 0),
            patient_name=PersonName.from_json(data.get("patient_name")),
        )


_STRUCTURAL = frozenset(
    {"site", "patient_id", "patient_system", "features", "model", "source_id"}
    | {"mapping_version", "identifier", "state_revision", "patient_name", "outputs"}
)


def outputs_of(data: dict[str, Any]) -> dict[str, float]:
    """The outputs; a prediction written before they were grouped had each at top level."""
    if "outputs" in data:
        return {str(k): float(v) for k, v in data["outputs"].items()}
    return {
        k: float(v)
        for k, v in data.items()
        if k not in _STRUCTURAL and isinstance(v, int | float) and not isinstance(v, bool)
    }


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
