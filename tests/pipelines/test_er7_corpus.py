"""The lean ER7 reader agrees with hl7apy on every message of the shared corpus.

Every ``.hl7``/``.txt``/``.er7`` file under /work/shared/corpus/hl7v2 is split
into messages by an independent splitter (CR/LF/CRLF lines; FHS/BHS/BTS/FTS
dropped; a new message at each MSH; lines before the first MSH form a chunk of
their own). For each chunk:

* our reader must parse it or raise ``MessageRejected`` -- never anything else
  (the same holds for the whole file through ``Message.parse``/``parse_batch``);
* if hl7apy (``parse_message(find_groups=False, TOLERANT)``) parses it too, we
  must agree on the segment names in order, on every field's ER7 text and on
  every component of every repetition;
* if hl7apy parses it and we reject it, that is a failure (no such case today).

hl7apy is not a neutral oracle: it normalises what it parses. Each difference
below is a documented hl7apy behaviour (with the function responsible); a
disagreement is *explained* only if applying exactly those transformations to
our raw text reproduces hl7apy's text. Anything else fails the test.

QUIRKS (ids used in the counts):

``blank-field``
    ``parser.parse_fields`` skips a field whose text is whitespace-only, so
    hl7apy has no field at that position; ours must be blank there.
``blank-or-trailing``
    ``parse_components``/``parse_subcomponents`` drop whitespace-only
    components of composite types, and ``Element.to_er7`` omits trailing empty
    children (``10101^^^`` -> ``10101``). Equal after mapping whitespace-only
    components/subcomponents to '' and dropping trailing empty ones.
``segment-strip``
    ``parse_segments`` calls ``s.strip()`` on each segment: trailing whitespace
    of the last field is lost.
``reescape``
    ``TextualDataType._escape_value`` re-escapes an escape character that is
    not part of ``\\H\\ \\N\\ \\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` when serialising, so
    ``\\.br\\`` comes back as ``\\E\\.br\\E\\`` (same for ``\\X..\\``, ``\\Z..\\``).
``unnamed-field``/``unnamed-component``
    A field (component) at a position missing from hl7apy's table for the
    message version gets no name, so its position is lost (``Segment.to_er7``
    then even misplaces it). Blank ones are dropped. We compare hl7apy's
    unnamed children, in order, with our non-blank ones at those positions;
    at field level ``Field.to_er7`` writes the known positions and then the
    unnamed components, so our repetition is packed the same way first.
``msh2-truncation``
    ``parser._split_msh`` refuses a five-character MSH-2 (``^~\\&#``) unless
    MSH-12 >= '2.7' as a string, although v2.5.1 ELR senders use it. For those
    messages hl7apy gets the message with MSH-2 cut to four characters (our
    reader never splits on the truncation character, so no other field moves)
    and MSH-2 is compared without the fifth character.
``nm-number``
    NM/SI values are stored as ``Decimal``/``int`` and printed back, so leading
    zeros go (XTN-7 ``0806080`` -> ``806080``); equal as numbers. A field whose
    text differs only through such components is counted ``field-via-components``.

Messages hl7apy refuses are counted by exception and not compared (ours must
still parse or reject them): ``InvalidEncodingChars`` (duplicated or missing
MSH-2 characters, e.g. ``^~\\&`` from a double-escaped source -- we reject
those too), ``InvalidName`` (segments its version tables do not know, such as
SPM in v2.3, or broken lines), ``UnsupportedVersion`` (``2.999``) and
``ParserError`` (chunks without an MSH). Files are decoded here (UTF-8, else
latin-1) so both readers get the same text; charset handling is unit-tested.

hl7apy needs ~40 ms per message, so its parse of each distinct message text is
reduced to a JSON snapshot (segment/field/component names and ER7 text),
computed in a process pool and cached in pytest's cache directory under a key
of (snapshot format, hl7apy version, message text). Our reader always runs
fresh against the snapshots; ``pytest --cache-clear`` recomputes them.

Files that are not ER7 are not read: ``*.xml`` (the XML encoding), ``*.json``
(manifests, expected parse trees) and ``NOT_ER7`` below.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import InvalidEncodingChars
from hl7apy.parser import parse_message
from kafka_fixture import running_in_ci

from ehrbridge.core.errors import MessageRejected
from ehrbridge.pipelines.er7 import DEFAULT_ENCODING, Encoding, Message, Segment, parse_batch

CORPUS = Path("/work/shared/corpus/hl7v2")
ER7_SUFFIXES = {".hl7", ".txt", ".er7"}
NOT_ER7 = {"nextgenhealthcare-connect/NOTE.txt": "provenance note, not a message"}
ENVELOPE = {"FHS", "BHS", "BTS", "FTS"}
SNAPSHOT_FORMAT = "1"


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(
        p
        for p in CORPUS.rglob("*")
        if p.is_file()
        and p.suffix.lower() in ER7_SUFFIXES
        and p.relative_to(CORPUS).as_posix() not in NOT_ER7
    )


FILES = corpus_files()
# Outside CI a checkout without ../shared skips these; in CI the corpus must be there.
pytestmark = pytest.mark.skipif(
    not FILES and not running_in_ci(), reason="shared HL7v2 corpus not present"
)


def test_the_corpus_is_there_in_ci() -> None:
    assert FILES or not running_in_ci(), f"no HL7v2 corpus under {CORPUS}"


# ----------------------------------------------------------------- independent splitting


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def chunks(text: str) -> list[list[str]]:
    """Messages as lists of lines, split without using the reader under test."""
    groups: list[list[str]] = []
    preamble: list[str] = []
    current: list[str] | None = None
    for line in re.split(r"\r\n|\r|\n", text.strip("\x0b\x1c\ufeff")):
        if not line.strip():
            continue
        if line[:3] in ENVELOPE:
            current = None
        elif line.startswith("MSH"):
            current = [line]
            groups.append(current)
        elif current is None:
            preamble.append(line)
        else:
            current.append(line)
    return ([preamble] if preamble else []) + groups


def message_texts(path: Path) -> list[str]:
    return ["\r".join(lines) for lines in chunks(decode(path.read_bytes()))]


# ----------------------------------------------------------------- hl7apy snapshots


@dataclass(frozen=True)
class Child:
    """A component of one hl7apy field repetition."""

    pos: int | None  # from the name (CE_2 -> 2, VARIES_3 -> 3); None when unnamed
    er7: str
    numeric: bool  # NM/SI: hl7apy prints these back from Decimal/int


@dataclass(frozen=True)
class Rep:
    """One hl7apy Field (hl7apy makes one per repetition)."""

    pos: int | None  # PID_3 -> 3; None when unnamed
    er7: str
    positions: tuple[int, ...]  # component positions hl7apy knows; () for base types/varies
    children: tuple[Child, ...]


@dataclass(frozen=True)
class Seg:
    name: str
    positions: tuple[int, ...]  # field positions hl7apy knows for this version
    infinite: bool  # Z-segments: every position gets a name
    fields: tuple[Rep, ...]


@dataclass(frozen=True)
class Oracle:
    segments: tuple[Seg, ...] | None  # None: hl7apy refused the message
    refusal: str | None = None
    msh2_cut: bool = False


_POSITION = re.compile(r"_(\d+)$")


def position(name: str | None) -> int | None:
    """'PID_3' -> 3, 'CE_2' -> 2, 'VARIES_1' -> 1; unnamed or base-type children -> None."""
    match = _POSITION.search(name or "")
    return int(match.group(1)) if match else None


def _positions(structure: dict[str, Any] | None) -> tuple[int, ...]:
    return tuple(sorted(p for p in map(position, structure or {}) if p is not None))


def _parse(text: str) -> Any:
    return parse_message(text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT)


def hl7apy_oracle(text: str) -> Oracle:
    """hl7apy's reading of one message, reduced to what the comparison needs."""
    cut = False
    try:
        message = _parse(text)
    except InvalidEncodingChars as exc:
        # quirk msh2-truncation: retry with a four-character MSH-2
        line = text.split("\r", 1)[0]
        msh2 = line[4:].split(line[3:4], 1)[0] if len(line) > 4 else ""
        if len(msh2) != 5:
            return Oracle(None, type(exc).__name__)
        try:
            message, cut = _parse(text[:4] + msh2[:4] + text[4 + len(msh2) :]), True
        except Exception as inner:  # hl7apy raises many types; all count as a refusal
            return Oracle(None, type(inner).__name__)
    except Exception as exc:
        return Oracle(None, type(exc).__name__)
    chars = message.encoding_chars  # passed explicitly: saves hl7apy a walk up the tree
    segments = tuple(
        Seg(
            seg.name,
            _positions(seg.structure_by_name),
            bool(seg.allow_infinite_children),
            tuple(_rep(f, chars) for f in seg.children),
        )
        for seg in message.children
    )
    return Oracle(segments, None, cut)


