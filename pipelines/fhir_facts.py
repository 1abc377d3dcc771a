"""FHIR R4 Observation / Patient / Bundle → the same facts as HL7v2.

A FHIR site (a Synthea export, a Subscription notification, an EHR's bulk
or search Bundle) goes through the same mapping as an HL7v2 one and yields
the same :class:`~ehrbridge.pipelines.facts.Extraction`, so state, features,
triggers and mapping tests do not care where a result came from.

Only what the mapping needs is read. A whole-patient Synthea Bundle holds
hundreds of entries (Claims, ExplanationOfBenefits, Encounters ...): each entry
costs one ``resourceType`` check, an Observation whose codes map to no feature
one dict lookup per coding. orjson parses the bytes (about 2 ms per MB).

Mapping of FHIR to the value policy:

* ``Observation.status`` → the HL7 OBX-11 letter the policy speaks:
  final F, amended/corrected C, preliminary P, registered I, cancelled X,
  entered-in-error W (withdraws the earlier result), unknown U;
* ``valueQuantity.comparator`` is the comparator; the unit is the UCUM
  ``code`` (else the human ``unit``), converted by the feature's unit rules --
  an unknown unit makes the message unusable, never a guess;
* the time is ``effectiveDateTime`` / ``effectiveInstant`` /
  ``effectivePeriod.start``; a time without an offset is in the site's zone;
  a mapped result with any of those, ``effectivePeriod.end`` or ``issued``
  later than its receipt plus ``values.future_tolerance_s``, before
  ``values.earliest_date`` or before ``Patient.birthDate`` is unusable
  (``fhir.future_dated``, ``fhir.implausible_date``, ``fhir.before_birth_date``),
  and the error names the element;
* the patient id is the ``Patient.identifier`` (or ``subject.identifier``)
  whose system is ``patient.fhir_system``; ``subject.reference`` is resolved
  inside the Bundle by ``fullUrl`` or ``Patient/<id>``;
* birth date ``Patient.birthDate``, sex ``Patient.gender`` (male M, female F,
  other O, unknown U);
* with a field-based debounce the episode is ``Observation.encounter``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

import orjson

from ehrbridge.core.contracts import utcnow
from ehrbridge.core.errors import MessageRejected, MessageUnusable
from ehrbridge.mappings.codemaps import CodeRule
from ehrbridge.mappings.schema import CANONICAL_UNITS
from ehrbridge.pipelines.facts import (
    Demographics,
    Extraction,
    Fact,
    FactRules,
    Hit,
    ObservationTrace,
    PatientExtract,
    PatientTrace,
    PersonName,
    Trace,
    Unused,
    before_birth,
    conversion_for,
    person_name,
    plausibility_flag,
    read_number,
    time_problem,
    withdrawal,
)
from ehrbridge.pipelines.jsonshape import items, obj

STATUS_LETTERS = {
    "final": "F",
    "amended": "C",
    "corrected": "C",
    "preliminary": "P",
    "registered": "I",
    "cancelled": "X",
    "entered-in-error": "W",
    "unknown": "U",
}
GENDERS = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
_UCUM = "http://unitsofmeasure.org"
# Every time element of an Observation that says when it was taken or reported.
_TIME_ELEMENTS = (
    "effectiveDateTime",
    "effectiveInstant",
    "effectivePeriod.start",
    "effectivePeriod.end",
    "issued",
)
_EFFECTIVE = frozenset(_TIME_ELEMENTS[:3])  # the result's own time, in this order


class ElementUnusable(MessageUnusable):
    """A result that cannot be used because of one element, which the error names."""

    def __init__(self, detail: str, *, reason: str, element: str) -> None:
        super().__init__(detail, reason=reason)
        self.element = element  # FHIRPath within the resource, e.g. "effectiveDateTime"


@dataclass
class _Resources:
    """The entries worth reading, found in one pass."""

    observations: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)  # by fullUrl / Patient/id
    patient_order: list[dict[str, Any]] = field(default_factory=list)


def extract_fhir(
    payload: bytes | str | dict[str, Any],
    rules: FactRules,
    trace: Trace | None = None,
    *,
    received_at: datetime | None = None,
) -> Extraction:
    """Facts and demographics of every patient in a FHIR Bundle, Observation or Patient.

    ``received_at``: when ehrbridge received it (default now); result times are
    checked against it.
    """
    doc = _load(payload)
    kind = doc.get("resourceType")
    source_id = str(doc.get("id") or "fhir")
    found = _collect(doc, trace)
    reader = _Reader(rules, source_id, _as_of(doc), trace, received_at or utcnow())
    for resource in found.patient_order:
        reader.patient_from(resource, None)
    for position, full_url, observation in found.observations:
        reader.observation(position, full_url, observation, found)
    reader.check_births()
    if not reader.patients:
        raise MessageUnusable(
            f"the {kind} has no Patient and no Observation this site reads",
            reason="fhir.nothing_to_read",
        )
    message_type = f"Bundle/{doc.get('type', '')}" if kind == "Bundle" else str(kind)
    return Extraction(source_id, message_type, list(reader.patients.values()))


def _load(payload: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(payload, dict):
        doc = payload
    else:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise MessageRejected("the payload is not JSON", reason="fhir.unparseable") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        raise MessageRejected("the JSON is not a FHIR resource", reason="fhir.not_a_resource")
    if doc["resourceType"] not in ("Bundle", "Observation", "Patient"):
        raise MessageUnusable(
            f"{doc['resourceType']} is not read by this site (Bundle, Observation, Patient are)",
            reason="fhir.unsupported_type",
        )
    return doc


def _entries(doc: dict[str, Any]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    if doc["resourceType"] != "Bundle":
        yield 0, "", doc
        return
    for position, entry in enumerate(items(doc.get("entry")), start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            yield position, str(entry.get("fullUrl") or ""), resource


def _collect(doc: dict[str, Any], trace: Trace | None) -> _Resources:
    found = _Resources()
    for position, full_url, resource in _entries(doc):
        kind = resource.get("resourceType")
        if kind == "Observation":
            found.observations.append((position, full_url, resource))
        elif kind == "Patient":
            found.patient_order.append(resource)
            if full_url:
                found.patients[full_url] = resource
            if resource.get("id"):
                found.patients[f"Patient/{resource['id']}"] = resource
        elif trace is not None:
            trace.skipped[str(kind)] += 1
    return found


def _as_of(doc: dict[str, Any]) -> datetime | None:
    stamp = doc.get("timestamp") or obj(doc.get("meta")).get("lastUpdated")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp)
    except ValueError:
        return None


class _Reader:
    def __init__(
        self,
        rules: FactRules,
        source_id: str,
        as_of: datetime | None,
        trace: Trace | None,
        received_at: datetime,
    ) -> None:
        self.rules = rules
        self.source_id = source_id
        self.received_at = received_at
        if as_of is not None and time_problem(rules, as_of, received_at) is not None:
            as_of = None  # a future Bundle.timestamp would freeze demographics (facts.py)
        self.as_of = as_of
        self.trace = trace
        self.system = rules.mapping.patient.fhir_system
        self.patients: dict[str, PatientExtract] = {}
        self._by_resource: dict[int, str] = {}  # id(Patient resource) -> patient id

    def _fail(self, error: MessageUnusable) -> None:
        if self.trace is None:
            raise error
        self.trace.problems.append(f"{error.reason}: {error.detail}")

    # -- patients ---------------------------------------------------------------

    def patient_from(self, resource: dict[str, Any], _: str | None) -> str | None:
        known = self._by_resource.get(id(resource))
        if known is not None:
            return known
        patient_id = _identifier(resource.get("identifier"), self.system)
        if patient_id is None:
            self._fail(
                MessageUnusable(
                    f"Patient/{resource.get('id', '?')} has no identifier with system "
                    f"{self.system}",
                    reason="fhir.missing_patient_id",
                )
            )
            return None
        birth = _birth_date(resource.get("birthDate"))
        sex = GENDERS.get(str(resource.get("gender", "")))
        self._by_resource[id(resource)] = patient_id
        extract = self.patients.get(patient_id)
        if extract is None:
            name = _patient_name(resource.get("name"))
            self.patients[patient_id] = PatientExtract(
                patient_id, Demographics(birth, sex, self.as_of, name)
            )
        if self.trace is not None:
            self.trace.patients.append(
                PatientTrace(
                    patient_id,
                    f"Patient.identifier system {self.system}",
                    sex,
                    "Patient.gender" if sex else "",
                    birth,
                    "Patient.birthDate" if birth else "",
                )
            )
        return patient_id

    def _subject(self, observation: dict[str, Any], found: _Resources) -> str | None:
        subject = obj(observation.get("subject"))
        direct = _identifier([subject.get("identifier")], self.system)
        if direct is not None:
            if direct not in self.patients:
                self.patients[direct] = PatientExtract(direct, Demographics(None, None, None))
            return direct
        reference = str(subject.get("reference") or "")
        resource = found.patients.get(reference) or found.patients.get(_relative(reference))
        if resource is not None:
            return self.patient_from(resource, reference)
        self._fail(
            MessageUnusable(
                f"Observation/{observation.get('id', '?')}: its subject is not a Patient in the "
                f"message and has no identifier with system {self.system}",
                reason="fhir.missing_patient_id",
            )
        )
        return None

    # -- observations -----------------------------------------------------------

    def observation(
        self, position: int, full_url: str, obs: dict[str, Any], found: _Resources
    ) -> None:
        ref = f"Observation/{obs['id']}" if obs.get("id") else full_url or f"entry/{position}"
        codings = [c for c in items(obj(obs.get("code")).get("coding")) if isinstance(c, dict)]
        rule, coding = self._match(codings)
        note = self._note(ref, position, obs, coding) if self.trace is not None else None
        patient_id = self._subject(obs, found)
        if patient_id is None:
            if note is not None:
                note.outcome, note.reason = "error", "fhir.missing_patient_id"
            return
        patient = self.patients[patient_id]
        try:
            self._read(obs, ref, (rule, coding), patient, note)
        except MessageUnusable as error:
            if note is not None:
                note.outcome, note.reason = "error", f"{error.reason}: {error.detail}"
            self._fail(error)

    def _match(self, codings: list[dict[str, Any]]) -> tuple[CodeRule | None, dict[str, Any]]:
        for coding in codings:
            rule = self.rules.rule_for(str(coding.get("system", "")), str(coding.get("code", "")))
            if rule is not None:
                return rule, coding
        return None, codings[0] if codings else {}

    def _note(
        self, ref: str, position: int, obs: dict[str, Any], coding: dict[str, Any]
    ) -> ObservationTrace:
        assert self.trace is not None
        quantity = obj(obs.get("valueQuantity"))
        note = ObservationTrace(
            ref=ref,
            position=f"entry {position}" if position else "resource",
            system=str(coding.get("system", "")),
            code=str(coding.get("code", "")),
            display=str(coding.get("display", "")),
            raw_value=f"{quantity.get('comparator', '')}{quantity.get('value', '')}",
            raw_unit=_unit_of(quantity),
            status=str(obs.get("status", "")),
        )
        self.trace.observations.append(note)
        return note

    def _read(
        self,
        obs: dict[str, Any],
        ref: str,
        matched: tuple[CodeRule | None, dict[str, Any]],
        patient: PatientExtract,
        note: ObservationTrace | None,
    ) -> None:
        rule, coding = matched
        system, code = str(coding.get("system", "")), str(coding.get("code", ""))
        display = str(coding.get("display", ""))
        quantity = obj(obs.get("valueQuantity"))
        if rule is None:
            reason = self.rules.unmapped_reason(system, code)
            value = str(quantity.get("value", "")) if quantity else _other_value(obs)
            patient.unused.append(
                Unused(ref, system, code, reason, display, value, _unit_of(quantity))
            )
            if note is not None:
                note.outcome, note.reason = "unused", reason
            return
        hit = Hit(ref, rule, system, code, display, "", patient, note)
        hit.noted()
        hit.status = status = self._status(obs, ref, rule)
        if status in self.rules.withdraw:
            effective, _ = self._effective(obs, ref)
            hit.keep(withdrawal(hit, effective, self.source_id, self._episode(obs)), "")
        elif status not in self.rules.statuses:
            hit.unused(f"result status {status} ({obs.get('status')}) not used")
        elif not quantity:
            absent = obj(obs.get("dataAbsentReason")).get("text") or "no valueQuantity"
            hit.unused(f"no value ({absent})")
        else:
            self._fact(obs, hit, quantity)

    def _status(self, obs: dict[str, Any], ref: str, rule: CodeRule) -> str:
        status = STATUS_LETTERS.get(str(obs.get("status", "")))
        if status is None:
            raise MessageUnusable(
                f"{ref} ({rule.feature}) has no valid status ({obs.get('status')!r})",
                reason="fhir.missing_status",
            )
        return status

    def _fact(self, obs: dict[str, Any], hit: Hit, quantity: dict[str, Any]) -> None:
        feature = hit.rule.feature
        number, comparator = quantity.get("value"), str(quantity.get("comparator", ""))
        if not isinstance(number, int | float) or isinstance(number, bool):
            parsed = read_number(str(number)) if number is not None else None
            if parsed is None:
                raise MessageUnusable(
                    f"{hit.ref} ({feature}) valueQuantity.value is not a number",
                    reason="fhir.bad_number",
                )
            comparator, number = comparator or parsed[0], parsed[1]
        raw_value = f"{comparator}{number}"
        if comparator and feature in self.rules.reject_comparators:
            hit.unused("comparator rejected by value policy", raw_value)
            return
        raw_unit, conversion = self._unit(quantity, feature)
        if conversion is None:
            raise MessageUnusable(
                f"{hit.ref} ({feature}) has unit {raw_unit or '(none)'!r}, "
                "which the site mapping does not convert",
                reason="mapping.unknown_unit",
            )
        effective, source = self._effective(obs, hit.ref)
        value = conversion.rule.convert(float(number))
        fact = Fact(
            feature=feature,
            value=value,
            unit=CANONICAL_UNITS[feature],
            effective=effective,
            ref=hit.ref,
            source_id=self.source_id,
            system=hit.system,
            code=hit.code,
            display=hit.display,
            comparator=comparator,
            raw_value=raw_value,
            raw_unit=raw_unit,
            status=hit.status,
            concept=hit.rule.concept,
            flag=plausibility_flag(self.rules, feature, value),
            rank=conversion.rank,
            episode=self._episode(obs),
        )
        hit.keep(fact, conversion.rule.describe(), source)

    def _unit(self, quantity: dict[str, Any], feature: str) -> tuple[str, Any]:
        """The UCUM code when it converts, else the human-readable unit."""
        candidates = [quantity.get("code"), quantity.get("unit")]
        if quantity.get("system") not in (None, _UCUM):
            candidates.reverse()
        for unit in candidates:
            if isinstance(unit, str) and unit:
                conversion = conversion_for(self.rules, feature, unit)
                if conversion is not None:
                    return unit, conversion
        return _unit_of(quantity), None

    def _effective(self, obs: dict[str, Any], ref: str) -> tuple[datetime, str]:
        """The result's time; every time element of it is checked first."""
        effective: list[tuple[datetime, str]] = []
        for element in _TIME_ELEMENTS:
            text = _element(obs, element)
            if not isinstance(text, str) or not text:
                continue
            try:
                moment = self._datetime(text, ref, element)
            except MessageUnusable:
                if element in _EFFECTIVE:
                    raise
                continue  # a malformed issued or period end is not what we read
            self._check_time(moment, ref, element)
            if element in _EFFECTIVE:
                effective.append((moment, element))
        if not effective:
            raise MessageUnusable(f"{ref} has no effective time", reason="fhir.missing_time")
        return effective[0]

    def _check_time(self, moment: datetime, ref: str, element: str) -> None:
        problem = time_problem(self.rules, moment, self.received_at)
        if problem is not None:
            suffix, clause = problem
            raise ElementUnusable(
                f"{ref} {element} {clause}", reason=f"fhir.{suffix}", element=element
            )

    def check_births(self) -> None:
        """No result may be timed before its patient's birth date."""
        for patient in self.patients.values():
            early = before_birth(self.rules, patient.facts, patient.demographics.birth_date)
            if early is not None:
                self._fail(
                    ElementUnusable(
                        f"{early.ref} is timed before the patient's Patient.birthDate",
                        reason="fhir.before_birth_date",
                        element="effective",
                    )
                )

    def _datetime(self, text: str, ref: str, source: str) -> datetime:
        """A FHIR dateTime, partial dates included; no offset means the site's zone."""
        try:
            if len(text) <= 10:  # YYYY, YYYY-MM, YYYY-MM-DD
                parts = [int(p) for p in text.split("-")] + [1, 1]
                moment = datetime.combine(date(parts[0], parts[1], parts[2]), time())
            else:
                moment = datetime.fromisoformat(text)
        except ValueError as exc:
            raise MessageUnusable(
                f"{ref} {source} is not a FHIR dateTime", reason="fhir.bad_time"
            ) from exc
        return moment if moment.tzinfo else moment.replace(tzinfo=self.rules.tz)

    def _episode(self, obs: dict[str, Any]) -> str:
        if self.rules.debounce is None:
            return ""
        return str(obj(obs.get("encounter")).get("reference") or "")


