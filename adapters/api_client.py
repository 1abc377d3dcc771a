"""A call to a running site's own HTTP API, for the CLI (``ehrbridge promote``/``demote``).

httpx stays in adapters/; its errors become :class:`ConfigError` here, naming
the URL and what to check, never the token.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from ehrbridge.core.errors import ConfigError


def post_json(
    url: str, body: dict[str, Any], token: str, verify: ssl.SSLContext | bool = True
) -> tuple[int, Any]:
    """POST ``body`` with a bearer token; the status and the parsed answer."""
    try:
        response = httpx.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
            timeout=60.0,
        )
    except httpx.HTTPError as error:
        raise ConfigError(
            f"{url}: no answer from the site ({type(error).__name__}); "
            "is it running? (--url, --ca-file)"
        ) from None
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"detail": response.text[:500]}
