"""The console's page helpers: the silent-feed rule and the server-drawn SVG charts."""

from __future__ import annotations

from typing import Any

from ehrbridge.console import _feeds, ack_bar, sparkline


class Feeds:
    """What the sites page reads of the metrics: ``feeds_json`` (adapters/prometheus_metrics.py)."""

    def __init__(self, feeds: dict[str, dict[str, Any]]) -> None:
        self.feeds = feeds

    def feeds_json(self) -> dict[str, dict[str, Any]]:
        return self.feeds


def feed(silence_s: float | None, expected: float | None) -> dict[str, Any]:
    return {"silence_s": silence_s, "expected_this_hour": expected}


def test_a_feed_is_silent_past_six_expected_gaps_and_never_before_ten_minutes() -> None:
    found = _feeds(
        Feeds(  # type: ignore[arg-type]
            {
                "a": feed(7200, 6.0),  # 6/h: a gap of 10 min, six of them 1 h; silent 2 h
                "b": feed(1800, 6.0),  # half an hour: within six gaps
                "c": feed(500, 600.0),  # busy feed: six gaps are 36 s, but 10 min at least
                "d": feed(10**6, None),  # this hour's traffic not learned yet: no judgement
                "e": feed(None, 6.0),  # never sent anything
            }
        ),
        now=1_800_000_000.0,
    )
    assert {f["source"]: f["silent"] for f in found} == {
        "a": True,
        "b": False,
        "c": False,
        "d": False,
        "e": False,
    }
    assert found[0]["silence"] == "2.0 h" and found[4]["last"] == "never"


def test_the_charts_are_inline_svg_scaled_to_their_data() -> None:
    line = str(sparkline([0, 5, 10]))
    assert line.startswith("<svg") and 'points="0.0,38.0 120.0,20.0 240.0,2.0"' in line
    bar = str(ack_bar({"aa": 3, "ae": 1, "ar": 0}))
    assert 'width="180.0"' in bar and 'width="60.0"' in bar and "<title>AE 1</title>" in bar
