"""HL7v2 ORU^R01 and ADT messages to clinical facts and demographics.

One walk over the segments, in order, with the lean ER7 reader:

* ``PID`` starts a patient (ORU^R01 may carry several PATIENT_RESULT groups).
  The patient id comes from PID-3 by the site's rule. Birth date and sex are
  read where the mapping says (default PID-7 and PID-8; a Z-segment after PID
  works the same), once the patient's group of segments is complete.
* ``OBR`` sets the fallback observation time (OBR-7).
* ``OBX`` becomes a :class:`Fact` when OBX-3 (or its alternate coding) maps to
  a feature -- directly or through the site's code map -- else an
  :class:`Unused` entry saying why. An OBX after ``SPM`` (2.5.1 ELR) still
  belongs to the current OBR: we never drop results by position.

Value policy (documented for sites in mappings/README.md):

* OBX-5 is read as a number; ``<5``, ``>=90`` and the SN form ``<^5`` keep
  their comparator. ``bound`` policy uses the bound as the value and keeps the
  comparator on the fact; ``reject`` makes such results unused.
* OBX-11 statuses outside the site's list (default F, C) are unused, not
  errors; ``withdraw`` statuses (default D, W) record a marker that withdraws
  the earlier result with the same code and time.
* A value outside the feature's plausible range becomes a *flagged* fact: it
  is kept in the patient's state and shown by ``mappings explain``, never used.
* A mapped result whose time (OBX-14, else OBR-7) is later than the message's
  receipt plus ``values.future_tolerance_s``, before ``values.earliest_date``
  or before the patient's birth date (PID-7) cannot be true: the message is
  unusable (AE, ``obx.future_dated``, ``obx.implausible_date``,
  ``obx.before_birth_date``). A result dated in the future would otherwise
  become the patient's latest value and anchor every later prediction.
* A *mapped* result whose number cannot be read (``see note``, ``####``) or
  whose unit is not in the mapping makes the whole message unusable: the
  sender gets AE and the message waits in the dead-letter store for a mapping
  fix and a replay. Unmapped OBX never fail a message.

``extract(message, rules, trace=Trace())`` is the explain mode: instead of
raising at the first problem it records every problem and keeps walking, and
notes for each OBX which rule consumed it and how its value was converted.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from ehrbridge.core.contracts import utcnow
from ehrbridge.core.errors import Hl7Location, MessageUnusable
from ehrbridge.mappings.codemaps import CodeRule, code_table, normalise_system
from ehrbridge.mappings.diagnostics import Locator
from ehrbridge.mappings.schema import (
    CANONICAL_UNITS,
    CodeMapEntry,
    FieldSource,
    Mapping,
    UnitRule,
)
from ehrbridge.mappings.units import normalise_unit
from ehrbridge.pipelines.er7 import MAX_VALUE_CHARS, Message, Segment
from ehrbridge.pipelines.hl7time import Hl7TimeError, parse_date, parse_dtm

# ASCII digits only (re.ASCII): '\d' would also take other scripts' digits. Matched
# on the stripped text: a leading '\s*' before an optional part backtracks in
# quadratic time over 64 Ki spaces (37 s, found by the fuzzer).
_NUMBER = re.compile(r"(<=|>=|<|>|=)?\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))", re.ASCII)
_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d+)(?:\((\d+)\))?(?:\.(\d+)(?:\.(\d+))?)?$")
ADT_DEMOGRAPHIC_EVENTS = frozenset({"A01", "A04", "A08", "A28", "A31"})
IMPLAUSIBLE = "implausible"
WITHDRAWN = "withdrawn"
# OBX-3 is CE/CWE: identifier, text, system; then the alternate triple; v2.7 CWE a second one.
_CODINGS = ((1, 2, 3), (4, 5, 6), (10, 11, 12))


@dataclass(frozen=True, slots=True)
class Fact:
    """One result, already in the feature's canonical unit.

    A fact with a ``flag`` is recorded (state, explain, the patient API) but
    never used: ``implausible: ...`` (outside the plausible range) or
    ``withdrawn: ...`` (a marker that withdraws the result with the same code
    and time). ``rank`` 1 marks a value accepted under another unit label; it
    is used only when no rank-0 value has the same time.
    """

    feature: str
    value: float
    unit: str
    effective: datetime
    ref: str  # stable within the site: "<MSH-10>/OBX/<n>" or "Observation/<id>"
    source_id: str
    system: str
    code: str
    display: str = ""
    comparator: str = ""
    raw_value: str = ""
    raw_unit: str = ""
    status: str = "F"
    concept: str = ""  # the standard concept it counts as, "LN|2160-0"
    flag: str = ""
    rank: int = 0
    episode: str = ""  # the debounce key read from the message (visit number), if any

    @property
    def usable(self) -> bool:
        return not self.flag

    @property
    def withdraws(self) -> bool:
        return self.flag.startswith(WITHDRAWN)

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__slots__}
        data["effective"] = self.effective.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fact:
        return cls(**{**data, "effective": datetime.fromisoformat(data["effective"])})


UNMAPPED = "code not mapped"  # Unused.reason of a code the site mapping does not know


@dataclass(frozen=True, slots=True)
class Unused:
    """A result that produced no fact, and why. Nothing is dropped silently."""

    ref: str
    system: str
    code: str
    reason: str
    display: str = ""
    value: str = ""  # as sent, for `mappings unmapped` (PHI: never logged)
    unit: str = ""


NAME_PART_MAX = 100  # characters kept of each name part: bounds what a sender makes us keep


@dataclass(frozen=True, slots=True)
class PersonName:
    """The patient's name as the EHR sent it (PID-5, Patient.name), for the ORU's PID-5.

    PHI: never logged, never put in an error's reason or detail.
    """

    family: str
    given: str = ""
    middle: str = ""

    def to_json(self) -> list[str]:
        return [self.family, self.given, self.middle]

    @classmethod
    def from_json(cls, parts: list[str] | None) -> PersonName | None:
        return cls(*parts[:3]) if parts else None


def person_name(family: str, given: str = "", middle: str = "") -> PersonName | None:
    """A name from its parts, each trimmed and capped; None when it has neither family nor given."""
    parts = [part.strip()[:NAME_PART_MAX] for part in (family, given, middle)]
    return PersonName(*parts) if parts[0] or parts[1] else None


@dataclass(frozen=True, slots=True)
class Demographics:
    birth_date: date | None
    sex: str | None  # HL7 table 0001: F, M, O, U, A, N
    as_of: datetime | None  # MSH-7 of the message that said so
    name: PersonName | None = None


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
    def keys(self) -> list[str]:
        """Partition keys: each patient's id once, in message order (else the control id).

        A message about several patients is stored once per patient, each copy
        keyed by one of them, so that every patient's facts reach the worker
        that owns that patient's state (see :meth:`owned_by`).
        """
        ids = list(dict.fromkeys(p.patient_id for p in self.patients))
        return ids or [self.control_id]

    def owned_by(self, key: str) -> Extraction:
        """Only the patients a record keyed ``key`` is for.

        A record whose key names none of them (stored before messages were
        split by patient, or a patient-id rule changed before a replay) keeps
        them all, as such records always did.
        """
        mine = [p for p in self.patients if p.patient_id == key]
        if not mine or len(mine) == len(self.patients):
            return self
        return Extraction(self.control_id, self.message_type, mine)


# --------------------------------------------------------------------------- explain traces


@dataclass
class ObservationTrace:
    """What happened to one OBX or Observation (``mappings explain``)."""

    ref: str
    position: str  # "segment 9" / "entry 17"
    system: str
    code: str
    display: str
    raw_value: str = ""
    raw_unit: str = ""
    status: str = ""
    outcome: str = ""  # used | flagged | withdrawn | unused | error
    reason: str = ""
    feature: str = ""
    concept: str = ""
    rule: str = ""  # "features.creatinine.codes[0] (mapping.yaml:31)"
    via: str = ""  # "local-codes.csv:3"
    conversion: str = ""  # "÷ 88.4"
    value: float | None = None
    unit: str = ""
    effective: datetime | None = None
    time_source: str = ""  # "OBR-7", "effectiveDateTime"


@dataclass
class PatientTrace:
    patient_id: str
    id_source: str = ""
    sex: str | None = None
    sex_source: str = ""
    birth_date: date | None = None
    birth_source: str = ""


@dataclass
class Trace:
    """Everything explain shows; ``problems`` are what would make the message AE."""

    observations: list[ObservationTrace] = field(default_factory=list)
    patients: list[PatientTrace] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # FHIR resources not read, by type

    def observation(self, ref: str) -> ObservationTrace | None:
        return next((o for o in self.observations if o.ref == ref), None)


# --------------------------------------------------------------------------- compiled rules


@dataclass(frozen=True, slots=True)
class Conversion:
    rule: UnitRule
    label: str  # the unit as the mapping spells it
    rank: int  # 1 for accept_as


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A parsed HL7v2 path such as ``ZPI-2`` or ``PID-3(2).1``."""

    text: str
    segment: str
    field: int
    rep: int
    component: int
    sub: int | None

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        match = _PATH.match(text)
        if match is None:
            raise ValueError(f"not an HL7 path: {text!r}")
        seg, fld, rep, comp, sub = match.groups()
        return cls(text, seg, int(fld), int(rep or 1), int(comp or 1), int(sub) if sub else None)

    def read(self, segment: Segment | None) -> str:
        if segment is None:
            return ""
        return segment.component(self.field, self.component, self.rep, self.sub).strip()


