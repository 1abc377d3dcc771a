"""A patient's risk over time as an inline SVG line chart, drawn on the server.

No script and no external file: the chart is part of the page's HTML, so it
renders offline, without JavaScript, and prints. Each series is one model
output (``2-year risk``), its points the stored predictions; each threshold
is a band the site's results are interpreted by (``writeback.interpretation``),
drawn as a dashed line in its series' colour and labelled in words.

Accessibility (WCAG 2.1 AA): the SVG is ``role="img"`` with a title and a
description that states the latest values, so a screen reader gets them
without the picture; the same values are in the page's table. Series differ
by colour, by dash pattern and by marker shape, never by colour alone
(1.4.1); every colour has at least 4.5:1 contrast on white (1.4.3, 1.4.11).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

WIDTH, HEIGHT = 760, 340
LEFT, RIGHT, TOP, BOTTOM = 56, 250, 16, 40  # room for the axis labels and threshold names
# (colour, dash, marker) per series; contrast on white: 8.6:1, 6.3:1, 7.1:1, 5.6:1.
STYLES = (
    ("#1d4f91", "", "circle"),
    ("#a13d00", "8 4", "square"),
    ("#2f6b2f", "2 3", "diamond"),
    ("#6b3d8f", "12 3 3 3", "circle"),
)


@dataclass(frozen=True, slots=True)
class Point:
    at: datetime
    percent: float


@dataclass(frozen=True, slots=True)
class Series:
    label: str  # "2-year risk"
    points: tuple[Point, ...]  # oldest first


@dataclass(frozen=True, slots=True)
class Threshold:
    series: int  # the index of the series it applies to
    percent: float
    label: str  # "High (2-year risk >= 10%)"


def svg(series: Sequence[Series], thresholds: Sequence[Threshold], title: str) -> str:
    """The chart; ``title`` names it for assistive technology."""
    points = [p for s in series for p in s.points]
    if not points:
        return ""
    x = _time_scale([p.at for p in points])
    top = _nice_top(max([p.percent for p in points] + [t.percent for t in thresholds]))
    y = _value_scale(top)
    parts = [*_grid(x, y, top), *_threshold_lines(thresholds, y)]
    parts += [_line(i, s, x, y) for i, s in enumerate(series)]
    return (
        f'<svg class="risk-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="chart-title chart-desc" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="chart-title">{escape(title)}</title>'
        f'<desc id="chart-desc">{escape(describe(series, thresholds))}</desc>'
        + "".join(parts)
        + "</svg>"
    )


def describe(series: Sequence[Series], thresholds: Sequence[Threshold]) -> str:
    """The chart in one sentence per series, for readers who cannot see it."""
    said = []
    for s in series:
        if s.points:
            last = s.points[-1]
            said.append(
                f"{s.label}: {len(s.points)} scores, the latest {last.percent:.1f}% "
                f"on {last.at.date().isoformat()}."
            )
    said += [f"Threshold: {t.label}." for t in thresholds]
    return " ".join(said)


class _Scale:
    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        self.low, self.span = low, (high - low) or 1.0
        self.start, self.length = start, end - start

    def __call__(self, value: float) -> float:
        return round(self.start + (value - self.low) / self.span * self.length, 1)


def _time_scale(times: Sequence[datetime]) -> tuple[_Scale, datetime, datetime]:
    first, last = min(times), max(times)
    if last - first < timedelta(days=30):  # one score, or a few close together
        first, last = first - timedelta(days=15), last + timedelta(days=15)
    scale = _Scale(first.timestamp(), last.timestamp(), LEFT, WIDTH - RIGHT)
    return scale, first, last


def _value_scale(top: float) -> _Scale:
    return _Scale(0.0, top, HEIGHT - BOTTOM, TOP)


def _nice_top(highest: float) -> float:
    """The y axis' top: a round number a little above the highest value, at most 100%."""
    for top in (1, 2, 5, 10, 20, 25, 40, 50, 60, 80, 100):
        if highest * 1.1 <= top:
            return float(top)
    return 100.0