def _element(obs: dict[str, Any], element: str) -> Any:
    """``effectivePeriod.start`` and the like, from the Observation's JSON."""
    value: Any = obs
    for name in element.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _identifier(identifiers: Any, system: str) -> str | None:
    for identifier in items(identifiers):
        if isinstance(identifier, dict) and identifier.get("system") == system:
            value = identifier.get("value")
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _relative(reference: str) -> str:
    """``https://ehr/fhir/Patient/12`` → ``Patient/12`` (history suffixes dropped)."""
    parts = reference.split("/_history/", maxsplit=1)[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def _patient_name(names: Any) -> PersonName | None:
    """Patient.name: the official one, else the first (HumanName family, given[0], given[1])."""
    if not isinstance(names, list):
        return None
    usable = [n for n in names if isinstance(n, dict)]
    chosen = next((n for n in usable if n.get("use") == "official"), usable[0] if usable else None)
    if chosen is None:
        return None
    given = [g for g in items(chosen.get("given")) if isinstance(g, str)] + ["", ""]
    family = chosen.get("family")
    return person_name(family if isinstance(family, str) else "", given[0], given[1])


def _birth_date(text: Any) -> date | None:
    if not isinstance(text, str) or len(text) in (4, 7):
        return None  # absent, or year (month) precision: too coarse for an age
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise MessageUnusable(
            "Patient.birthDate is not a FHIR date", reason="fhir.bad_birth_date"
        ) from exc


def _unit_of(quantity: dict[str, Any]) -> str:
    return str(quantity.get("code") or quantity.get("unit") or "")


def _other_value(obs: dict[str, Any]) -> str:
    for key in ("valueString", "valueInteger"):
        if key in obs:
            return str(obs[key])
    concept = obs.get("valueCodeableConcept")
    if isinstance(concept, dict):
        return str(concept.get("text") or "")
    return ""
