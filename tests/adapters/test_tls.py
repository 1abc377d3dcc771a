"""TLS on every listener and client, with real certificates on real sockets.

The site runs its ingest role (MLLP listener + HTTP API) with ``mllp.tls`` and
``http.tls``; certificates come from ``tests/tls_certs.py`` (a CA, a server
certificate, a good client certificate and one from another CA).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from cryptography import x509
from tls_certs import CertSet, make_certs

from ehrbridge.adapters.kafka_log import KafkaLog, security_settings
from ehrbridge.adapters.mllp_client import MllpClient, frame
from ehrbridge.adapters.mllp_sink import MllpSink
from ehrbridge.config import (
    Calibration,
    ClientTls,
    Hl7v2Writeback,
    KafkaSasl,
    KafkaTransport,
    ListenerTls,
    MllpTls,
    SiteConfig,
    load_site_config,
)
from ehrbridge.core.errors import ConfigError, UpstreamUnavailable
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.credentials import ensure_credentials, with_credentials
from ehrbridge.sandbox.mllp_peer import MllpPeer
from ehrbridge.sandbox.run import sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

T = TypeVar("T")


class LoopThread:
    """An event loop in a thread, for running async servers from sync tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def certs(tmp_path: Path) -> CertSet:
    return make_certs(tmp_path / "certs")


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def tls_site(tmp_path: Path, certs: CertSet, subjects: list[str] | None = None) -> SiteConfig:
    ensure_credentials(tmp_path / "data")  # the API's token files
    config = with_credentials(load_site_config(sandbox_site_file()), tmp_path / "data")
    mllp_tls = MllpTls(
        cert_file=certs.server_cert,
        key_file=certs.server_key,
        client_ca_file=certs.ca,
        client_subjects=subjects or [],
        reload_s=0.1,
    )
    http_tls = ListenerTls(cert_file=certs.server_cert, key_file=certs.server_key)
    return config.model_copy(
        update={
            "data_dir": tmp_path / "data",
            "mllp": config.mllp.model_copy(update={"port": 0, "tls": mllp_tls}),
            "http": config.http.model_copy(update={"port": 0, "tls": http_tls}),
        }
    )


@pytest.fixture
def site(tmp_path: Path, certs: CertSet, loop: LoopThread) -> Iterator[SiteRuntime]:
    runtime = SiteRuntime(tls_site(tmp_path, certs), {Role.INGEST})
    loop.call(runtime.start())
    yield runtime
    loop.call(runtime.stop())


def stored(runtime: SiteRuntime) -> int:
    """Records in raw and the dead-letter store: what the listener kept."""
    return sum(runtime.log.count(runtime.topic(t)) for t in ("raw", "dlq"))  # type: ignore[attr-defined]


def oru(control_id: str = "TLS1") -> bytes:
    ehr = SyntheticEhr(seed=1, patients=1)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return ehr.renal_oru_for(
        age=60, female=True, at=at, egfr=30.0, mrn="TLSMRN1", control_id=control_id
    )


def test_mllp_client_with_a_certificate_from_the_ca_gets_aa(
    site: SiteRuntime, certs: CertSet
) -> None:
    with MllpClient("127.0.0.1", site.mllp_port, tls=certs.client_context()) as client:
        ack = client.send(oru())
    assert (ack.code, ack.control_id) == ("AA", "TLS1")
    assert site.log.count(site.topic("raw")) == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("cert", [None, "other"], ids=["no-certificate", "another-ca"])
def test_mllp_handshake_fails_without_a_trusted_client_certificate(
    site: SiteRuntime, certs: CertSet, cert: str | None
) -> None:
    # TLS 1.3: the server's refusal of the certificate arrives after the client's
    # handshake finished, so it may surface on the first read instead.
    client = MllpClient("127.0.0.1", site.mllp_port, tls=certs.client_context(cert=cert))
    with client, pytest.raises(UpstreamUnavailable):
        client.send(oru())
    assert stored(site) == 0


def test_plaintext_mllp_to_a_tls_listener_stores_nothing(site: SiteRuntime) -> None:
    with socket.create_connection(("127.0.0.1", site.mllp_port), timeout=5) as sock:
        sock.sendall(frame(oru()))
        sock.settimeout(5)
        with pytest.raises(OSError):
            while sock.recv(65536):  # the server drops the connection: no ACK, ever
                pass
            raise ConnectionResetError("closed")
    assert stored(site) == 0


