"""The sandbox synthetic EHR: structure (proved with hl7apy), determinism, and clinical sense.

Messages are read back with a deliberately naive ER7 split written here (the
generator never sees it) and, for samples, with hl7apy's strict parser, which
builds the ORU_R01 / ADT_A01 group tree of HL7 v2.5.1.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from ehrbridge.mappings.ckd_epi import egfr_ckd_epi_2021
from ehrbridge.sandbox.synthetic_ehr import (
    SyntheticEhr,
    creatinine_for_egfr,
    escape_text,
    format_number,
    hl7_timestamp,
)

EGFR_CODES = {"98979-8", "62238-1", "48642-3"}
UACR_CODES = {"9318-7", "14959-1", "32294-1"}
START = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)

Segment = list[str]


# -- a naive reader, independent of the generator ------------------------------------------


def split(message: bytes) -> list[Segment]:
    return [s.split("|") for s in message.decode("ascii").split("\r") if s]


def field(segment: Segment, number: int) -> str:
    # MSH-1 is the field separator itself, so MSH fields sit one place to the left.
    index = number - 1 if segment[0] == "MSH" else number
    return segment[index] if index < len(segment) else ""


def component(segment: Segment, number: int, comp: int, rep: int = 1) -> str:
    parts = field(segment, number).split("~")[rep - 1].split("^")
    return parts[comp - 1] if comp <= len(parts) else ""


def first(segments: list[Segment], name: str) -> Segment:
    return next(s for s in segments if s[0] == name)


def message_type(segments: list[Segment]) -> str:
    msh = first(segments, "MSH")
    return f"{component(msh, 9, 1)}^{component(msh, 9, 2)}"


def orders(segments: list[Segment]) -> list[tuple[Segment, list[Segment]]]:
    """(OBR, its OBX segments) in message order."""
    groups: list[tuple[Segment, list[Segment]]] = []
    for segment in segments:
        if segment[0] == "OBR":
            groups.append((segment, []))
        elif segment[0] == "OBX":
            groups[-1][1].append(segment)
    return groups


def dtm(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%d%H%M%S%z")


def mrn_of(segments: list[Segment]) -> str:
    pid = first(segments, "PID")
    for rep in range(1, len(field(pid, 3).split("~")) + 1):
        if component(pid, 3, 4, rep) == "SANDBOX":
            return component(pid, 3, 1, rep)
    raise AssertionError("no SANDBOX identifier in PID-3")


def creatinine_mg_dl(obx: Segment) -> float:
    unit = component(obx, 6, 1)
    value = float(field(obx, 5))
    return {"mg/dL": value, "umol/L": value / 88.4}[unit]


def nhs_check_digit_ok(number: str) -> bool:
    digits = [int(d) for d in number]
    check = 11 - sum(d * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True)) % 11
    return (0 if check == 11 else check) == digits[9]


@pytest.fixture(scope="module")
def ehr() -> SyntheticEhr:
    return SyntheticEhr(seed=7, patients=300, start=START)


@pytest.fixture(scope="module")
def stream(ehr: SyntheticEhr) -> list[tuple[datetime, bytes]]:
    return list(ehr.stream(visits_per_patient=4))


@pytest.fixture(scope="module")
def parsed(stream: list[tuple[datetime, bytes]]) -> list[list[Segment]]:
    return [split(message) for _, message in stream]


def orus(parsed: list[list[Segment]]) -> list[list[Segment]]:
    return [m for m in parsed if message_type(m) == "ORU^R01"]


# -- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_the_same_patients_and_bytes() -> None:
    one, two = SyntheticEhr(seed=3, patients=25), SyntheticEhr(seed=3, patients=25)
    assert one.patients == two.patients
    assert list(one.stream()) == list(two.stream())


def test_another_seed_gives_other_patients_and_messages() -> None:
    one, two = SyntheticEhr(seed=3, patients=25), SyntheticEhr(seed=4, patients=25)
    assert [p.mrn for p in one.patients] != [p.mrn for p in two.patients]
    assert list(one.stream()) != list(two.stream())


def test_oru_values_do_not_depend_on_call_order() -> None:
    one, two = SyntheticEhr(seed=5, patients=3), SyntheticEhr(seed=5, patients=3)
    at = START - timedelta(days=10)
    one.oru(one.patients[1], at)  # an extra call first moves only the control-id counter
    a = one.oru(one.patients[0], at, control_id="X1")
    b = two.oru(two.patients[0], at, control_id="X1")
    assert a == b


def test_control_ids_are_unique(
    ehr: SyntheticEhr, parsed: list[list[Segment]], stream: list[tuple[datetime, bytes]]
) -> None:
    ids = [field(first(m, "MSH"), 10) for m in parsed]
    extra = [field(first(split(m), "MSH"), 10) for k, m in ehr.bad_messages().items()
             if m.startswith(b"MSH")]  # fmt: skip
    assert len(ids) == len(stream) > 1000
    assert len(set(ids + extra)) == len(ids) + len(extra)


# -- structure, proved by hl7apy ------------------------------------------------------------


def hl7apy_strict(message: bytes) -> object:
    tree = parse_message(
        message.decode("ascii"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    assert tree.validate() is True
    return tree


def names(element: object) -> list[str]:
    return [child.name for child in element.children]  # type: ignore[attr-defined]


def oru_samples(parsed: list[list[Segment]], stream: list[tuple[datetime, bytes]]) -> list[bytes]:
    """Plain ones plus every oddity: preliminary, corrected, comparators, urine-only, no eGFR."""
    picked: dict[str, bytes] = {}
    for segments, (_, message) in zip(parsed, stream, strict=True):
        if message_type(segments) != "ORU^R01":
            continue
        obxs = [s for s in segments if s[0] == "OBX"]
        codes = {component(s, 3, 1) for s in obxs}
        traits = {
            "plain": True,
            "prelim": field(obxs[0], 11) == "P",
            "corrected": any(field(s, 11) == "C" for s in obxs),
            "sn": any(field(s, 2) == "SN" for s in obxs),
            "nm_comparator": any(field(s, 5)[:1] in "<>" and field(s, 2) == "NM" for s in obxs),
            "urine_only": "2160-0" not in codes,
            "no_egfr": "2160-0" in codes and not codes & EGFR_CODES,
            "two_orders": len(orders(segments)) == 2,
        }
        for trait, present in traits.items():
            if present and trait not in picked:
                picked[trait] = message
    assert set(picked) == {"plain", "prelim", "corrected", "sn", "nm_comparator", "urine_only",
                           "no_egfr", "two_orders"}  # fmt: skip
    return list(picked.values())


def test_hl7apy_parses_oru_samples_strictly_into_oru_r01_groups(
    parsed: list[list[Segment]], stream: list[tuple[datetime, bytes]]
) -> None:
    for message in oru_samples(parsed, stream):
        tree = hl7apy_strict(message)
        ours = split(message)
        assert tree.name == "ORU_R01"  # type: ignore[attr-defined]
        assert names(tree) == ["MSH", "SFT", "ORU_R01_PATIENT_RESULT"]
        result = tree.children[2]  # type: ignore[attr-defined]
        assert names(result)[0] == "ORU_R01_PATIENT"
        # hl7apy names the standard's PATIENT_VISIT group ORU_R01_VISIT.
        assert names(result.children[0]) == ["PID", "ORU_R01_VISIT"]
        groups = result.children[1:]
        assert [g.name for g in groups] == ["ORU_R01_ORDER_OBSERVATION"] * len(orders(ours))
        for group, (_, obxs) in zip(groups, orders(ours), strict=True):
            children = names(group)
            assert children[:2] == ["ORC", "OBR"]
            assert children.count("ORU_R01_OBSERVATION") == len(obxs)
            assert children[-1] == "ORU_R01_SPECIMEN"
        msh = tree.children[0]  # type: ignore[attr-defined]
        assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
        assert msh.msh_12.to_er7() == "2.5.1"


def test_hl7apy_parses_adt_a01_a04_a08_strictly(
    parsed: list[list[Segment]], stream: list[tuple[datetime, bytes]]
) -> None:
    seen: dict[str, bytes] = {}
    for segments, (_, message) in zip(parsed, stream, strict=True):
        kind = message_type(segments)
        if kind.startswith("ADT^"):
            seen.setdefault(kind, message)
    assert set(seen) == {"ADT^A01", "ADT^A04", "ADT^A08"}
    for kind, message in seen.items():
        tree = hl7apy_strict(message)
        assert tree.name == "ADT_A01"  # type: ignore[attr-defined]
        assert names(tree) == ["MSH", "EVN", "PID", "PV1"]
        pid = tree.pid  # type: ignore[attr-defined]
        assert len(pid.pid_3) == 2
        authorities = {(rep.cx_4.to_er7(), rep.cx_5.to_er7()) for rep in pid.pid_3}
        assert authorities == {("SANDBOX", "MR"), ("NHS", "NH")}
        assert len(pid.pid_7.to_er7()) == 8  # YYYYMMDD
        assert pid.pid_8.to_er7() in {"M", "F", "U"}
        pv1 = tree.pv1  # type: ignore[attr-defined]
        if kind == "ADT^A01":
            assert pv1.pv1_2.to_er7() == "I"
            assert pv1.pv1_44.to_er7() == field(first(split(message), "MSH"), 7)
        else:
            assert pv1.pv1_2.to_er7() == "O"


def test_segments_end_with_carriage_returns_only(stream: list[tuple[datetime, bytes]]) -> None:
    for _, message in stream[:200]:
        assert message.endswith(b"\r")
        assert b"\n" not in message
        assert message.startswith(b"MSH|^~\\&|")


def test_free_text_is_escaped() -> None:
    assert escape_text("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"


def test_egfr_comment_escapes_ampersand_and_caret(parsed: list[list[Segment]]) -> None:
    notes = [s for m in orus(parsed) for s in m if s[0] == "NTE"]
    assert notes
    for nte in notes:
        text = field(nte, 3)
        assert "\\T\\" in text and "\\S\\" in text
        assert "&" not in text and "^" not in text


# -- identifiers ----------------------------------------------------------------------------


def test_pid3_carries_the_mrn_and_a_national_id(
    ehr: SyntheticEhr, parsed: list[list[Segment]]
) -> None:
    mrns = {p.mrn: p for p in ehr.patients}
    orders_seen = set()
    for segments in parsed:
        pid = first(segments, "PID")
        reps = field(pid, 3).split("~")
        assert len(reps) == 2
        by_authority = {component(pid, 3, 4, r): r for r in (1, 2)}
        assert set(by_authority) == {"SANDBOX", "NHS"}
        mrn_rep, nhs_rep = by_authority["SANDBOX"], by_authority["NHS"]
        assert component(pid, 3, 5, mrn_rep) == "MR"
        assert component(pid, 3, 5, nhs_rep) == "NH"
        patient = mrns[component(pid, 3, 1, mrn_rep)]
        national = component(pid, 3, 1, nhs_rep)
        assert national == patient.national_id
        assert national.startswith("999") and len(national) == 10  # NHS test range
        assert nhs_check_digit_ok(national)
        assert field(pid, 7) == patient.birth_date.strftime("%Y%m%d")
        assert field(pid, 8) == patient.sex
        orders_seen.add(mrn_rep)
    assert orders_seen == {1, 2}  # both repetition orders occur


def test_patients_are_adults_30_to_90_with_distinct_ids(ehr: SyntheticEhr) -> None:
    assert len(ehr.patients) == 300
    assert len({p.mrn for p in ehr.patients}) == 300
    assert len({p.national_id for p in ehr.patients}) == 300
    for patient in ehr.patients:
        assert patient.mrn.startswith("MRN") and patient.mrn[3:].isdigit()
        assert 30 <= patient.age_at(START) <= 90
        assert 0 <= patient.egfr_decline_per_year <= 6
    assert {p.sex for p in ehr.patients} == {"M", "F", "U"}


# -- clinical consistency -------------------------------------------------------------------


def test_reported_egfr_is_ckd_epi_2021_of_the_reported_creatinine(
    parsed: list[list[Segment]],
) -> None:
    checked = capped = 0
    for segments in orus(parsed):
        pid = first(segments, "PID")
        birth = datetime.strptime(field(pid, 7), "%Y%m%d").date()
        female = field(pid, 8) == "F"
        for obr, obxs in orders(segments):
            by_code = {component(obx, 3, 1): obx for obx in obxs}
            egfr_obx = next((by_code[c] for c in EGFR_CODES if c in by_code), None)
            if egfr_obx is None:
                continue
            collected = dtm(field(obr, 7))
            assert field(egfr_obx, 14) == field(obr, 7)
            age = (collected.date() - birth).days / 365.2425
            expected = egfr_ckd_epi_2021(creatinine_mg_dl(by_code["2160-0"]), age, female)
            value = field(egfr_obx, 5)
            if value in (">^90", ">90"):
                assert round(expected) > 90
                capped += 1
            else:
                assert field(egfr_obx, 2) == "NM"
                assert int(value) == round(expected)  # reported to whole mL/min/1.73 m2
                assert field(egfr_obx, 8) == ("L" if int(value) < 60 else "N")
            checked += 1
    assert checked > 500
    assert capped > 0


def test_uacr_units_are_consistent_with_the_trajectory(
    ehr: SyntheticEhr, parsed: list[list[Segment]]
) -> None:
    """mg/mmol results are mg/g / 8.84: the same patient's level reads ~8.84x lower."""
    by_unit: dict[str, list[float]] = defaultdict(list)
    mrns = {p.mrn: p for p in ehr.patients}
    for segments in orus(parsed):
        patient = mrns[mrn_of(segments)]
        for obr, obxs in orders(segments):
            for obx in obxs:
                if component(obx, 3, 1) in UACR_CODES and field(obx, 2) == "NM":
                    if field(obx, 5)[:1] in "<>":
                        continue
                    truth = patient.true_uacr_mg_g(dtm(field(obr, 7)))
                    by_unit[component(obx, 6, 1)].append(float(field(obx, 5)) / truth)
    assert {"mg/g", "mg/mmol"} <= set(by_unit)

    def geometric_mean(xs: list[float]) -> float:
        return math.exp(sum(map(math.log, xs)) / len(xs))

    # Reported / true level: ~1 in mg/g, ~1/8.84 in mg/mmol (noise is log-normal, CV ~30%).
    assert geometric_mean(by_unit["mg/g"]) == pytest.approx(1.0, rel=0.15)
    assert geometric_mean(by_unit["mg/mmol"]) == pytest.approx(1 / 8.84, rel=0.15)


