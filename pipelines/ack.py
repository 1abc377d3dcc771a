"""HL7v2 acknowledgements (original mode): AA, AE and AR with MSA and ERR.

The ACK answers in the sender's own terms: its encoding characters, its
version (MSH-12) and processing id (MSH-11), sending and receiving
application/facility swapped, and MSA-2 echoing its MSH-10 so the sender can
correlate. Negative ACKs carry the reason twice: MSA-3 (read by older
engines; 80 characters, ST) and an ERR segment in the layout of the
message's version -- ERR-1 (ELD) up to v2.4, ERR-2/3/4/8 from v2.5 on, where
ERR-1 was withdrawn.

This is on the hot path (one ACK per message), so it is string assembly over
the lean reader. Every layout it produces is validated with hl7apy in the
tests, and hl7apy builds the messages where speed does not matter.

Enhanced-mode acknowledgement (MSH-15/16, CA/CE/CR) is not implemented: every
message gets exactly one original-mode ACK, which is what MLLP senders wait for.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from ehrbridge.core.errors import (
    EhrbridgeError,
    Hl7Location,
    MessageRejected,
    MessageUnusable,
)
from ehrbridge.pipelines.er7 import (
    Encoding,
    Message,
    Segment,
    codec_for_charset,
    decode_with_codec,
    escape,
    read_encoding,
)
from ehrbridge.pipelines.hl7time import format_dtm

DEFAULT_ENCODING = Encoding(field="|", component="^", repetition="~", escape="\\", subcomponent="&")
DEFAULT_VERSION = "2.5"
_ERROR_TEXT = {  # HL7 table 0357, message error condition codes
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    207: "Application internal error",
}
_MSA3_MAX = 80  # MSA-3 text message is ST(80) in v2.1-2.4
# MSH-3/4/5/6/9/11/12 are echoed only up to this length (HD is 227 characters at
# most); a longer one is left empty so a hostile header cannot inflate every ACK.
# MSH-10 is always echoed whole: the sender correlates by it.
_ECHO_MAX = 256
_FRAMING = str.maketrans("", "", "\x0b\x1c\r\n")  # MLLP start/end block, segment ends
_counter = itertools.count()
_PREFIX = f"{os.getpid() % 1000:03d}"


class AckCode(StrEnum):
    AA = "AA"  # accepted: durably stored
    AE = "AE"  # error: valid HL7 but unusable; kept in the dead-letter store
    AR = "AR"  # rejected: unparseable, or we could not store it (resend)


@dataclass(frozen=True, slots=True)
class AckHeader:
    """The parts of the inbound MSH the ACK echoes, still in ER7 (escaped) form."""

    encoding: Encoding
    sending: tuple[str, str]  # MSH-3, MSH-4
    receiving: tuple[str, str]  # MSH-5, MSH-6
    trigger: str  # MSH-9.2
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12
    codec: str = "utf-8"  # the codec that decoded the message: the ACK is encoded with it
    charset: str = ""  # MSH-18 when it named that codec: the ACK declares it too


def ack_code_for(error: EhrbridgeError | None) -> AckCode:
    if error is None:
        return AckCode.AA
    if isinstance(error, MessageUnusable):
        return AckCode.AE
    return AckCode.AR  # unparseable, or transient: the sender should resend


def build_ack(
    header: AckHeader, error: EhrbridgeError | None = None, *, now: datetime | None = None
) -> bytes:
    """The ACK for the message whose MSH is ``header``, as ER7 bytes."""
    code = ack_code_for(error)
    enc = header.encoding
    f = enc.field
    msh = f.join(
        [
            "MSH",
            enc.component + enc.repetition + enc.escape + enc.subcomponent,
            header.receiving[0],  # our MSH-3/4 are the sender's MSH-5/6
            header.receiving[1],
            header.sending[0],
            header.sending[1],
            # '+' or '.' may be a delimiter of this message: our own text is escaped too.
            escape(format_dtm(now or datetime.now(UTC)), enc),
            "",
            _ack_type(header, enc),
            _new_control_id(),
            header.processing_id or "P",
            header.version or escape(DEFAULT_VERSION, enc),
            *(["", "", "", "", "", header.charset] if header.charset else []),  # MSH-18
        ]
    )
    msa = [code.value, header.control_id]
    if error is not None and _version_tuple(header.version) < (2, 7):
        msa.append(escape(_msa_text(error), enc))  # MSA-3 text message, withdrawn in v2.7
    segments = [msh, f.join(["MSA", *msa])]
    if error is not None:
        segments.append(_err_segment(error, header))
    text = "\r".join(segment.translate(_FRAMING) for segment in segments) + "\r"
    # Echoed fields were decoded with this codec, so they go back as the same bytes;
    # our own text is ASCII but for a unit or code named in a detail.
    try:
        return text.encode(header.codec, errors="replace")
    except (LookupError, UnicodeError):  # a codec that cannot write our text at all
        return text.encode("utf-8", errors="replace")


def _ack_type(header: AckHeader, enc: Encoding) -> str:
    """MSH-9 of the ACK: ``ACK^<inbound trigger>``, plus the message structure
    component (``^ACK``) from v2.3.1 on, where MSH-9.3 exists."""
    parts = ["ACK", header.trigger]
    if _version_tuple(header.version) >= (2, 3, 1):
        parts.append("ACK")
    return enc.component.join(parts).rstrip(enc.component)


def _msa_text(error: EhrbridgeError) -> str:
    text = error.detail
    return text if len(text) <= _MSA3_MAX else text[: _MSA3_MAX - 3] + "..."


def _err_segment(error: EhrbridgeError, header: AckHeader) -> str:
    enc = header.encoding
    location = getattr(error, "location", None) or Hl7Location("MSH")
    code = getattr(error, "hl7_error_code", 207)
    if not isinstance(error, (MessageRejected, MessageUnusable)):
        code = 207  # e.g. storage unavailable: an application error, not the message's fault
    c, s = enc.component, enc.subcomponent
    code_text = _ERROR_TEXT.get(code, "Application internal error")
    location_parts = [location.segment, str(location.sequence)]
    if location.field is not None:
        location_parts.append(str(location.field))
    if _version_tuple(header.version) < (2, 5):
        # ERR-1 error code and location (ELD): segment^sequence^field^code(CE as subcomponents)
        while len(location_parts) < 3:
            location_parts.append("")
        eld = c.join([*location_parts, s.join([str(code), code_text, "HL70357"])])
        return enc.field.join(["ERR", eld])
    # ERR-2 location (ERL), ERR-3 HL7 error code (CWE), ERR-4 severity, ERR-8 user message
    erl = c.join(location_parts)
    cwe = c.join([str(code), code_text, "HL70357"])
    user_message = escape(f"{error.reason}: {error.detail}", enc)
    return enc.field.join(["ERR", "", erl, cwe, "E", "", "", "", user_message])


def _version_tuple(version: str) -> tuple[int, ...]:
    """MSH-12.1 as numbers: ASCII digits only ('2.5.¹' is 2.5.0), at most 4 per part."""
    parts = []
    for part in (version or DEFAULT_VERSION).split(".")[:3]:
        digits = "".join(ch for ch in part[:8] if "0" <= ch <= "9")[:4]
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def header_of(message: Message, codec: str = "utf-8") -> AckHeader:
    """The echoed MSH fields of a parsed message, raw (still escaped)."""
    msh = message.msh
    return AckHeader(
        encoding=message.encoding,
        sending=(_echo(msh.field(3)), _echo(msh.field(4))),
        receiving=(_echo(msh.field(5)), _echo(msh.field(6))),
        trigger=_echo(msh.raw_component(9, 2)),
        control_id=msh.field(10).translate(_FRAMING),
        processing_id=_echo(msh.raw_component(11, 1)),
        version=_echo(msh.raw_component(12, 1)),
        codec=codec,
        charset=_declared_charset(msh, codec),
    )


def _declared_charset(msh: Segment, codec: str) -> str:
    """MSH-18 as sent, if the message was read in the codec it names (else '')."""
    label = msh.raw_component(18, 1)
    if not label or len(label) > _ECHO_MAX or codec_for_charset(label.strip()) != codec:
        return ""
    return label.translate(_FRAMING)


def _echo(value: str) -> str:
    return "" if len(value) > _ECHO_MAX else value.translate(_FRAMING)


def read_header(raw: bytes, charset: str = "utf-8") -> AckHeader:
    """The MSH fields an ACK echoes; best effort for messages that will not parse.

    Only the MSH line is read, so this costs a few microseconds and works for
    messages whose later segments are broken. The bytes are decoded as the
    message is (MSH-18, else the site's ``charset``), so MSA-2 gives MSH-10
    back byte for byte. When MSH-1/MSH-2 are unusable, MSH-10 is still read
    with ``|^~\\&`` (or the declared field separator) and the ACK uses the
    standard delimiters. Never raises.
    """
    text, codec = decode_with_codec(raw, charset)
    start = text.find("MSH")
    if start < 0:
        return empty_header(codec)
    end = len(text)
    for stop in ("\r", "\n"):
        at = text.find(stop, start)
        end = at if 0 <= at < end else end
    line = text[start:end]
    try:
        enc = read_encoding(line)
        return header_of(Message(enc, [Segment("MSH", 0, line, enc)]), codec)
    except EhrbridgeError:
        return _fallback_header(line, codec)


def _fallback_header(line: str, codec: str) -> AckHeader:
    """MSH-10 and friends from a line whose encoding characters are unusable."""
    fs = line[3:4]
    if not fs or fs.isalnum() or fs in " \t":  # 0x1C counts as whitespace in Python
        return empty_header(codec)
    fields = [DEFAULT_ENCODING.field, *line[4:].split(fs)]  # fields[k] is MSH-(k+1)
    fields += [""] * (12 - len(fields))
    enc = DEFAULT_ENCODING

    def echoed(n: int) -> str:
        return "" if len(fields[n - 1]) > _ECHO_MAX else escape(fields[n - 1], enc)

    return AckHeader(
        encoding=enc,
        sending=(echoed(3), echoed(4)),
        receiving=(echoed(5), echoed(6)),
        trigger="",  # MSH-9 components cannot be told apart without MSH-2
        control_id=escape(fields[9], enc).translate(_FRAMING),
        processing_id="P",
        version=DEFAULT_VERSION,
        codec=codec,
    )


def empty_header(codec: str = "utf-8") -> AckHeader:
    """The header of an ACK to a frame with no readable MSH: standard delimiters, v2.5."""
    return AckHeader(DEFAULT_ENCODING, ("", ""), ("", ""), "", "", "P", DEFAULT_VERSION, codec)


def _new_control_id() -> str:
    # <= 20 characters: MSH-10 is ST(20) in v2.3. Unique per process and millisecond.
    return f"A{_PREFIX}{int(time.time() * 1000) % 10**11:011d}{next(_counter) % 100000:05d}"