def _rep(f: Any, chars: dict[str, str]) -> Rep:
    children = tuple(
        Child(
            position(c.name),
            c.to_er7(chars),
            any(getattr(x, "datatype", None) in ("NM", "SI") for x in [c, *c.children]),
        )
        for c in f.children
    )
    return Rep(position(f.name), f.to_er7(chars), _positions(f.structure_by_name), children)


def _to_json(oracle: Oracle) -> str:
    segs = None
    if oracle.segments is not None:
        segs = [
            [
                s.name,
                list(s.positions),
                s.infinite,
                [
                    [
                        r.pos,
                        r.er7,
                        list(r.positions),
                        [[c.pos, c.er7, c.numeric] for c in r.children],
                    ]
                    for r in s.fields
                ],
            ]
            for s in oracle.segments
        ]
    return json.dumps([segs, oracle.refusal, oracle.msh2_cut])


def _from_json(text: str) -> Oracle:
    segs, refusal, cut = json.loads(text)
    if segs is None:
        return Oracle(None, refusal, cut)
    return Oracle(
        tuple(
            Seg(
                name,
                tuple(positions),
                infinite,
                tuple(
                    Rep(pos, er7, tuple(cpos), tuple(Child(*c) for c in children))
                    for pos, er7, cpos, children in fields
                ),
            )
            for name, positions, infinite, fields in segs
        ),
        refusal,
        cut,
    )


