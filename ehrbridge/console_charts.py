"""Inline SVG charts for the console's models page, drawn on the server (no script, no CDN).

Each function takes plain numbers and returns markup the template drops in as is
(``Markup``): every text inside is escaped here. A chart names what it shows in
``aria-label`` and each point carries a ``<title>``, so a screen reader and a
hover both give the number, not only the shape.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Mapping, Sequence

from markupsafe import Markup

WIDTH, HEIGHT = 480, 180
PAD_LEFT, PAD_BOTTOM, PAD_TOP, PAD_RIGHT = 44, 26, 10, 10
# Colour-blind-safe (Okabe-Ito), each at least 3:1 against white (WCAG 1.4.11).
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#7a6a00", "#56565f", "#0b5394", "#8c2d04")
INK, GRID, WARN, ALARM = "#1b1f24", "#d0d7de", "#b26a00", "#a4161a"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _frame(label: str, body: str, legend: str = "") -> Markup:
    return Markup(
        f'<figure class="chart"><svg role="img" aria-label="{_esc(label)}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" preserveAspectRatio="xMidYMid meet">'
        f"{body}</svg>{legend}</figure>"
    )


def _x(i: float, n: float) -> float:
    span = WIDTH - PAD_LEFT - PAD_RIGHT
    return PAD_LEFT + (span * i / n if n else span / 2)


def _y(value: float, top: float) -> float:
    span = HEIGHT - PAD_TOP - PAD_BOTTOM
    return HEIGHT - PAD_BOTTOM - span * min(max(value / top, 0.0), 1.0) if top else HEIGHT


def _axes(top: float, fmt: str, first: str, last: str) -> str:
    """The y axis at 0, half and top; the first and last x label."""
    parts = [
        f'<line x1="{PAD_LEFT}" y1="{HEIGHT - PAD_BOTTOM}" x2="{WIDTH - PAD_RIGHT}" '
        f'y2="{HEIGHT - PAD_BOTTOM}" stroke="{INK}"/>'
    ]
    for value in (0.0, top / 2, top):
        y = _y(value, top)
        parts.append(
            f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH - PAD_RIGHT}" y2="{y:.1f}" '
            f'stroke="{GRID}"/><text x="{PAD_LEFT - 4}" y="{y + 4:.1f}" font-size="11" '
            f'text-anchor="end" fill="{INK}">{format(value, fmt)}</text>'
        )
    base = HEIGHT - 8
    parts.append(
        f'<text x="{PAD_LEFT}" y="{base}" font-size="11" fill="{INK}">{_esc(first)}</text>'
    )
    parts.append(
        f'<text x="{WIDTH - PAD_RIGHT}" y="{base}" font-size="11" text-anchor="end" '
        f'fill="{INK}">{_esc(last)}</text>'
    )
    return "".join(parts)


def _legend(names: Sequence[str]) -> str:
    items = "".join(
        f'<li><span class="swatch swatch-{i % len(PALETTE)}"></span>{_esc(n)}</li>'
        for i, n in enumerate(names)
    )
    return f'<ul class="legend">{items}</ul>'


def _empty(label: str, why: str) -> Markup:
    return Markup(f'<p class="note chart-empty" aria-label="{_esc(label)}">{_esc(why)}</p>')


def lines_over_days(
    label: str,
    days: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    fmt: str = ".2f",
    floor_top: float = 0.0,
    limits: Sequence[tuple[float, str]] = (),
) -> Markup:
    """One line per series over ``days``; a gap where a day has no value (None).

    ``limits``: horizontal reference lines (PSI 0.1 and 0.2), drawn dashed with their value.
    """
    values = [v for s in series.values() for v in s if v is not None]
    if not days or not values:
        return _empty(label, "No data yet.")
    top = max(*values, floor_top, *(value for value, _ in limits), 1e-9)
    n = max(len(days) - 1, 0)
    parts = [_axes(top, fmt, days[0], days[-1])]
    for value, colour in limits:
        y = _y(value, top)
        parts.append(
            f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH - PAD_RIGHT}" y2="{y:.1f}" '
            f'stroke="{colour}" stroke-dasharray="5 4"><title>{value:g}</title></line>'
        )
    for i, (name, points) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        parts.append(_polyline(name, points, days=days, n=n, top=top, colour=colour, fmt=fmt))
    return _frame(label, "".join(parts), _legend(list(series)))


def _polyline(
    name: str,
    points: Sequence[float | None],
    *,
    days: Sequence[str],
    n: int,
    top: float,
    colour: str,
    fmt: str,
) -> str:
    runs: list[list[str]] = [[]]
    dots = []
    for i, value in enumerate(points):
        if value is None:
            runs.append([])
            continue
        x, y = _x(i, n), _y(value, top)
        runs[-1].append(f"{x:.1f},{y:.1f}")
        dots.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}">'
            f"<title>{_esc(name)} {_esc(days[i])}: {format(value, fmt)}</title></circle>"
        )
    lines = "".join(
        f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(run)}"/>'
        for run in runs
        if len(run) > 1
    )
    return lines + "".join(dots)


def bars_over_days(label: str, days: Sequence[str], counts: Sequence[float]) -> Markup:
    """One bar per day (flags per day)."""
    if not days:
        return _empty(label, "No predictions yet.")
    top = max(*counts, 1.0)
    slot = (WIDTH - PAD_LEFT - PAD_RIGHT) / len(days)
    parts = [_axes(top, ".0f", days[0], days[-1])]
    for i, (day, count) in enumerate(zip(days, counts, strict=True)):
        y = _y(count, top)
        parts.append(
            f'<rect x="{PAD_LEFT + i * slot + slot * 0.1:.1f}" y="{y:.1f}" '
            f'width="{max(slot * 0.8, 1):.1f}" height="{HEIGHT - PAD_BOTTOM - y:.1f}" '
            f'fill="{PALETTE[0]}"><title>{_esc(day)}: {count:g}</title></rect>'
        )
    return _frame(label, "".join(parts))


def histogram(
    label: str, edges: Sequence[float], current: Sequence[int], reference: Sequence[int]
) -> Markup:
    """Bin shares of ``current`` as bars, the reference's as a dark tick on each bin."""
    total, ref_total = sum(current), sum(reference)
    if not total:
        return _empty(label, "No scores yet.")
    shares = [c / total for c in current]
    ref_shares = [r / ref_total for r in reference] if ref_total else []
    top = max(*shares, *ref_shares, 0.01)
    names = bin_names(edges)
    slot = (WIDTH - PAD_LEFT - PAD_RIGHT) / len(shares)
    parts = [_axes(top, ".0%", names[0], names[-1])]
    for i, share in enumerate(shares):
        x, y = PAD_LEFT + i * slot, _y(share, top)
        parts.append(
            f'<rect x="{x + slot * 0.1:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{HEIGHT - PAD_BOTTOM - y:.1f}" fill="{PALETTE[0]}">'
            f"<title>{_esc(names[i])}: {share:.1%} ({current[i]})</title></rect>"
        )
        if ref_shares:
            ry = _y(ref_shares[i], top)
            parts.append(
                f'<line x1="{x + slot * 0.05:.1f}" y1="{ry:.1f}" x2="{x + slot * 0.95:.1f}" '
                f'y2="{ry:.1f}" stroke="{INK}" stroke-width="3">'
                f"<title>reference {_esc(names[i])}: {ref_shares[i]:.1%}</title></line>"
            )
    return _frame(label, "".join(parts))


