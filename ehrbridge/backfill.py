"""``ehrbridge backfill``: score a site's history into an evaluation store. Nothing to the EHR.

    ehrbridge backfill --site site.yaml --from PATH

PATH is a FHIR Bulk Data export (a directory of ``$export`` NDJSON files) or an
HL7v2 batch file (FHS/BHS envelopes, one message per line, or MLLP frames).
Every message goes through the site's own processing stage
(``pipelines/process.py``: the same mapping, domain rules and model server)
into ``<data_dir>/evaluation/`` (its own state and result stores), never into
the site's live stores, and nothing is written back. Then::

    ehrbridge evaluate --site site.yaml --model kfre-4var --source backfill --out report/

Order: HL7v2 messages by MSH-7, FHIR patients by their first result; within
a FHIR patient the pipeline replays each episode in time order.
Resumable: a checkpoint (``backfill.json``: source, fingerprint, inputs done)
is written after each batch's results and states; a rerun continues from it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import ConfigError

CHECKPOINT = "backfill.json"


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
    cmd.add_argument("--batch", type=int, default=200, help="inputs per batch (default: 200)")
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
    from ehrbridge.adapters.inference_client import InferenceClient
    from ehrbridge.adapters.sqlite_results import SqliteResultStore
    from ehrbridge.adapters.sqlite_state import SqliteStateStore
    from ehrbridge.datadir import secure_data_dir
    from ehrbridge.pipelines.process import ProcessStage
    from ehrbridge.stores import unlock_stores

    config = load_site_config(args.site)
    inputs, bad_lines = read_history(args.source)
    where = evaluation_dir(config)
    secure_data_dir(where, "data_dir/evaluation")
    unlock_stores(config)
    print_ = fingerprint(inputs)
    checkpoint = where / CHECKPOINT
    done = _load_checkpoint(checkpoint, args.source, print_)
    state = _BatchState(SqliteStateStore(where / "state.sqlite"))
    results = SqliteResultStore(where / "results.sqlite")
    model = InferenceClient(config.model)
    run = _Run(len(inputs), done, args.max_inputs)
    try:
        stage = ProcessStage(config, state, model)
        while batch := run.next_batch(inputs, args.batch):
            if not _replay(stage, results, batch, config.site, run):
                return 1
            state.commit()  # states only after the batch's results: a rerun redoes it whole
            run.done += len(batch)
            _save_checkpoint(checkpoint, args.source, print_, run.done, len(inputs))
            run.progress()
    finally:
        model.close()
        results.close()
        state.close()
    run.summary(bad_lines, where)
    return 0


class _BatchState:
    """A state store that keeps a batch's states until :meth:`commit`.

    The processing stage stores states before it calls the model; were they
    durable at once, a batch whose model call failed would be "already seen"
    on the rerun and trigger no prediction. Held back, the rerun starts from
    the states before the batch.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.held: dict[str, Any] = {}

    def get(self, patient_id: str) -> Any:
        held = self.held.get(patient_id)
        return held if held is not None else self.inner.get(patient_id)

    def put_many(self, states: Iterable[Any]) -> None:
        # No copies: the SQLite store hands out a fresh object per get, so what the
        # stage mutates is never the durable copy, and a dropped batch leaves it as it was.
        for state in states:
            self.held[state.patient_id] = state

    def commit(self) -> None:
        self.inner.put_many(self.held.values())
        self.held.clear()

    def close(self) -> None:
        self.inner.close()


@dataclass
class _Run:
    total: int
    done: int
    limit: int | None
    started: float = 0.0
    first: int = 0
    predictions: int = 0
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
        print(
            f"backfill {state}: {self.done}/{self.total} inputs, {self.predictions} "
            f"predictions, {self.failed} refused, {bad_lines} unreadable lines -> {where}"
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
    run.predictions += len(predictions)
    run.failed += sum(1 for o in outcomes if isinstance(o, Failure))
    return True
