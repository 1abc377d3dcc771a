"""The message index behind the console's search: outcomes, filters, totals, query plans.

Filled from a real embedded log (SQLite) the way the console fills it, so the
outcome of each stored message (AA, AE, AR, failed later) comes from the
records' own headers; the query plans show every search the console offers
is answered from an index, not a scan of a million rows.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.adapters.sqlite_message_index import MIGRATIONS, MessageIndex, Search
from ehrbridge.bench.search import search_bench
from ehrbridge.pipelines.transport import Record


def stored(control_id: str, mrn: str, at: str, **error: str) -> Record:
    headers = {"source_id": control_id, "kind": "hl7v2", "received_at": at}
    headers |= {f"error.{k}": v for k, v in error.items()}
    topic = "site.dlq" if error else "site.raw"
    return Record(topic, mrn, b"MSH|^~\\&|" + control_id.encode(), headers)


@pytest.fixture
def index(tmp_path: Path) -> MessageIndex:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.append(
        [
            stored("C1", "M1", "2026-12-01T10:00:00+00:00"),
            stored("C2", "M2", "2026-12-01T11:00:00+00:00"),
            stored("C3", "M1", "2026-12-02T10:00:00+00:00"),
        ]
    )
    log.append(
        [
            stored("C4", "M3", "2026-12-02T12:00:00+00:00", reason="hl7.unit.unknown",
                   stage="ingest", **{"class": "MessageUnusable"}),
            stored("C5", "M3", "2026-12-02T13:00:00+00:00", reason="parse", stage="ingest",
                   **{"class": "MessageRejected"}),
            stored("C3", "M1", "2026-12-02T10:00:00+00:00", reason="upstream.unavailable",
                   stage="process", **{"class": "UpstreamUnavailable"}),
        ]
    )  # fmt: skip
    found = MessageIndex(tmp_path / "index.sqlite", "site")
    assert found.catch_up(log) == 6
    assert found.catch_up(log) == 0  # from where it stopped: nothing twice
    return found


def epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_each_message_gets_its_ack_outcome_and_reason(index: MessageIndex) -> None:
    rows = {(m.control_id, m.topic): (m.outcome, m.reason) for m in index.search(Search())}
    assert rows == {
        ("C1", "raw"): ("AA", None),
        ("C2", "raw"): ("AA", None),
        ("C3", "raw"): ("AA", None),
        ("C4", "dlq"): ("AE", "hl7.unit.unknown"),  # unusable: AE (pipelines/ack.py)
        ("C5", "dlq"): ("AR", "parse"),
        ("C3", "dlq"): ("failed", "upstream.unavailable"),  # ACKed AA, failed later
    }


def test_filters_combine_and_totals_count_every_match(index: MessageIndex) -> None:
    assert [m.control_id for m in index.search(Search(patient="M1"))] == ["C3", "C3", "C1"]
    assert index.count(Search(control_id="C3")) == 2
    day = Search(since=epoch("2026-12-02T00:00:00+00:00"), until=epoch("2026-12-03T00:00:00+00:00"))
    assert index.count(day) == 4
    assert index.count(Search(outcome="AE")) == 1
    assert index.count(Search(reason="parse", patient="M3")) == 1
    assert [m.control_id for m in index.search(Search(), limit=2, offset=2)] == ["C3", "C3"]
    assert index.reasons() == ["hl7.unit.unknown", "parse", "upstream.unavailable"]


def test_every_console_search_is_answered_from_an_index(tmp_path: Path) -> None:
    MessageIndex(tmp_path / "index.sqlite", "site").close()
    conn = sqlite3.connect(tmp_path / "index.sqlite")
    for query in (
        Search(control_id="C1"),
        Search(patient="M1"),
        Search(patient="M1", since=1.0, until=2.0),
        Search(since=1.0, until=2.0),
        Search(outcome="AE", since=1.0, until=2.0),
        Search(reason="parse"),
    ):
        where, values = query.where()
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT * FROM messages{where} ORDER BY received_at DESC",
            values,
        ).fetchall()
        detail = " ".join(str(row[-1]) for row in plan)
        assert "USING INDEX" in detail and "SCAN messages" not in detail.replace(
            "SCAN messages USING INDEX", ""
        ), (query, detail)


def test_opening_migrates_once_and_records_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    MessageIndex(path, "site").close()
    MessageIndex(path, "site").close()  # a second open changes nothing
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"messages_by_control_id", "messages_by_patient", "messages_by_time"} <= names


def test_the_search_benchmark_reports_ordered_percentiles(tmp_path: Path) -> None:
    result = search_bench(tmp_path, messages=5_000, searches=10, baseline_searches=2)
    for summary in (*result["ehrbridge"].values(), result["all"]):
        assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert result["fill_rate"] > 0 and result["ratios"]["p95_scan_over_indexed"] > 0


def test_rows_of_records_purged_from_the_log_are_forgotten(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.append([stored("C1", "M1", "2026-12-01T10:00:00+00:00")])
    log.append([stored("C2", "M2", "2026-12-01T11:00:00+00:00")])
    index = MessageIndex(tmp_path / "index.sqlite", "site")
    index.catch_up(log)
    first = log.read("site.raw", limit=1)[0].offset
    log.purge("site.raw", older_than=10**10, through_offset=first)  # retention's purge
    index.catch_up(log)
    assert [m.control_id for m in index.search(Search())] == ["C2"]
    log.purge("site.raw", older_than=10**10)
    log.append([stored("C3", "M3", "2026-12-02T11:00:00+00:00")])
    index.catch_up(log)
    assert [m.control_id for m in index.search(Search())] == ["C3"]
