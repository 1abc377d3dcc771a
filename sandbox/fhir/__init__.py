"""Sandbox FHIR R4 server: stands in for the hospital EHR's FHIR endpoint.

An in-memory, thread-safe, versioned resource store behind the FHIR R4 RESTful
API (https://hl7.org/fhir/R4/http.html), JSON only. It forgets everything when
the process stops, unless it is given a journal file (``FhirStore(journal)``,
``--journal``; the sandbox keeps one in its data dir), which it replays at start. Enough of the
specification for ehrbridge to be developed, tested and benchmarked without an
EHR::

    GET    [base]/metadata                       CapabilityStatement
    POST   [base]/{type}                         create (If-None-Exist: conditional create)
    PUT    [base]/{type}/{id}                    update, or create-on-update (If-Match honoured)
    PUT    [base]/{type}?{search}                conditional update
    DELETE [base]/{type}/{id} | {type}?{search}  delete / conditional delete
    GET    [base]/{type}/{id}[/_history[/{vid}]] read, history, vread
    GET    [base]/{type}?{search}                search -> searchset Bundle (POST .../_search too)
    POST   [base]                                transaction / batch Bundle

Search parameters (any type; a resource without the element never matches):
``identifier``, ``code``, ``category``, ``status`` (token: ``system|code``,
``code``, ``|code``, ``system|``), ``subject`` and ``patient`` (reference:
``Patient/1``, ``1``, absolute URL, ``:Patient`` type modifier; the chains
``subject.identifier`` and ``patient.identifier`` match the Reference's own
``identifier``; the ``:identifier`` modifier is refused, 400, as HAPI JPA
refuses it), ``_id``, ``_lastUpdated``
(``eq ne gt ge lt le`` prefixes at any precision). Commas OR values, repeated
parameters AND. Unknown parameters are ignored (left out of the ``self`` link)
unless ``Prefer: handling=strict``; conditional criteria never ignore one.

Paging: ``_count`` (default 50, clamped to 1000; 0 = total only). The default
order is creation order, paged by a keyset cursor (``_cursor=a<n>``/``b<n>``)
so following ``next`` visits every match exactly once even while resources are
created or deleted between pages. ``_sort=[-]_lastUpdated|[-]_id`` pages by
``_offset``. ``link`` URLs are absolute.

Copied from HAPI FHIR JPA, so that clients tested here are not tested more
kindly than on a hospital's server (README, Write-back to a real FHIR server):
a page with more pages after it has no ``Bundle.total`` unless
``_total=accurate`` (or ``_summary=count``, ``_count=0``); a conditional create
or update whose match another request created while it was in flight answers
409, as HAPI's racing inserts do (HAPI-2745), so clients must retry 409.

Validation is structural (JSON object, ``resourceType`` equals the URL type,
``id`` syntax; Observation ``status`` in the R4 value set and ``code``
present). Syntax problems answer 400, content rules 422, oversized bodies 413,
other media types 415; every error is an ``OperationOutcome``.

Transactions resolve ``urn:uuid:`` fullUrls and conditional references
(``Patient?identifier=...``) in every ``reference`` element, refuse entries
that touch the same resource twice, and are all-or-nothing: every entry is
planned against the current state before anything is written, and the writes
are undone if a later GET entry fails. Batches run entry by entry.

Fault injection (sandbox only -- never expose these routes outside a test bed)::

    POST   /_admin/faults {"status": 503, "count": 2}  next 2 writes answer 503 (unprocessed)
                          {"delay_s": 1.5, "count": 1} next write waits 1.5 s first
                          {"down_for_s": 10}           every FHIR request answers 503 for 10 s
                          optional "retry_after_s": n  adds Retry-After to injected answers
                          optional "apply": true       process the write, *then* answer
                                                       ``status`` (a lost response)
    GET    /_admin/faults     the current plan      DELETE /_admin/faults  clear it
    GET    /_admin/stats      request counters and live resources per type
    DELETE /_admin/stats      reset the counters    DELETE /_admin/store   empty the store

Writes are POST/PUT/DELETE under the FHIR base (``POST .../_search`` is a read).

Modules, each one concern: ``spec`` (R4 facts), ``errors``, ``instants``,
``store`` (versions and journal), ``index`` and ``query`` and ``search``,
``validation``, ``interactions`` (REST verbs), ``bundles`` (searchset and
history), ``transactions``, ``faults`` (``/_admin``), ``api`` (HTTP face),
``capability``, ``app`` (routes and command line). The HTTP plumbing it shares
with ehrbridge's own FHIR routes (OperationOutcome answers, body limits,
``Prefer``) is :mod:`ehrbridge.adapters.fhir_http`.
"""

from __future__ import annotations

from ehrbridge.adapters.fhir_http import FHIR_JSON
from ehrbridge.sandbox.fhir.app import create_fhir_app, serve_fhir
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
