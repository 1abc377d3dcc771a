"""The contracts every ehrbridge component is written against. Read this first.

A site's data flows through a short chain of components::

    Source ──deliver(Envelope)──▶ Stage(s) ──▶ Sink
      ▲                                          │
      └──────────── ack / nack ◀─────────────────┘

Envelope
    One record plus its provenance: which site, which source message (MSH-10 or
    FHIR id), when ehrbridge first stored it, and how many delivery attempts it
    has had. Payloads are bytes so that the very same record can sit in SQLite
    or in Kafka; ``kind`` says how to read them.

Source
    Something that receives records from outside (an MLLP listener, the FHIR
    HTTP endpoint, a Kafka/embedded-log consumer). For each record it calls
    ``await deliver(envelope)`` and then *acknowledges by the outcome*:

    ==========================  ===============  ============  ==================
    ``deliver`` ...             meaning          MLLP answer   log consumer
    ==========================  ===============  ============  ==================
    returns                     durably stored   AA            commit offset
    raises PermanentError       dead-lettered    AE or AR      commit offset
    raises TransientError       nothing stored   AR (resend)   do not commit
    ==========================  ===============  ============  ==================

    The positive ack (AA, HTTP 2xx, offset commit) is **never** sent before
    ``deliver`` has returned, and ``deliver`` only returns after the record is
    durable (SQLite commit with fsync, or Kafka ``acks=all``). A crash at any
    moment therefore loses nothing that was acknowledged; at worst a record is
    delivered twice, and deterministic result identifiers make that harmless.
    When ``deliver`` raises PermanentError, the raw bytes and reason are already
    in the dead-letter store before the negative ack goes out.

    Over HTTP (FHIR REST, Subscription notifications; ``ehrbridge/fhir_api.py``)
    the same three outcomes are 2xx, 4xx with an OperationOutcome, and 503
    with ``Retry-After``; an id-only notification whose read from the EHR fails
    transiently is a 503 as well, so the EHR sends it again. One sender's
    records are stored in the order sent; a resend is stored again with the
    same bytes; a restarted source keeps everything it acknowledged.

Stage
    A step (parse, map, assemble features, call the model, build a result).
    It takes a batch of envelopes and returns a list of :class:`Outcome` --
    new envelopes, or errors carried *as data* next to the envelope that
    caused them. A stage never acks anything and never talks to the
    dead-letter store itself; the worker routes failures (see
    ``pipelines/retry.py``), so retries and dead letters sit in one place.
    Stages are synchronous: workers run them in their own threads or
    processes, where blocking I/O (the model call) costs no event loop.

Sink
    Something that takes records out of the pipeline (the durable log, the
    EHR's FHIR server, an MLLP peer, the local result store). ``write`` is
    synchronous and returns only once the batch is durable at the
    destination. It raises TransientError (retry later), PermanentError
    (dead-letter the whole batch) or :class:`BatchError` naming the failing
    items when it can tell them apart. In full:

    * a batch of one fails with its item's own error; in a larger batch the
      items a BatchError does not name were written;
    * a later write of a record supersedes an earlier one, also within one
      batch, and writing a record again adds no new identity at the
      destination (a FHIR conditional update, the same MSH-10), so
      at-least-once delivery stays effectively once;
    * transient failures lose nothing: writing the failed items again
      delivers them; an item that cannot be encoded (not a transaction
      Bundle, no MSH-10) is a PermanentError for that item alone;
    * nothing else escapes ``write``: httpx, socket and JSON errors are
      translated, the original kept as ``__cause__``;
    * ``close`` may be called twice; a new sink (a restart) writes on; an
      empty batch sends nothing.

Log
    Between stages, records travel through a durable, partitioned log
    (``pipelines/transport.py``): embedded SQLite or Apache Kafka. Workers
    consume from it and commit offsets only after their outputs are durable.
    One key's records keep their order; a group resumes after its last
    commit; anything not committed (a crash, ``rewind``) comes again.

StateStore
    Per-patient state documents by patient id (the protocol in
    ``pipelines/state.py``): embedded SQLite (``adapters/sqlite_state.py``), or
    per-partition SQLite backed by a compacted Kafka changelog
    (``adapters/kafka_state.py``). ``get`` is None for a patient
    never stored; ``put_many`` returns once the states are stored, the last
    state of a patient in the call winning; putting the same state again
    changes nothing. What was put survives a restart -- for the changelog
    store once the worker has appended ``drain()``, even onto an empty disk.
    A failing disk or broker is UpstreamUnavailable, on reads as on writes.

Model
    The ``Model`` protocol the process stage takes (``pipelines/model.py``); a
    model server client (``adapters/inference_client.py``, Open Inference
    Protocol v2). ``infer(records)`` answers one risk per record and horizon
    in the records' order, in one request, naming the model and version, and
    the same records always give the same risks. 5xx, 429, timeouts and
    connection failures are UpstreamUnavailable; a 4xx, or an answer that is
    not the expected risks (no JSON, a missing output, the wrong row count,
    a value outside 0..1) is RemoteRejected. ``ready()`` never raises.

Every contract has a conformance suite that runs against each of its
implementations: ``tests/conformance/test_<contract>_contract.py``.

In-memory implementations of Source, Sink and StateStore ship in
``ehrbridge.adapters.memory`` for tests and for trying a stage in a notebook.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable

from ehrbridge.core.errors import EhrbridgeError, PermanentError

# The MSH-10 a write-back stage gave an ORU^R01; the MLLP sink matches the ACK's
# MSA-2 against it (HL7 v2.5.1 2.9.2: the ACK echoes the control id it answers).
CONTROL_ID_HEADER = "hl7.control_id"


class Kind(StrEnum):
    """What an envelope's payload is. Also the ``kind`` header on the log."""

    HL7V2 = "hl7v2"  # raw ER7 bytes, exactly as received
    FHIR = "fhir+json"  # a FHIR resource or Bundle, JSON bytes
    PREDICTION = "prediction"  # a prediction record, JSON bytes (pipelines/records.py)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One record in flight, with the provenance needed to trace it back.

    ``key`` partitions the work: it is the patient id once known, else the
    source message id, so that one patient's records stay in order.
    """

    site: str
    source_id: str  # MSH-10 message control id, or the FHIR resource/Bundle id
    payload: bytes
    kind: Kind
    key: str
    received_at: datetime = field(default_factory=utcnow)
    attempt: int = 0  # delivery attempts before this one
    headers: Mapping[str, str] = field(default_factory=dict)

    def retried(self) -> Envelope:
        """The same record, one attempt later."""
        return replace(self, attempt=self.attempt + 1)

    def derive(self, payload: bytes, kind: Kind, key: str | None = None) -> Envelope:
        """A downstream record that keeps this one's provenance."""
        return replace(self, payload=payload, kind=kind, key=key or self.key, attempt=0)

    def describe(self) -> str:
        """A log-safe name for this record: site and control id, never PHI."""
        return f"site={self.site} msg={self.source_id}"


@dataclass(frozen=True, slots=True)
class Failure:
    """An error carried as data, next to the envelope that caused it."""

    envelope: Envelope
    error: EhrbridgeError
    stage: str

    @property
    def permanent(self) -> bool:
        return isinstance(self.error, PermanentError)


Outcome = Envelope | Failure

Deliver = Callable[[Envelope], Awaitable[None]]


@runtime_checkable
class Source(Protocol):
    """Receives records from outside and acks them by ``deliver``'s outcome."""

    name: str

    async def run(self, deliver: Deliver) -> None:
        """Serve until cancelled, calling ``deliver`` once per received record."""
        ...


@runtime_checkable
class Sink(Protocol):
    """Takes records out of the pipeline; ``write`` returns once they are durable."""

    name: str

    def write(self, batch: Sequence[Envelope]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Stage(Protocol):
    """A processing step. Never acks, never dead-letters: it returns outcomes."""

    name: str

    def process(self, batch: Sequence[Envelope]) -> list[Outcome]: ...


class BatchError(EhrbridgeError):
    """A sink wrote part of a batch; ``errors`` maps batch index to its error.

    Items not named succeeded. Wrappers retry or dead-letter only the named ones.
    """

    reason = "batch.partial"

    def __init__(self, errors: Mapping[int, EhrbridgeError]) -> None:
        super().__init__(f"{len(errors)} item(s) of the batch failed")
        self.errors = dict(errors)


def header_map(envelope: Envelope) -> dict[str, str]:
    """Provenance as flat string headers, the form both log transports carry."""
    return {
        **envelope.headers,
        "site": envelope.site,
        "source_id": envelope.source_id,
        "kind": envelope.kind.value,
        "received_at": envelope.received_at.isoformat(),
        "attempt": str(envelope.attempt),
    }


def envelope_from_headers(headers: Mapping[str, str], payload: bytes, key: str) -> Envelope:
    """Inverse of :func:`header_map`: rebuild an envelope read back from a log."""
    extra = {
        k: v
        for k, v in headers.items()
        if k not in {"site", "source_id", "kind", "received_at", "attempt"}
    }
    return Envelope(
        site=headers["site"],
        source_id=headers["source_id"],
        payload=payload,
        kind=Kind(headers["kind"]),
        key=key,
        received_at=datetime.fromisoformat(headers["received_at"]),
        attempt=int(headers.get("attempt", "0")),
        headers=extra,
    )