def test_egfr_falls_along_each_trajectory(ehr: SyntheticEhr) -> None:
    fallers = [
        p for p in ehr.patients
        if p.lab.reports_egfr and p.egfr_decline_per_year >= 2.5 and p.baseline_egfr < 85
    ]  # fmt: skip
    lower = 0
    for patient in fallers:
        readings = []
        for at in (START - timedelta(days=3 * 365), START - timedelta(days=2)):
            segments = split(ehr.oru(patient, at, panel="renal"))
            egfr_obx = next(s for s in segments if component(s, 3, 1) in EGFR_CODES)
            readings.append(int(field(egfr_obx, 5)))
        lower += readings[1] < readings[0]
    assert len(fallers) > 30
    assert lower / len(fallers) > 0.8


def test_creatinine_for_egfr_inverts_ckd_epi_2021() -> None:
    for female in (False, True):
        for age in (30.0, 55.5, 89.9):
            for egfr in (5.0, 15.0, 44.0, 90.0, 120.0):
                creatinine = creatinine_for_egfr(egfr, age, female)
                assert egfr_ckd_epi_2021(creatinine, age, female) == pytest.approx(egfr, rel=1e-9)


def test_units_codes_and_habits_vary_across_patients(parsed: list[list[Segment]]) -> None:
    creatinine_units: set[str] = set()
    uacr_units: set[str] = set()
    egfr_codes: set[str] = set()
    uacr_codes: set[str] = set()
    with_egfr: set[str] = set()
    without_egfr: set[str] = set()
    for segments in orus(parsed):
        mrn = mrn_of(segments)
        for _, obxs in orders(segments):
            codes = {component(obx, 3, 1): obx for obx in obxs}
            if "2160-0" in codes:
                creatinine_units.add(component(codes["2160-0"], 6, 1))
                (with_egfr if codes.keys() & EGFR_CODES else without_egfr).add(mrn)
            egfr_codes |= codes.keys() & EGFR_CODES
            for code in codes.keys() & UACR_CODES:
                uacr_codes.add(code)
                uacr_units.add(component(codes[code], 6, 1))
    assert creatinine_units == {"mg/dL", "umol/L"}
    assert {"mg/g", "mg/mmol"} <= uacr_units
    assert egfr_codes == EGFR_CODES
    assert uacr_codes == UACR_CODES
    assert with_egfr and without_egfr


