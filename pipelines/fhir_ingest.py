"""FHIR R4 input checks: what is refused before anything is stored, and why.

The FHIR ingest endpoint (``ehrbridge/fhir_api.py``) and :class:`Ingest`
(any FHIR envelope) both run these checks, so a resource or Bundle is either
stored whole or refused with an OperationOutcome naming the problem -- never
half-stored. They are cheap by design: one ``orjson`` parse, one pass over
``Bundle.entry`` that looks at each entry's ``resourceType`` (a Synthea
patient has hundreds of Claims and ExplanationOfBenefits this site never
reads), a regular expression over the raw bytes for ``urn:uuid:`` references,
and the site's own fact extraction (``pipelines/fhir_facts.py``) for the
Observations and Patients it does read.

Two kinds of refusal, as FHIR's RESTful API distinguishes them
(https://hl7.org/fhir/R4/http.html#2.21.0.10):

* **400** (:class:`FhirRejected`): not JSON, not a FHIR resource, a type
  other than the URL names, a Bundle that breaks the base specification
  (bdl-3 ``request`` missing, bdl-7 duplicate ``fullUrl``, a ``urn:uuid:``
  reference that resolves to no entry), an Observation without the
  ``status`` or ``code`` R4 requires;
* **422** (:class:`FhirUnprocessable`): valid FHIR that this site cannot use:
  an Observation without a ``subject`` (a result must name its patient), a
  mapped result whose ``valueQuantity`` has a value but no unit, a patient
  without the site's identifier, a unit the mapping does not convert, a
  result timed in the future or before its patient's birth date (the
  expression names the element, e.g. ``Bundle.entry[3].resource.issued``).

Resource types the site does not read are accepted and counted, not failed.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ehrbridge.core.errors import MessageRejected, MessageUnusable, PermanentError
from ehrbridge.pipelines.facts import Extraction, FactRules
from ehrbridge.pipelines.jsonshape import items

READ_TYPES = frozenset({"Patient", "Observation"})  # what pipelines/fhir_facts.py reads
BUNDLE_TYPES_IN = frozenset({"transaction", "batch", "collection"})
ENTRY_METHODS = frozenset({"POST", "PUT"})
# R4 Observation.status, required binding (http://hl7.org/fhir/observation-status).
OBSERVATION_STATUSES = frozenset(
    {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_URN_REFERENCE = re.compile(rb'"reference"\s*:\s*"(urn:(?:uuid|oid):[^"\\]+)"')
_MAX_ISSUES = 20  # an OperationOutcome lists this many problems at most
# JSON nesting refused at the door. orjson reads 1,024 levels but writes only 254,
# and refused input, batch entries and notifications are written back (dead
# letters, records): deeper input would fail after it was taken. FHIR itself
# nests a few levels (a Bundle's Observation's valueQuantity is 5; Questionnaire
# items rarely go past 10).
MAX_DEPTH = 254


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue: an IssueType code, the sentence, the FHIRPath."""

    code: str  # http://hl7.org/fhir/issue-type: structure, required, value, invalid ...
    diagnostics: str
    expression: str | None = None
    severity: str = "error"
    status: int = 400  # 400 breaks FHIR itself, 422 is valid FHIR this site cannot use
    reason: str = "fhir.invalid"  # the dead-letter reason code

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


def _summary(issues: Sequence[Issue]) -> str:
    first = issues[0]
    where = f"{first.expression}: " if first.expression else ""
    more = f" (and {len(issues) - 1} more problem(s))" if len(issues) > 1 else ""
    return f"{where}{first.diagnostics}{more}"


class FhirRejected(MessageRejected):
    """The input breaks the FHIR base specification: HTTP 400."""

    status = 400

    def __init__(self, issues: Sequence[Issue], *, reason: str) -> None:
        super().__init__(_summary(issues), reason=reason)
        self.issues = list(issues)


class FhirUnprocessable(MessageUnusable):
    """Valid FHIR that this site cannot use: HTTP 422."""

    status = 422

    def __init__(self, issues: Sequence[Issue], *, reason: str) -> None:
        super().__init__(_summary(issues), reason=reason)
        self.issues = list(issues)


