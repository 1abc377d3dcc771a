"""Per-patient state on the Kafka transport: a local store per partition, and a compacted changelog.

The same design as a Kafka Streams state store:

* the processing worker keeps one local SQLite store **per partition** it
  owns (``<state_dir>/worker-<n>/<site>.state-changelog-<p>.sqlite``; each
  process on a machine holds its own ``worker-<n>`` slot): fast, no network
  on the hot path;
* every write is also a record on ``<site>.state-changelog`` -- key the
  patient id, value the whole state document -- produced **before** the
  worker commits the input offsets (the worker appends :meth:`drain` with
  the batch's outputs), so the changelog is never behind a committed input;
* the changelog is compacted, so it holds about one document per patient,
  not the history of every message;
* when partitions are assigned (start, restart, rebalance) the worker first
  replays each one's changelog partition into its local store, from the
  offset that store already reflects (its checkpoint, kept in the same file
  and written in the same transaction as the documents) up to the end. A new
  worker therefore resumes with the patients' state without re-reading
  ``raw``; a worker that kept its disk replays only what changed meanwhile.
  Revoked partitions' stores are closed (the files stay, as a head start if
  the partition comes back).

How the partition reaches the store: ``raw`` is keyed by patient id, so a
patient's records are on partition ``murmur2(patient id) % partitions`` --
Kafka's default partitioner, which the changelog (same key, same partition
count) uses too. :meth:`ChangelogStateStore.partition_for` applies the same
function, so :class:`~ehrbridge.pipelines.process.ProcessStage` keeps its
plain ``get``/``put_many`` interface and each patient lands in the store of
the partition their records arrive on. A message about several patients
(ORU^R01 with several PATIENT_RESULT groups, a multi-patient Bundle) is
stored by ingest once per patient, each copy keyed by one of them, and the
processing stage reads only that patient's part of a copy
(``Extraction.owned_by``): no worker writes a patient another worker owns.
Only a record stored before that split, or one whose patient-id rule has
changed since, still names patients of other partitions; for those, the
other partition's store is brought up to the changelog's end before the
read, and the write goes to the changelog of the patient's partition.

Why this is safe with at-least-once delivery: a crash between a local write
and the changelog produce leaves the input uncommitted; it is re-delivered
and merged again, and merging is idempotent (``pipelines/state.py``).
Replaying changelog records already in the local store rewrites the same
documents in the same order.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2

from ehrbridge.adapters._sqlite import DB_ERRORS, transaction
from ehrbridge.adapters.kafka_log import KafkaLog, read_partitions_to_end
from ehrbridge.adapters.sqlite_state import SqliteStateStore
from ehrbridge.core.errors import ConfigError, UpstreamUnavailable
from ehrbridge.pipelines.state import PatientState
from ehrbridge.pipelines.transport import Record

log = logging.getLogger(__name__)

_REPLAY_CHUNK = 500
# Patients whose latest state a partition store keeps in memory (a few KB each).
_CACHE_SIZE = 10_000


class PartitionStore(SqliteStateStore):
    """One partition's patient documents, and the changelog offset they reflect.

    The file is a copy of the changelog, which is what survives a lost
    machine, so it is written with ``synchronous=NORMAL``: no fsync per
    batch. A commit still survives kill -9, and commits stay in order, so a
    power loss can only undo the latest writes, never keep a checkpoint
    without the documents before it; the changelog records past the
    checkpoint are replayed at the next restore.

    The documents written last are also kept in memory, so the next message
    of a patient does not read and parse their document again.
    """

    def __init__(self, path: Path, cache_size: int = _CACHE_SIZE) -> None:
        super().__init__(path, synchronous="NORMAL")
        self._cache: OrderedDict[str, PatientState] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._conn().execute(
            "CREATE TABLE IF NOT EXISTS changelog_checkpoint"
            " (id INTEGER PRIMARY KEY CHECK (id = 0), next_offset INTEGER NOT NULL)"
        )

    def checkpoint(self) -> int:
        """The first changelog offset not yet in this store (0: nothing restored yet)."""
        try:
            row = self._conn().execute("SELECT next_offset FROM changelog_checkpoint").fetchone()
        except DB_ERRORS as exc:  # the disk fails, or the file is not a database
            raise UpstreamUnavailable(f"state store {self.path.name}: {exc}") from exc
        return int(row[0]) if row else 0

    def get(self, patient_id: str) -> PatientState | None:
        with self._cache_lock:
            cached = self._cache.get(patient_id)
            if cached is not None:
                self._cache.move_to_end(patient_id)
        if cached is not None:
            return _snapshot(cached)  # the caller merges into it: never hand out the cached one
        return super().get(patient_id)

    def put_many(self, states: Iterable[PatientState]) -> None:
        self.write(states)

    def write(self, states: Iterable[PatientState]) -> list[tuple[str, bytes]]:
        """Store the states; return their documents (serialised once, for the changelog too)."""
        kept = [_snapshot(s) for s in states]
        rows = [(s.patient_id, s.to_json()) for s in kept]
        self.put_documents(rows)
        with self._cache_lock:
            for state in kept:
                self._cache[state.patient_id] = state
                self._cache.move_to_end(state.patient_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return rows

    def replay(self, records: Sequence[Record], next_offset: int) -> None:
        """Apply changelog records and move the checkpoint, in one transaction."""
        with self._cache_lock:  # the replayed documents replace what was cached
            for record in records:
                self._cache.pop(record.key, None)
        changes = [_Change.of(record) for record in records]
        upserts = [(c.patient_id, c.doc) for c in changes if c.doc]
        deletes = [(c.patient_id,) for c in changes if not c.doc]
        try:
            with transaction(self._conn()) as conn:
                conn.executemany(
                    "INSERT INTO patient_state (patient_id, doc) VALUES (?, ?) "
                    "ON CONFLICT (patient_id) DO UPDATE SET doc = excluded.doc",
                    upserts,
                )
                conn.executemany("DELETE FROM patient_state WHERE patient_id = ?", deletes)
                conn.execute(
                    "INSERT INTO changelog_checkpoint (id, next_offset) VALUES (0, ?) "
                    "ON CONFLICT (id) DO UPDATE"
                    " SET next_offset = max(next_offset, excluded.next_offset)",
                    (next_offset,),
                )
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"state store {self.path.name}: {exc}") from exc


def _snapshot(state: PatientState) -> PatientState:
    """A copy whose fact lists can be merged into without touching ``state``.

    Facts are frozen and ``last_outcome`` is replaced, never changed in
    place, so the lists are all that need copying.
    """
    return replace(state, facts={feature: list(facts) for feature, facts in state.facts.items()})


class _Change:
    """A changelog record: the patient, and their document (empty: a tombstone)."""

    __slots__ = ("doc", "patient_id")

    def __init__(self, patient_id: str, doc: bytes) -> None:
        self.patient_id = patient_id
        self.doc = doc

    @classmethod
    def of(cls, record: Record) -> _Change:
        return cls(record.key, record.value or b"")


class ChangelogStateStore:
    """A :class:`~ehrbridge.pipelines.state.StateStore` with one local store per partition."""

    def __init__(
        self,
        directory: Path,
        kafka: KafkaLog,
        changelog_topic: str,
        *,
        input_topic: str | None = None,
    ) -> None:
        # Several processing processes may be started with one config: each takes
        # a slot of its own, or one's restore could overwrite the other's newer state.
        self.directory, self._slot_lock = _claim_slot(directory)
        self.kafka = kafka
        self.changelog_topic = changelog_topic
        kafka.ensure_topics([changelog_topic, *([input_topic] if input_topic else [])])
        self.partitions = _partition_count(kafka, changelog_topic, input_topic)
        self._stores: dict[int, PartitionStore] = {}
        self._owned: set[int] = set()
        self._pending: list[Record] = []
        self._lock = threading.RLock()
        self.restored_records = 0  # documents replayed from the changelog (for tests, metrics)

    def partition_for(self, patient_id: str) -> int:
        """The partition of this patient's records: Kafka's default key partitioner."""
        hashed: int = murmur2(patient_id.encode())
        return (hashed & 0x7FFFFFFF) % self.partitions

    # ------------------------------------------------------------ StateStore --

    def get(self, patient_id: str) -> PatientState | None:
        partition = self.partition_for(patient_id)
        if partition not in self._owned:  # another worker's: read its latest first
            self._catch_up([partition])
        return self._store(partition).get(patient_id)

    def put_many(self, states: Iterable[PatientState]) -> None:
        by_partition: dict[int, list[PatientState]] = defaultdict(list)
        for state in states:
            by_partition[self.partition_for(state.patient_id)].append(state)
        changes: list[Record] = []
        for partition, batch in by_partition.items():
            changes.extend(
                Record(self.changelog_topic, patient_id, doc, partition=partition)
                for patient_id, doc in self._store(partition).write(batch)
            )
        with self._lock:
            self._pending.extend(changes)

    def patient_ids(self, limit: int = 1000) -> list[str]:
        with self._lock:
            stores = list(self._stores.values())
        found = sorted({pid for store in stores for pid in store.patient_ids(limit)})
        return found[:limit]

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()
        self._slot_lock.close()  # releases the slot for the next process

    # ------------------------------------------------------------- changelog --

    def drain(self) -> list[Record]:
        """Changelog records written since the last drain, for the worker's next append."""
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def restore(self, assignment: Sequence[TopicPartition]) -> None:
        """The consumer's partitions are now ``assignment``: drop the others, restore these."""
        numbers = sorted({tp.partition for tp in assignment})
        with self._lock:
            self._owned = set(numbers)
            revoked = [p for p in self._stores if p not in self._owned]
            for partition in revoked:
                self._stores.pop(partition).close()
        count = self._catch_up(numbers)
        log.info(
            "state restored from %s partitions %s: %d documents (stores closed: %s)",
            self.changelog_topic,
            numbers,
            count,
            revoked or "none",
        )

    def _store(self, partition: int) -> PartitionStore:
        with self._lock:
            store = self._stores.get(partition)
            if store is None:
                path = self.directory / f"{self.changelog_topic}-{partition}.sqlite"
                store = self._stores[partition] = PartitionStore(path)
            return store

    def _catch_up(self, numbers: Sequence[int]) -> int:
        """Replay each partition's changelog from its store's checkpoint to the end."""
        if not numbers:
            return 0
        stores = {p: self._store(p) for p in numbers}
        changelog = [TopicPartition(self.changelog_topic, p) for p in numbers]
        starts = {tp: stores[tp.partition].checkpoint() for tp in changelog}
        try:
            consumer = KafkaConsumer(
                **self.kafka.connection,
                client_id=f"{self.kafka.client_id}-restore",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka restore of {self.changelog_topic}: {exc}") from exc
        try:
            ends = consumer.end_offsets(changelog)
            count = self._replay(stores, read_partitions_to_end(consumer, changelog, starts))
        except KafkaError as exc:
            raise UpstreamUnavailable(f"Kafka restore of {self.changelog_topic}: {exc}") from exc
        finally:
            consumer.close()
        for tp in changelog:  # past compacted-away offsets, or nothing new: the end as of now
            stores[tp.partition].replay([], ends[tp])
        self.restored_records += count
        return count

    def _replay(self, stores: dict[int, PartitionStore], records: Iterable[Record]) -> int:
        count = 0
        chunks: dict[int, list[Record]] = defaultdict(list)
        for record in records:
            chunk = chunks[record.partition]
            chunk.append(record)
            count += 1
            if len(chunk) >= _REPLAY_CHUNK:
                stores[record.partition].replay(chunk, chunk[-1].offset + 1)
                chunks[record.partition] = []
        for partition, chunk in chunks.items():
            if chunk:
                stores[partition].replay(chunk, chunk[-1].offset + 1)
        return count


def _claim_slot(directory: Path) -> tuple[Path, IO[str]]:
    """The first ``worker-N`` folder no other live process holds (an flock, freed at exit)."""
    for n in itertools.count():
        slot = directory / f"worker-{n}"
        slot.mkdir(parents=True, exist_ok=True)
        handle = (slot / ".lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return slot, handle
    raise AssertionError("unreachable")


def _partition_count(kafka: KafkaLog, changelog_topic: str, input_topic: str | None) -> int:
    """Partitions of the changelog; they must match the input's, or state would be misplaced."""
    count = len(kafka.partitions_of(changelog_topic)) or kafka.transport.partitions
    if input_topic is not None:
        inputs = len(kafka.partitions_of(input_topic)) or count
        if inputs != count:
            raise ConfigError(
                f"{input_topic} has {inputs} partitions but {changelog_topic} has {count}:"
                " a patient's state would live on another partition than their records",
                field="transport.partitions",
            )
    return count


__all__ = ["ChangelogStateStore", "PartitionStore"]
