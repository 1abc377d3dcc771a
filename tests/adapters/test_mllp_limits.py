"""MLLP resource limits on real sockets: slow drips, peers that never read, too many connections.

Issue 10, finding 6: 60 connections dripping a byte a minute, and a peer
leaving megabytes of ACKs unread, were all still held after 330 s. The site
here runs with small limits (``mllp.frame_timeout_s``, ``write_timeout_s``,
``max_connections``) so each case takes seconds; throughout, ``/health`` and
an ordinary sender must keep being served.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import wait_for
from test_mllp import renal, send

from ehrbridge.adapters.mllp_client import Ack, frame
from ehrbridge.config import SiteConfig
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

MAX_CONNECTIONS = 64
FRAME_TIMEOUT_S = 1.0
WRITE_TIMEOUT_S = 1.0


def small_limits(config: SiteConfig) -> SiteConfig:
    mllp = config.mllp.model_copy(
        update={
            "max_connections": MAX_CONNECTIONS,
            "frame_timeout_s": FRAME_TIMEOUT_S,
            "idle_timeout_s": 60.0,  # far beyond the test: only the new limits may close
            "write_timeout_s": WRITE_TIMEOUT_S,
            "write_buffer_bytes": 4096,
        }
    )
    return config.model_copy(update={"mllp": mllp})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    data_dir = tmp_path_factory.mktemp("mllp-limits")
    with BackgroundSandbox(data_dir, configure=small_limits, fhir_site=False) as running:
        yield running


def mllp_counts(site: BackgroundSandbox) -> dict[str, int]:
    response = httpx.get(f"{site.sandbox.api_url}/health", timeout=5)
    assert response.status_code == 200
    counts: dict[str, int] = response.json()["mllp"]
    return counts


def served_meanwhile(site: BackgroundSandbox, ehr: SyntheticEhr) -> None:
    """/health answers, and an ordinary sender gets AA for a good message."""
    mllp_counts(site)
    message, control_id, _ = renal(ehr, egfr=25.0, uacr_mg_g=300.0, age=70, female=False)
    ack = send(site, message)
    assert (ack.code, ack.control_id) == ("AA", control_id)


async def drip(port: int, every_s: float, give_up_s: float) -> tuple[float, bytes]:
    """Open a frame and send one more byte every ``every_s``; (seconds until closed, reply)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"\x0bMSH")
    reply = b""
    while time.monotonic() - started < give_up_s:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), every_s)
        except TimeoutError:
            writer.write(b"|")
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        reply += chunk
    writer.close()
    return time.monotonic() - started, reply


def test_slow_drip_connections_are_closed_by_the_frame_deadline(
    site: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    before = mllp_counts(site)

    async def sixty_drips() -> list[tuple[float, bytes]]:
        drips = [drip(site.sandbox.mllp_port, 0.2, give_up_s=20) for _ in range(60)]
        return await asyncio.gather(*drips)

    result: list[list[tuple[float, bytes]]] = []
    dripping = threading.Thread(target=lambda: result.append(asyncio.run(sixty_drips())))
    dripping.start()
    time.sleep(0.3)
    served_meanwhile(site, ehr)
    dripping.join(30)
    [closed] = result
    assert all(seconds < FRAME_TIMEOUT_S + 3 for seconds, _ in closed), sorted(closed)[-1]
    # Each cut-off frame is answered once (AR) and kept with its reason.
    acks = [Ack.parse(reply.strip(b"\x0b\x1c\r")) for _, reply in closed]
    assert [ack.code for ack in acks] == ["AR"] * 60
    assert all(reply.count(b"\x1c\r") == 1 for _, reply in closed)
    after = wait_for(
        lambda: (c := mllp_counts(site))["frame_timeouts"] >= before["frame_timeouts"] + 60 and c,
        what="the frame timeouts counted",
    )
    assert after["frame_timeouts"] == before["frame_timeouts"] + 60
    kept = [
        r for r in dead_letters_all(site) if r.headers.get("error.reason") == "mllp.frame_timeout"
    ]
    assert len(kept) >= 60


def dead_letters_all(site: BackgroundSandbox) -> list[Any]:
    runtime = site.sandbox.runtime
    assert runtime is not None
    return runtime.log.read(runtime.topic("dlq"), limit=100_000)


def wide_header_message(index: int) -> bytes:
    """A message whose ACK is large: MSH-5 (echoed as the ACK's MSH-3) is 100 KB."""
    receiver = "R" * 100_000
    return (
        f"MSH|^~\\&|LAB|HOSP|{receiver}|EHB|20260101120000||ADT^A08|W{index}|P|2.5\r"
        "EVN|A08|20260101120000\r"
    ).encode()


def test_a_peer_that_never_reads_its_acks_is_dropped(
    site: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    before = mllp_counts(site)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", site.sandbox.mllp_port))
    sock.settimeout(15)
    outcome: list[BaseException | None] = []

    def flood() -> None:
        try:
            for index in range(400):  # ~40 MB of ACKs if none were ever dropped
                sock.sendall(frame(wide_header_message(index)))
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    flooding = threading.Thread(target=flood)
    started = time.monotonic()
    flooding.start()
    after = wait_for(
        lambda: (c := mllp_counts(site))["write_timeouts"] > before["write_timeouts"] and c,
        timeout_s=15,
        what="the non-reading peer dropped",
    )
    served_meanwhile(site, ehr)
    flooding.join(20)
    sock.close()
    assert after["write_timeouts"] == before["write_timeouts"] + 1
    assert isinstance(outcome[0], OSError), "the flood was taken in full"
    assert time.monotonic() - started < 15


def test_connections_over_the_cap_are_refused_while_the_others_are_served(
    site: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    wait_for(lambda: mllp_counts(site)["open"] == 0, what="earlier connections closed")
    before = mllp_counts(site)
    held = [socket.create_connection(("127.0.0.1", site.sandbox.mllp_port)) for _ in range(64)]
    try:
        wait_for(lambda: mllp_counts(site)["open"] == MAX_CONNECTIONS, what="all connections open")
        with socket.create_connection(("127.0.0.1", site.sandbox.mllp_port), timeout=5) as extra:
            started = time.monotonic()
            with pytest.raises((ConnectionResetError, TimeoutError)) as refused:
                if extra.recv(1024) == b"":
                    raise ConnectionResetError("closed")
            assert refused.type is ConnectionResetError  # closed at once, not left waiting
            assert time.monotonic() - started < 2
        mllp_counts(site)  # /health is served at the cap
        message, control_id, _ = renal(ehr, egfr=25.0, uacr_mg_g=300.0, age=70, female=False)
        held[0].sendall(frame(message))  # a connection within the cap is still served
        assert Ack.parse(read_frame(held[0])).control_id == control_id
    finally:
        for sock in held:
            sock.close()
    assert mllp_counts(site)["refused"] == before["refused"] + 1
    served_meanwhile(site, ehr)  # the cap frees as connections close


def read_frame(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        assert chunk, "closed before the ACK"
        data += chunk
    return data.strip(b"\x0b\x1c\r")
