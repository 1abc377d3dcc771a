"""A worker: consume a topic, run a stage, route the outcomes, commit.

The loop that makes the delivery guarantee concrete:

1. poll a batch of records;
2. run the stage (wrapped in :class:`~ehrbridge.pipelines.retry.RetryingStage`, or, for
   write-back, with each sink in :class:`~ehrbridge.pipelines.retry.RetryingSink` and
   :class:`~ehrbridge.pipelines.retry.DeadLetteringSink`, so what still fails comes
   back as a Failure);
3. append, in one durable write, the stage's outputs to the next topic and
   its failures to a retry tier or the dead-letter topic;
4. only then commit the consumed offsets.

A crash anywhere before step 4 re-delivers the batch; stages are idempotent,
so the only effect is repeated work. If step 3 itself fails (the log is
unavailable) nothing is committed and the batch is retried after a pause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ehrbridge.core.contracts import Envelope, Failure, Stage
from ehrbridge.core.errors import TransientError
from ehrbridge.pipelines.metrics import NO_METRICS, Metrics
from ehrbridge.pipelines.retry import FailureRouter
from ehrbridge.pipelines.transport import (
    Consumer,
    Log,
    Record,
    dead_letter_record,
    from_record,
    to_record,
    unreadable_dead_letter,
)

log = logging.getLogger(__name__)


class StageWorker:
    def __init__(
        self,
        *,
        log_: Log,
        group: str,
        topics: Sequence[str],
        stage: Stage,
        output_topic: str | None,
        router: FailureRouter,
        stop: threading.Event,
        batch_size: int = 256,
        consumer: Consumer | None = None,
        side_outputs: Callable[[], list[Record]] | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.log = log_
        self.metrics = metrics
        self.stage = stage
        self.output_topic = output_topic
        self.router = router
        self.stop = stop
        self.batch_size = batch_size
        self.consumer = consumer or log_.consumer(group, topics)
        # Records the stage produced on the side (a state changelog): appended
        # with the outputs, before the commit.
        self.side_outputs = side_outputs
        self.processed = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except TransientError as error:
                log.warning("worker %s: %s; pausing before retry", self.stage.name, error)
                self.stop.wait(1.0)
            except Exception:
                log.exception("worker %s crashed on a batch; pausing", self.stage.name)
                self.stop.wait(1.0)
        self.consumer.close()

    def step(self, timeout_s: float = 0.5) -> int:
        records = self.consumer.poll(self.batch_size, timeout_s)
        if not records:
            return 0
        started = time.perf_counter()
        try:
            outputs = self._run_stage(records)
            if self.side_outputs is not None:
                outputs.extend(self.side_outputs())
            self.log.append(outputs)
        except BaseException:
            self.consumer.rewind(records)
            raise
        self.consumer.commit(records)
        self.metrics.stage_seconds(self.stage.name, time.perf_counter() - started)
        self._count_dead_letters(outputs)
        self.processed += len(records)
        return len(records)

    def _count_dead_letters(self, outputs: list[Record]) -> None:
        """Once they are durable, so a batch that is tried again is not counted twice."""
        for record in outputs:
            if record.topic == self.router.dlq:
                self.metrics.dead_letter(record.headers.get("error.reason", "error"))

    def _run_stage(self, records: list[Record]) -> list[Record]:
        envelopes: list[Envelope] = []
        origin: dict[int, str] = {}
        outputs: list[Record] = []
        for record in records:
            try:
                envelope = from_record(record)
            except (KeyError, ValueError) as exc:
                dead = unreadable_dead_letter(record, self.router.dlq, exc, self.stage.name)
                outputs.append(dead)
                continue
            origin[id(envelope)] = record.topic
            envelopes.append(envelope)
        for outcome in self.stage.process(envelopes) if envelopes else []:
            if isinstance(outcome, Failure):
                topic = origin.get(id(outcome.envelope), records[0].topic)
                outputs.append(self.router.route(outcome, topic))
                _log_failure(outcome)
            elif self.output_topic is not None:
                outputs.append(to_record(outcome, self.output_topic))
        return outputs


def _log_failure(failure: Failure) -> None:
    kind = "dead-lettered" if failure.permanent else "parked for delayed retry"
    log.warning(
        "%s %s at stage %s: %s",
        failure.envelope.describe(),
        kind,
        failure.stage,
        failure.error.reason,
    )


__all__ = ["StageWorker", "dead_letter_record"]
