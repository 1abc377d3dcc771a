"""HL7v2 ORU^R01 and ADT messages to clinical facts and demographics.

One walk over the segments, in order, with the lean ER7 reader:

* ``PID`` starts a patient (ORU^R01 may carry several PATIENT_RESULT groups).
  The patient id comes from PID-3 by the site's rule; PID-7 is the birth date
  and PID-8 the administrative sex (HL7 table 0001).
* ``OBR`` sets the fallback observation time (OBR-7).
* ``OBX`` becomes a :class:`Fact` when OBX-3 maps to a feature, else an
  :class:`Unused` entry saying why. An OBX after ``SPM`` (2.5.1 ELR) still
  belongs to the current OBR: we never drop results by position.

Value policy (documented for sites in docs/config.md):

* OBX-5 is read as a number; ``<5``, ``>=90`` and the SN form ``<^5`` keep
  their comparator. ``bound`` policy uses the bound as the value and keeps the
  comparator on the fact; ``reject`` makes such results unusable.
* OBX-11 statuses outside the site's list (default F, C) are unused, not errors.
* A *mapped* result whose number cannot be read (``see note``, ``####``) or
  whose unit is not in the mapping makes the whole message unusable: the
  sender gets AE and the message waits in the dead-letter store for a mapping
  fix and a replay. Unmapped OBX never fail a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from ehrbridge.config import CANONICAL_UNITS, Mapping, UnitRule, normalise_unit
from ehrbridge.pipelines.er7 import Message, Segment
from ehrbridge.pipelines.errors import Hl7Location, MessageUnusable
from ehrbridge.pipelines.hl7time import Hl7TimeError, parse_date, parse_dtm

_NUMBER = re.compile(r"^\s*(<=|>=|<|>|=)?\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*$")
# Spellings of LOINC's coding-system id seen in OBX-3.3 and in FHIR Coding.system.
_SYSTEM_ALIASES = {"ln": "LN", "loinc": "LN", "http://loinc.org": "LN"}
ADT_DEMOGRAPHIC_EVENTS = frozenset({"A01", "A04", "A08", "A28", "A31"})


@dataclass(frozen=True, slots=True)
class Fact:
    """One usable result, already in the feature's canonical unit."""

    feature: str
    value: float
    unit: str
    effective: datetime
    ref: str  # stable within the site: "<MSH-10>/OBX/<n>"
    source_id: str
    system: str
    code: str
    display: str = ""
    comparator: str = ""
    raw_value: str = ""
    raw_unit: str = ""
    status: str = "F"

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__slots__}
        data["effective"] = self.effective.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fact:
        return cls(**{**data, "effective": datetime.fromisoformat(data["effective"])})


@dataclass(frozen=True, slots=True)
class Unused:
    """An OBX that produced no fact, and why. Nothing is dropped silently."""

    ref: str
    system: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Demographics:
    birth_date: date | None
    sex: str | None  # HL7 table 0001: F, M, O, U, A, N
    as_of: datetime | None  # MSH-7 of the message that said so


@dataclass
class PatientExtract:
    patient_id: str
    demographics: Demographics
    facts: list[Fact] = field(default_factory=list)
    unused: list[Unused] = field(default_factory=list)


@dataclass
class Extraction:
    control_id: str
    message_type: str  # e.g. "ORU^R01"
    patients: list[PatientExtract]

    @property
    def key(self) -> str:
        """Partition key: the (first) patient id, else the control id."""
        return self.patients[0].patient_id if self.patients else self.control_id