def _cache_key(text: str) -> str:
    salt = f"{SNAPSHOT_FORMAT}|{version('hl7apy')}|"
    return hashlib.sha256((salt + text).encode("utf-8", "surrogatepass")).hexdigest()


def _compute(texts: list[str]) -> list[Oracle]:
    """hl7apy over many messages, in a process pool when there is more than one CPU."""
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(texts) >= 20:
        # spawn, not fork: other tests in the session may have threads running.
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                return list(pool.map(hl7apy_oracle, texts, chunksize=8))
        except (BrokenProcessPool, OSError, pickle.PicklingError):
            pass  # e.g. this module is not importable by name in a child: do it here
    return [hl7apy_oracle(t) for t in texts]


@pytest.fixture(scope="session")
def oracles(request: pytest.FixtureRequest) -> dict[str, Oracle]:
    """hl7apy snapshots of every corpus message, from the on-disk cache or computed."""
    texts = sorted({t for path in FILES for t in message_texts(path)})
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("er7_hl7apy_snapshots")) if cache is not None else None
    found: dict[str, Oracle] = {}
    missing: list[str] = []
    for text in texts:
        entry = folder / f"{_cache_key(text)}.json" if folder else None
        if entry is not None and entry.exists():
            found[text] = _from_json(entry.read_text("utf-8"))
        else:
            missing.append(text)
    for text, oracle in zip(missing, _compute(missing), strict=True):
        found[text] = oracle
        if folder is not None:
            (folder / f"{_cache_key(text)}.json").write_text(_to_json(oracle), "utf-8")
    return found


# ----------------------------------------------------------------- explaining differences


def canon(text: str, enc: Encoding) -> str:
    """blank-or-trailing: blank components/subcomponents -> '', trailing empty ones dropped."""
    reps = []
    for rep in text.split(enc.repetition):
        comps = []
        for comp in rep.split(enc.component):
            subs = ["" if s.isspace() else s for s in comp.split(enc.subcomponent)]
            while subs and not subs[-1]:
                subs.pop()
            comps.append(enc.subcomponent.join(subs))
        while comps and not comps[-1]:
            comps.pop()
        reps.append(enc.component.join(comps))
    return enc.repetition.join(reps)


def reescape(text: str, enc: Encoding) -> str:
    """reescape: what TextualDataType._escape_value does to an escape character."""
    esc = re.escape(enc.escape)
    pattern = rf"(?<!{esc}[HNFSTRE]){esc}(?![HNFSTRE]{esc})"
    return re.sub(pattern, lambda _: f"{enc.escape}E{enc.escape}", text)


_TRANSFORMS = ("segment-strip", "reescape", "blank-or-trailing")
_COMBINATIONS = [
    *((q,) for q in _TRANSFORMS),
    *((a, b) for i, a in enumerate(_TRANSFORMS) for b in _TRANSFORMS[i + 1 :]),
    _TRANSFORMS,
]


