"""One contract, every StateStore: SQLite, the Kafka changelog-backed store, and memory.

The StateStore contract (``core/contracts.py``), case by case:

* ``get`` of a patient never stored is None; ``put_many`` then ``get``
  gives back an equal state (demographics, facts, outcome, revision);
* a later put supersedes an earlier one, also inside one ``put_many``;
  patients are independent of each other;
* putting the same state again changes nothing (re-processing after a
  crash is harmless);
* what was put survives a restart: a new store over the same place (the
  same file; for the changelog store, the changelog -- even on a new,
  empty disk -- once the worker appended ``drain()``) sees it;
* storage failing is an :class:`UpstreamUnavailable`, never ``sqlite3`` or
  ``kafka`` errors;
* ``close`` is idempotent.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Protocol

import pytest

from ehrbridge.adapters.kafka_log import KafkaLog
from ehrbridge.adapters.kafka_state import ChangelogStateStore
from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.adapters.sqlite_state import SqliteStateStore
from ehrbridge.config import KafkaTransport
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.pipelines.facts import Fact, PersonName
from ehrbridge.pipelines.state import PatientState, StateStore


class StoreBed(Protocol):
    def open(self) -> StateStore:
        """A store over this bed's place; called again, it is a restart."""
        ...

    def persist(self, store: StateStore) -> None:
        """What the worker does before it commits its input (the changelog append)."""
        ...

    def lose_local_disk(self) -> None:
        """The next ``open`` starts on an empty disk (only a replicated store survives)."""
        ...

    def break_storage(self, store: StateStore) -> None: ...


class SqliteBed:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "state.sqlite"

    def open(self) -> StateStore:
        return SqliteStateStore(self.path)

    def persist(self, store: StateStore) -> None:
        """A put is durable when it returns (a committed SQLite transaction)."""

    def lose_local_disk(self) -> None:
        pytest.skip("the embedded store is the local disk: losing it is losing the state")

    def break_storage(self, store: StateStore) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").write_bytes(b"this is not a SQLite file " * 200)


class MemoryBed:
    def __init__(self) -> None:
        self.documents: dict[str, bytes] = {}

    def open(self) -> StateStore:
        return MemoryStateStore(self.documents)  # the dict plays the file

    def persist(self, store: StateStore) -> None:
        """Nothing to do: the documents are the place."""

    def lose_local_disk(self) -> None:
        pytest.skip("a memory store has no replica")

    def break_storage(self, store: StateStore) -> None:
        assert isinstance(store, MemoryStateStore)
        store.fail_next([UpstreamUnavailable("disk gone (test)")])


class ChangelogBed:
    """Per-partition SQLite stores plus a compacted changelog on the real broker."""

    def __init__(self, bootstrap: str, tmp_path: Path) -> None:
        transport = KafkaTransport(kind="kafka", bootstrap=bootstrap, partitions=3)
        self.kafka = KafkaLog(transport)
        self.topic = f"conf{uuid.uuid4().hex[:8]}.state-changelog"
        self.tmp_path = tmp_path
        self.disk = tmp_path / "disk-0"
        self.opened: list[ChangelogStateStore] = []
        self.dead: list[KafkaLog] = []

    def open(self) -> StateStore:
        self.opened.append(ChangelogStateStore(self.disk, self.kafka, self.topic))
        return self.opened[-1]

    def persist(self, store: StateStore) -> None:
        assert isinstance(store, ChangelogStateStore)
        self.kafka.append(store.drain())

    def lose_local_disk(self) -> None:
        self.disk = self.tmp_path / f"disk-{len(self.opened)}"

    def break_storage(self, store: StateStore) -> None:
        """The local disk corrupted and the broker gone: neither may leak its own errors."""
        assert isinstance(store, ChangelogStateStore)
        for path in store.directory.glob("*.sqlite*"):
            path.write_bytes(b"this is not a SQLite file " * 200)
        with socket.socket() as probe:  # a port where nothing listens
            probe.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{probe.getsockname()[1]}"
        transport = KafkaTransport(kind="kafka", bootstrap=dead, request_timeout_s=1.0)
        store.kafka = KafkaLog(transport)
        self.dead.append(store.kafka)

    def close(self) -> None:
        for store in self.opened:
            store.close()
        for log in [self.kafka, *self.dead]:
            log.close()


