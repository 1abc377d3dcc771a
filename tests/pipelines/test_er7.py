"""Unit and property tests for the lean ER7 reader (ehrbridge.pipelines.er7)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrbridge.core.errors import MessageRejected
from ehrbridge.pipelines.er7 import (
    DEFAULT_ENCODING,
    Encoding,
    Message,
    Segment,
    codec_for_charset,
    decode_message,
    escape,
    parse_batch,
    split_segments,
    unescape,
)

ENC = DEFAULT_ENCODING
MSH = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240102030405||ORU^R01^ORU_R01|CTRL42|P|2.5.1"
ORU = "\r".join(
    [
        MSH,
        "PID|1||123^^^HOSP&1.2.3&ISO^MR~987^^^SSA&2.16.840.1.113883.4.1&ISO^SS||Doe^Jane||19600214|F",
        "OBR|1|ORD1|FIL1|24362-6^Renal panel^LN",
        "OBX|1|NM|2160-0^Creatinine^LN||1.42|mg/dL^mg/dL^UCUM|||||F",
        "OBX|2|NM|62238-1^eGFR^LN||52|mL/min/{1.73_m2}^^UCUM|||||F",
        "NTE|1||Sample \\T\\ tube \\F\\ 2\\.br\\see lab",
    ]
)


def rejected(raw: str | bytes) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        Message.parse(raw)
    return info.value


# ----------------------------------------------------------------- unescape / escape


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b", "a^b"),
        ("a\\T\\b", "a&b"),
        ("a\\R\\b", "a~b"),
        ("a\\E\\b", "a\\b"),
        ("\\E\\\\F\\", "\\|"),
        ("line1\\.br\\line2", "line1\nline2"),
        ("a\\.sp\\b", "a\nb"),
        ("a\\.sp3\\b", "a\n\n\nb"),
        ("a\\.sk 2\\b", "a  b"),
        ("a\\.ce\\b", "a\nb"),
        ("\\.in+4\\a\\.ti-2\\b\\.fi\\c\\.nf\\d", "abcd"),
        ("\\H\\bold\\N\\ text", "bold text"),
        ("\\X41\\\\X4243\\", "ABC"),
        ("M\\XC3BC\\ller", "Müller"),  # hex bytes that are UTF-8
        ("M\\XFC\\ller", "Müller"),  # not UTF-8: latin-1
        ("\\X0D0A\\", "\r\n"),
    ],
)
def test_unescape_known_sequences(text: str, expected: str) -> None:
    assert unescape(text, ENC) == expected


@pytest.mark.parametrize(
    "text",
    [
        "\\Zlocal\\",  # locally defined escape: not ours to interpret
        "\\C2842\\",  # ISO 2022 character set switch
        "\\M2442\\",
        "\\Q\\",  # unknown
        "\\XZZ\\",  # not hex
        "\\X\\",  # no bytes
        "\\X123\\",  # odd number of digits
        "\\.zz\\",  # unknown formatting command
        "\\P\\",  # truncation escape without a truncation character
        "C:\\path\\file",  # a sloppy sender's literal backslashes
    ],
)
def test_unescape_keeps_unknown_sequences_literally(text: str) -> None:
    assert unescape(text, ENC) == text


def test_unescape_keeps_an_unterminated_sequence() -> None:
    assert unescape("a\\F\\b\\F", ENC) == "a|b\\F"
    assert unescape("trailing\\", ENC) == "trailing\\"


def test_unescape_fast_path_returns_the_same_object() -> None:
    text = "".join(["no", " escapes here"])
    assert unescape(text, ENC) is text


def test_unescape_uses_the_message_delimiters() -> None:
    enc = Encoding(field="#", component="$", repetition="*", escape="@", subcomponent="!")
    assert unescape("a@F@b@S@c@T@d@R@e@E@f\\F\\", enc) == "a#b$c!d*e@f\\F\\"


def test_truncation_escape_when_the_message_declares_one() -> None:
    enc = Encoding("|", "^", "~", "\\", "&", truncation="#")
    assert unescape("a\\P\\b", enc) == "a#b"
    assert escape("a#b", enc) == "a\\P\\b"
    assert enc.msh2 == "^~\\&#"


def test_escape_replaces_every_delimiter_and_line_break() -> None:
    assert escape("a|b^c&d~e\\f\rg\nh", ENC) == ("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X0D\\g\\.br\\h")
    assert escape("plain text", ENC) == "plain text"


@pytest.mark.parametrize(
    ("enc", "escaped"),
    [
        (Encoding("|", "^", "~", ".", "&"), "a.X0A.b.E.c"),
        (Encoding("|", "^", "~", "\\", "."), "a\\X0A\\b\\T\\c"),
    ],
)
def test_escape_avoids_formatting_commands_when_dot_is_a_delimiter(
    enc: Encoding, escaped: str
) -> None:
    assert escape("a\nb.c", enc) == escaped
    assert unescape(escaped, enc) == "a\nb.c"


# ----------------------------------------------------------------- splitting


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_split_segments_accepts_cr_lf_and_crlf(sep: str) -> None:
    assert split_segments(sep.join(["MSH|^~\\&", "PID|1", "OBX|1"]) + sep) == [
        "MSH|^~\\&",
        "PID|1",
        "OBX|1",
    ]


def test_split_segments_mixed_separators_blank_lines_and_mllp_framing() -> None:
    raw = "\x0bMSH|^~\\&\r\nPID|1\n\nPV1|1\r\rOBX|1\r \t\rNTE|1\x1c\r"
    assert split_segments(raw) == ["MSH|^~\\&", "PID|1", "PV1|1", "OBX|1", "NTE|1"]


# ----------------------------------------------------------------- message structure


def test_msh_numbering_counts_the_field_separator_as_msh1() -> None:
    msh = Message.parse(ORU).segments[0]
    assert msh.field(1) == "|"
    assert msh.field(2) == "^~\\&"
    assert msh.field(3) == "LAB"
    assert msh.field(9) == "ORU^R01^ORU_R01"
    assert msh.field(12) == "2.5.1"
    assert len(msh) == 12
    assert msh.repetitions(2) == ["^~\\&"]  # MSH-2 holds '~' but is not split on it
    assert msh.component(2) == "^~\\&"  # nor split on '^' or unescaped
    assert msh.value(1) == "|"
    assert msh.component(2, 2) == ""


def test_other_segments_count_fields_after_the_name() -> None:
    pid = Message.parse(ORU).segment("PID")
    assert pid is not None
    assert pid.name == "PID" and pid.index == 1
    assert pid.field(1) == "1"
    assert pid.field(2) == ""
    assert pid.field(5) == "Doe^Jane"
    assert pid.field(8) == "F"
    assert len(pid) == 8
    assert pid.field(9) == "" and pid.field(200) == ""


def test_repetitions_components_and_subcomponents() -> None:
    pid = Message.parse(ORU).segment("PID")
    assert pid is not None
    assert pid.repetitions(3) == [
        "123^^^HOSP&1.2.3&ISO^MR",
        "987^^^SSA&2.16.840.1.113883.4.1&ISO^SS",
    ]
    assert pid.component(3) == "123"
    assert pid.component(3, 4) == "HOSP&1.2.3&ISO"
    assert pid.component(3, 4, sub=2) == "1.2.3"
    assert pid.component(3, 4, rep=2, sub=2) == "2.16.840.1.113883.4.1"
    assert pid.component(3, 5, rep=2) == "SS"
    assert pid.components(3, rep=2) == ["987", "", "", "SSA&2.16.840.1.113883.4.1&ISO", "SS"]
    assert pid.component(3, 2) == ""  # empty component
    assert pid.component(3, 9) == ""  # beyond the last component
    assert pid.component(3, 1, rep=3) == ""  # beyond the last repetition
    assert pid.component(3, 4, sub=7) == ""
    assert pid.component(2) == "" and pid.repetitions(2) == [] and pid.components(2) == []
    assert pid.value(5) == "Doe^Jane"
    assert pid.fields()[:3] == ["1", "", pid.field(3)]
    assert pid.fields()[2].count("~") == 1


def test_values_are_unescaped_only_when_read() -> None:
    nte = Message.parse(ORU).segment("NTE")
    assert nte is not None
    assert nte.field(3) == "Sample \\T\\ tube \\F\\ 2\\.br\\see lab"  # raw
    assert nte.value(3) == "Sample & tube | 2\nsee lab"
    assert nte.component(3) == "Sample & tube | 2\nsee lab"
    assert nte.raw_component(3) == "Sample \\T\\ tube \\F\\ 2\\.br\\see lab"


def test_numbers_below_one_are_programming_errors() -> None:
    pid = Message.parse(ORU).segment("PID")
    assert pid is not None
    with pytest.raises(ValueError):
        pid.field(0)
    with pytest.raises(ValueError):
        pid.component(3, 0)
    with pytest.raises(ValueError):
        pid.component(3, 1, rep=0)
    with pytest.raises(ValueError):
        pid.component(3, 1, sub=0)


def test_segment_lookup_by_name_and_occurrence() -> None:
    message = Message.parse(ORU)
    assert [s.name for s in message.segments] == ["MSH", "PID", "OBR", "OBX", "OBX", "NTE"]
    assert [s.index for s in message.segments] == [0, 1, 2, 3, 4, 5]
    second = message.segment("OBX", 2)
    assert second is not None and second.field(5) == "52"
    assert message.segment("OBX", 3) is None
    assert message.segment("OBX", 0) is None
    assert message.segment("ZZZ") is None
    assert [s.field(1) for s in message.all("OBX")] == ["1", "2"]
    message.all("OBX").clear()  # a copy: the message is not changed
    assert len(message.all("OBX")) == 2
    assert message.all("ZZZ") == []


def test_msh_shortcuts() -> None:
    message = Message.parse(ORU)
    assert message.control_id == "CTRL42"
    assert message.message_type == ("ORU", "R01", "ORU_R01")
    assert message.version == "2.5.1"
    assert message.msh is message.segments[0]
    short = Message.parse("MSH|^~\\&|A||||||ADT^A01|")
    assert short.message_type == ("ADT", "A01", "")
    assert short.control_id == "" and short.version == ""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("PID-3", "123^^^HOSP&1.2.3&ISO^MR"),
        ("PID-3.4", "HOSP&1.2.3&ISO"),
        ("PID-3(2).4.1", "SSA"),
        ("PID-3(2)", "987^^^SSA&2.16.840.1.113883.4.1&ISO^SS"),
        ("PID-3(3)", ""),
        ("OBX-5", "1.42"),
        ("OBX[2]-5", "52"),
        ("OBX[3]-5", ""),
        ("OBX-6.1", "mg/dL"),
        ("NTE-3", "Sample & tube | 2\nsee lab"),
        ("MSH-1", "|"),
        ("MSH-2", "^~\\&"),
        ("MSH-9.2", "R01"),
        ("ZZZ-1", ""),
        (" PID-8 ", "F"),
    ],
)
def test_get_paths(path: str, expected: str) -> None:
    assert Message.parse(ORU).get(path) == expected


@pytest.mark.parametrize("path", ["PID", "pid-3", "PID-x", "PID-3..1", "PID-3(a)", "PIDX-1", ""])
def test_get_rejects_malformed_paths(path: str) -> None:
    with pytest.raises(ValueError):
        Message.parse(ORU).get(path)


def test_segment_without_fields_and_to_er7_round_trip() -> None:
    message = Message.parse(MSH + "\nNTE\nZPI|a")
    nte = message.segment("NTE")
    assert nte is not None and len(nte) == 0 and nte.field(1) == ""
    assert message.to_er7() == MSH + "\rNTE\rZPI|a"


def test_z_segments_and_digits_in_names() -> None:
    message = Message.parse(MSH + "\rPD1|||x\rZP1|custom^value\rIN1|1")
    assert [s.name for s in message.segments] == ["MSH", "PD1", "ZP1", "IN1"]
    assert message.get("ZP1-1.2") == "value"


# ----------------------------------------------------------------- delimiters


def test_custom_delimiters_from_msh() -> None:
    raw = "MSH#$*@!#APP#FAC#####ORU$R01#1#P#2.3\rPID#1##a$b!c*d$e##N@S@me"
    message = Message.parse(raw)
    assert message.encoding == Encoding("#", "$", "*", "@", "!")
    pid = message.segment("PID")
    assert pid is not None
    assert pid.repetitions(3) == ["a$b!c", "d$e"]
    assert pid.component(3, 2, sub=2) == "c"
    assert pid.component(3, 2, rep=2) == "e"
    assert pid.value(5) == "N$me"
    assert message.message_type == ("ORU", "R01", "")
    assert message.get("MSH-2") == "$*@!"


def test_field_separator_other_than_pipe() -> None:
    # hapi-hl7v2 segmentfinder_a24: '^' separates fields, '~' components, '|' repetitions
    raw = "MSH^~|\\&^SENDING^200M^RECEIVING^200^20120918^^ADT~A24^2003582144^T^2.4\r"
    raw += "PID^1^^11111~~~FOO&&0363~NI|22222^^SMITH~JOHN"
    message = Message.parse(raw)
    assert message.encoding == Encoding("^", "~", "|", "\\", "&")
    assert message.message_type == ("ADT", "A24", "")
    assert message.get("PID-3(2)") == "22222"
    assert message.get("PID-3.4.3") == "0363"


def test_truncation_character_in_msh2() -> None:
    message = Message.parse("MSH|^~\\&#|A|||||||X|P|2.7\rNTE|1||a#b\\P\\c")
    assert message.encoding.truncation == "#"
    assert message.get("NTE-3") == "a#b#c"


@pytest.mark.parametrize(
    ("msh2", "expected"),
    [
        ("^~\\", Encoding("|", "^", "~", "\\", "&")),  # missing subcomponent separator
        ("^~", Encoding("|", "^", "~", "\\", "&")),
        ("^", Encoding("|", "^", "~", "\\", "&")),
        ("$*@", Encoding("|", "$", "*", "@", "&")),
    ],
)
def test_short_msh2_is_completed_with_the_standard_characters(
    msh2: str, expected: Encoding
) -> None:
    assert Message.parse(f"MSH|{msh2}|A\rPID|1").encoding == expected


@pytest.mark.parametrize(
    "raw",
    [
        "MSH",  # no field separator
        "MSH|",  # empty MSH-2
        "MSH||A|B",  # empty MSH-2
        "MSHA^~\\&A",  # alphanumeric field separator
        "MSH ^~\\& ",  # whitespace field separator
        "MSH|^~\\\\&|A",  # duplicated escape character (double-escaped source)
        "MSH|^^\\&|A",  # duplicated component separator
        "MSH|~\\&|A",  # three characters whose default completion collides ('&')
        "MSH|^~\\&#!|A",  # six characters
        "MSH|ABCD|A",  # letters
    ],
)
def test_missing_or_garbled_encoding_characters_are_rejected(raw: str) -> None:
    error = rejected(raw)
    assert error.reason == "hl7.bad_encoding"
    assert error.location is not None and error.location.segment == "MSH"
    assert error.hl7_error_code == 102


# ----------------------------------------------------------------- rejections and tolerance


@pytest.mark.parametrize("raw", ["", "   ", "PID|1||123", "hello world", "MS", "\x00\x01\x02"])
def test_input_not_starting_with_msh_is_rejected(raw: str) -> None:
    assert rejected(raw).reason == "hl7.no_msh"


@pytest.mark.parametrize(
    "raw",
    [
        "FHS|^~\\&|A\rBHS|^~\\&|A\r" + MSH + "\rBTS|1\rFTS|1",
        "BHS|^~\\&|A\r" + MSH + "\rBTS|1",
        MSH + "\rPID|1\r" + MSH + "\rPID|2",  # two messages glued together
        MSH + "\rPID|1\rBTS|1",
    ],
)
def test_batches_are_not_single_messages(raw: str) -> None:
    assert rejected(raw).reason == "hl7.batch"


@pytest.mark.parametrize(
    ("line", "reported"),
    [
        ("pid|1||SECRET", "???"),  # lowercase name
        ("PI|0001|SECRET", "???"),  # two-letter name
        ("PIDX|1|SECRET", "PID"),  # name not followed by the field separator
        ("8866||||SECRET", "???"),  # a wrapped continuation line (LF inside a field)
        ("1AB|SECRET", "???"),  # name must start with a letter
        ("/* comment SECRET */", "???"),
    ],
)
def test_invalid_segment_lines_are_rejected_without_phi(line: str, reported: str) -> None:
    error = rejected(MSH + "\rPID|1\r" + line + "\rOBX|1")
    assert error.reason == "hl7.bad_segment"
    assert error.location is not None and error.location.segment == reported
    assert "SECRET" not in str(error) and "segment 3" in error.detail


def test_indented_segments_and_whitespace_lines_are_tolerated() -> None:
    message = Message.parse(MSH + "\r  PID|1||42\r \t \rOBX|1")
    assert [s.name for s in message.segments] == ["MSH", "PID", "OBX"]
    assert [s.index for s in message.segments] == [0, 1, 2]
    assert message.get("PID-3") == "42"


@pytest.mark.parametrize(
    ("raw", "control_id", "names"),
    [
        ("MSH|^~\\&|A|B", "", ["MSH"]),
        ("MSH|^~", "", ["MSH"]),  # cut inside MSH-2: standard characters assumed
        (MSH + "\rPID|1||12", "CTRL42", ["MSH", "PID"]),  # cut inside a field
        (MSH + "\rPID", "CTRL42", ["MSH", "PID"]),  # cut after a segment name
    ],
)
def test_truncated_messages_parse_as_far_as_they_go(
    raw: str, control_id: str, names: list[str]
) -> None:
    message = Message.parse(raw)
    assert message.control_id == control_id
    assert [s.name for s in message.segments] == names


def test_mllp_framing_bom_and_whitespace_around_the_message() -> None:
    for raw in (
        b"\x0b" + ORU.encode() + b"\x1c\r",
        b"\xef\xbb\xbf" + ORU.encode(),
        b"\r\n  " + ORU.encode() + b"\r\n\r\n",
    ):
        message = Message.parse(raw)
        assert message.control_id == "CTRL42"
        assert message.get("NTE-3").endswith("see lab")


@given(st.binary(max_size=300))
def test_garbage_bytes_parse_or_are_rejected(raw: bytes) -> None:
    for data in (raw, b"MSH|^~\\&|" + raw, b"MSH" + raw):
        try:
            message = Message.parse(data)
        except MessageRejected as error:
            assert error.reason.startswith("hl7.")
        else:
            assert message.segments[0].name == "MSH"


@given(st.text(max_size=200))
def test_garbage_text_parses_or_is_rejected(text: str) -> None:
    for data in (text, "MSH|^~\\&|" + text, "MSH" + text):
        try:
            Message.parse(data)
        except MessageRejected as error:
            assert error.reason.startswith("hl7.")


# ----------------------------------------------------------------- character sets


def _with_charset(charset: str, name: str) -> str:
    return f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5|||||DE|{charset}\rPID|1||7||{name}"


@pytest.mark.parametrize(
    ("charset", "codec", "name"),
    [
        ("UNICODE UTF-8", "utf-8", "Müller^Zoë"),
        ("8859/1", "latin-1", "Müller^Zoë"),
        ("8859/2", "iso8859-2", "Łódź^Wąs"),
        ("ISO IR144", "iso8859-5", "Иванов^Пётр"),
        ("8859/15", "iso8859-15", "€uro^Œuvre"),
        ("", "utf-8", "Müller^Zoë"),  # no MSH-18: UTF-8
        ("", "latin-1", "Müller^Zoë"),  # no MSH-18, not UTF-8: latin-1
        ("8859/1", "utf-8", "Müller^Zoë"),  # mislabelled UTF-8 (see module docstring)
        ("ASCII", "utf-8", "Müller^Zoë"),
        ("KLINGON", "latin-1", "Müller^Zoë"),  # unknown label: UTF-8, else latin-1
        ("8859/1~UNICODE UTF-8", "latin-1", "Müller^Zoë"),  # first repetition counts
    ],
)
def test_bytes_are_decoded_with_the_msh18_character_set(
    charset: str, codec: str, name: str
) -> None:
    raw = _with_charset(charset, name).encode(codec)
    message = Message.parse(raw)
    assert message.get("PID-5") == name
    assert message.get("PID-5.1") == name.split("^", maxsplit=1)[0]


def test_declared_charset_that_cannot_decode_falls_back() -> None:
    raw = _with_charset("ASCII", "Müller").encode("latin-1")  # neither ASCII nor UTF-8
    assert Message.parse(raw).get("PID-5") == "Müller"


def test_utf16_with_bom() -> None:
    raw = _with_charset("UNICODE UTF-16", "Müller").encode("utf-16")
    assert Message.parse(raw).get("PID-5") == "Müller"


def test_iso2022_jp_is_decoded_even_though_its_bytes_are_ascii() -> None:
    raw = _with_charset("ISO IR87", "山田^太郎").encode("iso2022_jp")
    assert raw.isascii()
    assert Message.parse(raw).get("PID-5.1") == "山田"


def test_non_ascii_in_str_input_and_escaped_hex() -> None:
    message = Message.parse(MSH + "\rPID|1||7||Müller^J\\XC3B6\\rg")
    assert message.get("PID-5.1") == "Müller"
    assert message.get("PID-5.2") == "Jörg"


@pytest.mark.parametrize(
    ("label", "codec"),
    [
        ("UNICODE UTF-8", "utf-8"),
        ("unicode  utf-8", "utf-8"),
        ("8859/1", "iso8859-1"),
        ("ISO IR100", "iso8859-1"),
        ("ISO_IR 192", "utf-8"),
        ("GB 18030-2000", "gb18030"),
        ("windows-1252", "cp1252"),
        ("UTF-8", "utf-8"),
    ],
)
def test_codec_for_charset(label: str, codec: str) -> None:
    assert codec_for_charset(label) == codec


def test_codec_for_unknown_charset_is_none() -> None:
    assert codec_for_charset("NOT A CHARSET") is None


@given(st.binary(max_size=400))
def test_decode_message_never_raises(raw: bytes) -> None:
    assert isinstance(decode_message(raw), str)
    assert isinstance(decode_message(b"MSH|^~\\&|||||||||||||||||" + raw), str)


# ----------------------------------------------------------------- batches


def test_parse_batch_with_file_and_batch_envelopes() -> None:
    raw = "\r".join(
        [
            "FHS|^~\\&|A",
            "BHS|^~\\&|A",
            MSH,
            "PID|1||first",
            "MSH#$*@!#A######ADT$A01#2#P#2.3",
            "PID#1##second$x",
            "BTS|2",
            "BHS|^~\\&|A",
            MSH.replace("CTRL42", "CTRL43"),
            "BTS|1",
            "FTS|2",
        ]
    )
    messages = parse_batch(raw.encode())
    assert [m.control_id for m in messages] == ["CTRL42", "2", "CTRL43"]
    assert messages[0].get("PID-3") == "first"
    assert messages[1].encoding.field == "#" and messages[1].get("PID-3.1") == "second"
    assert [s.index for s in messages[1].segments] == [0, 1]


def test_parse_batch_without_envelopes_and_empty_batch() -> None:
    messages = parse_batch(MSH + "\nPID|1\n" + MSH + "\nPID|2\n")
    assert [m.get("PID-1") for m in messages] == ["1", "2"]
    assert parse_batch("BHS|^~\\&|A\rBTS|0") == []
    assert len(parse_batch(ORU)) == 1


@pytest.mark.parametrize(
    "lines",
    [
        ["BHS|^~\\&", "EVN|A04", "PID|1", "BTS|1"],  # content before any MSH
        ["BHS|^~\\&", MSH, "EVN|A04", "BHS|^~\\&", "PID|1", "BTS|1"],  # BHS inside a message
        ["FHS|^~\\&", "BHS|^~\\&", MSH, "FHS|^~\\&", "BTS|1", "FTS|1"],  # FHS not first
        ["FHS|^~\\&", MSH, "FTS|1", MSH],  # content after FTS
        ["BHS|^~\\&", "BHS|^~\\&", MSH],  # BHS inside an open batch
    ],
)
def test_malformed_batches_are_rejected(lines: list[str]) -> None:
    with pytest.raises(MessageRejected) as info:
        parse_batch("\r".join(lines))
    assert info.value.reason == "hl7.bad_batch"


def test_parse_batch_checks_each_message() -> None:
    with pytest.raises(MessageRejected) as info:
        parse_batch("BHS|^~\\&\r" + MSH + "\rpid|1\rBTS|1")
    assert info.value.reason == "hl7.bad_segment"


# ----------------------------------------------------------------- round-trip property

# Delimiters a sender may choose: printable, not alphanumeric, not whitespace.
DELIMITER_POOL = "|^~\\&#$*@!%+:;=?/<>,.'`{}[]()-_§"
NAMES = st.from_regex(r"\A[A-Z][A-Z0-9]{2}\Z").filter(
    lambda n: n not in {"MSH", "FHS", "BHS", "BTS", "FTS"}
)
LEAF_TEXT = st.text(
    alphabet=st.sampled_from(DELIMITER_POOL + string.ascii_letters + string.digits + " \r\nüÖ€山"),
    max_size=8,
)
Tree = list[list[list[list[list[str]]]]]  # segments > fields > repetitions > components > subs


@st.composite
def encodings(draw: st.DrawFn) -> Encoding:
    chars = draw(st.permutations(DELIMITER_POOL).map(lambda p: p[:6]))
    truncation = chars[5] if draw(st.booleans()) else None
    return Encoding(chars[0], chars[1], chars[2], chars[3], chars[4], truncation)


def leaf_lists(max_size: int) -> st.SearchStrategy[list[str]]:
    return st.lists(LEAF_TEXT, min_size=1, max_size=max_size)


FIELDS = st.lists(
    st.lists(st.lists(leaf_lists(3), min_size=1, max_size=3), min_size=1, max_size=3),
    max_size=6,
)


def build(enc: Encoding, names: list[str], tree: Tree, msh_fields: list[str], sep: str) -> str:
    lines = [enc.field.join(["MSH", enc.msh2, *msh_fields])]
    for name, fields in zip(names, tree, strict=True):
        texts = [
            enc.repetition.join(
                enc.component.join(
                    enc.subcomponent.join(escape(leaf, enc) for leaf in comp) for comp in rep
                )
                for rep in reps
            )
            for reps in fields
        ]
        lines.append(enc.field.join([name, *texts]))
    return sep.join(lines)


@settings(max_examples=150, deadline=None)
@given(
    enc=encodings(),
    segments=st.lists(st.tuples(NAMES, FIELDS), min_size=1, max_size=4),
    msh_fields=st.lists(LEAF_TEXT, max_size=10),
    sep=st.sampled_from(["\r", "\n", "\r\n"]),
    as_bytes=st.booleans(),
)
def test_every_value_round_trips_through_escape_and_parse(
    enc: Encoding,
    segments: list[tuple[str, list[list[list[list[str]]]]]],
    msh_fields: list[str],
    sep: str,
    as_bytes: bool,
) -> None:
    names = [name for name, _ in segments]
    tree = [fields for _, fields in segments]
    msh_texts = [escape(text, enc) for text in msh_fields]
    raw = build(enc, names, tree, msh_texts, sep)
    message = Message.parse(raw.encode("utf-8") if as_bytes else raw)

    assert message.encoding == enc
    assert [s.name for s in message.segments] == ["MSH", *names]
    msh = message.segments[0]
    assert [msh.value(n) for n in range(3, 3 + len(msh_fields))] == msh_fields
    for segment, fields in zip(message.segments[1:], tree, strict=True):
        assert len(segment) == len(fields)
        for n, reps in enumerate(fields, start=1):
            assert len(segment.repetitions(n)) == (len(reps) if segment.field(n) else 0)
            for r, comps in enumerate(reps, start=1):
                for c, subs in enumerate(comps, start=1):
                    for s, leaf in enumerate(subs, start=1):
                        assert segment.component(n, c, rep=r, sub=s) == leaf
                        occurrence = names[: segment.index - 1].count(segment.name) + 1
                        path = f"{segment.name}[{occurrence}]"
                        assert message.get(f"{path}-{n}({r}).{c}.{s}") == leaf
                    if len(subs) == 1:
                        assert segment.component(n, c, rep=r) == subs[0]


@given(enc=encodings(), text=st.text(max_size=40))
def test_unescape_inverts_escape(enc: Encoding, text: str) -> None:
    escaped = escape(text, enc)
    delimiters = [enc.field, enc.component, enc.repetition, enc.subcomponent, "\r", "\n"]
    for delimiter in delimiters + ([enc.truncation] if enc.truncation else []):
        assert delimiter not in escaped
    assert unescape(escaped, enc) == text


def test_segment_can_be_built_directly() -> None:
    segment = Segment("OBX", 3, "OBX|1|NM|2160-0^Creatinine^LN||1.42", ENC)
    assert segment.component(3, 2) == "Creatinine" and segment.value(5) == "1.42"
    assert repr(segment) == "<Segment OBX #3>"
