"""Shared pieces of the benchmark harness: percentiles, tables, process CPU and memory.

CPU and peak RSS come from ``/proc/<pid>/stat`` and ``/proc/<pid>/status``
(Linux), so any process can be measured from outside -- the site, the model
server, the FHIR stand-in and the Kafka broker -- without instrumenting it.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds."""
    ordered = sorted(seconds)
    return {
        "p50_ms": _ms(percentile(ordered, 0.50)),
        "p95_ms": _ms(percentile(ordered, 0.95)),
        "p99_ms": _ms(percentile(ordered, 0.99)),
        "max_ms": _ms(ordered[-1] if ordered else 0.0),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def ratio(ours: float, other: float) -> float | None:
    return round(ours / other, 2) if other else None


def ephemeral_port_range() -> range:
    """Ports the kernel hands to outgoing connections (Linux; the IANA range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(49152, 65536)


def free_port() -> int:
    """A port free now, for a child process to listen on a moment later.

    Chosen *below* the ephemeral range: a port from that range can be taken,
    between this check and the child's bind, as the local end of any outgoing
    connection on the machine (a Kafka client, an HTTP probe), and the child's
    listen then fails with EADDRINUSE, even with SO_REUSEADDR.
    """
    below = range(20000, max(20000, ephemeral_port_range().start))
    for port in random.sample(below, min(200, len(below))):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    with socket.socket() as sock:  # a machine whose ephemeral range starts low
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_port(
    port: int, timeout_s: float = 60.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something listens on ``port``; fails at once if ``process`` (the listener) exits."""
    deadline = time.monotonic() + timeout_s
    while not port_open(port):
        if process is not None and process.poll() is not None:
            raise ChildExited(f"exited with {process.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
        time.sleep(0.05)


class ChildExited(RuntimeError):
    """A process the harness started ended while it was waited for."""


# ------------------------------------------------------------------ /proc --


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name, which may hold spaces: state is [0], utime [11].
    fields = stat.rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def kafka_broker_pid() -> int | None:
    """The local Kafka broker's pid (scripts/kafka runs ``kafka.Kafka``), read-only use.

    With several brokers on the machine, the one KAFKA_BOOTSTRAP names (its
    ``server.properties`` listens on that port), so the CPU figures are the
    benchmark's broker's, not another job's.
    """
    port = os.environ.get("KAFKA_BOOTSTRAP", "").strip().rpartition(":")[2]
    found: int | None = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"kafka.Kafka\x00" not in cmdline:
            continue
        if not port or _listens_on(cmdline, port):
            return int(entry.name)
        found = found or int(entry.name)
    return found


def _listens_on(cmdline: bytes, port: str) -> bool:
    """Whether the broker's properties file (its last argument) has a listener on ``port``."""
    properties = Path(cmdline.rstrip(b"\x00").split(b"\x00")[-1].decode(errors="replace"))
    try:
        return f":{port}," in properties.read_text().replace("\n", ",")
    except OSError:
        return False


@dataclass
class CpuMeter:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`."""

    pids: dict[str, int]
    before: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    _t0: float = 0.0

    def start(self) -> None:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0 = time.monotonic()

    def stop(self) -> None:
        self.wall_s = time.monotonic() - self._t0
        self.used = {
            name: round(cpu_seconds(pid) - self.before[name], 3) for name, pid in self.pids.items()
        }

    def report(self, messages: int, extra: dict[str, float] | None = None) -> dict[str, Any]:
        """Per process: CPU seconds, CPU µs per message, cores busy, peak RSS."""
        used = {**self.used, **(extra or {})}
        rows: dict[str, Any] = {}
        for name, seconds in used.items():
            pid = self.pids.get(name)
            rows[name] = {
                "cpu_s": round(seconds, 3),
                "cpu_us_per_msg": round(seconds / messages * 1e6, 1) if messages else None,
                "cores": round(seconds / self.wall_s, 2) if self.wall_s else None,
                "peak_rss_mb": peak_rss_mb(pid) if pid is not None else None,
            }
        total = sum(used.values())
        rows["total"] = {
            "cpu_s": round(total, 3),
            "cpu_us_per_msg": round(total / messages * 1e6, 1) if messages else None,
            "cores": round(total / self.wall_s, 2) if self.wall_s else None,
            "peak_rss_mb": None,
        }
        return rows


# ----------------------------------------------------------------- output --


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
    lines = [f"\n{title}", _line(headers, widths), _line(["-" * w for w in widths], widths)]
    lines += [_line(row, widths) for row in text_rows]
    return "\n".join(lines)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_json(path: Path | None, scenario: str, result: dict[str, Any]) -> Path:
    """Write the scenario's result; by default to bench/results/<scenario>-<time>.json."""
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"{scenario}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path
