"""The stand-in as a FastAPI app, its routes, and its command line."""

from __future__ import annotations

from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ehrbridge.adapters.fhir_http import fhir_response
from ehrbridge.sandbox.fhir.api import FhirApi, Handler, Settings
from ehrbridge.sandbox.fhir.errors import operation_outcome
from ehrbridge.sandbox.fhir.faults import FhirFaults, FhirStats
from ehrbridge.sandbox.fhir.spec import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    SERVER_NAME,
    SERVER_VERSION,
)
from ehrbridge.sandbox.fhir.store import FhirStore


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
    settings = Settings(_normalize_base_path(base_path), max_body_bytes, default_count, max_count)
    api = FhirApi(store or FhirStore(), FhirFaults(), FhirStats(), settings)
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


def _add_fhir_routes(app: FastAPI, api: FhirApi) -> None:
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


def _add_admin_routes(app: FastAPI, api: FhirApi) -> None:
    @app.post("/_admin/faults", include_in_schema=False)
    async def inject_faults(request: Request) -> Response:
        try:
            spec = orjson.loads(await request.body())
            if not isinstance(spec, dict):
                raise ValueError("the fault plan must be a JSON object")
            api.faults.inject(spec)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return fhir_response(400, operation_outcome(str(exc), code="invalid"))
        return fhir_response(200, api.faults.snapshot())

    @app.get("/_admin/faults", include_in_schema=False)
    async def show_faults() -> Response:
        return fhir_response(200, api.faults.snapshot())

    @app.delete("/_admin/faults", include_in_schema=False)
    async def clear_faults() -> Response:
        api.faults.clear()
        return fhir_response(200, api.faults.snapshot())

    @app.get("/_admin/stats", include_in_schema=False)
    async def show_stats() -> Response:
        return fhir_response(200, {**api.stats.snapshot(), "resources": api.store.counts()})

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
    return fhir_response(exc.status_code, operation_outcome(diagnostics, code=code), exc.headers)


async def _validation_error_as_outcome(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    diagnostics = "; ".join(
        f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()
    )
    return fhir_response(400, operation_outcome(diagnostics or "invalid request", code="invalid"))


async def _crash_as_outcome(request: Request, exc: Exception) -> Response:
    # Never the exception text: it may quote resource content (PHI).
    return fhir_response(
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