def test_stream_has_the_realistic_oddities(parsed: list[list[Segment]]) -> None:
    values = {field(s, 5) for m in orus(parsed) for s in m if s[0] == "OBX"}
    assert values & {">^90", ">90"}
    assert values & {"<^3", "<3", "<^0.3", "<0.3"}
    # Group reports of one order (OBR-3 filler number) to find P->F and F->C sequences.
    reports: dict[str, list[tuple[str, list[Segment]]]] = defaultdict(list)
    for segments in orus(parsed):
        for obr, _ in orders(segments):
            reports[field(obr, 3)].append((field(obr, 25), segments))
    sequences = {tuple(status for status, _ in r) for r in reports.values()}
    assert sequences == {("F",), ("P", "F"), ("F", "C")}


def test_preliminary_and_final_carry_the_same_values(parsed: list[list[Segment]]) -> None:
    pairs = 0
    reports: dict[str, list[list[Segment]]] = defaultdict(list)
    for segments in orus(parsed):
        reports[field(first(segments, "OBR"), 3)].append(segments)
    for messages in reports.values():
        statuses = [field(first(m, "OBR"), 25) for m in messages]
        if statuses != ["P", "F"]:
            continue
        prelim, final = ([s for s in m if s[0] == "OBX"] for m in messages)
        assert [field(s, 5) for s in prelim] == [field(s, 5) for s in final]
        assert {field(s, 11) for s in prelim} == {"P"}
        assert {field(s, 11) for s in final} == {"F"}
        assert dtm(field(first(messages[0], "MSH"), 7)) < dtm(field(first(messages[1], "MSH"), 7))
        pairs += 1
    assert pairs > 10


