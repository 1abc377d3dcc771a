"""An MLLP peer standing in for an older EHR's results interface.

It receives HL7v2 messages (ehrbridge's ORU^R01 write-back), keeps each one,
and answers with an original-mode ACK built like ehrbridge's own
(``pipelines/ack.py``): MSA-2 echoes the message's MSH-10. What it answers is
up to ``answer``: a function of the message returning ``"AA"``, ``"AE"``,
``"AR"`` or ``None`` (no answer at all, so the sender times out). The
default accepts everything. The tests script AE, AR and silence with it.

In the sandbox it is the EHR's results inbox: every ORU it accepts is also
appended to ``record_to`` (one message per block, segments on their own
lines), so ``tail -f`` shows results as the EHR would file them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl as ssl_module
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ehrbridge.core.errors import MessageRejected, MessageUnusable
from ehrbridge.pipelines.ack import build_ack, read_header
from ehrbridge.pipelines.hl7time import Hl7TimeError, parse_dtm

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
Answer = Callable[[bytes], str | None]


def accept_all(_: bytes) -> str:
    return "AA"


@dataclass
class Received:
    message: bytes
    control_id: str  # its MSH-10
    answered: str | None  # the ACK code sent back, None for silence


@dataclass
class MllpPeer:
    host: str = "127.0.0.1"
    port: int = 0
    answer: Answer = accept_all
    record_to: Path | None = None
    ssl: ssl_module.SSLContext | None = None  # MLLP over TLS (the sandbox's --tls)
    received: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _connections: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Python 3.11's Server.close() leaves open connections running; a
            # handler still reading when the loop closes is never finalised.
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def messages(self, code: str | None = "AA") -> list[Received]:
        """What was received (and answered ``code``; None: everything)."""
        with self._lock:
            return [r for r in self.received if code is None or r.answered == code]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        try:
            while True:
                await reader.readuntil(START_BLOCK)
                message = (await reader.readuntil(END_BLOCK))[: -len(END_BLOCK)]
                code = self.answer(message)
                self._keep(message, code)
                if code is not None:
                    writer.write(START_BLOCK + _ack(message, code) + END_BLOCK)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _keep(self, message: bytes, code: str | None) -> None:
        header = read_header(message)
        with self._lock:
            self.received.append(Received(message, header.control_id, code))
        if self.record_to is not None and code == "AA":
            self.record_to.parent.mkdir(parents=True, exist_ok=True)
            text = message.replace(b"\r", b"\n").decode("utf-8", "replace").rstrip("\n")
            with self.record_to.open("a", encoding="utf-8") as out:
                out.write(text + "\n\n")


def purge_inbox(path: Path, older_than: datetime) -> int:
    """Drop the filed messages whose MSH-7 is before ``older_than``; how many went.

    The file is rewritten whole (0600, then renamed over the old one). A
    message without a readable MSH-7 is kept: nothing is dropped on a guess.
    """
    if not path.exists():
        return 0
    blocks = [b for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    kept = [b for b in blocks if not _filed_before(b, older_than)]
    if len(kept) == len(blocks):
        return 0
    fresh = path.with_name(path.name + ".purging")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("".join(block + "\n\n" for block in kept))
    os.replace(fresh, path)
    return len(blocks) - len(kept)


def _filed_before(block: str, moment: datetime) -> bool:
    msh = next((line for line in block.split("\n") if line.startswith("MSH")), "")
    fields = msh.split(msh[3:4] or "|")
    try:
        return parse_dtm(fields[6]) < moment  # MSH-7: when the message was made
    except (IndexError, Hl7TimeError):
        return False


def _ack(message: bytes, code: str) -> bytes:
    header = read_header(message)
    if code == "AE":
        return build_ack(header, MessageUnusable("result rejected by the EHR stand-in"))
    if code == "AR":
        return build_ack(header, MessageRejected("EHR stand-in cannot take results now"))
    return build_ack(header)