def explain(mine: str, theirs: str, enc: Encoding, *, last: bool) -> tuple[str, ...] | None:
    """The smallest set of quirks that turns our text into hl7apy's; () if equal; None if none."""
    if mine == theirs:
        return ()
    for quirks in _COMBINATIONS:
        if "segment-strip" in quirks and not last:
            continue
        ours, their = mine, theirs
        if "segment-strip" in quirks:
            ours = ours.rstrip()
        if "reescape" in quirks:
            ours = reescape(ours, enc)
        if "blank-or-trailing" in quirks:
            ours, their = canon(ours, enc), canon(their, enc)
        if ours == their:
            return quirks
    return None


# ----------------------------------------------------------------- comparison


@dataclass
class Report:
    messages: int = 0
    compared: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    quirks: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def add(self, other: Report) -> None:
        self.messages += other.messages
        self.compared += other.compared
        self.refused.update(other.refused)
        self.quirks.update(other.quirks)
        self.problems.extend(other.problems)


class Comparison:
    """Compares one of our messages with hl7apy's snapshot of the same text."""

    def __init__(self, ours: Message, where: str, report: Report) -> None:
        self.ours, self.where, self.report = ours, where, report
        self.enc = ours.encoding

    def problem(self, text: str) -> None:
        self.report.problems.append(f"{self.where}: {text}")

    def same(self, mine: str, theirs: str, what: str, *, last: bool = False) -> None:
        quirks = explain(mine, theirs, self.enc, last=last)
        if quirks is None:
            self.problem(f"{what}: ours {mine!r} != hl7apy {theirs!r}")
        else:
            self.report.quirks.update(quirks)

    def run(self, theirs: Oracle) -> None:
        assert theirs.segments is not None
        names = [s.name for s in self.ours.segments]
        their_names = [s.name for s in theirs.segments]
        if names != their_names:
            self.problem(f"segment names differ: {names} vs {their_names}")
            return
        for ours, seg in zip(self.ours.segments, theirs.segments, strict=True):
            self.segment(ours, seg, theirs.msh2_cut)

    def segment(self, ours: Segment, theirs: Seg, msh2_cut: bool) -> None:
        named: dict[int, list[Rep]] = {}
        unnamed: list[Rep] = []
        for rep in theirs.fields:
            if rep.pos is None:
                unnamed.append(rep)
            else:
                named.setdefault(rep.pos, []).append(rep)
        nameable = set(named) | set(theirs.positions)
        expected_unnamed: list[str] = []
        last = len(ours)
        for n in range(1, last + 1):
            mine = ours.field(n)
            if n in named:
                self.field(ours, n, named[n], msh2_cut, last=n == last)
            elif n not in nameable and not theirs.infinite:
                if mine.strip():  # hl7apy keeps each repetition as its own field
                    expected_unnamed.extend(mine.split(self.enc.repetition))
            elif mine.strip():
                self.problem(f"{ours.name}[{ours.index}]-{n}: hl7apy has no field, ours {mine!r}")
            elif mine:
                self.report.quirks["blank-field"] += 1
        for n in named:
            if n > last:
                self.problem(f"{ours.name}[{ours.index}]-{n}: only hl7apy has this field")
        self.unnamed_fields(ours, unnamed, expected_unnamed)

    def field(self, ours: Segment, n: int, reps: list[Rep], msh2_cut: bool, *, last: bool) -> None:
        where = f"{ours.name}[{ours.index}]-{n}"
        mine = ours.field(n)
        if ours.name == "MSH" and n <= 2:  # delimiters: compared as they are
            if n == 2 and msh2_cut:
                self.report.quirks["msh2-truncation"] += 1
                mine = mine[:4]
            if mine != reps[0].er7:
                self.problem(f"{where}: ours {mine!r} != hl7apy {reps[0].er7!r}")
            return
        mine_reps = mine.split(self.enc.repetition)
        if len(mine_reps) != len(reps):
            self.problem(f"{where}: {len(mine_reps)} repetitions, hl7apy {len(reps)}")
            return
        for r, (mine_rep, rep) in enumerate(zip(mine_reps, reps, strict=True), start=1):
            final = last and r == len(reps)
            before = len(self.report.problems)
            self.components(ours, n, r, rep, last=final)
            view = mine_rep
            if mine_rep != rep.er7 and _mixes_unnamed(rep):
                self.report.quirks["unnamed-component"] += 1
                view = self.packed(mine_rep, rep)
            quirks = explain(view, rep.er7, self.enc, last=final)
            if quirks is not None:
                self.report.quirks.update(quirks)
            elif len(self.report.problems) == before:
                # Not a text-level normalisation, but every component agreed (nm-number).
                self.report.quirks["field-via-components"] += 1
            else:
                self.problem(f"{where}({r}): ours {mine_rep!r} != hl7apy {rep.er7!r}")

    def packed(self, mine: str, rep: Rep) -> str:
        """unnamed-component: Field.to_er7 writes the known positions, then unnamed children."""
        comps = mine.split(self.enc.component)
        head = [comps[k - 1] if k <= len(comps) else "" for k in rep.positions]
        extras = [c for k, c in enumerate(comps, 1) if k not in rep.positions and c.strip()]
        return self.enc.component.join(head + extras)

    def same_value(self, mine: str, child: Child, what: str, *, last: bool) -> None:
        """One component: text quirks, or nm-number."""
        if child.numeric and explain(mine, child.er7, self.enc, last=last) is None:
            try:
                if Decimal(mine.strip()) == Decimal(child.er7):
                    self.report.quirks["nm-number"] += 1
                    return
            except InvalidOperation:
                pass
        self.same(mine, child.er7, what, last=last)

    def components(self, ours: Segment, n: int, r: int, rep: Rep, *, last: bool) -> None:
        where = f"{ours.name}[{ours.index}]-{n}({r})"
        mine = ours.components(n, r) or [""]
        if not rep.positions:
            self.base_components(mine, rep, where, last=last)
            return
        named = {c.pos: c for c in rep.children if c.pos is not None}
        unnamed = [c for c in rep.children if c.pos is None]
        nameable = set(named) | set(rep.positions)
        expected_unnamed = []
        for k, m in enumerate(mine, start=1):
            if k in named:
                self.same_value(m, named[k], f"{where}.{k}", last=last and k == len(mine))
            elif k not in nameable:
                if m.strip():
                    expected_unnamed.append(m)
            elif m.strip():
                self.problem(f"{where}.{k}: hl7apy has no component, ours {m!r}")
            elif m:
                self.report.quirks["blank-or-trailing"] += 1
        for k in named:
            if k > len(mine):
                self.problem(f"{where}.{k}: only hl7apy has this component")
        self.unnamed_components(expected_unnamed, unnamed, where, last=last)

    def base_components(self, mine: list[str], rep: Rep, where: str, *, last: bool) -> None:
        """Base types and varies: hl7apy keeps every component, in order."""
        if len(rep.children) != len(mine) and canon(rep.er7, self.enc) != "":
            got = [c.er7 for c in rep.children]
            self.problem(f"{where}: components ours {mine!r} != hl7apy {got!r}")
            return
        for k, (m, child) in enumerate(zip(mine, rep.children, strict=False), start=1):
            self.same_value(m, child, f"{where}.{k}", last=last and k == len(mine))

    def unnamed_components(
        self, expected: list[str], unnamed: list[Child], where: str, *, last: bool
    ) -> None:
        if len(unnamed) != len(expected):
            got = [c.er7 for c in unnamed]
            self.problem(f"{where}: unnamed components {expected!r} vs {got!r}")
            return
        for m, child in zip(expected, unnamed, strict=True):
            self.report.quirks["unnamed-component"] += 1
            self.same_value(m, child, f"{where} (unnamed component)", last=last)

    def unnamed_fields(self, ours: Segment, unnamed: list[Rep], expected: list[str]) -> None:
        where = f"{ours.name}[{ours.index}]"
        if len(unnamed) != len(expected):
            got = [f.er7 for f in unnamed]
            self.problem(f"{where}: unnamed fields {expected!r} vs {got!r}")
            return
        for m, rep in zip(expected, unnamed, strict=True):
            self.report.quirks["unnamed-field"] += 1
            self.same(m, rep.er7, f"{where} (unnamed field)", last=True)


