"""Credentials for tests that call a site's HTTP API: every route but the public ones
(``ehrbridge.auth.PUBLIC_ROUTES``: /health, CDS discovery, /fhir/metadata, /docs)
needs a bearer token.

A running sandbox (``BackgroundSandbox`` / ``Sandbox``) generates one static
token per role into ``<data dir>/tokens/`` and allowlists its own EHR's key
for CDS Hooks, so with a sandbox::

    from auth_tokens import headers, cds_headers

    httpx.get(f"{running.sandbox.api_url}/api/results", headers=headers(running, "viewer"))
    httpx.post(f"{api}/fhir", content=bundle, headers={**headers(running, "sender"), ...})
    httpx.post(f"{api}/cds-services/kfre-patient-view", json=body,
               headers=cds_headers(running, api))   # a fresh JWT each call (jti)

Roles: ``viewer`` (results, patients, /api/fhir), ``operator`` (+ /api/dlq),
``admin`` (everything), ``sender`` (FHIR ingest and notifications only).

A site YAML that a test writes itself from ``sandbox/site.yaml`` (a site in
its own process) names token files: :func:`localize` points them at a
directory and creates them, :func:`token_headers` gives the matching header::

    config = yaml.safe_load(sandbox_site_file().read_text())
    localize(config, tmp_path / "data")
    ... token_headers(tmp_path / "data", "viewer")

:func:`auth_section` is a whole ``auth:`` section for a YAML of your own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ehrbridge.cds_hooks import SERVICE_ID
from ehrbridge.config import ApiRole
from ehrbridge.sandbox.credentials import api_token, cds_token, localize_yaml, static_token_section
from ehrbridge.sandbox.run import BackgroundSandbox, Sandbox

Running = BackgroundSandbox | Sandbox


def _sandbox(running: Running) -> Sandbox:
    return running.sandbox if isinstance(running, BackgroundSandbox) else running


def headers(running: Running, role: ApiRole | str = ApiRole.ADMIN) -> dict[str, str]:
    """``Authorization`` with the sandbox's static API token of ``role``."""
    return _sandbox(running).headers(role)


def cds_service_url(api_url: str) -> str:
    return f"{api_url.rstrip('/')}/cds-services/{SERVICE_ID}"


def cds_headers(running: Running, api_url: str, **claims: Any) -> dict[str, str]:
    """A fresh CDS Hooks JWT of the sandbox's EHR for the service on ``api_url``."""
    return _sandbox(running).cds_headers(cds_service_url(api_url), **claims)


def localize(config: dict[str, Any], directory: Path) -> None:
    """Point a sandbox site YAML's (as a dict) token and key files at ``directory``."""
    localize_yaml(config, directory)


def auth_section(directory: Path) -> dict[str, Any]:
    """A site YAML ``auth`` section: static tokens for every role, files in ``directory``."""
    return static_token_section(directory)


def token_headers(directory: Path, role: ApiRole | str = ApiRole.ADMIN) -> dict[str, str]:
    """``Authorization`` for a token of :func:`auth_section` (or a sandbox data dir)."""
    return {"Authorization": f"Bearer {api_token(directory, role)}"}


def cds_token_for(directory: Path, api_url: str, **claims: Any) -> str:
    """A CDS Hooks JWT signed with the key in ``directory`` (made by :func:`auth_section`)."""
    return cds_token(directory, cds_service_url(api_url), **claims)