class FactRules:
    """A site mapping compiled into lookup tables for the hot path."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self.tz = mapping.tz
        table = code_table(mapping, mapping.locator or Locator(None))
        self.codes: dict[tuple[str, str], CodeRule] = table.rules
        self.dead_ends: dict[tuple[str, str], CodeMapEntry] = table.dead_ends
        self.units: dict[str, dict[str, Conversion]] = {
            feature: {
                normalise_unit(u): Conversion(r, u, 1 if r.accept_as else 0)
                for u, r in rule.units.items()
            }
            for feature, rule in mapping.features.items()
        }
        self.plausible = {feature: mapping.plausible(feature) for feature in mapping.features}
        self.reject_comparators = frozenset(
            f for f in mapping.features if mapping.comparators(f) == "reject"
        )
        self.statuses = frozenset(mapping.values.statuses)
        self.withdraw = frozenset(mapping.values.withdraw)
        self.future_tolerance = mapping.values.future_tolerance
        self.earliest_date = mapping.values.earliest_date
        hl7 = mapping.hl7v2
        self.sex = _paths(hl7.sex)
        self.sex_values = {k.strip().upper(): v for k, v in hl7.sex.values.items()}
        self.birth_date = _paths(hl7.birth_date)
        self.birth_values = hl7.birth_date.values
        self.observation_time = tuple(FieldPath.parse(p) for p in hl7.observation_time)
        debounce = mapping.triggers.debounce
        self.debounce = None if debounce == "day" else FieldPath.parse(debounce)

    def feature_of(self, system: str, code: str) -> str | None:
        rule = self.codes.get((normalise_system(system), code))
        return rule.feature if rule else None

    def rule_for(self, system: str, code: str) -> CodeRule | None:
        return self.codes.get((normalise_system(system), code))

    def unmapped_reason(self, system: str, code: str) -> str:
        entry = self.dead_ends.get((normalise_system(system), code))
        if entry is None:
            return UNMAPPED
        return f"code maps to {entry.target} ({entry.where}), which no feature takes"


_MSH_7 = FieldPath.parse("MSH-7")  # message date/time


def _paths(source: FieldSource) -> tuple[FieldPath, ...]:
    return tuple(FieldPath.parse(p) for p in source.paths)


# --------------------------------------------------------------------------- shared value steps


def read_number(text: str) -> tuple[str, float] | None:
    """(comparator, number) of ``<5``, ``>=90``, ``4.5``; None when not a number."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    comparator = match.group(1) or ""
    number = float(match.group(2))
    if not math.isfinite(number):  # 400 digits: inf, which no unit converts and JSON cannot hold
        return None
    return ("" if comparator == "=" else comparator), number


