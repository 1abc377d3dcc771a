"""A model's outcome, declared in YAML, and the events it is recognised from.

KFRE predicts kidney failure: dialysis or a kidney transplant, or a sustained
eGFR < 15 mL/min/1.73 m2 (two results at least 90 days apart), within 2 or 5
years (Tangri et al., JAMA 2016). The outcome file
(``evaluation/outcome-files/kfre-4var.yaml``) says which codes mean the outcome,
which lab rule does, and each horizon's length and risk field; a site adds its
local codes in a code map (CSV: ``system,code,display``), named in the site
file under ``evaluation.code_map``.

Events come from FHIR resources as a Bulk Data export writes them (one JSON
object per line; :func:`events_from_resource`):

- ``Condition.code`` (onset, else recorded date), ``Procedure.code``
  (performed), ``Encounter.type``/``reasonCode`` (period start) matching a
  code: an *outcome* event. Entered-in-error and refuted records are ignored
  (Condition.verificationStatus, Procedure/Encounter.status).
- ``Observation.code`` in the lab rule's codes with a ``valueQuantity``: a
  *lab* value (status final, amended or corrected, as the mapping reads labs).
- ``Patient.deceasedDateTime``: *death*, which censors (HL7v2 PID-29).
- Any dated clinical resource: a *contact*; the last one censors a patient
  whose horizon ended without follow-up.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A code's system may be written the way HL7v2 (CWE.3, table 0396) or FHIR names it;
# both spellings of the same system match each other.
SYSTEM_ALIASES: dict[str, frozenset[str]] = {
    "ICD-10": frozenset(
        {
            "I10",
            "I10C",
            "ICD10",
            "ICD-10",
            "ICD-10-CM",
            "http://hl7.org/fhir/sid/icd-10",
            "http://hl7.org/fhir/sid/icd-10-cm",
        }
    ),
    "SNOMED": frozenset({"SCT", "SNM", "SNOMED", "SNOMED-CT", "http://snomed.info/sct"}),
    "CPT": frozenset({"C4", "CPT", "CPT-4", "http://www.ama-assn.org/go/cpt"}),
    "LOINC": frozenset({"LN", "LOINC", "http://loinc.org"}),
}


def canonical_system(system: str) -> str:
    for name, spellings in SYSTEM_ALIASES.items():
        if system in spellings or system.upper() in spellings:
            return name
    return system


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutcomeCode(Strict):
    system: str = Field(..., min_length=1)
    code: str = Field(..., min_length=1)
    display: str = ""

    @field_validator("code", mode="before")
    @classmethod
    def code_is_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @property
    def key(self) -> tuple[str, str]:
        return canonical_system(self.system), self.code


class LabRule(Strict):
    """A sustained lab value: two results past ``threshold`` at least ``confirm_days`` apart."""

    name: str = "egfr"
    codes: list[OutcomeCode]
    below: float  # e.g. eGFR < 15 mL/min/1.73 m2
    confirm_days: int = Field(90, ge=0)
    units: list[str] = Field(default_factory=list)  # accepted unit labels; empty: any


class Horizon(Strict):
    days: int = Field(..., gt=0)
    risk: str = Field(..., min_length=1)  # the prediction's field: risk_2y, risk_5y


class OutcomeSpec(Strict):
    model: str
    outcome: str
    description: str = ""
    horizons: dict[str, Horizon]
    codes: list[OutcomeCode] = Field(default_factory=list)
    lab: LabRule | None = None
    # Outcome at or before the prediction: the patient already had it ("prevalent"),
    # so the prediction is left out of the metrics rather than counted as a hit.
    exclude_prevalent: bool = True

    def with_codes(self, extra: list[OutcomeCode]) -> OutcomeSpec:
        return self.model_copy(update={"codes": [*self.codes, *extra]})

    def code_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset(c.key for c in self.codes)


def read_code_map(text: str) -> list[OutcomeCode]:
    """A site's local outcome codes: CSV with a ``system,code,display`` header."""
    rows = csv.DictReader(io.StringIO(text))
    missing = {"system", "code"} - set(rows.fieldnames or ())
    if missing:
        raise ValueError(f"code map needs columns system,code[,display]; missing {sorted(missing)}")
    return [
        OutcomeCode(system=r["system"], code=r["code"], display=r.get("display") or "")
        for r in rows
        if (r.get("code") or "").strip()
    ]


def builtin_outcome(model: str) -> Path:
    """The outcome file shipped for a model (``evaluation/outcome-files/<model>.yaml``)."""
    return Path(__file__).with_name("outcome-files") / f"{model}.yaml"


# --------------------------------------------------------------------------- events


class EventKind(StrEnum):
    OUTCOME = "outcome"
    LAB = "lab"
    DEATH = "death"
    CONTACT = "contact"


