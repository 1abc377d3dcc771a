"""SQLite helpers shared by the embedded log, state store and result store.

Encryption at rest: a data directory registered with :func:`encrypt_under` has
every SQLite file below it opened through SQLCipher (``sqlcipher3``, AES-256),
with the site's key. Stores catch :data:`DB_ERRORS`, which holds SQLCipher's
error classes beside sqlite3's: they are separate hierarchies.
"""

from __future__ import annotations

import hashlib
import importlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import cast

from ehrbridge.core.errors import ConfigError


def _sqlcipher() -> ModuleType | None:
    try:
        return importlib.import_module("sqlcipher3.dbapi2")
    except ImportError:
        return None


_SQLCIPHER = _sqlcipher()
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,) + (
    (cast(type[Exception], _SQLCIPHER.Error),) if _SQLCIPHER else ()
)
_KEYS: dict[Path, str] = {}  # data directory -> hex of the 256-bit raw key
_KEYS_LOCK = threading.Lock()


class EncryptionUnavailable(RuntimeError):
    """A key is configured but the SQLCipher binding is not installed."""


def encrypt_under(directory: Path, secret: str) -> None:
    """Open every SQLite file below ``directory`` encrypted with ``secret``.

    The secret (from the environment or a key file, never the YAML) is hashed to
    SQLCipher's 256-bit raw key, so no PBKDF2 runs per connection: use a random
    secret (``openssl rand -hex 32``), not a pass phrase.
    """
    if _SQLCIPHER is None:
        raise EncryptionUnavailable(
            "storage encryption is configured but sqlcipher3 is not installed "
            "(pip install 'ehrbridge[encryption]')"
        )
    with _KEYS_LOCK:
        _KEYS[directory.resolve()] = hashlib.sha256(secret.encode()).hexdigest()


def _key_for(path: Path) -> str | None:
    with _KEYS_LOCK:
        if not _KEYS:
            return None
        where = path.resolve()
        return next((_KEYS[d] for d in (where, *where.parents) if d in _KEYS), None)


def _open(path: Path, readonly: bool = False) -> sqlite3.Connection:
    # mode=ro: a reader beside a live site can never write, and a missing file
    # is an error rather than a new empty store.
    target = f"{path.resolve().as_uri()}?mode=ro" if readonly else str(path)
    key = _key_for(path)
    if key is None:
        return sqlite3.connect(
            target, timeout=30.0, isolation_level=None, check_same_thread=False, uri=readonly
        )
    assert _SQLCIPHER is not None  # encrypt_under refused without it
    conn = cast(
        sqlite3.Connection,
        _SQLCIPHER.connect(
            target, timeout=30.0, isolation_level=None, check_same_thread=False, uri=readonly
        ),
    )
    conn.execute("PRAGMA cipher_log_level = NONE")  # its own stderr lines say nothing we don't
    conn.execute(f"PRAGMA key = \"x'{key}'\"")
    try:  # the key is checked on first read: a wrong key reads as "not a database"
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except DB_ERRORS as exc:
        conn.close()
        raise ConfigError(
            f"{path}: the storage key does not open this file (another key, "
            "or a file written before encryption was turned on)",
            field="encryption",
        ) from exc
    return conn


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection tuned for durable, concurrent use.

    WAL lets readers run beside the one writer; ``synchronous=FULL`` fsyncs
    the WAL on every commit, so a committed write survives kill -9 and power
    loss. ``NORMAL`` is for files that are a copy of something durable
    elsewhere: a commit still survives kill -9 (the OS has it) and commits
    stay in order, but a power loss may undo the last few. Autocommit mode:
    callers open transactions explicitly.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    conn = _open(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection (``mode=ro``), encrypted when ``path`` is under a key."""
    return _open(path, readonly=True)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class PerThreadConnection:
    """One connection per thread to one SQLite file (connections are not thread-safe)."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = path
        self.synchronous = synchronous
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.synchronous)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (call once, at shutdown)."""
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
