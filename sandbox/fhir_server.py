"""The sandbox's FHIR R4 server, now the package :mod:`ehrbridge.sandbox.fhir`.

This module stays so that ``python -m ehrbridge.sandbox.fhir_server`` (README,
mappings/README.md) and existing imports keep working.
"""

from __future__ import annotations

from ehrbridge.adapters.fhir_http import FHIR_JSON
from ehrbridge.sandbox.fhir.app import create_fhir_app, main, serve_fhir
from ehrbridge.sandbox.fhir.bundles import searchset
from ehrbridge.sandbox.fhir.errors import FhirProblem, operation_outcome
from ehrbridge.sandbox.fhir.faults import FhirFault, FhirFaults, FhirStats
from ehrbridge.sandbox.fhir.index import index_keys, normalize_reference
from ehrbridge.sandbox.fhir.query import SearchQuery, parse_search
from ehrbridge.sandbox.fhir.search import SearchResult
from ehrbridge.sandbox.fhir.spec import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PAGE_SIZE,
    FHIR_VERSION,
    MAX_PAGE_SIZE,
    OBSERVATION_STATUSES,
    R4_RESOURCE_TYPES,
)
from ehrbridge.sandbox.fhir.store import FhirStore
from ehrbridge.sandbox.fhir.validation import validate_resource
from ehrbridge.sandbox.fhir.versions import StoredVersion

if __name__ == "__main__":
    main()

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PAGE_SIZE",
    "FHIR_JSON",
    "FHIR_VERSION",
    "MAX_PAGE_SIZE",
    "OBSERVATION_STATUSES",
    "R4_RESOURCE_TYPES",
    "FhirFault",
    "FhirFaults",
    "FhirProblem",
    "FhirStats",
    "FhirStore",
    "SearchQuery",
    "SearchResult",
    "StoredVersion",
    "create_fhir_app",
    "index_keys",
    "normalize_reference",
    "operation_outcome",
    "parse_search",
    "searchset",
    "serve_fhir",
    "validate_resource",
]