def test_listeners_speak_tls_1_2_or_newer_only(site: SiteRuntime, certs: CertSet) -> None:
    # The system OpenSSL may refuse TLS 1.1 on its own; the contexts must say so anyway.
    assert [r.context.minimum_version for r in site.certificate_reloaders] == [
        ssl.TLSVersion.TLSv1_2,
        ssl.TLSVersion.TLSv1_2,
    ]
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with MllpClient("127.0.0.1", site.mllp_port, tls=context) as client:
        assert client.send(oru()).code == "AA"


def test_subject_pin_closes_a_ca_signed_client_not_on_the_list(
    tmp_path: Path, certs: CertSet, loop: LoopThread
) -> None:
    runtime = SiteRuntime(tls_site(tmp_path, certs, ["lis.hospital.example"]), {Role.INGEST})
    loop.call(runtime.start())
    try:
        client = MllpClient("127.0.0.1", runtime.mllp_port, tls=certs.client_context())
        with client, pytest.raises(UpstreamUnavailable):
            client.send(oru())
        assert stored(runtime) == 0
        assert runtime.mllp is not None and runtime.mllp.stats.tls_refused == 1
        cert, key = certs.issue_client("lis.hospital.example")
        pinned = ssl.create_default_context(cafile=certs.ca)
        pinned.load_cert_chain(cert, key)
        with MllpClient("127.0.0.1", runtime.mllp_port, tls=pinned) as client:
            assert client.send(oru("PINNED")).code == "AA"
    finally:
        loop.call(runtime.stop())


def test_subject_pin_matches_a_subject_alt_name(
    tmp_path: Path, certs: CertSet, loop: LoopThread
) -> None:
    config = tls_site(tmp_path, certs, ["lab-engine.hospital.example"])
    runtime = SiteRuntime(config, {Role.INGEST})
    loop.call(runtime.start())
    try:
        with MllpClient("127.0.0.1", runtime.mllp_port, tls=certs.client_context()) as client:
            assert client.send(oru()).code == "AA"
    finally:
        loop.call(runtime.stop())


def test_https_api_answers_over_tls_only(site: SiteRuntime, certs: CertSet) -> None:
    url = f"https://127.0.0.1:{site.http_port}/health"
    response = httpx.get(url, verify=ssl.create_default_context(cafile=certs.ca))
    assert response.status_code == 200
    with pytest.raises(httpx.ConnectError):  # our CA is not in the system store
        httpx.get(url)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{site.http_port}/health")


def test_https_api_with_client_ca_requires_a_client_certificate(
    tmp_path: Path, certs: CertSet, loop: LoopThread
) -> None:
    config = tls_site(tmp_path, certs)
    http_tls = ListenerTls(
        cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca
    )
    config = config.model_copy(update={"http": config.http.model_copy(update={"tls": http_tls})})
    runtime = SiteRuntime(config, {Role.INGEST})
    loop.call(runtime.start())
    try:
        url = f"https://127.0.0.1:{runtime.http_port}/health"
        assert httpx.get(url, verify=certs.client_context()).status_code == 200
        for refused in (certs.client_context(cert=None), certs.client_context(cert="other")):
            with pytest.raises(httpx.HTTPError):
                httpx.get(url, verify=refused)
    finally:
        loop.call(runtime.stop())


def serial_seen(port: int, certs: CertSet) -> int:
    context = certs.client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def replace_server_cert(certs: CertSet) -> int:
    issued = certs.authority.issue("localhost", ("localhost", "127.0.0.1"))
    issued.write(certs.directory, "server")
    later = time.time() + 2  # an mtime the watcher cannot mistake for the old one
    for path in (certs.server_cert, certs.server_key):
        os.utime(path, (later, later))
    return issued.cert.serial_number