@dataclass(frozen=True, slots=True, order=True)
class Event:
    at: datetime
    patient_id: str
    kind: EventKind
    value: float | None = None
    code: str = ""  # the matching code, for the report's "recognised from" counts


_IGNORED_STATUS = frozenset({"entered-in-error", "refuted", "not-done", "cancelled"})
_LAB_STATUS = frozenset({"final", "amended", "corrected"})
_DATE_FIELDS: dict[str, tuple[str, ...]] = {
    "Condition": ("onsetDateTime", "onsetPeriod.start", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "Encounter": ("period.start",),
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "Immunization": ("occurrenceDateTime",),
    "MedicationRequest": ("authoredOn",),
}


def parse_time(text: str) -> datetime | None:
    """A FHIR dateTime; a date alone is midnight UTC, a naive time is read as UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _dig(resource: Mapping[str, Any], dotted: str) -> Any:
    value: Any = resource
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def resource_time(resource: Mapping[str, Any]) -> datetime | None:
    for dotted in _DATE_FIELDS.get(str(resource.get("resourceType")), ()):
        text = _dig(resource, dotted)
        if isinstance(text, str) and (at := parse_time(text)):
            return at
    return None


def _codings(concepts: Any) -> Iterator[tuple[str, str]]:
    items = concepts if isinstance(concepts, list) else [concepts]
    for concept in items:
        for coding in (concept or {}).get("coding", []) if isinstance(concept, dict) else []:
            if isinstance(coding, dict) and coding.get("code"):
                yield canonical_system(str(coding.get("system", ""))), str(coding["code"])


def subject_id(resource: Mapping[str, Any]) -> str | None:
    """The Patient's logical id from ``subject``/``patient`` (``Patient/x`` or ``urn:uuid:x``)."""
    ref = _dig(resource, "subject.reference") or _dig(resource, "patient.reference")
    if not isinstance(ref, str):
        return None
    return ref.rsplit("/", 1)[-1].removeprefix("urn:uuid:")


def patient_key(patient: Mapping[str, Any], system: str | None) -> str | None:
    """The id a prediction carries: the identifier in ``system`` (the mapping's), else the id."""
    for ident in patient.get("identifier", []) or []:
        if system and isinstance(ident, dict) and ident.get("system") == system:
            value = ident.get("value")
            return str(value) if value else None
    value = patient.get("id")
    return str(value) if value else None


def _status_ignored(resource: Mapping[str, Any]) -> bool:
    status = resource.get("status")
    verification = {c for _, c in _codings(resource.get("verificationStatus"))}
    return status in _IGNORED_STATUS or bool(verification & _IGNORED_STATUS)


@dataclass(frozen=True, slots=True)
class Recogniser:
    """Turns FHIR resources into events for one outcome."""

    spec: OutcomeSpec
    codes: frozenset[tuple[str, str]]
    lab_codes: frozenset[tuple[str, str]]

    @classmethod
    def of(cls, spec: OutcomeSpec) -> Recogniser:
        lab = frozenset(c.key for c in spec.lab.codes) if spec.lab else frozenset()
        return cls(spec, spec.code_keys(), lab)

    def events(self, resource: Mapping[str, Any], patient: str) -> list[Event]:
        kind = resource.get("resourceType")
        if kind == "Patient":
            return self._death(resource, patient)
        at = resource_time(resource)
        if at is None or _status_ignored(resource):
            return []
        out = [Event(at, patient, EventKind.CONTACT)]
        if kind in ("Condition", "Procedure") and (hit := self._match(resource.get("code"))):
            out.append(Event(at, patient, EventKind.OUTCOME, code=hit))
        if kind == "Encounter":
            concepts = [*(resource.get("type") or []), *(resource.get("reasonCode") or [])]
            if hit := self._match(concepts):
                out.append(Event(at, patient, EventKind.OUTCOME, code=hit))
        if kind == "Observation" and (lab := self._lab(resource, at, patient)):
            out.append(lab)
        return out

    def _match(self, concepts: Any) -> str:
        for key in _codings(concepts):
            if key in self.codes:
                return f"{key[0]}|{key[1]}"
        return ""

    def _lab(self, resource: Mapping[str, Any], at: datetime, patient: str) -> Event | None:
        rule = self.spec.lab
        if rule is None or resource.get("status") not in _LAB_STATUS:
            return None
        if not any(key in self.lab_codes for key in _codings(resource.get("code"))):
            return None
        quantity = resource.get("valueQuantity") or {}
        value = quantity.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        if (
            rule.units
            and quantity.get("unit") not in rule.units
            and (quantity.get("code") not in rule.units)
        ):
            return None
        return Event(at, patient, EventKind.LAB, value=float(value))

    def _death(self, resource: Mapping[str, Any], patient: str) -> list[Event]:
        text = resource.get("deceasedDateTime")
        at = parse_time(text) if isinstance(text, str) else None
        return [Event(at, patient, EventKind.DEATH)] if at else []