def test_correction_marks_only_the_remeasured_results(parsed: list[list[Segment]]) -> None:
    corrections = 0
    for segments in orus(parsed):
        for obr, obxs in orders(segments):
            if field(obr, 25) != "C":
                continue
            corrected = {component(s, 3, 1) for s in obxs if field(s, 11) == "C"}
            untouched = {component(s, 3, 1) for s in obxs if field(s, 11) == "F"}
            assert corrected <= {"2160-0", "14957-5"} | EGFR_CODES | UACR_CODES
            assert corrected and untouched
            corrections += 1
    assert corrections > 10


# -- the stream -----------------------------------------------------------------------------


def test_stream_is_chronological_and_ends_before_start(
    stream: list[tuple[datetime, bytes]], parsed: list[list[Segment]]
) -> None:
    times = [when for when, _ in stream]
    assert times == sorted(times)
    assert times[-1] <= START
    assert START - times[-1] < timedelta(days=14)
    for when, segments in zip(times, parsed, strict=True):
        assert dtm(field(first(segments, "MSH"), 7)) == when


def test_each_patient_registers_then_visits_every_two_to_six_months(
    ehr: SyntheticEhr, parsed: list[list[Segment]]
) -> None:
    history: dict[str, list[list[Segment]]] = defaultdict(list)
    for segments in parsed:
        history[mrn_of(segments)].append(segments)
    assert set(history) == {p.mrn for p in ehr.patients}
    kinds = set()
    for messages in history.values():
        assert message_type(messages[0]) in {"ADT^A01", "ADT^A04"}
        kinds |= {message_type(m) for m in messages}
        collected = sorted({dtm(field(first(m, "OBR"), 7)) for m in messages
                            if message_type(m) == "ORU^R01"})  # fmt: skip
        assert len(collected) == 4
        assert collected[0] > dtm(field(first(messages[0], "MSH"), 7))
        for earlier, later in itertools.pairwise(collected):
            assert timedelta(days=55) <= later - earlier <= timedelta(days=190)
    assert "ADT^A08" in kinds


