"""Response Bundles: searchset pages with their links, and _history."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

import orjson

from ehrbridge.adapters.fhir_http import status_text
from ehrbridge.sandbox.fhir.instants import now_instant
from ehrbridge.sandbox.fhir.query import SearchQuery
from ehrbridge.sandbox.fhir.search import SearchResult
from ehrbridge.sandbox.fhir.versions import StoredVersion


def new_bundle(bundle_type: str, entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now_instant()},
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
    if query.accurate_total:
        items.append(("_total", "accurate"))
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
    # As HAPI: a page with more after it states no total unless asked (_total=accurate),
    # so that clients built against the stand-in follow next links and never count on one.
    known = result.next_page is None or query.wants_total
    total = {"total": result.total} if known else {}
    return new_bundle("searchset", entries, **total, link=links)


def history_bundle(base: str, versions: list[StoredVersion]) -> dict[str, Any]:
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
            "status": status_text(status),
            "etag": version.etag,
            "lastModified": version.last_updated,
        }
        entries.append(entry)
    return new_bundle("history", entries, total=len(versions))
