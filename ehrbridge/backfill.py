"""``ehrbridge backfill``: score a site's history into an evaluation store. Nothing to the EHR.

    ehrbridge backfill --site site.yaml --from PATH

PATH is a FHIR Bulk Data export (a directory of ``$export`` NDJSON files) or an
HL7v2 batch file (FHS/BHS envelopes, one message per line, or MLLP frames).
Every message goes through the site's own processing stage
(``pipelines/process.py``: the same mapping, domain rules and model server;
every model of the site, ``models:``, each over its own client) into
``<data_dir>/evaluation/`` (its own state and result stores), never into
the site's live stores, and nothing is written back. Then, for every model
(each in ``report/<model>/``) or ``--model`` one::

    ehrbridge evaluate --site site.yaml --source backfill --out report/

Order: HL7v2 messages by MSH-7, FHIR patients by their first result; within
a FHIR patient the pipeline replays each episode in time order.
Resumable: a checkpoint (``backfill.json``: source, fingerprint, inputs done)
is written every few seconds, after the results and the patient states it
covers; a rerun continues from it, redoing what came after.
Idempotent: prediction identifiers are deterministic and stored by upsert,
and a state merge of a message already merged changes nothing, so a batch
replayed after a crash leaves the same stores. A model server that cannot be
reached stops the run before the checkpoint moves (exit 1): rerun when it is back.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import ConfigError

CHECKPOINT = "backfill.json"
BATCH = 2000
# History has no latency budget: a request carries many records (the site's
# model.batch_size is sized for live latency), and may take longer to answer.
MODEL_BATCH = 1000
MODEL_TIMEOUT_S = 60.0
# States and the checkpoint are saved at most this often (and at the end): each save
# writes every changed patient's whole state, which cost more than the merges at
# one save per batch. A crash loses at most this much work; the rerun redoes it.
CHECKPOINT_S = 5.0


def add_backfill_command(sub: Any) -> None:
    cmd = sub.add_parser(
        "backfill",
        help="score a site's history (FHIR Bulk NDJSON or HL7v2 batch) for evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--site", type=Path, required=True, help="the site YAML file")
    cmd.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        metavar="PATH",
        help="a FHIR Bulk export directory or an HL7v2 batch file",
    )
    cmd.add_argument(
        "--batch",
        type=int,
        default=BATCH,
        help=f"inputs per batch: one state write and one checkpoint each (default: {BATCH})",
    )
    cmd.add_argument(
        "--model-batch",
        type=int,
        default=MODEL_BATCH,
        help="feature records per model request, over the site's model.batch_size "
        f"(default: {MODEL_BATCH})",
    )
    cmd.add_argument(
        "--max-inputs",
        type=int,
        default=None,
        help="stop after this many inputs in this run (default: all); a rerun continues",
    )
    cmd.set_defaults(func=run_backfill)


@dataclass(frozen=True, slots=True)
class HistoryInput:
    source_id: str
    kind: Kind
    payload: bytes


def evaluation_dir(config: SiteConfig) -> Path:
    return config.data_dir / "evaluation"


def read_history(path: Path) -> tuple[list[HistoryInput], int]:
    """The inputs to replay, in replay order, and the count of unreadable lines."""
    from ehrbridge.adapters.evaluation_sources import patient_bundles

    if path.is_dir():
        bundles, bad = patient_bundles(path)
        return [HistoryInput(f"backfill-{pid}", Kind.FHIR, b) for pid, b in bundles], bad
    if not path.is_file():
        raise ConfigError(f"{path}: no such file or directory")
    return hl7_inputs(path.read_bytes()), 0


def hl7_inputs(raw: bytes) -> list[HistoryInput]:
    from ehrbridge.workbench.messages import split_hl7

    messages = split_hl7(raw)
    ordered = sorted(enumerate(messages), key=lambda m: (_msh7(m[1]), m[0]))
    return [HistoryInput(f"backfill-{i}", Kind.HL7V2, m) for i, m in ordered]


def _msh7(message: bytes) -> bytes:
    """MSH-7 as sortable text (YYYYMMDDHHMM...); the field separator is MSH-1."""
    fields = message[3:].split(message[3:4]) if len(message) > 3 else []
    return fields[6].split(b"^")[0] if len(fields) > 6 else b""


def fingerprint(inputs: Sequence[HistoryInput]) -> str:
    digest = hashlib.sha256()
    for item in inputs:
        digest.update(hashlib.sha256(item.payload).digest())
    return digest.hexdigest()


def _load_checkpoint(path: Path, source: Path, print_: str) -> int:
    if not path.exists():
        return 0
    saved = orjson.loads(path.read_bytes())
    if saved.get("fingerprint") != print_:
        raise ConfigError(
            f"{path}: a backfill of other input ({saved.get('source')}) is "
            "recorded here; delete the evaluation directory to start over"
        )
    return int(saved.get("done", 0))


def _save_checkpoint(path: Path, source: Path, print_: str, done: int, total: int) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            orjson.dumps(
                {
                    "source": str(source.resolve()),
                    "fingerprint": print_,
                    "done": done,
                    "total": total,
                }
            )
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint or the new one


def run_backfill(args: argparse.Namespace) -> int:
    from ehrbridge.adapters.sqlite_results import SqliteResultStore
    from ehrbridge.adapters.sqlite_state import SqliteStateStore
    from ehrbridge.datadir import secure_data_dir
    from ehrbridge.pipelines.process import ProcessStage
    from ehrbridge.stores import unlock_stores

    config = _for_history(load_site_config(args.site), getattr(args, "model_batch", MODEL_BATCH))
    inputs, bad_lines = read_history(args.source)
    where = evaluation_dir(config)
    secure_data_dir(where, "data_dir/evaluation")
    unlock_stores(config)
    print_ = fingerprint(inputs)
    checkpoint = where / CHECKPOINT
    done = _load_checkpoint(checkpoint, args.source, print_)
    state = _BatchState(SqliteStateStore(where / "state.sqlite"))
    results = SqliteResultStore(where / "results.sqlite")
    clients = _model_clients(config)
    run = _Run(len(inputs), done, args.max_inputs)
    run.predictions = {m.name: 0 for m in config.site_models}  # a model scoring none says so
    try:
        model, others = clients[config.model.name], dict(clients)
        del others[config.model.name]
        stage = ProcessStage(config, state, model, others=others)
        saved = time.monotonic()
        while batch := run.next_batch(inputs, args.batch):
            if not _replay(stage, results, batch, config.site, run):
                return 1  # states and checkpoint stay at the last save: a rerun redoes the rest
            run.done += len(batch)
            run.progress()
            if time.monotonic() - saved >= CHECKPOINT_S or not run.next_batch(inputs, 1):
                # States only after the results they led to; the checkpoint after both.
                state.commit()
                _save_checkpoint(checkpoint, args.source, print_, run.done, len(inputs))
                saved = time.monotonic()
    finally:
        for client in clients.values():
            client.close()
        results.close()
        state.close()
    run.summary(bad_lines, where)
    return 0


def _for_history(config: SiteConfig, model_batch: int) -> SiteConfig:
    """The site's config with model requests sized for a replay rather than live traffic."""

    def sized(endpoint: Any) -> Any:
        return endpoint.model_copy(
            update={
                "batch_size": max(endpoint.batch_size, model_batch),
                "timeout_s": max(endpoint.timeout_s, MODEL_TIMEOUT_S),
            }
        )

    return config.model_copy(
        update={"model": sized(config.model), "models": [sized(m) for m in config.models]}
    )


