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
``Patient/1``, ``1``, absolute URL, ``:Patient`` type modifier, and
``:identifier`` matching ``subject.identifier``; the chains ``subject.identifier``
and ``patient.identifier`` match it too), ``_id``, ``_lastUpdated``
(``eq ne gt ge lt le`` prefixes at any precision). Commas OR values, repeated
parameters AND. Unknown parameters are ignored (left out of the ``self`` link)
unless ``Prefer: handling=strict``; conditional criteria never ignore one.

Paging: ``_count`` (default 50, clamped to 1000; 0 = total only). The default
order is creation order, paged by a keyset cursor (``_cursor=a<n>``/``b<n>``)
so following ``next`` visits every match exactly once even while resources are
created or deleted between pages. ``_sort=[-]_lastUpdated|[-]_id`` pages by
``_offset``. ``link`` URLs are absolute.

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
"""

from __future__ import annotations

import asyncio
import bisect
import email.utils
import functools
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

SERVER_NAME: Final = "ehrbridge-sandbox-fhir-server"
SERVER_VERSION: Final = "1.0.0"
FHIR_VERSION: Final = "4.0.1"
FHIR_JSON: Final = "application/fhir+json"
DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000

_RESPONSE_MEDIA_TYPE = f"{FHIR_JSON}; charset=utf-8"
# application/json+fhir is the DSTU2 spelling some EHR clients still send.
_ACCEPTED_MEDIA_TYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
_FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"

# Observation.status, required binding to http://hl7.org/fhir/observation-status (R4).
OBSERVATION_STATUSES: Final = (
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
)

# The 146 resource types of FHIR R4 (4.0.1), https://hl7.org/fhir/R4/resourcelist.html
R4_RESOURCE_TYPES: Final = frozenset(
    """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
    CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
    ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
    Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
    Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation Person
    PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire
    QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition ResearchElementDefinition
    ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter
    ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition StructureMap Subscription
    Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein
    SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification SupplyDelivery
    SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
    VisionPrescription
    """.split()  # noqa: SIM905 -- one readable block beats 146 quoted names
)

# Resource.id: [A-Za-z0-9\-\.]{1,64} (R4 datatypes, "id").
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")
_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{1,63}\Z")


def _short(text: object, limit: int = 60) -> str:
    shown = str(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


# --------------------------------------------------------------------------- errors


def operation_outcome(
    diagnostics: str,
    *,
    code: str = "processing",
    severity: str = "error",
    expression: str | None = None,
) -> dict[str, Any]:
    """An OperationOutcome with one issue (codes: http://hl7.org/fhir/issue-type)."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression is not None:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class FhirProblem(Exception):
    """An interaction failed; becomes an OperationOutcome with HTTP ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression
        self.headers = dict(headers or {})

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.diagnostics, code=self.code, expression=self.expression)

    def in_entry(self, index: int) -> FhirProblem:
        """The same problem, located at ``Bundle.entry[index]``."""
        where = f"Bundle.entry[{index}]"
        expression = where
        if self.expression is not None:
            _, _, path = self.expression.partition(".")
            expression = f"{where}.resource.{path}" if path else f"{where}.resource"
        return FhirProblem(
            self.status,
            self.code,
            f"{where}: {self.diagnostics}",
            expression=expression,
            headers=self.headers,
        )


def _bad_request(
    diagnostics: str, *, code: str = "invalid", expression: str | None = None
) -> FhirProblem:
    return FhirProblem(400, code, diagnostics, expression=expression)


def _status_text(status: int) -> str:
    """``response.status`` text of a Bundle entry, e.g. ``201 Created``."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


# --------------------------------------------------------------------------- time


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_second_prefix: tuple[int, str] = (-1, "")  # strftime is the costly part; reuse per second


def _format_instant(epoch_us: int) -> str:
    """FHIR ``instant`` in UTC with microseconds, e.g. ``2024-05-01T12:00:00.000123Z``."""
    global _second_prefix  # noqa: PLW0603 -- a one-entry cache; tuple swap is atomic
    seconds, micros = divmod(epoch_us, 1_000_000)
    cached_second, prefix = _second_prefix
    if cached_second != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second_prefix = (seconds, prefix)
    return f"{prefix}.{micros:06d}Z"


def _http_date(epoch_us: int) -> str:
    return _http_date_of_second(epoch_us // 1_000_000)


@functools.lru_cache(maxsize=8)
def _http_date_of_second(seconds: int) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


def _now_instant() -> str:
    return _format_instant(time.time_ns() // 1000)


def _epoch_us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


# FHIR dateTime at any precision: YYYY, YYYY-MM, YYYY-MM-DD, ...Thh:mm[:ss[.f+]][zone]
_DATETIME_RE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<mo>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?\Z"
)


def _datetime_range(text: str) -> tuple[int, int]:
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


def _instant_matches(prefix: str, low: int, high: int, moment: int) -> bool:
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


# --------------------------------------------------------------------------- store

IndexKey = tuple[str, ...]
_T = TypeVar("_T")
_EMPTY_IDS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One immutable version of a resource; ``body`` is ``None`` for a deletion."""

    resource_type: str
    id: str
    version_id: int
    seq: int  # creation position within its type; orders searches and cursors
    last_updated: str
    last_updated_us: int
    body: bytes | None
    index_keys: tuple[IndexKey, ...] = ()

    @property
    def deleted(self) -> bool:
        return self.body is None

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    def resource(self) -> dict[str, Any]:
        """A fresh decoded copy of the resource (callers may mutate it)."""
        if self.body is None:
            raise ValueError(f"{self.reference} version {self.version_id} is a deletion")
        decoded: dict[str, Any] = orjson.loads(self.body)
        return decoded


class _TypeTable:
    """All resources of one type: version chains, creation order, search index."""

    __slots__ = ("index", "live", "order", "versions")

    def __init__(self) -> None:
        self.order: list[str] = []  # ids by creation; a position is a StoredVersion.seq
        self.versions: dict[str, list[StoredVersion]] = {}
        self.index: dict[IndexKey, set[str]] = {}
        self.live = 0

    def current(self, resource_id: str) -> StoredVersion | None:
        chain = self.versions.get(resource_id)
        return chain[-1] if chain else None

    def reindex(
        self, resource_id: str, old: StoredVersion | None, new: StoredVersion | None
    ) -> None:
        self.live += (new is not None and not new.deleted) - (old is not None and not old.deleted)
        old_keys = old.index_keys if old is not None else ()
        new_keys = new.index_keys if new is not None else ()
        if old_keys == new_keys:
            return
        for key in old_keys:
            ids = self.index[key]
            ids.discard(resource_id)
            if not ids:
                del self.index[key]
        for key in new_keys:
            self.index.setdefault(key, set()).add(resource_id)


class FhirStore:
    """Versioned in-memory resources with a token/reference index.

    Thread-safe: every method takes ``lock`` (re-entrant); hold it yourself to
    make a read-then-write sequence atomic. ``lastUpdated`` is strictly
    increasing across the store, so ``_lastUpdated=gt<last seen>`` polling
    never misses a write.

    With a ``journal`` file the store outlives its process: every write and
    undo is appended to the file (one unbuffered write each, so a killed
    process keeps all it answered for) and replayed, timestamps and versions
    unchanged, when a store is opened on the same file.
    """

    def __init__(self, journal: Path | None = None) -> None:
        self.lock = threading.RLock()
        self._tables: dict[str, _TypeTable] = {}
        self._last_us = 0
        self._journal: BinaryIO | None = None
        if journal is not None:
            self._replay(journal)
            self._journal = journal.open("ab", buffering=0)

    def _table(self, resource_type: str) -> _TypeTable:
        table = self._tables.get(resource_type)
        if table is None:
            table = self._tables[resource_type] = _TypeTable()
        return table

    def _tick(self) -> int:
        now_us = time.time_ns() // 1000
        self._last_us = max(now_us, self._last_us + 1)
        return self._last_us

    def write(
        self, resource_type: str, resource_id: str, resource: dict[str, Any] | None
    ) -> StoredVersion:
        """Store the next version of ``resource_type/resource_id``; ``None`` deletes.

        ``meta.versionId``/``meta.lastUpdated`` (and ``id``, ``resourceType``)
        are set by the store; other ``meta`` elements are kept.
        """
        with self.lock:
            previous = self.current(resource_type, resource_id)
            stamp = self._tick()
            body: bytes | None = None
            keys: tuple[IndexKey, ...] = ()
            if resource is not None:
                version_id = previous.version_id + 1 if previous else 1
                instant = _format_instant(stamp)
                stamped = _stamped(resource, resource_type, resource_id, version_id, instant)
                body = orjson.dumps(stamped)
                keys = index_keys(stamped)
            self._log(b"W", resource_type, resource_id, b"%d %s" % (stamp, body or b"-"))
            return self._put(resource_type, resource_id, stamp, body, keys)

    def _put(
        self,
        resource_type: str,
        resource_id: str,
        stamp: int,
        body: bytes | None,
        keys: tuple[IndexKey, ...],
    ) -> StoredVersion:
        table = self._table(resource_type)
        chain = table.versions.get(resource_id)
        previous = chain[-1] if chain else None
        version = StoredVersion(
            resource_type,
            resource_id,
            previous.version_id + 1 if previous else 1,
            previous.seq if previous else len(table.order),
            _format_instant(stamp),
            stamp,
            body,
            keys,
        )
        if chain is None:
            table.versions[resource_id] = [version]
            table.order.append(resource_id)
        else:
            chain.append(version)
        table.reindex(resource_id, previous, version)
        return version

    def _log(self, kind: bytes, resource_type: str, resource_id: str, rest: bytes = b"") -> None:
        # One line per change; ids and types never hold spaces (R4 "id" syntax), and
        # orjson never writes a raw newline, so a line is one whole change.
        if self._journal is not None:
            line = b" ".join((kind, resource_type.encode(), resource_id.encode(), rest))
            self._journal.write(line + b"\n")

    def _replay(self, journal: Path) -> None:
        if not journal.exists():
            return
        with journal.open("rb") as lines:
            for line in lines:
                if not line.endswith(b"\n"):
                    return  # the process died mid-line: that change was never answered
                self._redo(*line[:-1].decode().split(" ", 3))

    def _redo(self, kind: str, resource_type: str, resource_id: str, rest: str = "") -> None:
        if kind == "U":
            self._undo(self._tables[resource_type], resource_id)
            return
        stamp, _, body = rest.partition(" ")
        self._last_us = int(stamp)
        content = None if body == "-" else body.encode()
        keys = index_keys(orjson.loads(content)) if content is not None else ()
        self._put(resource_type, resource_id, int(stamp), content, keys)

    def undo(self, version: StoredVersion) -> None:
        """Remove ``version``, which must be the newest write to its resource type."""
        with self.lock:
            table = self._tables[version.resource_type]
            if table.versions[version.id][-1] is not version:
                raise ValueError(f"{version.reference}: only the newest version can be undone")
            if len(table.versions[version.id]) == 1 and table.order[-1] != version.id:
                raise ValueError(f"{version.reference}: not the newest creation")
            self._log(b"U", version.resource_type, version.id)
            self._undo(table, version.id)

    @staticmethod
    def _undo(table: _TypeTable, resource_id: str) -> None:
        chain = table.versions[resource_id]
        version = chain.pop()
        previous = chain[-1] if chain else None
        if previous is None:
            del table.versions[resource_id]
            table.order.pop()
        table.reindex(resource_id, version, previous)

    def current(self, resource_type: str, resource_id: str) -> StoredVersion | None:
        """The newest version (possibly a deletion), or ``None`` if never written."""
        with self.lock:
            table = self._tables.get(resource_type)
            return table.current(resource_id) if table else None

    def history(self, resource_type: str, resource_id: str) -> list[StoredVersion]:
        """Every version, oldest first."""
        with self.lock:
            table = self._tables.get(resource_type)
            return list(table.versions.get(resource_id, ())) if table else []

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current resource as a fresh dict, or ``None`` if absent or deleted."""
        version = self.current(resource_type, resource_id)
        return None if version is None or version.deleted else version.resource()

    def search(self, resource_type: str, query: SearchQuery) -> SearchResult:
        with self.lock:
            table = self._tables.get(resource_type)
            if table is None:
                return SearchResult([], 0)
            return _Searcher(table, query).run()

    def counts(self) -> dict[str, int]:
        """Live (not deleted) resources per type."""
        with self.lock:
            return {name: table.live for name, table in sorted(self._tables.items()) if table.live}

    def reset(self) -> None:
        with self.lock:
            self._tables.clear()
            if self._journal is not None:
                self._journal.truncate(0)

    def close(self) -> None:
        with self.lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None


def _stamped(
    resource: Mapping[str, Any], resource_type: str, resource_id: str, version_id: int, instant: str
) -> dict[str, Any]:
    meta = resource.get("meta")
    kept = (
        {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if isinstance(meta, dict)
        else {}
    )
    stamped: dict[str, Any] = {
        "resourceType": resource_type,
        "id": resource_id,
        "meta": {"versionId": str(version_id), "lastUpdated": instant, **kept},
    }
    for key, value in resource.items():
        if key not in stamped:
            stamped[key] = value
    return stamped


# --------------------------------------------------------------------------- index


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
    if slash and _TYPE_RE.match(kind):
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
    if len(segments) >= 2 and _TYPE_RE.match(segments[-2]) and not reference.startswith("urn:"):
        return f"{segments[-2]}/{segments[-1]}"
    return reference


def _reference_type(reference: object) -> str | None:
    if not isinstance(reference, str):
        return None
    kind, slash, _ = normalize_reference(reference).partition("/")
    return kind if slash and _TYPE_RE.match(kind) else None


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


# --------------------------------------------------------------------------- search query

_TOKEN_PARAMS = frozenset({"identifier", "code", "category", "status"})
_REFERENCE_PARAMS = frozenset({"subject", "patient"})
_SORTS = frozenset({"_lastUpdated", "-_lastUpdated", "_id", "-_id"})
# Result parameters this server ignores without calling them unknown.
_QUIET_PARAMS = frozenset({"_format", "_pretty", "_total", "_elements"})
_DATE_PREFIXES = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
# Chained searches on the subject's identifier (what HAPI answers for a literal
# reference). Here they match the Reference's own identifier, which every
# Observation ehrbridge writes carries beside the reference.
_CHAINED_IDENTIFIER = frozenset({"subject.identifier", "patient.identifier"})
_FILTER_PARAMS = _TOKEN_PARAMS | _REFERENCE_PARAMS | _CHAINED_IDENTIFIER | {"_id", "_lastUpdated"}


@dataclass(slots=True)
class SearchQuery:
    """A parsed search: AND of OR-groups of index keys, plus result parameters."""

    count: int = DEFAULT_PAGE_SIZE
    groups: list[list[IndexKey]] = field(default_factory=list)
    id_groups: list[set[str]] = field(default_factory=list)
    last_updated: list[tuple[str, int, int]] = field(default_factory=list)
    cursor: tuple[str, int] | None = None
    offset: int = 0
    sort: str | None = None
    summary_count: bool = False
    used: list[tuple[str, str]] = field(default_factory=list)  # echoed in Bundle.link
    ignored: list[str] = field(default_factory=list)

    @property
    def has_criteria(self) -> bool:
        return bool(self.groups or self.id_groups or self.last_updated)

    def criteria_key(self) -> str:
        """Order-independent spelling of the criteria (duplicate detection)."""
        return "&".join(f"{name}={value}" for name, value in sorted(self.used))


def _split_escaped(text: str, separator: str, maxsplit: int = -1) -> list[str]:
    r"""Split at ``separator`` unless escaped as ``\,`` ``\|`` (R4 search.html#escaping)."""
    if "\\" not in text:
        return text.split(separator, maxsplit)
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            current.append(text[index + 1])
            index += 2
            continue
        if char == separator and (maxsplit < 0 or len(parts) < maxsplit):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def _token_query_key(param: str, value: str) -> IndexKey:
    pieces = _split_escaped(value, "|", 1)
    if len(pieces) == 1:
        return (param, "code", pieces[0])
    system, code = pieces
    if not system:
        return (param, "nosys", code)
    if not code:
        return (param, "sysonly", system)
    return (param, "sys", system, code)


def _reference_query_key(param: str, modifier: str, value: str) -> IndexKey:
    if modifier:
        return (
            param,
            "ref",
            normalize_reference(f"{modifier}/{value}" if "/" not in value else value),
        )
    normal = normalize_reference(value)
    return (param, "ref", normal) if "/" in normal else (param, "id", normal)


def _parse_filter(query: SearchQuery, name: str, modifier: str, value: str) -> None:
    values = _split_escaped(value, ",")
    if name in _TOKEN_PARAMS:
        if modifier:
            raise _bad_request(
                f"search parameter '{name}' does not support the modifier ':{_short(modifier)}'"
            )
        query.groups.append([_token_query_key(name, v) for v in values])
    elif name in _CHAINED_IDENTIFIER and not modifier:
        reference = name.split(".", 1)[0]
        query.groups.append([_token_query_key(f"{reference}:identifier", v) for v in values])
    elif name in _REFERENCE_PARAMS:
        if modifier == "identifier":
            query.groups.append([_token_query_key(f"{name}:identifier", v) for v in values])
        elif not modifier or modifier in R4_RESOURCE_TYPES:
            query.groups.append([_reference_query_key(name, modifier, v) for v in values])
        else:
            raise _bad_request(
                f"search parameter '{name}' does not support the modifier ':{_short(modifier)}'"
            )
    elif name == "_id":
        query.id_groups.append(set(values))
    else:  # _lastUpdated
        query.last_updated.append(_parse_date_filter(value))


def _parse_date_filter(value: str) -> tuple[str, int, int]:
    prefix, text = (value[:2], value[2:]) if value[:2].isalpha() else ("eq", value)
    if prefix not in _DATE_PREFIXES:
        raise _bad_request(
            f"_lastUpdated prefix '{_short(prefix)}' is not supported (eq ne gt ge lt le)"
        )
    try:
        low, high = _datetime_range(text)
    except ValueError:
        raise _bad_request(f"_lastUpdated value '{_short(text)}' is not a FHIR dateTime") from None
    return prefix, low, high


def _non_negative_int(name: str, value: str) -> int:
    if not value.isdigit():
        raise _bad_request(f"{name} must be a non-negative integer, got '{_short(value)}'")
    return int(value)


def _parse_result_param(
    query: SearchQuery, name: str, value: str, max_count: int, strict: bool
) -> bool:
    """Apply a ``_count``-style parameter; ``False`` if ``name`` is not one."""
    if name == "_count":
        query.count = min(_non_negative_int(name, value), max_count)
    elif name == "_offset":
        query.offset = _non_negative_int(name, value)
    elif name == "_cursor":
        if value[:1] not in ("a", "b") or not value[1:].isdigit():
            raise _bad_request(f"_cursor '{_short(value)}' is not a cursor this server issued")
        query.cursor = (value[0], int(value[1:]))
    elif name == "_sort":
        first = value.split(",", maxsplit=1)[0]
        if first in _SORTS:
            query.sort = first
        elif strict:
            raise _bad_request(
                f"_sort '{_short(value)}' is not supported ({', '.join(sorted(_SORTS))})"
            )
    elif name == "_summary":
        query.summary_count = value == "count"
    else:
        return name in _QUIET_PARAMS
    return True


def parse_search(
    items: Iterable[tuple[str, str]],
    *,
    default_count: int = DEFAULT_PAGE_SIZE,
    max_count: int = MAX_PAGE_SIZE,
    strict: bool = False,
    conditional: bool = False,
) -> SearchQuery:
    """Parse search parameters. ``conditional`` (criteria of a conditional
    interaction) refuses unknown parameters and requires at least one criterion,
    since ignoring one would widen the match and write the wrong resource."""
    query = SearchQuery(count=default_count)
    for raw_name, value in items:
        name, _, modifier = raw_name.partition(":")
        if not conditional and _parse_result_param(query, raw_name, value, max_count, strict):
            continue
        if name not in _FILTER_PARAMS or (modifier and name in ("_id", "_lastUpdated")):
            if strict or conditional:
                raise _bad_request(
                    f"search parameter '{_short(raw_name)}' is not supported", code="not-supported"
                )
            query.ignored.append(raw_name)
            continue
        if not value:
            continue  # a parameter without a value is ignored (R4 search.html)
        _parse_filter(query, name, modifier, value)
        query.used.append((raw_name, value))
    if query.cursor is not None and query.sort is not None:
        raise _bad_request("_cursor pages creation order; page a _sort search with _offset")
    if conditional and not query.has_criteria:
        raise _bad_request(
            "conditional interaction needs search criteria (e.g. identifier=system|value)"
        )
    return query


# --------------------------------------------------------------------------- search execution


@dataclass(slots=True)
class SearchResult:
    """One page of matches; navigation as ``(parameter, value)`` to add to the query."""

    versions: list[StoredVersion]
    total: int
    next_page: tuple[str, str] | None = None
    previous_page: tuple[str, str] | None = None
    this_page: tuple[str, str] | None = None


class _Searcher:
    """Runs one query against one type table (caller holds the store lock)."""

    def __init__(self, table: _TypeTable, query: SearchQuery) -> None:
        self.table = table
        self.query = query
        self.filtered = bool(query.groups or query.id_groups)
        self.seqs = self._candidate_seqs()

    def _candidate_seqs(self) -> Sequence[int]:
        ids: set[str] | frozenset[str] | None = None
        for group in self.query.groups:
            found = self._union(group)
            ids = found if ids is None else ids & found
        for wanted in self.query.id_groups:
            found_ids = {i for i in wanted if self._live(i)}
            ids = found_ids if ids is None else ids & found_ids
        if ids is None:
            return range(len(self.table.order))  # every resource, in creation order
        versions = self.table.versions
        return sorted(versions[i][-1].seq for i in ids)

    def _union(self, group: list[IndexKey]) -> set[str] | frozenset[str]:
        index = self.table.index
        if len(group) == 1:
            return index.get(group[0], _EMPTY_IDS)  # shared; never mutated here
        return set().union(*(index.get(key, _EMPTY_IDS) for key in group))

    def _live(self, resource_id: str) -> bool:
        current = self.table.current(resource_id)
        return current is not None and not current.deleted

    def _match(self, seq: int) -> StoredVersion | None:
        version = self.table.versions[self.table.order[seq]][-1]
        if version.deleted:
            return None
        for prefix, low, high in self.query.last_updated:
            if not _instant_matches(prefix, low, high, version.last_updated_us):
                return None
        return version

    def _total(self) -> int:
        if self.query.last_updated:
            return sum(1 for seq in self.seqs if self._match(seq) is not None)
        return len(self.seqs) if self.filtered else self.table.live

    def run(self) -> SearchResult:
        query = self.query
        total = self._total()
        if query.count == 0 or query.summary_count:
            return SearchResult([], total)
        if query.sort is not None:
            return self._sorted_page(total)
        if query.cursor is not None:
            direction, seq = query.cursor
            cursor = ("_cursor", f"{direction}{seq}")
            if direction == "a":
                return self._forward(bisect.bisect_right(self.seqs, seq), total, cursor)
            return self._backward(bisect.bisect_left(self.seqs, seq), total, cursor)
        offset = ("_offset", str(query.offset)) if query.offset else None
        return self._forward(self._skip(query.offset), total, offset)

    def _collect(self, start: int, step: int, limit: int) -> list[StoredVersion]:
        found: list[StoredVersion] = []
        index = start
        while 0 <= index < len(self.seqs) and len(found) < limit:
            version = self._match(self.seqs[index])
            if version is not None:
                found.append(version)
            index += step
        return found

    def _skip(self, offset: int) -> int:
        """Index into ``seqs`` after the first ``offset`` matches."""
        if self.filtered and not self.query.last_updated:
            return offset  # index hits are all live and unfiltered by time
        index = 0
        while offset and index < len(self.seqs):
            offset -= self._match(self.seqs[index]) is not None
            index += 1
        return index

    def _forward(self, start: int, total: int, this_page: tuple[str, str] | None) -> SearchResult:
        count = self.query.count
        page = self._collect(start, 1, count + 1)
        result = SearchResult(page[:count], total, this_page=this_page)
        if not result.versions:
            return result
        if len(page) > count:
            result.next_page = ("_cursor", f"a{result.versions[-1].seq}")
        if self._collect(start - 1, -1, 1):
            result.previous_page = ("_cursor", f"b{result.versions[0].seq}")
        return result

    def _backward(self, end: int, total: int, this_page: tuple[str, str]) -> SearchResult:
        count = self.query.count
        page = self._collect(end - 1, -1, count + 1)
        result = SearchResult(page[:count][::-1], total, this_page=this_page)
        if not result.versions:
            return result
        if len(page) > count:
            result.previous_page = ("_cursor", f"b{result.versions[0].seq}")
        if self._collect(end, 1, 1):
            result.next_page = ("_cursor", f"a{result.versions[-1].seq}")
        return result

    def _sorted_page(self, total: int) -> SearchResult:
        query = self.query
        assert query.sort is not None
        matches = [v for seq in self.seqs if (v := self._match(seq)) is not None]
        if query.sort.endswith("_id"):
            matches.sort(key=lambda v: v.id, reverse=query.sort.startswith("-"))
        else:
            matches.sort(
                key=lambda v: (v.last_updated_us, v.seq), reverse=query.sort.startswith("-")
            )
        start, count = query.offset, query.count
        result = SearchResult(matches[start : start + count], total)
        if start:
            result.this_page = ("_offset", str(start))
            result.previous_page = ("_offset", str(max(0, start - count)))
        if start + count < len(matches):
            result.next_page = ("_offset", str(start + count))
        return result


# --------------------------------------------------------------------------- validation


def validate_resource(resource: object, resource_type: str) -> dict[str, Any]:
    """Structural checks of a resource sent for ``resource_type``; returns it."""
    if not isinstance(resource, dict):
        raise _bad_request(f"a {resource_type} resource must be a JSON object", code="structure")
    found = resource.get("resourceType")
    if found is None:
        raise _bad_request("resourceType is missing", code="required", expression=resource_type)
    if found != resource_type:
        raise _bad_request(
            f"resourceType '{_short(found)}' does not match the type in the URL, '{resource_type}'",
            expression=f"{resource_type}.resourceType",
        )
    resource_id = resource.get("id")
    if resource_id is not None and not (isinstance(resource_id, str) and _ID_RE.match(resource_id)):
        raise _bad_request(
            f"{resource_type}.id '{_short(resource_id)}' is not a FHIR id ([A-Za-z0-9-.]{{1,64}})",
            expression=f"{resource_type}.id",
        )
    if "meta" in resource and not isinstance(resource["meta"], dict):
        raise _bad_request(f"{resource_type}.meta must be an object", code="structure")
    if resource_type == "Observation":
        _validate_observation(resource)
    return resource


def _validate_observation(resource: Mapping[str, Any]) -> None:
    allowed = "|".join(OBSERVATION_STATUSES)
    status = resource.get("status")
    if status is None:
        raise FhirProblem(
            422,
            "required",
            f"Observation.status is required (1..1; {allowed})",
            expression="Observation.status",
        )
    if status not in OBSERVATION_STATUSES:
        raise FhirProblem(
            422,
            "code-invalid",
            f"Observation.status '{_short(status)}' is not in the R4 value set "
            f"observation-status ({allowed})",
            expression="Observation.status",
        )
    code = resource.get("code")
    if code is None:
        raise FhirProblem(
            422,
            "required",
            "Observation.code is required (1..1 CodeableConcept)",
            expression="Observation.code",
        )
    if not isinstance(code, dict) or not code:
        raise FhirProblem(
            422,
            "structure",
            "Observation.code must be a non-empty CodeableConcept object",
            expression="Observation.code",
        )
    if "coding" in code and not (
        isinstance(code["coding"], list) and all(isinstance(c, dict) for c in code["coding"])
    ):
        raise FhirProblem(
            422,
            "structure",
            "Observation.code.coding must be an array of Coding objects",
            expression="Observation.code.coding",
        )


def _check_type(resource_type: str) -> str:
    if resource_type not in R4_RESOURCE_TYPES:
        raise FhirProblem(
            404, "not-supported", f"'{_short(resource_type)}' is not a FHIR R4 resource type"
        )
    return resource_type


def _check_id(resource_type: str, resource_id: str) -> str:
    if not _ID_RE.match(resource_id):
        raise _bad_request(
            f"'{_short(resource_id)}' is not a valid {resource_type} id ([A-Za-z0-9-.]{{1,64}})"
        )
    return resource_id


def _etag_version(etag: str) -> str:
    """``W/"3"`` -> ``3`` (If-Match / Bundle.entry.request.ifMatch)."""
    text = etag.strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"')


# --------------------------------------------------------------------------- interactions

WriteKind = Literal["create", "update", "delete", "matched", "nothing"]


@dataclass(slots=True)
class _Write:
    """A planned write, decided against the current state before anything changes."""

    kind: WriteKind  # matched: conditional create found one; nothing: delete without target
    resource_type: str
    id: str | None
    status: int
    resource: dict[str, Any] | None = None
    existing: StoredVersion | None = None
    identity: tuple[str, ...] | None = None  # what a transaction may touch only once

    @property
    def changes(self) -> bool:
        return self.kind in ("create", "update", "delete")


class _Interactions:
    """The FHIR interactions on a store; the caller holds ``store.lock``."""

    def __init__(self, store: FhirStore, default_count: int, max_count: int) -> None:
        self.store = store
        self.default_count = default_count
        self.max_count = max_count

    def parse(
        self, items: Iterable[tuple[str, str]], *, strict: bool = False, conditional: bool = False
    ) -> SearchQuery:
        return parse_search(
            items,
            default_count=self.default_count,
            max_count=self.max_count,
            strict=strict,
            conditional=conditional,
        )

    def matches(
        self, resource_type: str, criteria: str | Iterable[tuple[str, str]], what: str
    ) -> tuple[SearchQuery, SearchResult]:
        """Up to two matches of conditional ``criteria`` (``what`` names them in errors)."""
        if isinstance(criteria, str):
            # If-None-Exist / ifNoneExist carry the query part, sometimes with "Type?" in front.
            criteria = _query_items(criteria.split("?", 1)[-1])
        try:
            query = self.parse(criteria, conditional=True)
        except FhirProblem as problem:
            raise _bad_request(f"{what}: {problem.diagnostics}", code=problem.code) from None
        query.count = 2  # enough to tell one match from several
        return query, self.store.search(resource_type, query)

    @staticmethod
    def _several(resource_type: str, what: str, total: int) -> FhirProblem:
        return FhirProblem(
            412,
            "multiple-matches",
            f"{what} matches {total} {resource_type} resources; it must match at most one",
        )

    def plan_create(
        self, resource_type: str, resource: object, if_none_exist: str | None
    ) -> _Write:
        body = validate_resource(resource, resource_type)
        identity = None
        if if_none_exist is not None:
            query, found = self.matches(resource_type, if_none_exist, "If-None-Exist")
            if found.total > 1:
                raise self._several(resource_type, "If-None-Exist", found.total)
            if found.total == 1:
                existing = found.versions[0]
                return _Write(
                    "matched",
                    resource_type,
                    existing.id,
                    200,
                    existing=existing,
                    identity=(resource_type, existing.id),
                )
            identity = ("?", resource_type, query.criteria_key())
        return _Write(
            "create", resource_type, str(uuid.uuid4()), 201, resource=body, identity=identity
        )

    def plan_update(
        self, resource_type: str, resource_id: str, resource: object, if_match: str | None
    ) -> _Write:
        _check_id(resource_type, resource_id)
        body = validate_resource(resource, resource_type)
        body_id = body.get("id")
        if body_id != resource_id:
            shown = "has no id" if body_id is None else f"has id '{body_id}'"
            raise _bad_request(
                f"the {resource_type} in the body {shown} but the URL names '{resource_id}'",
                expression=f"{resource_type}.id",
            )
        current = self.store.current(resource_type, resource_id)
        if if_match is not None and (
            current is None or current.deleted or str(current.version_id) != _etag_version(if_match)
        ):
            have = "none" if current is None or current.deleted else current.etag
            raise FhirProblem(
                412,
                "conflict",
                f"If-Match {_short(if_match)} does not match the current version of "
                f"{resource_type}/{resource_id} ({have})",
            )
        status = 201 if current is None or current.deleted else 200
        kind: WriteKind = "create" if status == 201 else "update"
        return _Write(
            kind,
            resource_type,
            resource_id,
            status,
            resource=body,
            identity=(resource_type, resource_id),
        )

    def plan_conditional_update(
        self,
        resource_type: str,
        criteria: Iterable[tuple[str, str]],
        resource: object,
        if_match: str | None,
    ) -> _Write:
        body = validate_resource(resource, resource_type)
        query, found = self.matches(resource_type, criteria, "conditional update")
        body_id = body.get("id")
        if found.total > 1:
            raise self._several(resource_type, "conditional update", found.total)
        if found.total == 1:
            target = found.versions[0].id
            if body_id is not None and body_id != target:
                raise _bad_request(
                    f"the body has id '{body_id}' but the criteria match {resource_type}/{target}",
                    expression=f"{resource_type}.id",
                )
            return self.plan_update(resource_type, target, {**body, "id": target}, if_match)
        if body_id is None:
            write = self.plan_create(resource_type, body, None)
            write.identity = ("?", resource_type, query.criteria_key())
            return write
        current = self.store.current(resource_type, body_id)
        if current is not None and not current.deleted:
            raise FhirProblem(
                409,
                "conflict",
                f"no {resource_type} matches the criteria, yet the body's id names the "
                f"existing {resource_type}/{body_id}",
            )
        return self.plan_update(resource_type, body_id, body, if_match)

    def plan_delete(self, resource_type: str, resource_id: str) -> _Write:
        _check_id(resource_type, resource_id)
        current = self.store.current(resource_type, resource_id)
        if current is None or current.deleted:
            # Deleting an absent resource succeeds without effect (R4 http.html#delete).
            return _Write(
                "nothing",
                resource_type,
                resource_id,
                204,
                existing=current,
                identity=(resource_type, resource_id),
            )
        return _Write(
            "delete", resource_type, resource_id, 204, identity=(resource_type, resource_id)
        )

    def plan_conditional_delete(
        self, resource_type: str, criteria: Iterable[tuple[str, str]]
    ) -> _Write:
        _, found = self.matches(resource_type, criteria, "conditional delete")
        if found.total > 1:
            raise self._several(resource_type, "conditional delete", found.total)
        if found.total == 0:
            return _Write("nothing", resource_type, None, 204)
        return self.plan_delete(resource_type, found.versions[0].id)

    def apply(self, write: _Write) -> StoredVersion | None:
        if write.kind in ("create", "update"):
            assert write.id is not None
            return self.store.write(write.resource_type, write.id, write.resource)
        if write.kind == "delete":
            assert write.id is not None
            return self.store.write(write.resource_type, write.id, None)
        return write.existing

    def read(self, resource_type: str, resource_id: str) -> StoredVersion:
        current = self.store.current(resource_type, resource_id)
        if current is None:
            raise FhirProblem(
                404, "not-found", f"{resource_type}/{_short(resource_id)} is not known"
            )
        if current.deleted:
            raise FhirProblem(
                410,
                "deleted",
                f"{resource_type}/{resource_id} was deleted (version {current.version_id})",
            )
        return current

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> StoredVersion:
        history = self.store.history(resource_type, resource_id)
        if not history:
            raise FhirProblem(
                404, "not-found", f"{resource_type}/{_short(resource_id)} is not known"
            )
        if not version_id.isdigit() or not 1 <= int(version_id) <= len(history):
            raise FhirProblem(
                404,
                "not-found",
                f"{resource_type}/{resource_id} has no version '{_short(version_id)}'",
            )
        version = history[int(version_id) - 1]
        if version.deleted:
            raise FhirProblem(
                410,
                "deleted",
                f"version {version_id} of {resource_type}/{resource_id} is a deletion",
            )
        return version

    def history(self, resource_type: str, resource_id: str) -> list[StoredVersion]:
        versions = self.store.history(resource_type, resource_id)
        if not versions:
            raise FhirProblem(
                404, "not-found", f"{resource_type}/{_short(resource_id)} is not known"
            )
        return versions


def _query_items(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)


# --------------------------------------------------------------------------- bundles


def _bundle(bundle_type: str, entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _now_instant()},
        "type": bundle_type,
        **extra,
    }
    if entries:  # FHIR JSON forbids empty arrays
        bundle["entry"] = entries
    return bundle


def _page_url(
    base: str, resource_type: str, query: SearchQuery, page: tuple[str, str] | None
) -> str:
    items = [*query.used]
    if query.sort is not None:
        items.append(("_sort", query.sort))
    if query.summary_count:
        items.append(("_summary", "count"))
    items.append(("_count", str(query.count)))
    if page is not None:
        items.append(page)
    return f"{base}/{resource_type}?{urlencode(items)}"


def searchset(
    base: str, resource_type: str, query: SearchQuery, result: SearchResult
) -> dict[str, Any]:
    """A ``searchset`` Bundle with absolute ``self``/``next``/``previous`` links."""
    links = [{"relation": "self", "url": _page_url(base, resource_type, query, result.this_page)}]
    if result.next_page is not None:
        links.append(
            {"relation": "next", "url": _page_url(base, resource_type, query, result.next_page)}
        )
    if result.previous_page is not None:
        links.append(
            {
                "relation": "previous",
                "url": _page_url(base, resource_type, query, result.previous_page),
            }
        )
    entries = [
        {
            "fullUrl": f"{base}/{v.reference}",
            "resource": orjson.Fragment(v.body),
            "search": {"mode": "match"},
        }
        for v in result.versions
        if v.body is not None
    ]
    return _bundle("searchset", entries, total=result.total, link=links)


def _history_bundle(base: str, versions: list[StoredVersion]) -> dict[str, Any]:
    entries = []
    for version in reversed(versions):  # newest first (R4 http.html#history)
        entry: dict[str, Any] = {"fullUrl": f"{base}/{version.reference}"}
        if version.body is not None:
            entry["resource"] = orjson.Fragment(version.body)
        method, status = (
            ("DELETE", 204)
            if version.deleted
            else (("POST", 201) if version.version_id == 1 else ("PUT", 200))
        )
        entry["request"] = {
            "method": method,
            "url": version.resource_type if method == "POST" else version.reference,
        }
        entry["response"] = {
            "status": _status_text(status),
            "etag": version.etag,
            "lastModified": version.last_updated,
        }
        entries.append(entry)
    return _bundle("history", entries, total=len(versions))


@dataclass(slots=True)
class _Entry:
    """One parsed ``Bundle.entry`` of a transaction or batch."""

    index: int
    method: str
    segments: list[str]
    query: list[tuple[str, str]] | None  # None when the url has no '?'
    resource: Any
    full_url: str | None
    if_none_exist: str | None
    if_match: str | None

    @property
    def resource_type(self) -> str:
        return self.segments[0]


_METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2}  # R4 http.html#trules
_IDENTIFIED = ("create", "update", "matched")  # plans whose fullUrl names a live resource


class _BundleProcessor:
    """Runs transaction and batch Bundles (caller holds ``store.lock``)."""

    def __init__(
        self, interactions: _Interactions, base: str, base_path: str, representation: bool
    ) -> None:
        self.interactions = interactions
        self.base = base
        self.base_path = base_path
        self.representation = representation

    # ---- parsing

    def _parse_entry(self, index: int, raw: object) -> _Entry:
        if not isinstance(raw, dict):
            raise _bad_request("must be an object", code="structure")
        request = raw.get("request")
        if not isinstance(request, dict):
            raise _bad_request(
                "request (method, url) is required in a transaction or batch", code="required"
            )
        method, url = request.get("method"), request.get("url")
        if method not in ("GET", "POST", "PUT", "DELETE"):
            raise FhirProblem(
                400,
                "not-supported",
                f"request.method '{_short(method)}' is not supported (GET POST PUT DELETE)",
            )
        if not isinstance(url, str) or not url:
            raise _bad_request("request.url is required", code="required")
        path, mark, query = self._relative(url).partition("?")
        segments = [s for s in path.split("/") if s]
        if not segments:
            raise _bad_request(f"request.url '{_short(url)}' names no resource type")
        _check_type(segments[0])
        full_url = raw.get("fullUrl")
        resource = raw.get("resource")
        if method in ("POST", "PUT") and resource is None:
            raise _bad_request(f"a {method} entry needs a resource", code="required")
        return _Entry(
            index,
            method,
            segments,
            _query_items(query) if mark else None,
            resource,
            full_url if isinstance(full_url, str) else None,
            _optional_text(request.get("ifNoneExist")),
            _optional_text(request.get("ifMatch")),
        )

    def _relative(self, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            return url.lstrip("/")
        marker = f"{self.base_path}/" if self.base_path else "/"
        position = url.find(marker, url.find("//") + 2)
        if position < 0:
            raise _bad_request(f"request.url '{_short(url)}' does not address this server")
        return url[position + len(marker) :]

    def _entries(self, bundle: Mapping[str, Any]) -> list[object]:
        entries = bundle.get("entry", [])
        if not isinstance(entries, list):
            raise _bad_request(
                "Bundle.entry must be an array", code="structure", expression="Bundle.entry"
            )
        return entries

    # ---- one entry

    def _plan(self, entry: _Entry) -> _Write:
        act = self.interactions
        kind, query = entry.resource_type, entry.query
        shape = (entry.method, len(entry.segments), query is not None)
        if shape == ("POST", 1, False):
            return act.plan_create(kind, entry.resource, entry.if_none_exist)
        if shape == ("PUT", 2, False):
            return act.plan_update(kind, entry.segments[1], entry.resource, entry.if_match)
        if shape == ("PUT", 1, True):
            assert query is not None
            return act.plan_conditional_update(kind, query, entry.resource, entry.if_match)
        if shape == ("DELETE", 2, False):
            return act.plan_delete(kind, entry.segments[1])
        if shape == ("DELETE", 1, True):
            assert query is not None
            return act.plan_conditional_delete(kind, query)
        shown = "/".join(entry.segments) + ("?..." if query is not None else "")
        raise _bad_request(f"{entry.method} {_short(shown)} is not a supported interaction")

    def _get(self, entry: _Entry) -> dict[str, Any]:
        act, kind, segments = self.interactions, entry.resource_type, entry.segments
        if len(segments) == 1 or (len(segments) == 2 and segments[1] == "_search"):
            query = act.parse(entry.query or [])
            result = act.store.search(kind, query)
            return {
                "resource": searchset(self.base, kind, query, result),
                "response": {"status": _status_text(200)},
            }
        if len(segments) == 2:
            return self._version_entry(act.read(kind, segments[1]), 200)
        if len(segments) == 3 and segments[2] == "_history":
            bundle = _history_bundle(self.base, act.history(kind, segments[1]))
            return {"resource": bundle, "response": {"status": _status_text(200)}}
        if len(segments) == 4 and segments[2] == "_history":
            return self._version_entry(act.vread(kind, segments[1], segments[3]), 200)
        raise _bad_request(f"GET {_short('/'.join(segments))} is not a supported interaction")

    def _version_entry(
        self, version: StoredVersion, status: int, *, representation: bool = True
    ) -> dict[str, Any]:
        response: dict[str, Any] = {"status": _status_text(status)}
        entry: dict[str, Any] = {
            "fullUrl": f"{self.base}/{version.reference}",
            "response": response,
        }
        if version.body is not None:
            response["location"] = f"{version.reference}/_history/{version.version_id}"
            if representation:
                entry["resource"] = orjson.Fragment(version.body)
        response["etag"] = version.etag
        response["lastModified"] = version.last_updated
        return entry

    def _write_entry(self, write: _Write, version: StoredVersion | None) -> dict[str, Any]:
        if version is None:
            return {"response": {"status": _status_text(write.status)}}
        return self._version_entry(version, write.status, representation=self.representation)

    # ---- batch

    def batch(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """Each entry on its own, in order; failures become error entries."""
        results = []
        for index, raw in enumerate(self._entries(bundle)):
            try:
                entry = self._parse_entry(index, raw)
                if entry.method == "GET":
                    results.append(self._get(entry))
                else:
                    write = self._plan(entry)
                    results.append(self._write_entry(write, self.interactions.apply(write)))
            except FhirProblem as problem:
                results.append(
                    {
                        "response": {
                            "status": _status_text(problem.status),
                            "outcome": problem.outcome(),
                        }
                    }
                )
        return _bundle("batch-response", results)

    # ---- transaction

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """All entries or none (R4 http.html#trules); raises FhirProblem on failure."""
        entries = [
            self._located(index, self._parse_entry, index, raw)
            for index, raw in enumerate(self._entries(bundle))
        ]
        writes = sorted(
            (e for e in entries if e.method != "GET"), key=lambda e: _METHOD_ORDER[e.method]
        )
        plans = {e.index: self._located(e.index, self._plan, e) for e in writes}
        self._refuse_overlaps(plans)
        self._resolve_references(entries, plans)
        results: dict[int, dict[str, Any]] = {}
        applied: list[StoredVersion] = []
        try:
            for entry in writes:
                plan = plans[entry.index]
                version = self.interactions.apply(plan)
                if plan.changes and version is not None:
                    applied.append(version)
                results[entry.index] = self._write_entry(plan, version)
            for entry in entries:
                if entry.method == "GET":
                    results[entry.index] = self._located(entry.index, self._get, entry)
        except BaseException:
            for version in reversed(applied):
                self.interactions.store.undo(version)
            raise
        return _bundle("transaction-response", [results[e.index] for e in entries])

    @staticmethod
    def _located(index: int, step: Callable[..., _T], *args: Any) -> _T:
        try:
            return step(*args)
        except FhirProblem as problem:
            raise problem.in_entry(index) from None

    @staticmethod
    def _refuse_overlaps(plans: Mapping[int, _Write]) -> None:
        seen: dict[tuple[str, ...], int] = {}
        for index in sorted(plans):
            identity = plans[index].identity
            if identity is None:
                continue
            if identity in seen:
                what = f"{identity[1]}?{identity[2]}" if identity[0] == "?" else "/".join(identity)
                raise _bad_request(
                    f"Bundle.entry[{seen[identity]}] and Bundle.entry[{index}] both resolve to "
                    f"{what}; a transaction may touch a resource only once",
                    code="business-rule",
                )
            seen[identity] = index

    def _resolve_references(self, entries: list[_Entry], plans: Mapping[int, _Write]) -> None:
        assigned: dict[str, str] = {}
        for entry in entries:
            plan = plans.get(entry.index)
            if entry.full_url is None or not entry.full_url.startswith("urn:"):
                continue
            if entry.full_url in assigned:
                raise _bad_request(
                    f"fullUrl {_short(entry.full_url)} appears on more than one entry"
                ).in_entry(entry.index)
            if plan is not None and plan.id is not None and plan.kind in _IDENTIFIED:
                assigned[entry.full_url] = f"{plan.resource_type}/{plan.id}"
        resolver = _ReferenceResolver(assigned, self.interactions)
        for index, plan in plans.items():
            if plan.kind in ("create", "update") and plan.resource is not None:
                self._located(index, resolver.rewrite, plan.resource)


def _optional_text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


class _ReferenceResolver:
    """Rewrites ``urn:uuid:`` and conditional references of a transaction."""

    def __init__(self, assigned: Mapping[str, str], interactions: _Interactions) -> None:
        self.assigned = assigned
        self.interactions = interactions
        self.searched: dict[str, str] = {}

    def rewrite(self, node: object) -> None:
        """Replace every ``reference`` string found anywhere in ``node`` (in place)."""
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    node[key] = self._resolve(value)
                elif isinstance(value, dict | list):
                    self.rewrite(value)
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, dict | list):
                    self.rewrite(item)

    def _resolve(self, reference: str) -> str:
        if reference.startswith("urn:uuid:"):
            target = self.assigned.get(reference)
            if target is None:
                raise _bad_request(
                    f"reference {_short(reference)} matches no fullUrl in this transaction",
                    code="not-found",
                )
            return target
        kind, mark, criteria = reference.partition("?")
        if mark and kind in R4_RESOURCE_TYPES:
            return self._conditional(reference, kind, criteria)
        return reference

    def _conditional(self, reference: str, kind: str, criteria: str) -> str:
        # Conditional reference (R4 http.html#trules): exactly one match required.
        if reference not in self.searched:
            _, found = self.interactions.matches(
                kind, criteria, f"conditional reference {kind}?..."
            )
            if found.total != 1:
                raise FhirProblem(
                    412,
                    "not-found" if found.total == 0 else "multiple-matches",
                    f"conditional reference {kind}?... matches {found.total} resources; "
                    "it must match exactly one",
                )
            self.searched[reference] = found.versions[0].reference
        return self.searched[reference]


# --------------------------------------------------------------------------- faults & stats


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


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True, slots=True)
class _Settings:
    base_path: str
    max_body_bytes: int
    default_count: int
    max_count: int


@dataclass(frozen=True, slots=True)
class _Preferences:
    """The HTTP ``Prefer`` header (R4 http.html#ops, search.html#errors)."""

    returns: str = "representation"
    strict: bool = False

    @classmethod
    def of(cls, request: Request) -> _Preferences:
        returns, strict = "representation", False
        for token in re.split(r"[,;]", request.headers.get("prefer", "")):
            name, _, value = token.strip().partition("=")
            value = value.strip().strip('"')
            if name == "return" and value in ("minimal", "representation", "OperationOutcome"):
                returns = value
            elif name == "handling":
                strict = value == "strict"
        return cls(returns, strict)


def _json_response(
    status: int, content: object, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content), status_code=status, media_type=_RESPONSE_MEDIA_TYPE, headers=headers
    )


