"""The versioned, thread-safe resource store, with its optional journal."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ehrbridge.sandbox.fhir.index import IndexKey, index_keys
from ehrbridge.sandbox.fhir.instants import format_instant
from ehrbridge.sandbox.fhir.query import SearchQuery
from ehrbridge.sandbox.fhir.search import Searcher, SearchResult
from ehrbridge.sandbox.fhir.versions import StoredVersion, TypeTable


class FhirStore:
    """Versioned in-memory resources with a token/reference index.

    Thread-safe: every method takes ``lock`` (re-entrant); hold it yourself to
    make a read-then-write sequence atomic. ``lastUpdated`` is strictly
    increasing across the store, so ``_lastUpdated=gt<last seen>`` polling
    never misses a write.

    With a ``journal`` file the store outlives its process: every write and
    undo is appended to the file (one unbuffered write each, so a killed
    process keeps all it answered for) and replayed, timestamps and versions
    unchanged, when a store is opened on the same file.
    """

    def __init__(self, journal: Path | None = None) -> None:
        self.lock = threading.RLock()
        self._tables: dict[str, TypeTable] = {}
        self._last_us = 0
        self._journal: BinaryIO | None = None
        if journal is not None:
            self._replay(journal)
            self._journal = journal.open("ab", buffering=0)

    def _table(self, resource_type: str) -> TypeTable:
        table = self._tables.get(resource_type)
        if table is None:
            table = self._tables[resource_type] = TypeTable()
        return table

    def clock_us(self) -> int:
        """Now on the store's clock: never behind the last stamp it gave."""
        return max(time.time_ns() // 1000, self._last_us)

    def _tick(self) -> int:
        now_us = time.time_ns() // 1000
        self._last_us = max(now_us, self._last_us + 1)
        return self._last_us

    def write(
        self, resource_type: str, resource_id: str, resource: dict[str, Any] | None
    ) -> StoredVersion:
        """Store the next version of ``resource_type/resource_id``; ``None`` deletes.

        ``meta.versionId``/``meta.lastUpdated`` (and ``id``, ``resourceType``)
        are set by the store; other ``meta`` elements are kept.
        """
        with self.lock:
            previous = self.current(resource_type, resource_id)
            stamp = self._tick()
            body: bytes | None = None
            keys: tuple[IndexKey, ...] = ()
            if resource is not None:
                version_id = previous.version_id + 1 if previous else 1
                instant = format_instant(stamp)
                stamped = _stamped(resource, resource_type, resource_id, version_id, instant)
                body = orjson.dumps(stamped)
                keys = index_keys(stamped)
            self._log(b"W", resource_type, resource_id, b"%d %s" % (stamp, body or b"-"))
            return self._put(resource_type, resource_id, stamp, body, keys)

    def _put(
        self,
        resource_type: str,
        resource_id: str,
        stamp: int,
        body: bytes | None,
        keys: tuple[IndexKey, ...],
    ) -> StoredVersion:
        table = self._table(resource_type)
        chain = table.versions.get(resource_id)
        previous = chain[-1] if chain else None
        version = StoredVersion(
            resource_type,
            resource_id,
            previous.version_id + 1 if previous else 1,
            previous.seq if previous else len(table.order),
            format_instant(stamp),
            stamp,
            body,
            keys,
        )
        if chain is None:
            table.versions[resource_id] = [version]
            table.order.append(resource_id)
        else:
            chain.append(version)
        table.reindex(resource_id, previous, version)
        return version

    def _log(self, kind: bytes, resource_type: str, resource_id: str, rest: bytes = b"") -> None:
        # One line per change; ids and types never hold spaces (R4 "id" syntax), and
        # orjson never writes a raw newline, so a line is one whole change.
        if self._journal is not None:
            line = b" ".join((kind, resource_type.encode(), resource_id.encode(), rest))
            self._journal.write(line + b"\n")

    def _replay(self, journal: Path) -> None:
        if not journal.exists():
            return
        with journal.open("rb") as lines:
            for line in lines:
                if not line.endswith(b"\n"):
                    return  # the process died mid-line: that change was never answered
                self._redo(*line[:-1].decode().split(" ", 3))

    def _redo(self, kind: str, resource_type: str, resource_id: str, rest: str = "") -> None:
        if kind == "U":
            self._undo(self._tables[resource_type], resource_id)
            return
        stamp, _, body = rest.partition(" ")
        self._last_us = int(stamp)
        content = None if body == "-" else body.encode()
        keys = index_keys(orjson.loads(content)) if content is not None else ()
        self._put(resource_type, resource_id, int(stamp), content, keys)

    def undo(self, version: StoredVersion) -> None:
        """Remove ``version``, which must be the newest write to its resource type."""
        with self.lock:
            table = self._tables[version.resource_type]
            if table.versions[version.id][-1] is not version:
                raise ValueError(f"{version.reference}: only the newest version can be undone")
            if len(table.versions[version.id]) == 1 and table.order[-1] != version.id:
                raise ValueError(f"{version.reference}: not the newest creation")
            self._log(b"U", version.resource_type, version.id)
            self._undo(table, version.id)

    @staticmethod
    def _undo(table: TypeTable, resource_id: str) -> None:
        chain = table.versions[resource_id]
        version = chain.pop()
        previous = chain[-1] if chain else None
        if previous is None:
            del table.versions[resource_id]
            table.order.pop()
        table.reindex(resource_id, version, previous)

    def current(self, resource_type: str, resource_id: str) -> StoredVersion | None:
        """The newest version (possibly a deletion), or ``None`` if never written."""
        with self.lock:
            table = self._tables.get(resource_type)
            return table.current(resource_id) if table else None

    def history(self, resource_type: str, resource_id: str) -> list[StoredVersion]:
        """Every version, oldest first."""
        with self.lock:
            table = self._tables.get(resource_type)
            return list(table.versions.get(resource_id, ())) if table else []

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current resource as a fresh dict, or ``None`` if absent or deleted."""
        version = self.current(resource_type, resource_id)
        return None if version is None or version.deleted else version.resource()

    def search(self, resource_type: str, query: SearchQuery) -> SearchResult:
        with self.lock:
            table = self._tables.get(resource_type)
            if table is None:
                return SearchResult([], 0)
            return Searcher(table, query).run()

    def counts(self) -> dict[str, int]:
        """Live (not deleted) resources per type."""
        with self.lock:
            return {name: table.live for name, table in sorted(self._tables.items()) if table.live}

    def reset(self) -> None:
        with self.lock:
            self._tables.clear()
            if self._journal is not None:
                self._journal.truncate(0)

    def close(self) -> None:
        with self.lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None


def _stamped(
    resource: Mapping[str, Any], resource_type: str, resource_id: str, version_id: int, instant: str
) -> dict[str, Any]:
    meta = resource.get("meta")
    kept = (
        {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if isinstance(meta, dict)
        else {}
    )
    stamped: dict[str, Any] = {
        "resourceType": resource_type,
        "id": resource_id,
        "meta": {"versionId": str(version_id), "lastUpdated": instant, **kept},
    }
    for key, value in resource.items():
        if key not in stamped:
            stamped[key] = value
    return stamped
