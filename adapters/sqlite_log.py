"""The embedded durable log: one SQLite file, for the sandbox and small sites.

Durability: WAL journal with ``synchronous=FULL``, so a committed append is
on disk (fsync'd) before :meth:`SqliteLog.append` returns, and survives both
``kill -9`` and power loss. Callers batch appends (group commit) to pay the
fsync once for many messages.

Each topic is a single partition here; offsets are one global sequence, so
"after offset N" is well defined per topic. Consumer-group positions live in
the same file and are committed by the worker only after its outputs are
durable -- the at-least-once contract of ``core/contracts.py``.

Several threads and processes may share the file: every thread has its own
connection, and an in-process condition variable wakes pollers early when an
append happens in this process (another process's appends are seen within
``_CROSS_PROCESS_POLL_S``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from ehrbridge.adapters._sqlite import DB_ERRORS, PerThreadConnection, transaction
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.pipelines.transport import Consumer, Record

_CROSS_PROCESS_POLL_S = 0.05
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_topic ON records (topic, offset);
CREATE TABLE IF NOT EXISTS group_offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    committed INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
"""


class SqliteLog:
    """A :class:`~ehrbridge.pipelines.transport.Log` in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._connections = PerThreadConnection(self.path)
        self._appended = threading.Condition()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        now = time.time()
        rows = [(r.topic, r.key, r.value, orjson.dumps(dict(r.headers)), now) for r in records]
        try:
            with transaction(self._conn()) as conn:
                conn.executemany(
                    "INSERT INTO records (topic, key, value, headers, ts) VALUES (?,?,?,?,?)",
                    rows,
                )
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"embedded log {self.path.name}: {exc}") from exc
        with self._appended:
            self._appended.notify_all()

    def wait_for_append(self, timeout_s: float) -> None:
        with self._appended:
            self._appended.wait(min(timeout_s, _CROSS_PROCESS_POLL_S))

    def read(self, topic: str, *, after: int = -1, limit: int = 100) -> list[Record]:
        rows = self._conn().execute(
            "SELECT offset, key, value, headers, ts FROM records "
            "WHERE topic = ? AND offset > ? ORDER BY offset LIMIT ?",
            (topic, after, limit),
        )
        return [_record(topic, row) for row in rows]

    def unready(self, topic: str) -> str | None:
        """None once the file answers a one-row read (a broken file raises)."""
        self.read(topic, after=-1, limit=1)
        return None

    def committed(self, group: str, topic: str) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT committed FROM group_offsets WHERE grp = ? AND topic = ?", (group, topic)
            )
            .fetchone()
        )
        return int(row[0]) if row else -1

    def commit(self, group: str, topic: str, offset: int) -> None:
        try:
            self._conn().execute(
                "INSERT INTO group_offsets (grp, topic, committed) VALUES (?,?,?) "
                "ON CONFLICT (grp, topic) DO UPDATE"
                " SET committed = max(committed, excluded.committed)",
                (group, topic, offset),
            )
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"embedded log {self.path.name}: {exc}") from exc

    def end_offset(self, topic: str) -> int:
        row = (
            self._conn()
            .execute("SELECT max(offset) FROM records WHERE topic = ?", (topic,))
            .fetchone()
        )
        return int(row[0]) if row and row[0] is not None else -1

    def purge(self, topic: str, older_than: float, through_offset: int | None = None) -> int:
        """Delete a topic's records stored before ``older_than`` (epoch seconds).

        ``through_offset``: only records at or below it -- a consumer group's
        committed offset, so that nothing is deleted before it was processed.
        """
        limit = through_offset if through_offset is not None else self.end_offset(topic)
        try:
            with transaction(self._conn()) as conn:
                cursor = conn.execute(
                    "DELETE FROM records WHERE topic = ? AND ts < ? AND offset <= ?",
                    (topic, older_than, limit),
                )
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"embedded log {self.path.name}: {exc}") from exc
        return cursor.rowcount

    def topics(self) -> list[str]:
        rows = self._conn().execute("SELECT DISTINCT topic FROM records")
        return sorted(row[0] for row in rows)

    def count(self, topic: str) -> int:
        row = self._conn().execute("SELECT count(*) FROM records WHERE topic = ?", (topic,))
        return int(row.fetchone()[0])

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        return SqliteConsumer(self, group, topics)

    def close(self) -> None:
        self._connections.close()


class SqliteConsumer:
    """A consumer-group member on the embedded log (one member per group)."""

    def __init__(self, log: SqliteLog, group: str, topics: Sequence[str]) -> None:
        self.log = log
        self.group = group
        self.topics = list(topics)
        self._position = {t: log.committed(group, t) for t in self.topics}

    def poll(self, max_records: int = 500, timeout_s: float = 0.5) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self._fetch(max_records)
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0:
                return batch
            self.log.wait_for_append(remaining)

    def _fetch(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for topic in self.topics:
            records = self.log.read(topic, after=self._position[topic], limit=max_records)
            if records:
                self._position[topic] = records[-1].offset
                out.extend(records)
        return out

    def commit(self, records: Sequence[Record]) -> None:
        latest: dict[str, int] = {}
        for record in records:
            latest[record.topic] = max(latest.get(record.topic, -1), record.offset)
        for topic, offset in latest.items():
            self.log.commit(self.group, topic, offset)

    def rewind(self, records: Sequence[Record]) -> None:
        for record in records:
            current = self._position.get(record.topic, -1)
            self._position[record.topic] = min(current, record.offset - 1)

    def close(self) -> None:
        """Positions live in the log; nothing to release per member."""


def _record(topic: str, row: tuple[int, str, bytes, bytes, float]) -> Record:
    offset, key, value, headers, ts = row
    return Record(
        topic=topic,
        key=key,
        value=bytes(value),
        headers=orjson.loads(headers),
        partition=0,
        offset=offset,
        timestamp=ts,
    )
