"""Ingest: validate an inbound message and store it durably, or dead-letter it.

This is the ``deliver`` function the MLLP source calls. Validation is cheap
-- the lean reader and fact extraction take tens of microseconds -- and it is
what lets the sender hear *now* that a message is unusable (AE) or
unparseable (AR) rather than find out never. FHIR records get the checks of
``pipelines/fhir_ingest.py``; the FHIR endpoint (``ehrbridge/fhir_api.py``)
runs them itself, because its response needs their details, and then calls
:meth:`Ingest.store` or :meth:`Ingest.dead_letter`.

* usable: appended to ``<site>.raw``, keyed by patient id (once per patient
  when it is about several); returns → AA once every copy is durable.
* unusable/unparseable: appended to ``<site>.dlq`` with its raw bytes and
  the reason, then the PermanentError is re-raised → AE/AR.
* storage failing: TransientError propagates → AR, the sender resends.
* a message type the site filters (``message_types``,
  ``pipelines/message_types.py``): returns → AA, counted, stored nowhere;
  one it rejects: dead-lettered → AR with ERR code 200 or 201.

Transport problems found by the source itself (oversize or truncated frames)
arrive as envelopes with an ``ingest.error`` header and are dead-lettered
the same way.

A bug -- any exception that is not an :class:`EhrbridgeError` -- while
checking a message is dead-lettered with reason ``internal`` and answered AE:
the message waits for the fix and a replay instead of being resent forever.

Checking is linear in the message size; a payload over
:data:`OFF_LOOP_BYTES` is checked in a worker thread so that it cannot hold
up the event loop serving every other connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ehrbridge.config import SiteConfig
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import (
    EhrbridgeError,
    MessageRejected,
    MessageUnusable,
    PermanentError,
    TransientError,
)
from ehrbridge.pipelines.carry import Carry
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import Extraction, FactRules, extract
from ehrbridge.pipelines.fhir_ingest import Checker
from ehrbridge.pipelines.groupcommit import GroupCommitter
from ehrbridge.pipelines.message_types import MessageTypes
from ehrbridge.pipelines.metrics import NO_METRICS, Metrics, ack_outcome
from ehrbridge.pipelines.transport import Record, dead_letter_record, to_record, topic_name

log = logging.getLogger(__name__)
INGEST_ERROR_HEADER = "ingest.error"  # reason code set by a source for framing problems
INGEST_DETAIL_HEADER = "ingest.detail"


@dataclass(frozen=True, slots=True)
class Checked:
    """What :meth:`Ingest.validate` found: the partition keys, and the HL7v2 extraction."""

    keys: Sequence[str]
    extraction: Extraction | None = None  # carried on the raw record (pipelines/carry.py)


FILTERED = Checked(())  # validate's answer for a message the site filters
# Payloads above this are checked off the event loop. Below it the check takes
# under 2 ms (0.1 µs a byte) and a thread hop (0.24 ms) would cost more than
# it saves (measured: README, Guarantees).
OFF_LOOP_BYTES = 16_384


class Ingest:
    stage = "ingest"

    def __init__(
        self, config: SiteConfig, committer: GroupCommitter, metrics: Metrics = NO_METRICS
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.rules = FactRules(config.mapping)
        self.fhir = Checker(self.rules)
        self.carry = Carry(self.rules, config.mllp.charset)
        self.message_types = MessageTypes(config.message_types)
        self.committer = committer
        self.raw_topic = topic_name(config.site, "raw")
        self.dlq_topic = topic_name(config.site, "dlq")

    async def deliver(self, envelope: Envelope) -> None:
        started = time.perf_counter()
        try:
            await self._deliver(envelope)
        except TransientError:
            self.metrics.message(source_of(envelope), "ar")  # nothing stored: resend
            raise
        finally:
            self.metrics.stage_seconds(self.stage, time.perf_counter() - started)

    async def _deliver(self, envelope: Envelope) -> None:
        try:
            checked = await self.checked(envelope)
        except PermanentError as error:
            await self.dead_letter(envelope, error)
            raise
        if checked is FILTERED:
            # Counted by message_types (GET /health, and /metrics reads that count).
            self.metrics.message(source_of(envelope), "filtered")
            log.debug("%s filtered (message_types)", envelope.describe())
            return
        try:
            await self.store(envelope, checked.keys, checked.extraction)
        except EhrbridgeError:
            raise  # TransientError: nothing acknowledged, the sender resends (AR)
        except Exception as exc:  # a bug in storing: kept, reason internal, never a bare AR
            bug = internal_error(envelope, exc)
            await self.dead_letter(envelope, bug)
            raise bug from exc

    async def checked(self, envelope: Envelope) -> Checked:
        """:meth:`validate`, off the loop for large payloads; a bug becomes ``internal``."""
        try:
            if len(envelope.payload) > OFF_LOOP_BYTES:
                return await asyncio.to_thread(self.validate, envelope)
            return self.validate(envelope)
        except EhrbridgeError:
            raise
        except Exception as exc:  # a bug: keep the message for a replay once it is fixed
            raise internal_error(envelope, exc) from exc

    async def store(
        self, envelope: Envelope, keys: Sequence[str], extraction: Extraction | None = None
    ) -> None:
        """Append a checked record to ``<site>.raw``, once per key; return once all are durable.

        Per-patient state lives with the partition of the patient's key, so a
        message about several patients goes to each of their partitions (the
        processing stage reads only that patient's part of each copy).
        ``extraction`` travels beside the bytes for processing to reuse
        (``pipelines/carry.py``); each copy carries its own patient's part.
        """
        records = [self._raw_record(envelope, key, extraction) for key in keys]
        await asyncio.gather(*(self.committer.append(record) for record in records))
        self.metrics.message(source_of(envelope), "aa")
        log.debug("%s stored (%d patient(s))", envelope.describe(), len(records))

    def _raw_record(self, envelope: Envelope, key: str, extraction: Extraction | None) -> Record:
        # Only messages checked on the loop: encoding runs here, on it, and a large message
        # carried could outgrow a log's record limit (Kafka's 1 MiB) that its bytes fit.
        # Large messages are rare; processing extracts them.
        small = len(envelope.payload) <= OFF_LOOP_BYTES
        carried = self.carry.header(envelope, key, extraction) if extraction and small else None
        return to_record(replace(envelope, key=key), self.raw_topic, carried)

    async def dead_letter(self, envelope: Envelope, error: PermanentError) -> None:
        """Keep a refused record and the reason; return once that is durable."""
        await self.committer.append(
            dead_letter_record(Failure(envelope, error, self.stage), self.dlq_topic)
        )
        self.metrics.dead_letter(error.reason)
        self.metrics.message(source_of(envelope), ack_outcome(error))
        log.warning("%s dead-lettered at ingest: %s", envelope.describe(), error.reason)

    def validate(self, envelope: Envelope) -> Checked:
        """Check the message can be used; its partition keys (patient ids), or FILTERED."""
        framing_error = envelope.headers.get(INGEST_ERROR_HEADER)
        if framing_error:
            detail = envelope.headers.get(INGEST_DETAIL_HEADER, framing_error)
            raise MessageRejected(detail, reason=framing_error, hl7_error_code=207)
        if envelope.kind is Kind.FHIR:
            # The same checks as the FHIR endpoint's (pipelines/fhir_ingest.py).
            checked = self.fhir.check_payload(envelope.payload)
            if not checked.stored:
                raise MessageUnusable(
                    "nothing in it is read by this site (Patient, Observation)",
                    reason="fhir.nothing_to_read",
                )
            return Checked(checked.keys)
        if envelope.kind is not Kind.HL7V2:
            raise MessageRejected(
                f"ingest does not take {envelope.kind} records", reason="kind.unsupported"
            )
        message = Message.parse(envelope.payload, self.config.mllp.charset)
        msg_type, trigger, _ = message.message_type
        if msg_type and not self.message_types.admits(msg_type, trigger):
            return FILTERED
        extraction = extract(message, self.rules, received_at=envelope.received_at)
        return Checked(extraction.keys, extraction)


def source_of(envelope: Envelope) -> str:
    """The feed a record came in on, as a metrics label: mllp (HL7v2) or fhir."""
    return "fhir" if envelope.kind is Kind.FHIR else "mllp"


def internal_error(envelope: Envelope, exc: BaseException) -> MessageUnusable:
    """The dead-letter reason for a bug, logged by type and place only.

    The exception's text is left out of the log and the detail: it may quote
    the message (``invalid literal for int(): ...``), which is PHI.
    """
    where = innermost_frame(exc)
    log.error("%s: internal error %s at %s", envelope.describe(), type(exc).__name__, where)
    return MessageUnusable(
        f"internal error ({type(exc).__name__} at {where})",
        reason="internal",
        hl7_error_code=207,
    )


def innermost_frame(exc: BaseException) -> str:
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} ({code.co_name})"
