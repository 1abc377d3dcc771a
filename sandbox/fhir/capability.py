"""The stand-in's CapabilityStatement.rest."""

from __future__ import annotations

from typing import Any

from ehrbridge.sandbox.fhir.instants import now_instant
from ehrbridge.sandbox.fhir.spec import R4_RESOURCE_TYPES


def capability_rest() -> tuple[str, list[dict[str, Any]]]:
    """(date, CapabilityStatement.rest) -- built once per app."""
    interactions = [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "create",
        "search-type",
    ]
    search_params = [
        {"name": "_id", "type": "token"},
        {"name": "_lastUpdated", "type": "date"},
        {"name": "identifier", "type": "token"},
        {"name": "code", "type": "token"},
        {"name": "category", "type": "token"},
        {"name": "status", "type": "token"},
        {
            "name": "subject",
            "type": "reference",
            "documentation": "also the chain subject.identifier=system|value",
        },
        {
            "name": "patient",
            "type": "reference",
            "documentation": "also the chain patient.identifier=system|value",
        },
    ]
    resources = [
        {
            "type": name,
            "interaction": [{"code": code} for code in interactions],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "searchParam": search_params,
        }
        for name in sorted(R4_RESOURCE_TYPES)
    ]
    rest = {
        "mode": "server",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}],
    }
    return now_instant(), [rest]
