"""The embedded durable log: ordering, consumer groups, durability across processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.pipelines.groupcommit import GroupCommitter
from ehrbridge.pipelines.transport import Record


def rec(topic: str, n: int) -> Record:
    return Record(topic=topic, key=f"k{n % 3}", value=f"v{n}".encode(), headers={"n": str(n)})


def test_append_and_read_keep_order_per_topic(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.append([rec("a", 1), rec("b", 2), rec("a", 3)])
    read = log.read("a")
    assert [r.value for r in read] == [b"v1", b"v3"]
    assert read[0].headers == {"n": "1"} and read[0].key == "k1"
    assert read[0].offset < read[1].offset
    assert log.read("a", after=read[0].offset) == read[1:]


def test_consumer_group_resumes_after_last_commit(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.append([rec("t", n) for n in range(5)])
    first = log.consumer("g", ["t"])
    batch = first.poll(max_records=3, timeout_s=0)
    assert [r.value for r in batch] == [b"v0", b"v1", b"v2"]
    first.commit(batch[:2])  # the third was not finished
    second = log.consumer("g", ["t"])  # e.g. after a restart
    assert [r.value for r in second.poll(timeout_s=0)] == [b"v2", b"v3", b"v4"]
    other_group = log.consumer("h", ["t"])
    assert len(other_group.poll(timeout_s=0)) == 5


def test_rewind_redelivers(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.append([rec("t", n) for n in range(3)])
    consumer = log.consumer("g", ["t"])
    batch = consumer.poll(timeout_s=0)
    consumer.rewind(batch[1:])
    assert consumer.poll(timeout_s=0) == batch[1:]


def test_poll_waits_for_an_append(tmp_path: Path) -> None:
    import threading

    log = SqliteLog(tmp_path / "log.sqlite")
    consumer = log.consumer("g", ["t"])
    threading.Timer(0.1, lambda: log.append([rec("t", 9)])).start()
    assert [r.value for r in consumer.poll(timeout_s=5)] == [b"v9"]


def test_commit_never_moves_backwards(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.append([rec("t", n) for n in range(3)])
    consumer = log.consumer("g", ["t"])
    batch = consumer.poll(timeout_s=0)
    consumer.commit(batch)
    consumer.commit(batch[:1])
    assert log.committed("g", "t") == batch[-1].offset


def test_an_append_that_returned_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    script = textwrap.dedent(
        f"""
        import os, signal
        from ehrbridge.adapters.sqlite_log import SqliteLog
        from ehrbridge.pipelines.transport import Record
        log = SqliteLog({str(path)!r})
        log.append([Record(topic="t", key="k", value=b"durable")])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False)
    assert done.returncode == -9
    assert [r.value for r in SqliteLog(path).read("t")] == [b"durable"]


def test_group_commit_batches_concurrent_appends(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    calls: list[int] = []
    original = log.append

    def counting_append(records: list[Record]) -> None:
        calls.append(len(records))
        original(records)

    log.append = counting_append  # type: ignore[method-assign]
    committer = GroupCommitter(log)

    async def many() -> None:
        await asyncio.gather(*(committer.append(rec("t", n)) for n in range(200)))

    asyncio.run(many())
    committer.close()
    assert sum(calls) == 200
    assert len(log.read("t", limit=500)) == 200
    assert len(calls) < 200  # shared fsyncs


def test_group_commit_reports_storage_failure(tmp_path: Path) -> None:
    from ehrbridge.core.errors import UpstreamUnavailable

    log = SqliteLog(tmp_path / "log.sqlite")

    def broken(records: list[Record]) -> None:
        raise UpstreamUnavailable("disk full")

    log.append = broken  # type: ignore[method-assign]
    committer = GroupCommitter(log)
    with pytest.raises(UpstreamUnavailable, match="disk full"):
        asyncio.run(committer.append(rec("t", 1)))
    committer.close()