@pytest.fixture(params=["sqlite", "memory", pytest.param("changelog", marks=pytest.mark.kafka)])
def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBed]:
    if request.param == "sqlite":
        yield SqliteBed(tmp_path)
    elif request.param == "memory":
        yield MemoryBed()
    else:
        changelog = ChangelogBed(request.getfixturevalue("kafka_bootstrap"), tmp_path)
        yield changelog
        changelog.close()


def patient(n: int, *, revision: int = 1, egfr: float = 28.0) -> PatientState:
    at = datetime(2026, 1, 1 + n % 28, 8, 30, tzinfo=UTC)
    source = f"MSG-{n}-{revision}"
    fact = Fact("egfr", egfr, "mL/min/{1.73_m2}", at, f"{source}/OBX/1", source, "LN", "33914-3")
    return PatientState(
        f"MRN-{n}",
        birth_date=date(1950, 1, 1 + n % 28),
        sex="female",
        name=PersonName(family="Test", given=("Conformance",)),
        demographics_as_of=at,
        facts={"egfr": [fact]},
        last_outcome={"status": "scored", "n": n},
        revision=revision,
    )


def same(a: PatientState | None, b: PatientState) -> bool:
    return a is not None and a.to_json() == b.to_json()


# ------------------------------------------------------------------------- cases


def test_an_unknown_patient_is_none(bed: StoreBed) -> None:
    store = bed.open()
    assert store.get("MRN-never") is None
    store.close()


def test_a_state_put_comes_back_equal(bed: StoreBed) -> None:
    store = bed.open()
    states = [patient(n) for n in range(10)]
    store.put_many(states)
    for state in states:
        assert same(store.get(state.patient_id), state)
    store.close()


def test_a_later_put_supersedes_also_inside_one_call(bed: StoreBed) -> None:
    store = bed.open()
    store.put_many([patient(1), patient(2)])
    store.put_many([patient(1, revision=2, egfr=30.0), patient(1, revision=3, egfr=31.0)])
    assert same(store.get("MRN-1"), patient(1, revision=3, egfr=31.0))
    assert same(store.get("MRN-2"), patient(2))  # untouched
    store.close()


def test_putting_the_same_state_again_changes_nothing(bed: StoreBed) -> None:
    store = bed.open()
    store.put_many([patient(1)])
    store.put_many([patient(1)])
    assert same(store.get("MRN-1"), patient(1))
    store.close()


def test_what_was_put_survives_a_restart(bed: StoreBed) -> None:
    store = bed.open()
    store.put_many(patient(n) for n in range(6))
    store.put_many([patient(4, revision=2)])
    bed.persist(store)
    store.close()
    store.close()  # idempotent
    again = bed.open()
    assert same(again.get("MRN-4"), patient(4, revision=2))
    assert all(same(again.get(f"MRN-{n}"), patient(n)) for n in (0, 1, 2, 3, 5))
    again.close()


def test_a_replicated_store_restores_onto_an_empty_disk(bed: StoreBed) -> None:
    store = bed.open()
    store.put_many(patient(n) for n in range(6))
    bed.persist(store)
    store.close()
    bed.lose_local_disk()
    fresh = bed.open()
    assert all(same(fresh.get(f"MRN-{n}"), patient(n)) for n in range(6))
    fresh.close()


def test_writing_to_failing_storage_is_upstream_unavailable(bed: StoreBed) -> None:
    store = bed.open()
    store.put_many([patient(1)])
    bed.persist(store)
    bed.break_storage(store)
    with pytest.raises(UpstreamUnavailable):
        store.put_many([patient(2)])
    store.close()


def test_reading_from_failing_storage_is_upstream_unavailable(bed: StoreBed) -> None:
    store = bed.open()
    store.put_many([patient(1)])
    bed.persist(store)
    bed.break_storage(store)
    with pytest.raises(UpstreamUnavailable):
        store.get("MRN-2")
    store.close()


@pytest.mark.kafka
def test_changelog_a_broker_gone_while_another_workers_state_is_read(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    bed = ChangelogBed(kafka_bootstrap, tmp_path)
    store = bed.open()
    assert isinstance(store, ChangelogStateStore)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    store.kafka = KafkaLog(KafkaTransport(kind="kafka", bootstrap=dead, request_timeout_s=1.0))
    bed.dead.append(store.kafka)
    with pytest.raises(UpstreamUnavailable, match="Kafka"):
        store.get("MRN-1")  # no partition owned yet: read up to the changelog's end first
    bed.close()
