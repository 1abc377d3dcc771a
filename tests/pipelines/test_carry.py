"""Extract once (issue 19): ingest's extraction carried on the raw record, reused by processing.

Every message here goes the real way: ``Ingest.deliver`` appends it to an
embedded log (SQLite, through the group committer), the records are read back
as the processing stage reads them, and two processing stages -- one fed the
records as stored, one fed the same records without the carried value --
must give the same predictions and the same failures. The sites are the
sandbox's, us-lab-loinc's (LOINC, one time zone) and eu-si-local-codes'
(local codes from a CSV, Europe/Ljubljana times without an offset); the
messages are their samples, the bench's generated ORU^R01 and every message of
the shared HL7v2 corpus.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_double import OipDouble

from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.adapters.kafka_log import KafkaLog
from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.bench.load import SenderSpec, build_messages
from ehrbridge.config import KafkaTransport, SiteConfig, load_site_config, parse_site_config
from ehrbridge.core.contracts import Envelope, Failure, Kind, Outcome
from ehrbridge.core.errors import PermanentError
from ehrbridge.mappings.loader import SITES_DIR
from ehrbridge.pipelines import carry
from ehrbridge.pipelines.carry import HEADER, Carry, fingerprint, without_carried
from ehrbridge.pipelines.facts import (
    Demographics,
    Extraction,
    Fact,
    FactRules,
    PatientExtract,
    PersonName,
    Unused,
)
from ehrbridge.pipelines.groupcommit import GroupCommitter
from ehrbridge.pipelines.ingest import OFF_LOOP_BYTES, Ingest
from ehrbridge.pipelines.process import ProcessStage
from ehrbridge.pipelines.transport import Log, from_record, to_record, topic_name
from ehrbridge.sandbox.run import sandbox_site_file

CORPUS = Path("/work/shared/corpus/hl7v2")
SANDBOX = Path(sandbox_site_file())


def site(
    name: str, data_dir: Path, mapping_text: str | None = None, csv: tuple[str, str] = ("", "")
) -> SiteConfig:
    """A site on one of the example mappings, or on a changed copy (``csv``: old, new text)."""
    if name == "sandbox":
        return load_site_config(SANDBOX, data_dir=str(data_dir))
    mapping = SITES_DIR / name / "mapping.yaml"
    if mapping_text is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        changed = data_dir / "mapping.yaml"
        changed.write_text(mapping_text)
        for extra in (SITES_DIR / name).glob("*.csv"):
            (data_dir / extra.name).write_text(extra.read_text().replace(*csv))
        mapping = changed
    return parse_site_config(
        f"site: s\ndata_dir: {data_dir}\nmapping: {{file: {mapping}}}\n"
        "model: {url: 'https://model.test', calibration: north_american}\n"
    )


def samples(name: str) -> list[bytes]:
    folder = SANDBOX.parent if name == "sandbox" else SITES_DIR / name
    return [p.read_bytes() for p in sorted(folder.glob("*.hl7"))]


def corpus() -> list[bytes]:
    """Every message of the shared corpus, as bytes: each MSH starts one (batch lines left out)."""
    messages: list[bytes] = []
    for path in sorted(CORPUS.rglob("*")):
        if path.is_file() and path.suffix.lower() in {".hl7", ".txt", ".er7"}:
            lines = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
            starts = [i for i, line in enumerate(lines) if line.startswith(b"MSH")]
            for start, end in zip(starts, [*starts[1:], len(lines)], strict=False):
                body = [line for line in lines[start:end] if line.strip()]
                body = [line for line in body if not line.startswith((b"BTS", b"FTS", b"BHS"))]
                messages.append(b"\r".join(body) + b"\r")
    return messages


def stored(
    config: SiteConfig, messages: Sequence[bytes], tmp: Path, log: Log | None = None
) -> list[Envelope]:
    """The raw records ``Ingest`` stores for ``messages``, read back as processing reads them."""
    log = log or SqliteLog(tmp / "log.sqlite")
    committer = GroupCommitter(log)
    ingest = Ingest(config, committer)

    async def deliver_all() -> None:
        for i, payload in enumerate(messages):
            envelope = Envelope(config.site, f"m{i}", payload, Kind.HL7V2, f"m{i}")
            with contextlib.suppress(PermanentError):  # AE/AR: dead-lettered, not on raw
                await ingest.deliver(envelope)

    try:
        asyncio.run(deliver_all())
        topic, records, after = topic_name(config.site, "raw"), [], -1
        while batch := log.read(topic, after=after, limit=500):
            records.extend(batch)
            after = batch[-1].offset
    finally:
        committer.close()
        log.close()
    return [from_record(r) for r in records]


@dataclass
class Stage:
    stage: ProcessStage
    model: InferenceClient

    @classmethod
    def of(cls, config: SiteConfig) -> Stage:
        http = httpx.Client(transport=httpx.MockTransport(OipDouble()))
        model = InferenceClient(config.model, client=http)
        return cls(ProcessStage(config, MemoryStateStore(), model), model)

    def run(self, envelopes: Sequence[Envelope]) -> list[tuple[str, object]]:
        outcomes: list[Outcome] = []
        for start in range(0, len(envelopes), 64):
            outcomes.extend(self.stage.process(envelopes[start : start + 64]))
        self.model.close()
        return [summary(o) for o in outcomes]


def summary(outcome: Outcome) -> tuple[str, object]:
    assert HEADER not in outcome_headers(outcome), "the carried value went downstream"
    if isinstance(outcome, Failure):
        return ("failure", (outcome.envelope.source_id, outcome.error.reason, outcome.stage))
    return ("prediction", orjson.loads(outcome.payload))


def outcome_headers(outcome: Outcome) -> dict[str, str]:
    envelope = outcome.envelope if isinstance(outcome, Failure) else outcome
    return dict(envelope.headers)


def times(extraction: Extraction) -> list[tuple[str, object]]:
    """Every time with its zone: equal instants in another zone would shift DST arithmetic."""
    found: list[tuple[str, object]] = []
    for p in extraction.patients:
        found.append(
            (str(p.demographics.as_of), p.demographics.as_of and p.demographics.as_of.tzinfo)
        )
        found.extend((f.effective.isoformat(), f.effective.tzinfo) for f in p.facts)
    return found


SITES = ["sandbox", "us-lab-loinc", "eu-si-local-codes"]


def any_patient(name: str) -> str | None:
    """The site's mapping with the patient id from PID-3's first repetition, whoever assigned it.

    The corpus comes from many senders: under the sites' own rules (one
    assigning authority) nearly all of it would be refused at ingest.
    """
    if name == "sandbox":
        return None
    text = (SITES_DIR / name / "mapping.yaml").read_text()
    lines = text.splitlines(keepends=True)
    return "".join(
        x for x in lines if not x.lstrip().startswith(("assigning_authority:", "type_code:"))
    )


@pytest.fixture(scope="module")
def corpus_messages() -> list[bytes]:
    messages = corpus()
    if not messages:
        pytest.skip("shared HL7v2 corpus not present")
    return messages


@pytest.mark.parametrize("name", SITES)
def test_reuse_gives_exactly_what_re_extraction_gives(
    name: str, corpus_messages: list[bytes], tmp_path: Path
) -> None:
    config = site(name, tmp_path, any_patient(name))
    generated = [m for _, m in build_messages(SenderSpec(0, 1, 0, 0, 0, 200, "C"))]
    envelopes = stored(config, [*samples(name), *generated, *corpus_messages], tmp_path)
    carried = [e for e in envelopes if HEADER in e.headers]
    small = [e for e in envelopes if len(e.payload) <= OFF_LOOP_BYTES]
    assert carried == small and len(carried) > 200  # each record ingest checked on the loop

    reader = Carry(FactRules(config.mapping), config.mllp.charset)
    checker = Stage.of(config).stage
    facts = 0
    for envelope in carried:
        reused = reader.reuse(envelope)
        again = checker.extract(without_carried(envelope))
        assert reused == again and times(reused) == times(again), envelope.source_id
        facts += sum(len(p.facts) for p in reused.patients)
    assert facts > 50  # not a vacuous comparison: these sites map the messages' results

    reusing, extracting = Stage.of(config), Stage.of(config)
    with_carried = reusing.run(envelopes)
    without = extracting.run([without_carried(e) for e in envelopes])
    assert with_carried == without
    assert any(kind == "prediction" for kind, _ in with_carried)  # sandbox 201, us 126, eu-si 2
    bare = len(envelopes) - len(carried)
    assert (reusing.stage.carry.reused, reusing.stage.carry.extracted) == (len(carried), bare)
    assert (extracting.stage.carry.reused, extracting.stage.carry.extracted) == (0, len(envelopes))


def test_a_message_about_two_patients_carries_each_copy_its_own_patient(tmp_path: Path) -> None:
    config = site("us-lab-loinc", tmp_path)
    panel = (SITES_DIR / "us-lab-loinc" / "oru-bmp-uacr.hl7").read_bytes()
    segments = panel.replace(b"\n", b"\r").rstrip(b"\r").split(b"\r")
    second = [s.replace(b"MRN00123", b"MRN00999") for s in segments[1:]]
    both = b"\r".join([*segments, *second]) + b"\r"
    first, other = stored(config, [both], tmp_path)
    reader = Carry(FactRules(config.mapping), config.mllp.charset)
    for envelope in (first, other):
        extraction = reader.reuse(envelope)
        assert extraction is not None
        assert [p.patient_id for p in extraction.patients] == [envelope.key]
    assert first.key != other.key


CHANGES = {
    "a unit factor": ("mg/g: {multiply: 1}", "mg/g: {multiply: 1.005}"),  # within lint's 1 %
    "a plausible range": ("max: 30000}", "max: 300}"),
    "a code": ("- LN|9318-7 ", "- LN|9318-9 "),
    "the time zone": ("timezone: America/New_York", "timezone: America/Chicago"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_mapping_re_extracts_even_without_a_version_bump(
    change: str, tmp_path: Path
) -> None:
    text = (SITES_DIR / "us-lab-loinc" / "mapping.yaml").read_text()
    old, new = CHANGES[change]
    assert old in text
    (tmp_path / "a").mkdir()
    before = site("us-lab-loinc", tmp_path / "a")
    after = site("us-lab-loinc", tmp_path / "b", text.replace(old, new))
    assert before.mapping.version == after.mapping.version
    envelopes = stored(before, samples("us-lab-loinc"), tmp_path / "a")
    assert envelopes and all(HEADER in e.headers for e in envelopes)

    replayed = Stage.of(after)
    got = replayed.run(envelopes)
    assert replayed.stage.carry.reused == 0
    assert got == Stage.of(after).run([without_carried(e) for e in envelopes])
    if change in ("a unit factor", "a plausible range"):
        assert got != Stage.of(before).run(envelopes)  # the fix shows in the predictions


def test_the_fingerprint_follows_the_content_that_governs_extraction(tmp_path: Path) -> None:
    text = (SITES_DIR / "eu-si-local-codes" / "mapping.yaml").read_text()
    base = site("eu-si-local-codes", tmp_path / "0", text).mapping
    same = site("eu-si-local-codes", tmp_path / "1", text).mapping
    assert fingerprint(base, "UTF-8") == fingerprint(same, "utf-8")
    changed = {
        "factor": text.replace("{multiply: 8.84}", "{multiply: 8.8}"),
        "patient rule": text.replace("type_code: MR", "type_code: PI"),
        "sex path": text.replace("paths: [ZPI-2, PID-8]", "paths: [PID-8]"),
        "plausible": text.replace("max: 30}", "max: 31}"),
    }
    seen = {fingerprint(base, "UTF-8")}
    for n, (what, variant) in enumerate(changed.items(), start=2):
        assert variant != text, what
        seen.add(
            fingerprint(site("eu-si-local-codes", tmp_path / str(n), variant).mapping, "UTF-8")
        )
    row = ("CREA,LN,14682-9", "CREA,LN,2160-0")  # one row of the code map's CSV
    seen.add(fingerprint(site("eu-si-local-codes", tmp_path / "csv", text, row).mapping, "UTF-8"))
    seen.add(fingerprint(base, "ISO-8859-2"))
    assert len(seen) == len(changed) + 3, "every change gives another fingerprint"


def test_the_schema_version_is_part_of_the_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mapping = site("us-lab-loinc", tmp_path).mapping
    before = fingerprint(mapping, "UTF-8")
    monkeypatch.setattr(carry, "SCHEMA", carry.SCHEMA + 1)
    assert fingerprint(mapping, "UTF-8") != before


def corruptions(envelope: Envelope, other: Envelope) -> dict[str, Envelope]:
    text = envelope.headers[HEADER]
    body = orjson.loads(text)

    def carrying(value: str) -> Envelope:
        return replace(envelope, headers={**envelope.headers, HEADER: value})

    def edited(index: int, value: object) -> Envelope:
        return carrying(orjson.dumps([*body[:index], value, *body[index + 1 :]]).decode())

    return {
        "missing": without_carried(envelope),
        "truncated": carrying(text[: len(text) // 2]),
        "not JSON": carrying("\x00garbage"),
        "empty": carrying(""),
        "another schema": edited(0, carry.SCHEMA + 1),
        "another fingerprint": edited(1, "0" * 24),
        "another record's value": carrying(other.headers[HEADER]),
        "other bytes": replace(envelope, payload=envelope.payload.replace(b"|F", b"|C", 1)),
        "another receipt time": replace(
            envelope, received_at=envelope.received_at - timedelta(days=1)
        ),
        "a fact cut short": edited(5, [[*body[5][0][:5], [body[5][0][5][0][:3]], []]]),
        "a value that is text": edited(
            5, [[*body[5][0][:5], [[b[0], "1.0", *b[2:]] for b in body[5][0][5]], body[5][0][6]]]
        ),
        "a patient id that is a number": edited(5, [[7, *body[5][0][1:]]]),
    }


def test_a_missing_or_corrupt_carried_value_re_extracts(tmp_path: Path) -> None:
    config = site("us-lab-loinc", tmp_path)
    envelopes = stored(config, samples("us-lab-loinc"), tmp_path)
    envelope, other = envelopes[0], envelopes[1]
    expected = Stage.of(config).run([without_carried(envelope)])
    for what, broken in corruptions(envelope, other).items():
        stage = Stage.of(config)
        assert stage.stage.carry.reuse(broken) is None, what
        if what not in ("other bytes", "another receipt time"):
            assert stage.run([broken]) == expected, what
            assert stage.stage.carry.extracted == 1, what


def test_nothing_processing_emits_carries_the_value(tmp_path: Path) -> None:
    config = site("us-lab-loinc", tmp_path)
    envelopes = stored(config, samples("us-lab-loinc"), tmp_path)
    stage = Stage.of(config)
    outcomes = stage.stage.process(envelopes)
    assert outcomes and all(HEADER not in outcome_headers(o) for o in outcomes)
    stage.model.close()


# ----------------------------------------------------------------- round trip --

TEXT = st.text(max_size=12)
ZONE = "Europe/Ljubljana"


def moments() -> st.SearchStrategy[datetime]:
    from zoneinfo import ZoneInfo

    zones = st.sampled_from([ZoneInfo(ZONE), UTC, timezone(timedelta(hours=-5)),
                             timezone(timedelta(hours=5, minutes=45))])  # fmt: skip
    naive = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1))
    return st.builds(lambda moment, zone: moment.replace(tzinfo=zone), naive, zones)


facts = st.builds(
    Fact,
    feature=TEXT, value=st.floats(allow_nan=False, allow_infinity=False), unit=TEXT,
    effective=moments(), ref=TEXT, source_id=TEXT, system=TEXT, code=TEXT, display=TEXT,
    comparator=TEXT, raw_value=TEXT, raw_unit=TEXT, status=TEXT, concept=TEXT, flag=TEXT,
    rank=st.integers(0, 1), episode=TEXT,
)  # fmt: skip
names = st.none() | st.builds(PersonName, TEXT, TEXT, TEXT)
demographics = st.builds(
    Demographics, st.none() | st.dates(min_value=date(1900, 1, 1)), st.none() | TEXT,
    st.none() | moments(), names,
)  # fmt: skip
unused = st.builds(Unused, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT)


@st.composite
def extractions(draw: st.DrawFn) -> Extraction:
    patient = PatientExtract(
        draw(TEXT), draw(demographics), draw(st.lists(facts, max_size=4)),
        draw(st.lists(unused, max_size=3)),
    )  # fmt: skip
    return Extraction(draw(TEXT), draw(TEXT), [patient])


@pytest.fixture(scope="module")
def ljubljana(tmp_path_factory: pytest.TempPathFactory) -> Carry:
    config = site("eu-si-local-codes", tmp_path_factory.mktemp("site"))
    assert config.mapping.timezone == ZONE
    return Carry(FactRules(config.mapping), config.mllp.charset)


@settings(max_examples=300, deadline=None)
@given(extraction=extractions(), payload=st.binary(max_size=64))
def test_an_extraction_comes_back_exactly(
    ljubljana: Carry, extraction: Extraction, payload: bytes
) -> None:
    key = extraction.patients[0].patient_id
    envelope = Envelope("s", "m", payload, Kind.HL7V2, key)
    headers = ljubljana.header(envelope, key, extraction)
    back = ljubljana.reuse(replace(envelope, headers=headers))
    assert back == extraction
    assert times(back) == times(extraction)
    assert [type(f.value) for f in back.patients[0].facts] == [float] * len(back.patients[0].facts)


def test_a_value_json_cannot_hold_is_not_carried(ljubljana: Carry) -> None:
    fact = Fact("creatinine", math.inf, "mg/dL", datetime(2026, 1, 1, tzinfo=UTC), "m/OBX/1", "m",
                "LN", "2160-0")  # fmt: skip
    patient = PatientExtract("P1", Demographics(None, None, None), [fact])
    envelope = Envelope("s", "m", b"x", Kind.HL7V2, "P1")
    assert ljubljana.header(envelope, "P1", Extraction("m", "ORU^R01", [patient])) == {}


def test_records_stored_by_older_code_are_extracted(tmp_path: Path) -> None:
    config = site("us-lab-loinc", tmp_path)
    envelopes = stored(config, samples("us-lab-loinc"), tmp_path)
    older = [without_carried(e) for e in envelopes]  # as code before the carry stored them
    stage = Stage.of(config)
    assert stage.run(older) == Stage.of(config).run(envelopes)
    assert stage.stage.carry.extracted == len(older)


def test_the_operator_api_shows_the_bytes_and_provenance_not_the_carried_facts(
    tmp_path: Path,
) -> None:
    from ehrbridge.operator_api import _message

    config = site("us-lab-loinc", tmp_path)
    envelope = stored(config, samples("us-lab-loinc"), tmp_path)[0]
    record = to_record(envelope, topic_name(config.site, "raw"))
    assert HEADER in record.headers
    shown = _message(record, raw=True)
    assert HEADER not in shown["headers"] and shown["headers"]["source_id"] == "m0"
    assert shown["raw"].replace("\n", "\r").encode() == envelope.payload.replace(b"\n", b"\r")


def test_processing_reads_a_message_in_the_sites_charset_as_ingest_does(tmp_path: Path) -> None:
    """A windows-1250 LIS without MSH-18: ZPI-2 'Ž' (0x8E) is F to both, carried or not."""
    text = (SITES_DIR / "eu-si-local-codes" / "mapping.yaml").read_text()
    mapping = site("eu-si-local-codes", tmp_path / "m", text).mapping.source
    config = parse_site_config(
        f"site: s\ndata_dir: {tmp_path}\nmapping: {{file: {mapping}}}\n"
        "mllp: {charset: windows-1250}\n"
        "model: {url: 'https://model.test', calibration: north_american}\n"
    )
    sample = (SITES_DIR / "eu-si-local-codes" / "oru-kfre-vector.hl7").read_text()
    assert "|UNICODE UTF-8" in sample and "ZPI|1|Ž" in sample
    message = sample.replace("|UNICODE UTF-8", "").encode("windows-1250")
    [envelope] = stored(config, [message], tmp_path)
    reader = Carry(FactRules(config.mapping), config.mllp.charset)
    again = Stage.of(config).stage.extract(without_carried(envelope))
    assert again.patients[0].demographics.sex == "F"
    assert reader.reuse(envelope) == again


def test_a_message_checked_off_the_loop_is_stored_bare_and_extracted(tmp_path: Path) -> None:
    """Over ingest's OFF_LOOP_BYTES nothing is carried: no encoding on the event loop, and no
    record that could outgrow a log's limit its bytes alone fit."""
    config = site("us-lab-loinc", tmp_path)
    panel = (SITES_DIR / "us-lab-loinc" / "oru-bmp-uacr.hl7").read_bytes().replace(b"\n", b"\r")
    note = b"NTE|1||" + b"x" * OFF_LOOP_BYTES + b"\r"
    large = panel.rstrip(b"\r") + b"\r" + note
    small, big = stored(config, [panel, large], tmp_path)
    assert HEADER in small.headers and HEADER not in big.headers
    stage = Stage.of(config)
    [(kind, prediction)] = stage.run([big])
    [(_, expected)] = Stage.of(config).run([small])
    assert kind == "prediction" and stage.stage.carry.extracted == 1
    assert isinstance(prediction, dict) and isinstance(expected, dict)
    assert prediction["features"] == expected["features"]


def test_the_carried_value_survives_a_real_kafka_broker(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Kafka headers are bytes: the value (names in UTF-8 too) comes back and is reused."""
    config = site("eu-si-local-codes", tmp_path).model_copy(
        update={"site": f"eo{uuid.uuid4().hex[:8]}"}
    )
    log = KafkaLog(KafkaTransport(kind="kafka", bootstrap=kafka_bootstrap, partitions=2))
    envelopes = stored(config, samples("eu-si-local-codes"), tmp_path, log)
    assert len(envelopes) >= 2 and all(HEADER in e.headers for e in envelopes)
    stage = Stage.of(config)
    assert stage.run(envelopes) == Stage.of(config).run([without_carried(e) for e in envelopes])
    assert (stage.stage.carry.reused, stage.stage.carry.extracted) == (len(envelopes), 0)
