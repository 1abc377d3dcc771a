"""The floor: Kafka produce and consume of the same bytes, with no processing at all.

A producer process sends the scenario's messages (the same ORU^R01 bytes the
MLLP senders send, or a Synthea bundle) to a fresh topic with the producer
settings ehrbridge uses (``acks=all``, idempotent), at the scenario's rate or
as fast as it can; a consumer process in its own group reads them back. Per
message we get the broker ACK latency (send → acknowledged, the floor of an
MLLP ACK that waits for a durable append) and the produce → consume latency
(the floor of event → Observation); and the CPU both clients and the broker
spent per message.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ehrbridge.bench.common import CpuMeter, kafka_broker_pid, latency_summary
from ehrbridge.bench.load import SenderSpec, build_messages

PARTITIONS = 6  # as ehrbridge's work topics (transport.partitions default)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # whole Synthea bundles are up to 2 MB


@dataclass(frozen=True)
class FloorSpec:
    bootstrap: str
    topic: str
    rate: float  # messages/s; 0 = as fast as possible
    seconds: float
    payload: bytes | None = None  # one payload repeated, else the ORU^R01 load
    count: int = 0  # messages to send (0: rate * seconds)


def _messages(spec: FloorSpec) -> list[bytes]:
    count = spec.count or max(1, int(spec.rate * spec.seconds))
    if spec.payload is not None:
        return [spec.payload] * count
    built = build_messages(SenderSpec(0, 1, 0, 0, 0, count, "F"))
    return [message for _, message in built]


def _producer_main(spec: FloorSpec, conn: Connection) -> None:
    from kafka import KafkaProducer

    messages = _messages(spec)
    producer = KafkaProducer(
        bootstrap_servers=spec.bootstrap,
        acks="all",
        enable_idempotence=True,
        max_request_size=MAX_MESSAGE_BYTES,
    )
    producer.partitions_for(spec.topic)  # metadata before the clock starts
    acks: dict[int, float] = {}
    sent: list[float] = []
    conn.send("ready")
    start: float = conn.recv()
    cpu0 = time.process_time()
    interval = 1.0 / spec.rate if spec.rate > 0 else 0.0
    while time.time() < start:
        time.sleep(0.001)
    for i, message in enumerate(messages):
        if interval:
            delay = start + i * interval - time.time()
            if delay > 0:
                time.sleep(delay)
        t0 = time.perf_counter()
        sent.append(time.time())
        future = producer.send(spec.topic, key=str(i).encode(), value=message)
        future.add_callback(lambda _md, i=i, t0=t0: acks.__setitem__(i, time.perf_counter() - t0))
    producer.flush()
    cpu = time.process_time() - cpu0
    producer.close()
    conn.send({"sent_at": sent, "ack_s": [acks[i] for i in sorted(acks)], "cpu_s": cpu})


def _consumer_main(spec: FloorSpec, conn: Connection) -> None:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        bootstrap_servers=spec.bootstrap,
        group_id=f"floor-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
    )
    consumer.partitions_for_topic(spec.topic)  # kafka-python 3.0.12: else the first poll may hang
    consumer.subscribe([spec.topic])
    while not consumer.assignment():
        consumer.poll(timeout_ms=100)
    conn.send("ready")
    received: dict[int, float] = {}
    expected: int | None = None
    cpu0 = time.process_time()
    idle_deadline = time.monotonic() + 3600
    while expected is None or len(received) < expected:
        batches = consumer.poll(timeout_ms=100, max_records=2000)
        now = time.time()
        for records in batches.values():
            for record in records:
                received.setdefault(int(record.key), now)
        if expected is None and conn.poll():
            expected = conn.recv()
            idle_deadline = time.monotonic() + 60
        if time.monotonic() > idle_deadline:
            break
    cpu = time.process_time() - cpu0
    consumer.close()
    conn.send({"received_at": received, "cpu_s": cpu})


def create_topic(bootstrap: str, topic: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=20000)
    try:
        admin.create_topics(
            [
                NewTopic(
                    topic,
                    PARTITIONS,
                    1,
                    topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)},
                )
            ]
        )
    finally:
        admin.close()


def delete_topic(bootstrap: str, topic: str) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=20000)
    try:
        admin.delete_topics([topic])
    except Exception:  # best effort: a leftover topic only costs disk
        pass
    finally:
        admin.close()


def kafka_floor(
    bootstrap: str,
    *,
    rate: float,
    seconds: float,
    payload: bytes | None = None,
    count: int = 0,
) -> dict[str, Any]:
    """Produce then consume the bytes through the broker; rates, latencies, CPU."""
    spec = FloorSpec(
        bootstrap, f"bench-floor-{uuid.uuid4().hex[:8]}", rate, seconds, payload, count
    )
    create_topic(bootstrap, spec.topic)
    ctx = mp.get_context("spawn")
    consumer_end, consumer_child = ctx.Pipe()
    producer_end, producer_child = ctx.Pipe()
    consumer = ctx.Process(target=_consumer_main, args=(spec, consumer_child), daemon=True)
    producer = ctx.Process(target=_producer_main, args=(spec, producer_child), daemon=True)
    try:
        consumer.start()
        producer.start()
        assert consumer_end.recv() == "ready" and producer_end.recv() == "ready"
        broker = kafka_broker_pid()
        meter = CpuMeter({"kafka-broker": broker} if broker else {})
        meter.start()
        producer_end.send(time.time() + 0.3)
        produced = producer_end.recv()
        consumer_end.send(len(produced["sent_at"]))
        consumed = consumer_end.recv()
        meter.stop()
    finally:
        for proc in (producer, consumer):
            proc.join(30)
        delete_topic(bootstrap, spec.topic)
    return _floor_report(produced, consumed, meter)


def _floor_report(
    produced: dict[str, Any], consumed: dict[str, Any], meter: CpuMeter
) -> dict[str, Any]:
    sent_at: list[float] = produced["sent_at"]
    received: dict[int, float] = consumed["received_at"]
    count = len(sent_at)
    lags = [received[i] - sent_at[i] for i in received if i < count]
    span = (max(received.values()) - sent_at[0]) if received else 0.0
    produce_span = max(s + a for s, a in zip(sent_at, produced["ack_s"], strict=False)) - sent_at[0]
    cpu = meter.report(count, {"producer": produced["cpu_s"], "consumer": consumed["cpu_s"]})
    return {
        "sent": count,
        "consumed": len(received),
        "produce_rate": round(count / produce_span, 1) if produce_span else None,
        "end_to_end_rate": round(len(received) / span, 1) if span else None,
        "ack_latency": latency_summary(produced["ack_s"]),
        "produce_to_consume_latency": latency_summary(lags),
        "cpu": cpu,
    }
