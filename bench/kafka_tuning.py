"""Kafka client settings weighed by CPU per message, through ehrbridge's own ``KafkaLog``.

    python -m ehrbridge.bench.kafka_tuning [--rate 500] [--seconds 10] [--variants a,b]

An appender process plays ingest: ``--connections`` threads each append one
ORU^R01 at a time (one MLLP message, one durable append before its ACK) at
the offered rate in all. A consumer process plays the processing role: a
group member polling and committing each batch. Each variant changes only
the client settings (``PRODUCER_SETTINGS`` / ``GROUP_SETTINGS`` in
``adapters/kafka_log.py``); per variant: CPU µs/msg of each client process
and of the broker, append latency (the floor under an MLLP ACK) and
append→consume latency. Variants run in turn on fresh topics, and the whole
list ``--rounds`` times, so slow drift in the machine's load spreads over all.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

from ehrbridge.bench.common import CpuMeter, kafka_broker_pid, latency_summary, table
from ehrbridge.bench.load import SenderSpec, build_messages
from ehrbridge.bench.services import kafka_bootstrap

# name: (producer settings, consumer group settings), each over the adapter's own.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "shipped": ({}, {}),
    "fetch-min-64k-wait-20ms": ({}, {"fetch_min_bytes": 65536, "fetch_max_wait_ms": 20}),
    "fetch-min-16k-wait-10ms": ({}, {"fetch_min_bytes": 16384, "fetch_max_wait_ms": 10}),
    "linger-5ms-batch-64k": ({"linger_ms": 5, "batch_size": 65536}, {}),
    "gzip": ({"compression_type": "gzip"}, {}),  # lz4/zstd need libraries ehrbridge lacks
    # As the ingest role appends: every lane's record goes through one GroupCommitter,
    # so appends that queue while a flush is in flight share the next one.
    "group-commit": ({}, {}),
}
GROUPED = {"group-commit"}


def _appender_main(
    bootstrap: str,
    topic: str,
    settings: dict[str, Any],
    plan: tuple[float, int, int, bool],
    conn: Connection,
) -> None:
    from ehrbridge.adapters import kafka_log
    from ehrbridge.config import KafkaTransport
    from ehrbridge.pipelines.groupcommit import GroupCommitter
    from ehrbridge.pipelines.transport import Record

    rate, count, connections, grouped = plan
    kafka_log.PRODUCER_SETTINGS.update(settings)
    log = kafka_log.KafkaLog(KafkaTransport(kind="kafka", bootstrap=bootstrap), "tuning")
    log.ensure_topics([topic])
    appends = 0
    committer = GroupCommitter(log) if grouped else None

    def append(record: Record) -> None:
        nonlocal appends
        if committer is not None:
            committer.append_sync(record)
        else:
            log.append([record])
            appends += 1

    messages = [m for _, m in build_messages(SenderSpec(0, 1, 0, 0, 0, count, "K"))]
    log.append([Record(topic, "warm", b"warm")])
    latencies: list[float] = []
    cpu0 = time.process_time()
    conn.send("ready")
    start: float = conn.recv()

    def lane(index: int) -> None:
        for n in range(index, count, connections):
            delay = start + n / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            sent = str(time.time())
            append(Record(topic, f"p{n % 500}", messages[n], {"sent": sent}))
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu0
    if committer is not None:
        committer.close()
        appends = committer.appends
    conn.send((cpu, latencies, appends))
    log.close()


def _consumer_main(
    bootstrap: str, topic: str, settings: dict[str, Any], count: int, conn: Connection
) -> None:
    from ehrbridge.adapters import kafka_log
    from ehrbridge.config import KafkaTransport

    kafka_log.GROUP_SETTINGS.update(settings)
    log = kafka_log.KafkaLog(KafkaTransport(kind="kafka", bootstrap=bootstrap), "tuning")
    consumer = log.consumer(f"tuning-{uuid.uuid4().hex[:8]}", [topic])
    consumer.poll(timeout_s=1.0)  # join the group before the clock starts
    cpu0 = time.process_time()
    conn.send("ready")
    seen, delays, polls = 0, [], 0
    deadline = time.monotonic() + 120
    while seen < count and time.monotonic() < deadline:
        records = consumer.poll(max_records=500, timeout_s=0.5)
        polls += 1
        now = time.time()
        for record in records:
            if "sent" in record.headers:
                seen += 1
                delays.append(now - float(record.headers["sent"]))
        if records:
            consumer.commit(records)
    conn.send((time.process_time() - cpu0, delays, polls))
    consumer.close()


def run_variant(
    bootstrap: str, name: str, rate: float, seconds: float, connections: int
) -> dict[str, Any]:
    producer, group = VARIANTS[name]
    count = int(rate * seconds)
    topic = f"tuning-{uuid.uuid4().hex[:10]}"
    ctx = mp.get_context("spawn")
    a_parent, a_child = ctx.Pipe()
    c_parent, c_child = ctx.Pipe()
    appender = ctx.Process(
        target=_appender_main,
        args=(bootstrap, topic, producer, (rate, count, connections, name in GROUPED), a_child),
    )
    appender.start()
    assert a_parent.recv() == "ready"
    consumer = ctx.Process(target=_consumer_main, args=(bootstrap, topic, group, count, c_child))
    consumer.start()
    assert c_parent.recv() == "ready"
    broker = kafka_broker_pid()
    meter = CpuMeter({"broker": broker} if broker else {})
    meter.start()
    a_parent.send(time.time() + 0.2)
    append_cpu, append_s, appends = a_parent.recv()
    consume_cpu, delays, polls = c_parent.recv()
    meter.stop()
    appender.join(30)
    consumer.join(30)
    cpu = meter.report(count, {"appender": append_cpu, "consumer": consume_cpu})
    return {
        "variant": name,
        "messages": count,
        "consumed": len(delays),
        "polls": polls,
        "records_per_append": count / max(appends, 1),
        "cpu_us_per_msg": {k: v["cpu_us_per_msg"] for k, v in cpu.items()},
        "append_latency": latency_summary(append_s),
        "append_to_consume": latency_summary(delays),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    bootstrap = kafka_bootstrap()
    names = args.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            runs[name].append(
                run_variant(bootstrap, name, args.rate, args.seconds, args.connections)
            )
    headers = ["variant", "appender µs/msg", "consumer µs/msg", "broker µs/msg", "total µs/msg",
               "append p99 ms", "append→consume p99 ms", "polls", "records/append"]  # fmt: skip
    rows = []
    for name, results in runs.items():

        def med(pick: Any, results: list[dict[str, Any]] = results) -> float:
            return round(float(statistics.median(pick(r) for r in results)), 1)

        rows.append(
            [
                name,
                med(lambda r: r["cpu_us_per_msg"]["appender"]),
                med(lambda r: r["cpu_us_per_msg"]["consumer"]),
                med(lambda r: r["cpu_us_per_msg"].get("broker") or 0),
                med(lambda r: r["cpu_us_per_msg"]["total"]),
                med(lambda r: r["append_latency"]["p99_ms"]),
                med(lambda r: r["append_to_consume"]["p99_ms"]),
                med(lambda r: r["polls"]),
                med(lambda r: r["records_per_append"]),
            ]
        )
    print(table(f"Kafka client settings at {args.rate}/s (median of {args.rounds})", headers, rows))


if __name__ == "__main__":
    main()
