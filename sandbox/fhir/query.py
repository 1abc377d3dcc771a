"""Search parameters parsed into a :class:`SearchQuery` (R4 search.html)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ehrbridge.sandbox.fhir.errors import bad_request
from ehrbridge.sandbox.fhir.index import IndexKey, normalize_reference
from ehrbridge.sandbox.fhir.instants import datetime_range
from ehrbridge.sandbox.fhir.spec import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, R4_RESOURCE_TYPES, short

_TOKEN_PARAMS = frozenset({"identifier", "code", "category", "status"})
_REFERENCE_PARAMS = frozenset({"subject", "patient"})
_SORTS = frozenset({"_lastUpdated", "-_lastUpdated", "_id", "-_id"})
# Result parameters this server ignores without calling them unknown.
_QUIET_PARAMS = frozenset({"_format", "_pretty", "_elements"})
_DATE_PREFIXES = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
# Chained searches on the subject's identifier (what HAPI answers for a literal
# reference). Here they match the Reference's own identifier, which every
# Observation ehrbridge writes carries beside the reference.
_CHAINED_IDENTIFIER = frozenset({"subject.identifier", "patient.identifier"})
_FILTER_PARAMS = _TOKEN_PARAMS | _REFERENCE_PARAMS | _CHAINED_IDENTIFIER | {"_id", "_lastUpdated"}


@dataclass(slots=True)
class SearchQuery:
    """A parsed search: AND of OR-groups of index keys, plus result parameters."""

    count: int = DEFAULT_PAGE_SIZE
    groups: list[list[IndexKey]] = field(default_factory=list)
    id_groups: list[set[str]] = field(default_factory=list)
    last_updated: list[tuple[str, int, int]] = field(default_factory=list)
    cursor: tuple[str, int] | None = None
    offset: int = 0
    sort: str | None = None
    summary_count: bool = False
    accurate_total: bool = False  # _total=accurate
    used: list[tuple[str, str]] = field(default_factory=list)  # echoed in Bundle.link
    ignored: list[str] = field(default_factory=list)

    @property
    def wants_total(self) -> bool:
        """Whether every page states Bundle.total (HAPI: _total=accurate, or a count only)."""
        return self.accurate_total or self.summary_count or self.count == 0

    @property
    def has_criteria(self) -> bool:
        return bool(self.groups or self.id_groups or self.last_updated)

    def criteria_key(self) -> str:
        """Order-independent spelling of the criteria (duplicate detection)."""
        return "&".join(f"{name}={value}" for name, value in sorted(self.used))


def _split_escaped(text: str, separator: str, maxsplit: int = -1) -> list[str]:
    r"""Split at ``separator`` unless escaped as ``\,`` ``\|`` (R4 search.html#escaping)."""
    if "\\" not in text:
        return text.split(separator, maxsplit)
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            current.append(text[index + 1])
            index += 2
            continue
        if char == separator and (maxsplit < 0 or len(parts) < maxsplit):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def _token_query_key(param: str, value: str) -> IndexKey:
    pieces = _split_escaped(value, "|", 1)
    if len(pieces) == 1:
        return (param, "code", pieces[0])
    system, code = pieces
    if not system:
        return (param, "nosys", code)
    if not code:
        return (param, "sysonly", system)
    return (param, "sys", system, code)


def _reference_query_key(param: str, modifier: str, value: str) -> IndexKey:
    if modifier:
        return (
            param,
            "ref",
            normalize_reference(f"{modifier}/{value}" if "/" not in value else value),
        )
    normal = normalize_reference(value)
    return (param, "ref", normal) if "/" in normal else (param, "id", normal)


def _parse_filter(query: SearchQuery, name: str, modifier: str, value: str) -> None:
    values = _split_escaped(value, ",")
    if name in _TOKEN_PARAMS:
        if modifier:
            raise bad_request(
                f"search parameter '{name}' does not support the modifier ':{short(modifier)}'"
            )
        query.groups.append([_token_query_key(name, v) for v in values])
    elif name in _CHAINED_IDENTIFIER and not modifier:
        reference = name.split(".", 1)[0]
        query.groups.append([_token_query_key(f"{reference}:identifier", v) for v in values])
    elif name in _REFERENCE_PARAMS:
        if modifier == "identifier":
            # As HAPI JPA, the server hospitals run most: it refuses the modifier.
            raise bad_request(
                f"{name}:identifier is not supported, as on HAPI FHIR JPA (HAPI-2498); "
                f"search {name}.identifier=system|value"
            )
        if not modifier or modifier in R4_RESOURCE_TYPES:
            query.groups.append([_reference_query_key(name, modifier, v) for v in values])
        else:
            raise bad_request(
                f"search parameter '{name}' does not support the modifier ':{short(modifier)}'"
            )
    elif name == "_id":
        query.id_groups.append(set(values))
    else:  # _lastUpdated
        query.last_updated.append(_parse_date_filter(value))


def _parse_date_filter(value: str) -> tuple[str, int, int]:
    prefix, text = (value[:2], value[2:]) if value[:2].isalpha() else ("eq", value)
    if prefix not in _DATE_PREFIXES:
        raise bad_request(
            f"_lastUpdated prefix '{short(prefix)}' is not supported (eq ne gt ge lt le)"
        )
    try:
        low, high = datetime_range(text)
    except ValueError:
        raise bad_request(f"_lastUpdated value '{short(text)}' is not a FHIR dateTime") from None
    return prefix, low, high


def _non_negative_int(name: str, value: str) -> int:
    if not value.isdigit():
        raise bad_request(f"{name} must be a non-negative integer, got '{short(value)}'")
    return int(value)


def _parse_result_param(
    query: SearchQuery, name: str, value: str, max_count: int, strict: bool
) -> bool:
    """Apply a ``_count``-style parameter; ``False`` if ``name`` is not one."""
    if name == "_count":
        query.count = min(_non_negative_int(name, value), max_count)
    elif name == "_offset":
        query.offset = _non_negative_int(name, value)
    elif name == "_cursor":
        if value[:1] not in ("a", "b") or not value[1:].isdigit():
            raise bad_request(f"_cursor '{short(value)}' is not a cursor this server issued")
        query.cursor = (value[0], int(value[1:]))
    elif name == "_sort":
        first = value.split(",", maxsplit=1)[0]
        if first in _SORTS:
            query.sort = first
        elif strict:
            raise bad_request(
                f"_sort '{short(value)}' is not supported ({', '.join(sorted(_SORTS))})"
            )
    elif name == "_summary":
        query.summary_count = value == "count"
    elif name == "_total":
        # accurate asks for Bundle.total on every page; estimated and none are HAPI's
        # default here (no total while more pages follow); others are ignored, as HAPI does.
        query.accurate_total = value == "accurate"
    else:
        return name in _QUIET_PARAMS
    return True


def parse_search(
    items: Iterable[tuple[str, str]],
    *,
    default_count: int = DEFAULT_PAGE_SIZE,
    max_count: int = MAX_PAGE_SIZE,
    strict: bool = False,
    conditional: bool = False,
) -> SearchQuery:
    """Parse search parameters. ``conditional`` (criteria of a conditional
    interaction) refuses unknown parameters and requires at least one criterion,
    since ignoring one would widen the match and write the wrong resource."""
    query = SearchQuery(count=default_count)
    for raw_name, value in items:
        name, _, modifier = raw_name.partition(":")
        if not conditional and _parse_result_param(query, raw_name, value, max_count, strict):
            continue
        if name not in _FILTER_PARAMS or (modifier and name in ("_id", "_lastUpdated")):
            if strict or conditional:
                raise bad_request(
                    f"search parameter '{short(raw_name)}' is not supported", code="not-supported"
                )
            query.ignored.append(raw_name)
            continue
        if not value:
            continue  # a parameter without a value is ignored (R4 search.html)
        _parse_filter(query, name, modifier, value)
        query.used.append((raw_name, value))
    if query.cursor is not None and query.sort is not None:
        raise bad_request("_cursor pages creation order; page a _sort search with _offset")
    if conditional and not query.has_criteria:
        raise bad_request(
            "conditional interaction needs search criteria (e.g. identifier=system|value)"
        )
    return query
