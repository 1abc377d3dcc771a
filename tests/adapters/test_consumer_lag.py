"""ehrbridge_consumer_lag_records against the real Kafka broker (scripts/kafka).

A consumer-group member of the site reads a topic that holds a known number of
records per partition, a few records at a time. After each poll the /metrics
page (the site's own exposition) must show, per partition, exactly the records
not yet handed to the stage -- high watermark minus position -- and 0 once the
member has caught up. The broker, the group and the offsets are real.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ehrbridge.adapters.kafka_log import KafkaGroupConsumer, KafkaLog
from ehrbridge.adapters.prometheus_metrics import PrometheusMetrics
from ehrbridge.config import KafkaTransport, load_site_config
from ehrbridge.pipelines.transport import Record
from ehrbridge.sandbox.run import sandbox_site_file

pytestmark = pytest.mark.kafka
PARTITIONS = 3
RECORDS = 60


@pytest.fixture
def kafka(kafka_bootstrap: str) -> Iterator[KafkaLog]:
    log = KafkaLog(KafkaTransport(kind="kafka", bootstrap=kafka_bootstrap, partitions=PARTITIONS))
    yield log
    log.close()


def lag_on_the_page(metrics: PrometheusMetrics, topic: str) -> dict[int, float]:
    """Partition -> ehrbridge_consumer_lag_records for ``topic``, read from /metrics' text."""
    page = metrics.render().decode()
    found = {}
    for family in text_string_to_metric_families(page):
        if family.name == "ehrbridge_consumer_lag_records":
            for sample in family.samples:
                assert sample.labels["site"] == metrics.site
                if sample.labels["topic"] == topic:
                    found[int(sample.labels["partition"])] = sample.value
    return found


def poll_until(consumer: KafkaGroupConsumer, handed: Counter[int], enough: int) -> None:
    """Poll a few records at a time until ``enough`` were handed over (or 60 s pass)."""
    deadline = time.monotonic() + 60
    while sum(handed.values()) < enough and time.monotonic() < deadline:
        for record in consumer.poll(max_records=4, timeout_s=0.5):
            assert record.partition is not None
            handed[record.partition] += 1


def test_lag_is_the_records_each_partition_still_holds_for_the_group(kafka: KafkaLog) -> None:
    site = f"lag{uuid.uuid4().hex[:8]}"
    topic = f"{site}.raw"
    kafka.ensure_topics([topic])
    kafka.append([Record(topic, f"MRN-{n}", b"ORU") for n in range(RECORDS)])
    stored = Counter(r.partition for r in kafka.read(topic, limit=RECORDS))
    assert sum(stored.values()) == RECORDS and len(stored) == PARTITIONS

    config = load_site_config(sandbox_site_file()).model_copy(update={"site": site})
    metrics = PrometheusMetrics(config)
    consumer = kafka.consumer(f"{site}.process", [topic])
    metrics.lag_sources.append(lambda: consumer.lag)  # as SiteRuntime wires its workers
    try:
        handed: Counter[int] = Counter()
        poll_until(consumer, handed, enough=12)
        behind = lag_on_the_page(metrics, topic)
        # Partitions the member has fetched from report exactly what it has not handed on.
        assert behind, "no lag reported after the first fetches"
        for partition, lag in behind.items():
            assert lag == stored[partition] - handed[partition], (partition, behind, handed)
        assert sum(behind.values()) > 0

        poll_until(consumer, handed, enough=RECORDS)
        assert handed == stored
        assert lag_on_the_page(metrics, topic) == dict.fromkeys(range(PARTITIONS), 0.0)
    finally:
        consumer.close()
