"""Per-patient state on the Kafka transport: a local store and a compacted changelog.

The same design as a Kafka Streams state store:

* the processing worker reads and writes patient state in a **local**
  SQLite store (fast, no network on the hot path);
* every write is also a record on ``<site>.state-changelog`` -- key the
  patient id, value the whole state document -- produced **before** the
  worker commits the input offsets (the worker appends :meth:`drain` with
  the batch's outputs), so the changelog is never behind a committed input;
* the changelog is compacted, so it holds about one document per patient,
  not the history of every message;
* when a partition is assigned (start, restart, rebalance) the worker first
  replays that changelog partition into its local store, from the offset it
  last restored up to (its checkpoint) to the end. A new worker therefore
  resumes with the patients' state without re-reading ``raw``.

Records of one patient share a partition number across ``raw`` and the
changelog: both are keyed by the patient id, have the same partition count
and use Kafka's default key partitioner.

Why this is safe with at-least-once delivery: a crash between a local write
and the changelog produce leaves the input uncommitted; it is re-delivered
and merged again, and merging is idempotent (``pipelines/state.py``).
Replaying changelog records already in the local store rewrites the same
documents in the same order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from ehrbridge.adapters.kafka_log import KafkaLog, read_partitions_to_end
from ehrbridge.pipelines._sqlite import PerThreadConnection, transaction
from ehrbridge.pipelines.state import PatientState, SqliteStateStore
from ehrbridge.pipelines.transport import Record

log = logging.getLogger(__name__)


class ChangelogStateStore:
    """A :class:`~ehrbridge.pipelines.state.StateStore` restored from a changelog topic."""

    def __init__(self, directory: Path, kafka: KafkaLog, changelog_topic: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.local = SqliteStateStore(directory / "state.sqlite")
        self.kafka = kafka
        self.changelog_topic = changelog_topic
        self._checkpoints = PerThreadConnection(directory / "checkpoints.sqlite")
        self._checkpoints.get().execute(
            "CREATE TABLE IF NOT EXISTS restored (partition INTEGER PRIMARY KEY, next INTEGER)"
        )
        self._pending: list[Record] = []
        self._lock = threading.Lock()
        self.restored_records = 0  # documents replayed from the changelog (for tests, metrics)
        kafka.ensure_topics([changelog_topic])

    # ------------------------------------------------------------ StateStore --

    def get(self, patient_id: str) -> PatientState | None:
        return self.local.get(patient_id)

    def put_many(self, states: Iterable[PatientState]) -> None:
        batch = list(states)
        self.local.put_many(batch)
        changes = [Record(self.changelog_topic, s.patient_id, s.to_json()) for s in batch]
        with self._lock:
            self._pending.extend(changes)

    def patient_ids(self, limit: int = 1000) -> list[str]:
        return self.local.patient_ids(limit)

    def close(self) -> None:
        self.local.close()
        self._checkpoints.close()

    # ------------------------------------------------------------- changelog --

    def drain(self) -> list[Record]:
        """Changelog records written since the last drain, for the worker's next append."""
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def restore(self, assigned: Sequence[TopicPartition]) -> None:
        """Bring the local store up to the changelog's end for these partitions' numbers."""
        partitions = sorted({tp.partition for tp in assigned})
        changelog = [TopicPartition(self.changelog_topic, p) for p in partitions]
        starts = {tp: self._checkpoint(tp.partition) for tp in changelog}
        consumer = KafkaConsumer(
            **self.kafka.connection,
            client_id=f"{self.kafka.client_id}-restore",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        try:
            ends = consumer.end_offsets(changelog)
            count = self._replay(read_partitions_to_end(consumer, changelog, starts))
        finally:
            consumer.close()
        self._save_checkpoints({tp.partition: ends[tp] for tp in changelog})
        self.restored_records += count
        log.info(
            "state restored from %s partitions %s: %d documents",
            self.changelog_topic,
            partitions,
            count,
        )

    def _replay(self, records: Iterable[Record]) -> int:
        count = 0
        batch: list[PatientState] = []
        for record in records:
            batch.append(PatientState.from_json(record.value))
            count += 1
            if len(batch) >= 500:
                self.local.put_many(batch)
                batch = []
        self.local.put_many(batch)
        return count

    def _checkpoint(self, partition: int) -> int:
        row = (
            self._checkpoints.get()
            .execute("SELECT next FROM restored WHERE partition = ?", (partition,))
            .fetchone()
        )
        return int(row[0]) if row else 0

    def _save_checkpoints(self, next_offsets: dict[int, int]) -> None:
        with transaction(self._checkpoints.get()) as conn:
            conn.executemany(
                "INSERT INTO restored (partition, next) VALUES (?, ?) "
                "ON CONFLICT (partition) DO UPDATE SET next = excluded.next",
                sorted(next_offsets.items()),
            )


__all__ = ["ChangelogStateStore"]