def test_visits_per_patient_and_start_are_honoured() -> None:
    ehr = SyntheticEhr(seed=9, patients=10)
    start = datetime(2020, 1, 15, 12, 0)  # naive: taken as UTC
    messages = list(ehr.stream(start=start, visits_per_patient=2))
    orus = [split(m) for _, m in messages if b"|ORU^R01^" in m]
    assert len({(mrn_of(s), field(first(s, "OBR"), 7)) for s in orus}) == 20
    assert messages[-1][0] <= start.replace(tzinfo=UTC)


# -- the explicit builder -------------------------------------------------------------------


def test_renal_oru_for_writes_exactly_the_values_given() -> None:
    ehr = SyntheticEhr(patients=1)
    at = datetime(2024, 3, 4, 8, 30, tzinfo=UTC)
    message = ehr.renal_oru_for(
        age=67.25, female=True, at=at, creatinine_umol_l=150, egfr=31.5, uacr_mg_mmol=12.3,
        mrn="MRN1234567", national_id="9990000018", control_id="TEST-1",
    )  # fmt: skip
    hl7apy_strict(message)
    segments = split(message)
    msh, pid = first(segments, "MSH"), first(segments, "PID")
    assert field(msh, 10) == "TEST-1"
    assert field(pid, 3) == "MRN1234567^^^SANDBOX^MR~9990000018^^^NHS^NH"
    assert field(pid, 8) == "F"
    birth = datetime.strptime(field(pid, 7), "%Y%m%d").date()
    assert (at.date() - birth).days / 365.2425 == pytest.approx(67.25, abs=1 / 365)
    (renal_obr, renal), (_, urine) = orders(segments)
    assert field(renal_obr, 7) == "20240304083000+0000"
    rows = [(component(s, 3, 1), field(s, 2), field(s, 5), component(s, 6, 1)) for s in renal]
    assert rows == [("2160-0", "NM", "150", "umol/L"),
                    ("98979-8", "NM", "31.5", "mL/min/{1.73_m2}")]  # fmt: skip
    urine_rows = [(component(s, 3, 1), field(s, 5), component(s, 6, 1)) for s in urine]
    assert urine_rows == [("9318-7", "12.3", "mg/mmol")]
    assert {field(s, 11) for s in renal + urine} == {"F"}


