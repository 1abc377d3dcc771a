"""MLLP fuzzer: mutated HL7v2 frames against a running site, over real sockets.

    scripts/fuzz --frames 1000000 [--seed S] [--concurrency 8]

CI runs a bounded version of the same thing (``tests/faults/test_fuzz_mllp.py``).
Frames are mutations of the shared corpus (``../shared/corpus/hl7v2``) and of
a valid renal ORU^R01: bit flips, truncation, random and invalid delimiters,
huge fields, deep repetitions and components, escapes (``\\.sk``, ``\\.sp``,
``\\X..\\``, ``\\Z..\\``), non-UTF-8 bytes, odd digits and offsets, 0x0B/0x1C
inside the payload, missing end blocks and oversize frames.

Frame *i* of seed *S* is built from ``random.Random(f"{S}:{i}")`` alone, so a
failure names the seed and the frame and replays without the rest of the run.

Checked for every frame: each readable frame (a 0x0B inside a payload starts
a new one) gets exactly one ACK, which parses, has MSH/MSA(/ERR) and no
framing bytes; MSA-2 is MSH-10 byte for byte when the frame starts with a
standard MSH whose MSH-10 can be read; every ACK arrives within
``ack_timeout_s``. For the run: every AE/AR frame's bytes are in the
dead-letter store, every AA frame's bytes in ``<site>.raw``; no dead letter
has reason ``internal``; nothing was logged with a traceback. The caller
checks memory and a valid message afterwards (it owns the site).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import httpx

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.pipelines.er7 import Message, codec_for_charset
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "hl7v2"
START, END = b"\x0b", b"\x1c\x0d"
_MESSAGE_START = re.compile(rb"(?:^|(?<=[\r\n]))MSH")
_BATCH_LINE = re.compile(rb"^(?:FHS|BHS|BTS|FTS)\b.*$", re.MULTILINE)
_ROUND_TRIP_CODECS = frozenset({"utf-8", "ascii", "iso8859-1"})
Mutation = Callable[[random.Random, bytes], bytes]


# --------------------------------------------------------------------------- seeds


def corpus_files(root: Path = CORPUS) -> list[Path]:
    suffixes = {".hl7", ".txt", ".xml"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)


def messages_in(raw: bytes) -> list[bytes]:
    """Split a file into messages as a file-reading interface engine would.

    Batch header/trailer lines (FHS/BHS/BTS/FTS) are the file's envelope, not
    part of a message. MLLP control bytes saved in a file are removed so that
    the frame boundaries are ours.
    """
    text = raw.replace(b"\x0b", b"").replace(b"\x1c", b"")
    text = _BATCH_LINE.sub(b"", text)
    starts = [m.start() for m in _MESSAGE_START.finditer(text)]
    if not starts:
        return [text] if text.strip() else []
    chunks = [text[: starts[0]]] if text[: starts[0]].strip() else []
    bounds = [*starts, len(text)]
    chunks += [text[a:b] for a, b in pairwise(bounds)]
    return chunks


def renal_oru(control_id: str = "FUZZ-RENAL", mrn: str = "FUZZ0001") -> bytes:
    """A valid renal ORU^R01 for the sandbox site (AA, then a risk Observation)."""
    return SyntheticEhr(seed=7, patients=1).renal_oru_for(
        age=64,
        female=False,
        at=datetime(2026, 2, 1, tzinfo=UTC),
        creatinine_umol_l=265.0,
        uacr_mg_mmol=120.0,
        control_id=control_id,
        mrn=mrn,
    )


def seed_messages(root: Path = CORPUS) -> list[bytes]:
    found = [m for path in corpus_files(root) for m in messages_in(path.read_bytes())]
    return [m for m in found if m.strip()]


# --------------------------------------------------------------------------- mutations


def _at(rng: random.Random, data: bytes) -> int:
    return rng.randrange(len(data) + 1)


def _insert(rng: random.Random, data: bytes, what: bytes) -> bytes:
    at = _at(rng, data)
    return data[:at] + what + data[at:]


def bit_flips(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncation(rng: random.Random, data: bytes) -> bytes:
    return data[: _at(rng, data)]


_DELIMITER_BYTES = b"|^~\\&#!$%*+-./:;<=>?@[]_`{}\x00\x1c\x0b\x93\xa7\xffA9 \t"


def encoding_characters(rng: random.Random, data: bytes) -> bytes:
    """New MSH-1/MSH-2: valid, duplicated, alphanumeric, control or non-ASCII bytes."""
    if not data.startswith(b"MSH") or len(data) < 8:
        return data
    chars = bytes(rng.choice(_DELIMITER_BYTES) for _ in range(rng.randint(0, 6)))
    return b"MSH" + chars + data[8:]


def random_delimiters(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 20)):
        data = _insert(rng, data, bytes([rng.choice(b"|^~\\&\r\n")]))
    return data


def huge_field(rng: random.Random, data: bytes) -> bytes:
    size = rng.choice([70_000, rng.randint(1_000, 300_000)])
    return _insert(rng, data, b"|" + bytes([rng.choice(b"x9 ")]) * size)


def deep_repetitions(rng: random.Random, data: bytes) -> bytes:
    count = rng.choice([1_000, 10_000, rng.randint(10, 30_000)])
    unit = rng.choice([b"X1^^^OTHER^PI~", b"^", b"&", b"~", b"A^B&C~"])
    lines = data.split(b"\r")
    pids = [i for i, line in enumerate(lines) if line.startswith((b"PID|", b"OBX|"))]
    if not pids:
        return _insert(rng, data, unit * count)
    i = rng.choice(pids)
    fields = lines[i].split(b"|")
    target = min(len(fields) - 1, rng.choice([3, 3, 5, 6]))
    fields[target] = unit * count + fields[target]
    lines[i] = b"|".join(fields)
    return b"\r".join(lines)


_ESCAPES = [
    b"\\.sk 200000000\\",
    b"\\.sp 500000000\\",
    b"\\.sk 100\\",
    b"\\.sk 101\\",
    "\\.sk \u00b9\\".encode(),
    b"\\.sk " + b"9" * 5000 + b"\\",
    b"\\.sp\\",
    b"\\.br\\",
    b"\\X0D0A\\",
    b"\\XC3\\",
    b"\\XFFFE\\",
    b"\\X" + b"41" * 20_000 + b"\\",
    b"\\X4\\",
    b"\\Zlocal\\",
    b"\\Z" + b"z" * 5_000 + b"\\",
    b"\\C2842\\",
    b"\\E\\\\F\\",
    b"\\",
    b"\\.sk 99\\" * 800,
]


def escapes(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 4)):
        data = _insert(rng, data, rng.choice(_ESCAPES))
    return data


def non_utf8(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 6)):
        data = _insert(rng, data, bytes(rng.randrange(0x80, 0x100) for _ in range(3)))
    return data


_ODD_VALUES = [
    b"+9999",
    b"-9999",
    "\u00b9\u00b2".encode(),
    "\u0663".encode(),  # Arabic-Indic three
    b"9" * 5_000,
    b"1e999",
    b"<",
    b"20260101+9999",
    "2026010\u00b9".encode(),
    "2.5.\u00b9".encode(),
    b"99999999999999999999",
    b"",
]


def odd_values(rng: random.Random, data: bytes) -> bytes:
    """Replace a field of MSH/PID/OBR/OBX with odd digits, offsets or long numbers."""
    lines = data.split(b"\r")
    if not lines:
        return data
    i = rng.randrange(len(lines))
    fields = lines[i].split(b"|")
    if len(fields) < 2:
        return data
    fields[rng.randrange(1, len(fields))] = rng.choice(_ODD_VALUES)
    lines[i] = b"|".join(fields)
    return b"\r".join(lines)


def framing_bytes(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        data = _insert(rng, data, rng.choice([b"\x0b", b"\x1c", b"\x1c\x1c", b"\x0b\x0b"]))
    return data


_CHARSETS = [b"UNICODE UTF-8", b"8859/1", b"ASCII", b"8859/7", b"GB 18030-2000", b"nonsense"]


def charsets(rng: random.Random, data: bytes) -> bytes:
    """Set MSH-18 (character set) to a label, known or not."""
    line, sep, rest = data.partition(b"\r")
    fields = line.split(b"|")
    fields += [b""] * (18 - len(fields))
    fields[17] = rng.choice(_CHARSETS)
    return b"|".join(fields) + sep + rest


MUTATIONS: list[tuple[Mutation, int]] = [  # (mutation, weight)
    (bit_flips, 20),
    (truncation, 8),
    (encoding_characters, 8),
    (random_delimiters, 8),
    (huge_field, 2),
    (deep_repetitions, 3),
    (escapes, 10),
    (non_utf8, 8),
    (odd_values, 12),
    (framing_bytes, 5),
    (charsets, 5),
]


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class FuzzFrame:
    """What is sent for one frame index, and the payload of each readable frame in it."""

    index: int
    pieces: list[bytes]  # one per expected ACK: a 0x0B inside the payload starts a new frame
    end_block: bool = True  # False: sent on its own connection, which is then half-closed
    oversize: bool = False

    @property
    def wire(self) -> bytes:
        return START + START.join(self.pieces) + (END if self.end_block else b"")


def make_frame(
    seed: int, index: int, seeds: list[bytes], valid: bytes, max_bytes: int
) -> FuzzFrame:
    rng = random.Random(f"{seed}:{index}")
    if rng.random() < 0.001:  # oversize: answered AR, first max_bytes dead-lettered
        payload = valid + b"\rNTE|1||" + b"x" * (max_bytes + rng.randint(1, 4096))
        return FuzzFrame(index, [payload], oversize=True)
    data = valid if rng.random() < 0.3 else rng.choice(seeds)
    mutations, weights = zip(*MUTATIONS, strict=True)
    for mutation in rng.choices(mutations, weights, k=rng.choice([1, 1, 1, 2, 3])):
        data = mutation(rng, data)
    # 0x1C 0x0D inside would end the frame early: that is "bytes after a frame", covered
    # by tests/adapters/test_mllp.py; here a lone 0x1C stays, a 0x0B starts a new frame.
    while END in data:
        data = data.replace(END, b"\x1c\x0e")
    return FuzzFrame(index, data.split(START), end_block=rng.random() > 0.01)


def frames(
    seed: int, count: int, seeds: list[bytes], valid: bytes, max_bytes: int
) -> Iterator[FuzzFrame]:
    for index in range(count):
        yield make_frame(seed, index, seeds, valid, max_bytes)


# --------------------------------------------------------------------------- checks


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def readable_msh10(piece: bytes) -> bytes | None:
    """MSH-10 as the oracle reads it: a standard MSH and a charset that round-trips."""
    if not piece.startswith(b"MSH|^~\\&|"):
        return None
    line = re.split(rb"[\r\n]", piece, maxsplit=1)[0]
    fields = line.split(b"|")  # fields[k] is MSH-(k+1)
    if len(fields) < 10:
        return None
    charset = fields[17].split(b"~")[0].split(b"^")[0].strip() if len(fields) > 17 else b""
    if charset and codec_for_charset(charset.decode("latin-1")) not in _ROUND_TRIP_CODECS:
        return None
    return fields[9].replace(b"\x1c", b"")


def ack_problems(ack: bytes) -> list[str]:
    """What is wrong with one ACK (empty: well-formed)."""
    problems = []
    if b"\x0b" in ack or b"\x1c" in ack:
        problems.append("framing byte inside the ACK")
    try:
        message = Message.parse(ack)
    except Exception as exc:  # any failure to read it is the finding
        return [*problems, f"ACK does not parse: {exc}"]
    names = [segment.name for segment in message.segments]
    if names[:2] != ["MSH", "MSA"] or not set(names) <= {"MSH", "MSA", "ERR"}:
        problems.append(f"ACK segments {names}")
    if message.msh.raw_component(9, 1) != "ACK":
        problems.append("MSH-9 is not ACK")
    if ack_code(ack) not in ("AA", "AE", "AR"):
        problems.append("MSA-1 is not AA/AE/AR")
    return problems


def _msa_fields(ack: bytes) -> list[bytes]:
    separator = ack[3:4] or b"|"
    msa = next((s for s in ack.split(b"\r") if s.startswith(b"MSA")), b"")
    return [*msa.split(separator), b"", b"", b""]


def ack_code(ack: bytes) -> str:
    return _msa_fields(ack)[1].decode("latin-1")


def msa2(ack: bytes) -> bytes:
    return _msa_fields(ack)[2]


@dataclass
class FuzzReport:
    seed: int
    frames: int = 0
    acks: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest_ack_s: float = 0.0
    seconds: float = 0.0
    answered: dict[str, list[bytes]] = field(default_factory=dict)  # code -> stored digests

    def fail(self, frame: FuzzFrame, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(f"seed {self.seed} frame {frame.index}: {what}")

    def summary(self) -> str:
        return (
            f"fuzz seed {self.seed}: {self.frames} frames in {self.seconds:.1f}s, "
            f"ACKs {dict(self.acks)}, slowest ACK {self.slowest_ack_s:.2f}s, "
            f"{len(self.failures)} failure(s)"
        )


# --------------------------------------------------------------------------- sending


class _Connection:
    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, limit=4 * 1024 * 1024
            )
        return self.reader, self.writer

    async def read_ack(self) -> bytes:
        reader, _ = await self.open()
        await asyncio.wait_for(reader.readuntil(START), self.timeout_s)
        body = await asyncio.wait_for(reader.readuntil(END), self.timeout_s)
        return body[: -len(END)]

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _exchange(
    frame: FuzzFrame, connection: _Connection, timeout_s: float
) -> tuple[list[bytes], bool]:
    """Send one frame; return its ACKs and whether the peer closed after them."""
    if not frame.end_block:  # a missing end block ends only with the connection
        connection = _Connection(connection.host, connection.port, timeout_s)
    reader, writer = await connection.open()
    writer.write(frame.wire)
    if not frame.end_block:
        writer.write_eof()
    await asyncio.wait_for(writer.drain(), timeout_s)
    acks = [await connection.read_ack() for _ in frame.pieces]
    closed = False
    if not frame.end_block:
        closed = await asyncio.wait_for(reader.read(1), timeout_s) == b""
        await connection.close()
    return acks, closed


def check_frame(frame: FuzzFrame, acks: list[bytes], report: FuzzReport, max_bytes: int) -> None:
    for piece, ack in zip(frame.pieces, acks, strict=True):
        for problem in ack_problems(ack):
            report.fail(frame, problem)
        code = ack_code(ack)
        report.acks[code] += 1
        expected = readable_msh10(piece)
        if expected is not None and msa2(ack) != expected:
            report.fail(frame, f"MSA-2 {msa2(ack)[:40]!r} is not MSH-10 {expected[:40]!r}")
        stored = piece[:max_bytes] if frame.oversize else piece
        report.answered.setdefault(code, []).append(digest(stored))


async def _worker(
    queue: asyncio.Queue[FuzzFrame | None],
    connection: _Connection,
    report: FuzzReport,
    max_bytes: int,
) -> None:
    timeout_s = connection.timeout_s
    while (frame := await queue.get()) is not None:
        started = time.monotonic()
        try:
            acks, closed = await _exchange(frame, connection, timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            report.fail(frame, f"no ACK ({type(exc).__name__}) for {len(frame.pieces)} frame(s)")
            await connection.close()
            continue
        elapsed = time.monotonic() - started
        report.slowest_ack_s = max(report.slowest_ack_s, elapsed)
        report.frames += 1
        if not frame.end_block and not closed:
            report.fail(frame, "more than one ACK for a frame without end block")
        check_frame(frame, acks, report, max_bytes)
    await connection.close()


async def send_all(
    host: str,
    port: int,
    seed: int,
    count: int,
    *,
    concurrency: int = 8,
    timeout_s: float = 30.0,
    max_bytes: int = 1_048_576,
    corpus: Path = CORPUS,
) -> FuzzReport:
    """Send ``count`` fuzz frames over ``concurrency`` connections; check each ACK."""
    seeds = seed_messages(corpus) or [renal_oru()]
    valid = renal_oru()
    report = FuzzReport(seed)
    queue: asyncio.Queue[FuzzFrame | None] = asyncio.Queue(maxsize=concurrency * 4)
    started = time.monotonic()
    workers = [
        asyncio.create_task(_worker(queue, _Connection(host, port, timeout_s), report, max_bytes))
        for _ in range(concurrency)
    ]
    for frame in frames(seed, count, seeds, valid, max_bytes):
        await queue.put(frame)
    for _ in workers:
        await queue.put(None)
    await asyncio.gather(*workers)
    report.seconds = time.monotonic() - started
    return report


# --------------------------------------------------------------------------- the site's side


class TracebackCatcher(logging.Handler):
    """Counts log records that carry a traceback (and keeps the first few, PHI-free)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        traceback = record.exc_info or "Traceback" in record.getMessage()
        if traceback and len(self.records) < 10:
            self.records.append(f"{record.name}: {record.levelname} {record.msg}")


