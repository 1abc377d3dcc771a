"""Retries and dead letters, in one place. The only module that uses tenacity.

A transient failure goes through three levels, each bounded:

1. **In place**: the failed call is retried with exponential backoff and
   full jitter (``RetryPolicy.attempts``, ``initial_backoff_s`` ..
   ``max_backoff_s``). Rides out a blip -- a model server restart, a FHIR
   502 -- without reordering anything.
2. **Delayed retry tiers**: after that budget the record is parked on
   ``<site>.retry.<n>``, one FIFO topic per delay in ``RetryPolicy.delayed_s``
   (5 s, 30 s, 2 min, ...). A FIFO topic with one fixed delay never makes a
   short wait queue behind a long one. When due, the record is put back on
   the topic it came from, one tier further along.
3. **Dead letter**: after the last tier, or at once for a PermanentError,
   the record goes to ``<site>.dlq`` with its original bytes and the reason.

The wrappers compose around any Stage or Sink (Benthos style):
:class:`RetryingStage` and :class:`RetryingSink` retry in place;
:class:`DeadLetteringSink`, outermost around a sink, turns what still fails
into data. The stage stays ignorant of retries, and the worker only routes
outcomes (:class:`FailureRouter`: a retry tier or the DLQ).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from ehrbridge.config import RetryPolicy
from ehrbridge.core.contracts import BatchError, Envelope, Failure, Outcome, Sink, Stage
from ehrbridge.core.errors import EhrbridgeError, TransientError
from ehrbridge.pipelines.transport import (
    Log,
    Record,
    dead_letter_record,
    failure_headers,
    to_record,
    topic_name,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TIER_HEADER = "retry.tier"  # how many delayed tiers a record has been through
ORIGIN_HEADER = "retry.origin"  # the topic to put it back on
DUE_HEADER = "retry.not_before"  # epoch seconds
_FORWARDER_POLL_S = 0.2


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    stop: threading.Event | None = None,
) -> T:
    """Call ``fn``; retry TransientError in place with backoff and jitter.

    Re-raises the last TransientError once the budget is spent, or at once
    when ``stop`` is set (shutting down: the record stays uncommitted).
    """

    def note(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (attempt %d), retrying: %s", what, state.attempt_number, error)

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        else:
            stop.wait(seconds)

    give_up: stop_base = stop_after_attempt(policy.attempts)
    if stop is not None:
        give_up = give_up | stop_when_event_set(stop)  # shutting down: leave it uncommitted
    retrying = Retrying(
        retry=retry_if_exception_type(TransientError),
        stop=give_up,
        wait=wait_random_exponential(multiplier=policy.initial_backoff_s, max=policy.max_backoff_s),
        before_sleep=note,
        sleep=sleep,
        reraise=True,
    )
    return retrying(fn)


def backoff(policy: RetryPolicy, attempt: int) -> float:
    """Seconds to wait after ``attempt`` failed: exponential, capped, with full jitter.

    Full jitter (a uniform draw below the exponential cap, as tenacity's
    ``wait_random_exponential`` in :func:`call_with_retry`) keeps workers that
    failed together on one outage from retrying together when it ends.
    """
    cap = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** (attempt - 1))
    return random.uniform(0, cap)


class RetryingStage:
    """Re-runs a stage for the envelopes that failed transiently, in place."""

    def __init__(self, stage: Stage, policy: RetryPolicy, stop: threading.Event | None = None):
        self.stage = stage
        self.name = stage.name
        self.policy = policy
        self.stop = stop

    def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        done: list[Outcome] = []
        pending = list(batch)
        for attempt in range(1, self.policy.attempts + 1):
            outcomes = self.stage.process(pending)
            transient = [o for o in outcomes if isinstance(o, Failure) and not o.permanent]
            done.extend(o for o in outcomes if o not in transient)
            if not transient or attempt == self.policy.attempts or self._stopping():
                return done + transient
            pending = [f.envelope for f in transient]
            log.warning(
                "stage %s: %d record(s) failed transiently (attempt %d): %s",
                self.name,
                len(pending),
                attempt,
                transient[0].error,
            )
            self._sleep(attempt)
        return done

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _sleep(self, attempt: int) -> None:
        (self.stop.wait if self.stop is not None else time.sleep)(backoff(self.policy, attempt))


class RetryingSink:
    """A sink whose failed items are written again in place, on TransientError.

    It keeps the Sink contract itself (``core/contracts.py``): only the items
    a :class:`BatchError` names as transient are written again -- the
    others are at the destination already, or refused for good -- and what
    still fails once the budget is spent is raised as the inner sink would:
    the item's own error for a batch of one, else a BatchError with the
    indices of the batch this wrapper was given.
    """

    def __init__(self, sink: Sink, policy: RetryPolicy, stop: threading.Event | None = None):
        self.sink = sink
        self.name = sink.name
        self.policy = policy
        self.stop = stop

    def write(self, batch: Sequence[Envelope]) -> None:
        pending = dict(enumerate(batch))
        failed: dict[int, EhrbridgeError] = {}
        try:
            call_with_retry(
                lambda: self._write_pending(pending, failed),
                self.policy,
                f"sink {self.name}",
                self.stop,
            )
        except _StillFailing as still:
            failed.update(still.errors)
        except EhrbridgeError as error:  # the whole of what was pending failed alike
            failed.update(dict.fromkeys(pending, error))
        if len(failed) == len(batch) == 1:
            raise failed[0]
        if failed:
            raise BatchError(failed)

    def _write_pending(
        self, pending: dict[int, Envelope], failed: dict[int, EhrbridgeError]
    ) -> None:
        """Write what is pending; drop what is done; raise if some may pass later."""
        indices = list(pending)
        try:
            self.sink.write([pending[i] for i in indices])
            named: dict[int, EhrbridgeError] = {}
        except BatchError as error:
            named = {indices[k]: e for k, e in error.errors.items()}
        transient: dict[int, EhrbridgeError] = {
            i: e for i, e in named.items() if isinstance(e, TransientError)
        }
        failed.update({i: e for i, e in named.items() if i not in transient})
        again = _with_later_of_same_key(pending, transient)
        for index in indices:
            if index not in again:
                del pending[index]
        if transient:
            raise _StillFailing(transient)

    def close(self) -> None:
        self.sink.close()


def _with_later_of_same_key(
    pending: dict[int, Envelope], transient: dict[int, EhrbridgeError]
) -> set[int]:
    """The failed items, and every later item of their keys, to write again in order.

    A newer record of a key written before an older one's retry would be
    superseded by it at the destination; written again after it, it wins.
    """
    first_failed: dict[str, int] = {}
    for index in sorted(transient):
        first_failed.setdefault(pending[index].key, index)
    return set(transient) | {
        i for i, e in pending.items() if e.key in first_failed and i > first_failed[e.key]
    }


class _StillFailing(TransientError):
    """Some items of a batch failed transiently; ``errors`` by batch index."""

    def __init__(self, errors: dict[int, EhrbridgeError]) -> None:
        super().__init__(f"{len(errors)} item(s) still failing: {next(iter(errors.values()))}")
        self.errors = errors


class DeadLetteringSink:
    """The outer wrapper of a write-back sink: what did not arrive becomes data.

    ``write`` raises no EhrbridgeError. It returns the error of each item
    that did not arrive, by batch index (empty when all did): a BatchError's
    items as named, or every item alike when the whole write failed. The
    stage hands each on as a :class:`Failure` next to the record it came
    from, and the worker routes it -- a retry tier, or the dead-letter topic
    for a PermanentError or after the last tier -- in the same durable append
    that precedes its commit. A letter appended from here would be written
    before that commit: a crash in between delivers the record again, it may
    then arrive, and the letter would stand for a result the EHR has. And
    only the stage knows which other targets already have the result (the
    letter keeps that, so a replay goes only to the rest).
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.name

    def write(self, batch: Sequence[Envelope]) -> dict[int, EhrbridgeError]:
        try:
            self.sink.write(batch)
        except BatchError as partial:
            return dict(partial.errors)
        except EhrbridgeError as error:
            return dict.fromkeys(range(len(batch)), error)
        return {}

    def close(self) -> None:
        self.sink.close()


