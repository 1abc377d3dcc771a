"""MLLP sender: send an HL7v2 message, wait for its ACK.

Used by the sandbox's synthetic EHR, the benchmarks' load generators, the
tests, and HL7v2 write-back to older EHRs. A blocking client (one socket per
instance) and an asyncio one; both keep the connection open across messages,
as interface engines do, and reconnect once if the peer closed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass

from ehrbridge.core.errors import UpstreamUnavailable

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


@dataclass(frozen=True, slots=True)
class Ack:
    """The parts of an ACK a sender acts on."""

    raw: bytes
    code: str  # MSA-1: AA, AE, AR (or CA/CE/CR)
    control_id: str  # MSA-2, should equal the sent MSH-10
    text: str  # MSA-3

    @classmethod
    def parse(cls, raw: bytes) -> Ack:
        text = raw.decode("utf-8", errors="replace")
        segments = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
        msh = next((s for s in segments if s.startswith("MSH")), "")
        sep = msh[3:4] or "|"
        msa = next((s for s in segments if s.startswith("MSA")), "")
        fields = msa.split(sep)
        pad = [*fields, "", "", ""]
        return cls(raw=raw, code=pad[1], control_id=pad[2], text=pad[3])


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


class MllpClient:
    """A blocking MLLP sender over one persistent connection."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.tls = tls  # MLLP over TLS: the server is verified against this context
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise UpstreamUnavailable(f"MLLP peer {self.host}:{self.port} unreachable") from exc
        self._sock = self._handshake(sock) if self.tls is not None else sock
        self._buffer.clear()

    def _handshake(self, sock: socket.socket) -> socket.socket:
        assert self.tls is not None
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise UpstreamUnavailable(
                f"MLLP peer {self.host}:{self.port}: TLS handshake failed: {exc}",
                reason="mllp.tls_handshake",
            ) from exc

    def send(self, message: bytes) -> Ack:
        """Send one message and return its ACK. Raises UpstreamUnavailable on timeout."""
        return Ack.parse(self.send_raw(frame(message)))

    def send_raw(self, data: bytes) -> bytes:
        """Send bytes as they are (tests send broken frames) and read one framed reply."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(data)
            return self.read_frame()
        except TimeoutError as exc:
            self.close()
            raise UpstreamUnavailable(f"no ACK within {self.timeout_s}s") from exc
        except OSError as exc:
            self.close()
            raise UpstreamUnavailable(f"MLLP connection failed: {exc}") from exc

    def read_frame(self) -> bytes:
        assert self._sock is not None
        while True:
            start = self._buffer.find(START_BLOCK)
            end = self._buffer.find(END_BLOCK, start + 1) if start >= 0 else -1
            if end >= 0:
                payload = bytes(self._buffer[start + 1 : end])
                del self._buffer[: end + len(END_BLOCK)]
                return payload
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("peer closed the connection before replying")
            self._buffer += chunk

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncMllpClient:
    """The asyncio variant, for many concurrent senders in one process."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.tls = tls
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.tls), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"MLLP peer {self.host}:{self.port} unreachable") from exc

    async def send(self, message: bytes) -> Ack:
        for attempt in (1, 2):
            if self._writer is None:
                await self.connect()
            assert self._reader is not None and self._writer is not None
            try:
                self._writer.write(frame(message))
                await self._writer.drain()
                await asyncio.wait_for(self._reader.readuntil(START_BLOCK), self.timeout_s)
                body = await asyncio.wait_for(self._reader.readuntil(END_BLOCK), self.timeout_s)
                return Ack.parse(body[: -len(END_BLOCK)])
            except TimeoutError as exc:
                await self.close()
                raise UpstreamUnavailable(f"no ACK within {self.timeout_s}s") from exc
            except (OSError, asyncio.IncompleteReadError) as exc:
                await self.close()
                if attempt == 2:
                    raise UpstreamUnavailable(f"MLLP connection failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
            self._reader = None