def stored_problems(report: FuzzReport, raw: Counter[bytes], dead: Counter[bytes]) -> list[str]:
    """AA frames not in ``<site>.raw``; AE/AR frames not in the dead-letter store."""
    problems = []
    missing_aa = Counter(report.answered.get("AA", [])) - raw
    if missing_aa:
        problems.append(f"{sum(missing_aa.values())} AA'd frame(s) not stored")
    negative = Counter(report.answered.get("AE", []) + report.answered.get("AR", []))
    missing_dlq = negative - dead
    if missing_dlq:
        problems.append(f"{sum(missing_dlq.values())} AE/AR frame(s) without a dead letter")
    return problems


def rss_mb() -> float:
    """This process's resident set size (the site runs in it), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class FuzzOutcome:
    """A whole run against a sandbox site: the frames' report and the run's checks."""

    report: FuzzReport
    problems: list[str]
    rss_before_mb: float
    rss_peak_mb: float
    valid_after: str  # "AA, Observation written" or what went wrong

    def summary(self) -> str:
        return (
            f"{self.report.summary()}; RSS {self.rss_before_mb:.0f} -> peak "
            f"{self.rss_peak_mb:.0f} MB; valid message afterwards: {self.valid_after}"
        )


def topic_digests(sandbox: BackgroundSandbox, name: str) -> tuple[Counter[bytes], Counter[str]]:
    """Digests of every record value in one of the site's topics, and their error reasons."""
    runtime = sandbox.sandbox.runtime
    assert runtime is not None
    values: Counter[bytes] = Counter()
    reasons: Counter[str] = Counter()
    after = -1
    while records := runtime.log.read(runtime.topic(name), after=after, limit=500):
        for record in records:
            values[digest(record.value)] += 1
            reasons[record.headers.get("error.reason", "")] += 1
        after = records[-1].offset
    return values, reasons


