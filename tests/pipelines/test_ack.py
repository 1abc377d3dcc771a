"""HL7 ACKs: content per code, layout per version, validated by hl7apy."""

from __future__ import annotations

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message as Hl7apyMessage
from hl7apy.parser import parse_segments

from ehrbridge.adapters.mllp_client import Ack
from ehrbridge.core.errors import (
    Hl7Location,
    MessageRejected,
    MessageUnusable,
    UpstreamUnavailable,
)
from ehrbridge.pipelines.ack import AckCode, ack_code_for, build_ack, read_header
from ehrbridge.pipelines.er7 import Message

UNUSABLE = MessageUnusable(
    "PID-3 has no identifier with assigning authority A&B",
    reason="hl7.missing_patient_id",
    location=Hl7Location("PID", field=3),
    hl7_error_code=101,
)
VERSIONS = [
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.8",
    "2.8.2",
]  # hl7apy has no 2.7.1


def inbound(version: str = "2.5.1", control_id: str = "CTRL-9") -> bytes:
    return (
        f"MSH|^~\\&|LIS|LAB|EHRBRIDGE|HOSP|20260105103000||ORU^R01|{control_id}|T|{version}\r"
        "PID|1||X^^^SANDBOX^MR"
    ).encode()


def validate_ack(ack: bytes, version: str) -> Hl7apyMessage:
    """Strict hl7apy validation as the ACK message of ``version``.

    The structure is named explicitly: hl7apy cannot infer it from MSH-9
    before v2.3.1, where MSH-9 has no message-structure component.
    """
    strict = VALIDATION_LEVEL.STRICT
    message = Hl7apyMessage("ACK", version=version, validation_level=strict)
    segments = parse_segments(ack.decode(), version=version, validation_level=strict)
    message.msh = segments[0]
    for segment in segments[1:]:
        message.add(segment)
    message.validate()  # raises on any structural or datatype violation
    return message


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "error", [None, UNUSABLE, MessageRejected("bad", reason="hl7.bad_segment")]
)
def test_acks_are_valid_hl7_for_the_senders_version(version: str, error: Exception | None) -> None:
    ack = build_ack(read_header(inbound(version)), error)  # type: ignore[arg-type]
    parsed = validate_ack(ack, version)
    assert parsed.msh.msh_12.to_er7() == version


def test_aa_echoes_control_id_and_swaps_applications() -> None:
    ack = build_ack(read_header(inbound()))
    message = Message.parse(ack)
    msh = message.segment("MSH")
    assert msh is not None
    assert (msh.field(3), msh.field(4), msh.field(5), msh.field(6)) == (
        "EHRBRIDGE",
        "HOSP",
        "LIS",
        "LAB",
    )
    assert msh.field(11) == "T"  # processing id echoed
    assert message.message_type == ("ACK", "R01", "ACK")
    assert message.control_id != "CTRL-9"
    parsed = Ack.parse(ack)
    assert (parsed.code, parsed.control_id, parsed.text) == ("AA", "CTRL-9", "")


def test_ae_names_the_problem_in_msa3_and_err() -> None:
    message = Message.parse(build_ack(read_header(inbound("2.5.1")), UNUSABLE))
    msa, err = message.segment("MSA"), message.segment("ERR")
    assert msa is not None and err is not None
    assert msa.value(1) == "AE"
    assert (
        msa.value(3) == "PID-3 has no identifier with assigning authority A&B"
    )  # escaped on the wire
    assert err.field(2) == "PID^1^3"  # ERR-2 error location
    assert err.component(3, 1) == "101"  # ERR-3 HL7 error code, table 0357
    assert err.value(4) == "E"
    assert "hl7.missing_patient_id" in err.value(8)


def test_pre_25_uses_err1() -> None:
    message = Message.parse(build_ack(read_header(inbound("2.3")), UNUSABLE))
    err = message.segment("ERR")
    assert err is not None
    assert err.component(1, 1) == "PID" and err.component(1, 3) == "3"
    assert err.component(1, 4, sub=1) == "101"