def conversion_for(rules: FactRules, feature: str, raw_unit: str) -> Conversion | None:
    return rules.units[feature].get(normalise_unit(raw_unit))


def plausibility_flag(rules: FactRules, feature: str, value: float) -> str:
    low, high = rules.plausible[feature]
    if low <= value <= high:
        return ""
    unit = CANONICAL_UNITS[feature]
    return f"{IMPLAUSIBLE}: {value:.6g} {unit} is outside {low:g}–{high:g} {unit}"


def time_problem(
    rules: FactRules, moment: datetime, received_at: datetime
) -> tuple[str, str] | None:
    """(reason suffix, clause) when a result time cannot be true, else None.

    Never names the time itself: reasons and details are logged and carry no PHI.
    """
    if moment > received_at + rules.future_tolerance:
        tolerance = rules.future_tolerance.total_seconds()
        return "future_dated", (
            f"is later than the message's receipt by more than {tolerance:g} s "
            "(mapping.values.future_tolerance_s)"
        )
    if moment.astimezone(rules.tz).date() < rules.earliest_date:
        return "implausible_date", (
            f"is before {rules.earliest_date.isoformat()} (mapping.values.earliest_date)"
        )
    return None


def before_birth(rules: FactRules, facts: list[Fact], birth: date | None) -> Fact | None:
    """The first fact timed before the patient's birth date (a specimen cannot be)."""
    if birth is None:
        return None
    return next((f for f in facts if f.effective.astimezone(rules.tz).date() < birth), None)


