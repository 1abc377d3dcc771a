"""Hostile input to the HL7v2 reader and fact extraction (issue 10, findings 1, 2 and 4).

Each test here failed on 966cba3: quadratic PID-3 matching, formatting escapes
that expanded without a cap, and plain ValueErrors (a bug, AR, no dead letter)
where the message is simply unusable (AE, dead-lettered with its reason).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ehrbridge.config import load_site_config
from ehrbridge.core.errors import MessageRejected, MessageUnusable
from ehrbridge.pipelines.er7 import (
    DEFAULT_ENCODING,
    MAX_FORMAT_REPEAT,
    MAX_VALUE_CHARS,
    Message,
    unescape,
)
from ehrbridge.pipelines.facts import FactRules, Trace, extract, read_number
from ehrbridge.pipelines.hl7time import Hl7TimeError, parse_date, parse_dtm

SITE = Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml"
RULES = FactRules(load_site_config(SITE).mapping)

MSH = "MSH|^~\\&|LIS|LAB|EHRBRIDGE|HOSP|20260105103000+0100||ORU^R01^ORU_R01|CTRL1|P|2.5.1"
PID = "PID|1||NHS123^^^NHS^NH~MRN42^^^SANDBOX^MR||Doe^Jane||19700315|F"
OBR = "OBR|1|P1|F1|24362-6^Renal panel^LN|||20260105080000+0100"


def obx(value: str = "17.6", unit: str = "mL/min/{1.73_m2}", when: str = "") -> str:
    return f"OBX|1|NM|98979-8^eGFR^LN||{value}|{unit}^^UCUM|||||F|||{when}"


def unusable(*segments: str) -> MessageUnusable:
    with pytest.raises(MessageUnusable) as caught:
        extract(Message.parse("\r".join(segments)), RULES)
    return caught.value


# --------------------------------------------------------------------------- finding 1


def test_pid3_with_ten_thousand_repetitions_is_read_in_linear_time() -> None:
    # The sandbox rule wants CX.4 SANDBOX and CX.5 MR: every repetition is looked at.
    # 966cba3 re-split the field per repetition: 2 s for 10k (28 s for 30k).
    others = "~".join(f"X{k}^^^OTHER^PI" for k in range(10_000))
    pid = f"PID|1||{others}~MRN42^^^SANDBOX^MR||Doe^Jane||19700315|F"
    message = Message.parse("\r".join([MSH, pid, OBR, obx()]))
    started = time.perf_counter()
    [patient] = extract(message, RULES).patients
    elapsed = time.perf_counter() - started
    assert patient.patient_id == "MRN42"
    assert elapsed < 1.0, f"{elapsed:.2f}s for 10k PID-3 repetitions (linear: ~15 ms)"


def test_pid3_matching_still_reads_the_hd_subcomponents_and_escapes() -> None:
    pid = "PID|1||A1^^^OTHER&1.2.3^MR~B\\S\\2^^^X&SANDBOX^MR||Doe^Jane||19700315|F"
    [patient] = extract(Message.parse("\r".join([MSH, pid, OBR, obx()])), RULES).patients
    assert patient.patient_id == "B^2"  # CX.4.2 universal id matched, CX.1 unescaped


# --------------------------------------------------------------------------- finding 2


@pytest.mark.parametrize("escape", ["\\.sk 200000000\\", "\\.sp 500000000\\", "\\.sk 101\\"])
def test_formatting_escapes_over_the_cap_make_the_message_unusable(escape: str) -> None:
    error = unusable(MSH, PID, OBR, obx(unit=f"mL/min/{{1.73_m2}}{escape}"))
    assert error.reason == "hl7.escape_too_long"
    assert error.location is not None and (error.location.segment, error.location.field) == (
        "OBX",
        6,
    )


def test_formatting_escapes_up_to_the_cap_still_decode() -> None:
    text = f"a\\.sk {MAX_FORMAT_REPEAT}\\b\\.sp 2\\c\\.sk\\d"
    assert unescape(text, DEFAULT_ENCODING) == "a" + " " * MAX_FORMAT_REPEAT + "b\n\nc d"


def test_many_small_escapes_cannot_add_up_past_the_value_cap() -> None:
    text = "\\.sk 100\\" * (MAX_VALUE_CHARS // 100 + 1)  # 10 bytes each, 100 characters out
    with pytest.raises(MessageUnusable, match="longer than") as caught:
        unescape(text, DEFAULT_ENCODING)
    assert caught.value.reason == "hl7.field_too_long"


def test_a_value_longer_than_the_cap_is_never_stored() -> None:
    long_display = "x" * (MAX_VALUE_CHARS + 1)
    segment = f"OBX|1|NM|98979-8^{long_display}^LN||17.6|mL/min/{{1.73_m2}}^^UCUM|||||F"
    assert unusable(MSH, PID, OBR, segment).reason == "hl7.field_too_long"
    pid = f"PID|1||{'9' * (MAX_VALUE_CHARS + 1)}^^^SANDBOX^MR"
    assert unusable(MSH, pid, OBR, obx()).reason == "hl7.field_too_long"


# --------------------------------------------------------------------------- finding 4


@pytest.mark.parametrize(
    "when",
    [
        "20260105+9999",  # an offset of 99 h 99 min: timezone() raised ValueError
        "2026010¹",  # superscript one: isdigit() but int() refuses it
        "20260105080000.¹",
        "20260105+¹²⁰⁰",
    ],
)
def test_odd_observation_times_are_unusable_not_a_crash(when: str) -> None:
    assert unusable(MSH, PID, OBR, obx(when=when)).reason == "hl7.bad_time"


@pytest.mark.parametrize("argument", ["¹", "9" * 5000, "-1", "1x"])
def test_odd_escape_counts_are_unusable_not_a_crash(argument: str) -> None:
    error = unusable(MSH, PID, OBR, obx(unit=f"mL/min/{{1.73_m2}}\\.sk {argument}\\"))
    assert error.reason == "hl7.escape_too_long"


@pytest.mark.parametrize("value", ["1¹", "٣", "1" * 5000, "9" * 400])
def test_odd_numbers_are_not_numbers(value: str) -> None:
    assert read_number(value) is None
    assert unusable(MSH, PID, OBR, obx(value=value)).reason == "hl7.bad_number"


def test_a_birth_date_with_superscript_digits_is_unusable() -> None:
    pid = "PID|1||MRN42^^^SANDBOX^MR||Doe^Jane||1970031⁵|F"
    assert unusable(MSH, pid, OBR, obx()).reason == "hl7.bad_birth_date"
    with pytest.raises(Hl7TimeError):
        parse_date("1970031⁵")


def test_offsets_up_to_a_day_are_still_read() -> None:
    assert parse_dtm("20260105+1400").utcoffset().total_seconds() == 14 * 3600  # type: ignore[union-attr]
    for bad in ("20260105+2400", "20260105-0160"):
        with pytest.raises(Hl7TimeError):
            parse_dtm(bad)


@pytest.mark.parametrize("separator", ["\x1c", "\x0b", "\x93", "\x7f"])
def test_control_characters_are_not_delimiters(separator: str) -> None:
    with pytest.raises(MessageRejected) as caught:
        Message.parse(MSH.replace("|", separator) + "\r" + PID)
    assert caught.value.reason == "hl7.bad_encoding"


def test_a_value_of_64_thousand_spaces_is_read_in_linear_time() -> None:
    # Found by the fuzzer: '^\s*(op)?\s*number' backtracked quadratically (37 s).
    started = time.perf_counter()
    assert read_number(" " * 60_000 + "x") is None
    assert read_number(" " * 60_000 + "< 5 ") == ("<", 5.0)
    assert time.perf_counter() - started < 1.0


def test_explain_reports_a_value_over_the_cap_instead_of_failing() -> None:
    trace = Trace()
    huge = "OBX|1|ED|98979-8^eGFR^LN||" + "A" * (MAX_VALUE_CHARS + 1) + "|x^^UCUM|||||F"
    extract(Message.parse("\r".join([MSH, PID, OBR, huge])), RULES, trace)
    assert any("hl7.field_too_long" in problem for problem in trace.problems)