def _model_clients(config: SiteConfig) -> dict[str, Any]:
    """A client for each of the site's models, over its protocol, as the runtime opens them."""
    from ehrbridge.adapters import load

    return {
        e.name: load("model", "oip-v2" if e.definition is None else "declared")(e)
        for e in config.site_models
    }


class _BatchState:
    """The evaluation's state store, held in memory for the run; written once per batch.

    The processing stage stores states before it calls the model; were they
    durable at once, a batch whose model call failed would be "already seen"
    on the rerun and trigger no prediction. So a batch's states are written
    by :meth:`commit` (one transaction, one document per patient however many
    of the batch's messages were theirs), after its results. A failed batch
    ends the run (exit 1), so the in-memory states it changed are never
    written; the rerun starts from the durable ones.

    States stay in memory across batches (a history revisits its patients
    every few hundred messages; reading and decoding each one again from
    SQLite cost more than the merge), up to ``cap`` patients, after which a
    commit also empties the cache: everything in it is durable by then.
    """

    def __init__(self, inner: Any, cap: int = 200_000) -> None:
        self.inner = inner
        self.cap = cap
        self.known: dict[str, Any] = {}
        self.dirty: set[str] = set()

    def get(self, patient_id: str) -> Any:
        state = self.known.get(patient_id)
        if state is None:
            state = self.inner.get(patient_id)
            if state is not None:
                self.known[patient_id] = state
        return state

    def put_many(self, states: Iterable[Any]) -> None:
        for state in states:
            self.known[state.patient_id] = state
            self.dirty.add(state.patient_id)

    def commit(self) -> None:
        if self.dirty:
            self.inner.put_many([self.known[pid] for pid in self.dirty])
        self.dirty.clear()
        if len(self.known) > self.cap:
            self.known.clear()

    def close(self) -> None:
        self.inner.close()