@dataclass(slots=True)
class Hit:
    """A result whose code maps to a feature: what the value steps work on."""

    ref: str
    rule: CodeRule
    system: str
    code: str
    display: str
    status: str
    patient: PatientExtract
    note: ObservationTrace | None = None

    def noted(self) -> None:
        """Tell explain which rules consumed the result."""
        note, rule = self.note, self.rule
        if note is not None:
            note.feature, note.concept, note.via = rule.feature, rule.concept, rule.via
            note.rule = f"{rule.rule} ({rule.rule_place})" if rule.rule_place else rule.rule
            if (note.system, note.code) != (self.system, self.code):
                alternate = f"the alternate coding {self.system}|{self.code}"
                note.via = f"{alternate}, {note.via}" if note.via else alternate

    def unused(self, reason: str, value: str = "") -> None:
        self.patient.unused.append(
            Unused(self.ref, self.system, self.code, reason, self.display, value)
        )
        if self.note is not None:
            self.note.outcome, self.note.reason = "unused", reason

    def keep(self, fact: Fact, conversion: str, time_source: str = "") -> None:
        self.patient.facts.append(fact)
        note = self.note
        if note is None:
            return
        note.feature, note.concept, note.value, note.unit = (
            fact.feature,
            fact.concept,
            fact.value,
            fact.unit,
        )
        note.effective, note.conversion, note.time_source = fact.effective, conversion, time_source
        if fact.withdraws:
            note.outcome, note.reason = "withdrawn", fact.flag
        elif fact.flag:
            note.outcome, note.reason = "flagged", fact.flag
        else:
            note.outcome = "used"


def withdrawal(hit: Hit, effective: datetime, source_id: str, episode: str) -> Fact:
    """A marker fact: the result with this code and time is withdrawn (OBX-11 D/W)."""
    return Fact(
        feature=hit.rule.feature,
        value=0.0,
        unit=CANONICAL_UNITS[hit.rule.feature],
        effective=effective,
        ref=hit.ref,
        source_id=source_id,
        system=hit.system,
        code=hit.code,
        display=hit.display,
        status=hit.status,
        concept=hit.rule.concept,
        flag=f"{WITHDRAWN}: status {hit.status} withdraws the result of {effective.isoformat()}",
        episode=episode,
    )


# --------------------------------------------------------------------------- HL7v2


