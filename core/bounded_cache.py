"""An LRU cache that never keeps a long key: memory bounded in bytes, not just in entries.

The hot-path caches (time parsing, code-system spellings, write-back URLs)
are keyed by text from messages. ``lru_cache(maxsize=4096)`` bounds their
*entries*, but a hostile sender's distinct 1 MB fields would make each entry
a megabyte: the fuzzed sandbox of issue 10 grew by hundreds of MB that way.
Real keys are short (a DTM is at most 24 characters, a coding system a URI),
so calls whose string arguments are longer than ``max_chars`` in total are
computed and not kept; the cache holds at most ``maxsize * max_chars``
characters of keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


def short_key_cache(maxsize: int, max_chars: int = 256) -> Callable[[F], F]:
    def decorate(function: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            # Runs for every field of every message: no generator when there are no kwargs.
            chars = _key_chars(args) + (_key_chars(kwargs.values()) if kwargs else 0)
            if chars > max_chars:
                return function(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return cast(F, call)

    return decorate


def _key_chars(values: Any) -> int:
    total = 0
    for value in values:
        if isinstance(value, str):
            total += len(value)
    return total
