"""``stages``: what each step of the hot path costs per message, beside the naive way.

Each step runs in this process on the same sandbox ORU^R01 messages, one
after the other, timed by wall clock and by this process's CPU; the HTTP
steps go to the real model server and FHIR stand-in (their own processes),
so their wall time includes the server. The Kafka produce + consume of the
same bytes (``bench/floor.py``) is the floor every message pays on the Kafka
transport.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from ehrbridge.adapters.fhir_sink import FhirSink
from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.adapters.prometheus_metrics import PrometheusMetrics
from ehrbridge.adapters.sqlite_state import SqliteStateStore
from ehrbridge.bench.common import CpuMeter, ratio
from ehrbridge.bench.floor import kafka_floor
from ehrbridge.bench.load import SenderSpec, build_messages
from ehrbridge.bench.services import Services, kafka_bootstrap
from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.core.contracts import Envelope, Kind
from ehrbridge.pipelines import facts  # facts.extract: a test replaces the name imported below
from ehrbridge.pipelines.carry import Carry
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import Extraction, FactRules, extract
from ehrbridge.pipelines.features import FeatureRecord, evaluate
from ehrbridge.pipelines.metrics import NO_METRICS, Metrics
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.process import ProcessStage, site_prediction
from ehrbridge.pipelines.provenance import result_transaction
from ehrbridge.pipelines.records import ModelInfo, Prediction
from ehrbridge.pipelines.state import PatientState
from ehrbridge.pipelines.transport import from_record, to_record
from ehrbridge.sandbox.run import sandbox_site_file

T = TypeVar("T")
Row = dict[str, Any]


def timed(items: Sequence[T], step: Callable[[T], Any]) -> tuple[list[Any], float, float]:
    """Outputs, wall µs per item and CPU µs per item.

    A full collection first: the garbage of earlier steps is not this step's cost
    (collections its own allocations trigger still are).
    """
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    outputs = [step(item) for item in items]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = max(1, len(items))
    return outputs, wall / n * 1e6, cpu / n * 1e6


def _config(services: Services, data_dir: Path) -> SiteConfig:
    config = load_site_config(sandbox_site_file())
    return config.model_copy(
        update={
            "data_dir": data_dir,
            "model": config.model.model_copy(update={"url": services.model_url}),
            "writeback": config.writeback.model_copy(update={"fhir_base": services.fhir_base}),
        }
    )


def _row(step: str, wall: float, cpu: float, naive: tuple[float, float] | None = None) -> Row:
    row: Row = {"step": step, "us_per_msg": round(wall, 1), "cpu_us_per_msg": round(cpu, 1)}
    if naive is not None:
        row["naive_us_per_msg"] = round(naive[0], 1)
        row["naive_cpu_us_per_msg"] = round(naive[1], 1)
        row["naive_vs_ours"] = ratio(naive[0], wall)
    return row


def _envelope(config: SiteConfig, index: int, payload: bytes, kind: Kind, key: str) -> Envelope:
    return Envelope(config.site, f"S-{index}", payload, kind, key)


def measure_stages(
    services: Services, count: int, *, naive: bool, floor: bool, smoke: bool
) -> dict[str, Any]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(services, Path(tmp))
        rules = FactRules(config.mapping)
        raw = [m for _, m in build_messages(SenderSpec(0, 1, 0, 0, 0, count, "S"))]
        baseline = _Naive(raw[: 3 if smoke else 30], services) if naive else None

        parsed, wall, cpu = timed(raw, Message.parse)
        rows.append(
            _row("ER7 parse (lean reader)", wall, cpu, baseline.parse() if baseline else None)
        )
        extractions, wall, cpu = timed(parsed, lambda m: extract(m, rules))
        rows.append(
            _row("facts (codes, units, values)", wall, cpu, baseline.facts() if baseline else None)
        )
        states: dict[str, PatientState] = {}

        def features(extraction: Any) -> Any:
            patient = extraction.patients[0]
            state = states.setdefault(patient.patient_id, PatientState(patient.patient_id))
            return evaluate(state, patient, config.mapping)

        records, wall, cpu = timed(extractions, features)
        rows.append(_row("features (state merge + KFRE record)", wall, cpu))
        usable = [
            (e.patients[0].patient_id, r)
            for e, r in zip(extractions, records, strict=True)
            if isinstance(r, FeatureRecord)
        ]
        predictions = _infer(rows, config, usable, baseline, smoke)
        _observations(rows, config, predictions, baseline)
        _writeback(rows, config, predictions, smoke, baseline, fhir_pid=services.pids().get("fhir"))
        _process_stage(rows, config, raw, Path(tmp) / "plain")
        _process_carried(rows, config, raw, Path(tmp) / "carried")
        # The same with the monitoring the site runs: Prometheus counters, drift bins.
        _process_stage(rows, config, raw, Path(tmp) / "monitored", PrometheusMetrics(config))
        _ingest_metrics(rows, config, len(raw))
    result: dict[str, Any] = {"stages": rows}
    if floor:
        kafka = kafka_floor(kafka_bootstrap(), rate=0, seconds=0, count=count)
        result["floor"] = kafka
        rate = kafka["end_to_end_rate"] or 0
        rows.append(
            {
                "step": "floor: Kafka produce + consume of the same bytes",
                "us_per_msg": round(1e6 / rate, 1) if rate else None,
                "cpu_us_per_msg": kafka["cpu"]["total"]["cpu_us_per_msg"],
            }
        )
    headers = ["step", "ehrbridge µs/msg", "ehrbridge CPU µs/msg", "FHIR stand-in CPU µs/msg",
               "naive µs/msg", "naive CPU µs/msg", "naive / ours"]  # fmt: skip
    result["table"] = (
        headers,
        [
            [
                r["step"],
                r["us_per_msg"],
                r["cpu_us_per_msg"],
                r.get("fhir_cpu_us_per_msg"),
                r.get("naive_us_per_msg"),
                r.get("naive_cpu_us_per_msg"),
                r.get("naive_vs_ours"),
            ]
            for r in rows
        ],
    )
    return result


def _infer(
    rows: list[Row],
    config: SiteConfig,
    usable: list[tuple[str, FeatureRecord]],
    baseline: _Naive | None,
    smoke: bool,
) -> list[Prediction]:
    client = InferenceClient(config.model)
    try:
        singles = usable[: 50 if smoke else 300]
        _, wall, cpu = timed(singles, lambda item: client.infer([item[1]]))
        rows.append(
            _row(
                "inference, one request per record",
                wall,
                cpu,
                baseline.infer() if baseline else None,
            )
        )
        size = config.model.batch_size
        chunks = [usable[i : i + size] for i in range(0, len(usable), size)]
        results, wall, cpu = timed(chunks, lambda chunk: client.infer([r for _, r in chunk]))
        per = len(chunks) / max(1, len(usable))
        rows.append(_row(f"inference, batched ({size} per request)", wall * per, cpu * per))
    finally:
        client.close()
    model = ModelInfo(results[0].model_name, results[0].model_version, "north_american")
    predictions = []
    for chunk, result in zip(chunks, results, strict=True):
        for (patient, record), outputs in zip(chunk, result.rows(), strict=True):
            predictions.append(
                site_prediction(config, model, patient, record, outputs, source_id="S")
            )
    return predictions


def _observations(
    rows: list[Row], config: SiteConfig, predictions: list[Prediction], baseline: _Naive | None
) -> None:
    _, wall, cpu = timed(predictions, lambda p: orjson.dumps(build_observation(p, config)))
    rows.append(
        _row(
            "Observation: build + serialise",
            wall,
            cpu,
            baseline.observation() if baseline else None,
        )
    )
    _, wall, cpu = timed(predictions, lambda p: orjson.dumps(result_transaction(p, config)))
    rows.append(_row("write-back transaction (Observation+Provenance): build", wall, cpu))


def _writeback(
    rows: list[Row],
    config: SiteConfig,
    predictions: list[Prediction],
    smoke: bool,
    baseline: _Naive | None,
    *,
    fhir_pid: int | None = None,
) -> None:
    """The write-back transactions, one per result and batched; the stand-in's CPU beside."""
    envelopes = [
        _envelope(config, i, orjson.dumps(result_transaction(p, config)), Kind.FHIR, p.patient_id)
        for i, p in enumerate(predictions)
    ]
    half = len(envelopes) // 2
    singles, batched = envelopes[: min(half, 50 if smoke else 300)], envelopes[half:]
    base = config.writeback.fhir_base or ""
    sink = FhirSink(base, results_per_request=1)
    try:
        with _server_cpu(fhir_pid, len(singles)) as server:
            _, wall, cpu = timed(singles, lambda e: sink.write([e]))
        rows.append(
            _row("write-back, one transaction per result", wall, cpu)
            | server
            | _naive_cells(wall, baseline.put() if baseline else None)
        )
    finally:
        sink.close()
    size = config.writeback.results_per_request
    sink = FhirSink(base, results_per_request=size)
    chunks = [batched[i : i + size] for i in range(0, len(batched), size)]
    try:
        with _server_cpu(fhir_pid, len(batched)) as server:
            _, wall, cpu = timed(chunks, sink.write)
        per = len(chunks) / max(1, len(batched))
        name = f"write-back, batched ({size} per transaction)"
        rows.append(_row(name, wall * per, cpu * per) | server)
    finally:
        sink.close()
    creates = predictions[: 50 if smoke else 300]
    _observation_creates(rows, base, creates, config, fhir_pid=fhir_pid)


