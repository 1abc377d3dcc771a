"""Logging that is safe with PHI, and quiet about outages it has already reported.

The rule: at INFO and above, messages are named by site and control id
(``Envelope.describe()``), never by patient name, identifier or content.
Code follows it by construction; this module only sets a plain format and
quietens libraries that log request lines (uvicorn access logs carry
patient ids in paths, so they are switched off where servers are created).

kafka-python logs every failed reconnect while a broker is down, several
lines a second, and a connection flood makes the MLLP listener refuse
connections as fast. :class:`RepeatLimiter` lets one line of each kind through
per window and says how many it held back, so an outage reads as a few
lines, not thousands.
"""

from __future__ import annotations

import logging
import os
import threading
import time

# Loggers (and their children) whose repeats are held back: kafka-python's outage lines,
# and the MLLP listener's refused and dropped connections (a flood would repeat them).
REPEAT_LIMITED = ("kafka", "ehrbridge.adapters.mllp_source.limits")


def setup_logging(level: str | None = None) -> None:
    chosen = (level or os.environ.get("EHRBRIDGE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=chosen,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    for noisy in ("kafka", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatLimiter) for f in handler.filters):
            handler.addFilter(RepeatLimiter())


class RepeatLimiter(logging.Filter):
    """One record per (logger, level, message template) per ``window_s``; counts the rest.

    Only for the loggers in ``prefixes``; the template (``record.msg``, before
    its arguments are filled in) is what makes two records "of a kind", so
    changing numbers such as a backoff do not make each line new.
    """

    def __init__(self, window_s: float = 30.0, prefixes: tuple[str, ...] = REPEAT_LIMITED):
        super().__init__()
        self.window_s = window_s
        self.prefixes = prefixes
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # -> (let through, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            passed, held = self._seen.get(key, (float("-inf"), 0))
            if now - passed < self.window_s:
                self._seen[key] = (passed, held + 1)
                return False
            self._seen[key] = (now, 0)
        if held:  # no % in the note: safe whether or not the record has arguments
            record.msg = f"{record.msg} ({held} more like this in the last {self.window_s:g} s)"
        return True
