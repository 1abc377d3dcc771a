"""The evaluation store: outcome events and each prediction's link, kept between evaluations.

``ehrbridge evaluate`` used to read every event and link every prediction
afresh. Kept here (``<data_dir>/evaluation/links.sqlite``, or the backfill's
beside its results), an evaluation feeds only what is new and re-links only
the predictions it can change (``evaluation/linkage.py``, :class:`LinkBook`):

- an event is stored once (its kind, patient, time, code and value are its
  key), so feeding the same export twice changes nothing and names no
  patient as changed;
- a patient is *changed* when a new event of theirs arrives, or when an
  event already stored falls due: dated after the last evaluation's as-of
  time and at or before this one's (it was not known then);
- an evaluation as of a time before the last one re-links everything.

Live traffic feeds it too: ``evaluate`` reads the records the site's
ingest stored in its embedded log since the offset it last read (kept in
``meta``), so ADT/ORU and FHIR resources received live become events
before the log's retention purges them.

Links are stored by (prediction identifier, horizon) with the as-of time
they were computed at, so the pending and censored counts of the last
evaluation can be read back without recomputing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from ehrbridge.adapters._sqlite import DB_ERRORS, PerThreadConnection, transaction
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.evaluation.linkage import Link, Status
from ehrbridge.evaluation.outcomes import Event, EventKind

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcome_event (
    patient_id TEXT NOT NULL, kind TEXT NOT NULL, at TEXT NOT NULL,
    code TEXT NOT NULL, value REAL NOT NULL,  -- NaN-free: -1e308 stands for "no value"
    PRIMARY KEY (patient_id, kind, at, code, value)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outcome_event_at ON outcome_event (at);
CREATE TABLE IF NOT EXISTS link (
    prediction TEXT NOT NULL, horizon TEXT NOT NULL, status TEXT NOT NULL,
    at TEXT, reason TEXT NOT NULL, as_of TEXT NOT NULL,
    PRIMARY KEY (prediction, horizon)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_NO_VALUE = -1e308  # a primary key column cannot usefully hold NULL (NULLs never collide)


class SqliteLinkStore:
    """Outcome events and links in one SQLite file (``evaluation/links.sqlite``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # A copy of what the exports and the result store hold: rebuilt by a rerun.
        self._connections = PerThreadConnection(self.path, "NORMAL")
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    def add(self, events: Iterable[Event]) -> set[str]:
        """Store the events not stored yet; the patients who had one."""
        changed: set[str] = set()
        try:
            with transaction(self._conn()) as conn:
                for e in events:
                    value = _NO_VALUE if e.value is None else e.value
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO outcome_event VALUES (?,?,?,?,?)",
                        (e.patient_id, e.kind.value, e.at.isoformat(), e.code, value),
                    )
                    if cursor.rowcount:
                        changed.add(e.patient_id)
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"evaluation store {self.path.name}: {exc}") from exc
        return changed

    def reset_unless(self, spec: str) -> None:
        """Start over when the outcome's definition changed: its events were read by the old one."""
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'spec'").fetchone()
        if row and row[0] == spec:
            return
        with transaction(self._conn()) as conn:
            for table in ("outcome_event", "link", "meta"):
                conn.execute(f"DELETE FROM {table}")  # fixed names, no input
            conn.execute("INSERT INTO meta VALUES ('spec', ?)", (spec,))

    def events(self) -> list[Event]:
        rows = self._conn().execute("SELECT patient_id, kind, at, code, value FROM outcome_event")
        return [
            Event(
                datetime.fromisoformat(at),
                pid,
                EventKind(kind),
                None if value == _NO_VALUE else value,
                code,
            )
            for pid, kind, at, code, value in rows
        ]

    def falling_due(self, since: datetime, until: datetime) -> set[str]:
        """Patients with an event dated in (since, until]: unknown as of ``since``.

        ISO 8601 text compares in time order only in one offset; every stored
        time is compared as a datetime here, so mixed offsets stay correct.
        """
        rows = self._conn().execute("SELECT patient_id, at FROM outcome_event")
        return {pid for pid, at in rows if since < datetime.fromisoformat(at) <= until}

    def meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with transaction(self._conn()) as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def last_as_of(self) -> datetime | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'as_of'").fetchone()
        return datetime.fromisoformat(row[0]) if row else None

    def links(self) -> dict[tuple[str, str], Link]:
        rows = self._conn().execute("SELECT prediction, horizon, status, at, reason FROM link")
        return {
            (pid, horizon): Link(
                Status(status), horizon, datetime.fromisoformat(at) if at else None, reason
            )
            for pid, horizon, status, at, reason in rows
        }

    def save_links(self, links: Mapping[tuple[str, str], Link], as_of: datetime) -> None:
        """Replace the stored links with ``links``, computed as of ``as_of``."""
        stamp = as_of.isoformat()
        rows = [
            (pid, horizon, link.status.value, link.at.isoformat() if link.at else None,
             link.reason, stamp)
            for (pid, horizon), link in links.items()
        ]  # fmt: skip
        try:
            with transaction(self._conn()) as conn:
                conn.execute("DELETE FROM link")
                conn.executemany("INSERT INTO link VALUES (?,?,?,?,?,?)", rows)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('as_of', ?)", (stamp,))
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"evaluation store {self.path.name}: {exc}") from exc

    def close(self) -> None:
        self._connections.close()
