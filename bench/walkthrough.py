"""The README's evaluation walk-through, run on the sandbox's synthetic EHR: its figures.

    scripts/walkthrough-figures [OUT]      # default: docs/walkthrough/

1. *History*: the synthetic EHR's registrations and lab visits before
   ``SPLIT`` (an HL7v2 batch, one message per line), replayed by
   ``ehrbridge backfill`` through the sandbox model server.
2. *Follow-up*: what happened to each patient after ``SPLIT``, as HL7v2 the
   outcome reader takes (``ehrbridge/hl7_outcomes.py``): a renal panel every
   4-8 months while the patient's eGFR trajectory stays over 15; when it
   falls below, an ADT^A08 with DG1 N18.6 (end-stage kidney disease, the
   outcome code) and the labs stop; a few patients die (ADT^A08 with PID-29
   and PID-30), which censors them.
3. ``ehrbridge evaluate --source backfill --events follow-up.hl7`` as of
   ``AS_OF``, and each figure of its report saved as an SVG file.

Nothing here reads ../shared: the cohort is the sandbox's own, from a seed,
so the figures are the same on every machine. Outcomes come from the
synthetic trajectories, not from the model's risks, so the figures show how
the sandbox's fictional population fares under KFRE: an illustration of the
report, not evidence about KFRE.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

SPLIT = datetime(2019, 1, 1, 9, tzinfo=UTC)  # history before it, follow-up after it
AS_OF = datetime(2025, 6, 1, tzinfo=UTC)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "walkthrough"
DEATHS_PER_VISIT = 0.012


def follow_up(ehr: Any, seed: int) -> list[bytes]:
    """Each patient's labs, outcome and death after SPLIT, as HL7v2 messages."""
    rng = random.Random(seed)
    messages: list[bytes] = []
    for patient in ehr.patients:
        at = SPLIT + timedelta(days=rng.randint(30, 200))
        while at < AS_OF:
            if patient.true_egfr(at) < 15:
                messages.append(_with_dg1(ehr.adt(patient, "A08", at), at))
                break
            if rng.random() < DEATHS_PER_VISIT:
                messages.append(_with_death(ehr.adt(patient, "A08", at), at))
                break
            messages.append(ehr.oru(patient, at, panel="renal"))
            at += timedelta(days=rng.randint(120, 240))
    return messages


def _ts(at: datetime) -> str:
    return at.strftime("%Y%m%d%H%M")


def _with_dg1(adt: bytes, at: datetime) -> bytes:
    # DG1-3 diagnosis code (CWE, coding system I10), DG1-5 diagnosis date/time, DG1-6 type F(inal)
    return adt.rstrip(b"\r") + f"\rDG1|1||N18.6^End stage renal disease^I10||{_ts(at)}|F\r".encode()


def _with_death(adt: bytes, at: datetime) -> bytes:
    segments = adt.rstrip(b"\r").split(b"\r")
    for i, segment in enumerate(segments):
        if segment.startswith(b"PID|"):
            fields = segment.split(b"|")
            fields += [b""] * (31 - len(fields))
            fields[29], fields[30] = _ts(at).encode(), b"Y"  # PID-29 death time, PID-30 indicator
            segments[i] = b"|".join(fields)
    return b"\r".join(segments) + b"\r"


def run(out: Path, patients: int, seed: int, work: Path) -> dict[str, Any]:
    """Backfill, evaluate, and write the report's figures to ``out``; the evaluation JSON."""
    import orjson

    from ehrbridge.backfill import BATCH, MODEL_BATCH, run_backfill
    from ehrbridge.bench.common import free_port
    from ehrbridge.bench.services import Services
    from ehrbridge.evaluate import run_evaluate
    from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

    ehr = SyntheticEhr(seed=seed, patients=patients, start=SPLIT)
    history, events = work / "history.hl7", work / "follow-up.hl7"
    history.write_bytes(b"\n".join(m for _, m in ehr.stream(start=SPLIT, visits_per_patient=4)))
    events.write_bytes(b"\n".join([history.read_bytes(), *follow_up(ehr, seed)]))
    with Services(work / "services") as services:
        services.start_servers("model")
        # No FHIR server: a port nothing listens on, since backfill writes nothing back.
        services.ports["fhir"] = free_port()
        site = services.write_site_config(updates={"mode": "shadow"})
        backfill = argparse.Namespace(
            site=site, source=history, batch=BATCH, model_batch=MODEL_BATCH, max_inputs=None
        )
        if run_backfill(backfill) != 0:
            raise RuntimeError("backfill failed")
        report = work / "report"
        evaluate = argparse.Namespace(
            site=site, model="kfre-4var", out=report, events=events, source="backfill",
            as_of=AS_OF,
        )  # fmt: skip
        if run_evaluate(evaluate) != 0:
            raise RuntimeError("evaluate failed")
    evaluation: dict[str, Any] = orjson.loads((report / "evaluation.json").read_bytes())
    write_figures(evaluation, out)
    return evaluation


def write_figures(evaluation: dict[str, Any], out: Path) -> list[Path]:
    from ehrbridge.evaluation import html

    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    for horizon, r in evaluation["horizons"].items():
        cal, disc, lf = r["calibration"], r["discrimination"], r["label_free"]
        figures[f"calibration-{horizon}"] = html.calibration_figure(cal, f"Calibration, {horizon}")
        figures[f"roc-{horizon}"] = html.roc_figure(disc["roc"], disc["auroc"], f"ROC, {horizon}")
        if lf["score_distribution_by_month"]:
            figures[f"risk-by-month-{horizon}"] = html.distribution_figure(
                lf["score_distribution_by_month"], f"Predicted {horizon} risk by month"
            )
        if lf["flags_by_day"]:
            figures[f"flags-per-day-{horizon}"] = html.flags_figure(
                lf["flags_by_day"], f"Flags per day, {horizon}"
            )
        for name, audit in r["subgroups"].items():
            figures[f"subgroups-{name}"] = html.forest_figure(
                audit, f"Subgroups, {name}, {horizon}"
            )
    drift = evaluation.get("drift")
    if drift and any(drift["psi"].get(name) for name in drift["psi"]):
        figures["drift"] = html.drift_figure(drift)
    written = []
    for name, svg in figures.items():
        path = out / f"{_slug(name)}.svg"
        path.write_text(svg)
        path.chmod(0o644)  # documentation, not patient data
        written.append(path)
    return written


def _slug(name: str) -> str:
    """A file name from a figure's name ("subgroups-2y >= 0.1 (H)": "subgroups-2y-0.1-h")."""
    kept = "".join(c if c.isalnum() or c == "." else " " for c in name.lower())
    return "-".join(kept.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=DOCS)
    parser.add_argument("--patients", type=int, default=600)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ehrbridge-walkthrough-") as work:
        evaluation = run(args.out, args.patients, args.seed, Path(work))
    for horizon, r in evaluation["horizons"].items():
        auroc = r["discrimination"]["auroc"].get("value")
        print(f"{horizon}: linkage {r['linkage']}, AUROC {auroc}", file=sys.stderr)
    print(f"figures in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
