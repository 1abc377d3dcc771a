"""ehrbridge: put a clinical prediction model into a hospital's EHR workflow.

The public facade. Names listed in ``__all__`` are the supported API; every
other module is internal and may change. Start reading at
``ehrbridge.core.contracts``.

Exceptions (all importable from here)::

    EhrbridgeError
    ├── ConfigError                 a site/mapping file is wrong; nothing starts
    ├── TransientError              retried with backoff, then delayed retry, then DLQ
    │   └── UpstreamUnavailable     model server 503/timeout, FHIR 5xx, broker or disk down
    └── PermanentError              straight to the dead-letter store, raw bytes kept
        ├── MessageRejected         not parseable -> MLLP AR
        ├── MessageUnusable         valid HL7 but unusable -> MLLP AE
        └── RemoteRejected          the EHR or model answered 4xx
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ehrbridge.config import Mode, SiteConfig, load_site_config, parse_site_config
from ehrbridge.core.contracts import (
    BatchError,
    Envelope,
    Failure,
    Kind,
    Sink,
    Source,
    Stage,
)
from ehrbridge.core.errors import (
    ConfigError,
    EhrbridgeError,
    MessageRejected,
    MessageUnusable,
    PermanentError,
    RemoteRejected,
    TransientError,
    UpstreamUnavailable,
)
from ehrbridge.core.version import __version__

if TYPE_CHECKING:
    from ehrbridge.runtime import Role, SiteRuntime

__all__ = [
    "BatchError",
    "ConfigError",
    "EhrbridgeError",
    "Envelope",
    "Failure",
    "Kind",
    "MessageRejected",
    "MessageUnusable",
    "Mode",
    "PermanentError",
    "RemoteRejected",
    "Role",
    "Sink",
    "SiteConfig",
    "SiteRuntime",
    "Source",
    "Stage",
    "TransientError",
    "UpstreamUnavailable",
    "__version__",
    "load_site_config",
    "parse_site_config",
]


def __getattr__(name: str) -> Any:
    # The runtime pulls in the servers and clients; load it only when asked for.
    if name in ("SiteRuntime", "Role"):
        from ehrbridge import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'ehrbridge' has no attribute {name!r}")