def _grid(x: tuple[_Scale, datetime, datetime], y: _Scale, top: float) -> list[str]:
    scale, first, last = x
    out = [
        f'<line x1="{LEFT}" y1="{y(0)}" x2="{WIDTH - RIGHT}" y2="{y(0)}" stroke="#595959"/>',
        f'<line x1="{LEFT}" y1="{y(top)}" x2="{LEFT}" y2="{y(0)}" stroke="#595959"/>',
        f'<text x="14" y="{TOP + 4}" class="axis" transform="rotate(-90 14 {TOP + 4})" '
        'text-anchor="end">Risk (%)</text>',
    ]
    for step in range(5):
        value = top * step / 4
        out.append(
            f'<line x1="{LEFT}" y1="{y(value)}" x2="{WIDTH - RIGHT}" y2="{y(value)}" '
            f'stroke="#e0e0e0"/><text x="{LEFT - 6}" y="{y(value) + 4}" class="axis" '
            f'text-anchor="end">{value:g}</text>'
        )
    for tick in _date_ticks(first, last):
        at = scale(tick.timestamp())
        out.append(
            f'<text x="{at}" y="{HEIGHT - BOTTOM + 18}" class="axis" text-anchor="middle">'
            f"{tick.date().isoformat()}</text>"
        )
    return out


def _date_ticks(first: datetime, last: datetime, count: int = 4) -> list[datetime]:
    step = (last - first) / count
    return [first + step * i for i in range(count + 1)]


def _threshold_lines(thresholds: Sequence[Threshold], y: _Scale) -> list[str]:
    out: list[str] = []
    used: list[float] = []
    for t in sorted(thresholds, key=lambda t: -t.percent):
        colour = STYLES[t.series % len(STYLES)][0]
        at = y(t.percent)
        label_at = max([at + 4, *(u + 14 for u in used if abs(u - at - 4) < 14)])
        used.append(label_at)
        out.append(
            f'<line x1="{LEFT}" y1="{at}" x2="{WIDTH - RIGHT}" y2="{at}" stroke="{colour}" '
            f'stroke-width="1.5" stroke-dasharray="3 5"/>'
            f'<text x="{WIDTH - RIGHT + 6}" y="{label_at}" class="threshold" fill="{colour}">'
            f"{escape(_short(t.label))}</text>"
        )
    return out


def _short(label: str, limit: int = 38) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _line(index: int, series: Series, x: tuple[_Scale, datetime, datetime], y: _Scale) -> str:
    colour, dash, marker = STYLES[index % len(STYLES)]
    scale = x[0]
    xy = [(scale(p.at.timestamp()), y(p.percent), p) for p in series.points]
    path = " ".join(f"{px},{py}" for px, py, _ in xy)
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    marks = "".join(
        f"<g>{_marker(marker, px, py, colour)}<title>{escape(series.label)} "
        f"{p.percent:.1f}% on {p.at.date().isoformat()}</title></g>"
        for px, py, p in xy
    )
    return (
        f'<g class="series"><polyline points="{path}" fill="none" stroke="{colour}" '
        f'stroke-width="2.5"{dashed}/>{marks}</g>'
    )


def _marker(shape: str, px: float, py: float, colour: str) -> str:
    if shape == "square":
        return f'<rect x="{px - 4.5}" y="{py - 4.5}" width="9" height="9" fill="{colour}"/>'
    if shape == "diamond":
        d = 5.5
        return (
            f'<polygon points="{px},{py - d} {px + d},{py} {px},{py + d} {px - d},{py}" '
            f'fill="{colour}"/>'
        )
    return f'<circle cx="{px}" cy="{py}" r="{round(math.sqrt(20), 1)}" fill="{colour}"/>'
