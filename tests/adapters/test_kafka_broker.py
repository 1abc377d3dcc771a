"""The real Kafka broker of ``scripts/kafka`` (or KAFKA_BOOTSTRAP), driven by kafka-python.

Checks what ehrbridge relies on: idempotent ``acks=all`` produce, keys/headers/
values surviving a round trip through a consumer group, committed offsets,
compacted topics, and partitions split between the members of one group.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import InvalidRecordError, KafkaError

# The kafka_broker / kafka_bootstrap session fixtures come from tests/kafka_fixture.py,
# which tests/conftest.py loads as a plugin; importing it here at run time, before
# pytest registers it, would bypass pytest's assertion rewriting of that module.
if TYPE_CHECKING:
    from kafka_fixture import KafkaBroker

pytestmark = pytest.mark.kafka

# Fast group membership (see scripts/kafka and the broker's
# group.initial.rebalance.delay.ms=0): a member learns of a rebalance at its
# next heartbeat, so the heartbeat interval bounds how long a join takes.
FAST_GROUP = {
    "session_timeout_ms": 6000,  # the broker's group.min.session.timeout.ms
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 30000,
}
WAIT_S = 30.0

Header = tuple[str, bytes]
Sent = tuple[bytes, bytes, tuple[Header, ...]]


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=15000)
    yield client
    client.close()


class Scratch:
    """Hands out fresh topic and group names and deletes them after the test.

    Every test run would otherwise leave its topics behind, and a broker with
    hundreds of partitions takes many seconds longer to start.
    """

    def __init__(self, admin: KafkaAdminClient) -> None:
        self.admin = admin
        self.topics: list[str] = []
        self.groups: list[str] = []

    def topic(self, partitions: int | None = None, **configs: str) -> str:
        """A new topic; partitions=None leaves it to the broker's auto-creation."""
        name = fresh_name("t")
        self.topics.append(name)
        if partitions is not None:
            spec = {"num_partitions": partitions, "replication_factor": 1, "configs": configs}
            # wait_for_metadata: the broker has the topic and a leader per partition.
            self.admin.create_topics({name: spec}, wait_for_metadata=True)
        return name

    def group(self) -> str:
        name = fresh_name("g")
        self.groups.append(name)
        return name

    def delete_all(self) -> None:
        # Best effort: a failed test may not have created everything it named.
        existing = set(self.admin.list_topics())
        doomed = [topic for topic in self.topics if topic in existing]
        if doomed:
            self.admin.delete_topics(doomed, raise_errors=False)
        if self.groups:
            with contextlib.suppress(KafkaError):
                self.admin.delete_groups(self.groups)


@pytest.fixture
def scratch(admin: KafkaAdminClient) -> Iterator[Scratch]:
    names = Scratch(admin)
    yield names
    names.delete_all()


@pytest.fixture
def producer(kafka_bootstrap: str, scratch: Scratch) -> Iterator[KafkaProducer]:
    # Depends on scratch so it closes first: a producer still refreshing the
    # metadata of a deleted topic would have the broker auto-create it again.
    client = KafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
    )
    yield client
    client.close(timeout=10)


def new_consumer(bootstrap: str, group: str, topic: str) -> KafkaConsumer:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **FAST_GROUP,
    )
    # kafka-python 3.0.12: a member that joins before it has the topic's
    # metadata is assigned nothing, then rejoins once metadata arrives; if a
    # poll() times out during that second join, the assignment is never
    # applied and the consumer stays idle for ever. Loading the metadata
    # first makes the first join the only one (and halves the join time).
    consumer.partitions_for_topic(topic)
    return consumer


def poll_until(consumer: KafkaConsumer, count: int) -> list[Any]:
    records: list[Any] = []
    deadline = time.monotonic() + WAIT_S
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    assert len(records) == count, f"{len(records)} of {count} records within {WAIT_S}s"
    return records


def sample_records(count: int) -> list[Sent]:
    """Synthetic keyed events; value bytes include non-UTF-8 and empty payloads."""
    records: list[Sent] = []
    for i in range(count):
        key = f"encounter-{i % 5}".encode()
        value = bytes([i, 0xFF, 0x00]) if i % 7 == 0 else f'{{"seq": {i}}}'.encode()
        if i == count - 1:
            value = b""
        headers = (("trace-id", uuid.uuid4().bytes), ("content-type", b"application/json"))
        records.append((key, value, headers))
    return records


