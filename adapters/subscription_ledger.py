"""The subscription ledger in embedded SQLite: per FHIR Subscription its status,
the highest event number seen, and the gaps still to be read (FHIR R4
Subscriptions Backport IG, events-since-subscription-start).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ehrbridge.adapters._sqlite import DB_ERRORS, PerThreadConnection, transaction
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.pipelines.subscriptions import MISSED, UNREAD, Gap, Notification

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
    subscription TEXT PRIMARY KEY,
    topic TEXT,
    status TEXT NOT NULL,
    last_event INTEGER NOT NULL DEFAULT 0,
    last_type TEXT NOT NULL,
    notifications INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS subscription_gaps (
    subscription TEXT NOT NULL,
    first_missing INTEGER NOT NULL,
    last_missing INTEGER NOT NULL,
    detected_at REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'missed',
    PRIMARY KEY (subscription, first_missing)
);
"""


class SubscriptionLedger:
    """Per subscription: its status, the highest event number seen, and the gaps."""

    def __init__(self, path: Path | str) -> None:
        self._connections = PerThreadConnection(Path(path))
        conn = self._connections.get()
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(subscription_gaps)")}
        if "kind" not in columns:  # a ledger from before unread ranges
            conn.execute(
                "ALTER TABLE subscription_gaps ADD COLUMN kind TEXT NOT NULL DEFAULT 'missed'"
            )

    def record(self, notification: Notification, *, unread: bool = False) -> list[Gap]:
        """Note a notification that has been handled; return the new gaps it reveals.

        Event numbers start at 1. For an event notification, the events between the
        highest seen and its first event are missing; for a heartbeat (or any other
        type) ``events-since-subscription-start`` beyond the highest seen are.
        ``unread``: the notification's own events came without content (empty) and
        are kept open as :data:`UNREAD` until a later record brings them.
        """
        numbers = sorted({e.number for e in notification.events if e.number > 0})
        try:
            with transaction(self._connections.get()) as conn:
                row = conn.execute(
                    "SELECT last_event FROM subscriptions WHERE subscription = ?",
                    (notification.subscription,),
                ).fetchone()
                last = int(row[0]) if row else 0
                gaps = _new_gaps(notification, last, numbers)
                self._fill(conn, notification.subscription, numbers)
                self._store(conn, notification, last, numbers, gaps)
                if unread:
                    self._keep_unread(conn, notification.subscription, numbers)
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"subscription ledger: {exc}") from exc
        for gap in gaps:
            log.warning(
                "subscription %s: event(s) %s never arrived (missed notification)",
                gap.subscription,
                gap,
            )
        return gaps

    @staticmethod
    def _fill(conn: sqlite3.Connection, subscription: str, numbers: Iterable[int]) -> None:
        """A late event closes (part of) an open gap or unread range."""
        for number in numbers:
            row = conn.execute(
                "SELECT first_missing, last_missing, detected_at, kind FROM subscription_gaps"
                " WHERE subscription = ? AND first_missing <= ? AND last_missing >= ?",
                (subscription, number, number),
            ).fetchone()
            if row is None:
                continue
            first, last, detected, kind = row
            conn.execute(
                "DELETE FROM subscription_gaps WHERE subscription = ? AND first_missing = ?",
                (subscription, first),
            )
            for low, high in ((first, number - 1), (number + 1, last)):
                if low <= high:
                    conn.execute(
                        "INSERT INTO subscription_gaps VALUES (?, ?, ?, ?, ?)",
                        (subscription, low, high, detected, kind),
                    )

    @staticmethod
    def _keep_unread(conn: sqlite3.Connection, subscription: str, numbers: list[int]) -> None:
        now = time.time()
        conn.executemany(
            "INSERT OR REPLACE INTO subscription_gaps VALUES (?, ?, ?, ?, ?)",
            [(subscription, low, high, now, UNREAD) for low, high in _runs(numbers)],
        )

    @staticmethod
    def _store(
        conn: sqlite3.Connection,
        notification: Notification,
        last: int,
        numbers: list[int],
        gaps: list[Gap],
    ) -> None:
        now = time.time()
        high = max([last, *numbers, *(g.last for g in gaps)])
        conn.executemany(
            "INSERT OR REPLACE INTO subscription_gaps VALUES (?, ?, ?, ?, ?)",
            [(g.subscription, g.first, g.last, now, g.kind) for g in gaps],
        )
        conn.execute(
            "INSERT INTO subscriptions (subscription, topic, status, last_event, last_type,"
            " notifications, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?)"
            " ON CONFLICT (subscription) DO UPDATE SET topic = COALESCE(excluded.topic, topic),"
            " status = excluded.status, last_event = excluded.last_event,"
            " last_type = excluded.last_type, notifications = notifications + 1,"
            " updated_at = excluded.updated_at",
            (
                notification.subscription,
                notification.topic,
                notification.status,
                high,
                notification.type,
                now,
            ),
        )

    def gaps(self, subscription: str | None = None, kind: str | None = MISSED) -> list[Gap]:
        """Open ranges: missed events (default), ``UNREAD`` ones, or both (``kind=None``)."""
        where, args = ["1"], []
        if subscription:
            where.append("subscription = ?")
            args.append(subscription)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        rows = self._connections.get().execute(
            "SELECT subscription, first_missing, last_missing, kind FROM subscription_gaps"
            f" WHERE {' AND '.join(where)} ORDER BY subscription, first_missing",
            args,
        )
        return [Gap(str(s), int(f), int(t), str(k)) for s, f, t, k in rows]

    def subscriptions(self) -> list[dict[str, Any]]:
        rows = self._connections.get().execute(
            "SELECT subscription, topic, status, last_event, last_type, notifications, updated_at"
            " FROM subscriptions ORDER BY subscription"
        )
        keys = ("subscription", "topic", "status", "last_event", "last_type", "notifications")
        open_ranges: dict[tuple[str, str], list[str]] = defaultdict(list)
        for gap in self.gaps(kind=None):  # one read for every subscription's ranges
            open_ranges[(gap.subscription, gap.kind)].append(str(gap))
        found = []
        for row in rows:
            item: dict[str, Any] = dict(zip(keys, row[:6], strict=True))
            item["updated_at"] = row[6]
            item["gaps"] = open_ranges[(item["subscription"], MISSED)]
            item["unread"] = open_ranges[(item["subscription"], UNREAD)]
            found.append(item)
        return found

    def close(self) -> None:
        self._connections.close()


def _new_gaps(notification: Notification, last: int, numbers: list[int]) -> list[Gap]:
    gaps: list[Gap] = []
    expected = last + 1
    for number in numbers:
        if number > expected:
            gaps.append(Gap(notification.subscription, expected, number - 1))
        expected = max(expected, number + 1)
    since = notification.events_since_start
    # events-since-subscription-start counts events *including* those in this notification.
    if since is not None and since >= expected and notification.type not in ("handshake",):
        gaps.append(Gap(notification.subscription, expected, since))
    return gaps


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted numbers as (first, last) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs
