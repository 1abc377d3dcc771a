"""MLLP listener: HL7v2 over TCP, one ACK per message, never before it is durable.

Framing (MLLP release 1): ``0x0B`` message ``0x1C 0x0D``. Each connection is
served in order -- a sender that pipelines several messages gets their ACKs
in the same order -- and many connections are served concurrently.

For every frame the listener calls ``deliver(envelope)`` and answers by its
outcome (see ``core/contracts.py``): AA once stored, AE or AR with MSA-3
and ERR naming the problem. Framing problems never stop the listener:

* bytes over ``max_message_bytes``: the frame is skipped up to its end block,
  its first ``max_message_bytes`` bytes go to the dead-letter store, AR;
* a frame cut off by a new start block, or by the peer closing: the partial
  bytes are dead-lettered and AR is sent if the socket still accepts it;
* bytes outside any frame: whitespace between frames is ignored (many
  senders add a newline); anything else up to an end block is treated as a
  frame without its start block (AR); stray bytes before a start block are
  dead-lettered without an ACK, because no message is waiting for one.

Resource limits (``mllp`` in the site config), so that no peer can hold
what others need:

* ``max_connections``: a connection beyond it is closed as soon as it is
  accepted, counted and logged (without the peer's data);
* ``frame_timeout_s``: a frame must end within this long of its first byte,
  or its partial bytes are dead-lettered (``mllp.frame_timeout``), AR is
  sent, and the connection is closed -- a peer dripping a byte a minute
  never trips the idle timeout;
* ``write_timeout_s`` and ``write_buffer_bytes``: ACKs wait in memory up
  to ``write_buffer_bytes`` per connection (the transport's high-water mark
  and the socket's send buffer); a peer that leaves them unread for
  ``write_timeout_s`` is dropped.

The counts are in :attr:`MllpSource.stats` (``GET /health``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from ehrbridge.adapters.tls import CertificateReloader, server_context, subject_allowed
from ehrbridge.config import MllpListen
from ehrbridge.core.contracts import Deliver, Envelope, Kind
from ehrbridge.core.errors import ConfigError, EhrbridgeError, UpstreamUnavailable
from ehrbridge.pipelines.ack import (
    AckHeader,
    ack_code_for,
    build_ack,
    empty_header,
    read_header,
)
from ehrbridge.pipelines.ingest import INGEST_DETAIL_HEADER, INGEST_ERROR_HEADER

log = logging.getLogger(__name__)
# Lines a flood would repeat (refused connections, dropped peers): held back and
# counted by ehrbridge.logs.RepeatLimiter.
limits_log = logging.getLogger(f"{__name__}.limits")

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_READ_CHUNK = 65536
_unnamed = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Frame:
    payload: bytes
    error: str | None = None  # framing problem reason code
    detail: str = ""
    wants_ack: bool = True


class FrameReader:
    """Splits a byte stream into MLLP frames, enforcing the size limit."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        max_bytes: int,
        idle_timeout_s: float,
        frame_timeout_s: float = math.inf,
    ):
        self.reader = reader
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.buffer = bytearray()
        self.eof = False
        self.overran = False  # the stream ended because a frame outlived frame_timeout_s
        self._deadline: float | None = None  # loop time by which the current frame must end

    async def _fill(self) -> bool:
        """Read more bytes; False at end of stream, idle timeout or the frame's deadline."""
        if self.eof:
            return False
        wait_s = self._wait_s()
        try:
            chunk = await asyncio.wait_for(self.reader.read(_READ_CHUNK), wait_s)
        except TimeoutError:
            self.overran = wait_s < self.idle_timeout_s  # the frame's deadline came first
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _wait_s(self) -> float:
        if self._deadline is None:
            return self.idle_timeout_s
        left = self._deadline - asyncio.get_running_loop().time()
        return max(0.0, min(self.idle_timeout_s, left))

    def _frame_begins(self) -> None:
        """Start the current frame's clock (once: later reads do not extend it)."""
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self.frame_timeout_s

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            frame = await self._next_frame()
            self._deadline = None
            if frame is None:
                return
            yield frame

    async def _next_frame(self) -> Frame | None:
        junk = await self._skip_to_start()
        if junk is not None:
            return junk
        if not self.buffer:
            return None
        del self.buffer[:1]  # the start block
        return await self._read_body()

    async def _skip_to_start(self) -> Frame | None:
        """Discard inter-frame whitespace; report other bytes outside frames."""
        while True:
            stripped = self.buffer.lstrip(b" \t\r\n\x00")
            if len(stripped) != len(self.buffer):
                del self.buffer[: len(self.buffer) - len(stripped)]
            if self.buffer:
                self._frame_begins()
            if self.buffer[:1] == START_BLOCK:
                return None
            if self.buffer:
                return await self._unframed()
            if not await self._fill():
                return None

    async def _unframed(self) -> Frame | None:
        """Bytes that do not start with 0x0B: up to an end block, or the next start."""
        while True:
            end = self.buffer.find(END_BLOCK)
            start = self.buffer.find(START_BLOCK)
            if end >= 0 and (start < 0 or end < start):
                payload = bytes(self.buffer[:end])
                del self.buffer[: end + len(END_BLOCK)]
                return Frame(payload, "mllp.no_start_block", "frame has no MLLP start block (0x0B)")
            if start >= 0 or len(self.buffer) > self.max_bytes or not await self._fill():
                cut = start if start >= 0 else len(self.buffer)
                payload = bytes(self.buffer[: min(cut, self.max_bytes)])
                del self.buffer[:cut]
                return Frame(
                    payload, "mllp.unframed", "bytes outside an MLLP frame", wants_ack=False
                )

    async def _read_body(self) -> Frame | None:
        scanned = 0
        while True:
            end = self.buffer.find(END_BLOCK, max(0, scanned - 1))
            restart = self.buffer.find(START_BLOCK, 0, end if end >= 0 else len(self.buffer))
            if restart >= 0:  # a new frame began before this one ended
                payload = bytes(self.buffer[:restart])
                del self.buffer[:restart]
                return Frame(payload, "mllp.truncated", "frame cut off by a new start block")
            if end >= 0:
                payload = bytes(self.buffer[:end])
                del self.buffer[: end + len(END_BLOCK)]
                if len(payload) > self.max_bytes:
                    return self._oversize(payload, len(payload))
                return Frame(payload)
            scanned = len(self.buffer)
            if scanned > self.max_bytes:
                return await self._discard_oversize()
            if not await self._fill():
                payload = bytes(self.buffer)
                self.buffer.clear()
                return self._cut_off(payload)

    def _cut_off(self, payload: bytes) -> Frame:
        """A frame the stream ended inside: the peer closed, went idle, or ran out of time."""
        if self.overran:
            detail = f"frame not finished within {self.frame_timeout_s:g} s (mllp.frame_timeout_s)"
            return Frame(payload, "mllp.frame_timeout", detail)
        return Frame(payload, "mllp.truncated", "connection closed inside a frame")

    async def _discard_oversize(self) -> Frame:
        """Keep the first max_bytes for the dead-letter store, skip to the end block."""
        kept = bytes(self.buffer[: self.max_bytes])
        total = 0
        while True:
            end = self.buffer.find(END_BLOCK)
            if end >= 0:
                total += end
                del self.buffer[: end + len(END_BLOCK)]
                return self._oversize(kept, total)
            total += max(0, len(self.buffer) - 1)
            del self.buffer[: max(0, len(self.buffer) - 1)]  # keep a possible 0x1C
            if not await self._fill():
                self.buffer.clear()
                return self._oversize(kept, total)

    def _oversize(self, payload: bytes, total: int) -> Frame:
        detail = f"message of {total} bytes exceeds the {self.max_bytes}-byte limit"
        return Frame(payload[: self.max_bytes], "mllp.too_large", detail)


