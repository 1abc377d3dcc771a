"""ORU^R01 / ADT → facts and demographics, and each way a message can be unusable."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ehrbridge.config import load_site_config, parse_site_config
from ehrbridge.core.errors import MessageUnusable
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import Extraction, FactRules, extract

SITE = Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml"
RULES = FactRules(load_site_config(SITE).mapping)

MSH = "MSH|^~\\&|LIS|LAB|EHRBRIDGE|HOSP|20260105103000+0100||ORU^R01^ORU_R01|CTRL1|P|2.5.1"
PID = "PID|1||NHS123^^^NHS^NH~MRN42^^^SANDBOX^MR||Doe^Jane||19700315|F"
OBR = "OBR|1|P1|F1|24362-6^Renal panel^LN|||20260105080000+0100"


def obx(
    n: int, code: str, value: str, unit: str, *, status: str = "F", when: str = "", vt: str = "NM"
) -> str:
    return f"OBX|{n}|{vt}|{code}^Test {n}^LN||{value}|{unit}^^UCUM|||||{status}|||{when}"


def parse(*segments: str, rules: FactRules = RULES) -> Extraction:
    return extract(Message.parse("\r".join(segments)), rules)


def test_oru_gives_facts_in_canonical_units() -> None:
    result = parse(
        MSH,
        PID,
        OBR,
        obx(1, "2160-0", "265", "umol/L"),
        obx(2, "98979-8", "17.6", "mL/min/{1.73_m2}"),
        obx(3, "9318-7", "199.3", "mg/mmol"),
    )
    assert result.control_id == "CTRL1" and result.message_type == "ORU^R01"
    [patient] = result.patients
    assert patient.patient_id == "MRN42"  # the SANDBOX/MR repetition, not the first one
    assert patient.demographics.birth_date == date(1970, 3, 15)
    assert patient.demographics.sex == "F"
    facts = {f.feature: f for f in patient.facts}
    assert facts["creatinine"].value == pytest.approx(265 / 88.4, rel=1e-12)
    assert facts["creatinine"].unit == "mg/dL" and facts["creatinine"].raw_unit == "umol/L"
    assert facts["uacr"].value == pytest.approx(199.3 * 8.84, rel=1e-12)
    assert facts["egfr"].value == 17.6
    # OBX-14 empty: the time comes from OBR-7, with its +0100 offset
    assert facts["egfr"].effective == datetime(
        2026, 1, 5, 8, 0, tzinfo=timezone(timedelta(hours=1))
    )
    assert facts["egfr"].ref == "CTRL1/OBX/2"


def test_obx14_wins_over_obr7_and_naive_times_use_the_site_zone() -> None:
    text = load_site_config(SITE).model_dump(mode="json")
    text["mapping"]["timezone"] = "Europe/Ljubljana"
    import yaml

    rules = FactRules(parse_site_config(yaml.safe_dump(text)).mapping)
    result = parse(
        MSH, PID, OBR, obx(1, "2160-0", "1.1", "mg/dL", when="20260104070000"), rules=rules
    )
    [fact] = result.patients[0].facts
    assert fact.effective == datetime(2026, 1, 4, 6, 0, tzinfo=UTC)


def test_unmapped_and_non_final_results_are_reported_unused() -> None:
    result = parse(
        MSH,
        PID,
        OBR,
        obx(1, "2951-2", "140", "mmol/L"),
        obx(2, "2160-0", "1.4", "mg/dL", status="P"),
        obx(3, "2160-0", "1.5", "mg/dL", status="X"),
    )
    patient = result.patients[0]
    assert patient.facts == []
    reasons = {u.ref: u.reason for u in patient.unused}
    assert reasons == {
        "CTRL1/OBX/1": "code not mapped",
        "CTRL1/OBX/2": "result status P not used",
        "CTRL1/OBX/3": "result status X not used",
    }


@pytest.mark.parametrize(
    ("value", "vt", "comparator", "number"),
    [
        (">90", "NM", ">", 90.0),
        ("<3", "NM", "<", 3.0),
        (">=90", "ST", ">=", 90.0),
        (">^90", "SN", ">", 90.0),
        ("=^4.5", "SN", "", 4.5),
    ],
)
def test_comparators_keep_the_bound_under_the_bound_policy(
    value: str, vt: str, comparator: str, number: float
) -> None:
    result = parse(MSH, PID, OBR, obx(1, "98979-8", value, "mL/min/{1.73_m2}", vt=vt))
    [fact] = result.patients[0].facts
    assert (fact.comparator, fact.value, fact.raw_value) == (comparator, number, value)


def test_reject_policy_leaves_comparator_results_unused() -> None:
    data = load_site_config(SITE).model_dump(mode="json")
    data["mapping"]["values"]["comparators"] = "reject"
    import yaml

    rules = FactRules(parse_site_config(yaml.safe_dump(data)).mapping)
    result = parse(MSH, PID, OBR, obx(1, "98979-8", ">90", "mL/min/{1.73_m2}"), rules=rules)
    assert result.patients[0].facts == []
    assert result.patients[0].unused[0].reason == "comparator rejected by value policy"


def test_alternate_coding_in_obx3_is_matched() -> None:
    segment = "OBX|1|NM|CREA^Kreatinin^L^2160-0^Creatinine^LN||88.4|umol/L|||||F"
    [fact] = parse(MSH, PID, OBR, segment).patients[0].facts
    assert (fact.feature, fact.system, fact.code, fact.value) == ("creatinine", "LN", "2160-0", 1.0)


def test_obx_after_spm_is_not_dropped() -> None:
    spm = "SPM|1|S1||119364003^Serum^SCT"
    result = parse(MSH, PID, OBR, spm, obx(1, "2160-0", "1.2", "mg/dL"))
    assert [f.feature for f in result.patients[0].facts] == ["creatinine"]


def test_several_patients_in_one_oru() -> None:
    other = "PID|2||MRN43^^^SANDBOX^MR||Roe^Rick||19500101|M"
    result = parse(
        MSH, PID, OBR, obx(1, "2160-0", "1.2", "mg/dL"), other, OBR, obx(2, "9318-7", "30", "mg/g")
    )
    assert [(p.patient_id, [f.feature for f in p.facts]) for p in result.patients] == [
        ("MRN42", ["creatinine"]),
        ("MRN43", ["uacr"]),
    ]
    assert result.keys == ["MRN42", "MRN43"], "stored once per patient"
    assert [p.patient_id for p in result.owned_by("MRN43").patients] == ["MRN43"]
    assert result.owned_by("not-a-patient") is result, "an unsplit record keeps them all"


def test_adt_updates_demographics_only() -> None:
    adt = MSH.replace("ORU^R01^ORU_R01", "ADT^A08^ADT_A01")
    result = parse(adt, "EVN|A08|20260105103000", PID, "PV1|1|O")
    [patient] = result.patients
    assert patient.facts == [] and patient.demographics.sex == "F"
    assert patient.demographics.as_of == datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("segments", "reason", "location", "code"),
    [
        ([MSH, OBR, obx(1, "2160-0", "1.2", "mg/dL")], "hl7.missing_pid", "OBX", 100),
        ([MSH, OBR], "hl7.missing_pid", "PID", 100),
        ([MSH, PID, OBR, obx(1, "2160-0", "see note", "mg/dL")], "hl7.bad_number", "OBX-5", 102),
        ([MSH, PID, OBR, obx(1, "2160-0", "####", "mg/dL")], "hl7.bad_number", "OBX-5", 102),
        ([MSH, PID, OBR, obx(1, "2160-0", "1.2", "mmol/L")], "mapping.unknown_unit", "OBX-6", 103),
        ([MSH, PID, OBR, obx(1, "2160-0", "1.2", "")], "mapping.unknown_unit", "OBX-6", 103),
        (
            [MSH, PID, OBR, obx(1, "2160-0", "1.2", "mg/dL", status="")],
            "hl7.missing_status",
            "OBX-11",
            101,
        ),
        ([MSH, PID, "OBR|1", obx(1, "2160-0", "1.2", "mg/dL")], "hl7.missing_time", "OBR-7", 101),
        (
            [MSH, PID, OBR, obx(1, "2160-0", "1.2", "mg/dL", when="2026-01-01")],
            "hl7.bad_time",
            "OBX-14",
            102,
        ),
        ([MSH, PID.replace("19700315", "1970-03-15")], "hl7.bad_birth_date", "PID-7", 102),
        (
            [MSH, PID.replace("MRN42^^^SANDBOX^MR", "MRN42^^^OTHER^MR")],
            "hl7.missing_patient_id",
            "PID-3",
            101,
        ),
        ([MSH.replace("ORU^R01^ORU_R01", "VXU^V04"), PID], "hl7.unsupported_type", "MSH-9", 200),
        ([MSH.replace("ORU^R01^ORU_R01", ""), PID], "hl7.missing_type", "MSH-9", 101),
    ],
)
def test_unusable_messages_name_reason_and_place(
    segments: list[str], reason: str, location: str, code: int
) -> None:
    with pytest.raises(MessageUnusable) as caught:
        parse(*segments)
    assert caught.value.reason == reason
    assert str(caught.value.location).startswith(location)
    assert caught.value.hl7_error_code == code


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (obx(1, "2160-0", "see note", "mg/dL"), "OBX set id 1 (creatinine) value is not a number"),
        (obx(1, "2160-0", "1.2", "mmol/L"), "OBX set id 1 (creatinine) has unit 'mmol/L'"),
        (obx(1, "2160-0", "1.2", "mg/dL", status=""), "OBX set id 1 (creatinine) has no result"),
    ],
)
def test_errors_name_an_obx_by_its_set_id_not_its_count_in_the_message(
    bad: str, named: str
) -> None:
    # OBX-1 restarts at 1 in the second OBR group: the third OBX is "set id 1" to its sender.
    segments = [MSH, PID, OBR, obx(1, "98979-8", "17.6", "mL/min/{1.73_m2}")]
    segments += [obx(2, "9318-7", "19.3", "mg/mmol"), OBR.replace("OBR|1", "OBR|2"), bad]
    with pytest.raises(MessageUnusable) as caught:
        parse(*segments)
    assert caught.value.detail.startswith(named)
    assert str(caught.value.location).startswith("OBX[3]")  # ERR-2 still counts occurrences


def test_unmapped_obx_with_garbage_never_fails_the_message() -> None:
    result = parse(
        MSH, PID, OBR, obx(1, "2951-2", "see note", "mmol/L"), obx(2, "2160-0", "1.2", "mg/dL")
    )
    assert [f.feature for f in result.patients[0].facts] == ["creatinine"]


def test_escaped_and_custom_delimiters_are_read() -> None:
    msh = "MSH#$*@!#LIS#LAB#X#Y#20260105103000##ORU$R01#C2#P#2.5.1"
    pid = "PID#1##MRN42$$$SANDBOX$MR##Doe$Jane##19700315#F"
    obx_ = "OBX#1#NM#2160-0$Creatinine @T@ more$LN##1.2#mg/dL#####F###20260105080000"
    [fact] = parse(msh, pid, obx_).patients[0].facts
    # \T\ is the *subcomponent* separator, here "!"
    assert fact.display == "Creatinine ! more" and fact.value == 1.2


def test_year_only_birth_dates_are_too_coarse_but_not_an_error() -> None:
    [patient] = parse(MSH, PID.replace("19700315", "1970")).patients
    assert patient.demographics.birth_date is None


def test_a_malformed_msh7_does_not_make_the_message_unusable() -> None:
    # 17 digits: milliseconds appended without the dot, as some senders do
    [patient] = parse(MSH.replace("20260105103000+0100", "20110613122406637"), PID).patients
    assert patient.demographics.as_of is None and patient.demographics.sex == "F"