def test_a_renewed_certificate_is_used_for_new_connections_without_dropping_open_ones(
    site: SiteRuntime, certs: CertSet
) -> None:
    old = serial_seen(site.mllp_port, certs)
    open_client = MllpClient("127.0.0.1", site.mllp_port, tls=certs.client_context())
    assert open_client.send(oru("BEFORE")).code == "AA"
    new = replace_server_cert(certs)
    deadline = time.monotonic() + 10
    while serial_seen(site.mllp_port, certs) != new:  # the mtime watcher (reload_s 0.1)
        assert time.monotonic() < deadline, "the new certificate was never served"
        time.sleep(0.1)
    assert new != old
    assert open_client.send(oru("AFTER")).code == "AA"  # same connection, still served
    open_client.close()
    assert serial_seen(site.http_port, certs) == new  # the HTTP listener too
    assert site.log.count(site.topic("raw")) == 2  # type: ignore[attr-defined]


def test_reload_keeps_the_old_certificate_when_the_new_files_are_broken(
    site: SiteRuntime, certs: CertSet
) -> None:
    old = serial_seen(site.mllp_port, certs)
    certs.server_key.write_text("not a key")
    assert site.reload_certificates() == 0  # SIGHUP's handler
    assert serial_seen(site.mllp_port, certs) == old


def test_a_missing_certificate_stops_the_site_naming_the_setting(
    tmp_path: Path, certs: CertSet, loop: LoopThread
) -> None:
    config = tls_site(tmp_path, certs)
    bad = config.mllp.tls.model_copy(update={"cert_file": tmp_path / "nope.pem"})  # type: ignore[union-attr]
    config = config.model_copy(update={"mllp": config.mllp.model_copy(update={"tls": bad})})
    runtime = SiteRuntime(config, {Role.INGEST})
    with pytest.raises(ConfigError, match=r"mllp\.tls: cannot load the certificate .*nope\.pem"):
        loop.call(runtime.start())
    loop.call(runtime.stop())


class TlsPeer:
    """The sandbox's results inbox behind TLS with mTLS: the EHR side of ORU write-back."""

    def __init__(self, certs: CertSet, loop: LoopThread) -> None:
        self.peer = MllpPeer(port=0)
        self.loop = loop
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.server_cert, certs.server_key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs.ca)
        self.peer.ssl = context
        loop.call(self.peer.start())

    def close(self) -> None:
        self.loop.call(self.peer.stop())


