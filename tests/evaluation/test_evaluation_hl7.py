"""Outcome events from HL7v2: DG1, PR1, PID-29 and OBX, read by the site's identifier rule."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import yaml

from ehrbridge.cli import main
from ehrbridge.config import load_site_config
from ehrbridge.evaluation.outcomes import EventKind, OutcomeSpec, Recogniser, builtin_outcome
from ehrbridge.hl7_outcomes import Hl7OutcomeReader
from ehrbridge.pipelines.facts import FactRules

REPO = Path(__file__).resolve().parents[2]


def pid(mrn: str, death: str) -> str:
    fields = ["PID", "1", "", f"{mrn}^^^SANDBOX^MR", "", "Doe^Jo", "", "19600101", "F"]
    fields += [""] * (29 - len(fields)) + [death]  # PID-29 patient death date and time
    return "|".join(fields)


def msg(control: str, when: str, *segments: str, mrn: str = "MRN1", death: str = "") -> bytes:
    msh = f"MSH|^~\\&|ADT|H|EB|H|{when}||ADT^A08|{control}|P|2.5.1"
    lines = [msh, pid(mrn, death), *segments]
    return "\r".join(lines).encode()


def reader() -> Hl7OutcomeReader:
    spec = OutcomeSpec.model_validate(yaml.safe_load(builtin_outcome("kfre-4var").read_text()))
    config = load_site_config(REPO / "sandbox" / "site.yaml")
    return Hl7OutcomeReader(Recogniser.of(spec), FactRules(config.mapping))


def test_segments_become_events() -> None:
    r = reader()
    messages = [
        msg("A", "20240105120000+0000", "DG1|1||N18.6^End stage renal disease^I10||20240103"),
        msg("B", "20240210", "PR1|1||90935^Hemodialysis^C4||20240209083000+0000"),
        msg("C", "20240301", "DG1|1||E11.9^Diabetes^I10||20240301"),  # not an outcome code
        msg(
            "D",
            "20240401",
            "OBR|1|||24362-6^Renal panel^LN|||20240331",
            "OBX|1|NM|33914-3^eGFR^LN||12.5|mL/min/{1.73_m2}|||||F",
            "OBX|2|NM|33914-3^eGFR^LN||<15|mL/min/{1.73_m2}|||||F",  # not a measured value
            "OBX|3|NM|33914-3^eGFR^LN||9|mL/min/{1.73_m2}|||||P",
        ),  # preliminary
        msg("E", "20240501", death="20240430"),
        b"MSH|garbage",
    ]
    events = list(r.events(messages))
    kinds = [
        (e.kind, e.at.date().isoformat(), e.value, e.code)
        for e in events
        if e.kind is not EventKind.CONTACT
    ]
    assert kinds == [
        (EventKind.OUTCOME, "2024-01-03", None, "ICD-10|N18.6"),
        (EventKind.OUTCOME, "2024-02-09", None, "CPT|90935"),
        (EventKind.LAB, "2024-03-31", 12.5, ""),
        (EventKind.DEATH, "2024-04-30", None, ""),
    ]
    assert {e.patient_id for e in events} == {"MRN1"}
    assert sum(e.kind is EventKind.CONTACT for e in events) == 5
    assert r.unreadable == 1


def test_evaluate_links_to_hl7v2_outcomes(tmp_path: Path) -> None:
    from test_evaluate_cli import AS_OF, Patient, site_file, store_predictions

    (tmp_path / "data").mkdir(mode=0o700)
    anchor = datetime(2020, 1, 1, 9, tzinfo=UTC)
    people = [
        Patient("MRN1", anchor, 0.3, 0.5, False, 60.0),
        Patient("MRN2", anchor, 0.1, 0.2, True, 70.0),
    ]
    store_predictions(tmp_path / "data", people)
    batch = b"\n".join(
        [
            msg("A", "20210601", "DG1|1||Z99.2^Dialysis^I10||20210601"),  # MRN1: event, 2y
            msg("B", "20250601", mrn="MRN2"),  # MRN2 seen after 5y: no event
        ]
    )
    (tmp_path / "adt.hl7").write_bytes(batch)
    out = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--site",
                str(site_file(tmp_path)),
                "--model",
                "kfre-4var",
                "--out",
                str(out),
                "--events",
                str(tmp_path / "adt.hl7"),
                "--as-of",
                AS_OF.isoformat(),
            ]
        )
        == 0
    )
    linkage = orjson.loads((out / "evaluation.json").read_bytes())["horizons"]
    assert linkage["2y"]["linkage"] == pytest.approx(
        {"event": 1, "no_event": 1, "censored": 0, "pending": 0, "prevalent": 0}
    )
