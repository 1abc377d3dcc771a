"""The durable log between stages, and how envelopes travel on it.

Topic design (names are prefixed by site, ``<site>.<topic>``)::

    MLLP / FHIR ingest ──▶ raw ──▶ [process: parse → facts → features → model] ──▶ predictions
                                        │                                              │
                                        └──▶ retry (delayed) ◀── [write-back] ◀────────┘
                                        └──▶ dlq ◀──────────────────┘

* ``raw``: the inbound message bytes exactly as received. The ingest ACK is
  given once the log has them. Keyed by patient id, so one patient's messages
  stay in order on one partition.
* ``predictions``: one JSON prediction record per triggered feature record.
* ``retry``: records whose transient failure outlasted the in-place retry
  budget, with a ``not_before`` header; re-delivered after a growing delay.
* ``dlq``: records that failed for good, with the original bytes as value and
  ``error.*`` headers (reason code, detail, stage, time).

Two hops (raw → predictions → EHR) keep the per-record cost at two produces
and two consumes; parsing, mapping, feature assembly and inference share one
stateful stage because they share the per-patient state.

Two implementations sit behind :class:`Log`: ``adapters/sqlite_log.py``
(embedded, one file, single machine) and ``adapters/kafka_log.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from ehrbridge.pipelines.contracts import Envelope, Failure, envelope_from_headers, header_map

TOPICS = ("raw", "predictions", "retry", "dlq")


def topic_name(site: str, topic: str) -> str:
    return f"{site}.{topic}"


@dataclass(frozen=True, slots=True)
class Record:
    """One log record. ``offset`` and ``partition`` are set when read back."""

    topic: str
    key: str
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    partition: int = 0
    offset: int = -1
    timestamp: float = 0.0  # seconds since the epoch, set by the log


class Consumer(Protocol):
    """A member of a consumer group. Positions survive restarts once committed."""

    def poll(self, max_records: int = 500, timeout_s: float = 0.5) -> list[Record]:
        """The next records after this member's position (possibly none)."""
        ...

    def commit(self, records: Sequence[Record]) -> None:
        """Mark these records (and everything before them) done for the group."""
        ...

    def rewind(self, records: Sequence[Record]) -> None:
        """Deliver these records again on the next poll (their work did not finish)."""
        ...

    def close(self) -> None: ...


class Log(Protocol):
    """A durable, ordered, partitioned log of records."""

    def append(self, records: Sequence[Record]) -> None:
        """Store records durably; return only once stored. TransientError if it cannot."""
        ...

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer: ...

    def read(self, topic: str, *, after: int = -1, limit: int = 100) -> list[Record]:
        """Records of a topic in order, without a group (for dlq list/show)."""
        ...

    def close(self) -> None: ...


def to_record(envelope: Envelope, topic: str, extra: Mapping[str, str] | None = None) -> Record:
    headers = header_map(envelope)
    if extra:
        headers.update(extra)
    return Record(topic=topic, key=envelope.key, value=envelope.payload, headers=headers)


def from_record(record: Record) -> Envelope:
    return envelope_from_headers(record.headers, record.value, record.key)


def dead_letter_record(failure: Failure, topic: str) -> Record:
    """The DLQ form of a failure: original bytes, provenance, and the reason."""
    error = failure.error
    return to_record(
        failure.envelope,
        topic,
        {
            "error.reason": error.reason,
            "error.detail": error.detail,
            "error.class": type(error).__name__,
            "error.stage": failure.stage,
            "error.at": datetime.now(UTC).isoformat(),
        },
    )
