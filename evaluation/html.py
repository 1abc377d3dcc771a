"""The report as one offline HTML file: figures as inline SVG, numbers from the JSON.

Everything is drawn from the evaluation JSON (``report.evaluate``), so the
report can never show a number the JSON lacks. No script, no web font, no
remote asset: it opens from a USB stick on a ward PC. Values computed from
text are escaped (a site name or group label cannot inject markup).
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server; set before pyplot is imported
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

plt.rcParams["svg.hashsalt"] = "ehrbridge"  # stable ids: the same evaluation, the same file
plt.rcParams["svg.fonttype"] = "none"  # text stays text (smaller, searchable)


def _svg(draw: Callable[[Axes], None], size: tuple[float, float] = (5.0, 3.6)) -> str:
    fig: Figure = plt.figure(figsize=size)
    try:
        draw(fig.add_subplot())
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype inside HTML


def calibration_figure(cal: Mapping[str, Any], title: str) -> str:
    def draw(ax: Axes) -> None:
        curve = cal["curve"]
        x = [b["mean_risk"] for b in curve]
        y = [b["observed"]["value"] for b in curve]
        lo = [b["observed"]["value"] - b["observed"]["low"] for b in curve]
        hi = [b["observed"]["high"] - b["observed"]["value"] for b in curve]
        top = max([0.05, *x, *(b["observed"]["high"] for b in curve)])
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect")
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o-", capsize=3, label="observed (95% CI)")
        ax.set(xlabel="mean predicted risk", ylabel="observed event rate", title=title)
        ax.legend(loc="upper left", fontsize=8)

    return _svg(draw)


def roc_figure(roc: Mapping[str, Any], auroc: Mapping[str, Any], title: str) -> str:
    def draw(ax: Axes) -> None:
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        if roc["fpr"]:
            label = f"AUROC {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}]"
            ax.step(roc["fpr"], roc["tpr"], where="post", label=label)
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "not enough outcomes yet", ha="center")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)

    return _svg(draw)


def distribution_figure(dist: Mapping[str, Any], title: str) -> str:
    def draw(ax: Axes) -> None:
        months = list(dist)
        x = range(len(months))  # positions, labelled below: months are categories
        for key, style in (("p50", "-"), ("p25", ":"), ("p75", ":"), ("p90", "--")):
            ax.plot(x, [dist[m][key] for m in months], style, marker=".", label=key)
        ax.set(xlabel="month", ylabel="predicted risk", title=title)
        _thin_ticks(ax, months)
        ax.legend(fontsize=8)

    return _svg(draw)


def flags_figure(flags: Mapping[str, Mapping[str, int]], title: str) -> str:
    def draw(ax: Axes) -> None:
        every_day = sorted({d for days in flags.values() for d in days})
        position = {d: i for i, d in enumerate(every_day)}
        for band, days in flags.items():
            x = [position[d] for d in days]
            ax.plot(x, list(days.values()), marker=".", linewidth=1, label=band)
        ax.set(xlabel="day", ylabel="flags per day", title=title)
        _thin_ticks(ax, every_day)
        ax.legend(fontsize=8)

    return _svg(draw)


def drift_figure(drift: Mapping[str, Any]) -> str:
    """PSI of each input per month against the reference month, with the 0.1/0.2 guides."""
    months = sorted({m for series in drift["psi"].values() for m in series})

    def draw(ax: Axes) -> None:
        x = range(len(months))
        for name, series in drift["psi"].items():
            ax.plot(x, [series.get(m) for m in months], marker=".", linewidth=1, label=name)
        ax.axhline(drift["warn"], color="orange", linestyle=":", linewidth=1)
        ax.axhline(drift["alarm"], color="red", linestyle=":", linewidth=1)
        ax.set(xlabel="month", ylabel="PSI", title=f"PSI against {drift['reference_month']}")
        _thin_ticks(ax, months)
        ax.legend(fontsize=7)

    return _svg(draw)


def forest_figure(audit: Mapping[str, Any], title: str) -> str:
    """Observed/expected per subgroup with its 95 % CI; hidden groups are not drawn."""
    rows = [
        (f"{attr}={g['group']}", g["oe"])
        for attr, groups in audit.items()
        for g in groups
        if not g["hidden"] and g["oe"] and g["oe"]["value"] is not None
    ]

    def draw(ax: Axes) -> None:
        for i, (_label, oe) in enumerate(rows):
            ax.errorbar(
                [oe["value"]],
                [i],
                xerr=[[oe["value"] - oe["low"]], [oe["high"] - oe["value"]]],
                fmt="s",
                capsize=3,
                color="C0",
            )
        ax.set_yticks(range(len(rows)), [r[0] for r in rows])
        ax.axvline(1.0, color="grey", linewidth=1)
        ax.axvspan(0.8, 1.25, color="green", alpha=0.08)
        ax.set(xlabel="observed / expected events (95% CI)", title=title)

    return _svg(draw, (5.0, 1.2 + 0.35 * max(len(rows), 1)))


def _thin_ticks(ax: Axes, labels: list[str]) -> None:
    step = max(1, len(labels) // 8)
    ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=45, ha="right", fontsize=7)


# --------------------------------------------------------------------------- the page

_STYLE = """body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:right}th{background:#f4f4f4}.finding{background:#fff3cd;padding:.3em .6em;margin:.2em 0}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs svg{max-width:34em;height:auto}"""


def render(evaluation: Mapping[str, Any]) -> str:
    e = html.escape
    head = (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>ehrbridge evaluation: "
        f"{e(evaluation['model'])} at {e(evaluation['site'])}</title><style>{_STYLE}</style>"
    )
    parts = [
        head,
        f"<h1>{e(evaluation['model'])} at {e(evaluation['site'])}</h1>",
        f"<p>Outcome: {e(evaluation['outcome']['description'])}. As of "
        f"{e(evaluation['as_of'])}; {evaluation['predictions']} predictions, "
        f"{evaluation['patients']} patients; metrics over {e(evaluation['unit'])}.</p>",
        _findings(evaluation["findings"]),
        _promotion(evaluation.get("promotion")),
        _coverage(evaluation.get("coverage")),
    ]
    drift = evaluation.get("drift")
    if drift and any(drift["psi"].get(name) for name in drift["psi"]):
        parts.append(f"<h2>Drift</h2><div class=figs>{drift_figure(drift)}</div>")
    for horizon, result in evaluation["horizons"].items():
        parts.append(_horizon(horizon, result))
    parts.append("</html>")
    return "\n".join(parts)


def _findings(items: list[Mapping[str, str]]) -> str:
    if not items:
        return "<h2>Findings</h2><p>No finding: nothing outside its range.</p>"
    rows = "".join(
        f"<div class=finding>{html.escape(f['horizon'])}: {html.escape(f['text'])}</div>"
        for f in items
    )
    return f"<h2>Findings</h2>{rows}"


def _promotion(promotion: Mapping[str, Any] | None) -> str:
    if not promotion:
        return ""
    rows = [[v["criterion"], v["status"], v["evidence"]] for v in promotion["criteria"]]
    title = f"<h2>Promotion criteria: {html.escape(promotion['overall'])}</h2>"
    return title + _table(["criterion", "verdict", "evidence"], rows)


def _coverage(cov: Mapping[str, Any] | None) -> str:
    if not cov:
        return ""
    share = cov["share_scored"]
    reasons = "".join(
        f"<tr><td style=text-align:left>{html.escape(k)}</td><td>{v}</td></tr>"
        for k, v in cov["not_scored_by_reason"].items()
    )
    shown = f"{share:.1%}" if share is not None else "n/a"
    return (
        f"<h2>Coverage</h2><p>{cov['patients_scored']} of {cov['patients_seen']} patients "
        f"scored ({shown}).</p><table><tr><th>not scored because</th><th>patients</th></tr>"
        f"{reasons}</table>"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(est: Mapping[str, Any]) -> str:
    if est.get("value") is None:
        return f"n/a ({est.get('reason', '')})"
    return f"{est['value']:.3f} [{_num(est['low'])}, {_num(est['high'])}]"


def _horizon(horizon: str, r: Mapping[str, Any]) -> str:
    cal, disc = r["calibration"], r["discrimination"]
    link = _table(list(r["linkage"]), [[str(v) for v in r["linkage"].values()]])
    summary = _table(
        ["metric", "value [95% CI]"],
        [
            ["AUROC", _ci(disc["auroc"])],
            ["calibration-in-the-large", _ci(cal["calibration_in_the_large"])],
            ["calibration slope", _ci(cal["calibration_slope"])],
            ["observed / expected", _ci(cal["observed_expected"])],
            ["Brier score", _num(cal["brier"], 4)],
            ["ECE (10 bins)", _num(cal["ece_10_bins"], 4)],
        ],
    )
    bands = _table(
        ["band", "flags/day", "flagged pts/1000", "PPV", "sensitivity", "NNE"],
        [
            [
                t["band"],
                _num(t["flags_per_day"], 2),
                _num(t["flagged_patients_per_1000"], 1),
                _ci(t["ppv"]),
                _ci(t["sensitivity"]),
                _num(t["nne"], 1),
            ]
            for t in r["thresholds"]
        ],
    )
    lf = r["label_free"]
    figs = [
        calibration_figure(cal, f"Calibration, {horizon}"),
        roc_figure(disc["roc"], disc["auroc"], f"ROC, {horizon}"),
    ]
    if lf["score_distribution_by_month"]:
        figs.append(
            distribution_figure(
                lf["score_distribution_by_month"], f"Predicted {horizon} risk by month"
            )
        )
    if lf["flags_by_day"]:
        figs.append(flags_figure(lf["flags_by_day"], f"Flags per day, {horizon}"))
    for name, audit in r["subgroups"].items():
        figs.append(forest_figure(audit, f"Subgroups, {name}"))
    return (
        f"<h2>Horizon {html.escape(horizon)}</h2><h3>Linkage</h3>{link}"
        f"<h3>Discrimination and calibration</h3>{summary}<h3>At each band</h3>{bands}"
        f"{_subgroup_tables(r['subgroups'])}<div class=figs>{''.join(figs)}</div>"
    )


def _subgroup_tables(subgroups: Mapping[str, Any]) -> str:
    out = []
    for name, audit in subgroups.items():
        rows = []
        for attribute, groups in audit.items():
            for g in groups:
                ratios = g["ratios"]
                rows.append(
                    [
                        f"{attribute}={g['group']}",
                        str(g["patients"]),
                        "reference" if g["reference"] else "",
                        *(
                            ("hidden (<10)",) * 4
                            if g["hidden"]
                            else (
                                _num(ratios.get(k))
                                for k in ("flag_rate", "sensitivity", "ppv", "observed_expected")
                            )
                        ),
                        ", ".join(g["outside_fair_range"]),
                    ]
                )
        out.append(
            f"<h3>Subgroups at {html.escape(name)} (ratio to reference)</h3>"
            + _table(
                ["group", "patients", "", "flag rate", "sensitivity", "PPV", "O/E", "outside"], rows
            )
        )
    return "".join(out)
