"""Dead letters are built in one place (pipelines/transport.py), so every one says
the same things about its failure: reason, detail, class, stage and time, next to
the original bytes; a record parked on a retry tier says the same. And in-place
retries wait with full jitter, as retry.py says.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.config import RetryPolicy
from ehrbridge.core.contracts import Envelope, Failure, Kind, Outcome
from ehrbridge.core.errors import TransientError
from ehrbridge.pipelines.retry import TIER_HEADER, FailureRouter, backoff
from ehrbridge.pipelines.transport import Record, topic_name
from ehrbridge.pipelines.worker import StageWorker


class Echo:
    name = "echo"

    def process(self, batch: list[Envelope]) -> list[Outcome]:
        return list(batch)


def test_a_record_with_unreadable_headers_is_dead_lettered_with_stage_and_time(
    tmp_path: Path,
) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    raw, dlq = topic_name("s", "raw"), topic_name("s", "dlq")
    broken = Record(topic=raw, key="k", value=b"MSH|^~\\&|raw bytes", headers={"site": "s"})
    log.append([broken])
    worker = StageWorker(
        log_=log,
        group=topic_name("s", "echo"),
        topics=[raw],
        stage=Echo(),
        output_topic=topic_name("s", "out"),
        router=FailureRouter("s", RetryPolicy()),
        stop=threading.Event(),
    )
    assert worker.step(timeout_s=2.0) == 1
    [letter] = log.read(dlq)
    assert letter.value == broken.value  # the original bytes, untouched
    headers = letter.headers
    assert headers["error.reason"] == "record.headers"
    assert headers["error.class"] == "MessageRejected"
    assert headers["error.stage"] == "echo"
    assert datetime.fromisoformat(headers["error.at"]).tzinfo is not None
    log.close()


def test_in_place_retries_wait_with_full_jitter_below_an_exponential_cap() -> None:
    policy = RetryPolicy(attempts=5, initial_backoff_s=0.5, max_backoff_s=3.0)
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (5, 3.0)]:
        waits = [backoff(policy, attempt) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.8 and min(waits) < cap * 0.2  # spread, not one value


def test_a_parked_record_and_its_dead_letter_say_the_same_about_the_failure() -> None:
    router = FailureRouter("s", RetryPolicy(delayed_s=[5.0]))
    envelope = Envelope(site="s", source_id="m1", payload=b"{}", kind=Kind.PREDICTION, key="k")
    error = TransientError("EHR answered 503", reason="fhir.unavailable")
    parked = router.route(Failure(envelope, error, "writeback"), "s.predictions")
    assert parked.topic == topic_name("s", "retry.1")
    last_tier = replace(envelope, headers={TIER_HEADER: "1"})
    dead = router.route(Failure(last_tier, error, "writeback"), "s.predictions")
    assert dead.topic == router.dlq
    for record in (parked, dead):
        assert record.headers["error.reason"] == "fhir.unavailable"
        assert record.headers["error.class"] == "TransientError"
        assert record.headers["error.stage"] == "writeback"
        assert datetime.fromisoformat(record.headers["error.at"]).tzinfo is not None