def bin_names(edges: Sequence[float]) -> list[str]:
    """``< e0``, ``e0–e1``, ..., ``≥ eN``: the fixed bins of pipelines/drift.py."""
    names = [f"< {edges[0]:g}"]
    names += [f"{a:g}–{b:g}" for a, b in itertools.pairwise(edges)]
    return [*names, f"≥ {edges[-1]:g}"]


def unit_square(
    label: str,
    points: Sequence[tuple[float, float]],
    *,
    whiskers: Sequence[tuple[float, float]] = (),
    joined: bool = False,
    x_name: str,
    y_name: str,
) -> Markup:
    """Points on [0,1]x[0,1] with the diagonal (perfect calibration, or chance for ROC).

    ``whiskers``: each point's interval on y (the observed rate's Wilson 95 % CI);
    ``joined``: a line through the points (the ROC curve).
    """
    if not points:
        return _empty(label, "Not enough outcomes yet.")
    size = HEIGHT - PAD_TOP - PAD_BOTTOM
    left = PAD_LEFT

    def at(x: float, y: float) -> tuple[float, float]:
        return left + size * x, HEIGHT - PAD_BOTTOM - size * y

    (x0, y0), (x1, y1) = at(0, 0), at(1, 1)
    parts = [
        f'<rect x="{x0}" y="{y1}" width="{size}" height="{size}" fill="none" stroke="{INK}"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="{GRID}" stroke-dasharray="4 3"/>',
        f'<text x="{x0}" y="{HEIGHT - 8}" font-size="11" fill="{INK}">{_esc(x_name)} 0–1</text>',
        f'<text x="{x1 + 6}" y="{y1 + 10}" font-size="11" fill="{INK}">{_esc(y_name)} 1</text>',
        f'<text x="{x1 + 6}" y="{y0}" font-size="11" fill="{INK}">0</text>',
    ]
    for (x, _), (low, high) in zip(points, whiskers, strict=False):
        (wx, wy0), (_, wy1) = at(x, low), at(x, high)
        parts.append(
            f'<line x1="{wx:.1f}" y1="{wy0:.1f}" x2="{wx:.1f}" y2="{wy1:.1f}" stroke="{INK}"/>'
        )
    if joined:
        path = " ".join("{:.1f},{:.1f}".format(*at(x, y)) for x, y in points)
        parts.append(
            f'<polyline fill="none" stroke="{PALETTE[0]}" stroke-width="2" points="{path}"/>'
        )
    else:
        for x, y in points:
            cx, cy = at(x, y)
            parts.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{PALETTE[1]}">'
                f"<title>{_esc(x_name)} {x:.3f}, {_esc(y_name)} {y:.3f}</title></circle>"
            )
    return _frame(label, "".join(parts))
