"""Search execution over the store's index: matching, sorting, keyset paging."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from ehrbridge.sandbox.fhir.index import EMPTY_IDS, IndexKey
from ehrbridge.sandbox.fhir.instants import instant_matches
from ehrbridge.sandbox.fhir.query import SearchQuery
from ehrbridge.sandbox.fhir.versions import StoredVersion, TypeTable


@dataclass(slots=True)
class SearchResult:
    """One page of matches; navigation as ``(parameter, value)`` to add to the query."""

    versions: list[StoredVersion]
    total: int
    next_page: tuple[str, str] | None = None
    previous_page: tuple[str, str] | None = None
    this_page: tuple[str, str] | None = None


class Searcher:
    """Runs one query against one type table (caller holds the store lock)."""

    def __init__(self, table: TypeTable, query: SearchQuery) -> None:
        self.table = table
        self.query = query
        self.filtered = bool(query.groups or query.id_groups)
        self.seqs = self._candidate_seqs()

    def _candidate_seqs(self) -> Sequence[int]:
        ids: set[str] | frozenset[str] | None = None
        for group in self.query.groups:
            found = self._union(group)
            ids = found if ids is None else ids & found
        for wanted in self.query.id_groups:
            found_ids = {i for i in wanted if self._live(i)}
            ids = found_ids if ids is None else ids & found_ids
        if ids is None:
            return range(len(self.table.order))  # every resource, in creation order
        versions = self.table.versions
        return sorted(versions[i][-1].seq for i in ids)

    def _union(self, group: list[IndexKey]) -> set[str] | frozenset[str]:
        index = self.table.index
        if len(group) == 1:
            return index.get(group[0], EMPTY_IDS)  # shared; never mutated here
        return set().union(*(index.get(key, EMPTY_IDS) for key in group))

    def _live(self, resource_id: str) -> bool:
        current = self.table.current(resource_id)
        return current is not None and not current.deleted

    def _match(self, seq: int) -> StoredVersion | None:
        version = self.table.versions[self.table.order[seq]][-1]
        if version.deleted:
            return None
        for prefix, low, high in self.query.last_updated:
            if not instant_matches(prefix, low, high, version.last_updated_us):
                return None
        return version

    def _total(self) -> int:
        if self.query.last_updated:
            return sum(1 for seq in self.seqs if self._match(seq) is not None)
        return len(self.seqs) if self.filtered else self.table.live

    def run(self) -> SearchResult:
        query = self.query
        total = self._total()
        if query.count == 0 or query.summary_count:
            return SearchResult([], total)
        if query.sort is not None:
            return self._sorted_page(total)
        if query.cursor is not None:
            direction, seq = query.cursor
            cursor = ("_cursor", f"{direction}{seq}")
            if direction == "a":
                return self._forward(bisect.bisect_right(self.seqs, seq), total, cursor)
            return self._backward(bisect.bisect_left(self.seqs, seq), total, cursor)
        offset = ("_offset", str(query.offset)) if query.offset else None
        return self._forward(self._skip(query.offset), total, offset)

    def _collect(self, start: int, step: int, limit: int) -> list[StoredVersion]:
        found: list[StoredVersion] = []
        index = start
        while 0 <= index < len(self.seqs) and len(found) < limit:
            version = self._match(self.seqs[index])
            if version is not None:
                found.append(version)
            index += step
        return found

    def _skip(self, offset: int) -> int:
        """Index into ``seqs`` after the first ``offset`` matches."""
        if self.filtered and not self.query.last_updated:
            return offset  # index hits are all live and unfiltered by time
        index = 0
        while offset and index < len(self.seqs):
            offset -= self._match(self.seqs[index]) is not None
            index += 1
        return index

    def _forward(self, start: int, total: int, this_page: tuple[str, str] | None) -> SearchResult:
        count = self.query.count
        page = self._collect(start, 1, count + 1)
        result = SearchResult(page[:count], total, this_page=this_page)
        if not result.versions:
            return result
        if len(page) > count:
            result.next_page = ("_cursor", f"a{result.versions[-1].seq}")
        if self._collect(start - 1, -1, 1):
            result.previous_page = ("_cursor", f"b{result.versions[0].seq}")
        return result

    def _backward(self, end: int, total: int, this_page: tuple[str, str]) -> SearchResult:
        count = self.query.count
        page = self._collect(end - 1, -1, count + 1)
        result = SearchResult(page[:count][::-1], total, this_page=this_page)
        if not result.versions:
            return result
        if len(page) > count:
            result.previous_page = ("_cursor", f"b{result.versions[0].seq}")
        if self._collect(end, 1, 1):
            result.next_page = ("_cursor", f"a{result.versions[-1].seq}")
        return result

    def _sorted_page(self, total: int) -> SearchResult:
        query = self.query
        assert query.sort is not None
        matches = [v for seq in self.seqs if (v := self._match(seq)) is not None]
        if query.sort.endswith("_id"):
            matches.sort(key=lambda v: v.id, reverse=query.sort.startswith("-"))
        else:
            matches.sort(
                key=lambda v: (v.last_updated_us, v.seq), reverse=query.sort.startswith("-")
            )
        start, count = query.offset, query.count
        result = SearchResult(matches[start : start + count], total)
        if start:
            result.this_page = ("_offset", str(start))
            result.previous_page = ("_offset", str(max(0, start - count)))
        if start + count < len(matches):
            result.next_page = ("_offset", str(start + count))
        return result
