"""Per-partition patient state restored from a compacted changelog, on the real broker.

Two stores stand for two processing workers of one site (each with its own
disk); the changelog topic is the only thing they share.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from kafka import TopicPartition

from ehrbridge.adapters.kafka_log import KafkaLog
from ehrbridge.adapters.kafka_state import ChangelogStateStore
from ehrbridge.config import KafkaTransport
from ehrbridge.core.errors import ConfigError
from ehrbridge.pipelines.state import PatientState
from ehrbridge.pipelines.transport import Record

pytestmark = pytest.mark.kafka
PARTITIONS = 3


@pytest.fixture
def site() -> str:
    return f"state{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kafka(kafka_bootstrap: str) -> Iterator[KafkaLog]:
    log = KafkaLog(KafkaTransport(kind="kafka", bootstrap=kafka_bootstrap, partitions=PARTITIONS))
    yield log
    log.close()


def worker_store(kafka: KafkaLog, site: str, disk: Path) -> ChangelogStateStore:
    return ChangelogStateStore(disk, kafka, f"{site}.state-changelog", input_topic=f"{site}.raw")


def raw_partitions(site: str) -> list[TopicPartition]:
    return [TopicPartition(f"{site}.raw", p) for p in range(PARTITIONS)]


def patient(n: int, sex: str = "female") -> PatientState:
    return PatientState(f"MRN-{n}", birth_date=date(1950, 1, 1 + n % 28), sex=sex)


def test_a_patients_store_is_the_partition_kafka_puts_their_records_on(
    kafka: KafkaLog, site: str, tmp_path: Path
) -> None:
    store = worker_store(kafka, site, tmp_path)
    ids = [f"MRN-{n}" for n in range(30)]
    kafka.append([Record(f"{site}.raw", pid, b"ORU") for pid in ids])
    placed = {r.key: r.partition for r in kafka.read(f"{site}.raw", limit=100)}
    assert placed == {pid: store.partition_for(pid) for pid in ids}
    assert len(set(placed.values())) == PARTITIONS
    store.close()


def test_a_new_worker_restores_its_partitions_from_the_changelog(
    kafka: KafkaLog, site: str, tmp_path: Path
) -> None:
    first = worker_store(kafka, site, tmp_path / "first")
    first.restore(raw_partitions(site))
    first.put_many(patient(n) for n in range(20))
    first.put_many([patient(3, sex="male")])  # a later version of one patient
    kafka.append(first.drain())  # what the worker appends before it commits
    first.close()

    second = worker_store(kafka, site, tmp_path / "second")  # another disk
    second.restore(raw_partitions(site))
    assert second.restored_records == 21
    assert sorted(second.patient_ids()) == sorted(f"MRN-{n}" for n in range(20))
    restored = second.get("MRN-3")
    assert restored is not None and restored.sex == "male"
    assert sorted(p.name for p in second.directory.glob("*.sqlite")) == [
        f"{site}.state-changelog-{p}.sqlite" for p in range(PARTITIONS)
    ]
    second.restore(raw_partitions(site))  # a rebalance that changed nothing
    assert second.restored_records == 21, "replayed again past its checkpoint"
    second.close()


def test_a_revoked_partition_is_closed_and_read_fresh_from_the_changelog(
    kafka: KafkaLog, site: str, tmp_path: Path
) -> None:
    mine = worker_store(kafka, site, tmp_path / "mine")
    mine.restore(raw_partitions(site))
    mine.put_many(patient(n) for n in range(12))
    kafka.append(mine.drain())
    moved = next(pid for pid in mine.patient_ids() if mine.partition_for(pid) == 1)

    theirs = worker_store(kafka, site, tmp_path / "theirs")
    mine.restore(raw_partitions(site)[:1])  # a second worker took partitions 1 and 2
    theirs.restore(raw_partitions(site)[1:])
    assert moved not in mine.patient_ids()  # its store was closed
    updated = theirs.get(moved)
    assert updated is not None
    theirs.put_many([PatientState(moved, birth_date=updated.birth_date, sex="male")])
    kafka.append(theirs.drain())

    seen_from_mine = mine.get(moved)  # not owned here: brought up to date first
    assert seen_from_mine is not None and seen_from_mine.sex == "male"
    mine.close()
    theirs.close()


def test_a_changelog_partitioned_unlike_its_input_is_refused(
    kafka_bootstrap: str, site: str, tmp_path: Path
) -> None:
    four = KafkaLog(KafkaTransport(kind="kafka", bootstrap=kafka_bootstrap, partitions=4))
    four.ensure_topics([f"{site}.raw"])
    two = KafkaLog(KafkaTransport(kind="kafka", bootstrap=kafka_bootstrap, partitions=2))
    with pytest.raises(ConfigError, match="partitions"):
        worker_store(two, site, tmp_path)
    four.close()
    two.close()


def test_two_processes_on_one_state_dir_get_a_folder_each(
    kafka: KafkaLog, site: str, tmp_path: Path
) -> None:
    one = worker_store(kafka, site, tmp_path)
    two = worker_store(kafka, site, tmp_path)  # started with the same config
    assert one.directory != two.directory
    one.close()
    again = worker_store(kafka, site, tmp_path)  # a restart takes the free slot back
    assert again.directory == one.directory
    two.close()
    again.close()
