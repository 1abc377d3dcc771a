"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served by ehrbridge itself.

FastAPI's own pages load their JavaScript, CSS, favicon and (ReDoc) Google
Fonts from public CDNs, so on a hospital network without internet they are
blank. Here every asset comes from this process: the Swagger UI and ReDoc
bundles installed with the ``fastapi-offline`` package (a pinned, hashed
dependency in requirements/; MIT, bundling swagger-ui-dist, Apache-2.0, and
redoc, MIT), served at ``/docs/assets/{name}`` from a fixed list of files.

Swagger UI's online validator badge is switched off (``validatorUrl: null``):
it would send the API description to a public service. ReDoc's bundle draws
its footer logo from ``cdn.redoc.ly`` unconditionally; that one URL is
rewritten to the local favicon when the bundle is first served (the browser
test in tests/browser/ holds that no request leaves the host).

The pages, their assets and ``/openapi.json`` describe the API and hold no
data, so they are public (``ehrbridge.auth.PUBLIC_ROUTES``); Swagger UI's
Authorize button takes a token for the calls made from it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, Response

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs/assets"
# The only files served: a name is looked up here, never joined to a path.
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# Bundles change only with the installed package: a day in the browser cache is safe.
_CACHE = {"Cache-Control": "public, max-age=86400"}
# Hard-coded in redoc.standalone.js (the "API docs by Redocly" footer), loaded on every view.
_REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def add_docs_routes(app: FastAPI, title: str) -> None:
    """Swagger UI at ``/docs``, ReDoc at ``/redoc``; create the app with both URLs None."""
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - API (Swagger UI)",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=oauth2_redirect,
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - API (ReDoc)",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(f"{ASSETS_URL}/{{name}}", include_in_schema=False)
    def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, "no such asset")
        if name == "redoc.standalone.js":
            return Response(_local_redoc(), media_type=media_type, headers=_CACHE)
        return FileResponse(ASSETS_DIR / name, media_type=media_type, headers=_CACHE)


@cache
def _local_redoc() -> bytes:
    """ReDoc's bundle with its one loaded external URL pointed at this host."""
    bundle = (ASSETS_DIR / "redoc.standalone.js").read_bytes()
    return bundle.replace(_REDOC_LOGO, f"{ASSETS_URL}/favicon.png".encode())
