"""PHI at rest: private data directories and files, and retention that never
drops what is not done yet (an unprocessed raw record, an undelivered result)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from auth_tokens import localize
from predictions import prediction
from test_tls import LoopThread

from ehrbridge.adapters.kafka_log import topic_spec
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.bench.common import free_port
from ehrbridge.cli import main
from ehrbridge.config import Retention, load_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.pipelines.results import Delivery
from ehrbridge.pipelines.transport import Record
from ehrbridge.retention import Purger
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.mllp_peer import purge_inbox
from ehrbridge.sandbox.run import sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

DAY = 86_400.0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def site_file(tmp_path: Path, data_dir: Path, **extra: object) -> Path:
    config = yaml.safe_load(sandbox_site_file().read_text())
    config.update(data_dir=str(data_dir), **extra)
    localize(config, tmp_path / "credentials")  # the API's token files
    config["mllp"]["port"] = free_port()
    config["http"]["port"] = free_port()
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("shared_mode", [0o755, 0o750, 0o701])
def test_a_data_dir_open_to_group_or_others_stops_the_site_naming_the_path(
    tmp_path: Path, shared_mode: int
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(shared_mode)
    result = subprocess.run(
        [sys.executable, "-m", "ehrbridge.cli", "run", "--config", str(site_file(tmp_path, data))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"error: data_dir: {data} is open to group or others (mode 0{shared_mode:o})" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert list(data.iterdir()) == []  # nothing was created in it


def test_stores_are_created_private(tmp_path: Path) -> None:
    """Data dir 0700; every SQLite file and its -wal/-shm 0600, after real traffic."""
    config = load_site_config(site_file(tmp_path, tmp_path / "site-data" / "data"))
    config = config.model_copy(
        update={
            "mllp": config.mllp.model_copy(update={"port": 0}),
            "http": config.http.model_copy(update={"port": 0}),
        }
    )
    loop = LoopThread()
    runtime = SiteRuntime(config, {Role.INGEST})
    try:
        loop.call(runtime.start())
        ehr = SyntheticEhr(seed=1, patients=1)
        at = datetime(2026, 1, 1, tzinfo=UTC)
        message = ehr.renal_oru_for(age=60, female=True, at=at, egfr=30.0, control_id="P1")
        with MllpClient("127.0.0.1", runtime.mllp_port) as client:
            assert client.send(message).code == "AA"
        files = sorted(p for p in config.data_dir.rglob("*") if p.is_file())
        names = {p.name for p in files}
        assert {"log.sqlite", "log.sqlite-wal", "log.sqlite-shm", "results.sqlite"} <= names
        assert {p.name: oct(mode(p)) for p in files} == {p.name: "0o600" for p in files}
        assert mode(config.data_dir) == 0o700
        assert mode(config.data_dir.parent) == 0o700  # made by us, so private too
    finally:
        loop.call(runtime.stop())
        loop.close()


def test_files_an_older_version_left_readable_are_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    old = data / "results.sqlite"
    old.write_bytes(b"")
    old.chmod(0o644)
    (data / "state-kafka").mkdir()
    (data / "state-kafka").chmod(0o755)
    config = load_site_config(site_file(tmp_path, data))
    runtime = SiteRuntime(config, roles=())
    asyncio_stop(runtime)
    assert mode(old) == 0o600
    assert mode(data / "state-kafka") == 0o700


def asyncio_stop(runtime: SiteRuntime) -> None:
    import asyncio

    asyncio.run(runtime.stop())


def raw(site: str, n: int) -> list[Record]:
    return [Record(f"{site}.raw", f"P{i}", f"MSG{i}".encode()) for i in range(n)]


def test_purge_keeps_a_raw_record_not_yet_processed(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    results = SqliteResultStore(tmp_path / "results.sqlite")
    log.append(raw("s", 3))
    log.append([Record("s.dlq", "P9", b"bad", {"error.reason": "x"})])
    offsets = [r.offset for r in log.read("s.raw")]
    log.commit("s.process", "s.raw", offsets[1])  # the worker finished the first two
    purger = Purger("s", Retention(raw_days=30, dead_letter_days=90), log, results, 5)

    assert purger.purge() == {"raw": 0, "dead_letters": 0, "results": 0, "audit": 0}  # too young
    counts = purger.purge(now=time.time() + 31 * DAY)
    assert counts["raw"] == 2
    assert [r.value for r in log.read("s.raw")] == [b"MSG2"]  # unprocessed: kept at any age
    assert log.count("s.dlq") == 1  # dead letters have their own, longer, setting
    assert purger.purge(now=time.time() + 91 * DAY)["dead_letters"] == 1
    log.close()
    results.close()


def test_purge_keeps_a_result_not_yet_delivered(tmp_path: Path) -> None:
    config = load_site_config(sandbox_site_file())
    log = SqliteLog(tmp_path / "log.sqlite")
    results = SqliteResultStore(tmp_path / "results.sqlite")
    delivered, pending, shadow = (prediction(config, f"MRN-{i}") for i in range(3))
    results.upsert([(delivered, {})], Delivery.PENDING)
    results.mark_delivered([delivered.identifier])
    results.upsert([(pending, {})], Delivery.PENDING)
    results.upsert([(shadow, {})], Delivery.SHADOW)
    purger = Purger("s", Retention(results_days=7), log, results, 5)
    assert purger.purge(now=time.time() + 8 * DAY)["results"] == 2
    assert [r.identifier for r in results.list()] == [pending.identifier]
    log.close()
    results.close()


def test_purge_command_applies_the_site_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    path = site_file(tmp_path, data, retention={"raw_days": 30})
    config = load_site_config(path)
    asyncio_stop(SiteRuntime(config, roles=()))  # creates the stores, private
    log = SqliteLog(data / "log.sqlite")
    log.append(raw("sandbox", 2))
    first = log.read("sandbox.raw")[0].offset
    log.commit("sandbox.process", "sandbox.raw", first)
    log.close()
    with sqlite3.connect(data / "log.sqlite") as conn:  # written 40 days ago
        conn.execute("UPDATE records SET ts = ts - ?", (40 * DAY,))
    assert main(["purge", "--config", str(path)]) == 0
    assert "raw 1, dead_letters 0, results 0, audit 0 removed" in capsys.readouterr().out
    log = SqliteLog(data / "log.sqlite")
    assert [r.value for r in log.read("sandbox.raw")] == [b"MSG1"]
    log.close()


def test_a_running_site_purges_on_its_schedule(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = site_file(tmp_path, data, retention={"dead_letter_days": 1, "purge_interval_s": 0.2})
    config = load_site_config(path)
    log = SqliteLog(secure(data) / "log.sqlite")
    log.append([Record("sandbox.dlq", "P1", b"old dead letter")])
    with sqlite3.connect(data / "log.sqlite") as conn:
        conn.execute("UPDATE records SET ts = ts - ?", (2 * DAY,))
    loop = LoopThread()
    runtime = SiteRuntime(config, {Role.WRITEBACK})
    try:
        loop.call(runtime.start())
        deadline = time.monotonic() + 10
        while log.count("sandbox.dlq"):
            assert time.monotonic() < deadline, "the scheduled purge never ran"
            time.sleep(0.1)
    finally:
        loop.call(runtime.stop())
        loop.close()
        log.close()


def secure(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def test_retention_becomes_the_kafka_topics_retention_ms() -> None:
    retention = Retention(raw_days=30, dead_letter_days=365)
    assert topic_spec("s.raw", 6, retention).config == {"retention.ms": str(30 * 86_400_000)}
    assert topic_spec("s.dlq", 6, retention).config == {"retention.ms": str(365 * 86_400_000)}
    changelog = topic_spec("s.state-changelog", 6, retention).config
    assert changelog == {"cleanup.policy": "compact"}  # the state itself: no age limit
    assert topic_spec("s.raw", 6).config == {}


def inbox_entry(control_id: str, made: datetime) -> str:
    stamp = made.strftime("%Y%m%d%H%M%S")
    return f"MSH|^~\\&|EHRBRIDGE|s|EHR|H|{stamp}||ORU^R01^ORU_R01|{control_id}|P|2.5.1\nPID|||1\n\n"


def test_inbox_purge_drops_old_entries_and_keeps_unreadable_ones(tmp_path: Path) -> None:
    inbox = tmp_path / "ehr-inbox.hl7"
    now = datetime.now(UTC)
    inbox.write_text(
        inbox_entry("OLD", now - timedelta(days=40))
        + inbox_entry("NEW", now)
        + "garbage without a header\n\n"
    )
    assert purge_inbox(inbox, now - timedelta(days=30)) == 1
    text = inbox.read_text()
    assert "OLD" not in text and "|NEW|" in text and "garbage" in text
    assert mode(inbox) == 0o600


def test_secure_data_dir_refuses_a_file(tmp_path: Path) -> None:
    from ehrbridge.datadir import secure_data_dir

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    not_a_dir.chmod(0o600)
    with pytest.raises(ConfigError, match="is not a directory"):
        secure_data_dir(not_a_dir)
    assert os.path.exists(not_a_dir)
