"""The message index: what the console's message search reads, in one SQLite file.

The stored messages are records on the site's log (``<site>.raw`` for what
was ACKed AA, ``<site>.dlq`` for what was refused or failed later), on SQLite
or on Kafka. Neither can be searched by control id or MRN without reading
everything, so this index keeps one row per record -- the position, MSH-10,
the patient key, when it was received, the outcome and the reason -- and
never the message itself: the raw bytes stay on the log, read by offset.

It is derived data: :meth:`MessageIndex.catch_up` reads the log from where it
stopped (a position per topic, kept here), so it can be deleted and rebuilt;
rows of records that retention purged from the log are dropped as it goes.

Outcomes: ``AA`` (stored, acknowledged AA), ``AE`` and ``AR`` (refused at
ingest; MSA-1 as ``pipelines/ack.py`` chooses it: a usable-but-wrong message
is AE, anything else AR) and ``failed`` (ACKed AA, dead-lettered by a later
stage: processing or write-back).

Schema versions (``PRAGMA user_version``), applied in order on open:
1. the ``messages`` table and its indexes, one per search the console offers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ehrbridge.adapters._sqlite import PerThreadConnection, transaction
from ehrbridge.pipelines.transport import Log, Record, topic_name

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE messages (
        topic TEXT NOT NULL,          -- 'raw' or 'dlq'
        offset INTEGER NOT NULL,      -- the record's position on that topic
        control_id TEXT,              -- MSH-10 (FHIR: the resource id)
        patient TEXT,                 -- the key it is stored under (the MRN)
        received_at REAL NOT NULL,    -- epoch seconds
        outcome TEXT NOT NULL,        -- AA, AE, AR, failed
        reason TEXT,                  -- the dead letter's reason code
        stage TEXT,
        kind TEXT,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (topic, offset)
    );
    CREATE TABLE positions (topic TEXT PRIMARY KEY, after INTEGER NOT NULL);
    CREATE INDEX messages_by_control_id ON messages (control_id);
    CREATE INDEX messages_by_patient ON messages (patient, received_at);
    CREATE INDEX messages_by_time ON messages (received_at);
    CREATE INDEX messages_by_outcome ON messages (outcome, received_at);
    CREATE INDEX messages_by_reason ON messages (reason, received_at);
    """,
)
_INGEST_REFUSALS = {"MessageUnusable": "AE"}  # pipelines/ack.py: ack_code_for
OUTCOMES = ("AA", "AE", "AR", "failed")
_COLUMNS = "topic, offset, control_id, patient, received_at, outcome, reason, stage, kind, bytes"


@dataclass(frozen=True, slots=True)
class IndexedMessage:
    topic: str
    offset: int
    control_id: str | None
    patient: str | None
    received_at: float
    outcome: str
    reason: str | None
    stage: str | None
    kind: str | None
    bytes: int

    def received(self) -> datetime:
        return datetime.fromtimestamp(self.received_at, UTC)


@dataclass(frozen=True, slots=True)
class Search:
    """Every filter given must hold; times are epoch seconds, ``until`` exclusive."""

    control_id: str | None = None
    patient: str | None = None
    since: float | None = None
    until: float | None = None
    outcome: str | None = None
    reason: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        values: list[Any] = []
        for column, value in (
            ("control_id = ?", self.control_id),
            ("patient = ?", self.patient),
            ("received_at >= ?", self.since),
            ("received_at < ?", self.until),
            ("outcome = ?", self.outcome),
            ("reason = ?", self.reason),
        ):
            if value is not None:
                clauses.append(column)
                values.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", values


