"""FHIR instants and dateTimes: formatting, parsing at any precision, date prefixes."""

from __future__ import annotations

import email.utils
import functools
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_second_prefix: tuple[int, str] = (-1, "")  # strftime is the costly part; reuse per second


def format_instant(epoch_us: int) -> str:
    """FHIR ``instant`` in UTC with microseconds, e.g. ``2024-05-01T12:00:00.000123Z``."""
    global _second_prefix  # noqa: PLW0603 -- a one-entry cache; tuple swap is atomic
    seconds, micros = divmod(epoch_us, 1_000_000)
    cached_second, prefix = _second_prefix
    if cached_second != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second_prefix = (seconds, prefix)
    return f"{prefix}.{micros:06d}Z"


def http_date(epoch_us: int) -> str:
    return _http_date_of_second(epoch_us // 1_000_000)


@functools.lru_cache(maxsize=8)
def _http_date_of_second(seconds: int) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


def now_instant() -> str:
    return format_instant(time.time_ns() // 1000)


def _epoch_us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


# FHIR dateTime at any precision: YYYY, YYYY-MM, YYYY-MM-DD, ...Thh:mm[:ss[.f+]][zone]
_DATETIME_RE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<mo>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?\Z"
)


def datetime_range(text: str) -> tuple[int, int]:
    """The [low, high) microsecond interval a FHIR dateTime denotes at its precision."""
    # A '+' zone offset arrives as ' ' when the client did not percent-encode it.
    match = _DATETIME_RE.match(text.replace(" ", "+"))
    if match is None:
        raise ValueError(text)
    part = match.groupdict()
    zone: timezone = UTC
    if part["tz"] not in (None, "Z"):
        sign = 1 if part["tz"][0] == "+" else -1
        hours, minutes = int(part["tz"][1:3]), int(part["tz"][4:6])
        zone = timezone(timedelta(minutes=sign * (hours * 60 + minutes)))
    low = datetime(
        int(part["y"]),
        int(part["mo"] or 1),
        int(part["d"] or 1),
        int(part["h"] or 0),
        int(part["mi"] or 0),
        int(part["s"] or 0),
        int((part["f"] or "0")[:6].ljust(6, "0")),
        tzinfo=zone,
    )
    return _epoch_us(low), _epoch_us(_precision_end(low, part))


def _precision_end(low: datetime, part: Mapping[str, str | None]) -> datetime:
    if part["f"] is not None:
        return low + timedelta(microseconds=10 ** max(0, 6 - len(part["f"])))
    if part["s"] is not None:
        return low + timedelta(seconds=1)
    if part["mi"] is not None:
        return low + timedelta(minutes=1)
    if part["d"] is not None:
        return low + timedelta(days=1)
    if part["mo"] is not None:
        year, month = divmod(low.month, 12)
        return low.replace(year=low.year + year, month=month + 1)
    return low.replace(year=low.year + 1)


def instant_matches(prefix: str, low: int, high: int, moment: int) -> bool:
    # FHIR search "date" prefixes against a point in time (R4 search.html#prefix).
    if prefix == "eq":
        return low <= moment < high
    if prefix == "ne":
        return not low <= moment < high
    if prefix == "gt":
        return moment >= high
    if prefix == "ge":
        return moment >= low
    if prefix == "lt":
        return moment < low
    return moment < high  # le