def valid_message_after(sandbox: BackgroundSandbox, timeout_s: float = 60.0) -> str:
    """Send the valid renal ORU^R01 once more; wait for its risk Observation in the EHR."""
    mrn = f"AFTERFUZZ{random.SystemRandom().randrange(10**6):06d}"
    message = renal_oru(control_id=f"AFTER-{mrn}", mrn=mrn)
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port, timeout_s=timeout_s) as client:
        ack = client.send(message)
    if (ack.code, ack.control_id) != ("AA", f"AFTER-{mrn}"):
        return f"{ack.code} {ack.control_id!r}"
    url = f"{sandbox.sandbox.fhir_base}/Observation"
    params = {"patient.identifier": f"urn:ehrbridge:sandbox:mrn|{mrn}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(url, params=params, timeout=10).json().get("entry"):
            return "AA, Observation written"
        time.sleep(0.2)
    return f"AA, but no Observation within {timeout_s:.0f}s"


class _PeakRss:
    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss")

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def fuzz_sandbox(
    sandbox: BackgroundSandbox,
    seed: int,
    count: int,
    *,
    concurrency: int = 8,
    ack_bound_s: float = 30.0,
    corpus: Path = CORPUS,
) -> FuzzOutcome:
    """Fuzz a running sandbox site and check the whole run (see the module docstring)."""
    catcher = TracebackCatcher()
    logging.getLogger().addHandler(catcher)
    max_bytes = sandbox.sandbox.config.mllp.max_message_bytes
    before = rss_mb()
    try:
        with _PeakRss() as rss:
            report = asyncio.run(
                send_all(
                    "127.0.0.1",
                    sandbox.sandbox.mllp_port,
                    seed,
                    count,
                    concurrency=concurrency,
                    timeout_s=ack_bound_s,
                    max_bytes=max_bytes,
                    corpus=corpus,
                )
            )
            valid_after = valid_message_after(sandbox)
    finally:
        logging.getLogger().removeHandler(catcher)
    raw, _ = topic_digests(sandbox, "raw")
    dead, reasons = topic_digests(sandbox, "dlq")
    problems = [*report.failures, *stored_problems(report, raw, dead)]
    if reasons["internal"]:
        problems.append(f"{reasons['internal']} dead letter(s) with reason internal (a bug)")
    problems += [f"logged with a traceback: {line}" for line in catcher.records]
    if valid_after != "AA, Observation written":
        problems.append(f"valid message after the run: {valid_after}")
    return FuzzOutcome(report, problems, before, rss.peak, valid_after)


# --------------------------------------------------------------------------- scripts/fuzz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    print(f"fuzz seed {seed} (replay: scripts/fuzz --frames {args.frames} --seed {seed})")
    logging.basicConfig(level=logging.ERROR)
    with (
        tempfile.TemporaryDirectory(prefix="ehrbridge-fuzz-") as data_dir,
        BackgroundSandbox(Path(data_dir), fhir_site=False) as sandbox,
    ):
        outcome = fuzz_sandbox(sandbox, seed, args.frames, concurrency=args.concurrency)
    print(outcome.summary())
    for line in outcome.problems:
        print(f"  {line}")
    return 1 if outcome.problems else 0


if __name__ == "__main__":
    sys.exit(main())
