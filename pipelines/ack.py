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

from ehrbridge.pipelines.er7 import Encoding, Message, escape
from ehrbridge.pipelines.errors import (
    EhrbridgeError,
    Hl7Location,
    MessageRejected,
    MessageUnusable,
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
            format_dtm(now or datetime.now(UTC)),
            "",
            _ack_type(header, enc),
            _new_control_id(),
            header.processing_id or "P",
            header.version or DEFAULT_VERSION,
        ]
    )
    msa = [code.value, header.control_id]
    if error is not None and _version_tuple(header.version) < (2, 7):
        msa.append(escape(_msa_text(error), enc))  # MSA-3 text message, withdrawn in v2.7
    segments = [msh, f.join(["MSA", *msa])]
    if error is not None:
        segments.append(_err_segment(error, header))
    return ("\r".join(segments) + "\r").encode("utf-8")


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
    parts = []
    for part in (version or DEFAULT_VERSION).split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def header_of(message: Message) -> AckHeader:
    msh = message.segment("MSH")
    assert msh is not None  # Message.parse guarantees an MSH
    return AckHeader(
        encoding=message.encoding,
        sending=(msh.field(3), msh.field(4)),
        receiving=(msh.field(5), msh.field(6)),
        trigger=msh.component(9, 2),
        control_id=msh.field(10),
        processing_id=msh.component(11, 1),
        version=msh.component(12, 1),
    )


def read_header(raw: bytes) -> AckHeader:
    """The MSH fields an ACK echoes; best effort for messages that will not parse.

    Only the MSH line is parsed, so this costs a few microseconds and works
    for messages whose later segments are broken.
    """
    text = raw.decode("latin-1")
    start = text.find("MSH")
    if start >= 0:
        line = text[start:].replace("\r\n", "\r").replace("\n", "\r").split("\r", 1)[0]
        try:
            return header_of(Message.parse(line))
        except (EhrbridgeError, ValueError, IndexError):
            pass
    return AckHeader(DEFAULT_ENCODING, ("", ""), ("", ""), "", "", "P", DEFAULT_VERSION)


def _new_control_id() -> str:
    # <= 20 characters: MSH-10 is ST(20) in v2.3. Unique per process and millisecond.
    return f"A{_PREFIX}{int(time.time() * 1000) % 10**11:011d}{next(_counter) % 100000:05d}"