@dataclass(slots=True)
class MllpStats:
    """Connection counts since start (``GET /health``)."""

    open: int = 0
    refused: int = 0  # closed at once: max_connections were open
    frame_timeouts: int = 0  # closed: a frame outlived frame_timeout_s
    write_timeouts: int = 0  # dropped: ACKs left unread for write_timeout_s
    tls_refused: int = 0  # closed after the handshake: not in mllp.tls.client_subjects

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class MllpSource:
    """The asyncio MLLP server (a :class:`~ehrbridge.core.contracts.Source`)."""

    name = "mllp"

    def __init__(self, listen: MllpListen, site: str) -> None:
        self.listen = listen
        self.site = site
        self._server: asyncio.Server | None = None
        self.port: int | None = None
        self.stats = MllpStats()
        self.reloader: CertificateReloader | None = None  # with mllp.tls
        # MSA-1 codes sent, from every sender (the sandbox's progress line shows them).
        self.acks: Counter[str] = Counter()

    async def start(self, deliver: Deliver) -> None:
        """Bind and start accepting; returns once listening (``self.port`` is set)."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.stats.open >= self.listen.max_connections:
                self._refuse(writer)
                return
            if self._pinned_out(writer):
                writer.transport.abort()  # nothing was read, no ACK is owed
                return
            self.stats.open += 1
            try:
                await self._serve_connection(reader, writer, deliver)
            finally:
                self.stats.open -= 1

        context = self._tls_context()
        try:
            self._server = await asyncio.start_server(
                handle,
                self.listen.host,
                self.listen.port,
                limit=_READ_CHUNK,
                reuse_address=True,
                ssl=context,
            )
        except OSError as exc:  # most often: another process has the port
            where = f"{self.listen.host}:{self.listen.port}"
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"cannot listen on {where}: {reason}", field="mllp.port") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "MLLP%s listening on %s:%s (site %s)",
            " over TLS" if context else "",
            self.listen.host,
            self.port,
            self.site,
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.listen.tls
        if tls is None:
            return None
        context = server_context(tls, "mllp.tls")
        self.reloader = CertificateReloader(context, tls, "mllp")
        return context

    def _pinned_out(self, writer: asyncio.StreamWriter) -> bool:
        """Close a client whose certificate is CA-signed but not on mllp.tls.client_subjects.

        Runs after the handshake and before any byte is read: nothing it sent is
        stored or answered.
        """
        tls = self.listen.tls
        if tls is None or subject_allowed(writer.get_extra_info("peercert"), tls.client_subjects):
            return False
        self.stats.tls_refused += 1
        log.warning("MLLP TLS client refused: certificate subject not in mllp.tls.client_subjects")
        return True

    async def run(self, deliver: Deliver) -> None:
        await self.start(deliver)
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        self.stats.refused += 1
        limits_log.warning(
            "MLLP connection refused: %d open, the limit is mllp.max_connections (site %s)",
            self.stats.open,
            self.site,
        )
        writer.transport.abort()  # no ACK is owed: nothing was read

    def _bound_writes(self, writer: asyncio.StreamWriter) -> None:
        """Unread ACKs wait in at most write_buffer_bytes, in the kernel and in the transport."""
        limit = self.listen.write_buffer_bytes
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit)
        writer.transport.set_write_buffer_limits(high=limit)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deliver: Deliver
    ) -> None:
        peer = writer.get_extra_info("peername")
        listen = self.listen
        frames = FrameReader(
            reader, listen.max_message_bytes, listen.idle_timeout_s, listen.frame_timeout_s
        )
        self._bound_writes(writer)
        try:
            async for frame in frames.frames():
                ack = await self._answer(frame, deliver)
                if ack is not None:
                    await self._send(writer, ack)
            if frames.overran:
                self.stats.frame_timeouts += 1
                limits_log.warning("MLLP connection closed: a frame outlived mllp.frame_timeout_s")
        except TimeoutError:
            self.stats.write_timeouts += 1
            limits_log.warning("MLLP connection dropped: ACKs unread for mllp.write_timeout_s")
            writer.transport.abort()  # close() would wait to flush what the peer will not read
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection from %s ended: %s", peer, type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), listen.write_timeout_s)

    async def _send(self, writer: asyncio.StreamWriter, ack: bytes) -> None:
        """Write one framed ACK; TimeoutError if the peer leaves it unread too long."""
        writer.write(START_BLOCK + ack + END_BLOCK)
        await asyncio.wait_for(writer.drain(), self.listen.write_timeout_s)

    async def _answer(self, frame: Frame, deliver: Deliver) -> bytes | None:
        header = self._header(frame.payload)
        envelope = Envelope(
            site=self.site,
            source_id=header.control_id or f"unidentified-{next(_unnamed)}",
            payload=frame.payload,
            kind=Kind.HL7V2,
            key=header.control_id or "unidentified",
            headers=(
                {INGEST_ERROR_HEADER: frame.error, INGEST_DETAIL_HEADER: frame.detail}
                if frame.error
                else {}
            ),
        )
        error: EhrbridgeError | None = None
        try:
            await deliver(envelope)
        except EhrbridgeError as exc:
            error = exc
        except Exception as exc:  # a bug must cost one AR, not the listener
            log.error("%s: unexpected %s in deliver", envelope.describe(), type(exc).__name__)
            error = UpstreamUnavailable(f"internal error: {type(exc).__name__}")
        log.debug("%s answered %s", envelope.describe(), "AA" if error is None else error.reason)
        if not frame.wants_ack:
            return None
        self.acks[ack_code_for(error).value] += 1
        try:
            return build_ack(header, error)
        except Exception as exc:  # a bug must not cost the sender its one ACK
            log.error("%s: %s building the ACK", envelope.describe(), type(exc).__name__)
            return build_ack(empty_header(), error)

    def _header(self, payload: bytes) -> AckHeader:
        """What the ACK echoes (read_header never raises; a bug there must not either)."""
        try:
            return read_header(payload, self.listen.charset)
        except Exception as exc:
            log.error("MLLP: %s reading an MSH for the ACK", type(exc).__name__)
            return empty_header()
