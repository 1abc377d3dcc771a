"""``ehrbridge sandbox --tls``, the command a user runs, speaks TLS on every listener.

The real command runs as a process on free ports. Its banner names the local
CA; with that CA a client gets AA over MLLP and answers over HTTPS from both
sites' APIs, and a Synthea Bundle posted over HTTPS comes back as ORU^R01s at
the results inbox, which the FHIR site reaches over TLS too. A plain TCP or
HTTP client gets no ACK and no answer.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import httpx
import pytest
from conftest import wait_for

from ehrbridge.bench.common import free_port
from ehrbridge.sandbox.ports import Ports

ROOT = Path(__file__).resolve().parents[2]
EHRBRIDGE = Path(sys.executable).parent / "ehrbridge"
BUNDLE = next((ROOT / "examples" / "synthea-ckd").glob("Stewart_Stanton_*.json"))
VT, FS_CR = b"\x0b", b"\x1c\r"


@dataclass
class TlsSandbox:
    ports: Ports
    data_dir: Path
    ca_file: Path
    banner: str

    def token(self, role: str) -> str:
        return (self.data_dir / "tokens" / role).read_text().strip()

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


def read_banner(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if "--fresh starts over" in line:
            return "".join(seen)
    raise AssertionError(f"no banner from ehrbridge sandbox --tls:\n{''.join(seen)[-4000:]}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSandbox]:
    ports = Ports(*(free_port() for _ in fields(Ports)))
    data_dir = tmp_path_factory.mktemp("tls-sandbox") / "data"
    flags = [f"--{p.name.replace('_', '-')}-port={getattr(ports, p.name)}" for p in fields(Ports)]
    process = subprocess.Popen(
        [str(EHRBRIDGE), "sandbox", "--tls", "--no-traffic", "--data-dir", str(data_dir), *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        banner = read_banner(process, time.monotonic() + 120)
        found = re.search(r"TLS on \(--tls\): trust the sandbox's local CA (\S+)", banner)
        assert found, banner
        yield TlsSandbox(ports, data_dir, Path(found.group(1)), banner)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(60)


def mllp_exchange(sock: socket.socket, message: bytes) -> bytes:
    """One framed message out, whatever comes back before the peer closes or 10 s pass."""
    sock.settimeout(10)
    sock.sendall(VT + message + FS_CR)
    answer = b""
    while not answer.endswith(FS_CR):
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            break
        if not chunk:
            break
        answer += chunk
    return answer


def example_oru(control_id: str) -> bytes:
    text = (ROOT / "examples" / "oru-r01-sandbox.hl7").read_text().strip()
    text = text.replace("MY-0001", control_id)
    return text.replace("\n", "\r").encode()


def test_the_banner_says_how_to_call_over_tls(sandbox: TlsSandbox) -> None:
    assert sandbox.ca_file.is_file() and sandbox.ca_file.parent == sandbox.data_dir / "tls"
    assert f"curl --cacert {sandbox.ca_file} https://127.0.0.1:{sandbox.ports.http}" in (
        sandbox.banner
    )
    assert f"openssl s_client -CAfile {sandbox.ca_file}" in sandbox.banner


def test_mllp_over_tls_with_the_sandbox_ca_gets_aa(sandbox: TlsSandbox) -> None:
    assert b"MSA|AA|TLS-0001" in send_over_tls(sandbox, example_oru("TLS-0001"))


def send_over_tls(sandbox: TlsSandbox, message: bytes) -> bytes:
    raw = socket.create_connection(("127.0.0.1", sandbox.ports.mllp), timeout=10)
    with sandbox.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        return mllp_exchange(tls, message)


def stored(sandbox: TlsSandbox, control_id: str) -> list[object]:
    """The raw log's messages with that MSH-10, from the operator's message search."""
    search = httpx.get(
        f"https://127.0.0.1:{sandbox.ports.http}/api/messages",
        params={"control_id": control_id},
        headers={"Authorization": f"Bearer {sandbox.token('operator')}"},
        verify=sandbox.client_context(),
    )
    assert search.status_code == 200, search.text
    messages: list[object] = search.json()["messages"]
    return messages


def test_plain_mllp_gets_no_ack_and_nothing_is_stored(sandbox: TlsSandbox) -> None:
    with socket.create_connection(("127.0.0.1", sandbox.ports.mllp), timeout=10) as plain:
        answer = mllp_exchange(plain, example_oru("PLAIN-0001"))
    assert b"MSA|" not in answer  # the TLS handshake failed: no HL7 answer at all
    assert b"MSA|AA|TLS-0002" in send_over_tls(sandbox, example_oru("TLS-0002"))
    assert len(stored(sandbox, "TLS-0002")) == 1  # the search finds what TLS delivered
    assert stored(sandbox, "PLAIN-0001") == []


@pytest.mark.parametrize("port", ["http", "fhir_site_http"])
def test_both_apis_answer_over_https_only(sandbox: TlsSandbox, port: str) -> None:
    where = f"127.0.0.1:{getattr(sandbox.ports, port)}"
    viewer = {"Authorization": f"Bearer {sandbox.token('viewer')}"}
    secure = httpx.get(
        f"https://{where}/api/results", headers=viewer, verify=sandbox.client_context()
    )
    assert secure.status_code == 200, secure.text
    assert (
        httpx.get(f"https://{where}/health/live", verify=sandbox.client_context()).status_code
        == 200
    )
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{where}/health/live", timeout=10)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the sandbox CA
        httpx.get(f"https://{where}/health/live", timeout=10)


def test_a_bundle_over_https_comes_back_as_orus_over_tls(sandbox: TlsSandbox) -> None:
    posted = httpx.post(
        f"https://127.0.0.1:{sandbox.ports.fhir_site_http}/fhir",
        content=BUNDLE.read_bytes(),
        headers={
            "content-type": "application/fhir+json",
            "Authorization": f"Bearer {sandbox.token('sender')}",
        },
        verify=sandbox.client_context(),
        timeout=120,
    )
    assert posted.status_code == 200, posted.text[:500]
    inbox = sandbox.data_dir / "ehr-inbox.hl7"
    wait_for(lambda: inbox.exists() and "ORU^R01" in inbox.read_text(), timeout_s=60)
    # The results inbox listens with TLS only, so the ORUs filed there came over TLS.
    with socket.create_connection(("127.0.0.1", sandbox.ports.ehr_inbox), timeout=10) as plain:
        assert b"MSA|" not in mllp_exchange(plain, example_oru("PLAIN-0002"))


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_banners_send_command_gets_aa_over_tls(sandbox: TlsSandbox) -> None:
    """The banner's `ehrbridge send` line carries --ca-file; without it there is no ACK."""
    [line] = [x for x in sandbox.banner.splitlines() if " send examples/oru-r01-sandbox.hl7" in x]
    command = line.split("(prints the ACK)")[0].split()
    assert command[-2:] == ["--ca-file", str(sandbox.ca_file)]
    sent = run(command)
    assert sent.returncode == 0 and sent.stdout.startswith("AA MY-0001"), sent

    plain = run(command[:-2])
    assert plain.returncode == 1 and "AA" not in plain.stdout, plain
    untrusted = [*command[:-2], "--tls"]  # the system CAs do not know the sandbox's CA
    refused = run(untrusted)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert "certificate verify failed" in refused.stderr
