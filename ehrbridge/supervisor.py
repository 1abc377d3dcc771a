"""One embedded site, its roles as processes: ``transport: {kind: embedded, processes: per-role}``.

``ehrbridge run`` without ``--role`` on such a site is a supervisor. It
starts one child per role (``ehrbridge run --role ingest``, ``process``,
``writeback``), which share the site's SQLite files (log, state, results; WAL
mode, so readers never block the writer), so the three roles use two cores
instead of sharing one interpreter lock.

* A child that exits is reported (its role and exit code) and started again
  after 1 s; a child that dies within :data:`EARLY_EXIT_S` of its start three
  times running (a port in use, a broken file; restarted after 2 s, then 4 s)
  stops the site, and ``ehrbridge run`` exits 1, so that a
  service manager sees the failure instead of a restart loop. Nothing ACKed
  is lost by a restart: ingest ACKs only after the durable append, and the
  other roles resume from their committed offsets.
* SIGTERM or SIGINT stops the children (SIGTERM, each drains as a single
  process would), then the supervisor; SIGHUP is passed on (certificate reload).
* ``kill -9`` of the supervisor leaves no orphan: every child holds the read
  end of a pipe whose only write end is the supervisor's (the lifeline); when
  the supervisor dies the kernel closes it, the child reads end-of-file and
  stops itself as on SIGTERM.

With ``monitoring.port`` set, the processing child serves its ``/metrics`` and
``/health`` there and the write-back child on the port after it (the ingest
child serves them on ``http.port`` with the API, as always).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ehrbridge.config import SiteConfig

log = logging.getLogger(__name__)

LIFELINE_ENV = "EHRBRIDGE_LIFELINE_FD"
ROLES = ("ingest", "process", "writeback")
# A child that dies sooner than this after its start failed to start (imports and
# opening the stores take seconds on a busy machine).
EARLY_EXIT_S = 30.0
MAX_EARLY_EXITS = 3
STOP_TIMEOUT_S = 30.0
_RESTART_DELAYS_S = (1.0, 2.0, 4.0)  # by how many early exits in a row: 0, 1, 2


def watch_lifeline() -> None:
    """In a supervised child: SIGTERM to itself once the supervisor is gone (any death)."""
    fd_text = os.environ.pop(LIFELINE_ENV, None)
    if fd_text is None:
        return
    fd = int(fd_text)

    def wait_for_eof() -> None:
        while os.read(fd, 1):  # the supervisor never writes; EOF is its death
            pass
        log.warning("the supervising process is gone; this role stops")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_eof, name="lifeline", daemon=True).start()


def monitoring_ports(config: SiteConfig) -> dict[str, int | None]:
    """Where each child serves /metrics and /health (ingest: on the API's port)."""
    port = config.monitoring.port
    if port is None or port == 0:
        return {"ingest": None, "process": port, "writeback": port}
    return {"ingest": None, "process": port, "writeback": port + 1}


@dataclass
class Child:
    role: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    early_exits: int = 0  # in a row
    restart_at: float | None = None  # when a dead child is started again


@dataclass
class Supervisor:
    """Starts, watches and stops one child per role."""

    config_path: Path
    config: SiteConfig
    log_level: str | None = None
    children: list[Child] = field(default_factory=list)
    failed: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _lifeline: tuple[int, int] | None = None

    def command(self, role: str, monitoring_port: int | None) -> list[str]:
        argv = [sys.executable, "-m", "ehrbridge.cli"]
        if self.log_level:
            argv += ["--log-level", self.log_level]
        argv += ["run", "--config", str(self.config_path), "--role", role]
        if monitoring_port is not None:
            argv += ["--monitoring-port", str(monitoring_port)]
        return argv

    def run(self) -> int:
        """Until SIGTERM/SIGINT, or a child that cannot start; the exit status."""
        self._install_signals()
        self._lifeline = os.pipe()
        ports = monitoring_ports(self.config)
        self.children = [Child(role, self.command(role, ports[role])) for role in ROLES]
        log.info("site %s: roles as processes (%s)", self.config.site, ", ".join(ROLES))
        try:
            for child in self.children:
                self._start(child)
            while not self._stop.wait(0.2):
                self._watch()
        finally:
            self._stop_children()
            for fd in self._lifeline:
                os.close(fd)
        return 1 if self.failed else 0

    def stop(self) -> None:
        self._stop.set()

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self._forward(signal.SIGHUP))

    def _forward(self, signum: int) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def _start(self, child: Child) -> None:
        assert self._lifeline is not None
        read_end = self._lifeline[0]
        env = {**os.environ, LIFELINE_ENV: str(read_end)}
        # A child of its own process group: a Ctrl-C at the terminal reaches the
        # supervisor alone, which stops the children in order.
        child.process = subprocess.Popen(
            child.command, env=env, pass_fds=(read_end,), start_new_session=True
        )
        child.started, child.restart_at = time.monotonic(), None
        log.info(
            "site %s: role %s started (pid %d)", self.config.site, child.role, child.process.pid
        )

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            assert child.process is not None
            code = child.process.poll()
            if code is not None:
                self._exited(child, code, now)

    def _exited(self, child: Child, code: int, now: float) -> None:
        early = now - child.started < EARLY_EXIT_S
        child.early_exits = child.early_exits + 1 if early else 0
        if child.early_exits >= MAX_EARLY_EXITS:
            log.error(
                "site %s: role %s exited with %d %d times within %.0f s of its start; "
                "stopping the site (its log above says why)",
                self.config.site, child.role, code, child.early_exits, EARLY_EXIT_S,
            )  # fmt: skip
            self.failed = True
            self._stop.set()
            return
        # 1 s after a child that ran a while; 2 s, 4 s after one that failed at its start.
        delay = _RESTART_DELAYS_S[child.early_exits]
        child.restart_at = now + delay
        log.error(
            "site %s: role %s exited with %d; starting it again in %.0f s",
            self.config.site, child.role, code, delay,
        )  # fmt: skip

    def _stop_children(self) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("site %s: pid %d did not stop; killed", self.config.site, process.pid)
                process.kill()
                process.wait()
        log.info("site %s stopped", self.config.site)
