"""Missed Subscription notifications, asked for again (Subscriptions Backport IG ``$events``).

The ledger (``pipelines/subscriptions.py``) finds gaps: events the server
numbered that never reached us; and it keeps the events that *empty*
notifications announced without content (``unread``), since the subscriber
is the one to read those. For each open range of a subscription,
:class:`Backfill` calls ``GET [base]/Subscription/[id]/$events`` for exactly
the missing numbers and hands the answer (a ``query-event`` notification) to
the same handling as a received one: its resources are stored, or read first
when the answer is id-only, and recording it in the ledger closes the gap.

It runs in the background, so the notification that revealed the gap is
answered at once. A gap stays open, with the reason kept for ``GET /api/fhir``,
when the server has no ``$events``, no longer has the events, or is down;
it is tried again every ``retry_after_s`` by a sweep, which also takes up,
at start, the ranges a previous run left open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from ehrbridge.adapters.fhir_client import FhirReader
from ehrbridge.adapters.subscription_ledger import SubscriptionLedger
from ehrbridge.core.errors import EhrbridgeError, RemoteRejected
from ehrbridge.pipelines.subscriptions import EVENT_TYPES, Gap, Notification, parse_notification

log = logging.getLogger(__name__)

Handle = Callable[[Notification], Awaitable[None]]
EVENTS_MISSING = "subscription.events_missing"
LACKS_THEM = "the server's $events answer lacks them (expired, or never kept)"


class Backfill:
    """Open gaps → ``$events`` → the notification handler; one subscription at a time."""

    def __init__(
        self,
        ledger: SubscriptionLedger,
        reader: FhirReader,
        handle: Handle,
        retry_after_s: float = 300.0,
    ) -> None:
        self.ledger = ledger
        self.reader = reader
        self.handle = handle
        self.retry_after_s = retry_after_s
        self.errors: dict[Gap, str] = {}  # the last failed attempt's reason, per open gap
        self._tried: dict[Gap, float] = {}  # when each open range was last asked for
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sweep every subscription's open ranges now and every ``retry_after_s``.

        A notification that opens a range schedules its subscription at once;
        the sweep retries what failed, and takes up what a previous run left.
        """
        self._sweeper = asyncio.create_task(self._sweep())

    def schedule(self, subscription: str) -> None:
        """Ask again for this subscription's open gaps that are due, in the background."""
        if subscription in self._busy:
            return
        self._busy.add(subscription)
        task = asyncio.create_task(self._run(subscription))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sweep(self) -> None:
        while True:
            try:
                open_ranges = await asyncio.to_thread(self.ledger.gaps, None, None)
                for subscription in dict.fromkeys(g.subscription for g in open_ranges):
                    self.schedule(subscription)
            except Exception:  # the ledger unreadable for a moment: the next sweep retries
                log.exception("backfill sweep failed")
            await asyncio.sleep(self.retry_after_s)

    async def _run(self, subscription: str) -> None:
        attempted: set[Gap] = set()
        try:
            # Read again after each round: a notification may open a range meanwhile.
            while due := [g for g in await self._open(subscription) if g not in attempted]:
                for gap in due:
                    attempted.add(gap)
                    await self._fill(gap)
        except Exception:  # a background task: log it, never lose it silently
            log.exception("subscription %s: backfill failed", subscription)
        finally:
            self._busy.discard(subscription)

    async def _open(self, subscription: str) -> list[Gap]:
        """The subscription's open ranges that are due an attempt."""
        gaps = await asyncio.to_thread(self.ledger.gaps, subscription, None)
        self._forget_closed(subscription, set(gaps))
        return [g for g in gaps if self._due(g)]

    def _forget_closed(self, subscription: str, open_now: set[Gap]) -> None:
        """Ranges since closed or split: their attempts and reasons no longer apply."""
        for known in (self._tried, self.errors):
            for gap in [g for g in known if g.subscription == subscription]:
                if gap not in open_now:
                    del known[gap]

    def _due(self, gap: Gap) -> bool:
        tried = self._tried.get(gap)
        return tried is None or time.monotonic() - tried >= self.retry_after_s

    async def _fill(self, gap: Gap) -> None:
        self._tried[gap] = time.monotonic()
        try:
            notification = await self._ask(gap)
            await self.handle(notification)
        except EhrbridgeError as error:
            self.errors[gap] = f"{error.reason}: {error.detail}"
            log.warning(
                "subscription %s: events %s not recovered: %s", gap.subscription, gap, error.reason
            )
            return
        self.errors.pop(gap, None)
        still = [g for g in await asyncio.to_thread(self.ledger.gaps, gap.subscription, None)
                 if g.first <= gap.last and g.last >= gap.first]  # fmt: skip
        if still:
            reason = f"{EVENTS_MISSING}: {LACKS_THEM}"
            self.errors.update((g, reason) for g in still)
            log.warning(
                "subscription %s: events %s not recovered: %s",
                gap.subscription,
                ", ".join(map(str, still)),
                reason,
            )
        else:
            log.info("subscription %s: missed events %s recovered", gap.subscription, gap)

    async def _ask(self, gap: Gap) -> Notification:
        doc = await asyncio.to_thread(
            self.reader.subscription_events, gap.subscription, gap.first, gap.last
        )
        notification = parse_notification(doc)
        if not notification.events:
            raise RemoteRejected(LACKS_THEM, reason=EVENTS_MISSING)
        if notification.type not in EVENT_TYPES:
            notification.type = "query-event"  # some servers label the answer otherwise
        # The ledger keys by the reference as notifications give it; the answer may spell
        # it another way (relative, absolute), and must close this subscription's gap.
        return replace(notification, subscription=gap.subscription)
