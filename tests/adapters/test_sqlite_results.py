"""The SQLite result store's batch read: ``get_many`` answers as ``get`` does, per identifier.

The write-back stage reads a whole batch's previous results with one
``get_many`` (``pipelines/writeback.py``), so it must agree with ``get`` on
every identifier: stored ones with every field, absent ones left out,
duplicates once, and batches larger than one ``IN (...)`` query.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from predictions import prediction

from ehrbridge.adapters import sqlite_results
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.pipelines.results import Delivery
from ehrbridge.sandbox.run import sandbox_site_file


@pytest.fixture(scope="module")
def config() -> SiteConfig:
    return load_site_config(sandbox_site_file())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteResultStore]:
    opened = SqliteResultStore(tmp_path / "results.sqlite")
    yield opened
    opened.close()


def test_get_many_returns_what_get_returns_for_each_stored_identifier(
    store: SqliteResultStore, config: SiteConfig
) -> None:
    first = prediction(config, "MRN-1", risk_2y=0.11, revision=3)
    second = prediction(config, "MRN-2", day=2, risk_2y=0.22)
    store.upsert([(first, {"resourceType": "Observation", "n": 1})], Delivery.PENDING)
    store.upsert([(second, {"resourceType": "Observation", "n": 2})], Delivery.SHADOW)
    store.mark_delivered([first.identifier])
    found = store.get_many([first.identifier, second.identifier])
    assert found == {i: store.get(i) for i in (first.identifier, second.identifier)}
    assert found[first.identifier].status == Delivery.DELIVERED
    assert found[first.identifier].state_revision == 3
    assert found[second.identifier].observation == {"resourceType": "Observation", "n": 2}


def test_get_many_leaves_out_what_is_not_stored_and_reads_duplicates_once(
    store: SqliteResultStore, config: SiteConfig
) -> None:
    stored = prediction(config, "MRN-1")
    store.upsert([(stored, {})], Delivery.SHADOW)
    found = store.get_many(["never-stored", stored.identifier, stored.identifier])
    assert list(found) == [stored.identifier]
    assert store.get_many([]) == {}


def test_get_many_reads_batches_larger_than_one_query(
    store: SqliteResultStore, config: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_results, "_IN_CHUNK", 3)  # 7 identifiers: 3 queries
    results = [prediction(config, f"MRN-{n}", day=1 + n) for n in range(6)]
    store.upsert([(p, {"n": n}) for n, p in enumerate(results)], Delivery.SHADOW)
    wanted = [p.identifier for p in results] + ["absent"]
    found = store.get_many(wanted)
    assert sorted(found) == sorted(p.identifier for p in results)
    assert [found[p.identifier].observation for p in results] == [{"n": n} for n in range(6)]