def _mixes_unnamed(rep: Rep) -> bool:
    kinds = {c.pos is None for c in rep.children}
    return kinds == {True, False}


def _ours(text: str | bytes, where: str, report: Report) -> Message | None:
    try:
        return Message.parse(text)
    except MessageRejected:
        return None
    except Exception as exc:  # the contract: MessageRejected or a Message, nothing else
        report.problems.append(f"{where}: raised {type(exc).__name__}: {exc}")
        return None


def _batch(raw: bytes, rel: str, report: Report) -> list[Message] | None:
    try:
        return parse_batch(raw)
    except MessageRejected:
        return None
    except Exception as exc:
        report.problems.append(f"{rel} (parse_batch): raised {type(exc).__name__}: {exc}")
        return None


def _check_batch(batch: list[Message], texts: Iterable[str], rel: str, report: Report) -> None:
    """parse_batch finds the same messages, verbatim, as the independent splitter."""
    got = [m.to_er7() for m in batch]
    expected = [t for t in texts if t.startswith("MSH")]
    if got != expected:
        report.problems.append(
            f"{rel}: parse_batch gave {len(got)} messages, expected the {len(expected)} "
            "MSH chunks verbatim"
        )


_REPORTS: dict[Path, Report] = {}


def compare_file(path: Path, oracles: dict[str, Oracle]) -> Report:
    """All checks for one corpus file (memoised for the summary test)."""
    if path in _REPORTS:
        return _REPORTS[path]
    report = Report()
    rel = path.relative_to(CORPUS).as_posix()
    raw = path.read_bytes()
    _ours(raw, f"{rel} (whole file)", report)
    texts = message_texts(path)
    batch = _batch(raw, rel, report)
    if batch is not None:
        _check_batch(batch, texts, rel, report)
    for i, text in enumerate(texts):
        where = f"{rel} #{i}"
        report.messages += 1
        ours = _ours(text, where, report)
        theirs = oracles[text]
        if theirs.segments is None:
            report.refused[theirs.refusal or "?"] += 1
        elif ours is None:
            report.problems.append(f"{where}: hl7apy parses it but we reject it")
        else:
            report.compared += 1
            Comparison(ours, where, report).run(theirs)
    _REPORTS[path] = report
    return report


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(CORPUS).as_posix() for p in FILES])
def test_reader_agrees_with_hl7apy(path: Path, oracles: dict[str, Oracle]) -> None:
    report = compare_file(path, oracles)
    assert not report.problems, "\n".join(report.problems[:20])