@dataclass
class _Run:
    total: int
    done: int
    limit: int | None
    started: float = 0.0
    first: int = 0
    predictions: dict[str, int] = field(default_factory=dict)  # by model: each is evaluated
    failed: int = 0

    def __post_init__(self) -> None:
        self.started, self.first = time.monotonic(), self.done

    def next_batch(self, inputs: Sequence[HistoryInput], size: int) -> Sequence[HistoryInput]:
        end = min(self.done + max(size, 1), self.total)
        if self.limit is not None:
            end = min(end, self.first + self.limit)
        return inputs[self.done : end]

    def progress(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - self.first) / elapsed
        eta = (self.total - self.done) / rate if rate else 0.0
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        print(
            f"\r[{bar}] {self.done}/{self.total} inputs  {rate:,.0f}/s  ETA {eta:,.0f}s ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def summary(self, bad_lines: int, where: Path) -> None:
        print(file=sys.stderr)
        left = self.total - self.done
        state = "complete" if left == 0 else f"{left} inputs left (rerun to continue)"
        made = sum(self.predictions.values())
        by_model = ", ".join(f"{name} {n}" for name, n in sorted(self.predictions.items()))
        print(
            f"backfill {state}: {self.done}/{self.total} inputs, {made} predictions"
            f"{f' ({by_model})' if by_model else ''}, {self.failed} refused, "
            f"{bad_lines} unreadable lines -> {where}"
        )


def _replay(stage: Any, results: Any, batch: Sequence[HistoryInput], site: str, run: _Run) -> bool:
    """One batch through the processing stage into the evaluation result store."""
    from ehrbridge.pipelines.records import Prediction
    from ehrbridge.pipelines.results import Delivery

    envelopes = [Envelope(site, i.source_id, i.payload, i.kind, i.source_id) for i in batch]
    outcomes = stage.process(envelopes)
    transient = [o for o in outcomes if isinstance(o, Failure) and not o.permanent]
    if transient:
        print(
            f"\nerror: {transient[0].error.detail}; nothing from this batch was recorded, "
            "rerun to continue",
            file=sys.stderr,
        )
        return False
    predictions = [
        Prediction.from_json(o.payload)
        for o in outcomes
        if isinstance(o, Envelope) and o.kind is Kind.PREDICTION
    ]
    results.upsert([(p, {}) for p in predictions], Delivery.SHADOW)
    for prediction in predictions:
        name = prediction.model.name
        run.predictions[name] = run.predictions.get(name, 0) + 1
    run.failed += sum(1 for o in outcomes if isinstance(o, Failure))
    return True