def test_oru_writeback_over_tls_with_a_client_certificate(certs: CertSet, loop: LoopThread) -> None:
    peer = TlsPeer(certs, loop)
    try:
        tls = ClientTls(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        target = Hl7v2Writeback(host="localhost", port=peer.peer.port, tls=tls, resends=0)
        sink = MllpSink(target)
        assert sink.send(oru("ORU1"), "ORU1").code == "AA"
        sink.close()
        no_cert = MllpSink(target.model_copy(update={"tls": ClientTls(ca_file=certs.ca)}))
        with pytest.raises(UpstreamUnavailable):
            no_cert.send(oru("ORU2"), "ORU2")
        no_cert.close()
        assert [m.control_id for m in peer.peer.messages()] == ["ORU1"]
    finally:
        peer.close()


def test_oru_writeback_refuses_a_server_its_ca_did_not_sign(
    tmp_path: Path, certs: CertSet, loop: LoopThread
) -> None:
    peer = TlsPeer(certs, loop)
    try:
        strangers = make_certs(tmp_path / "strangers")
        tls = ClientTls(
            ca_file=strangers.ca, cert_file=certs.client_cert, key_file=certs.client_key
        )
        sink = MllpSink(Hl7v2Writeback(host="localhost", port=peer.peer.port, tls=tls, resends=0))
        with pytest.raises(UpstreamUnavailable, match="TLS handshake failed"):
            sink.send(oru("ORU3"), "ORU3")
        sink.close()
        assert peer.peer.messages() == []
    finally:
        peer.close()


def test_kafka_tls_and_sasl_settings_reach_every_client(
    tmp_path: Path, certs: CertSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_TEST_PASSWORD", "s3cret")
    transport = KafkaTransport(
        kind="kafka",
        bootstrap="127.0.0.1:9093",
        tls=ClientTls(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key),
        sasl=KafkaSasl(username="ehrbridge", password_env="KAFKA_TEST_PASSWORD"),
    )
    connection = KafkaLog(transport).connection
    assert connection["security_protocol"] == "SASL_SSL"
    assert connection["ssl_cafile"] == str(certs.ca)
    assert connection["ssl_certfile"] == str(certs.client_cert)
    assert connection["ssl_keyfile"] == str(certs.client_key)
    assert connection["sasl_mechanism"] == "SCRAM-SHA-512"
    assert connection["sasl_plain_username"] == "ehrbridge"
    assert connection["sasl_plain_password"] == "s3cret"
    # The producer is built from the same settings: kafka-python accepts every key.
    from kafka import KafkaProducer

    with pytest.raises(Exception) as refused:  # no broker there; the config itself is valid
        KafkaProducer(**{**connection, "bootstrap_timeout_ms": 200})
    assert "Unrecognized configs" not in str(refused.value)


def test_kafka_security_protocol_follows_tls_and_sasl() -> None:
    def protocol(**extra: Any) -> str:
        transport = KafkaTransport(kind="kafka", bootstrap="h:1", **extra)
        return str(security_settings(transport)["security_protocol"])

    os.environ.setdefault("KAFKA_TEST_PASSWORD2", "x")
    sasl = KafkaSasl(mechanism="PLAIN", username="u", password_env="KAFKA_TEST_PASSWORD2")
    assert protocol() == "PLAINTEXT"
    assert protocol(tls=ClientTls()) == "SSL"
    assert protocol(sasl=sasl) == "SASL_PLAINTEXT"
    assert protocol(tls=ClientTls(), sasl=sasl) == "SASL_SSL"


def test_a_missing_sasl_password_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KAFKA_PASSWORD", raising=False)
    transport = KafkaTransport(
        kind="kafka",
        bootstrap="h:1",
        sasl=KafkaSasl(username="u", password_env="NO_SUCH_KAFKA_PASSWORD"),
    )
    with pytest.raises(ConfigError, match=r"transport\.sasl: the Kafka SASL password"):
        KafkaLog(transport)


def test_model_calls_verify_the_server_against_the_configured_ca(
    site: SiteRuntime, certs: CertSet
) -> None:
    """Outbound HTTPS: the system store does not know our CA; model.tls.ca_file does."""
    from ehrbridge.adapters.inference_client import InferenceClient
    from ehrbridge.config import ModelEndpoint

    url = f"https://127.0.0.1:{site.http_port}"
    untrusted = ModelEndpoint(url=url, calibration=Calibration.NORTH_AMERICAN)
    assert InferenceClient(untrusted).ready() is False  # verification failed
    trusted = ModelEndpoint(
        url=url, calibration=Calibration.NORTH_AMERICAN, tls=ClientTls(ca_file=certs.ca)
    )
    client = InferenceClient(trusted)
    response = client._client.get(f"{url}/health")
    assert response.status_code == 200


def test_a_model_file_model_verifies_the_server_against_the_configured_ca(
    site: SiteRuntime, certs: CertSet
) -> None:
    """A model declared in a model file is called with model.tls too, never unverified."""
    from ehrbridge.adapters.declared_model import DeclaredModel
    from ehrbridge.config import ModelEndpoint
    from ehrbridge.mappings.model_file import load_model_file

    definition = load_model_file(Path(__file__).resolve().parents[2] / "models" / "kfre-4.yaml")
    url = f"https://127.0.0.1:{site.http_port}"
    common = {"url": url, "definition": definition, "calibration": Calibration.NORTH_AMERICAN}
    untrusted = DeclaredModel(ModelEndpoint.model_validate(common))
    with pytest.raises(UpstreamUnavailable) as caught:  # nothing was sent
        untrusted._client._post("/health", {})
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value.__cause__)
    trusted = ModelEndpoint.model_validate({**common, "tls": ClientTls(ca_file=certs.ca)})
    response = DeclaredModel(trusted)._client._client.get(f"{url}/health")
    assert response.status_code == 200


def test_tls_paths_in_a_site_file_are_relative_to_it(tmp_path: Path, certs: CertSet) -> None:
    config = yaml.safe_load(sandbox_site_file().read_text())
    config["mllp"]["tls"] = {"cert_file": "certs/server.pem", "key_file": "certs/server-key.pem"}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_site_config(path)
    assert loaded.mllp.tls is not None
    assert loaded.mllp.tls.cert_file == certs.server_cert