def test_renal_oru_for_leaves_out_what_is_not_given_and_keeps_comparators() -> None:
    ehr = SyntheticEhr(patients=1)
    at = datetime(2024, 3, 4, 8, 30, tzinfo=UTC)
    only_creatinine = split(ehr.renal_oru_for(age=50, female=False, at=at, creatinine_mg_dl=1.1))
    assert [component(s, 3, 1) for s in only_creatinine if s[0] == "OBX"] == ["2160-0"]
    assert len(field(first(only_creatinine, "PID"), 3).split("~")) == 1
    sn = split(ehr.renal_oru_for(age=50, female=False, at=at, egfr=">^90", uacr_mg_g="<3"))
    obxs = [s for s in sn if s[0] == "OBX"]
    assert [(field(s, 2), field(s, 5)) for s in obxs] == [("SN", ">^90"), ("NM", "<3")]


def test_format_number_and_timestamps() -> None:
    assert [format_number(x) for x in (1.0, 1.42, 0.1 + 0.2, 150, 1e-7)] == [
        "1", "1.42", "0.3", "150", "0",
    ]  # fmt: skip
    assert hl7_timestamp(datetime(2024, 1, 2, 3, 4, 5)) == "20240102030405+0000"  # naive: UTC
    india = timezone(timedelta(hours=5, minutes=30))
    newfoundland = timezone(-timedelta(hours=3, minutes=30))
    assert hl7_timestamp(datetime(2024, 1, 2, 3, 4, 5, tzinfo=india)) == "20240102030405+0530"
    moment = datetime(2024, 7, 1, 23, 59, 59, tzinfo=newfoundland)
    assert hl7_timestamp(moment) == "20240701235959-0330"
    assert dtm(hl7_timestamp(moment)) == moment