def _observation_creates(
    rows: list[Row],
    base: str,
    predictions: list[Prediction],
    config: SiteConfig,
    *,
    fhir_pid: int | None,
) -> None:
    """Plain ``POST [base]/Observation``: the stand-in's other hot write."""
    # Without the business identifier: the write-back's conditional updates (in later
    # repeats) key on it and must keep matching at most one Observation.
    bodies = [orjson.dumps(_without_identifier(build_observation(p, config))) for p in predictions]
    headers = {"content-type": "application/fhir+json"}
    with httpx.Client(timeout=30) as client:

        def create(body: bytes) -> None:
            client.post(f"{base}/Observation", content=body, headers=headers).raise_for_status()

        with _server_cpu(fhir_pid, len(bodies)) as server:
            _, wall, cpu = timed(bodies, create)
    rows.append(_row("FHIR stand-in: Observation create, one per request", wall, cpu) | server)


def _without_identifier(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "identifier"}


@contextmanager
def _server_cpu(pid: int | None, messages: int) -> Iterator[Row]:
    """Fills the yielded row with the FHIR stand-in's CPU µs per message over the block."""
    cells: Row = {}
    if pid is None:
        yield cells
        return
    meter = CpuMeter({"fhir": pid})
    meter.start()
    yield cells
    meter.stop()
    cells["fhir_cpu_us_per_msg"] = meter.report(messages)["fhir"]["cpu_us_per_msg"]


