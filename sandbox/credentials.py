"""The sandbox's credentials: one API token per role, and the key of its make-believe EHR.

On first run they are generated into ``<data dir>/tokens/`` (the directory
``0700``, every file ``0600``) and kept across restarts, so a token copied
into a shell keeps working:

* ``viewer``, ``operator``, ``admin``, ``sender``: static API tokens
  (``auth.tokens`` in ``sandbox/site.yaml`` and ``sandbox/site-fhir.yaml``);
* ``cds-ehr-key.pem`` and ``cds-ehr-jwks.json``: the signing key and JWK Set
  of the EHR that calls the sandbox's CDS Hooks service (issuer
  :data:`CDS_ISSUER`, allowlisted in ``sandbox/site-fhir.yaml``).
  ``ehrbridge cds-token`` signs a fresh hook JWT with it.

Only the sandbox and tests use this module; a real site's tokens and keys come
from its own secret store.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ehrbridge.config import ApiRole, CdsClient, SiteConfig, StaticToken

CDS_ISSUER = "urn:ehrbridge:sandbox:ehr"  # the sandbox EHR's JWT iss
CDS_KEY_ID = "sandbox-ehr-1"
CDS_KEY = "cds-ehr-key.pem"
CDS_JWKS = "cds-ehr-jwks.json"
CDS_TOKEN_LIFETIME_S = 300  # the specification's five minutes
_Moved = TypeVar("_Moved", StaticToken, CdsClient)


def tokens_dir(data_dir: Path) -> Path:
    return data_dir / "tokens"


def ensure_credentials(data_dir: Path) -> Path:
    """Create what is missing under ``<data_dir>/tokens``; return that directory."""
    folder = tokens_dir(data_dir)
    # A data dir made here must be private (0700), or the site refuses to start on it.
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for role in ApiRole:
        _write_new(folder / role.value, secrets.token_urlsafe(32).encode())
    if not (folder / CDS_KEY).exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (folder / CDS_JWKS).unlink(missing_ok=True)
        _write_new(folder / CDS_KEY, pem)
        _write_new(folder / CDS_JWKS, _jwks(key.public_key()).encode())
    return folder


def _write_new(path: Path, content: bytes) -> None:
    """Write ``content`` to a new file created 0600; an existing file is kept."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as out:
        out.write(content)


def _jwks(public_key: ec.EllipticCurvePublicKey) -> str:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    jwk.update(kid=CDS_KEY_ID, use="sig", alg="ES256")
    return json.dumps({"keys": [jwk]}, indent=2)


def api_token(data_dir: Path, role: ApiRole | str) -> str:
    """The sandbox's static API token for ``role``."""
    return (tokens_dir(data_dir) / ApiRole(role).value).read_text().strip()


def cds_token(data_dir: Path, audience: str, **claims: object) -> str:
    """A fresh CDS Hooks JWT from the sandbox EHR for the service at ``audience``."""
    now = int(time.time())
    payload: dict[str, object] = {
        "iss": CDS_ISSUER,
        "sub": "sandbox-ehr",
        "aud": audience,
        "iat": now,
        "exp": now + CDS_TOKEN_LIFETIME_S,
        "jti": str(uuid.uuid4()),
        **claims,
    }
    key = (tokens_dir(data_dir) / CDS_KEY).read_bytes()
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": CDS_KEY_ID})


def with_credentials(config: SiteConfig, data_dir: Path) -> SiteConfig:
    """``config`` with its token and JWK Set files moved into ``<data_dir>/tokens``.

    The sandbox's YAML names them under its own ``data`` folder; the sandbox
    keeps them in its data directory, whichever that is.
    """
    folder = tokens_dir(data_dir)
    tokens = [_moved(t, folder) for t in config.auth.tokens]
    clients = [_moved(c, folder) for c in config.cds_hooks.clients]
    return config.model_copy(
        update={
            "auth": config.auth.model_copy(update={"tokens": tokens}),
            "cds_hooks": config.cds_hooks.model_copy(update={"clients": clients}),
        }
    )


def _moved(item: _Moved, folder: Path) -> _Moved:
    field = "token_file" if isinstance(item, StaticToken) else "jwks_file"
    current = getattr(item, field)
    if current is None:
        return item
    return item.model_copy(update={field: folder / Path(current).name})


def static_token_section(data_dir: Path, roles: Iterable[ApiRole] = ApiRole) -> dict[str, object]:
    """A site YAML ``auth`` section naming the sandbox's token files (for generated configs)."""
    folder = ensure_credentials(data_dir)
    return {
        "tokens": [
            {"name": f"sandbox-{r.value}", "role": r.value, "token_file": str(folder / r.value)}
            for r in roles
        ]
    }


def localize_yaml(config: dict[str, Any], data_dir: Path) -> None:
    """Point a sandbox site YAML's token and JWK Set files (loaded as a dict) at
    ``<data_dir>/tokens``, creating them there: for site files written elsewhere."""
    folder = ensure_credentials(data_dir)
    entries = [
        *((t, "token_file") for t in config.get("auth", {}).get("tokens", [])),
        *((c, "jwks_file") for c in config.get("cds_hooks", {}).get("clients", [])),
    ]
    for entry, field in entries:
        if entry.get(field):
            entry[field] = str(folder / Path(entry[field]).name)


def bearer(data_dir: Path, role: ApiRole | str) -> dict[str, str]:
    """``Authorization`` with the sandbox's API token of ``role``."""
    return {"Authorization": f"Bearer {api_token(data_dir, role)}"}