# -- deliberately bad messages --------------------------------------------------------------


def test_bad_messages_are_what_they_claim(ehr: SyntheticEhr) -> None:
    bad = ehr.bad_messages()
    assert {"missing_pid", "unparseable_number_see_note", "unparseable_number_hashes",
            "non_hl7", "garbage", "truncated", "unknown_message_type"} <= set(bad)  # fmt: skip

    missing = split(bad["missing_pid"])
    assert "PID" not in [s[0] for s in missing]
    assert any(s[0] == "OBX" for s in missing)

    for key, text in (("unparseable_number_see_note", "see note"),
                      ("unparseable_number_hashes", "####")):  # fmt: skip
        creatinine = next(s for s in split(bad[key]) if component(s, 3, 1) == "2160-0")
        assert (field(creatinine, 2), field(creatinine, 5)) == ("NM", text)

    unit = next(s for s in split(bad["unknown_unit"]) if component(s, 3, 1) == "2160-0")
    assert component(unit, 6, 1) == "mmol/L"

    assert message_type(split(bad["unknown_message_type"])) == "ZZZ^Z01"

    assert json.loads(bad["non_hl7"])["resourceType"] == "Observation"

    garbage = bad["garbage"]
    assert len(garbage) >= 256 and not garbage.startswith(b"MSH")
    assert b"\x0b" not in garbage and b"\x1c" not in garbage  # MLLP framing stays intact

    truncated = bad["truncated"].decode("ascii")
    assert not truncated.endswith("\r")
    last = truncated.split("\r")[-1].split("|")
    assert last[0] == "OBX" and component(last, 3, 1) == "2160-0"
    assert field(last, 5) == ""  # the value was cut off

    assert bad["empty"] == b""


def test_bad_messages_that_are_not_hl7_do_not_parse(ehr: SyntheticEhr) -> None:
    bad = ehr.bad_messages()
    for key in ("non_hl7", "garbage", "empty"):
        with pytest.raises(HL7apyException):
            parse_message(bad[key].decode("latin-1"), find_groups=True)
    # The 2.5.1 ORU_R01 PATIENT group is optional, so without PID it is still structured.
    tree = hl7apy_strict(bad["missing_pid"])
    assert "ORU_R01_PATIENT" not in names(tree.children[2])  # type: ignore[attr-defined]