def _problem_response(problem: FhirProblem) -> Response:
    return _json_response(problem.status, problem.outcome(), problem.headers or None)


Handler = Callable[[Request], Awaitable[Response]]


class _FhirApi:
    """The HTTP face of the store: request parsing, faults, response shaping."""

    def __init__(
        self, store: FhirStore, faults: FhirFaults, stats: FhirStats, settings: _Settings
    ) -> None:
        self.store = store
        self.faults = faults
        self.stats = stats
        self.settings = settings
        self.interactions = _Interactions(store, settings.default_count, settings.max_count)
        self.capabilities = _capability_rest()

    # ---- plumbing

    def base(self, request: Request) -> str:
        """Absolute URL of the FHIR base as the client addressed it (for links)."""
        # From the ASGI scope directly: building Starlette URL objects costs more
        # than the rest of a write.
        scope = request.scope
        host = request.headers.get("host")
        if host is None:
            server_host, port = scope.get("server") or ("localhost", 80)
            host = f"{server_host}:{port}"
        return f"{scope['scheme']}://{host}{scope.get('root_path', '')}{self.settings.base_path}"

    async def guard(
        self, request: Request, handler: Handler, *, write: bool, label: str | None
    ) -> Response:
        """Count, apply injected faults, and turn FhirProblem into OperationOutcome."""
        self.stats.count(request.method, label or request.path_params.get("resource_type", "?"))
        try:
            retry_after = self.faults.down()
            if retry_after is not None:
                self.stats.fault()
                raise FhirProblem(
                    503,
                    "transient",
                    "the FHIR server is down (injected fault)",
                    headers={"Retry-After": str(retry_after)},
                )
            fault = self.faults.claim() if write else None
            if fault is not None and fault.delay_s:
                # Receive the request first, as a slow server would: a client that
                # times out has then sent a write that may still land.
                await self.read_body(request)
                await asyncio.sleep(fault.delay_s)
            if fault is not None and fault.status is not None and not fault.apply:
                return self._fault_response(fault)
            response = await handler(request)
            if fault is not None and fault.status is not None:
                return self._fault_response(fault)  # applied, but the answer is "lost"
            return response
        except FhirProblem as problem:
            return _problem_response(problem)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening any more

    def _fault_response(self, fault: FhirFault) -> Response:
        self.stats.fault()
        assert fault.status is not None
        headers = (
            {"Retry-After": str(fault.retry_after_s)} if fault.retry_after_s is not None else None
        )
        code = "transient" if fault.status >= 500 else "processing"
        outcome = operation_outcome(f"injected fault: HTTP {fault.status}", code=code)
        return _json_response(fault.status, outcome, headers)

    async def read_body(
        self, request: Request, accepted: frozenset[str] = _ACCEPTED_MEDIA_TYPES
    ) -> bytes:
        """The request body, within the size limit (read once, then cached)."""
        cached: bytes | None = getattr(request.state, "fhir_body", None)
        if cached is not None:
            return cached
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type and media_type not in accepted:
            raise FhirProblem(
                415,
                "not-supported",
                f"content type '{_short(media_type)}' is not supported; send {FHIR_JSON}",
            )
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            chunks.append(chunk)
        body = b"".join(chunks)
        request.state.fhir_body = body
        return body

    @staticmethod
    def _too_large(limit: int) -> FhirProblem:
        return FhirProblem(
            413,
            "too-costly",
            f"request body exceeds the {limit}-byte limit",
            headers={"Connection": "close"},
        )

    async def read_json(self, request: Request) -> Any:
        raw = await self.read_body(request)
        if not raw.strip():
            raise _bad_request(
                "the request body is empty; a FHIR resource is required", code="required"
            )
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad_request(
                f"the request body is not valid JSON ({exc})", code="structure"
            ) from None

    @staticmethod
    def resource_type(request: Request) -> str:
        return _check_type(request.path_params["resource_type"])

    def _version_headers(
        self, request: Request, version: StoredVersion, *, location: bool
    ) -> dict[str, str]:
        headers = {"ETag": version.etag, "Last-Modified": _http_date(version.last_updated_us)}
        if location:
            headers["Location"] = (
                f"{self.base(request)}/{version.reference}/_history/{version.version_id}"
            )
        return headers

    def _version_response(
        self, request: Request, version: StoredVersion, status: int = 200
    ) -> Response:
        headers = self._version_headers(request, version, location=status == 201)
        return Response(
            version.body, status_code=status, media_type=_RESPONSE_MEDIA_TYPE, headers=headers
        )

    def _write_response(
        self, request: Request, write: _Write, version: StoredVersion | None
    ) -> Response:
        if version is None or version.deleted:
            headers = {"ETag": version.etag} if version is not None else None
            return Response(status_code=write.status, headers=headers)
        returns = _Preferences.of(request).returns
        if returns == "representation":
            return self._version_response(request, version, write.status)
        headers = self._version_headers(request, version, location=write.status == 201)
        if returns == "minimal":
            return Response(status_code=write.status, headers=headers)
        done = {"create": "created", "update": "updated"}.get(write.kind, "already exists")
        outcome = operation_outcome(
            f"{version.reference} {done} (version {version.version_id})",
            code="informational",
            severity="information",
        )
        return _json_response(write.status, outcome, headers)

    def _locked_write(self, request: Request, plan: Callable[[], _Write]) -> Response:
        with self.store.lock:  # plan and apply atomically (conditional interactions)
            write = plan()
            version = self.interactions.apply(write)
        return self._write_response(request, write, version)

    # ---- handlers

    async def metadata(self, request: Request) -> Response:
        statement = {
            "resourceType": "CapabilityStatement",
            "id": "ehrbridge-sandbox",
            "name": "EhrbridgeSandboxFhirServer",
            "status": "active",
            "date": self.capabilities[0],
            "publisher": "ehrbridge",
            "kind": "instance",
            "software": {"name": SERVER_NAME, "version": SERVER_VERSION},
            "implementation": {
                "description": "ehrbridge sandbox FHIR R4 server (in-memory)",
                "url": self.base(request),
            },
            "fhirVersion": FHIR_VERSION,
            "format": [FHIR_JSON, "json"],
            "rest": self.capabilities[1],
        }
        return _json_response(200, statement)

    async def create(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        resource = await self.read_json(request)
        if_none_exist = request.headers.get("if-none-exist")
        return self._locked_write(
            request, lambda: self.interactions.plan_create(resource_type, resource, if_none_exist)
        )

    async def update(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        resource_id = request.path_params["resource_id"]
        resource = await self.read_json(request)
        if_match = request.headers.get("if-match")
        return self._locked_write(
            request,
            lambda: self.interactions.plan_update(resource_type, resource_id, resource, if_match),
        )

    async def conditional_update(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        criteria = request.query_params.multi_items()
        if not criteria:
            raise FhirProblem(
                405,
                "not-supported",
                f"PUT {resource_type} needs an id or search criteria (conditional update)",
            )
        resource = await self.read_json(request)
        if_match = request.headers.get("if-match")
        return self._locked_write(
            request,
            lambda: self.interactions.plan_conditional_update(
                resource_type, criteria, resource, if_match
            ),
        )

    async def delete(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        resource_id = request.path_params["resource_id"]
        return self._locked_write(
            request, lambda: self.interactions.plan_delete(resource_type, resource_id)
        )

    async def conditional_delete(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        criteria = request.query_params.multi_items()
        if not criteria:
            raise FhirProblem(
                405,
                "not-supported",
                f"DELETE {resource_type} needs an id or search criteria (conditional delete)",
            )
        return self._locked_write(
            request, lambda: self.interactions.plan_conditional_delete(resource_type, criteria)
        )

    async def read(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        return self._version_response(
            request, self.interactions.read(resource_type, request.path_params["resource_id"])
        )

    async def vread(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        params = request.path_params
        return self._version_response(
            request,
            self.interactions.vread(resource_type, params["resource_id"], params["version_id"]),
        )

    async def history(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        versions = self.interactions.history(resource_type, request.path_params["resource_id"])
        return _json_response(200, _history_bundle(self.base(request), versions))

    async def search(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        items = request.query_params.multi_items()
        if request.method == "POST":  # POST [type]/_search: parameters in a form body
            raw = await self.read_body(request, frozenset({_FORM_MEDIA_TYPE}))
            items += _query_items(raw.decode("utf-8", "replace"))
        query = self.interactions.parse(items, strict=_Preferences.of(request).strict)
        result = self.store.search(resource_type, query)
        return _json_response(200, searchset(self.base(request), resource_type, query, result))

    async def bundle(self, request: Request) -> Response:
        document = await self.read_json(request)
        if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
            raise _bad_request(
                "POST to the base accepts a Bundle of type transaction or batch",
                expression="Bundle",
            )
        bundle_type = document.get("type")
        if bundle_type not in ("transaction", "batch"):
            raise _bad_request(
                f"Bundle.type '{_short(bundle_type)}' cannot be processed; "
                "use transaction or batch",
                expression="Bundle.type",
            )
        representation = _Preferences.of(request).returns == "representation"
        processor = _BundleProcessor(
            self.interactions, self.base(request), self.settings.base_path, representation
        )
        with self.store.lock:
            result = (
                processor.transaction(document)
                if bundle_type == "transaction"
                else processor.batch(document)
            )
        return _json_response(200, result)


def _capability_rest() -> tuple[str, list[dict[str, Any]]]:
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
            "documentation": "also subject:identifier=system|value",
        },
        {
            "name": "patient",
            "type": "reference",
            "documentation": "also patient:identifier=system|value",
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
    return _now_instant(), [rest]


def _normalize_base_path(base_path: str) -> str:
    path = "/" + base_path.strip("/")
    return "" if path == "/" else path


def create_fhir_app(
    *,
    base_path: str = "/fhir",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_count: int = DEFAULT_PAGE_SIZE,
    max_count: int = MAX_PAGE_SIZE,
    store: FhirStore | None = None,
    admin: bool = True,
) -> FastAPI:
    """The sandbox FHIR R4 server as a FastAPI app.

    ``app.state.store`` (:class:`FhirStore`), ``app.state.faults``
    (:class:`FhirFaults`) and ``app.state.stats`` (:class:`FhirStats`) are
    there for in-process use. ``admin=False`` drops the ``/_admin`` routes.
    """
    if max_body_bytes <= 0 or not 0 < default_count <= max_count:
        raise ValueError("need max_body_bytes > 0 and 0 < default_count <= max_count")
    settings = _Settings(_normalize_base_path(base_path), max_body_bytes, default_count, max_count)
    api = _FhirApi(store or FhirStore(), FhirFaults(), FhirStats(), settings)
    app = FastAPI(
        title=SERVER_NAME, version=SERVER_VERSION, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.store, app.state.faults, app.state.stats = api.store, api.faults, api.stats
    app.add_exception_handler(StarletteHTTPException, _http_error_as_outcome)
    app.add_exception_handler(RequestValidationError, _validation_error_as_outcome)
    app.add_exception_handler(Exception, _crash_as_outcome)
    if admin:
        _add_admin_routes(app, api)  # first: with base_path "" they would look like /{type}/{id}
    _add_fhir_routes(app, api)
    return app


def _add_fhir_routes(app: FastAPI, api: _FhirApi) -> None:
    base = api.settings.base_path
    instance = f"{base}/{{resource_type}}/{{resource_id}}"

    def route(
        path: str, method: str, handler: Handler, *, write: bool = False, label: str | None = None
    ) -> None:
        async def endpoint(request: Request) -> Response:
            return await api.guard(request, handler, write=write, label=label)

        # A plain Starlette route: the handlers take the Request only, so FastAPI's
        # per-request dependency solving would be pure overhead.
        app.add_route(path or "/", endpoint, methods=[method], include_in_schema=False)

    route(f"{base}/metadata", "GET", api.metadata, label="metadata")
    route(base, "POST", api.bundle, write=True, label="Bundle")
    if base:
        route(f"{base}/", "POST", api.bundle, write=True, label="Bundle")
    route(f"{base}/{{resource_type}}/_search", "GET", api.search)
    route(f"{base}/{{resource_type}}/_search", "POST", api.search)
    route(f"{base}/{{resource_type}}", "GET", api.search)
    route(f"{base}/{{resource_type}}", "POST", api.create, write=True)
    route(f"{base}/{{resource_type}}", "PUT", api.conditional_update, write=True)
    route(f"{base}/{{resource_type}}", "DELETE", api.conditional_delete, write=True)
    route(instance, "GET", api.read)
    route(instance, "PUT", api.update, write=True)
    route(instance, "DELETE", api.delete, write=True)
    route(f"{instance}/_history", "GET", api.history)
    route(f"{instance}/_history/{{version_id}}", "GET", api.vread)


def _add_admin_routes(app: FastAPI, api: _FhirApi) -> None:
    @app.post("/_admin/faults", include_in_schema=False)
    async def inject_faults(request: Request) -> Response:
        try:
            spec = orjson.loads(await request.body())
            if not isinstance(spec, dict):
                raise ValueError("the fault plan must be a JSON object")
            api.faults.inject(spec)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return _json_response(400, operation_outcome(str(exc), code="invalid"))
        return _json_response(200, api.faults.snapshot())

    @app.get("/_admin/faults", include_in_schema=False)
    async def show_faults() -> Response:
        return _json_response(200, api.faults.snapshot())

    @app.delete("/_admin/faults", include_in_schema=False)
    async def clear_faults() -> Response:
        api.faults.clear()
        return _json_response(200, api.faults.snapshot())

    @app.get("/_admin/stats", include_in_schema=False)
    async def show_stats() -> Response:
        return _json_response(200, {**api.stats.snapshot(), "resources": api.store.counts()})

    @app.delete("/_admin/stats", include_in_schema=False)
    async def reset_stats() -> Response:
        api.stats.reset()
        return Response(status_code=204)

    @app.delete("/_admin/store", include_in_schema=False)
    async def reset_store() -> Response:
        api.store.reset()
        return Response(status_code=204)


async def _http_error_as_outcome(request: Request, exc: Exception) -> Response:
    # Unknown paths (404) and wrong methods (405) answer OperationOutcome too.
    assert isinstance(exc, StarletteHTTPException)
    code = (
        "not-found"
        if exc.status_code == 404
        else "not-supported"
        if exc.status_code == 405
        else "processing"
    )
    diagnostics = f"{request.method} {request.url.path}: {exc.detail}"
    return _json_response(exc.status_code, operation_outcome(diagnostics, code=code), exc.headers)


async def _validation_error_as_outcome(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    diagnostics = "; ".join(
        f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()
    )
    return _json_response(400, operation_outcome(diagnostics or "invalid request", code="invalid"))


async def _crash_as_outcome(request: Request, exc: Exception) -> Response:
    # Never the exception text: it may quote resource content (PHI).
    return _json_response(
        500, operation_outcome(f"internal error ({type(exc).__name__})", code="exception")
    )


def serve_fhir(
    host: str = "127.0.0.1",
    port: int = 8092,
    *,
    base_path: str = "/fhir",
    journal: Path | None = None,
) -> None:
    """Serve the sandbox FHIR server with uvicorn until interrupted (blocking)."""
    app = create_fhir_app(base_path=base_path, store=FhirStore(journal))
    uvicorn.run(app, host=host, port=port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    """``python -m ehrbridge.sandbox.fhir_server``: the EHR stand-in on its own."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ehrbridge.sandbox.fhir_server",
        description="The sandbox's FHIR R4 server alone, standing in for an EHR. It keeps "
        "resources in memory, and also in --journal if given, so that they outlive a restart. "
        "Point a site's writeback.fhir_base at http://HOST:PORT/fhir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8092, help="port to listen on")
    parser.add_argument("--base-path", default="/fhir", help="path of the FHIR base")
    parser.add_argument(
        "--journal", type=Path, help="file that keeps the resources (default: none)"
    )
    args = parser.parse_args(argv)
    serve_fhir(args.host, args.port, base_path=args.base_path, journal=args.journal)


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
