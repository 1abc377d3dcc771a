"""Sample messages on disk: HL7v2 files (one or many messages) and FHIR JSON.

``mappings test``, ``explain`` and ``unmapped`` read what an engineer has at
hand: a ``.hl7`` file exported from an interface engine (CR or LF line ends,
several messages, maybe a FHS/BHS batch envelope, maybe MLLP bytes), or a
FHIR ``.json`` resource or Bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from ehrbridge.core.contracts import Kind
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import Extraction, FactRules, Trace, extract
from ehrbridge.pipelines.fhir_facts import extract_fhir
from ehrbridge.pipelines.history import by_episode

_BATCH_LINE = re.compile(rb"^(?:FHS|BHS|BTS|FTS)\b[^\r\n]*[\r\n]*", re.MULTILINE)
_BATCH_TAGS = (b"FHS", b"BHS", b"BTS", b"FTS")


@dataclass(frozen=True, slots=True)
class Input:
    """One message to feed the pipeline, and where it came from."""

    kind: Kind
    payload: bytes
    name: str  # "oru-panel.hl7", "oru-panel.hl7 #2"


def kind_of(payload: bytes) -> Kind:
    return Kind.FHIR if payload.lstrip()[:1] in (b"{", b"[") else Kind.HL7V2


def split_hl7(raw: bytes) -> list[bytes]:
    """The messages of an HL7v2 file: batch envelope lines and MLLP bytes removed."""
    text = raw.replace(b"\x0b", b"").replace(b"\x1c", b"")
    if any(tag in text for tag in _BATCH_TAGS):  # a scan of a large history costs
        text = _BATCH_LINE.sub(b"", text)
    starts = _message_starts(text)
    if not starts:
        return [text] if text.strip() else []
    bounds = [*starts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds) if text[a:b].strip()]


def _message_starts(text: bytes) -> list[int]:
    """Where each line starting "MSH" begins (segments end in CR; files may use LF).

    ``bytes.find`` rather than a regular expression: a backfill splits
    histories of millions of messages, and the lookbehind scan was 10x slower.
    """
    starts = [0] if text.startswith(b"MSH") else []
    for needle in (b"\rMSH", b"\nMSH"):
        at = text.find(needle)
        while at >= 0:
            starts.append(at + 1)
            at = text.find(needle, at + 1)
    return sorted(starts)


def inputs_from_bytes(raw: bytes, name: str) -> list[Input]:
    if kind_of(raw) is Kind.FHIR:
        return [Input(Kind.FHIR, raw, name)]
    messages = split_hl7(raw)
    if len(messages) == 1:
        return [Input(Kind.HL7V2, messages[0], name)]
    return [Input(Kind.HL7V2, m, f"{name} #{i}") for i, m in enumerate(messages, start=1)]


def read_inputs(path: Path) -> list[Input]:
    return inputs_from_bytes(path.read_bytes(), path.name)


def extract_input(item: Input, rules: FactRules, trace: Trace | None = None) -> Extraction:
    """The same extraction the pipeline runs (raises what ingest would answer AE/AR for)."""
    if item.kind is Kind.FHIR:
        # As ProcessStage.extract: a Bundle's history gives one prediction per episode.
        return by_episode(extract_fhir(item.payload, rules, trace), rules.mapping)
    return extract(Message.parse(item.payload), rules, trace)