def test_msa3_is_withdrawn_from_27() -> None:
    message = Message.parse(build_ack(read_header(inbound("2.7")), UNUSABLE))
    msa = message.segment("MSA")
    assert msa is not None and msa.value(3) == ""
    assert "assigning authority" in (message.segment("ERR") or msa).value(8)


def test_long_reasons_fit_msa3() -> None:
    error = MessageUnusable("x" * 300, reason="r")
    msa = Message.parse(build_ack(read_header(inbound("2.4")), error)).segment("MSA")
    assert msa is not None and len(msa.value(3)) == 80


def test_custom_delimiters_are_answered_in_kind() -> None:
    raw = b"MSH#$*@!#LIS#LAB#EB#H#20260105103000##ORU$R01#C7#P#2.5.1\rPID#1"
    ack = build_ack(read_header(raw), UNUSABLE)
    assert ack.startswith(b"MSH#$*@!#EB#H#LIS#LAB#")
    assert Message.parse(ack).segment("MSA").value(2) == "C7"  # type: ignore[union-attr]


def test_garbage_still_gets_a_parseable_ar() -> None:
    ack = build_ack(
        read_header(b"\x00\xffnot hl7 at all"), MessageRejected("no MSH", reason="hl7.no_msh")
    )
    parsed = Ack.parse(ack)
    assert (parsed.code, parsed.control_id) == ("AR", "")
    # Strictly MSA-2 is required, but there is no MSH-10 to echo: it stays empty
    # rather than invented. Everything else is well-formed.
    with pytest.raises(Exception, match=r"MSA\.MSA_2"):
        validate_ack(ack, "2.5")


def test_a_broken_message_echoes_what_its_msh_says() -> None:
    raw = b"MSH|^~\\&|LIS|LAB|EB|H|20260105||ORU^R01|C8|P|2.5\rP@@|broken segment"
    assert Ack.parse(build_ack(read_header(raw), MessageRejected("x"))).control_id == "C8"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (None, AckCode.AA),
        (UNUSABLE, AckCode.AE),
        (MessageRejected("x"), AckCode.AR),
        (UpstreamUnavailable("disk"), AckCode.AR),
    ],
)
def test_ack_code_by_outcome(error: Exception | None, code: AckCode) -> None:
    assert ack_code_for(error) is code  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hostile headers
# Issue 10, finding 5: ACKs that garbled MSH-10, split delimiters or broke the frame.


def test_msa2_gives_a_utf8_msh10_back_byte_for_byte() -> None:
    raw = inbound(control_id="CID-é")  # UTF-8 on the wire: CID-\xc3\xa9
    ack = build_ack(read_header(raw))
    assert b"MSA|AA|CID-\xc3\xa9\r" in ack  # not CID-Ã© (latin-1 read, UTF-8 written)


def test_msa2_gives_a_latin1_msh10_back_byte_for_byte() -> None:
    raw = inbound(control_id="CID-X").replace(b"CID-X", b"CID-\xe9")  # not valid UTF-8
    assert b"MSA|AE|CID-\xe9|" in build_ack(read_header(raw), UNUSABLE)


def test_msh18_decides_how_the_ack_is_encoded() -> None:
    # MSH-18 8859/7 (Greek): 0xE1 is alpha; our own MSA-3 text goes out in 8859-7 too.
    raw = b"MSH|^~\\&|LIS|LAB|EB|H|20260105||ORU^R01|ID-\xe1|P|2.5|||||GRC|8859/7\rPID|1"
    error = MessageUnusable("unit \u03bcmol/L is not mapped", reason="mapping.unknown_unit")
    ack = build_ack(read_header(raw), error)
    assert b"MSA|AE|ID-\xe1|unit \xecmol/L is not mapped" in ack
    assert b"|P|2.5||||||8859/7\rMSA" in ack  # and it says so in its own MSH-18