def test_corpus_summary(oracles: dict[str, Oracle]) -> None:
    """Most messages hl7apy can read really were compared (guards against a vacuous pass)."""
    total = Report()
    for path in FILES:
        total.add(compare_file(path, oracles))
    refused = sum(total.refused.values())
    print(
        f"\ncorpus: {len(FILES)} files, {total.messages} messages, {total.compared} compared "
        f"with hl7apy, {refused} refused by hl7apy {dict(total.refused)}; "
        f"explained differences by quirk: {dict(total.quirks)}"
    )
    assert total.compared >= 0.8 * (total.compared + refused)
    assert not total.problems


def test_explain_accepts_only_the_documented_quirks() -> None:
    enc = DEFAULT_ENCODING
    assert explain("a^b", "a^b", enc, last=False) == ()
    assert explain("10101^^^", "10101", enc, last=False) == ("blank-or-trailing",)
    assert explain("x ^ ^y", "x ^^y", enc, last=False) == ("blank-or-trailing",)
    assert explain("a\\.br\\b", "a\\E\\.br\\E\\b", enc, last=False) == ("reescape",)
    assert explain("end  ", "end", enc, last=True) == ("segment-strip",)
    assert explain("end  ", "end", enc, last=False) is None  # only the last field is stripped
    assert explain("a^b", "a^c", enc, last=True) is None
    assert explain("a^^b", "a^b", enc, last=True) is None  # a moved component is a real error


def test_comparison_catches_a_reader_that_shifts_fields(oracles: dict[str, Oracle]) -> None:
    """The oracle comparison is not vacuous: a message read one field off must fail."""
    text = next(
        t
        for path in FILES
        for t in message_texts(path)
        if oracles[t].segments is not None and t.count("\rPID|") == 1
    )
    lines = text.split("\r")
    pid = next(i for i, line in enumerate(lines) if line.startswith("PID|"))
    lines[pid] = "PID||" + lines[pid][4:]  # every PID field moves one place right
    report = Report()
    Comparison(Message.parse("\r".join(lines)), "shifted", report).run(oracles[text])
    assert any("PID" in problem for problem in report.problems)