def _naive_cells(wall: float, naive: tuple[float, float] | None) -> Row:
    if naive is None:
        return {}
    return {
        "naive_us_per_msg": round(naive[0], 1),
        "naive_cpu_us_per_msg": round(naive[1], 1),
        "naive_vs_ours": ratio(naive[0], wall),
    }


def _process_stage(
    rows: list[Row],
    config: SiteConfig,
    raw: Sequence[bytes | Envelope],
    tmp: Path,
    metrics: Metrics = NO_METRICS,
    *,
    carried: bool = False,
) -> None:
    """The whole processing stage on batches of 256: parse .. state I/O .. batched model call.

    ``carried``: the records carry ingest's extraction (``pipelines/carry.py``).
    """
    tmp.mkdir()
    state = SqliteStateStore(tmp / "state.sqlite")
    model = InferenceClient(config.model)
    stage = ProcessStage(config, state, model, metrics)
    envelopes = [
        m if isinstance(m, Envelope) else _envelope(config, i, m, Kind.HL7V2, "")
        for i, m in enumerate(raw)
    ]
    batches = [envelopes[i : i + 256] for i in range(0, len(envelopes), 256)]
    try:
        _, wall, cpu = timed(batches, stage.process)
    finally:
        model.close()
        state.close()
    per = len(batches) / max(1, len(envelopes))
    if carried and stage.carry.reused != len(envelopes):
        raise RuntimeError(f"carried extraction used for {stage.carry.reused} of {len(envelopes)}")
    monitored = ", with metrics and drift" if metrics is not NO_METRICS else ""
    monitored += ", facts carried from ingest" if carried else ""
    name = f"whole processing stage (batches of 256, SQLite state{monitored})"
    rows.append(_row(name, wall * per, cpu * per))


