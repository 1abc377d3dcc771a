"""The HTTP face of the store: request parsing, injected faults, response shaping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from ehrbridge.adapters.fhir_http import (
    FHIR_JSON,
    FHIR_JSON_UTF8,
    FORM_MEDIA_TYPE,
    JSON_MEDIA_TYPES,
    BodyTooLarge,
    Preferences,
    check_media_type,
    fhir_response,
    read_limited,
    too_large,
)
from ehrbridge.adapters.fhir_http import FhirProblem as AnyFhirProblem
from ehrbridge.sandbox.fhir.bundles import history_bundle, searchset
from ehrbridge.sandbox.fhir.capability import capability_rest
from ehrbridge.sandbox.fhir.errors import FhirProblem, bad_request, operation_outcome
from ehrbridge.sandbox.fhir.faults import FhirFault, FhirFaults, FhirStats
from ehrbridge.sandbox.fhir.instants import http_date
from ehrbridge.sandbox.fhir.interactions import REQUEST_STARTED, Interactions, Write, query_items
from ehrbridge.sandbox.fhir.spec import (
    FHIR_VERSION,
    SERVER_NAME,
    SERVER_VERSION,
    short,
)
from ehrbridge.sandbox.fhir.store import FhirStore
from ehrbridge.sandbox.fhir.transactions import BundleProcessor
from ehrbridge.sandbox.fhir.validation import check_type
from ehrbridge.sandbox.fhir.versions import StoredVersion


@dataclass(frozen=True, slots=True)
class Settings:
    base_path: str
    max_body_bytes: int
    default_count: int
    max_count: int


Handler = Callable[[Request], Awaitable[Response]]


class FhirApi:
    """The HTTP face of the store: request parsing, faults, response shaping."""

    def __init__(
        self, store: FhirStore, faults: FhirFaults, stats: FhirStats, settings: Settings
    ) -> None:
        self.store = store
        self.faults = faults
        self.stats = stats
        self.settings = settings
        self.interactions = Interactions(store, settings.default_count, settings.max_count)
        self.capabilities = capability_rest()

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
        REQUEST_STARTED.set(self.store.clock_us() if write else None)  # this request's task only
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
        except AnyFhirProblem as problem:  # ours, and the shared plumbing's (413, 415)
            return problem.response()
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
        return fhir_response(fault.status, outcome, headers)

    async def read_body(
        self, request: Request, accepted: frozenset[str] = JSON_MEDIA_TYPES
    ) -> bytes:
        """The request body, within the size limit (read once, then cached)."""
        cached: bytes | None = getattr(request.state, "fhir_body", None)
        if cached is not None:
            return cached
        check_media_type(request, accepted)
        limit = self.settings.max_body_bytes
        try:
            body = await read_limited(request, limit)
        except BodyTooLarge as over:
            raise too_large(over.size, limit) from None
        request.state.fhir_body = body
        return body

    async def read_json(self, request: Request) -> Any:
        raw = await self.read_body(request)
        if not raw.strip():
            raise bad_request(
                "the request body is empty; a FHIR resource is required", code="required"
            )
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad_request(
                f"the request body is not valid JSON ({exc})", code="structure"
            ) from None

    @staticmethod
    def resource_type(request: Request) -> str:
        return check_type(request.path_params["resource_type"])

    def _version_headers(
        self, request: Request, version: StoredVersion, *, location: bool
    ) -> dict[str, str]:
        headers = {"ETag": version.etag, "Last-Modified": http_date(version.last_updated_us)}
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
            version.body, status_code=status, media_type=FHIR_JSON_UTF8, headers=headers
        )

    def _write_response(
        self, request: Request, write: Write, version: StoredVersion | None
    ) -> Response:
        if version is None or version.deleted:
            headers = {"ETag": version.etag} if version is not None else None
            return Response(status_code=write.status, headers=headers)
        returns = Preferences.of(request).returns
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
        return fhir_response(write.status, outcome, headers)

    def _locked_write(self, request: Request, plan: Callable[[], Write]) -> Response:
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
        return fhir_response(200, statement)

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
        return fhir_response(200, history_bundle(self.base(request), versions))

    async def search(self, request: Request) -> Response:
        resource_type = self.resource_type(request)
        items = request.query_params.multi_items()
        if request.method == "POST":  # POST [type]/_search: parameters in a form body
            raw = await self.read_body(request, frozenset({FORM_MEDIA_TYPE}))
            items += query_items(raw.decode("utf-8", "replace"))
        query = self.interactions.parse(items, strict=Preferences.of(request).strict)
        result = self.store.search(resource_type, query)
        return fhir_response(200, searchset(self.base(request), resource_type, query, result))

    async def bundle(self, request: Request) -> Response:
        document = await self.read_json(request)
        if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
            raise bad_request(
                "POST to the base accepts a Bundle of type transaction or batch",
                expression="Bundle",
            )
        bundle_type = document.get("type")
        if bundle_type not in ("transaction", "batch"):
            raise bad_request(
                f"Bundle.type '{short(bundle_type)}' cannot be processed; use transaction or batch",
                expression="Bundle.type",
            )
        representation = Preferences.of(request).returns == "representation"
        processor = BundleProcessor(
            self.interactions, self.base(request), self.settings.base_path, representation
        )
        with self.store.lock:
            result = (
                processor.transaction(document)
                if bundle_type == "transaction"
                else processor.batch(document)
            )
        return fhir_response(200, result)
