"""The drift and feed-silence arithmetic (pipelines/drift.py, pipelines/feeds.py).

Expected values are worked by hand in the comments; scipy's jensenshannon is
a second opinion when scipy is installed.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

import pytest

from ehrbridge.pipelines.drift import (
    BINS,
    DriftMonitor,
    bin_index,
    feature_values,
    js_distance,
    psi,
)
from ehrbridge.pipelines.features import NotEnoughData
from ehrbridge.pipelines.feeds import FeedClock, hour_of_week

MONDAY = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday, 00:00 UTC


def test_psi_of_a_shift_from_half_half_to_a_quarter() -> None:
    # r = (.5, .5), c = (.25, .75):
    # (.25-.5) ln(.25/.5) + (.75-.5) ln(.75/.5) = .25 ln 2 + .25 ln 1.5 = 0.173287 + 0.101366
    assert psi([50, 50], [25, 75]) == pytest.approx(0.274653, abs=1e-6)


def test_psi_is_zero_for_the_same_proportions_and_counts_do_not_matter() -> None:
    assert psi([10, 30, 60], [100, 300, 600]) == pytest.approx(0.0, abs=1e-12)


def test_an_empty_bin_counts_as_one_in_ten_thousand() -> None:
    # r = (1, 1e-4), c = (1e-4, 1): 2 * (1 - 1e-4) * ln(1e4) = 18.418839
    assert psi([10, 0], [0, 10]) == pytest.approx(2 * 0.9999 * math.log(1e4), rel=1e-9)


def test_js_distance_by_hand() -> None:
    # p = (.5, .5), q = (.25, .75), m = (.375, .625)
    # KL(p||m) = .5 ln(.5/.375) + .5 ln(.5/.625) = 0.032269
    # KL(q||m) = .25 ln(.25/.375) + .75 ln(.75/.625) = 0.035375
    # sqrt((0.032269 + 0.035375) / 2) = 0.183907
    assert js_distance([50, 50], [25, 75]) == pytest.approx(0.183907, abs=1e-6)


def test_js_distance_of_disjoint_distributions_is_sqrt_ln2() -> None:
    assert js_distance([1, 0], [0, 1]) == pytest.approx(math.sqrt(math.log(2)), abs=1e-12)


def test_js_distance_agrees_with_scipy() -> None:
    distance = pytest.importorskip("scipy.spatial.distance")
    ref, cur = [5, 20, 40, 25, 10, 0], [1, 10, 30, 35, 20, 4]
    assert js_distance(ref, cur) == pytest.approx(distance.jensenshannon(ref, cur), abs=1e-12)


def test_bins_are_closed_below_and_open_above() -> None:
    edges = BINS["uacr"]  # 3, 10, 30, ...
    assert [bin_index(edges, v) for v in (0.0, 2.99, 3.0, 29.9, 30.0, 5000.0)] == [0, 0, 1, 2, 3, 7]


def test_a_record_without_a_score_reports_only_its_missing_inputs() -> None:
    result = NotEnoughData(MONDAY, {"creatinine": "no birth date", "age": "no birth date"})
    assert feature_values(result) == {"age": None, "egfr": None}


def uacr_day(monitor: DriftMonitor, day: date, values: list[float]) -> None:
    for value in values:
        monitor.add_features(day, {"age": 60.0, "sex": 1.0, "egfr": 35.0, "uacr": value})


def test_uacr_sent_in_mg_per_mmol_while_the_mapping_reads_mg_per_g_is_drift() -> None:
    """The synthetic EHR switches UACR units; the mapping still reads mg/g: values / 8.84."""
    monitor = DriftMonitor(reference_days=2, min_count=50)
    usual = [5.0, 20.0, 50.0, 150.0, 500.0] * 40  # 200 records a day
    first = date(2026, 11, 1)
    uacr_day(monitor, first, usual)
    uacr_day(monitor, first + timedelta(days=1), usual)
    assert monitor.compare(first + timedelta(days=1), "uacr") is None  # still reference
    same = first + timedelta(days=2)
    uacr_day(monitor, same, usual)
    steady = monitor.compare(same, "uacr")
    assert steady is not None and steady.psi == pytest.approx(0.0, abs=1e-12)
    switched = first + timedelta(days=3)
    uacr_day(monitor, switched, [v / 8.84 for v in usual])
    drifted = monitor.compare(switched, "uacr")
    assert drifted is not None and drifted.level == "alarm" and drifted.psi > 1.0
    assert monitor.compare(switched, "egfr").psi == pytest.approx(0.0, abs=1e-12)  # type: ignore[union-attr]


def test_a_day_compares_only_once_it_has_min_count_values() -> None:
    monitor = DriftMonitor(reference_days=1, min_count=50)
    first = date(2026, 11, 1)
    uacr_day(monitor, first, [20.0] * 60)
    uacr_day(monitor, first + timedelta(days=1), [20.0] * 49)
    assert monitor.compare(first + timedelta(days=1), "uacr") is None


def test_a_saved_monitor_restores_its_reference_and_days() -> None:
    monitor = DriftMonitor(reference_days=1, min_count=1)
    first = date(2026, 11, 1)
    uacr_day(monitor, first, [20.0, 200.0])
    monitor.add_score(first, "H", 0.3)
    again = DriftMonitor(reference_days=1, min_count=1)
    again.restore(monitor.to_json())
    assert again.to_json() == monitor.to_json()


def test_a_reference_file_with_other_bins_is_refused() -> None:
    monitor = DriftMonitor()
    with pytest.raises(ValueError, match="egfr"):
        monitor.load_reference({"bins": {"egfr": [1.0, 2.0]}, "counts": {}})


def test_hour_of_week_starts_monday_midnight_utc() -> None:
    assert hour_of_week(MONDAY) == 0
    assert hour_of_week(MONDAY + timedelta(days=3, hours=5, minutes=59)) == 77
    assert hour_of_week(MONDAY - timedelta(minutes=1)) == 167


def test_feed_clock_learns_each_hour_of_the_week_by_moving_average() -> None:
    clock = FeedClock()
    for minute in range(10):  # 10 messages in Monday 09:00-10:00
        clock.arrived(MONDAY + timedelta(hours=9, minutes=minute))
    assert math.isnan(clock.expected(MONDAY + timedelta(hours=9)))  # the hour is not over
    clock.roll(MONDAY + timedelta(hours=10))
    assert clock.expected(MONDAY + timedelta(hours=9, minutes=30)) == 10.0  # first sight
    assert math.isnan(clock.expected(MONDAY + timedelta(hours=10)))  # not seen yet
    next_week = MONDAY + timedelta(days=7, hours=9)
    for minute in range(20):
        clock.arrived(next_week + timedelta(minutes=minute))
    clock.roll(next_week + timedelta(hours=1))
    # The hours between were silent; Monday 09:00 saw 20: 0.3 * 20 + 0.7 * 10 = 13
    assert clock.expected(next_week) == pytest.approx(13.0)
    assert clock.expected(next_week - timedelta(hours=2)) == 0.0  # Monday 07:00: seen, empty


def test_feed_silence_counts_from_the_last_message() -> None:
    clock = FeedClock(declared=120.0)
    assert math.isnan(clock.silence_s(MONDAY))
    clock.arrived(MONDAY)
    assert clock.silence_s(MONDAY + timedelta(minutes=7)) == 420.0
    assert clock.expected(MONDAY + timedelta(hours=40)) == 120.0  # declared: every hour
    assert FeedClock.from_json(clock.to_json(), 120.0) == clock
