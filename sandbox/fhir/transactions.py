"""Transaction and batch Bundles: all-or-nothing planning, reference resolution."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from ehrbridge.adapters.fhir_http import status_text
from ehrbridge.sandbox.fhir.bundles import history_bundle, new_bundle, searchset
from ehrbridge.sandbox.fhir.errors import FhirProblem, bad_request
from ehrbridge.sandbox.fhir.interactions import Interactions, Write, query_items
from ehrbridge.sandbox.fhir.spec import R4_RESOURCE_TYPES, short
from ehrbridge.sandbox.fhir.validation import check_type
from ehrbridge.sandbox.fhir.versions import StoredVersion

_T = TypeVar("_T")


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


class BundleProcessor:
    """Runs transaction and batch Bundles (caller holds ``store.lock``)."""

    def __init__(
        self, interactions: Interactions, base: str, base_path: str, representation: bool
    ) -> None:
        self.interactions = interactions
        self.base = base
        self.base_path = base_path
        self.representation = representation

    # ---- parsing

    def _parse_entry(self, index: int, raw: object) -> _Entry:
        if not isinstance(raw, dict):
            raise bad_request("must be an object", code="structure")
        request = raw.get("request")
        if not isinstance(request, dict):
            raise bad_request(
                "request (method, url) is required in a transaction or batch", code="required"
            )
        method, url = request.get("method"), request.get("url")
        if method not in ("GET", "POST", "PUT", "DELETE"):
            raise FhirProblem(
                400,
                "not-supported",
                f"request.method '{short(method)}' is not supported (GET POST PUT DELETE)",
            )
        if not isinstance(url, str) or not url:
            raise bad_request("request.url is required", code="required")
        path, mark, query = self._relative(url).partition("?")
        segments = [s for s in path.split("/") if s]
        if not segments:
            raise bad_request(f"request.url '{short(url)}' names no resource type")
        check_type(segments[0])
        full_url = raw.get("fullUrl")
        resource = raw.get("resource")
        if method in ("POST", "PUT") and resource is None:
            raise bad_request(f"a {method} entry needs a resource", code="required")
        return _Entry(
            index,
            method,
            segments,
            query_items(query) if mark else None,
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
            raise bad_request(f"request.url '{short(url)}' does not address this server")
        return url[position + len(marker) :]

    def _entries(self, bundle: Mapping[str, Any]) -> list[object]:
        entries = bundle.get("entry", [])
        if not isinstance(entries, list):
            raise bad_request(
                "Bundle.entry must be an array", code="structure", expression="Bundle.entry"
            )
        return entries

    # ---- one entry

    def _plan(self, entry: _Entry) -> Write:
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
        raise bad_request(f"{entry.method} {short(shown)} is not a supported interaction")

    def _get(self, entry: _Entry) -> dict[str, Any]:
        act, kind, segments = self.interactions, entry.resource_type, entry.segments
        if len(segments) == 1 or (len(segments) == 2 and segments[1] == "_search"):
            query = act.parse(entry.query or [])
            result = act.store.search(kind, query)
            return {
                "resource": searchset(self.base, kind, query, result),
                "response": {"status": status_text(200)},
            }
        if len(segments) == 2:
            return self._version_entry(act.read(kind, segments[1]), 200)
        if len(segments) == 3 and segments[2] == "_history":
            bundle = history_bundle(self.base, act.history(kind, segments[1]))
            return {"resource": bundle, "response": {"status": status_text(200)}}
        if len(segments) == 4 and segments[2] == "_history":
            return self._version_entry(act.vread(kind, segments[1], segments[3]), 200)
        raise bad_request(f"GET {short('/'.join(segments))} is not a supported interaction")

    def _version_entry(
        self, version: StoredVersion, status: int, *, representation: bool = True
    ) -> dict[str, Any]:
        response: dict[str, Any] = {"status": status_text(status)}
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

    def _write_entry(self, write: Write, version: StoredVersion | None) -> dict[str, Any]:
        if version is None:
            return {"response": {"status": status_text(write.status)}}
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
                            "status": status_text(problem.status),
                            "outcome": problem.outcome(),
                        }
                    }
                )
        return new_bundle("batch-response", results)

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
        return new_bundle("transaction-response", [results[e.index] for e in entries])

    @staticmethod
    def _located(index: int, step: Callable[..., _T], *args: Any) -> _T:
        try:
            return step(*args)
        except FhirProblem as problem:
            raise problem.in_entry(index) from None

    @staticmethod
    def _refuse_overlaps(plans: Mapping[int, Write]) -> None:
        seen: dict[tuple[str, ...], int] = {}
        for index in sorted(plans):
            identity = plans[index].identity
            if identity is None:
                continue
            if identity in seen:
                what = f"{identity[1]}?{identity[2]}" if identity[0] == "?" else "/".join(identity)
                raise bad_request(
                    f"Bundle.entry[{seen[identity]}] and Bundle.entry[{index}] both resolve to "
                    f"{what}; a transaction may touch a resource only once",
                    code="business-rule",
                )
            seen[identity] = index

    def _resolve_references(self, entries: list[_Entry], plans: Mapping[int, Write]) -> None:
        assigned: dict[str, str] = {}
        for entry in entries:
            plan = plans.get(entry.index)
            if entry.full_url is None or not entry.full_url.startswith("urn:"):
                continue
            if entry.full_url in assigned:
                raise bad_request(
                    f"fullUrl {short(entry.full_url)} appears on more than one entry"
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

    def __init__(self, assigned: Mapping[str, str], interactions: Interactions) -> None:
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
                raise bad_request(
                    f"reference {short(reference)} matches no fullUrl in this transaction",
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