def extract(
    message: Message,
    rules: FactRules,
    trace: Trace | None = None,
    *,
    received_at: datetime | None = None,
) -> Extraction:
    """Facts and demographics of every patient in an ORU^R01 or ADT message.

    ``received_at`` is when ehrbridge received the message (the envelope's
    ``received_at``, which travels with the record, so a replay judges it
    as it was judged at receipt); result times are checked against it.
    Default: now.
    """
    msg_type, trigger, _ = message.message_type
    kind = _classify(msg_type, trigger)
    walker = _Walker(message, rules, kind == "ORU", trace, received_at or utcnow())
    for segment in message.segments:
        walker.visit(segment)
    patients = walker.finish()
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


class _Walker:
    """One pass over the segments: patients, their groups, and OBX → facts."""

    def __init__(
        self,
        message: Message,
        rules: FactRules,
        results: bool,
        trace: Trace | None,
        received_at: datetime,
    ):
        self.message = message
        self.control_id = message.control_id  # MSH-10: names every fact's source
        self.rules = rules
        self.results = results  # ORU: read OBX; ADT: demographics only
        self.trace = trace
        self.received_at = received_at
        self.sent_at = _message_time(message, rules, received_at)
        self.patients: list[PatientExtract] = []
        self.group: dict[str, Segment] = {}  # latest segment of each name in the patient group
        self.obr: Segment | None = None
        self.obx_count = 0

    def visit(self, segment: Segment) -> None:
        name = segment.name
        if name == "PID":
            self._close_group()
            self.group = {"PID": segment}
            self.patients.append(self._patient(segment))
            return
        self.group[name] = segment
        if not self.results:
            return
        if name == "OBR":
            self.obr = segment
        elif name == "OBX":
            self.obx_count += 1
            if not self.patients:
                self._fail(
                    MessageUnusable(
                        "OBX before any PID segment",
                        reason="hl7.missing_pid",
                        location=Hl7Location("OBX", self.obx_count),
                        hl7_error_code=100,
                    )
                )
                return
            self._observe_safely(segment, self.patients[-1])

    def finish(self) -> list[PatientExtract]:
        self._close_group()
        return self.patients

    def _fail(self, error: MessageUnusable) -> None:
        """Strict mode raises; explain mode records the problem and walks on."""
        if self.trace is None:
            raise error
        self.trace.problems.append(f"{error.reason}: {error.detail} ({error.location})")

    # -- patients ---------------------------------------------------------------

    def _patient(self, pid: Segment) -> PatientExtract:
        try:
            patient_id, source = _patient_id(pid, self.rules)
        except MessageUnusable as error:
            self._fail(error)
            patient_id, source = "(no patient id)", "no PID-3 repetition matches; see below"
        if self.trace is not None:
            self.trace.patients.append(PatientTrace(patient_id, source))
        return PatientExtract(patient_id, Demographics(None, None, self.sent_at))

    def _close_group(self) -> None:
        """Demographics are read once the patient's group (PID .. next PID) is complete."""
        if not self.patients or "PID" not in self.group:
            return
        patient = self.patients[-1]
        sex, sex_source = self._first(self.rules.sex)
        sex = self.rules.sex_values.get(sex.upper(), sex.upper()) if sex else ""
        birth_text, birth_source = self._first(self.rules.birth_date)
        birth_text = self.rules.birth_values.get(birth_text, birth_text)
        try:
            birth = _birth_date(birth_text, birth_source)
        except MessageUnusable as error:
            self._fail(error)
            birth = None
        name = _pid_name(self.group["PID"])
        patient.demographics = Demographics(birth, sex or None, self.sent_at, name)
        self._check_birth(patient, birth_source)
        if self.trace is not None:
            note = self.trace.patients[len(self.patients) - 1]
            note.sex, note.sex_source = sex or None, sex_source
            note.birth_date, note.birth_source = birth, birth_source

    def _check_birth(self, patient: PatientExtract, birth_source: str) -> None:
        early = before_birth(self.rules, patient.facts, patient.demographics.birth_date)
        if early is None:
            return
        sequence = int(early.ref.rsplit("/", 1)[-1])
        self._fail(
            MessageUnusable(
                f"OBX {sequence} ({early.feature}) is timed before the patient's birth date "
                f"({birth_source})",
                reason="obx.before_birth_date",
                location=Hl7Location("OBX", sequence),
                hl7_error_code=102,
            )
        )

    def _first(self, paths: tuple[FieldPath, ...]) -> tuple[str, str]:
        """The first non-empty value among ``paths`` in this patient's group, and its path."""
        for path in paths:
            segment = self.message.msh if path.segment == "MSH" else self.group.get(path.segment)
            value = path.read(segment)
            if value:
                return value, path.text
        return "", ""

    # -- results ----------------------------------------------------------------

    def _observe_safely(self, obx: Segment, patient: PatientExtract) -> None:
        note = None
        try:  # explain's note reads OBX-5 too, which may be over a cap
            note = self._note(obx) if self.trace is not None else None
            self._observe(obx, patient, note)
        except MessageUnusable as error:
            if note is not None:
                note.outcome, note.reason = "error", f"{error.reason}: {error.detail}"
            self._fail(error)

    def _note(self, obx: Segment) -> ObservationTrace:
        assert self.trace is not None
        note = ObservationTrace(
            ref=f"{self.control_id}/OBX/{self.obx_count}",
            position=f"segment {obx.index + 1}",
            system=obx.component(3, 3),
            code=obx.component(3, 1),
            display=obx.component(3, 2),
            raw_value=obx.value(5),
            raw_unit=obx.component(6, 1) or obx.component(6, 2),
            status=obx.value(11).strip().upper(),
        )
        self.trace.observations.append(note)
        return note

    def _match(self, obx: Segment) -> tuple[tuple[str, str, str], CodeRule | None]:
        """The OBX-3 coding that maps (first, then the alternates), and its rule.

        OBX-3 is split once: this runs for every OBX of every message.
        """
        parts = obx.components(3)
        raw = obx.field(3)
        if obx.encoding.escape in raw or len(raw) > MAX_VALUE_CHARS:  # decoded, within the caps
            parts = [obx.decode(3, p) for p in parts]
        parts += [""] * (12 - len(parts))
        rules = self.rules.codes
        for code_at, text_at, system_at in _CODINGS:
            code = parts[code_at - 1]
            if not code:
                continue
            system = parts[system_at - 1]
            rule = rules.get((normalise_system(system), code))
            if rule is not None:
                return (system, code, parts[text_at - 1]), rule
        return (parts[2], parts[0], parts[1]), None

    def _observe(
        self, obx: Segment, patient: PatientExtract, note: ObservationTrace | None
    ) -> None:
        ref = f"{self.control_id}/OBX/{self.obx_count}"
        (system, code, display), rule = self._match(obx)
        if rule is None:
            reason = self.rules.unmapped_reason(system, code)
            if note is None:  # the hot path: nobody looks at an unmapped value here
                patient.unused.append(Unused(ref, system, code, reason, display))
                return
            unit = obx.component(6, 1) or obx.component(6, 2)
            patient.unused.append(Unused(ref, system, code, reason, display, obx.value(5), unit))
            note.outcome, note.reason = "unused", reason
            return
        status = obx.value(11).strip().upper()  # OBX-11 observation result status
        hit = Hit(ref, rule, system, code, display, status, patient, note)
        hit.noted()
        if not status:  # required (R) in every version; without it a value cannot be trusted
            raise MessageUnusable(
                f"{obx_label(obx, self.obx_count)} ({rule.feature}) has no result status (OBX-11)",
                reason="hl7.missing_status",
                location=Hl7Location("OBX", self.obx_count, field=11),
                hl7_error_code=101,
            )
        if status in self.rules.withdraw:
            effective, _ = self._effective(obx)
            hit.keep(withdrawal(hit, effective, self.control_id, self._episode()), "")
        elif status not in self.rules.statuses:
            hit.unused(f"result status {status} not used", obx.value(5))
        else:
            self._fact(obx, hit)

    def _fact(self, obx: Segment, hit: Hit) -> None:
        feature = hit.rule.feature
        raw_value, comparator, number = _read_value(obx, self.obx_count, feature)
        if comparator and feature in self.rules.reject_comparators:
            hit.unused("comparator rejected by value policy", raw_value)
            return
        raw_unit = obx.component(6, 1) or obx.component(6, 2)  # OBX-6 units (CE.1, else CE.2)
        conversion = conversion_for(self.rules, feature, raw_unit)
        if conversion is None:
            raise MessageUnusable(
                f"{obx_label(obx, self.obx_count)} ({feature}) has unit {raw_unit or '(none)'!r}, "
                f"which the site mapping does not convert",
                reason="mapping.unknown_unit",
                location=Hl7Location("OBX", self.obx_count, field=6),
                hl7_error_code=103,
            )
        value = conversion.rule.convert(number)
        effective, time_source = self._effective(obx)
        fact = Fact(
            feature=feature,
            value=value,
            unit=CANONICAL_UNITS[feature],
            effective=effective,
            ref=hit.ref,
            source_id=self.control_id,
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
            episode=self._episode(),
        )
        hit.keep(fact, conversion.rule.describe(), time_source)

    def _episode(self) -> str:
        path = self.rules.debounce
        if path is None:
            return ""
        segment = self.obr if path.segment == "OBR" else self.group.get(path.segment)
        return path.read(segment)

    def _effective(self, obx: Segment) -> tuple[datetime, str]:
        """The first observation-time path that holds a time (default OBX-14, then OBR-7)."""
        for path in self.rules.observation_time:
            segment = obx if path.segment == "OBX" else self.obr
            moment = _optional_time(segment, path, self.rules, self.obx_count)
            if moment is not None:
                self._check_time(moment, path)
                return moment, path.text
        last = self.rules.observation_time[-1]
        raise MessageUnusable(
            f"{obx_label(obx, self.obx_count)} has no observation time "
            f"({' and '.join(p.text for p in self.rules.observation_time)} are empty)",
            reason="hl7.missing_time",
            location=Hl7Location(last.segment, field=last.field),
            hl7_error_code=101,
        )

    def _check_time(self, moment: datetime, path: FieldPath) -> None:
        problem = time_problem(self.rules, moment, self.received_at)
        if problem is None:
            return
        suffix, clause = problem
        raise MessageUnusable(
            f"OBX {self.obx_count}: its observation time ({path.text}) {clause}",
            reason=f"obx.{suffix}",
            location=Hl7Location(
                path.segment, self.obx_count if path.segment == "OBX" else 1, field=path.field
            ),
            hl7_error_code=102,  # table 0357: data type error, the value cannot be right
        )


