"""The result store in embedded SQLite: every prediction, in shadow and in live mode.

Keyed by the prediction identifier, so a replay updates a row instead of
adding one, exactly as the EHR does (``pipelines/results.py`` has the protocol).

A result's outputs are one JSON object (``{"<output>": fraction}``), named
as its model file names them, so any model's results fit the same table.
Stores created before that kept one REAL column per output: opening one
copies those columns into ``outputs`` and drops them (:func:`_migrate`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ehrbridge.adapters._sqlite import DB_ERRORS, PerThreadConnection, transaction
from ehrbridge.core.errors import UpstreamUnavailable
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.results import Delivery, StoredResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    identifier TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    anchor TEXT NOT NULL,
    outputs TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    prediction BLOB NOT NULL,
    observation BLOB NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    state_revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS results_by_patient ON results (patient_id, anchor);
"""

_PAGE = 16  # results read at a time when looking for the latest
# Identifiers per ``IN (...)`` query: under SQLite's default limit of 999 host parameters
# in builds before 3.32, so any sqlite3 (and SQLCipher) build takes it.
_IN_CHUNK = 500

# Columns added after a store may have been created: (name, definition).
_ADDED_COLUMNS = [("state_revision", "INTEGER NOT NULL DEFAULT 0")]

_COLUMNS = "identifier, patient_id, anchor, outputs, model, status, observation, state_revision"


class SqliteResultStore:
    """The result store in an embedded SQLite file (``data_dir/results.db``)."""

    def __init__(self, path: Path | str) -> None:
        self._connections = PerThreadConnection(Path(path))
        conn = self._connections.get()
        conn.executescript(_SCHEMA)
        present = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
        for name, definition in _ADDED_COLUMNS:
            if name not in present:
                conn.execute(f"ALTER TABLE results ADD COLUMN {name} {definition}")
        _migrate(conn)

    def upsert(self, items: Sequence[tuple[Prediction, dict[str, Any]]], status: Delivery) -> None:
        now = time.time()
        rows = [
            (
                p.identifier,
                p.patient_id,
                p.anchor.isoformat(),
                orjson.dumps(p.outputs).decode(),
                f"{p.model.name} {p.model.version} {p.model.calibration}",
                status.value,
                p.to_json(),
                orjson.dumps(obs),
                now,
                p.state_revision,
            )
            for p, obs in items
        ]
        self._write(
            "INSERT INTO results (identifier, patient_id, anchor, outputs, model, status,"
            " prediction, observation, updated_at, state_revision) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (identifier) DO UPDATE SET outputs = excluded.outputs,"
            " model = excluded.model, prediction = excluded.prediction,"
            " observation = excluded.observation, updated_at = excluded.updated_at,"
            " state_revision = excluded.state_revision,"
            # A delivered result stays delivered when a replay re-stores it.
            " status = CASE WHEN results.status = 'delivered' AND excluded.status = 'pending'"
            " THEN results.status ELSE excluded.status END"
            # A result computed from older state never replaces a newer one.
            " WHERE excluded.state_revision >= results.state_revision",
            rows,
        )

    def mark_delivered(self, identifiers: Sequence[str]) -> None:
        now = time.time()
        self._write(
            "UPDATE results SET status = 'delivered', delivered_at = ? WHERE identifier = ?",
            [(now, i) for i in identifiers],
        )

    def _write(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        try:
            with transaction(self._connections.get()) as conn:
                conn.executemany(sql, rows)
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"result store: {exc}") from exc

    def list(
        self,
        *,
        patient_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
        model: str | None = None,
    ) -> list[StoredResult]:
        """Newest first; ``model`` keeps one of the site's models' results."""
        where, args = _where(patient_id, model)
        rows = self._connections.get().execute(
            f"SELECT {_COLUMNS} FROM results {where}"
            " ORDER BY anchor DESC, identifier LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [_result(row) for row in rows]

    def get(self, identifier: str) -> StoredResult | None:
        row = (
            self._connections.get()
            .execute(
                f"SELECT {_COLUMNS} FROM results WHERE identifier = ?",
                (identifier,),
            )
            .fetchone()
        )
        return _result(row) if row else None

    def get_many(self, identifiers: Sequence[str]) -> dict[str, StoredResult]:
        """The stored results of ``identifiers``, by identifier; absent ones are left out.

        One query per :data:`_IN_CHUNK` identifiers, where :meth:`get` costs one per
        identifier: the write-back stage reads a whole batch's previous results at once.
        """
        wanted = list(dict.fromkeys(identifiers))
        found: dict[str, StoredResult] = {}
        conn = self._connections.get()
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM results WHERE identifier IN ({marks})", chunk
            )
            found.update((row[0], _result(row)) for row in rows)
        return found

    def latest(
        self, patient_id: str, not_after: datetime | None = None, *, model: str | None = None
    ) -> StoredResult | None:
        """The patient's newest result; with ``not_after``, the newest anchored by then.

        A result anchored in the future (stored before ingest refused future-dated
        results) must not hide the real latest one, on a card or anywhere else.
        """
        offset = 0
        while True:
            page = self.list(patient_id=patient_id, limit=_PAGE, offset=offset, model=model)
            for found in page:
                if not_after is None or datetime.fromisoformat(found.anchor) <= not_after:
                    return found
            if len(page) < _PAGE:
                return None
            offset += _PAGE

    def purge(self, older_than: float) -> int:
        """Delete results last updated before ``older_than`` (epoch seconds).

        A live result still ``pending`` -- not yet accepted by the EHR -- is
        kept whatever its age: a purge never removes what is not delivered.
        """
        try:
            with transaction(self._connections.get()) as conn:
                cursor = conn.execute(
                    "DELETE FROM results WHERE updated_at < ? AND status != ?",
                    (older_than, Delivery.PENDING.value),
                )
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"result store: {exc}") from exc
        return cursor.rowcount

    def count(
        self,
        status: Delivery | None = None,
        *,
        patient_id: str | None = None,
        model: str | None = None,
    ) -> int:
        where, args = _where(patient_id, model)
        if status is not None:
            where = f"{where} AND status = ?" if where else "WHERE status = ?"
            args.append(status.value)
        row = self._connections.get().execute(f"SELECT count(*) FROM results {where}", args)
        return int(row.fetchone()[0])

    def close(self) -> None:
        self._connections.close()