def reject(code: str, diagnostics: str, reason: str, expression: str | None = None) -> FhirRejected:
    return FhirRejected([Issue(code, diagnostics, expression)], reason=reason)


def unprocessable(
    code: str, diagnostics: str, reason: str, expression: str | None = None
) -> FhirUnprocessable:
    return FhirUnprocessable([Issue(code, diagnostics, expression)], reason=reason)


def http_status(error: PermanentError) -> int:
    """400 for what breaks FHIR itself, 422 for what this site cannot use."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status
    return 400 if isinstance(error, MessageRejected) else 422


def issues_of(error: PermanentError) -> list[Issue]:
    """The issues of an ingest error, for an OperationOutcome (any PermanentError)."""
    issues = getattr(error, "issues", None)
    if isinstance(issues, list) and issues:
        return issues
    code = "structure" if isinstance(error, MessageRejected) else "processing"
    return [Issue(code, error.detail)]


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


# --------------------------------------------------------------------------- checked input


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource of the input, as the response needs to name it."""

    index: int  # position in Bundle.entry (0 for a single resource)
    resource_type: str
    resource_id: str  # Resource.id, the id of a urn:uuid fullUrl, or a generated one
    method: str  # POST (create) or PUT (update)
    read: bool  # used by this site: a Patient, or an Observation its mapping names
    full_url: str = ""


@dataclass
class Checked:
    """A resource or Bundle that passed the checks."""

    doc: dict[str, Any]
    resource_type: str
    source_id: str  # Bundle.id or Resource.id, else generated (names the stored record)
    entries: list[Entry]
    counts: Counter[str] = field(default_factory=Counter)  # resources by type
    extraction: Extraction | None = None  # None when nothing here is read by the site
    patient_links: list[tuple[str, str]] = field(default_factory=list)  # (Patient.id, patient)

    @property
    def bundle_type(self) -> str | None:
        value = self.doc.get("type") if self.resource_type == "Bundle" else None
        return value if isinstance(value, str) else None

    @property
    def stored(self) -> bool:
        """Whether there is anything this site reads (else accepted and only counted)."""
        return self.extraction is not None

    @property
    def keys(self) -> list[str]:
        """Partition keys: one per patient (see :attr:`Extraction.keys`)."""
        return self.extraction.keys if self.extraction is not None else [self.source_id]


def parse(payload: bytes) -> dict[str, Any]:
    """The JSON object of a FHIR resource, or :class:`FhirRejected` (400)."""
    if not payload.strip():
        raise reject("required", "the request body is empty; send a FHIR resource", "fhir.empty")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise reject(
            "structure", f"the body is not valid JSON ({exc})", "fhir.unparseable"
        ) from exc
    if not isinstance(doc, dict):
        raise reject(
            "structure", "the JSON is not an object, so not a FHIR resource", "fhir.not_a_resource"
        )
    _refuse_too_deep(doc)
    kind = doc.get("resourceType")
    if not isinstance(kind, str) or not kind:
        raise reject(
            "required",
            "resourceType is missing: the JSON is not a FHIR resource",
            "fhir.not_a_resource",
            "resourceType",
        )
    if not _RESOURCE_TYPE.match(kind):
        raise reject(
            "value",
            "resourceType is not a FHIR resource type name",
            "fhir.unknown_type",
            "resourceType",
        )
    return doc


def _refuse_too_deep(doc: dict[str, Any]) -> None:
    """FhirRejected if ``doc`` nests deeper than :data:`MAX_DEPTH` (linear, in C).

    Writing it is the probe: orjson stops at its limit, which is ours, in
    about a millisecond per megabyte, where a walk in Python costs as much as
    the parse.
    """
    try:
        orjson.dumps(doc)
    except orjson.JSONEncodeError:
        raise reject(
            "too-costly",
            f"the JSON nests deeper than {MAX_DEPTH} levels; no FHIR resource does",
            "fhir.too_deep",
        ) from None


# --------------------------------------------------------------------------- the checks