class MessageIndex:
    """Search over a site's stored messages by control id, MRN, time, outcome, reason."""

    def __init__(self, path: Path | str, site: str) -> None:
        self.path = Path(path)
        self.site = site
        self._connections = PerThreadConnection(self.path, synchronous="NORMAL")
        migrate(self._conn())

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    def catch_up(self, log: Log, batch: int = 5000, most: int = 200_000) -> int:
        """Index what the log holds past the stored positions (at most ``most`` records),
        and forget what retention purged from the log since (``forget_purged``)."""
        done = 0
        for topic in ("raw", "dlq"):
            self.forget_purged(log, topic)
            while done < most:
                records = log.read(
                    topic_name(self.site, topic), after=self.position(topic), limit=batch
                )
                if not records:
                    break
                self.add(topic, records)
                done += len(records)
        return done

    def forget_purged(self, log: Log, topic: str) -> int:
        """Drop the rows of records the log no longer holds: retention purges the log
        (``ehrbridge/retention.py``), and MRNs must not outlive it here."""
        first = log.read(topic_name(self.site, topic), after=-1, limit=1)
        if not first:  # empty, or (Kafka) no answer in time: a wrong guess would lose the index
            return 0
        with transaction(self._conn()) as conn:
            gone = conn.execute(
                "DELETE FROM messages WHERE topic = ? AND offset < ?", (topic, first[0].offset)
            )
        return gone.rowcount

    def position(self, topic: str) -> int:
        row = self._conn().execute("SELECT after FROM positions WHERE topic = ?", (topic,))
        found = row.fetchone()
        return int(found[0]) if found else -1

    def add(self, topic: str, records: Sequence[Record]) -> None:
        rows = [row_of(topic, r) for r in records]
        with transaction(self._conn()) as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO messages ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows
            )
            conn.execute(
                "INSERT INTO positions (topic, after) VALUES (?, ?) "
                "ON CONFLICT (topic) DO UPDATE SET after = max(after, excluded.after)",
                (topic, max(r.offset for r in records)),
            )

    def search(self, query: Search, limit: int = 50, offset: int = 0) -> list[IndexedMessage]:
        where, values = query.where()
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM messages{where} "
            "ORDER BY received_at DESC, offset DESC LIMIT ? OFFSET ?",
            (*values, limit, offset),
        )
        return [IndexedMessage(*row) for row in rows]

    def count(self, query: Search) -> int:
        where, values = query.where()
        row = self._conn().execute(f"SELECT count(*) FROM messages{where}", values).fetchone()
        return int(row[0])

    def search_unindexed(self, query: Search, limit: int = 50) -> int:
        """One page and the total by full scans (``NOT INDEXED``): the benchmark's baseline."""
        where, values = query.where()
        table = "messages NOT INDEXED"
        self._conn().execute(
            f"SELECT {_COLUMNS} FROM {table}{where} ORDER BY received_at DESC, offset DESC LIMIT ?",
            (*values, limit),
        ).fetchall()
        row = self._conn().execute(f"SELECT count(*) FROM {table}{where}", values).fetchone()
        return int(row[0])

    def per_minute(self, since: float, minutes: int) -> list[int]:
        """Messages received in each minute from ``since`` (ACKed or refused; not the
        dead letters of later stages, which were counted when they arrived)."""
        rows = self._conn().execute(
            "SELECT CAST((received_at - ?) / 60 AS INTEGER), count(*) FROM messages "
            "WHERE received_at >= ? AND received_at < ? AND outcome != 'failed' GROUP BY 1",
            (since, since, since + minutes * 60),
        )
        counts = [0] * minutes
        for minute, count in rows:
            counts[int(minute)] = int(count)
        return counts

    def reasons(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT DISTINCT reason FROM messages WHERE reason IS NOT NULL ORDER BY reason"
        )
        return [str(r[0]) for r in rows]

    def by_control_id(self, control_id: str) -> list[IndexedMessage]:
        return self.search(Search(control_id=control_id), limit=100)

    def close(self) -> None:
        self._connections.close()


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the file to the newest schema, one version per transaction."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        with transaction(conn):
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


def row_of(topic: str, record: Record) -> tuple[Any, ...]:
    h = record.headers
    received = _epoch(h.get("received_at")) or record.timestamp or 0.0
    return (
        topic,
        record.offset,
        h.get("source_id"),
        record.key or None,
        received,
        _outcome(topic, h),
        h.get("error.reason"),
        h.get("error.stage"),
        h.get("kind"),
        len(record.value),
    )


def _outcome(topic: str, headers: Mapping[str, str]) -> str:
    if topic == "raw":
        return "AA"
    if headers.get("error.stage") == "ingest":
        return _INGEST_REFUSALS.get(headers.get("error.class", ""), "AR")
    return "failed"


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
