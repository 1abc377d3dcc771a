"""The embedded state store: each patient's state document in one SQLite row.

Implements ``StateStore`` (``pipelines/state.py``); the changelog-backed store
(``kafka_state.py``) keeps its per-partition files with this class.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from ehrbridge.adapters._sqlite import DB_ERRORS, PerThreadConnection, transaction
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.pipelines.state import PatientState


class SqliteStateStore:
    """The embedded state store: one row per patient in a SQLite file."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._connections = PerThreadConnection(self.path, synchronous)
        self._conn().execute(
            "CREATE TABLE IF NOT EXISTS patient_state (patient_id TEXT PRIMARY KEY, doc BLOB)"
        )

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    def get(self, patient_id: str) -> PatientState | None:
        try:
            row = (
                self._conn()
                .execute("SELECT doc FROM patient_state WHERE patient_id = ?", (patient_id,))
                .fetchone()
            )
        except DB_ERRORS as exc:  # a disk that fails or a file that is not a database
            raise UpstreamUnavailable(f"state store {self.path.name}: {exc}") from exc
        return PatientState.from_json(row[0]) if row else None

    def put_many(self, states: Iterable[PatientState]) -> None:
        self.put_documents([(s.patient_id, s.to_json()) for s in states])

    def put_documents(self, rows: Sequence[tuple[str, bytes]]) -> None:
        """Store already serialised documents (patient id, ``to_json`` bytes)."""
        try:
            with transaction(self._conn()) as conn:
                conn.executemany(
                    "INSERT INTO patient_state (patient_id, doc) VALUES (?, ?) "
                    "ON CONFLICT (patient_id) DO UPDATE SET doc = excluded.doc",
                    rows,
                )
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"state store {self.path.name}: {exc}") from exc

    def patient_ids(self, limit: int = 1000) -> list[str]:
        rows = self._conn().execute(
            "SELECT patient_id FROM patient_state ORDER BY patient_id LIMIT ?", (limit,)
        )
        return [r[0] for r in rows]

    def close(self) -> None:
        self._connections.close()
