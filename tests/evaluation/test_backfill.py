"""`ehrbridge backfill` then `evaluate`, end to end on the Synthea CKD patients as Bulk NDJSON.

The patients are converted in the test the way a FHIR server's ``$export``
writes them: one file per resource type, references as ``Patient/<id>``.
Backfill goes through the real processing stage and the real model server
(the sandbox's, on a socket). Its oracle is the mapping-test replay
(``workbench/testing.py``), an independent path through the same mapping.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from conftest import CORPUS

from ehrbridge._http import ThreadedServer
from ehrbridge.cli import main
from ehrbridge.config import load_site_config
from ehrbridge.core.contracts import Kind
from ehrbridge.pipelines.features import FeatureRecord
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.workbench.messages import Input
from ehrbridge.workbench.testing import replay

REPO = Path(__file__).resolve().parents[2]
SYNTHEA = CORPUS / "fhir" / "synthea-ckd"
pytestmark = pytest.mark.skipif(not SYNTHEA.is_dir(), reason="needs ../shared/corpus")


@pytest.fixture(scope="module")
def model_server() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_model_app()) as server:
        yield server


def bulk_export(directory: Path) -> Path:
    """The Synthea Bundles as $export NDJSON: a file per type, Patient/<id> references."""
    directory.mkdir()
    files: dict[str, list[bytes]] = defaultdict(list)
    for bundle_path in sorted(SYNTHEA.glob("*.json")):
        text = bundle_path.read_text()
        bundle = json.loads(text)
        kinds = {e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]}
        for uuid_ref, kind in kinds.items():  # urn:uuid:x -> Type/x, as a server exports it
            text = text.replace(f'"{uuid_ref}"', f'"{kind}/{uuid_ref.removeprefix("urn:uuid:")}"')
        for entry in json.loads(text)["entry"]:
            files[entry["resource"]["resourceType"]].append(orjson.dumps(entry["resource"]))
    for kind, lines in files.items():
        (directory / f"{kind}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    return directory


def site_file(tmp: Path, model_url: str) -> Path:
    text = (REPO / "sandbox" / "site-fhir.yaml").read_text()
    text = text.replace("data_dir: ../.ehrbridge-sandbox/sandbox-fhir", f"data_dir: {tmp / 'data'}")
    text = text.replace("../mappings/sites", str(REPO / "mappings" / "sites"))
    text = text.replace("url: http://127.0.0.1:8091", f"url: {model_url}")
    path = tmp / "site.yaml"
    path.write_text(text)
    return path


def stored(site: Path, model: str = "kfre-4var") -> dict[str, tuple[str, str]]:
    from ehrbridge.adapters.evaluation_sources import stored_predictions

    config = load_site_config(site)
    rows = stored_predictions(config.data_dir / "evaluation" / "results.sqlite", model)
    return {r["identifier"]: (r["patient_id"], r["features"]["anchor"]) for r in rows}


def expected_episodes(site: Path) -> set[tuple[str, str]]:
    """What the mapping tests' replay scores from the same Bundles: (patient, anchor)."""
    config = load_site_config(site)
    inputs = [Input(Kind.FHIR, p.read_bytes(), p.name) for p in sorted(SYNTHEA.glob("*.json"))]
    result = replay(inputs, config.mapping)
    return {
        (pid, r.anchor.isoformat()) for pid, r in result.outcomes if isinstance(r, FeatureRecord)
    }


