"""The hot-path caches keyed by message text hold no long keys (issue 10, finding 7).

A fuzzed sandbox grew by hundreds of MB: ``lru_cache(maxsize=4096)`` bounds
entries, not bytes, and distinct long OBX-14 times and OBX-3 coding systems
filled the time-parse and code-system caches with keys of tens of KB each.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from ehrbridge.core.bounded_cache import short_key_cache
from ehrbridge.mappings.codemaps import normalise_system
from ehrbridge.pipelines import provenance
from ehrbridge.pipelines.er7 import codec_for_charset
from ehrbridge.pipelines.hl7time import parse_dtm
from ehrbridge.pipelines.provenance import full_url

LONG = 20_000


def long_keys(n: int) -> list[str]:
    return [f"{i:06d}" + "1" * LONG for i in range(n)]


CACHES: list[tuple[str, Callable[..., Any], Callable[[str], tuple[Any, ...]]]] = [
    ("parse_dtm", parse_dtm, lambda key: (f"20260101000000.{key}+0000",)),
    ("normalise_system", normalise_system, lambda key: (f"urn:oid:{key}",)),
    ("codec_for_charset", codec_for_charset, lambda key: (f"UNICODE {key}",)),
    ("full_url", full_url, lambda key: ("Patient", "urn:site:mrn", key)),
    # conditional_search caches only the encoded identifier system, never the value.
    ("conditional_search", provenance._quoted, lambda key: (f"urn:site:{key}",)),
]


@pytest.mark.parametrize(("name", "function", "arguments"), CACHES, ids=[c[0] for c in CACHES])
def test_distinct_long_keys_are_answered_but_not_kept(
    name: str, function: Callable[..., Any], arguments: Callable[[str], tuple[Any, ...]]
) -> None:
    before = function.cache_info().currsize  # type: ignore[attr-defined]
    for key in long_keys(300):
        function(*arguments(key))
    assert function.cache_info().currsize == before  # type: ignore[attr-defined]


def test_long_values_are_still_computed_as_before() -> None:
    moment = parse_dtm("20260101083000." + "5" * LONG + "+0100")
    assert moment.astimezone(UTC) == datetime(2026, 1, 1, 7, 30, 0, 555555, tzinfo=UTC)
    assert normalise_system("  " + "x" * LONG + " ") == "x" * LONG
    assert full_url("Patient", "s", "v" * LONG) == full_url("Patient", "s", "v" * LONG)


def test_short_keys_are_cached_up_to_maxsize() -> None:
    calls: list[str] = []

    @short_key_cache(maxsize=8, max_chars=16)
    def upper(text: str) -> str:
        calls.append(text)
        return text.upper()

    for text in ("a", "b", "a", "x" * 17, "x" * 17):
        upper(text)
    assert calls == ["a", "b", "x" * 17, "x" * 17]
    for i in range(100):
        upper(str(i))
    assert upper.cache_info().currsize == 8  # type: ignore[attr-defined]