def obx_label(obx: Segment, sequence: int) -> str:
    """How a message names an OBX to a person: by its set id (OBX-1), as the sender wrote it.

    ``sequence`` (the OBX's position among the message's OBX segments) is what
    ERR-2 and ``derivedFrom`` use; it differs from OBX-1 when the set id restarts
    per OBR group, so it is shown only when OBX-1 is empty.
    """
    set_id = obx.value(1).strip()
    return f"OBX set id {set_id}" if set_id else f"OBX (no set id, OBX #{sequence} in the message)"


def _read_value(obx: Segment, sequence: int, feature: str) -> tuple[str, str, float]:
    """OBX-5 as (raw text, comparator, number), for NM, SN and text-typed values."""
    value_type = obx.value(2).strip().upper()  # OBX-2 value type
    if value_type == "SN":  # SN: comparator ^ num1 [^ separator ^ num2]
        raw = obx.value(5)
        text = obx.component(5, 1) + obx.component(5, 2)
        if obx.component(5, 3):  # a range or ratio is not a single number
            text = raw
    else:
        raw = text = obx.value(5)
    parsed = read_number(text)
    if parsed is None:
        raise MessageUnusable(
            f"{obx_label(obx, sequence)} ({feature}) value is not a number",
            reason="hl7.bad_number",
            location=Hl7Location("OBX", sequence, field=5),
            hl7_error_code=102,
        )
    return raw, parsed[0], parsed[1]


