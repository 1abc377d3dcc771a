"""Monitoring of a running site: /metrics, readiness, feed silence and drift.

:class:`SiteMonitoring` is what ``SiteRuntime`` owns: the site's
:class:`~ehrbridge.adapters.prometheus_metrics.PrometheusMetrics` (the
stages report to it through ``pipelines/metrics.py``), the readiness checks
of the roles this process runs, a timer that saves what the feed clocks and
drift statistics learned, and, for a process that does not run the ingest
role (which serves the whole HTTP API), a small HTTP server of its own on
``monitoring.port`` with ``/health``, ``/health/live``, ``/health/ready``,
``/metrics`` and ``/api/monitoring/...``.

Routes (``add_monitoring_routes``):

* ``GET /health/live``: 200 while the process serves HTTP at all;
* ``GET /health/ready``: 200 only when every dependency of this process's
  roles answers -- the durable log, the model server (process role), each
  write-back target (writeback role, live mode) -- else 503; the body names
  each check and why it failed. Checks are cached ``monitoring.ready_cache_s``
  (5 s), so a probe every second costs one check every five;
* ``GET /metrics``: the Prometheus text format;
* ``GET /api/monitoring/feeds``: per source, the silence and the expected
  messages per hour of the week;
* ``GET /api/monitoring/drift``: per model, per day: records, missing
  inputs, unmapped-code rate, interpretation bands, bin counts and each
  feature's PSI and Jensen-Shannon distance against the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Response
from fastapi.params import Depends

from ehrbridge._http import EmbeddedServer
from ehrbridge.adapters.prometheus_metrics import CONTENT_TYPE, PrometheusMetrics
from ehrbridge.api_docs import add_docs_routes
from ehrbridge.core.version import __version__
from ehrbridge.promotion import ModeSwitch

if TYPE_CHECKING:
    from ehrbridge.config import SiteConfig

log = logging.getLogger(__name__)

Check = Callable[[], str | None]  # None when the dependency answers, else why not
CONNECT_TIMEOUT_S = 2.0


class Readiness:
    """Named checks, run together at most once per ``cache_s``."""

    def __init__(self, checks: dict[str, Check], cache_s: float) -> None:
        self.checks = checks
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._result: dict[str, str] = {}

    def failures(self) -> dict[str, str]:
        """Each check's answer, ``ok`` or why it failed; cached."""
        with self._lock:
            if time.monotonic() - self._at >= self.cache_s:
                self._result = {name: _run(check) for name, check in self.checks.items()}
                self._at = time.monotonic()
            return dict(self._result)


def _run(check: Check) -> str:
    try:
        return check() or "ok"
    except Exception as exc:  # a check that breaks is a failed check, not a 500
        return f"{type(exc).__name__}: {exc}"


def tcp_check(host: str, port: int) -> Check:
    """Whether something accepts a TCP connection at host:port (an MLLP peer, an HTTP server)."""

    def check() -> str | None:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                return None
        except OSError as exc:
            return f"cannot connect to {host}:{port}: {exc.strerror or exc}"

    return check


def url_check(url: str) -> Check:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return tcp_check(parts.hostname or "127.0.0.1", parts.port or default)


class SiteMonitoring:
    """The metrics, readiness checks and state-saving timer of one site runtime."""

    def __init__(self, config: SiteConfig, roles: Iterable[str]) -> None:
        self.config = config
        self.roles = frozenset(roles)
        self.metrics = PrometheusMetrics(config)
        self.metrics.mode = self.mode = ModeSwitch(config)  # promote/demote, no restart
        self.metrics.load()
        # Drift is counted where processing runs; this process answers from its saved file.
        self.metrics.drift_from_file = "process" not in self.roles
        self.readiness = Readiness({}, config.monitoring.ready_cache_s)
        self.server: EmbeddedServer | None = None
        self._saver: asyncio.Task[None] | None = None

    def add_check(self, name: str, check: Check) -> None:
        self.readiness.checks[name] = check

    async def start(self, serve_http: bool) -> None:
        """Start saving state; serve the monitoring routes if no other HTTP API will."""
        self._saver = asyncio.create_task(self._save_periodically())
        port = self.config.monitoring.port
        if serve_http and port is not None:
            app = create_monitoring_api(self)
            self.server = EmbeddedServer(app, self.config.http.host, port, field="monitoring.port")
            await self.server.start()
            log.info("monitoring for site %s on port %d", self.config.site, self.server.port)

    async def stop(self) -> None:
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
        if self.server is not None:
            await self.server.stop()
        self.save()

    def save(self) -> None:
        try:
            # Only what this process's roles learn: the feed clocks are ingest's, the drift
            # counts processing's. A role process that saved both would write back the
            # stale copy it loaded at start over what its sibling process learned since.
            self.metrics.save(feeds="ingest" in self.roles, drift="process" in self.roles)
        except OSError as exc:
            log.warning("monitoring state not saved: %s", exc)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.monitoring.save_interval_s)
            await asyncio.to_thread(self.save)


def add_monitoring_routes(
    app: FastAPI, monitoring: SiteMonitoring, viewer: Sequence[Depends] = ()
) -> None:
    """/health/live, /health/ready (public), /metrics and /api/monitoring/* (``viewer``)."""
    metrics = monitoring.metrics

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", responses={503: {"description": "A dependency does not answer"}})
    def ready(response: Response) -> dict[str, Any]:
        checks = monitoring.readiness.failures()
        healthy = all(answer == "ok" for answer in checks.values())
        response.status_code = 200 if healthy else 503
        failed = sorted(name for name, answer in checks.items() if answer != "ok")
        return {"status": "ready" if healthy else "not ready", "failed": failed, "checks": checks}

    @app.get("/metrics", dependencies=list(viewer), response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/api/monitoring/feeds", dependencies=list(viewer))
    def feeds() -> dict[str, Any]:
        return {"site": monitoring.config.site, "feeds": metrics.feeds_json()}

    @app.get("/api/monitoring/drift", dependencies=list(viewer))
    def drift() -> dict[str, Any]:
        return {"site": monitoring.config.site, "models": metrics.drift_json()}


def create_monitoring_api(monitoring: SiteMonitoring) -> FastAPI:
    """The HTTP API of a process without the ingest role: health and monitoring only."""
    # docs_url None: FastAPI's own /docs loads from public CDNs; ours are self-hosted.
    app = FastAPI(title="ehrbridge monitoring", version=__version__, docs_url=None, redoc_url=None)
    add_docs_routes(app, "ehrbridge monitoring")
    config = monitoring.config

    @app.get("/health")
    def health() -> dict[str, Any]:
        roles = ",".join(sorted(monitoring.roles))
        mode = monitoring.mode().value
        return {"status": "ok", "site": config.site, "mode": mode, "roles": roles}

    from ehrbridge.auth import Authenticator
    from ehrbridge.config import ApiRole

    auth = Authenticator(config.auth)  # a missing secret stops the start here
    viewer = [Depends(auth.require(ApiRole.VIEWER))]
    add_monitoring_routes(app, monitoring, viewer)
    return app