def test_round_trip_keeps_keys_headers_values_and_key_order(
    kafka_bootstrap: str, producer: KafkaProducer, scratch: Scratch
) -> None:
    topic = scratch.topic()  # not created here: the broker auto-creates it
    sent = sample_records(40)
    futures = [producer.send(topic, key=k, value=v, headers=list(h)) for k, v, h in sent]
    metadata = [future.get(timeout=WAIT_S) for future in futures]

    # One key, one partition, offsets in send order: what per-patient ordering needs.
    placements: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for (key, _, _), meta in zip(sent, metadata, strict=True):
        placements[key].append((meta.partition, meta.offset))
    for key, spots in placements.items():
        assert len({partition for partition, _ in spots}) == 1, key
        assert [offset for _, offset in spots] == sorted(offset for _, offset in spots), key

    written = sorted({TopicPartition(topic, meta.partition) for meta in metadata})
    consumer = new_consumer(kafka_bootstrap, scratch.group(), topic)
    try:
        received = poll_until(consumer, len(sent))
        consumer.commit()
        committed = {tp: consumer.committed(tp) for tp in written}
        ends = consumer.end_offsets(written)
    finally:
        consumer.close()

    got = sorted((r.key, r.value, tuple(r.headers)) for r in received)
    assert got == sorted(sent)
    by_key: dict[bytes, list[bytes]] = defaultdict(list)
    for record in received:
        by_key[record.key].append(record.value)
    for key, values in by_key.items():
        assert values == [v for k, v, _ in sent if k == key]
    assert committed == ends


def test_compacted_topic_is_created_and_enforces_keys(
    admin: KafkaAdminClient, producer: KafkaProducer, scratch: Scratch
) -> None:
    topic = scratch.topic(1, **{"cleanup.policy": "compact"})

    described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    policy = described["topic"][topic]["cleanup.policy"]
    assert policy["value"] == "compact"
    assert policy["config_source"] == "DYNAMIC_TOPIC_CONFIG"

    keyed = producer.send(topic, key=b"patient-state", value=b"v1").get(timeout=WAIT_S)
    assert keyed.offset == 0
    # A compacted log keeps the last value per key, so the broker refuses keyless records.
    with pytest.raises(InvalidRecordError):
        producer.send(topic, value=b"no key").get(timeout=WAIT_S)


@dataclass
class GroupMember:
    """A consumer polled on its own thread (kafka-python clients are not thread-safe)."""

    consumer: KafkaConsumer
    lock: threading.Lock = field(default_factory=threading.Lock)
    assignment: frozenset[TopicPartition] = frozenset()
    records: list[Any] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batches = self.consumer.poll(timeout_ms=100)
            with self.lock:
                self.assignment = frozenset(self.consumer.assignment())
                for batch in batches.values():
                    self.records.extend(batch)

    def snapshot(self) -> tuple[frozenset[TopicPartition], list[Any]]:
        with self.lock:
            return self.assignment, list(self.records)


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def is_split(members: list[GroupMember], everything: set[TopicPartition]) -> bool:
    """Every member owns some partitions, none twice, all of them together."""
    owned = [member.snapshot()[0] for member in members]
    disjoint = sum(len(part) for part in owned) == len(frozenset().union(*owned))
    return all(owned) and disjoint and frozenset().union(*owned) == everything


def test_two_members_of_one_group_split_the_partitions(
    kafka_bootstrap: str, producer: KafkaProducer, scratch: Scratch
) -> None:
    partitions = 4
    topic = scratch.topic(partitions)
    everything = {TopicPartition(topic, p) for p in range(partitions)}
    group = scratch.group()
    members = [GroupMember(new_consumer(kafka_bootstrap, group, topic)) for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=m.run, args=(stop,), daemon=True) for m in members]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: is_split(members, everything), "both members to own partitions")
        sent = {f"m{i}".encode(): i % partitions for i in range(40)}
        for value, partition in sent.items():
            producer.send(topic, value=value, partition=partition)
        producer.flush(timeout=WAIT_S)
        wait_for(lambda: sum(len(m.snapshot()[1]) for m in members) >= len(sent), "all records")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=WAIT_S)
        for member in members:
            member.consumer.close()

    received: dict[bytes, int] = {}
    for member in members:
        owned, records = member.snapshot()
        assert {TopicPartition(r.topic, r.partition) for r in records} <= owned
        received.update({r.value: r.partition for r in records})
    assert received == sent


def test_start_again_is_idempotent(kafka_broker: KafkaBroker) -> None:
    from kafka_fixture import run_kafka_script

    if kafka_broker.source != "script":
        pytest.skip(f"broker comes from {kafka_broker.source}, not scripts/kafka")
    again = run_kafka_script("start", timeout_s=60.0)
    status = run_kafka_script("status", timeout_s=30.0)
    bootstrap = run_kafka_script("bootstrap", timeout_s=30.0)
    assert (again.returncode, status.returncode, bootstrap.returncode) == (0, 0, 0)
    assert again.stdout.strip().splitlines()[-1] == kafka_broker.bootstrap
    assert status.stdout.strip() == kafka_broker.bootstrap
    assert bootstrap.stdout.strip() == kafka_broker.bootstrap
