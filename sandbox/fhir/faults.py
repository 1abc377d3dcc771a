"""Fault injection and request counters for ``/_admin`` (test beds only)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FhirFault:
    """What an injected fault does to one write."""

    status: int | None
    delay_s: float
    apply: bool
    retry_after_s: int | None


class FhirFaults:
    """The fault plan of ``/_admin/faults``; thread-safe."""

    _KEYS = frozenset({"status", "count", "delay_s", "down_for_s", "retry_after_s", "apply"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault: FhirFault | None = None
        self._remaining = 0
        self._down_until = 0.0
        self._retry_after_s: int | None = None

    def inject(self, spec: Mapping[str, Any]) -> None:
        """Replace the plan; raises ValueError naming the offending field."""
        fault, count, down_for_s = _parse_fault(spec, self._KEYS)
        with self._lock:
            self._fault = fault
            self._remaining = count if fault is not None else 0
            self._down_until = time.monotonic() + down_for_s if down_for_s else 0.0
            self._retry_after_s = _optional_int(spec, "retry_after_s", 0)

    def clear(self) -> None:
        with self._lock:
            self._fault, self._remaining, self._down_until, self._retry_after_s = None, 0, 0.0, None

    def down(self) -> int | None:
        """``None`` if up, else the Retry-After seconds to announce (may be 0)."""
        with self._lock:
            left = self._down_until - time.monotonic()
            if left <= 0:
                return None
            return self._retry_after_s if self._retry_after_s is not None else int(left) + 1

    def claim(self) -> FhirFault | None:
        """The fault for the next write, if one is pending (counts it down)."""
        with self._lock:
            if self._remaining <= 0 or self._fault is None:
                return None
            self._remaining -= 1
            return self._fault

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            fault = self._fault
            return {
                "status": fault.status if fault else None,
                "delay_s": fault.delay_s if fault else 0.0,
                "apply": fault.apply if fault else False,
                "remaining": self._remaining,
                "down_for_s": round(max(0.0, self._down_until - time.monotonic()), 3),
                "retry_after_s": self._retry_after_s,
            }


def _optional_int(spec: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"'{key}' must be an integer >= {minimum}")
    return value


def _optional_seconds(spec: Mapping[str, Any], key: str) -> float:
    value = spec.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        raise ValueError(f"'{key}' must be a number of seconds between 0 and 3600")
    return float(value)


def _parse_fault(
    spec: Mapping[str, Any], keys: frozenset[str]
) -> tuple[FhirFault | None, int, float]:
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise ValueError(f"unknown fault field(s) {unknown}; known: {sorted(keys)}")
    status = _optional_int(spec, "status", 100)
    if status is not None and not 400 <= status <= 599:
        raise ValueError("'status' must be an HTTP error status (400-599)")
    count = _optional_int(spec, "count", 1) or 1
    delay_s, down_for_s = _optional_seconds(spec, "delay_s"), _optional_seconds(spec, "down_for_s")
    apply = spec.get("apply", False)
    if not isinstance(apply, bool):
        raise ValueError("'apply' must be true or false")
    if status is None and not delay_s and not down_for_s:
        raise ValueError("a fault needs 'status', 'delay_s' or 'down_for_s'")
    if apply and status is None:
        raise ValueError("'apply' needs a 'status' to answer after the write")
    retry_after_s = _optional_int(spec, "retry_after_s", 0)
    fault = (
        FhirFault(status, delay_s, apply, retry_after_s) if status is not None or delay_s else None
    )
    return fault, count, down_for_s


class FhirStats:
    """Request counters for ``/_admin/stats``; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, dict[str, int]] = {}
        self._faulted = 0

    def count(self, method: str, resource_type: str) -> None:
        with self._lock:
            by_type = self._requests.setdefault(method, {})
            by_type[resource_type] = by_type.get(resource_type, 0) + 1

    def fault(self) -> None:
        with self._lock:
            self._faulted += 1

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._faulted = 0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            requests = {m: dict(sorted(t.items())) for m, t in sorted(self._requests.items())}
            faulted = self._faulted
        total = sum(sum(t.values()) for t in requests.values())
        return {"total": total, "faulted": faulted, "requests": requests}
