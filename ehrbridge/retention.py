"""Retention: PHI is kept as long as the site's ``retention:`` says, and no longer.

One purge deletes, per store, what is older than its setting (days):

* the embedded log's work topics (``raw_days``): ``raw``, ``predictions`` and
  the ``retry.N`` tiers, each only up to the offset its consumer group has
  committed -- a record not yet processed (or forwarded) stays, whatever its
  age;
* dead letters (``dead_letter_days``): ``dlq`` and ``dlq.replayed``;
* the result store (``results_days``): a live result still ``pending`` (not
  yet accepted by the EHR) stays;
* the audit trail (``audit_days``): whole months, once all of a month is
  older (``ehrbridge/audit.py``); the newest file always stays, so the hash
  chain goes on.

On Kafka the log's part is the topics' ``retention.ms``, set from the same
settings when ehrbridge creates them (``adapters/kafka_log.py:topic_spec``):
the broker deletes by age, so it must exceed any backlog a site can have.

A running site purges every ``retention.purge_interval_s`` (in the process
with the write-back role); ``ehrbridge purge --config site.yaml`` runs one
purge, for cron.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.audit import AuditTrail
from ehrbridge.config import Retention
from ehrbridge.core.errors import TransientError
from ehrbridge.pipelines.transport import Log, topic_name


@runtime_checkable
class PurgeableLog(Protocol):
    """A log that deletes records itself (the embedded one). Kafka's topics are
    purged by the broker's own retention (``retention.ms``, set at topic creation)."""

    def committed(self, group: str, topic: str) -> int: ...
    def purge(self, topic: str, older_than: float, through_offset: int | None = None) -> int: ...


log = logging.getLogger(__name__)
_DAY_S = 86_400.0


def work_topics(site: str, retry_tiers: int) -> dict[str, str]:
    """Each work topic of the embedded log and the consumer group that processes it."""
    topics = {
        topic_name(site, "raw"): topic_name(site, "process"),
        topic_name(site, "predictions"): topic_name(site, "writeback"),
    }
    for n in range(1, retry_tiers + 1):
        topics[topic_name(site, f"retry.{n}")] = topic_name(site, "retry-forwarder")
    return topics


class Purger:
    def __init__(
        self,
        site: str,
        retention: Retention,
        log_: Log,
        results: SqliteResultStore,
        retry_tiers: int,
        *,
        audit: AuditTrail | None = None,
    ) -> None:
        self.site = site
        self.audit = audit
        self.retention = retention
        self.log = log_
        self.results = results
        self.retry_tiers = retry_tiers

    @property
    def enabled(self) -> bool:
        r = self.retention
        days = (r.raw_days, r.dead_letter_days, r.results_days, r.audit_days)
        return any(d is not None for d in days)

    def purge(self, now: float | None = None) -> dict[str, int]:
        """One purge of every store; how many records each lost."""
        now = time.time() if now is None else now
        counts = {"raw": 0, "dead_letters": 0, "results": 0, "audit": 0}
        if isinstance(self.log, PurgeableLog):
            counts["raw"] = self._purge_work_topics(self.log, now)
            counts["dead_letters"] = self._purge_dead_letters(self.log, now)
        if self.retention.results_days is not None:
            counts["results"] = self.results.purge(now - self.retention.results_days * _DAY_S)
        if self.retention.audit_days is not None and self.audit is not None:
            cutoff = now - self.retention.audit_days * _DAY_S
            counts["audit"] = self.audit.purge(datetime.fromtimestamp(cutoff, UTC))
        return counts

    def _purge_work_topics(self, log_: PurgeableLog, now: float) -> int:
        days = self.retention.raw_days
        if days is None:
            return 0
        cutoff = now - days * _DAY_S
        deleted = 0
        for topic, group in work_topics(self.site, self.retry_tiers).items():
            # committed(): the last offset the group finished; -1 when none is.
            deleted += log_.purge(topic, cutoff, through_offset=log_.committed(group, topic))
        return deleted

    def _purge_dead_letters(self, log_: PurgeableLog, now: float) -> int:
        days = self.retention.dead_letter_days
        if days is None:
            return 0
        cutoff = now - days * _DAY_S
        topics = (topic_name(self.site, "dlq"), topic_name(self.site, "dlq.replayed"))
        return sum(log_.purge(topic, cutoff) for topic in topics)

    def run(self, stop: threading.Event) -> None:
        """Purge now and every ``purge_interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                counts = self.purge()
            except TransientError as error:  # a locked or full disk: try at the next round
                log.warning("site %s: retention purge failed: %s", self.site, error)
            else:
                log.info("site %s: retention purge removed %s", self.site, counts)
            stop.wait(self.retention.purge_interval_s)
