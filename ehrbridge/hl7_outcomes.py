"""Outcome events from HL7v2 messages (ADT, DFT, ORU), for ``ehrbridge evaluate --events``.

What each segment says, per HL7 v2.5.1:

- PID-3: the patient, by the site mapping's identifier rule (the same
  function ingest uses); PID-29 patient death date and time: *death*.
- DG1-3 diagnosis code (CWE: code^text^coding system), dated by DG1-5
  diagnosis date/time, else the message time: an *outcome* when the code is
  one of the outcome's (ICD-10 N18.6, Z99.2, ...).
- PR1-3 procedure code (CNE), dated by PR1-5 procedure date/time: likewise
  (CPT 90935 hemodialysis, SNOMED 70536003 kidney transplant, ...).
- OBX-3 in the outcome's lab codes with a numeric OBX-5 and OBX-11 status
  F, C or A, dated by OBX-14, else OBR-7: a *lab* value.
- Every message: a *contact* at EVN-2 / MSH-7.

Times without an offset are read in the mapping's timezone, as ingest reads
them. A message that cannot be read, or names no patient, is counted and
skipped: one bad message must not hide a file of history.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from ehrbridge.core.errors import EhrbridgeError
from ehrbridge.evaluation.outcomes import Event, EventKind, Recogniser, canonical_system
from ehrbridge.pipelines.er7 import Message, Segment

# The identifier rule ingest applies to PID-3; one function, so the ids match predictions'.
from ehrbridge.pipelines.facts import FactRules
from ehrbridge.pipelines.facts import _patient_id as patient_id_of
from ehrbridge.pipelines.hl7time import parse_dtm

_LAB_STATUS = frozenset({"F", "C", "A"})


@dataclass
class Hl7OutcomeReader:
    recogniser: Recogniser
    rules: FactRules
    unreadable: int = 0

    def events(self, messages: list[bytes]) -> Iterator[Event]:
        for raw in messages:
            try:
                yield from self._message(Message.parse(raw))
            except (EhrbridgeError, ValueError, IndexError):
                self.unreadable += 1

    def _message(self, message: Message) -> Iterator[Event]:
        pid = message.segment("PID")
        if pid is None:
            return
        patient, _ = patient_id_of(pid, self.rules)
        sent = self._time(_first(message, "EVN", 2) or _first(message, "MSH", 7))
        if sent is not None:
            yield Event(sent, patient, EventKind.CONTACT)
        if died := self._time(pid.component(29)):
            yield Event(died, patient, EventKind.DEATH)
        for seg, code_field, time_field in (("DG1", 3, 5), ("PR1", 3, 5)):
            for segment in message.all(seg):
                if event := self._coded(segment, code_field, time_field, patient, sent):
                    yield event
        yield from self._labs(message, patient)

    def _coded(
        self, seg: Segment, code_field: int, time_field: int, patient: str, sent: datetime | None
    ) -> Event | None:
        system, code = seg.component(code_field, 3), seg.component(code_field, 1)
        key = (canonical_system(system), code)
        at = self._time(seg.component(time_field)) or sent
        if at is None or key not in self.recogniser.codes:
            return None
        return Event(at, patient, EventKind.OUTCOME, code=f"{key[0]}|{key[1]}")

    def _labs(self, message: Message, patient: str) -> Iterator[Event]:
        obr_time = None
        for seg in message.segments:
            if seg.name == "OBR":
                obr_time = self._time(seg.component(7))
            elif seg.name == "OBX" and (event := self._lab(seg, patient, obr_time)):
                yield event

    def _lab(self, seg: Segment, patient: str, obr_time: datetime | None) -> Event | None:
        key = (canonical_system(seg.component(3, 3)), seg.component(3, 1))
        if key not in self.recogniser.lab_codes or seg.component(11) not in _LAB_STATUS:
            return None
        try:
            value = float(seg.component(5))
        except ValueError:
            return None  # "<15" and text results are not a measured value
        at = self._time(seg.component(14)) or obr_time
        return Event(at, patient, EventKind.LAB, value=value) if at else None

    def _time(self, text: str) -> datetime | None:
        if not text:
            return None
        try:
            return parse_dtm(text, self.rules.tz)
        except (ValueError, EhrbridgeError):
            return None


def _first(message: Message, segment: str, field: int) -> str:
    seg = message.segment(segment)
    return seg.component(field) if seg is not None else ""
