"""The production durable log: Apache Kafka, through kafka-python.

Implements :class:`~ehrbridge.pipelines.transport.Log` with the same
at-least-once contract as the embedded log:

* :meth:`KafkaLog.append` returns only once **every** record is acknowledged
  by the broker (``acks=all``, idempotent producer). The MLLP AA and the
  FHIR 2xx wait on it; a broker that does not answer within
  ``transport.request_timeout_s`` raises :class:`UpstreamUnavailable`, so the
  sender gets no AA and resends.
* Consumers are group members with auto-commit off. The worker commits the
  offsets of a batch only after the batch's outputs were appended; a crash
  or a rebalance in between re-delivers the batch to whoever owns the
  partition next (stages are idempotent, Observation ids deterministic).
* Keys are patient ids, so Kafka's default partitioner keeps one patient's
  records in order on one partition, and the state changelog
  (``<site>.state-changelog``, compacted) lands on the same partition number
  as the patient's ``raw`` records.

Topics are created on first use with the partition count and cleanup policy
their role needs (:func:`topic_spec`): work topics get
``transport.partitions``; ``dlq`` and ``dlq.replayed`` one partition, so
their offsets number dead letters globally for ``ehrbridge dlq``; the
changelog is compacted.

kafka-python notes (3.0.12, measured here): a new group consumer must ask
for the partitions of its topics before the first poll, or that poll can
hang; the client's default 45 s session timeout makes group joins slow, so
the group settings below are tighter.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.future import Future

from ehrbridge.adapters.smart_auth import read_secret
from ehrbridge.config import KafkaTransport, Retention
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.pipelines.transport import Consumer, Record

log = logging.getLogger(__name__)

CHANGELOG_SUFFIX = ".state-changelog"
SINGLE_PARTITION_SUFFIXES = (".dlq", ".dlq.replayed")

# Group membership: fail over a dead worker within seconds, not the client's
# default 45 s; allow long batches (a model outage is ridden out in place).
GROUP_SETTINGS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 300_000,
    "auto_offset_reset": "earliest",
    "enable_auto_commit": False,
    # A member that joined before a topic's partitions were in its metadata gets
    # none of them, and notices them only at the next refresh (default 5 min).
    "metadata_max_age_ms": 5000,
}

# Durability first: an append returns (and the MLLP AA goes out) only once every
# in-sync replica has the record (acks=all), written once even if retried
# (idempotent). append() flushes, so linger only gathers concurrent appends.
PRODUCER_SETTINGS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 2,
}

# Called (in the polling thread) with the member's whole assignment each time it
# changes, before any record of a newly assigned partition is returned.
OnAssign = Callable[[list[TopicPartition]], None]


@dataclass(frozen=True)
class TopicSpec:
    partitions: int
    config: dict[str, str]


def topic_spec(name: str, partitions: int, retention: Retention | None = None) -> TopicSpec:
    """How a topic is created, from the role its name gives it.

    ``retention``: the site's retention days become the topic's ``retention.ms``
    (dead letters: ``dead_letter_days``; raw, predictions, retry tiers:
    ``raw_days``). Kafka deletes by age alone, whether or not a group has read
    the records. The compacted changelog is the state itself: no time limit.
    """
    if name.endswith(CHANGELOG_SUFFIX):
        return TopicSpec(partitions, {"cleanup.policy": "compact"})
    dead_letters = name.endswith(SINGLE_PARTITION_SUFFIXES)
    retention = retention or Retention()
    days = retention.dead_letter_days if dead_letters else retention.raw_days
    config = {"retention.ms": str(round(days * 86_400_000))} if days else {}
    return TopicSpec(1 if dead_letters else partitions, config)


def security_settings(transport: KafkaTransport) -> dict[str, Any]:
    """kafka-python's TLS and SASL settings from ``transport.tls`` / ``transport.sasl``.

    Every client (producer, consumers, admin, the state restore) is built from
    :attr:`KafkaLog.connection`, so these reach all of them. Broker
    certificates are verified, host name included (kafka-python's default).
    """
    tls, sasl = transport.tls, transport.sasl
    protocol = {(False, False): "PLAINTEXT", (True, False): "SSL"}.get(
        (tls is not None, sasl is not None), "SASL_SSL" if tls else "SASL_PLAINTEXT"
    )
    settings: dict[str, Any] = {"security_protocol": protocol}
    if tls is not None:
        files = {"ssl_cafile": tls.ca_file, "ssl_certfile": tls.cert_file}
        files["ssl_keyfile"] = tls.key_file
        settings.update({key: str(path) for key, path in files.items() if path is not None})
    if sasl is not None:
        settings["sasl_mechanism"] = sasl.mechanism
        settings["sasl_plain_username"] = sasl.username
        settings["sasl_plain_password"] = read_secret(
            sasl.password_env, sasl.password_file, "the Kafka SASL password", "transport.sasl"
        )
    return settings


class KafkaLog:
    """A :class:`~ehrbridge.pipelines.transport.Log` on an Apache Kafka cluster."""

    def __init__(
        self,
        transport: KafkaTransport,
        client_id: str = "ehrbridge",
        retention: Retention | None = None,
    ) -> None:
        if not transport.bootstrap:
            raise ValueError("transport.bootstrap is empty (or set KAFKA_BOOTSTRAP)")
        self.transport = transport
        self.retention = retention  # becomes retention.ms of the topics created here
        self.bootstrap = transport.bootstrap
        self.client_id = client_id
        self._timeout_ms = int(transport.request_timeout_s * 1000)
        # A broker that is down must fail an append within the timeout, not after
        # the client's 30 s bootstrap wait with back-off growing to 30 s.
        self.connection: dict[str, Any] = {
            "bootstrap_servers": transport.bootstrap,
            "bootstrap_timeout_ms": self._timeout_ms,
            "reconnect_backoff_max_ms": 2000,
            **security_settings(transport),
        }
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._known_topics: set[str] = set()

    # ------------------------------------------------------------- producing --

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        self.ensure_topics({r.topic for r in records})
        producer = self._producer_or_raise()
        try:
            futures = [producer.send(**_send_arguments(r)) for r in records]
            producer.flush(timeout=self.transport.request_timeout_s * 2)
            for future in futures:
                future.get(timeout=self.transport.request_timeout_s)
        except KafkaError as exc:
            self._discard_producer()
            raise UpstreamUnavailable(f"Kafka {self.bootstrap}: {exc}") from exc

    def _producer_or_raise(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(
                        **self.connection,
                        client_id=self.client_id,
                        **PRODUCER_SETTINGS,
                        request_timeout_ms=self._timeout_ms,
                        delivery_timeout_ms=self._timeout_ms * 2,
                        max_block_ms=self._timeout_ms,
                    )
                except KafkaError as exc:
                    raise UpstreamUnavailable(f"Kafka {self.bootstrap}: {exc}") from exc
            return self._producer

    def _discard_producer(self) -> None:
        """After a failed batch, start afresh: the idempotent producer may be fenced."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0)
            except KafkaError:
                log.debug("closing a failed Kafka producer", exc_info=True)

    # ---------------------------------------------------------------- topics --

    def ensure_topics(self, names: Iterable[str]) -> None:
        """Create missing topics as :func:`topic_spec` says; existing ones are left alone."""
        missing = sorted(set(names) - self._known_topics)
        if not missing:
            return
        new = [
            NewTopic(
                name,
                spec.partitions,
                self.transport.replication_factor,
                topic_configs=spec.config,
            )
            for name in missing
            for spec in [topic_spec(name, self.transport.partitions, self.retention)]
        ]
        admin = self._admin()
        try:
            for topic in new:
                with contextlib.suppress(TopicAlreadyExistsError):  # another process won
                    admin.create_topics([topic], timeout_ms=self._timeout_ms)
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka {self.bootstrap}: creating topics: {exc}") from exc
        finally:
            admin.close()
        self._known_topics.update(missing)

    def _admin(self) -> KafkaAdminClient:
        try:
            return KafkaAdminClient(
                **self.connection,
                client_id=f"{self.client_id}-admin",
                request_timeout_ms=self._timeout_ms,
            )
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka {self.bootstrap}: {exc}") from exc

    def unready(self, topic: str) -> str | None:
        """None once the broker answers the topic's metadata (its partitions)."""
        return None if self.partitions_of(topic) else f"no metadata for topic {topic}"

    def partitions_of(self, topic: str) -> list[int]:
        consumer = self._plain_consumer()
        try:
            return sorted(consumer.partitions_for_topic(topic) or [])
        finally:
            consumer.close()

    # ------------------------------------------------------------- consuming --

    def consumer(
        self, group: str, topics: Sequence[str], on_assign: OnAssign | None = None
    ) -> KafkaGroupConsumer:
        self.ensure_topics(topics)
        return KafkaGroupConsumer(self, group, topics, on_assign)

    def read(self, topic: str, *, after: int = -1, limit: int = 100) -> list[Record]:
        """Records without a group: offsets above ``after`` on every partition, oldest first."""
        self.ensure_topics([topic])
        consumer = self._plain_consumer()
        try:
            return _read_range(consumer, topic, after, limit)
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka {self.bootstrap}: reading {topic}: {exc}") from exc
        finally:
            consumer.close()

    def _plain_consumer(self) -> KafkaConsumer:
        try:
            return KafkaConsumer(
                **self.connection,
                client_id=f"{self.client_id}-reader",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                request_timeout_ms=max(self._timeout_ms, 6000),
            )
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka {self.bootstrap}: {exc}") from exc

    def close(self) -> None:
        self._discard_producer()


class KafkaGroupConsumer(Consumer):
    """One member of a consumer group; not thread-safe (one per worker thread)."""

    def __init__(
        self, kafka_log: KafkaLog, group: str, topics: Sequence[str], on_assign: OnAssign | None
    ) -> None:
        self.group = group
        self.lag: dict[tuple[str, int], int] = {}  # (topic, partition) -> records behind
        self._last_commit: Future | None = None
        # Offsets of batches done while a commit was in flight: sent with the next one.
        self._uncommitted: dict[TopicPartition, OffsetAndMetadata] = {}
        self._commit_timeout_s = kafka_log.transport.request_timeout_s
        try:
            self._consumer = KafkaConsumer(
                **kafka_log.connection,
                client_id=f"{kafka_log.client_id}-{group}",
                group_id=group,
                **GROUP_SETTINGS,
            )
            self._listener = _Listener(self._consumer, on_assign)
            self._consumer.subscribe(list(topics), listener=self._listener)
            self._await_partition_metadata(topics, kafka_log.transport.request_timeout_s)
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka {kafka_log.bootstrap}: {exc}") from exc

    def _await_partition_metadata(self, topics: Sequence[str], timeout_s: float) -> None:
        """Join with every topic's partitions known, so the first assignment has them.

        A topic created a moment ago may not be in the broker's metadata yet; a
        member that joins then is assigned nothing for it. (Asking first also
        avoids a first poll that hangs in kafka-python 3.0.)
        """
        deadline = time.monotonic() + timeout_s
        missing = list(topics)
        while True:
            missing = [t for t in missing if not self._consumer.partitions_for_topic(t)]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if missing:  # the metadata refresh (metadata_max_age_ms) brings them later
            log.warning("no partition metadata yet for %s; joining without them", missing)

    def poll(self, max_records: int = 500, timeout_s: float = 0.5) -> list[Record]:
        self._send_uncommitted()
        self._restore_assigned()
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka poll ({self.group}): {exc}") from exc
        records = [_to_record(message) for messages in batches.values() for message in messages]
        self._measure_lag()
        waiting = [r for r in records if _partition_of(r) in self._listener.unrestored]
        if waiting:  # fetched before the pause took hold: deliver them after the restore
            self.rewind(waiting)
            records = [r for r in records if _partition_of(r) not in self._listener.unrestored]
        return records

    def _measure_lag(self) -> None:
        """Records behind the high watermark per assigned partition, as of this poll.

        Read here, in the worker's thread (the consumer is not thread-safe), from
        what the last fetch already told us: no request is sent. The position is
        the subscription state's (``position()`` would ask the coordinator).
        """
        lag: dict[tuple[str, int], int] = {}
        assignment = self._consumer._subscription.assignment
        for tp in self._consumer.assignment():
            highwater, state = self._consumer.highwater(tp), assignment.get(tp)
            position = getattr(getattr(state, "position", None), "offset", None)
            if highwater is not None and position is not None:
                lag[(tp.topic, tp.partition)] = max(0, highwater - position)
        self.lag = lag

    def _restore_assigned(self) -> None:
        """Run ``on_assign`` for newly assigned partitions here, in the worker's thread.

        Not in the rebalance callback: kafka-python 3.0 calls it on its network
        thread, where a long restore would stop heartbeats and get this member
        evicted (and the callback's errors would be lost). The partitions stay
        paused until their restore succeeded; a failed restore is retried on
        the next poll, so no record is processed against state not restored.
        """
        listener = self._listener
        if not listener.reassigned or listener.on_assign is None:
            return
        assignment = sorted(self._consumer.assignment())
        try:
            listener.on_assign(assignment)  # also when empty: the revoked ones are dropped
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka restore ({self.group}): {exc}") from exc
        self._consumer.resume(*[tp for tp in assignment if tp in listener.unrestored])
        listener.unrestored.clear()
        listener.reassigned = False

    def commit(self, records: Sequence[Record]) -> None:
        """Send the commit and return without waiting for the coordinator's answer.

        The worker calls this only after the batch's outputs were acknowledged,
        so nothing waits on the answer: a commit that is lost or refused (the
        partitions moved in a rebalance) means the batch is delivered again,
        which at-least-once allows. Not waiting saves a round trip per batch.

        At most one commit is in flight: while one is, later batches' offsets
        are merged and go out in one commit when it has been answered (at the
        next commit or poll), so at high rates several batches share a commit
        request instead of queueing behind the client's in-flight limit. A
        crash in between re-delivers those batches, as any uncommitted batch.
        Commits go out in order on one connection, so a later one is never
        overtaken by an earlier one; :meth:`close` sends what is held and waits.
        """
        if not records:
            return
        for tp, offset in _last(records).items():
            held = self._uncommitted.get(tp)
            if held is None or held.offset <= offset:
                self._uncommitted[tp] = OffsetAndMetadata(offset + 1, "", -1)
        self._send_uncommitted()

    def _send_uncommitted(self) -> None:
        """Commit the held offsets unless a commit is still in flight."""
        last = self._last_commit
        if not self._uncommitted or (last is not None and not last.is_done):
            return
        assigned = self._consumer.assignment()  # a revoked partition's new owner commits it
        offsets = {tp: o for tp, o in self._uncommitted.items() if tp in assigned}
        self._uncommitted = {}
        if not offsets:
            return
        try:
            self._last_commit = self._consumer.commit_async(offsets, callback=self._committed)
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka commit ({self.group}): {exc}") from exc

    def _committed(self, offsets: dict[TopicPartition, OffsetAndMetadata], result: object) -> None:
        if isinstance(result, Exception):
            # Typically CommitFailedError: the partitions moved in a rebalance.
            # Their new owner re-processes from the last commit (at-least-once).
            where = _describe(offsets)
            log.warning("Kafka commit (%s) of %s failed: %s", self.group, where, result)

    def _await_last_commit(self, timeout_s: float) -> None:
        """Give the last commit time to reach the coordinator (the client's thread sends it)."""
        future, deadline = self._last_commit, time.monotonic() + timeout_s
        while future is not None and not future.is_done and time.monotonic() < deadline:
            time.sleep(0.005)

    def rewind(self, records: Sequence[Record]) -> None:
        assigned = self._consumer.assignment()
        for tp, offset in _first(records).items():
            if tp in assigned:  # a revoked partition restarts from its commit anyway
                self._consumer.seek(tp, offset)

    def close(self) -> None:
        self._await_last_commit(self._commit_timeout_s)
        if self._uncommitted:
            self._send_uncommitted()
            self._await_last_commit(self._commit_timeout_s)
        try:
            self._consumer.close(autocommit=False)
        except KafkaError:
            log.debug("closing Kafka consumer %s", self.group, exc_info=True)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Notes assignments; :meth:`KafkaGroupConsumer.poll` restores them before use."""

    def __init__(self, consumer: KafkaConsumer, on_assign: OnAssign | None) -> None:
        self.consumer = consumer
        self.on_assign = on_assign
        self.unrestored: set[TopicPartition] = set()
        self.reassigned = False  # a rebalance happened that on_assign has not seen yet

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", _describe(revoked))
        self.unrestored.difference_update(revoked)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", _describe(assigned))
        if self.on_assign is not None:
            if assigned:
                self.consumer.pause(*assigned)  # no records until their state is restored
            self.unrestored.update(assigned)
            self.reassigned = True


def _partition_of(record: Record) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


def _describe(partitions: Iterable[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


def _send_arguments(record: Record) -> dict[str, Any]:
    return {
        "topic": record.topic,
        "key": record.key.encode(),
        "value": record.value,
        "headers": [(k, v.encode()) for k, v in record.headers.items()],
    }


def _to_record(message: Any) -> Record:
    return Record(
        topic=message.topic,
        key=message.key.decode() if message.key is not None else "",
        value=message.value,
        headers={k: v.decode() for k, v in message.headers or []},
        partition=message.partition,
        offset=message.offset,
        timestamp=message.timestamp / 1000.0,
    )


def _last(records: Sequence[Record]) -> dict[TopicPartition, int]:
    last: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last[tp] = max(last.get(tp, -1), r.offset)
    return last


def _first(records: Sequence[Record]) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first


def read_partitions_to_end(
    consumer: KafkaConsumer,
    partitions: Sequence[TopicPartition],
    starts: dict[TopicPartition, int],
    deadline_s: float = 60.0,
) -> Iterable[Record]:
    """Every record from ``starts`` to the end offsets as of now (state restore, reads)."""
    consumer.assign(list(partitions))
    ends = consumer.end_offsets(list(partitions))
    pending = {tp for tp in partitions if starts.get(tp, 0) < ends[tp]}
    for tp in partitions:
        # Below the log start (compaction, retention) auto_offset_reset=earliest applies.
        consumer.seek(tp, max(starts.get(tp, 0), 0))
    deadline = time.monotonic() + deadline_s
    while pending:
        if time.monotonic() > deadline:
            raise UpstreamUnavailable(f"Kafka: reading {_describe(pending)} did not finish")
        for tp, messages in consumer.poll(timeout_ms=500, max_records=2000).items():
            for message in messages:
                if message.offset < ends[tp]:
                    yield _to_record(message)
            if consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
        for tp in list(pending):
            if consumer.position(tp) >= ends[tp]:
                pending.discard(tp)


def _read_range(consumer: KafkaConsumer, topic: str, after: int, limit: int) -> list[Record]:
    numbers = sorted(consumer.partitions_for_topic(topic) or [])
    partitions = [TopicPartition(topic, p) for p in numbers]
    starts = {tp: after + 1 for tp in partitions}
    found: list[Record] = []
    for record in read_partitions_to_end(consumer, partitions, starts):
        found.append(record)
        if len(partitions) == 1 and len(found) >= limit:
            break
    found.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    return found[:limit]


__all__ = ["KafkaGroupConsumer", "KafkaLog", "read_partitions_to_end", "topic_spec"]