def test_the_sites_charset_reads_messages_without_msh18() -> None:
    raw = inbound(control_id="X").replace(b"|X|", b"|ID-\xd0\xb6|")  # also valid UTF-8
    assert b"|ID-\xd0\xb6\r" in build_ack(read_header(raw, "8859/5"))
    assert read_header(raw, "8859/5").control_id == "ID-\u0430\u0416"  # two Cyrillic letters
    assert read_header(raw).control_id == "ID-\u0436"  # one, read as UTF-8


@pytest.mark.parametrize("separator", [b"\x93", b"\x1c", b"\x0b", b"\x7f"])
def test_an_unusable_field_separator_still_gets_msh10_echoed(separator: bytes) -> None:
    raw = b"MSH|^~\\&|LIS|LAB|EB|H|20260105||ORU^R01|C-93|P|2.5\rPID|1".replace(b"|", separator)
    ack = build_ack(read_header(raw), MessageRejected("x", reason="hl7.bad_encoding"))
    assert ack.startswith(b"MSH|^~\\&|")  # the standard delimiters, one byte each
    assert b"MSA|AR|C-93|" in ack
    assert separator not in ack


@pytest.mark.parametrize("msh2", [b"^~^&", b"^~\\&ab", b"", b"^\x1c\\&", b"^~\\\x93"])
def test_unusable_encoding_characters_fall_back_to_the_standard_ones(msh2: bytes) -> None:
    raw = b"MSH|" + msh2 + b"|LIS|LAB|EB|H|20260105||ORU^R01|C-77|P|2.5\rPID|1"
    ack = build_ack(read_header(raw), MessageRejected("x", reason="hl7.bad_encoding"))
    assert ack.startswith(b"MSH|^~\\&|EB|H|LIS|LAB|")
    assert Ack.parse(ack).control_id == "C-77"


def test_framing_bytes_are_never_echoed() -> None:
    raw = b"MSH|^~\\&|LIS\x0b|LAB|EB|H|20260105||ORU^R01|C\x1c1|P|2.5\x1c|||||\rPID|1"
    ack = build_ack(read_header(raw), UNUSABLE)
    assert b"\x1c" not in ack and b"\x0b" not in ack
    assert ack.count(b"\r") == 3  # MSH, MSA, ERR: no segment cut short
    assert b"MSA|AE|C1|" in ack


def test_a_non_ascii_digit_in_the_version_does_not_break_the_ack() -> None:
    ack = build_ack(read_header(inbound("2.5.¹")), UNUSABLE)
    assert b"MSA|AE|CTRL-9|" in ack and b"|2.5.\xc2\xb9\r" in ack
    long_version = build_ack(read_header(inbound("2." + "9" * 5000)))
    assert Ack.parse(long_version).control_id == "CTRL-9"


@pytest.mark.parametrize("separator", ["+", ".", "-"])
def test_our_own_timestamp_and_version_are_escaped_when_they_hold_a_delimiter(
    separator: str,
) -> None:
    # Found by the fuzzer: MSH-7 "20260105103000+0000" split MSH into one field more.
    raw = f"MSH{separator}^~\\&{separator}LIS{separator}{separator}{separator}{separator}"
    ack = build_ack(read_header(raw.encode()), MessageRejected("x"))
    msh = Message.parse(ack).msh
    assert msh.component(9, 1) == "ACK" and msh.value(12) == "2.5"
    assert msh.value(7).endswith("+0000")


def test_a_charset_that_would_swallow_a_delimiter_is_not_believed() -> None:
    # Found by the fuzzer: in GB 18030, 0x90 0x7C is one character, so reading these
    # bytes as declared would shift every MSH field after MSH-3 by one.
    raw = b"MSH|^~\\&|\xc6\xb4\x90||||||ADT^A01|C-GB|P|2.6||||||GB 18030-2000\rPID|1"
    ack = build_ack(read_header(raw), UNUSABLE)
    assert b"MSA|AE|C-GB|" in ack
    assert Message.parse(ack).msh.raw_component(9, 1) == "ACK"
