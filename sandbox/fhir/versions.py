"""A stored resource version, and the per-type table of versions and index postings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ehrbridge.sandbox.fhir.index import IndexKey


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One immutable version of a resource; ``body`` is ``None`` for a deletion."""

    resource_type: str
    id: str
    version_id: int
    seq: int  # creation position within its type; orders searches and cursors
    last_updated: str
    last_updated_us: int
    body: bytes | None
    index_keys: tuple[IndexKey, ...] = ()

    @property
    def deleted(self) -> bool:
        return self.body is None

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    def resource(self) -> dict[str, Any]:
        """A fresh decoded copy of the resource (callers may mutate it)."""
        if self.body is None:
            raise ValueError(f"{self.reference} version {self.version_id} is a deletion")
        decoded: dict[str, Any] = orjson.loads(self.body)
        return decoded


class TypeTable:
    """All resources of one type: version chains, creation order, search index."""

    __slots__ = ("index", "live", "order", "versions")

    def __init__(self) -> None:
        self.order: list[str] = []  # ids by creation; a position is a StoredVersion.seq
        self.versions: dict[str, list[StoredVersion]] = {}
        self.index: dict[IndexKey, set[str]] = {}
        self.live = 0

    def current(self, resource_id: str) -> StoredVersion | None:
        chain = self.versions.get(resource_id)
        return chain[-1] if chain else None

    def reindex(
        self, resource_id: str, old: StoredVersion | None, new: StoredVersion | None
    ) -> None:
        self.live += (new is not None and not new.deleted) - (old is not None and not old.deleted)
        old_keys = old.index_keys if old is not None else ()
        new_keys = new.index_keys if new is not None else ()
        if old_keys == new_keys:
            return
        for key in old_keys:
            ids = self.index[key]
            ids.discard(resource_id)
            if not ids:
                del self.index[key]
        for key in new_keys:
            self.index.setdefault(key, set()).add(resource_id)
