"""The write-back stage: prediction → Observation → local store (+ the EHR when live).

Every prediction is kept in the local result store -- what ``GET /api/results``
and the CDS Hooks service read. In **shadow** mode that is all: nothing is
written to the EHR until the site is promoted (``ehrbridge promote``; the
mode is read per batch, so the switch needs no restart). In **live** mode each result
also goes to every configured target:

* ``fhir`` (``writeback.fhir_base``): one transaction per result -- the risk
  Observation by conditional update on its deterministic identifier, its
  Provenance and the Devices that produced it, several results per request
  (``adapters/fhir_sink.py``);
* ``hl7v2`` (``writeback.hl7v2``): an ORU^R01 over MLLP, ACK checked
  (``adapters/mllp_sink.py``).

The stage keeps the result store and decides what each target still needs;
``pipelines/writeback_requests.py`` builds the requests, and each target's
sink sends them inside two wrappers (``pipelines/retry.py``): RetryingSink
retries in place, DeadLetteringSink turns what still fails into data, which
this stage returns as Failures for the worker to park or dead-letter.

Both are idempotent (conditional update; the same MSH-10 for the same
content), so at-least-once delivery is effectively-once in the EHR; a replay
of a result the store already has as delivered, unchanged, sends nothing. A target
that has taken a result is noted on the record (``writeback.delivered``), so
a retry -- in place, from a delayed tier, or a dead-letter replay -- goes
only to the targets that still lack it. A result is ``delivered`` in the
store once every target has it.

Results of one episode share an identifier, and a retry can bring an older one
back after a newer one was written (a result parked on a delayed-retry tier, a
dead-letter replay). Each prediction carries the revision of the patient state
it was computed from; one older than the result already stored for its
identifier is superseded and dropped, so it never overwrites the newer one in
the store or in the EHR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ehrbridge.config import Mode, SiteConfig
from ehrbridge.core.contracts import Envelope, Failure, Outcome, Sink
from ehrbridge.core.errors import EhrbridgeError, MessageUnusable, PermanentError
from ehrbridge.pipelines.ingest import internal_error
from ehrbridge.pipelines.metrics import NO_METRICS, Metrics, error_outcome
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.rendering import Shown, shown_for
from ehrbridge.pipelines.results import Delivery, ResultStore, StoredResult
from ehrbridge.pipelines.retry import DeadLetteringSink
from ehrbridge.pipelines.writeback_requests import REQUESTS

log = logging.getLogger(__name__)

DELIVERED_HEADER = "writeback.delivered"  # comma-separated targets that have the result


@dataclass
class _Item:
    envelope: Envelope
    prediction: Prediction
    observation: dict[str, Any]
    corrected: bool  # sent before with other values (ORU status C)
    delivered: set[str] = field(default_factory=set)
    errors: list[EhrbridgeError] = field(default_factory=list)


class WritebackStage:
    name = "writeback"

    def __init__(
        self,
        config: SiteConfig,
        results: ResultStore,
        targets: Mapping[str, Sink] | None = None,
        metrics: Metrics = NO_METRICS,
        mode: Callable[[], Mode] | None = None,
        *,
        modes: Mapping[str, Callable[[], Mode]] | None = None,
    ) -> None:
        """``mode`` is the site's model's; ``modes`` each model's by name (``models:``)."""
        self.metrics = metrics
        targets = dict(targets or {})
        self.mode = mode or (lambda: config.mode)
        self.modes = {config.model.name: self.mode, **(modes or {})}
        if any(m() is Mode.LIVE for m in self.modes.values()) and not targets:
            raise ValueError("live mode needs at least one write-back target")
        unknown = set(targets) - set(REQUESTS)
        if unknown:
            raise ValueError(f"unknown write-back targets: {sorted(unknown)}")
        self.config = config
        self.results = results
        self.all_targets = {name: DeadLetteringSink(sink) for name, sink in targets.items()}
        self.targets: Mapping[str, DeadLetteringSink] = {}

    def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        # Each model's mode is read once per batch (ehrbridge/promotion.py switches it while
        # the site runs): a model's results in a batch are wholly shadow or wholly live.
        live = {name for name, mode in self.modes.items() if mode() is Mode.LIVE}
        failures, parsed = self._parse(batch)
        for is_live in (False, True):
            group = [(e, p) for e, p in parsed if (self._model_of(p) in live) == is_live]
            if group:
                self.targets = self.all_targets if is_live else {}
                failures.extend(self._write_group(group))
        return failures

    def _model_of(self, prediction: Prediction) -> str:
        return self.config.model_named(prediction.model.name).name

    def _parse(
        self, batch: Sequence[Envelope]
    ) -> tuple[list[Outcome], list[tuple[Envelope, Prediction]]]:
        failures: list[Outcome] = []
        parsed: list[tuple[Envelope, Prediction]] = []
        for envelope in batch:
            try:
                parsed.append((envelope, Prediction.from_json(envelope.payload)))
            except (ValueError, KeyError, TypeError) as exc:
                error = MessageUnusable(
                    f"not a prediction record: {exc!r}", reason="record.invalid"
                )
                failures.append(Failure(envelope, error, self.name))
        return failures, parsed

    def _write_group(self, parsed: list[tuple[Envelope, Prediction]]) -> list[Outcome]:
        failures: list[Outcome] = []
        try:
            items = self._current_items(parsed)
        except EhrbridgeError as error:
            return failures + [Failure(envelope, error, self.name) for envelope, _ in parsed]
        status = Delivery.PENDING if self.targets else Delivery.SHADOW
        try:
            self.results.upsert([(i.prediction, i.observation) for i in items], status)
        except EhrbridgeError as error:
            return failures + [Failure(i.envelope, error, self.name) for i in items]
        if self.targets and items:
            failures.extend(self._deliver(items))
        return failures

    def _current_items(self, parsed: list[tuple[Envelope, Prediction]]) -> list[_Item]:
        """Items for the newest prediction of each identifier; superseded ones are dropped."""
        newest: dict[str, tuple[Envelope, Prediction]] = {}
        for envelope, prediction in parsed:  # in batch order: a tie goes to the later one
            known = newest.get(prediction.identifier)
            if known is not None and known[1].state_revision > prediction.state_revision:
                self._log_superseded(envelope)
                continue
            if known is not None:
                self._log_superseded(known[0])
            newest[prediction.identifier] = (envelope, prediction)
        stored = self.results.get_many(list(newest))  # one read for the whole batch
        views: dict[str, Shown] = {}  # each model's rendering, worked out once per batch
        items: list[_Item] = []
        for envelope, prediction in newest.values():
            previous = stored.get(prediction.identifier)
            if previous is not None and previous.state_revision > prediction.state_revision:
                self._log_superseded(envelope)
                continue
            view = views.get(prediction.model.name) or self._view(views, prediction)
            items.append(self._item(envelope, prediction, previous, view))
        return items

    def _view(self, views: dict[str, Shown], prediction: Prediction) -> Shown:
        views[prediction.model.name] = shown_for(self.config, prediction.model.name)
        return views[prediction.model.name]

    def _log_superseded(self, envelope: Envelope) -> None:
        log.info(
            "%s: result superseded by a newer one of its episode; not written", envelope.describe()
        )

    def _item(
        self,
        envelope: Envelope,
        prediction: Prediction,
        previous: StoredResult | None,
        view: Shown,
    ) -> _Item:
        observation = build_observation(prediction, self.config, view)
        done = set(filter(None, envelope.headers.get(DELIVERED_HEADER, "").split(",")))
        if not self.targets:
            previous = None  # shadow: nothing was sent, nothing to compare with
        if previous is None:
            return _Item(envelope, prediction, observation, False, done)
        if previous.status == Delivery.DELIVERED and previous.observation == observation:
            # A replay of a result every target already has: nothing to send again.
            return _Item(envelope, prediction, observation, False, set(self.targets))
        corrected = previous.outputs != prediction.outputs
        return _Item(envelope, prediction, observation, corrected, done)

    def _deliver(self, items: list[_Item]) -> list[Outcome]:
        for name, sink in self.targets.items():
            pending = [i for i in items if name not in i.delivered]
            if pending:
                self._write(name, sink, pending)
        complete = [i for i in items if i.delivered >= set(self.targets)]
        self.results.mark_delivered([i.prediction.identifier for i in complete])
        return [self._failure(i) for i in items if i.errors]

    def _write(self, name: str, sink: DeadLetteringSink, pending: list[_Item]) -> None:
        built = [(item, self._build(name, item)) for item in pending]
        sendable = [(item, request) for item, request in built if request is not None]
        errors = sink.write([request for _, request in sendable]) if sendable else {}
        for index, (item, _) in enumerate(sendable):
            if index in errors:
                item.errors.append(errors[index])
            else:
                item.delivered.add(name)
        self._count(name, len(sendable), errors)

    def _build(self, name: str, item: _Item) -> Envelope | None:
        """The target's request, or None with the item's error noted (errors as data)."""
        try:
            return REQUESTS[name](item, self.config)
        except EhrbridgeError as error:
            item.errors.append(error)
        except Exception as exc:  # a bug: dead-letter the record, never stall the partition
            item.errors.append(internal_error(item.envelope, exc))
        return None

    def _count(self, target: str, sent: int, errors: dict[int, EhrbridgeError]) -> None:
        if sent > len(errors):
            self.metrics.writeback(target, "ok", sent - len(errors))
        for error in errors.values():
            self.metrics.writeback(target, error_outcome(error))

    def _failure(self, item: _Item) -> Failure:
        # A permanent error wins: it needs a person, and a dead-letter replay retries the
        # other targets too. The record keeps which targets already have the result.
        permanent = [e for e in item.errors if isinstance(e, PermanentError)]
        error = permanent[0] if permanent else item.errors[0]
        headers = {**item.envelope.headers, DELIVERED_HEADER: ",".join(sorted(item.delivered))}
        return Failure(replace(item.envelope, headers=headers), error, self.name)