class FailureRouter:
    """Where a failed record goes next: a delayed-retry tier or the DLQ."""

    def __init__(self, site: str, policy: RetryPolicy) -> None:
        self.site = site
        self.policy = policy
        self.dlq = topic_name(site, "dlq")

    def tier_topics(self) -> list[str]:
        return [
            topic_name(self.site, f"retry.{n}") for n in range(1, len(self.policy.delayed_s) + 1)
        ]

    def route(self, failure: Failure, origin_topic: str) -> Record:
        tier = int(failure.envelope.headers.get(TIER_HEADER, "0"))
        if failure.permanent or tier >= len(self.policy.delayed_s):
            return dead_letter_record(failure, self.dlq)
        due = time.time() + self.policy.delayed_s[tier]
        return to_record(
            failure.envelope,
            topic_name(self.site, f"retry.{tier + 1}"),
            {
                TIER_HEADER: str(tier + 1),
                ORIGIN_HEADER: failure.envelope.headers.get(ORIGIN_HEADER, origin_topic),
                DUE_HEADER: f"{due:.3f}",
                **failure_headers(failure.error, failure.stage),
            },
        )


class DelayedRetryForwarder:
    """Moves due records from the retry tiers back to the topics they came from."""

    def __init__(self, log_: Log, router: FailureRouter, stop: threading.Event) -> None:
        self.log = log_
        self.stop = stop
        # One group member for all tiers: on Kafka every member costs a rebalance, and
        # several members polled in turn by one thread join the group slowly or never.
        group = topic_name(router.site, "retry-forwarder")
        self.consumer = log_.consumer(group, router.tier_topics())

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                wait = self.forward_due()
            except TransientError as error:  # the log is down: parked records wait, not die
                log.warning("delayed-retry forwarder: %s; pausing before retry", error)
                wait = 1.0
            self.stop.wait(max(0.05, min(wait, 1.0)))
        self.consumer.close()

    def forward_due(self) -> float:
        """Forward the due heads of the tiers; return seconds until the next is due."""
        # A short wait, not none: kafka-python 3.0 makes no group progress in poll(0).
        records = self.consumer.poll(max_records=500, timeout_s=_FORWARDER_POLL_S)
        now = time.time()
        due, later = split_due(records, now)
        if later:
            self.consumer.rewind(later)
        if due:
            try:
                self.log.append([_back_to_origin(r) for r in due])
            except BaseException:
                self.consumer.rewind(due)  # not forwarded: deliver them again next poll
                raise
            self.consumer.commit(due)
        return min(_due_at(r) for r in later) - now if later else 1.0


def split_due(records: Sequence[Record], now: float) -> tuple[list[Record], list[Record]]:
    """Due records, and the rest: FIFO per partition, stopping at its first record not due.

    Each partition's due records are a prefix of it, so committing them never
    commits past a record that still waits.
    """
    due: list[Record] = []
    later: list[Record] = []
    waiting: set[tuple[str, int]] = set()
    for record in records:
        partition = (record.topic, record.partition)
        if partition in waiting or _due_at(record) > now:
            waiting.add(partition)
            later.append(record)
        else:
            due.append(record)
    return due, later


def _due_at(record: Record) -> float:
    return float(record.headers.get(DUE_HEADER, "0"))


def _back_to_origin(record: Record) -> Record:
    headers = {
        k: v for k, v in record.headers.items() if not k.startswith("error.") and k != DUE_HEADER
    }
    headers["attempt"] = str(int(headers.get("attempt", "0")) + 1)
    headers["retry.requeued_at"] = datetime.now(UTC).isoformat()
    return Record(
        topic=record.headers[ORIGIN_HEADER], key=record.key, value=record.value, headers=headers
    )
