"""The durable log between stages, and how envelopes travel on it.

Topic design (names are prefixed by site, ``<site>.<topic>``)::

    MLLP / FHIR ingest ──▶ raw ──▶ [process: parse → facts → features → model] ──▶ predictions
                                        │                                              │
                                        └──▶ retry (delayed) ◀── [write-back] ◀────────┘
                                        └──▶ dlq ◀──────────────────┘

* ``raw``: the inbound message bytes exactly as received. The ingest ACK is
  given once the log has them. Keyed by patient id, so one patient's messages
  stay in order on one partition (a message about several patients is
  stored once per patient; the processing stage reads each copy for its key's
  patient only).
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

Delivery is at-least-once, and why there are no Kafka transactions
-----------------------------------------------------------------
Every producer waits for the broker (``acks=all``, idempotent producer) and a
consumer commits its input offsets only after its outputs were appended, so a
crash or a rebalance can only repeat work, never lose it. Repeated work is
harmless by construction: merging facts into patient state is idempotent
(``pipelines/state.py``), and a prediction's Observation identifier is
derived from its inputs, so write-back's conditional update turns a repeat
into the same resource (effectively once in the EHR).

Transactions (a transactional producer with ``send_offsets_to_transaction``
and ``read_committed`` consumers) would make the Kafka-to-Kafka hop exactly
once, and kafka-python 3.0.12 does have them. They are not used because:

* the two ends that matter lie outside Kafka -- the MLLP ACK to the sender,
  and the write to the EHR -- and no Kafka transaction reaches them; the
  idempotent merge and the deterministic identifiers are needed regardless,
  and once they exist a duplicate on ``predictions`` costs one repeated
  conditional update;
* each batch would pay a transaction commit (partition registration,
  offset registration, end-transaction markers on every partition touched):
  on the single-node test broker a transactional batch of 50 records took
  about 4x as long as the same batch from the idempotent producer;
* ``read_committed`` consumers wait for open transactions, so one slow batch
  stalls the next stage, and each partition owner needs its own fenced
  ``transactional.id``, which complicates rebalances;
* a cluster must also run the transaction coordinator durably
  (``transaction.state.log.replication.factor``), one more thing for a
  hospital's Kafka team to operate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from ehrbridge.core.contracts import Envelope, Failure, envelope_from_headers, header_map
from ehrbridge.core.errors import EhrbridgeError, MessageRejected, RemoteRejected

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

    def unready(self, topic: str) -> str | None:
        """Why the log cannot serve ``topic`` now, or None: a cheap probe for readiness."""
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
    return to_record(failure.envelope, topic, failure_headers(failure.error, failure.stage))


def unreadable_dead_letter(record: Record, topic: str, exc: Exception, stage: str) -> Record:
    """The DLQ form of a record whose provenance headers are broken: kept as it came."""
    error = MessageRejected(f"record headers unreadable: {exc!r}", reason="record.headers")
    headers = {**record.headers, **failure_headers(error, stage)}
    return Record(topic=topic, key=record.key, value=record.value, headers=headers)


def failure_headers(error: EhrbridgeError, stage: str) -> dict[str, str]:
    """What a failed record says about its failure, dead or parked on a retry tier.

    The one place these headers are written, so every dead letter names its
    stage and time (``error.stage``, ``error.at``) whichever path put it there.
    """
    headers = {
        "error.reason": error.reason,
        "error.detail": error.detail,
        "error.class": type(error).__name__,
        "error.stage": stage,
        "error.at": datetime.now(UTC).isoformat(),
    }
    if isinstance(error, RemoteRejected) and error.body:
        # The remote's own answer (a FHIR OperationOutcome) names the offending element.
        headers["error.response"] = error.body.decode("utf-8", errors="replace")
    return headers
