"""Logging that is safe with PHI.

The rule: at INFO and above, messages are named by site and control id
(``Envelope.describe()``), never by patient name, identifier or content.
Code follows it by construction; this module only sets a plain format and
quietens libraries that log request lines (uvicorn access logs carry
patient ids in paths, so they are switched off where servers are created).
"""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    chosen = (level or os.environ.get("EHRBRIDGE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=chosen,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    for noisy in ("kafka", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