# Every column of the table: in an older store, any REAL column not listed is an output.
_KNOWN = frozenset(
    {"identifier", "patient_id", "anchor", "outputs", "model", "status", "prediction"}
    | {"observation", "updated_at", "delivered_at", "state_revision"}
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Move a pre-JSON store's per-output REAL columns into ``outputs``, in one transaction.

    The output names are the old column names, which are the names the model
    file gives its outputs, so old rows read back exactly as new ones do.
    """
    columns = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(results)")}
    old = [name for name, kind in columns.items() if name not in _KNOWN and kind == "REAL"]
    if not old:
        return
    pairs = ", ".join(f"'{name}', \"{name}\"" for name in old)
    with transaction(conn) as tx:
        if "outputs" not in columns:
            tx.execute("ALTER TABLE results ADD COLUMN outputs TEXT NOT NULL DEFAULT '{}'")
        tx.execute(f"UPDATE results SET outputs = json_object({pairs})")
        for name in old:
            tx.execute(f'ALTER TABLE results DROP COLUMN "{name}"')


def _where(patient_id: str | None, model: str | None) -> tuple[str, list[str]]:
    """``model`` is the first word of the ``model`` column ("kfre-4var 2016 north_american")."""
    clauses = [
        (clause, value)
        for clause, value in (
            ("patient_id = ?", patient_id),
            ("substr(model, 1, instr(model || ' ', ' ') - 1) = ?", model),
        )
        if value
    ]
    if not clauses:
        return "", []
    return "WHERE " + " AND ".join(c for c, _ in clauses), [v for _, v in clauses if v]


def _result(row: tuple[Any, ...]) -> StoredResult:
    identifier, patient_id, anchor, outputs, model, status, observation, revision = row
    return StoredResult(
        identifier,
        patient_id,
        anchor,
        orjson.loads(outputs),
        model,
        status,
        orjson.loads(observation),
        revision,
    )
