"""Reading JSON whose shape nobody promised: FHIR and CDS Hooks input from outside.

FHIR fixes each element's JSON type (an object, an array, a string), but
input is checked only for what a site needs, and everything else is read as
it comes. ``(x.get("code") or {}).get("coding")`` fails on ``"code": 5``
(issue 10, the HTTP fuzzer); ``obj(x.get("code")).get("coding")`` reads it as
absent, as FHIR readers treat an element they cannot use.
"""

from __future__ import annotations

from typing import Any


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []
