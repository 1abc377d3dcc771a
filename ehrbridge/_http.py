"""Run ASGI apps (our API, and the sandbox's servers) inside an existing event loop.

The one way a route reads a request body, :func:`read_limited`, which stops at
the site's limit instead of reading whatever a client sends, is in
``adapters/fhir_http.py`` with the rest of the HTTP plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Generator
from typing import Any

import uvicorn

from ehrbridge.adapters.tls import CertificateReloader
from ehrbridge.config import ListenerTls
from ehrbridge.core.errors import ConfigError

log = logging.getLogger(__name__)


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        field: str | None = None,
        tls: ListenerTls | None = None,
    ) -> None:
        self.field = field  # the setting that names the port, for a clear bind error
        self.tls = tls
        # access_log off: request paths can carry patient ids, and logs must not.
        super().__init__(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                access_log=False,
                log_level="warning",
                lifespan="off",
                **_uvicorn_tls(tls),
            )
        )
        self._task: asyncio.Task[None] | None = None
        self.reloader: CertificateReloader | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def _load_tls(self) -> None:
        """Build uvicorn's SSL context now, to name the setting if a file is bad."""
        if self.tls is None:
            return
        tls_field = f"{(self.field or 'http.port').rsplit('.', 1)[0]}.tls"
        try:
            self.config.load()
        except (OSError, ssl.SSLError) as exc:
            detail = f"cannot load the certificate, key or CA file: {exc}"
            raise ConfigError(detail, field=tls_field) from exc
        assert self.config.ssl is not None
        self.config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self.reloader = CertificateReloader(self.config.ssl, self.tls, tls_field)

    @property
    def port(self) -> int:
        for server in self.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("server is not listening")

    async def start(self) -> None:
        """Start serving in this loop; return once the port accepts connections."""
        self._load_tls()
        self._task = asyncio.create_task(self._serve_or_raise())
        while not self.started:
            if self._task.done():
                self._task.result()  # re-raise a bind failure
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def _serve_or_raise(self) -> None:
        try:
            await self.serve()
        except SystemExit as exc:  # uvicorn logs a bind failure, then exits the process
            where = f"{self.config.host}:{self.config.port}"
            detail = f"cannot listen on {where} (is the port in use?)"
            raise ConfigError(detail, field=self.field) from exc

    async def stop(self) -> None:
        self.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


def _uvicorn_tls(tls: ListenerTls | None) -> dict[str, Any]:
    """uvicorn's TLS settings; with client_ca_file, a client certificate is required."""
    if tls is None:
        return {}
    return {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file),
        "ssl_ca_certs": str(tls.client_ca_file) if tls.client_ca_file else None,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
    }


class ThreadedServer:
    """An ASGI app served from its own thread and loop (tests, sandbox helpers)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = EmbeddedServer(app, host, port)
        self.host = host
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"http-{port}")

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            assert self.server._task is not None
            await self.server._task

        asyncio.run(main())

    def start(self) -> ThreadedServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
