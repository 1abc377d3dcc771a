"""Per-patient state: demographics and the recent facts of each feature.

The state of one patient is one small JSON document, keyed by patient id.
That shape is deliberate: it is a key-value store, so the same documents can
be written to a compacted Kafka changelog and restored from it (issue: Kafka
transport), exactly as Kafka Streams state stores are.

Merging is idempotent, so re-processing a message after a crash changes
nothing: a fact is identified by its ``ref`` (``<MSH-10>/OBX/<n>``), and a
corrected result (OBX-11 ``C``) replaces the earlier result with the same
code and observation time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

import orjson

from ehrbridge.pipelines.facts import Demographics, Fact, PatientExtract, PersonName

MAX_FACTS_PER_FEATURE = 64  # bounds state size; far more than any window needs


@dataclass
class PatientState:
    patient_id: str
    birth_date: date | None = None
    sex: str | None = None
    name: PersonName | None = None  # for the ORU's PID-5 (PHI: never logged)
    demographics_as_of: datetime | None = None
    facts: dict[str, list[Fact]] = field(default_factory=dict)
    last_outcome: dict[str, Any] | None = None  # latest feature record or "not enough data" reason
    # Counts the messages merged. A prediction carries it, so write-back can tell a result
    # retried late from a newer one of the same episode (pipelines/writeback.py).
    revision: int = 0

    def merge(self, extract: PatientExtract) -> list[Fact]:
        """Apply one message's data; return the facts that are new or changed."""
        self._merge_demographics(extract.demographics)
        return [fact for fact in extract.facts if self._merge_fact(fact)]

    def _merge_demographics(self, update: Demographics) -> None:
        newer = (
            self.demographics_as_of is None
            or update.as_of is None
            or update.as_of >= self.demographics_as_of
        )
        if not newer:
            return  # an old ADT replayed late must not undo a newer correction
        if update.birth_date is not None:
            self.birth_date = update.birth_date
        if update.sex:
            self.sex = update.sex
        if update.name is not None:
            self.name = update.name
        if update.as_of is not None:
            self.demographics_as_of = update.as_of

    def _merge_fact(self, fact: Fact) -> bool:
        facts = self.facts.setdefault(fact.feature, [])
        for i, known in enumerate(facts):
            same_result = known.code == fact.code and known.effective == fact.effective
            if known.ref == fact.ref or (same_result and fact.status == "C"):
                if known == fact:
                    return False
                facts[i] = fact
                break
        else:
            facts.append(fact)
        facts.sort(key=lambda f: (f.effective, f.ref))
        del facts[:-MAX_FACTS_PER_FEATURE]
        return True

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "patient_id": self.patient_id,
                "birth_date": self.birth_date.isoformat() if self.birth_date else None,
                "sex": self.sex,
                "name": self.name.to_json() if self.name else None,
                "demographics_as_of": (
                    self.demographics_as_of.isoformat() if self.demographics_as_of else None
                ),
                "facts": {k: [f.to_json() for f in v] for k, v in self.facts.items()},
                "last_outcome": self.last_outcome,
                "revision": self.revision,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> PatientState:
        data = orjson.loads(raw)
        as_of = data.get("demographics_as_of")
        return cls(
            patient_id=data["patient_id"],
            birth_date=date.fromisoformat(data["birth_date"]) if data.get("birth_date") else None,
            sex=data.get("sex"),
            name=PersonName.from_json(data.get("name")),
            demographics_as_of=datetime.fromisoformat(as_of) if as_of else None,
            facts={k: [Fact.from_json(f) for f in v] for k, v in data.get("facts", {}).items()},
            last_outcome=data.get("last_outcome"),
            revision=data.get("revision", 0),
        )


class StateStore(Protocol):
    def get(self, patient_id: str) -> PatientState | None: ...

    def put_many(self, states: Iterable[PatientState]) -> None: ...

    def close(self) -> None: ...