def test_backfill_then_evaluate_the_synthea_patients(
    tmp_path: Path, model_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    export = bulk_export(tmp_path / "export")
    site = site_file(tmp_path, model_server.base_url)
    assert main(["backfill", "--site", str(site), "--from", str(export)]) == 0
    printed = capsys.readouterr()
    assert "backfill complete: 4/4 inputs" in printed.out
    assert "4/4 inputs" in printed.err and "/s  ETA" in printed.err  # the progress line
    first = stored(site)
    assert first and set(first.values()) == expected_episodes(site)
    # Nothing reached the site's own stores (nor any EHR: no write-back runs at all).
    assert not (tmp_path / "data" / "results.sqlite").exists()

    # Idempotent: a second run finds the checkpoint complete and changes nothing.
    assert main(["backfill", "--site", str(site), "--from", str(export)]) == 0
    assert stored(site) == first

    out = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--site",
                str(site),
                "--model",
                "kfre-4var",
                "--source",
                "backfill",
                "--out",
                str(out),
                "--events",
                str(export),
                "--as-of",
                "2026-12-01T00:00:00+00:00",
            ]
        )
        == 0
    )
    evaluation = orjson.loads((out / "evaluation.json").read_bytes())
    links = orjson.loads((out / "links.json").read_bytes())
    by_prediction = {(row["prediction"], row["horizon"]): row for row in links}
    # Stewart Stanton (Synthea e1c92057) died 1969-08-26 with no dialysis code and no
    # eGFR < 15 sustained 90 days (each low run is broken by a value over 15). A window
    # that ends after the death is censored by it; one that ends before is "no event",
    # the death showing he was followed past its end.
    death = datetime(1969, 8, 26, 19, 20, 6, tzinfo=UTC)
    stewart = {i: a for i, (pid, a) in first.items() if pid.startswith("e1c92057")}
    assert len(stewart) >= 2
    seen = set()
    for identifier, anchor in stewart.items():
        for horizon, days in (("2y", 730), ("5y", 1826)):
            row = by_prediction[(identifier, horizon)]
            ends = datetime.fromisoformat(anchor) + timedelta(days=days)
            expect = (
                ("censored", "death") if ends >= death else ("no_event", "followed past horizon")
            )
            assert (row["status"], row["reason"]) == expect, (anchor, row)
            seen.add(expect)
    assert len(seen) == 2  # both cases occur in his history
    total = evaluation["horizons"]["2y"]["linkage"]
    assert sum(total.values()) == len(first)
    assert evaluation["coverage"]["patients_seen"] == 4
    assert evaluation["coverage"]["patients_scored"] == len({p for p, _ in first.values()})