def _patient_id(pid: Segment, rules: FactRules) -> tuple[str, str]:
    """The patient id from PID-3 by the site's rule, and which repetition gave it.

    PID-3 (CX, repeating) is split once: a sender may repeat it thousands of times.
    """
    rule = rules.mapping.patient
    identifiers = pid.repetition_components(3)
    if rule.assigning_authority is None and rule.type_code is None:
        candidates = [rule.repetition] if rule.repetition <= len(identifiers) else []
    else:
        candidates = [
            i
            for i, cx in enumerate(identifiers, 1)
            if _cx_matches(pid, cx, rule.assigning_authority, rule.type_code)
        ]
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
    for rep in candidates:
        value = pid.decode(3, _nth(identifiers[rep - 1], 1)).strip()  # CX.1 id number
        if value:
            return value, f"PID-3({rep}), {wanted}"
    raise MessageUnusable(
        f"PID-3 has no identifier with {wanted}",
        reason="hl7.missing_patient_id",
        location=Hl7Location("PID", field=3),
        hl7_error_code=101,
    )


def _cx_matches(pid: Segment, cx: list[str], authority: str | None, type_code: str | None) -> bool:
    """Whether one PID-3 repetition (raw components) has the authority and type wanted."""
    # CX.4 assigning authority is an HD: namespace id (.1) & universal id (.2).
    if authority is not None:
        hd = _nth(cx, 4).split(pid.encoding.subcomponent, 2)
        if authority not in (pid.decode(3, _nth(hd, 1)), pid.decode(3, _nth(hd, 2))):
            return False
    return type_code is None or pid.decode(3, _nth(cx, 5)) == type_code  # CX.5 type code


