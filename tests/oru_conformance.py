"""Strict HL7v2 conformance of the ORU^R01 messages ehrbridge sends.

A receiving EHR may refuse what the base standard requires, so every ORU we
build must pass hl7apy's STRICT validation against the ORU_R01 structure of
its own version (MSH-12). ``strict_errors`` lists every problem hl7apy finds
(it raises only the first).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hl7apy import SUPPORTED_LIBRARIES as SUPPORTED_VERSIONS
from hl7apy.core import Message as Hl7apyMessage
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

# hl7apy knows these versions; 2.7.1 it does not, so 2.7 is the closest it can check.
_HL7APY_VERSION = {"2.7.1": "2.7"}


def strict_errors(message: bytes) -> list[str]:
    """Every error of ``message`` under hl7apy's strict ORU_R01 validation; [] when it conforms."""
    text = message.decode("utf-8").replace("\r\n", "\r").strip("\r")
    msh, rest = text.split("\r", 1)
    fields = msh.split("|")  # fields[11] is MSH-12, the version
    version = _HL7APY_VERSION.get(fields[11], fields[11])
    if version not in SUPPORTED_VERSIONS:
        return [f"hl7apy does not know HL7 version {version}"]
    fields[11] = version
    try:
        # Parsed leniently (hl7apy's strict parser refuses HD subcomponents in CX.4),
        # then the whole tree is validated strictly against the ORU_R01 structure.
        parsed: Hl7apyMessage = parse_message("|".join(fields) + "\r" + rest)
    except HL7apyException as exc:
        return [f"does not parse: {exc}"]
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.txt"
        with contextlib.suppress(HL7apyException):
            parsed.validate(report_file=str(report))
        lines = report.read_text().splitlines() if report.exists() else []
    return [line.removeprefix("Error: ") for line in lines if line.startswith("Error: ")]