def test_the_valid_base_of_the_bad_messages_is_itself_valid(ehr: SyntheticEhr) -> None:
    # Every HL7-shaped bad message differs from a strictly valid one by its one defect.
    good = ehr.bad_messages()["unknown_unit"].replace(b"|mmol/L^^UCUM|", b"|mg/dL^^UCUM|")
    hl7apy_strict(good)


# -- the 8-variable KFRE's analytes --------------------------------------------------------

SERUM_BY_UNIT_SYSTEM = {
    # creatinine unit -> {LOINC code: unit} of albumin, phosphate, total CO2, calcium
    "mg/dL": {"1751-7": "g/dL", "2777-1": "mg/dL", "2028-9": "mmol/L", "17861-6": "mg/dL"},
    "umol/L": {"1751-7": "g/L", "14879-1": "mmol/L", "2028-9": "mmol/L", "2000-8": "mmol/L"},
}


def test_renal_panels_carry_the_kfre8_analytes_in_the_labs_units(
    parsed: list[list[Segment]],
) -> None:
    panels = {"mg/dL": 0, "umol/L": 0}
    for segments in orus(parsed):
        for _, obxs in orders(segments):
            units = {component(obx, 3, 1): component(obx, 6, 1) for obx in obxs}
            if "2160-0" not in units:
                continue
            system = units["2160-0"]
            expected = SERUM_BY_UNIT_SYSTEM[system]
            assert {code: units.get(code) for code in expected} == expected
            panels[system] += 1
    assert min(panels.values()) > 100  # both unit systems, so conversion is exercised


def test_phosphate_rises_and_bicarbonate_falls_as_gfr_falls(
    parsed: list[list[Segment]],
) -> None:
    low: list[tuple[float, float]] = []
    high: list[tuple[float, float]] = []
    for segments in orus(parsed):
        for _, obxs in orders(segments):
            values = {component(obx, 3, 1): field(obx, 5) for obx in obxs}
            egfr = next((values[c] for c in EGFR_CODES if c in values), None)
            if "2777-1" not in values or egfr is None or not egfr.isdigit():
                continue
            pair = (float(values["2777-1"]), float(values["2028-9"]))
            (low if int(egfr) < 25 else high if int(egfr) >= 45 else []).append(pair)
    assert len(low) > 20 and len(high) > 20
    mean = lambda pairs, i: sum(p[i] for p in pairs) / len(pairs)  # noqa: E731
    assert mean(low, 0) > mean(high, 0) + 0.5  # phosphate, mg/dL
    assert mean(low, 1) < mean(high, 1) - 1.0  # total CO2, mmol/L


def test_renal_oru_for_writes_the_kfre8_analytes_under_their_unit_codes() -> None:
    ehr = SyntheticEhr(patients=1)
    at = datetime(2024, 3, 4, 8, 30, tzinfo=UTC)
    serum = {
        "albumin": (36.0, "g/L"),
        "phosphate": (1.42, "mmol/L"),
        "bicarbonate": (19.0, "mEq/L"),
        "calcium": (2.31, "mmol/L"),
    }
    message = ehr.renal_oru_for(age=70, female=False, at=at, egfr=28, serum=serum)
    hl7apy_strict(message)
    rows = [(component(s, 3, 1), field(s, 5), component(s, 6, 1))
            for s in split(message) if s[0] == "OBX"]  # fmt: skip
    assert rows == [
        ("98979-8", "28", "mL/min/{1.73_m2}"),
        ("1751-7", "36", "g/L"),
        ("14879-1", "1.42", "mmol/L"),
        ("2028-9", "19", "mEq/L"),
        ("2000-8", "2.31", "mmol/L"),
    ]
    with pytest.raises(ValueError, match="no LOINC code for calcium in g/L"):
        ehr.renal_oru_for(age=70, female=False, at=at, serum={"calcium": (2.3, "g/L")})