def _nth(parts: list[str], n: int) -> str:
    """The n-th (1-based) of split parts, '' if absent."""
    return parts[n - 1] if n <= len(parts) else ""


def _message_time(message: Message, rules: FactRules, received_at: datetime) -> datetime | None:
    """MSH-7, used only to order demographic updates, so a malformed one is not fatal.

    Senders often append milliseconds without the dot (``20110613122406637``).
    One in the future is ignored too: it would make every later demographic
    update look older than it, and so be refused.
    """
    try:
        sent = _optional_time(message.msh, _MSH_7, rules, 1)
    except MessageUnusable:
        return None
    if sent is not None and time_problem(rules, sent, received_at) is not None:
        return None
    return sent


def _pid_name(pid: Segment) -> PersonName | None:
    """PID-5's first repetition (XPN): .1.1 surname (FN.1), .2 given name, .3 further given."""
    return person_name(pid.component(5, 1, sub=1), pid.component(5, 2), pid.component(5, 3))


def _birth_date(text: str, source: str) -> date | None:
    if not text or (text.isdigit() and len(text) in (4, 6)):
        return None  # absent, or only year (month) precision: too coarse for an age
    try:
        return parse_date(text)
    except Hl7TimeError as exc:
        path = FieldPath.parse(source)
        raise MessageUnusable(
            f"{source} birth date is not an HL7 date",
            reason="hl7.bad_birth_date",
            location=Hl7Location(path.segment, field=path.field),
            hl7_error_code=102,
        ) from exc


def _optional_time(
    segment: Segment | None, path: FieldPath, rules: FactRules, sequence: int
) -> datetime | None:
    if segment is None:
        return None
    text = segment.component(path.field, path.component, path.rep)  # TS.1 / DTM
    if not text.strip():
        return None
    try:
        return parse_dtm(text, rules.tz)
    except Hl7TimeError as exc:
        raise MessageUnusable(
            f"{segment.name}-{path.field} is not an HL7 date/time",
            reason="hl7.bad_time",
            location=Hl7Location(
                segment.name, sequence if segment.name == "OBX" else 1, field=path.field
            ),
            hl7_error_code=102,
        ) from exc
