"""Encryption at rest: a site with ``encryption:`` keeps its SQLite stores in
SQLCipher files that hold no readable PHI, opens them again with its key, and
refuses another key with a clear error instead of treating the file as empty."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from predictions import prediction
from test_data_at_rest import site_file
from test_tls import LoopThread

from ehrbridge.adapters import _sqlite
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.cli import main
from ehrbridge.config import load_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.pipelines.results import Delivery
from ehrbridge.pipelines.transport import Record
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr
from ehrbridge.stores import unlock_stores

pytest.importorskip("sqlcipher3", reason="the encryption extra (in dev) is not installed")

SQLITE_HEADER = b"SQLite format 3\x00"
KEY_ENV = "EHRBRIDGE_TEST_STORAGE_KEY"


@pytest.fixture(autouse=True)
def no_keys_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keys are per process; each test starts and ends with none registered."""
    monkeypatch.setattr(_sqlite, "_KEYS", {})
    monkeypatch.setenv(KEY_ENV, os.urandom(32).hex())
    yield


def encrypted_site(tmp_path: Path) -> Path:
    return site_file(tmp_path, tmp_path / "data", encryption={"key_env": KEY_ENV})


def test_a_site_with_a_key_writes_no_readable_phi(tmp_path: Path) -> None:
    config = load_site_config(encrypted_site(tmp_path))
    at = datetime(2026, 1, 1, tzinfo=UTC)
    message = SyntheticEhr(seed=3, patients=1).renal_oru_for(
        age=60, female=True, at=at, egfr=30.0, control_id="ENC1"
    )
    mrn = message.split(b"PID|")[1].split(b"|")[2].split(b"^")[0]
    loop = LoopThread()
    runtime = SiteRuntime(config, {Role.INGEST})
    try:
        loop.call(runtime.start())
        with MllpClient("127.0.0.1", runtime.mllp_port) as client:
            assert client.send(message).code == "AA"
    finally:
        loop.call(runtime.stop())
        loop.close()
    files = [p for p in config.data_dir.glob("*.sqlite*") if p.stat().st_size]
    assert any(p.name == "log.sqlite" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not data.startswith(SQLITE_HEADER), f"{path.name} is plain SQLite"
        assert mrn not in data and b"ENC1" not in data, f"{path.name} holds readable PHI"
    # The same site reads its own log back with the key.
    reopened = SqliteLog(config.data_dir / "log.sqlite")
    assert [r.key for r in reopened.read(f"{config.site}.raw")] != []


def test_every_store_round_trips_under_a_key_and_is_refused_under_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sqlite.encrypt_under(tmp_path, "first key")
    log = SqliteLog(tmp_path / "log.sqlite")
    log.append([Record("s.raw", "P1", b"MSH|...")])
    results = SqliteResultStore(tmp_path / "results.sqlite")
    stored = prediction(load_site_config(site_file(tmp_path, tmp_path / "data")), "P1")
    results.upsert([(stored, {})], Delivery.SHADOW)
    assert [r.value for r in log.read("s.raw")] == [b"MSH|..."]
    assert results.count() == 1
    log.close()
    results.close()

    monkeypatch.setattr(_sqlite, "_KEYS", {})
    _sqlite.encrypt_under(tmp_path, "another key")
    with pytest.raises(ConfigError, match="storage key does not open this file"):
        SqliteLog(tmp_path / "log.sqlite").read("s.raw")


def test_the_cli_reads_an_encrypted_site_with_its_key_and_says_why_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    site = encrypted_site(tmp_path)
    config = load_site_config(site)
    unlock_stores(config)
    log = SqliteLog(config.data_dir / "log.sqlite")
    log.append([Record(f"{config.site}.dlq", "P1", b"bad", {"error.reason": "hl7.test"})])
    log.close()
    monkeypatch.setattr(_sqlite, "_KEYS", {})
    assert main(["dlq", "list", "--config", str(site)]) == 0
    assert "hl7.test" in capsys.readouterr().out

    monkeypatch.setattr(_sqlite, "_KEYS", {})
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match="the storage key environment variable"):
        unlock_stores(config)


def test_the_key_never_sits_in_the_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key"):
        load_site_config(site_file(tmp_path, tmp_path / "data", encryption={"key": "secret"}))
    with pytest.raises(ConfigError, match="exactly one of 'key_env' or 'key_file'"):
        load_site_config(site_file(tmp_path, tmp_path / "data", encryption={}))
