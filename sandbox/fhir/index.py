"""What a resource is found by: the search index keys of each stored version."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ehrbridge.sandbox.fhir.spec import TYPE_RE

# One search index entry: (parameter, kind, value...).
IndexKey = tuple[str, ...]
EMPTY_IDS: frozenset[str] = frozenset()


def _as_list(value: object) -> list[Any]:
    if isinstance(value, list):
        return value
    return [] if value is None else [value]


def _token_keys(param: str, system: object, code: object) -> list[IndexKey]:
    """Index keys of one Coding/Identifier for the four token search forms."""
    if not isinstance(code, str) or not code:
        return []
    keys: list[IndexKey] = [(param, "code", code)]
    if isinstance(system, str) and system:
        keys += [(param, "sys", system, code), (param, "sysonly", system)]
    else:
        keys.append((param, "nosys", code))
    return keys


def _reference_keys(param: str, reference: object) -> list[IndexKey]:
    if not isinstance(reference, str) or not reference:
        return []
    normal = normalize_reference(reference)
    keys: list[IndexKey] = [(param, "ref", normal)]
    kind, slash, ident = normal.partition("/")
    if slash and TYPE_RE.match(kind):
        keys.append((param, "id", ident))
    return keys


def normalize_reference(reference: str) -> str:
    """``Type/id`` for relative, versioned or absolute literal references; others as given."""
    if reference.count("/") == 1 and "?" not in reference and ":" not in reference:
        return reference  # already Type/id, the common case
    path = reference.split("?", 1)[0]
    segments = [s for s in path.split("/") if s]
    if len(segments) >= 4 and segments[-2] == "_history":
        segments = segments[:-2]
    if len(segments) >= 2 and TYPE_RE.match(segments[-2]) and not reference.startswith("urn:"):
        return f"{segments[-2]}/{segments[-1]}"
    return reference


def _reference_type(reference: object) -> str | None:
    if not isinstance(reference, str):
        return None
    kind, slash, _ = normalize_reference(reference).partition("/")
    return kind if slash and TYPE_RE.match(kind) else None


def _codeable_keys(param: str, concept: object) -> list[IndexKey]:
    if not isinstance(concept, dict):
        return []
    keys: list[IndexKey] = []
    for coding in _as_list(concept.get("coding")):
        if isinstance(coding, dict):
            keys += _token_keys(param, coding.get("system"), coding.get("code"))
    return keys


def _subject_keys(param: str, subject: object) -> list[IndexKey]:
    """``param`` and ``param:identifier`` keys of one Reference element."""
    if not isinstance(subject, dict):
        return []
    keys = _reference_keys(param, subject.get("reference"))
    identifier = subject.get("identifier")
    if isinstance(identifier, dict):
        keys += _token_keys(
            f"{param}:identifier", identifier.get("system"), identifier.get("value")
        )
    return keys


def _is_patient_reference(subject: Mapping[str, Any]) -> bool:
    # A logical reference (identifier only) names its type in Reference.type, if at all.
    kind = _reference_type(subject.get("reference")) or subject.get("type")
    return kind in (None, "Patient")


def index_keys(resource: Mapping[str, Any]) -> tuple[IndexKey, ...]:
    """Search index keys of a resource (search parameters listed in the module doc)."""
    keys: list[IndexKey] = []
    for identifier in _as_list(resource.get("identifier")):
        if isinstance(identifier, dict):
            keys += _token_keys("identifier", identifier.get("system"), identifier.get("value"))
    keys += _codeable_keys("code", resource.get("code"))
    for category in _as_list(resource.get("category")):
        keys += _codeable_keys("category", category)
    keys += _token_keys("status", None, resource.get("status"))
    subject = resource.get("subject")
    keys += _subject_keys("subject", subject)
    if isinstance(subject, dict) and _is_patient_reference(subject):
        keys += _subject_keys("patient", subject)
    keys += _subject_keys("patient", resource.get("patient"))  # AllergyIntolerance.patient ...
    return tuple(dict.fromkeys(keys))
