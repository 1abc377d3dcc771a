"""HL7v2 date/time values (DT, DTM, TS) to Python dates and aware datetimes.

DTM is ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``. TS (pre-2.6) is a DTM
with an optional ``^precision`` component, which callers strip by reading
component 1. A time without an offset is local to the sender; the site's
mapping names that time zone, we never guess it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone, tzinfo

from ehrbridge.core.bounded_cache import short_key_cache


class Hl7TimeError(ValueError):
    """The text is not an HL7 date/time."""


# A message's results share a few times; datetimes are immutable. Short keys only: a
# DTM is at most 24 characters, and a hostile 1 MB one must not be kept.
@short_key_cache(maxsize=4096, max_chars=32)
def parse_dtm(text: str, local: tzinfo = UTC) -> datetime:
    """Parse a DTM/TS value to an aware datetime (missing parts default to their minimum)."""
    value = text.strip()
    offset = _split_offset(value)
    if offset is not None:
        value, tz = offset
    else:
        tz = local
    digits, _, fraction = value.partition(".")
    if not _ascii_digits(digits) or len(digits) not in (4, 6, 8, 10, 12, 14):
        raise Hl7TimeError(f"not an HL7 date/time: {text!r}")
    if fraction and (not _ascii_digits(fraction) or len(digits) != 14):
        raise Hl7TimeError(f"bad fractional seconds: {text!r}")
    parts = [int(digits[i : i + 2]) for i in range(4, len(digits), 2)]
    # Missing month/day default to 1, missing time parts to 0 (DTM precision).
    month, day, hour, minute, second = parts + [1, 1, 0, 0, 0][len(parts) :]
    micro = int((fraction + "000000")[:6]) if fraction else 0
    try:
        return datetime(int(digits[:4]), month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as exc:
        raise Hl7TimeError(f"not a valid date/time: {text!r}") from exc


def parse_date(text: str) -> date:
    """Parse a DT (or the date part of a DTM, as senders put in PID-7)."""
    value = text.strip()
    digits = value[:8]
    if len(digits) < 8 or not _ascii_digits(digits):
        raise Hl7TimeError(f"not an HL7 date: {text!r}")
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError as exc:
        raise Hl7TimeError(f"not a valid date: {text!r}") from exc


def format_dtm(moment: datetime) -> str:
    """An aware datetime as DTM with seconds and offset, e.g. 20260131083000+0100."""
    offset = moment.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return moment.strftime("%Y%m%d%H%M%S") + f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def _split_offset(value: str) -> tuple[str, tzinfo] | None:
    for sign in ("+", "-"):
        at = value.rfind(sign)
        if at > 0:
            zone = value[at + 1 :]
            if len(zone) != 4 or not _ascii_digits(zone) or zone > "2359" or zone[2] > "5":
                raise Hl7TimeError(f"bad UTC offset in {value!r}")  # +9999 is no offset
            minutes = int(zone[:2]) * 60 + int(zone[2:])
            delta = timedelta(minutes=minutes if sign == "+" else -minutes)
            return value[:at], timezone(delta)
    return None


def _ascii_digits(text: str) -> bool:
    """0-9 only: ``str.isdigit`` also takes '¹' and '٣', which ``int`` refuses or misreads."""
    return text.isascii() and text.isdigit()