def _process_carried(rows: list[Row], config: SiteConfig, raw: list[bytes], tmp: Path) -> None:
    """Extract once: ingest's encode, processing's decode, and the stage fed carried records."""
    rules = FactRules(config.mapping)
    carry = Carry(rules, config.mllp.charset)
    checked: list[tuple[Envelope, Extraction]] = []
    for i, message in enumerate(raw):  # what ingest has in hand once it has validated
        envelope = _envelope(config, i, message, Kind.HL7V2, "")
        parsed = Message.parse(message, config.mllp.charset)
        extraction = facts.extract(parsed, rules, received_at=envelope.received_at)
        checked.extend((replace(envelope, key=key), extraction) for key in extraction.keys)
    headers, wall, cpu = timed(checked, lambda item: carry.header(item[0], item[0].key, item[1]))
    rows.append(_row("ingest: carry the extraction on the raw record (encode)", wall, cpu))
    # Through the record form the log stores and hands back (pipelines/transport.py).
    envelopes = [
        from_record(to_record(envelope, "raw", extra))
        for (envelope, _), extra in zip(checked, headers, strict=True)
    ]
    _, wall, cpu = timed(envelopes, carry.reuse)
    rows.append(_row("facts carried from ingest: check + decode", wall, cpu))
    _process_stage(rows, config, envelopes, tmp, carried=True)


def _ingest_metrics(rows: list[Row], config: SiteConfig, count: int) -> None:
    """What ingest adds per message: its answer's count, the feed clock, the stage timer."""
    metrics = PrometheusMetrics(config)

    def report(_: int) -> None:
        metrics.message("mllp", "aa")
        metrics.stage_seconds("ingest", 0.001)

    _, wall, cpu = timed(range(count), report)
    rows.append(_row("ingest metrics per message (count, feed clock, timer)", wall, cpu))


class _Naive:
    """The naive pipeline's steps on a few messages (hl7apy is slow)."""

    def __init__(self, raw: list[bytes], services: Services) -> None:
        from ehrbridge.bench import naive

        self.naive = naive
        self.raw = raw
        self.services = services
        self.parsed: list[Any] = []
        self.features: list[dict[str, Any]] = []

    def parse(self) -> tuple[float, float]:
        self.parsed, wall, cpu = timed(self.raw, self.naive.hl7apy_parse)
        return wall, cpu

    def facts(self) -> tuple[float, float]:
        self.features, wall, cpu = timed(self.parsed, self.naive.naive_features)
        return wall, cpu

    def infer(self) -> tuple[float, float]:
        with httpx.Client(timeout=30) as client:
            url = self.services.model_url
            _, wall, cpu = timed(self.features, lambda f: self.naive.infer_one(client, url, f))
        return wall, cpu

    def observation(self) -> tuple[float, float]:
        items = self.features * max(1, 200 // max(1, len(self.features)))
        _, wall, cpu = timed(items, lambda f: self.naive.fhir_resources_observation(f, (0.1, 0.2)))
        return wall, cpu

    def put(self) -> tuple[float, float]:
        bodies = [self.naive.fhir_resources_observation(f, (0.1, 0.2)) for f in self.features]
        base = self.services.fhir_base
        with httpx.Client(timeout=30) as client:

            def put(item: tuple[dict[str, Any], str]) -> None:
                f, body = item
                key = f"{f['mrn']}-{f['when'].date().isoformat()}"
                self.naive.put_observation(client, base, key, body)

            _, wall, cpu = timed(list(zip(self.features, bodies, strict=True)), put)
        return wall, cpu