class FactRules:
    """A site mapping compiled into lookup tables for the hot path."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self.tz = mapping.tz
        self.codes: dict[tuple[str, str], str] = {
            (normalise_system(c.system), c.code): feature
            for feature, rule in mapping.features.items()
            for c in rule.codes
        }
        self.units: dict[str, dict[str, UnitRule]] = {
            feature: {normalise_unit(u): r for u, r in rule.units.items()}
            for feature, rule in mapping.features.items()
        }
        self.statuses = frozenset(mapping.values.statuses)

    def feature_of(self, system: str, code: str) -> str | None:
        return self.codes.get((normalise_system(system), code))


def normalise_system(system: str) -> str:
    return _SYSTEM_ALIASES.get(system.strip().casefold(), system.strip())


def extract(message: Message, rules: FactRules) -> Extraction:
    """Facts and demographics of every patient in an ORU^R01 or ADT message."""
    msg_type, trigger, _ = message.message_type
    kind = _classify(msg_type, trigger)
    patients: list[PatientExtract] = []
    sent_at = _message_time(message, rules)
    walker = _OruWalker(message, rules) if kind == "ORU" else None
    for segment in message.segments:
        if segment.name == "PID":
            patients.append(_patient(segment, rules, sent_at))
        elif walker is not None:
            walker.visit(segment, patients[-1] if patients else None)
    if not patients:
        raise MessageUnusable(
            f"{msg_type}^{trigger} has no PID segment",
            reason="hl7.missing_pid",
            location=Hl7Location("PID"),
            hl7_error_code=100,
        )
    return Extraction(message.control_id, f"{msg_type}^{trigger}".rstrip("^"), patients)


def _classify(msg_type: str, trigger: str) -> str:
    if not msg_type:
        raise MessageUnusable(
            "MSH-9 message type is empty",
            reason="hl7.missing_type",
            location=Hl7Location("MSH", field=9),
            hl7_error_code=101,
        )
    if msg_type == "ORU" and trigger in ("R01", ""):
        return "ORU"
    if msg_type == "ADT":
        return "ADT"
    raise MessageUnusable(
        f"message type {msg_type}^{trigger} is not used by this site (ORU^R01 and ADT are)",
        reason="hl7.unsupported_type",
        location=Hl7Location("MSH", field=9),
        hl7_error_code=200,
    )


class _OruWalker:
    """Turns OBX segments into facts, tracking the OBR they belong to."""

    def __init__(self, message: Message, rules: FactRules) -> None:
        self.message = message
        self.rules = rules
        self.obr: Segment | None = None
        self.obx_count = 0

    def visit(self, segment: Segment, patient: PatientExtract | None) -> None:
        if segment.name == "OBR":
            self.obr = segment
        elif segment.name == "OBX":
            self.obx_count += 1
            if patient is None:
                raise MessageUnusable(
                    "OBX before any PID segment",
                    reason="hl7.missing_pid",
                    location=Hl7Location("OBX", self.obx_count),
                    hl7_error_code=100,
                )
            self._observe(segment, patient)

    def _observe(self, obx: Segment, patient: PatientExtract) -> None:
        ref = f"{self.message.control_id}/OBX/{self.obx_count}"
        code, display, system = obx.component(3, 1), obx.component(3, 2), obx.component(3, 3)
        feature = self.rules.feature_of(system, code)
        if feature is None:  # OBX-3.4..6 is the alternate coding (CE/CWE)
            code, display, system = obx.component(3, 4), obx.component(3, 5), obx.component(3, 6)
            feature = self.rules.feature_of(system, code) if code else None
        if feature is None:
            original = obx.component(3, 1), obx.component(3, 3)
            patient.unused.append(Unused(ref, original[1], original[0], "code not mapped"))
            return
        status = obx.value(11).strip().upper()  # OBX-11 observation result status
        if not status:  # required (R) in every version; without it a value cannot be trusted
            raise MessageUnusable(
                f"OBX {self.obx_count} ({feature}) has no result status (OBX-11)",
                reason="hl7.missing_status",
                location=Hl7Location("OBX", self.obx_count, field=11),
                hl7_error_code=101,
            )
        if status not in self.rules.statuses:
            patient.unused.append(Unused(ref, system, code, f"result status {status} not used"))
            return
        fact = self._fact(obx, feature, ref, (system, code, display), status)
        if fact is None:
            patient.unused.append(Unused(ref, system, code, "comparator rejected by value policy"))
        else:
            patient.facts.append(fact)

    def _fact(
        self, obx: Segment, feature: str, ref: str, coding: tuple[str, str, str], status: str
    ) -> Fact | None:
        where = Hl7Location("OBX", self.obx_count)
        raw_value, comparator, number = _read_number(obx, where, feature)
        if comparator and self.rules.mapping.values.comparators == "reject":
            return None
        raw_unit = obx.component(6, 1) or obx.component(6, 2)  # OBX-6 units (CE.1, else CE.2)
        unit_rule = self.rules.units[feature].get(normalise_unit(raw_unit))
        if unit_rule is None:
            raise MessageUnusable(
                f"OBX {self.obx_count} ({feature}) has unit {raw_unit or '(none)'!r}, "
                f"which the site mapping does not convert",
                reason="mapping.unknown_unit",
                location=Hl7Location("OBX", self.obx_count, field=6),
                hl7_error_code=103,
            )
        return Fact(
            feature=feature,
            value=unit_rule.convert(number),
            unit=CANONICAL_UNITS[feature],
            effective=self._effective(obx),
            ref=ref,
            source_id=self.message.control_id,
            system=coding[0],
            code=coding[1],
            display=coding[2],
            comparator=comparator,
            raw_value=raw_value,
            raw_unit=raw_unit,
            status=status,
        )

    def _effective(self, obx: Segment) -> datetime:
        # OBX-14 date/time of the observation, else OBR-7 observation date/time.
        for segment, index in ((obx, 14), (self.obr, 7)):
            moment = _optional_time(segment, index, self.rules)
            if moment is not None:
                return moment
        raise MessageUnusable(
            f"OBX {self.obx_count} has no observation time (OBX-14 and OBR-7 are empty)",
            reason="hl7.missing_time",
            location=Hl7Location("OBR", field=7),
            hl7_error_code=101,
        )


def _read_number(obx: Segment, where: Hl7Location, feature: str) -> tuple[str, str, float]:
    """OBX-5 as (raw text, comparator, number), for NM, SN and text-typed values."""
    value_type = obx.value(2).strip().upper()  # OBX-2 value type
    if value_type == "SN":  # SN: comparator ^ num1 [^ separator ^ num2]
        raw = obx.value(5)
        text = obx.component(5, 1) + obx.component(5, 2)
        if obx.component(5, 3):  # a range or ratio is not a single number
            text = raw
    else:
        raw = text = obx.value(5)
    match = _NUMBER.match(text)
    if match is None:
        raise MessageUnusable(
            f"OBX {where.sequence} ({feature}) value is not a number",
            reason="hl7.bad_number",
            location=Hl7Location("OBX", where.sequence, field=5),
            hl7_error_code=102,
        )
    comparator = match.group(1) or ""
    return raw, "" if comparator == "=" else comparator, float(match.group(2))


def _patient(pid: Segment, rules: FactRules, sent_at: datetime | None) -> PatientExtract:
    return PatientExtract(
        patient_id=_patient_id(pid, rules),
        demographics=Demographics(_birth_date(pid), pid.value(8).strip().upper() or None, sent_at),
    )


def _patient_id(pid: Segment, rules: FactRules) -> str:
    rule = rules.mapping.patient
    repetitions = pid.repetitions(3)  # PID-3 patient identifier list (CX, repeating)
    if rule.assigning_authority is None and rule.type_code is None:
        candidates = [rule.repetition] if rule.repetition <= len(repetitions) else []
    else:
        candidates = [
            i
            for i in range(1, len(repetitions) + 1)
            if _cx_matches(pid, i, rule.assigning_authority, rule.type_code)
        ]
    for rep in candidates:
        value = pid.component(3, 1, rep=rep).strip()  # CX.1 id number
        if value:
            return value
    wanted = (
        " and ".join(
            part
            for part in (
                rule.assigning_authority and f"assigning authority {rule.assigning_authority}",
                rule.type_code and f"type {rule.type_code}",
            )
            if part
        )
        or f"repetition {rule.repetition}"
    )
    raise MessageUnusable(
        f"PID-3 has no identifier with {wanted}",
        reason="hl7.missing_patient_id",
        location=Hl7Location("PID", field=3),
        hl7_error_code=101,
    )


def _cx_matches(pid: Segment, rep: int, authority: str | None, type_code: str | None) -> bool:
    # CX.4 assigning authority is an HD: namespace id (.1) & universal id (.2).
    authority_ok = authority is None or authority in (
        pid.component(3, 4, rep=rep, sub=1),
        pid.component(3, 4, rep=rep, sub=2),
    )
    type_ok = type_code is None or pid.component(3, 5, rep=rep) == type_code
    return authority_ok and type_ok


def _message_time(message: Message, rules: FactRules) -> datetime | None:
    """MSH-7, used only to order demographic updates, so a malformed one is not fatal.

    Senders often append milliseconds without the dot (``20110613122406637``).
    """
    try:
        return _optional_time(message.segment("MSH"), 7, rules)
    except MessageUnusable:
        return None


def _birth_date(pid: Segment) -> date | None:
    text = pid.component(7, 1).strip()  # PID-7 date/time of birth
    if not text or (text.isdigit() and len(text) in (4, 6)):
        return None  # absent, or only year (month) precision: too coarse for an age
    try:
        return parse_date(text)
    except Hl7TimeError as exc:
        raise MessageUnusable(
            "PID-7 birth date is not an HL7 date",
            reason="hl7.bad_birth_date",
            location=Hl7Location("PID", field=7),
            hl7_error_code=102,
        ) from exc


def _optional_time(segment: Segment | None, index: int, rules: FactRules) -> datetime | None:
    if segment is None:
        return None
    text = segment.component(index, 1)  # TS.1 / DTM
    if not text.strip():
        return None
    try:
        return parse_dtm(text, rules.tz)
    except Hl7TimeError as exc:
        raise MessageUnusable(
            f"{segment.name}-{index} is not an HL7 date/time",
            reason="hl7.bad_time",
            location=Hl7Location(segment.name, field=index),
            hl7_error_code=102,
        ) from exc