class Checker:
    """The checks of one site (its mapping decides which results need a unit)."""

    def __init__(self, rules: FactRules) -> None:
        self.rules = rules
        self.patient_system = rules.mapping.patient.fhir_system

    def check_payload(self, payload: bytes) -> Checked:
        """Any FHIR input as one record: a resource, or a transaction or collection Bundle."""
        doc = parse(payload)
        if doc["resourceType"] == "Bundle":
            return self.check_bundle(doc, payload)
        return self.check_resource(doc)

    def check_resource(self, doc: dict[str, Any], expected_type: str | None = None) -> Checked:
        """One resource posted on its own (``POST /fhir/{type}``)."""
        kind = str(doc["resourceType"])
        if expected_type is not None and kind != expected_type:
            raise reject(
                "invalid",
                f"resourceType is {kind} but the URL names {expected_type}",
                "fhir.wrong_type",
                "resourceType",
            )
        problems: list[Issue] = []
        self._check_content(doc, kind, kind, problems)
        _raise_first(problems)
        entry = Entry(0, kind, _resource_id(doc, ""), "POST", self.reads(doc))
        # The record is named in logs and the DLQ: never by a Patient's id.
        record = entry.resource_id if kind != "Patient" else f"fhir-{uuid.uuid4()}"
        checked = Checked(doc, kind, record, [entry], Counter({kind: 1}))
        if entry.read:
            self._extract(checked, {entry.resource_id: 0} if doc.get("id") else {})
        return checked

    def check_bundle(self, doc: dict[str, Any], payload: bytes | None = None) -> Checked:
        """A transaction or collection: every entry checked, references resolved, all or nothing."""
        bundle_type = self._bundle_type(doc, BUNDLE_TYPES_IN)
        raw_entries = _raw_entries(doc)
        problems: list[Issue] = []
        seen: dict[str, int] = {}
        entries = [
            entry
            for index, raw in enumerate(raw_entries)
            if (entry := self._entry(index, raw, bundle_type, seen, problems)) is not None
        ]
        _raise_first(problems)
        _raise_first(_broken_references(payload or orjson.dumps(doc), raw_entries))
        checked = Checked(doc, "Bundle", _resource_id(doc, ""), entries)
        checked.counts.update(e.resource_type for e in entries)
        if any(e.read for e in entries):
            self._extract(checked, _ids_of(raw_entries, entries))
        return checked

    def check_batch(self, doc: dict[str, Any]) -> list[tuple[Any, Checked | PermanentError]]:
        """A batch: each entry on its own, stored or refused by itself (http.html#transaction).

        Returns (the raw entry, its check) per entry, in order.

        An Observation is stored together with the Patient entries of the batch its
        subject names, so that the patient can be identified when it is processed.
        """
        self._bundle_type(doc, frozenset({"batch"}))
        raw_entries = _raw_entries(doc)
        full_urls = {
            e["fullUrl"]
            for e in raw_entries
            if isinstance(e, dict) and isinstance(e.get("fullUrl"), str)
        }
        patients = _patients_by_reference(raw_entries)
        batch_id = _resource_id(doc, "")
        seen: dict[str, int] = {}
        results: list[tuple[Any, Checked | PermanentError]] = []
        for index, raw in enumerate(raw_entries):
            try:
                checked = self._batch_entry(index, raw, batch_id, (seen, full_urls, patients))
            except PermanentError as error:
                results.append((raw, error))
            else:
                results.append((raw, checked))
        return results

    def _batch_entry(
        self,
        index: int,
        raw: Any,
        batch_id: str,
        context: tuple[dict[str, int], set[str], dict[str, dict[str, Any]]],
    ) -> Checked:
        seen, full_urls, patients = context
        problems: list[Issue] = []
        entry = self._entry(index, raw, "batch", seen, problems)
        _raise_first(problems)
        assert entry is not None
        refs = {r.decode() for r in _URN_REFERENCE.findall(orjson.dumps(raw))}
        _raise_first(
            [
                Issue(
                    "invalid",
                    f"reference {ref} resolves to no entry's fullUrl",
                    f"Bundle.entry[{index}].resource",
                    reason="fhir.broken_reference",
                )
                for ref in sorted(refs - full_urls)
            ]
        )
        resource = raw["resource"]
        members = [
            {"fullUrl": entry.full_url, "resource": resource}
            if entry.full_url
            else {"resource": resource}
        ]
        subject = (
            patients.get(_subject_reference(resource))
            if entry.resource_type == "Observation"
            else None
        )
        if subject is not None:
            members.append(subject)
        record_id = f"{batch_id}-{index}"
        doc: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": record_id,
            "type": "collection",
            "entry": members,
        }
        checked = Checked(doc, "Bundle", record_id, [entry], Counter({entry.resource_type: 1}))
        if entry.read:
            self._extract(checked, {str(resource["id"]): index} if resource.get("id") else {})
        return checked

    @staticmethod
    def _bundle_type(doc: dict[str, Any], allowed: frozenset[str]) -> str:
        bundle_type = doc.get("type")
        if not isinstance(bundle_type, str) or bundle_type not in allowed:  # a list: unhashable
            raise reject(
                "not-supported" if isinstance(bundle_type, str) else "required",
                f"Bundle.type {bundle_type!r} is not taken here; send a transaction, batch or "
                "collection (Subscription notifications go to /fhir/subscription-notification)",
                "fhir.bundle_type",
                "Bundle.type",
            )
        return str(bundle_type)

    # -- entries ------------------------------------------------------------------------

    def _entry(
        self,
        index: int,
        raw: Any,
        bundle_type: str,
        seen_urls: dict[str, int],
        problems: list[Issue],
    ) -> Entry | None:
        where = f"Bundle.entry[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("resource"), dict):
            problems.append(Issue("required", "the entry has no resource", f"{where}.resource"))
            return None
        resource = raw["resource"]
        kind = resource.get("resourceType")
        if not isinstance(kind, str) or not _RESOURCE_TYPE.match(kind):
            problems.append(
                Issue("required", "the resource has no valid resourceType", f"{where}.resource")
            )
            return None
        full_url = raw["fullUrl"] if isinstance(raw.get("fullUrl"), str) else ""
        if full_url:
            if full_url in seen_urls:  # bdl-7
                problems.append(
                    Issue(
                        "invalid",
                        f"fullUrl repeats entry {seen_urls[full_url]}'s (bdl-7: unique)",
                        f"{where}.fullUrl",
                    )
                )
            seen_urls.setdefault(full_url, index)
        method = self._method(raw, kind, bundle_type, where, problems)
        self._check_content(resource, kind, f"{where}.resource", problems)
        return Entry(
            index, kind, _resource_id(resource, full_url), method, self.reads(resource), full_url
        )

    @staticmethod
    def _method(
        raw: dict[str, Any], kind: str, bundle_type: str, where: str, problems: list[Issue]
    ) -> str:
        if bundle_type == "collection":
            return "POST"  # a collection is a set of resources; a request element is moot
        request = raw.get("request")
        if not isinstance(request, dict):  # bdl-3
            problems.append(
                Issue(
                    "required", f"a {bundle_type} entry needs a request (bdl-3)", f"{where}.request"
                )
            )
            return "POST"
        method = str(request.get("method", ""))
        # Type, Type/id, Type?criteria, or an absolute URL ending in one of those.
        segments = str(request.get("url", "")).split("?")[0].rstrip("/").split("/")
        target = next((s for s in segments[-2:] if s == kind), segments[0])
        if method not in ENTRY_METHODS:
            problems.append(
                Issue(
                    "not-supported",
                    f"request.method {method or '(none)'} is not taken: ehrbridge ingest receives "
                    "resources (POST create, PUT update); it does not read or delete",
                    f"{where}.request.method",
                    status=422,
                    reason="fhir.unsupported_method",
                )
            )
        elif target != kind:
            problems.append(
                Issue(
                    "invalid",
                    f"request.url names {target or '(nothing)'} but the resource is a {kind}",
                    f"{where}.request.url",
                )
            )
        return method if method in ENTRY_METHODS else "POST"

    def reads(self, resource: dict[str, Any]) -> bool:
        """Used by this site: a Patient, or an Observation whose code the mapping names.

        Anything else -- other types, and Observations of codes no feature takes (vital
        signs, a full blood count) -- is accepted and counted, never failed: an EHR that
        sends everything should not fill the dead-letter store with what nobody asked for.
        """
        kind = resource.get("resourceType")
        return kind == "Patient" or (kind == "Observation" and self._feature(resource) is not None)

    def _check_content(
        self, resource: dict[str, Any], kind: str, where: str, problems: list[Issue]
    ) -> None:
        """Only what a site reads is looked into (Observation); other types are opaque."""
        if kind != "Observation":
            return
        status = resource.get("status")
        if not isinstance(status, str) or status not in OBSERVATION_STATUSES:
            problems.append(
                Issue(
                    "required" if status is None else "code-invalid",
                    "Observation.status is required and must be a code of "
                    "http://hl7.org/fhir/observation-status",
                    f"{where}.status",
                )
            )
        if not isinstance(resource.get("code"), dict):
            problems.append(Issue("required", "Observation.code is required", f"{where}.code"))
        subject = resource.get("subject")
        if not isinstance(subject, dict) or not (
            subject.get("reference") or subject.get("identifier")
        ):
            problems.append(
                Issue(
                    "required",
                    "Observation.subject is required here: a result must name its patient "
                    "(a reference, or an identifier)",
                    f"{where}.subject",
                    status=422,
                    reason="fhir.missing_subject",
                )
            )
        self._check_unit(resource, where, problems)

    def _check_unit(self, resource: dict[str, Any], where: str, problems: list[Issue]) -> None:
        quantity = resource.get("valueQuantity")
        if not isinstance(quantity, dict) or quantity.get("value") is None:
            return
        if quantity.get("code") or quantity.get("unit"):
            if quantity.get("code") and not quantity.get("system"):  # qty-3
                problems.append(
                    Issue(
                        "invariant",
                        "valueQuantity has a code but no system (qty-3)",
                        f"{where}.valueQuantity",
                    )
                )
            return
        feature = self._feature(resource)
        if feature is None:
            return  # a result the site does not read may be unitless (a score, a count)
        units = ", ".join(c.label for c in self.rules.units[feature].values())
        problems.append(
            Issue(
                "required",
                f"valueQuantity has a value but no unit; {feature} results need one of the units "
                f"this site converts ({units})",
                f"{where}.valueQuantity",
                status=422,
                reason="fhir.missing_unit",
            )
        )

    def _feature(self, resource: dict[str, Any]) -> str | None:
        code = resource.get("code")
        codings = code.get("coding") if isinstance(code, dict) else None
        for coding in codings if isinstance(codings, list) else ():
            if isinstance(coding, dict):
                system, value = str(coding.get("system", "")), str(coding.get("code", ""))
                feature = self.rules.feature_of(system, value)
                if feature is not None:
                    return feature
        return None

    # -- facts --------------------------------------------------------------------------

    def _extract(self, checked: Checked, ids: dict[str, int]) -> None:
        """The site's fact extraction, so an unusable result is refused now, not later."""
        from ehrbridge.pipelines.fhir_facts import extract_fhir

        try:
            checked.extraction = extract_fhir(checked.doc, self.rules)
        except MessageRejected as error:
            where = _expression_for(error.detail, ids, checked)
            raise FhirRejected(
                [Issue("structure", error.detail, where, reason=error.reason)], reason=error.reason
            ) from error
        except MessageUnusable as error:
            where = _expression_for(error.detail, ids, checked)
            element = getattr(error, "element", "")  # fhir_facts.ElementUnusable
            if element:
                where = f"{where or checked.resource_type}.{element}"
            raise FhirUnprocessable(
                [Issue("processing", error.detail, where, status=422, reason=error.reason)],
                reason=error.reason,
            ) from error
        checked.patient_links = self._patient_links(checked)

    def _patient_links(self, checked: Checked) -> list[tuple[str, str]]:
        """(Patient.id, the site's patient id): lets CDS Hooks find a patient by FHIR id."""
        links: list[tuple[str, str]] = []
        for resource in _resources(checked.doc):
            if resource.get("resourceType") != "Patient" or not resource.get("id"):
                continue
            for identifier in items(resource.get("identifier")):
                if isinstance(identifier, dict) and identifier.get("system") == self.patient_system:
                    value = identifier.get("value")
                    if isinstance(value, str) and value.strip():
                        links.append((str(resource["id"]), value.strip()))
                        break
        return links