def test_backfill_resumes_where_it_stopped_and_ends_with_the_same_stores(
    tmp_path: Path, model_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    export = bulk_export(tmp_path / "export")
    one_shot = site_file(tmp_path, model_server.base_url)
    assert main(["backfill", "--site", str(one_shot), "--from", str(export)]) == 0
    expected = stored(one_shot)

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    site = site_file(resumed_dir, model_server.base_url)
    args = ["backfill", "--site", str(site), "--from", str(export), "--batch", "1"]
    assert main([*args, "--max-inputs", "2"]) == 0
    assert "2 inputs left (rerun to continue)" in capsys.readouterr().out
    checkpoint = orjson.loads((resumed_dir / "data" / "evaluation" / "backfill.json").read_bytes())
    assert (checkpoint["done"], checkpoint["total"]) == (2, 4)
    assert main(args) == 0
    assert stored(site) == expected


def test_an_unreachable_model_stops_the_run_and_a_rerun_scores_everything(
    tmp_path: Path, model_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    export = bulk_export(tmp_path / "export")
    reference = site_file(tmp_path, model_server.base_url)
    assert main(["backfill", "--site", str(reference), "--from", str(export)]) == 0
    expected = stored(reference)

    down_dir = tmp_path / "down"
    down_dir.mkdir()
    down = site_file(down_dir, "http://127.0.0.1:9")  # discard port: nothing answers
    assert main(["backfill", "--site", str(down), "--from", str(export), "--batch", "4"]) == 1
    assert "rerun to continue" in capsys.readouterr().err
    assert not (down_dir / "data" / "evaluation" / "backfill.json").exists()
    # The same data dir, the model back: the held-back states did not make the rerun
    # think it had seen these patients already.
    up = site_file(down_dir, model_server.base_url)
    assert main(["backfill", "--site", str(up), "--from", str(export)]) == 0
    assert stored(up) == expected


def states(site: Path) -> dict[str, bytes]:
    from ehrbridge.adapters.sqlite_state import SqliteStateStore

    store = SqliteStateStore(load_site_config(site).data_dir / "evaluation" / "state.sqlite")
    try:
        return {pid: store.get(pid).to_json() for pid in store.patient_ids()}  # type: ignore[union-attr]
    finally:
        store.close()


@pytest.mark.parametrize("checkpoint_s", [0.0, 1e9], ids=["saved-each-batch", "never-saved"])
def test_a_model_failing_mid_run_leaves_stores_a_rerun_completes_identically(
    tmp_path: Path,
    model_server: ThreadedServer,
    monkeypatch: pytest.MonkeyPatch,
    checkpoint_s: float,
) -> None:
    """States are held in memory and saved every few seconds: a failure between saves
    leaves results newer than the durable states, which the rerun must redo to the
    same stores as a run that never failed."""
    from ehrbridge import backfill
    from ehrbridge.adapters.inference_client import InferenceClient
    from ehrbridge.core.errors import UpstreamUnavailable

    export = bulk_export(tmp_path / "export")
    reference = site_file(tmp_path, model_server.base_url)
    assert main(["backfill", "--site", str(reference), "--from", str(export)]) == 0

    failing_dir = tmp_path / "failing"
    failing_dir.mkdir()
    site = site_file(failing_dir, model_server.base_url)
    real_infer, calls = InferenceClient.infer, []

    def infer_then_fail(self: InferenceClient, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # the second request: the first one's results are stored
            raise UpstreamUnavailable("model server went away")
        return real_infer(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backfill, "CHECKPOINT_S", checkpoint_s)
    monkeypatch.setattr(InferenceClient, "infer", infer_then_fail)
    args = ["backfill", "--site", str(site), "--from", str(export), "--batch", "1"]
    assert main(args) == 1
    checkpoint = failing_dir / "data" / "evaluation" / "backfill.json"
    assert checkpoint.exists() == (checkpoint_s == 0.0)
    monkeypatch.setattr(InferenceClient, "infer", real_infer)
    assert main(args) == 0
    assert stored(site) == stored(reference)
    assert states(site) == states(reference)


def test_a_site_with_two_models_backfills_each_over_its_own_client(
    tmp_path: Path, model_server: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``models:`` [kfre-4var, kfre-8var]: every model gets a client (the stage needs one
    per model), KFRE-4's predictions are those of the one-model site, and ``evaluate
    --source backfill`` without ``--model`` evaluates each model's own predictions."""
    export = bulk_export(tmp_path / "export")
    one = site_file(tmp_path, model_server.base_url)
    assert main(["backfill", "--site", str(one), "--from", str(export)]) == 0

    two_dir = tmp_path / "two"
    two_dir.mkdir()
    two = site_file(two_dir, model_server.base_url)
    url = model_server.base_url
    block = f"model:\n  url: {url}\n  name: kfre-4var\n  calibration: north_american\n"
    block += "  timeout_s: 2.0\n"
    text = two.read_text()
    assert block in text
    models = (
        f"models:\n  - {{url: {model_server.base_url}, name: kfre-4var, "
        "calibration: north_american}\n"
        f"  - {{file: {REPO / 'models' / 'kfre-8.yaml'}, url: {model_server.base_url}, "
        "calibration: north_american}\n"
    )
    two.write_text(text.replace(block, models))
    assert [m.name for m in load_site_config(two).site_models] == ["kfre-4var", "kfre-8var"]
    capsys.readouterr()
    assert main(["backfill", "--site", str(two), "--from", str(export)]) == 0
    assert stored(two) == stored(one)
    kfre8 = stored(two, "kfre-8var")
    counts = f"(kfre-4var {len(stored(one))}, kfre-8var {len(kfre8)})"
    assert counts in capsys.readouterr().out
    out = two_dir / "report"
    evaluate = ["evaluate", "--site", str(two), "--source", "backfill", "--out", str(out)]
    assert main([*evaluate, "--events", str(export), "--as-of", "2026-12-01T00:00:00+00:00"]) == 0
    for name, predictions in (("kfre-4var", stored(one)), ("kfre-8var", kfre8)):
        evaluation = orjson.loads((out / name / "evaluation.json").read_bytes())
        assert evaluation["model"] == name
        assert sum(evaluation["horizons"]["2y"]["linkage"].values()) == len(predictions)
        links = orjson.loads((out / name / "links.json").read_bytes())
        assert {row["prediction"] for row in links} == set(predictions)
    # The Synthea patients have no albumin, phosphate, bicarbonate nor calcium: KFRE-8
    # scores none of them, and its coverage says so (its own reasons, not KFRE-4's).
    assert not kfre8
    coverage = orjson.loads((out / "kfre-8var" / "evaluation.json").read_bytes())["coverage"]
    assert coverage["patients_seen"] == 4 and coverage["patients_scored"] == 0
    reasons = coverage["not_scored_by_reason"]
    assert sum(reasons.values()) == 4
    assert all(r.startswith("missing input: albumin, bicarbonate, calcium") for r in reasons)


def test_hl7v2_batches_are_replayed_in_msh7_order() -> None:
    from ehrbridge.backfill import hl7_inputs

    late = b"MSH|^~\\&|LAB|H|EB|H|20240301||ORU^R01|B|P|2.5.1\rPID|1||X\r"
    early = b"MSH|^~\\&|LAB|H|EB|H|20230101||ORU^R01|A|P|2.5.1\rPID|1||X\r"
    batch = b"FHS|^~\\&\rBHS|^~\\&\r" + late + early + b"BTS|2\rFTS|1\r"
    order = [i.payload.split(b"|")[9] for i in hl7_inputs(batch)]
    assert order == [b"A", b"B"]


def test_every_framing_of_a_history_splits_into_the_same_messages() -> None:
    from ehrbridge.workbench.messages import split_hl7

    one = b"MSH|^~\\&|LAB|H|EB|H|20230101||ORU^R01|A|P|2.5.1\rPID|1||X\rOBX|1|ST|C^MSH||MSH\r"
    two = b"MSH|^~\\&|LAB|H|EB|H|20240301||ORU^R01|B|P|2.5.1\rPID|1||Y\r"
    framings = [
        one + two,  # CR segments, messages back to back
        one + b"\n" + two,  # one message per line
        one.replace(b"\r", b"\r\n") + two.replace(b"\r", b"\r\n"),  # CRLF files
        b"\x0b" + one + b"\x1c\r\x0b" + two + b"\x1c\r",  # MLLP frames
        b"FHS|^~\\&\rBHS|^~\\&\r" + one + two + b"BTS|2\rFTS|1\r",  # batch envelope
    ]
    for raw in framings:
        split = split_hl7(raw)
        assert [m.split(b"|")[9] for m in split] == [b"A", b"B"], raw
        assert [m.count(b"PID|") for m in split] == [1, 1]


def test_the_backfill_benchmark_runs_and_reports_its_rate(tmp_path: Path) -> None:
    from ehrbridge.bench.scenarios import SCENARIOS, Options

    result = SCENARIOS["backfill"](Options(smoke=True, run_dir=tmp_path))
    assert result["messages"] == 500
    assert result["predictions"] == 500  # every synthetic ORU is inside KFRE's domain
    assert result["messages_per_s"] > 0 and result["target_per_s"] == 5000
    headers, rows = result["table"]
    assert len(rows) == 1 and len(rows[0]) == len(headers)
