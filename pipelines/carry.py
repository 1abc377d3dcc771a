"""Ingest's fact extraction, carried on the ``raw`` record so processing need not redo it.

Ingest parses every HL7v2 message and extracts its facts to choose AA or AE;
the processing stage used to parse and extract the same bytes again (about
0.45 ms of CPU per message, the largest single step of that stage). Ingest
now stores its extraction beside the bytes, in the :data:`HEADER` header, and
processing decodes it instead (tens of microseconds).

The record's value stays the inbound bytes exactly as received: dead letters,
replays, the message index and the console's trace all read those. The
carried value is only ever a shortcut. Processing uses it when all of these
hold, and otherwise extracts from the bytes as before, never failing:

* **the fingerprint matches**: a digest of everything that governs
  extraction -- the validated mapping's whole content (codes, code maps with
  their CSV/ConceptMap rows, units and factors, plausible ranges, value
  policy, patient identifier rule, HL7v2 field paths, time zone, debounce),
  the site's default charset, and :data:`SCHEMA`. It is derived from the
  content, not from ``mapping.version``, so a mapping fix replayed without a
  version bump still re-extracts;
* **the binding matches**: a digest of the record's bytes, key and
  ``received_at``, so a value can never be read for other bytes, another
  patient's copy, or another receipt time (result times were judged against
  ``received_at`` at ingest, and the carried facts hold that judgement);
* **it decodes**: the schema number is known and the layout is whole.

Ingest carries it only for messages it checks on its event loop (up to
``OFF_LOOP_BYTES``, 16 KiB): encoding runs on the loop, and a large message
carried could outgrow a log's record limit that its bytes alone fit.
Only the part owned by the record's key is carried (a message about several
patients is stored once per patient: :meth:`Extraction.owned_by`). FHIR
records are not carried (their ingest check is a different, lighter walk);
processing extracts them as before.

The carried value is PHI, as the bytes beside it are: it is never logged,
processing drops it before anything it emits (predictions, dead letters,
retries), and the operator API does not show it.

Layout (orjson, positional arrays, ``[SCHEMA, fingerprint, binding,
control_id, message_type, patients]``; a patient ``[id, birth_date, sex,
as_of, name, facts, unused]``; a fact its fields in :class:`Fact` order, its
time as ``[ISO 8601, local]`` where ``local`` says the time carried no
offset and is in the mapping's zone, so it gets the same ``tzinfo`` back).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import astuple, replace
from datetime import date, datetime
from typing import Any

import orjson

from ehrbridge.core.contracts import Envelope
from ehrbridge.mappings.schema import Mapping
from ehrbridge.pipelines.facts import (
    Demographics,
    Extraction,
    Fact,
    FactRules,
    PatientExtract,
    PersonName,
    Unused,
)

HEADER = "ingest.extraction"
# Bump when pipelines/facts.py (or er7.py, hl7time.py, mappings/units.py) can give
# another extraction for the same bytes and mapping, or when the layout changes:
# records carried by older code then re-extract.
SCHEMA = 1


def fingerprint(mapping: Mapping, charset: str) -> str:
    """A digest of everything that governs extraction (see the module docstring)."""
    content = {
        "schema": SCHEMA,
        "charset": charset.lower(),
        "mapping": mapping.model_dump(mode="json"),
        "code_map": [astuple(entry) for entry in mapping.code_map],
    }
    encoded = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(encoded, digest_size=12).hexdigest()


def binding(payload: bytes, key: str, received_at: datetime) -> str:
    """Ties a carried value to one record: its bytes, its key, its receipt time."""
    digest = hashlib.blake2b(payload, digest_size=8)
    digest.update(f"\x00{key}\x00{received_at.isoformat()}".encode())
    return digest.hexdigest()


class Carry:
    """Encodes a site's extractions for ``raw`` records and reads them back."""

    def __init__(self, rules: FactRules, charset: str) -> None:
        self.tz = rules.tz
        self.fingerprint = fingerprint(rules.mapping, charset)
        self.reused = 0  # records whose carried value was used, for the bench and tests
        self.extracted = 0  # HL7v2 records extracted from the bytes

    # -- ingest -----------------------------------------------------------------

    def header(self, envelope: Envelope, key: str, extraction: Extraction) -> dict[str, str]:
        """The header carrying ``extraction``'s part for the copy keyed ``key`` ({} if none)."""
        mine = extraction.owned_by(key)
        patients = [self._patient(p) for p in mine.patients]
        if any(p is None for p in patients):
            return {}  # a value JSON cannot hold exactly: processing extracts instead
        bound = binding(envelope.payload, key, envelope.received_at)
        body = [SCHEMA, self.fingerprint, bound, mine.control_id, mine.message_type, patients]
        return {HEADER: orjson.dumps(body).decode()}

    def _patient(self, patient: PatientExtract) -> list[Any] | None:
        facts = [self._fact(f) for f in patient.facts]
        if any(not math.isfinite(f.value) for f in patient.facts):
            return None  # orjson would write null for inf
        d = patient.demographics
        name = d.name.to_json() if d.name is not None else None
        as_of = self._time(d.as_of) if d.as_of is not None else None
        unused = [
            (u.ref, u.system, u.code, u.reason, u.display, u.value, u.unit) for u in patient.unused
        ]
        return [patient.patient_id, d.birth_date, d.sex, as_of, name, facts, unused]

    def _fact(self, f: Fact) -> tuple[Any, ...]:
        return (f.feature, f.value, f.unit, self._time(f.effective), f.ref, f.source_id,
                f.system, f.code, f.display, f.comparator, f.raw_value, f.raw_unit, f.status,
                f.concept, f.flag, f.rank, f.episode)  # fmt: skip

    def _time(self, moment: datetime) -> tuple[datetime, bool]:
        return moment, moment.tzinfo is self.tz

    # -- processing ---------------------------------------------------------------

    def reuse(self, envelope: Envelope) -> Extraction | None:
        """The carried extraction if it is this record's under today's rules, else None."""
        text = envelope.headers.get(HEADER)
        if text is None:
            return None
        try:
            body = orjson.loads(text)
            if body[0] != SCHEMA or body[1] != self.fingerprint:
                return None
            if body[2] != binding(envelope.payload, envelope.key, envelope.received_at):
                return None
            extraction = self._extraction(body)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            return None  # undecodable: extracting from the bytes is always possible
        self.reused += 1
        return extraction

    def _extraction(self, body: list[Any]) -> Extraction:
        _, _, _, control_id, message_type, patients = body
        if not isinstance(control_id, str) or not isinstance(message_type, str):
            raise TypeError("carried extraction: control id and type are text")
        return Extraction(control_id, message_type, [self._read_patient(p) for p in patients])

    def _read_patient(self, data: list[Any]) -> PatientExtract:
        patient_id, birth, sex, as_of, name, facts, unused = data
        if not isinstance(patient_id, str):
            raise TypeError("carried extraction: patient id is text")
        demographics = Demographics(
            date.fromisoformat(birth) if birth is not None else None,
            sex,
            self._read_time(as_of) if as_of is not None else None,
            PersonName.from_json(name),
        )
        return PatientExtract(
            patient_id,
            demographics,
            [self._read_fact(f) for f in facts],
            [Unused(*u) for u in unused],
        )

    def _read_fact(self, f: list[Any]) -> Fact:
        if len(f) != 17 or type(f[1]) is not float:
            raise TypeError("carried extraction: a fact has 17 fields and a float value")
        return Fact(f[0], f[1], f[2], self._read_time(f[3]), *f[4:])

    def _read_time(self, data: list[Any]) -> datetime:
        text, local = data
        moment = datetime.fromisoformat(text)
        # Local: parsed in the mapping's zone, which keeps its DST rules (a fixed offset would not).
        return moment.replace(tzinfo=self.tz) if local else moment


def without_carried(envelope: Envelope) -> Envelope:
    """The envelope without the carried value: nothing downstream of processing needs it."""
    if HEADER not in envelope.headers:
        return envelope
    headers = {k: v for k, v in envelope.headers.items() if k != HEADER}
    return replace(envelope, headers=headers)
