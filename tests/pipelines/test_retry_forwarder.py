"""The delayed-retry forwarder on both logs: parked records come back, even across an outage.

A record whose transient failure outlasted the in-place retries is parked on
``<site>.retry.N`` with a not-before time; the forwarder puts it back on the
topic it came from once due. The log being unavailable at that moment (a
Kafka broker restart) must neither kill the forwarder nor skip the record.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import wait_for

from ehrbridge.adapters.kafka_log import KafkaLog
from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.config import KafkaTransport, RetryPolicy
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.pipelines.retry import DelayedRetryForwarder, FailureRouter, split_due
from ehrbridge.pipelines.transport import Consumer, Log, Record, topic_name


class FlakyLog:
    """A real log whose next ``failures`` appends fail as a broker outage does."""

    def __init__(self, inner: Log, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.failed = 0

    def append(self, records: Sequence[Record]) -> None:
        if self.failed < self.failures:
            self.failed += 1
            raise UpstreamUnavailable("broker down (simulated)")
        self.inner.append(records)

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        return self.inner.consumer(group, topics)

    def read(self, topic: str, *, after: int = -1, limit: int = 100) -> list[Record]:
        return self.inner.read(topic, after=after, limit=limit)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def open_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Log]]:
    opened: list[Log] = []

    def opening() -> Log:
        if request.param == "embedded":
            log: Log = SqliteLog(tmp_path / "log.sqlite")
        else:
            bootstrap = request.getfixturevalue("kafka_bootstrap")
            log = KafkaLog(KafkaTransport(kind="kafka", bootstrap=bootstrap, partitions=2))
        opened.append(log)
        return log

    yield opening
    for log in opened:
        log.close()


def parked(router: FailureRouter, site: str, source_id: str) -> Record:
    envelope = Envelope(
        site=site, source_id=source_id, payload=b"MSH|...", kind=Kind.HL7V2, key="patient-7"
    )
    failure = Failure(envelope, UpstreamUnavailable("model 503"), "process")
    return router.route(failure, topic_name(site, "raw"))


@pytest.mark.parametrize("outages", [0, 2])
def test_a_parked_record_returns_to_its_topic_once_due(
    open_log: Callable[[], Log], outages: int
) -> None:
    site = f"fwd{uuid.uuid4().hex[:8]}"
    router = FailureRouter(site, RetryPolicy(delayed_s=[0.3, 1.0]))
    log = open_log()
    record = parked(router, site, "CTRL-1")
    assert record.topic == topic_name(site, "retry.1")
    log.append([record])

    stop = threading.Event()
    flaky = FlakyLog(log, failures=outages)
    forwarder = DelayedRetryForwarder(flaky, router, stop)
    thread = threading.Thread(target=forwarder.run, daemon=True)
    thread.start()
    try:
        back = wait_for(lambda: log.read(topic_name(site, "raw")), 60, "the record back on raw")
        assert flaky.failed == outages
        assert thread.is_alive(), "the forwarder died on an outage"
    finally:
        stop.set()
        thread.join(10)  # the forwarder closes its consumer on the way out

    assert [r.value for r in back] == [b"MSH|..."]
    headers = back[0].headers
    assert headers["source_id"] == "CTRL-1" and back[0].key == "patient-7"
    assert headers["attempt"] == "1"
    assert headers["retry.tier"] == "1"  # the next failure goes one tier further
    assert not any(name.startswith("error.") for name in headers)
    assert "retry.not_before" not in headers


def test_a_record_not_yet_due_holds_back_only_its_own_partition() -> None:
    def at(partition: int, offset: int, due: float) -> Record:
        headers = {"retry.not_before": f"{due:.3f}"}
        return Record("s.retry.1", "k", b"", headers, partition=partition, offset=offset)

    records = [at(0, 0, 10), at(1, 0, 10), at(0, 1, 99), at(1, 1, 10), at(0, 2, 10)]
    due, later = split_due(records, now=50)
    assert [(r.partition, r.offset) for r in due] == [(0, 0), (1, 0), (1, 1)]
    assert [(r.partition, r.offset) for r in later] == [(0, 1), (0, 2)]  # FIFO in partition 0