def _raw_entries(doc: dict[str, Any]) -> list[Any]:
    raw_entries = doc.get("entry", [])
    if not isinstance(raw_entries, list):
        raise reject("structure", "Bundle.entry is not a list", "fhir.bad_bundle", "Bundle.entry")
    return raw_entries


def _broken_references(payload: bytes, raw_entries: list[Any]) -> list[Issue]:
    """Every urn:uuid / urn:oid reference must be the fullUrl of an entry."""
    targets = set(_URN_REFERENCE.findall(payload))
    if not targets:
        return []
    full_urls = {
        e["fullUrl"].encode()
        for e in raw_entries
        if isinstance(e, dict) and isinstance(e.get("fullUrl"), str)
    }
    return [
        Issue(
            "invalid",
            f"reference {ref.decode(errors='replace')} resolves to no entry's fullUrl",
            _entry_holding(raw_entries, ref),
            reason="fhir.broken_reference",
        )
        for ref in sorted(targets - full_urls)[:_MAX_ISSUES]
    ]


def _ids_of(raw_entries: list[Any], entries: list[Entry]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for entry in entries:
        value = raw_entries[entry.index]["resource"].get("id") if entry.read else None
        if isinstance(value, str) and value:
            ids[value] = entry.index
    return ids


def _patients_by_reference(raw_entries: list[Any]) -> dict[str, dict[str, Any]]:
    """Patient entries by the references that may name them: fullUrl and Patient/<id>."""
    found: dict[str, dict[str, Any]] = {}
    for raw in raw_entries:
        if not isinstance(raw, dict) or not isinstance(raw.get("resource"), dict):
            continue
        resource = raw["resource"]
        if resource.get("resourceType") != "Patient":
            continue
        member = {"resource": resource}
        if isinstance(raw.get("fullUrl"), str):
            member["fullUrl"] = raw["fullUrl"]
            found[raw["fullUrl"]] = member
        if resource.get("id"):
            found[f"Patient/{resource['id']}"] = member
    return found


def _subject_reference(resource: dict[str, Any]) -> str:
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    return reference if isinstance(reference, str) else ""


def _raise_first(problems: list[Issue]) -> None:
    """Raise the problems found: 400 if any breaks FHIR itself, else 422."""
    if not problems:
        return
    issues = problems[:_MAX_ISSUES]
    structural = [i for i in issues if i.status == 400]
    if structural:
        raise FhirRejected(issues, reason=structural[0].reason)
    raise FhirUnprocessable(issues, reason=issues[0].reason)


def _resources(doc: dict[str, Any]) -> Iterable[dict[str, Any]]:
    if doc.get("resourceType") != "Bundle":
        yield doc
        return
    for entry in items(doc.get("entry")):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            yield entry["resource"]


def _resource_id(resource: dict[str, Any], full_url: str) -> str:
    """Resource.id, else the id in a urn:uuid fullUrl, else a new one (for Location)."""
    value = resource.get("id")
    if isinstance(value, str) and value:
        return value
    if full_url.startswith("urn:uuid:"):
        return full_url[len("urn:uuid:") :]
    if full_url:
        tail = full_url.rstrip("/").rsplit("/", 1)[-1]
        if tail:
            return tail
    return str(uuid.uuid4())


def _entry_holding(raw_entries: list[Any], reference: bytes) -> str | None:
    """Which entry holds a reference (error path only: one dump per entry)."""
    for index, entry in enumerate(raw_entries):
        if reference in orjson.dumps(entry):
            return f"Bundle.entry[{index}].resource"
    return None


def _expression_for(detail: str, ids: dict[str, int], checked: Checked) -> str | None:
    """Point at the entry a fact-extraction error names (``Observation/<id> ...``)."""
    match = re.match(r"^(Observation|Patient)/([A-Za-z0-9\-.]+)", detail)
    if match is None:
        return None
    if checked.resource_type != "Bundle":
        return match.group(1)
    index = ids.get(match.group(2))
    return f"Bundle.entry[{index}].resource" if index is not None else None
