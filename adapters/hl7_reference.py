"""HL7 v2 field names from hl7apy's structure tables, for people reading a message.

hl7apy is the reference implementation of the HL7 v2 structures; ehrbridge's
hot path reads ER7 itself (``pipelines/er7.py``) and uses hl7apy only here,
where ``ehrbridge mappings explain`` names the fields it shows.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=512)
def field_name(path: str, version: str) -> str:
    """``OBR-7`` → ``Observation date/time`` from hl7apy's tables ('' if unknown, e.g. Z)."""
    segment, _, rest = path.partition("-")
    number = "".join(ch for ch in rest.split("(")[0].split(".")[0] if ch.isdigit())
    if not number or segment.startswith("Z"):
        return ""
    try:
        from hl7apy import find_reference
        from hl7apy.core import Field

        reference = find_reference(f"{segment}_{number}", (Field,), _hl7apy_version(version))
        long_name = str(reference["ref"][3])
    except Exception:  # hl7apy knows no such field in this version: no name, not an error
        return ""
    text = long_name.replace("_", " ").capitalize()
    return text.replace("date time", "date/time").replace("Date time", "Date/time")


def _hl7apy_version(version: str) -> str:
    supported = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8")
    return version if version in supported else "2.5"
