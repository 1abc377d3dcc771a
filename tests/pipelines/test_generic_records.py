"""Records named by the model file, not by code: and what was written before still reads.

A prediction's outputs and a feature record's values are keyed by the names
the model file gives them. Stores and logs written before that (a results
database with one REAL column per output, prediction JSON with each risk at
top level and a feature record with one field per KFRE input) must read back
unchanged: an upgrade must not lose or alter a result a clinician was shown.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
from predictions import prediction

from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.config import load_site_config
from ehrbridge.pipelines.features import FeatureRecord
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.results import Delivery

REPO = Path(__file__).resolve().parents[2]
CONFIG = load_site_config(REPO / "sandbox" / "site.yaml", data_dir="/nonexistent")

# The results table as ehrbridge created it before outputs were one JSON column.
OLD_SCHEMA = """
CREATE TABLE results (
    identifier TEXT PRIMARY KEY, patient_id TEXT NOT NULL, anchor TEXT NOT NULL,
    risk_2y REAL NOT NULL, risk_5y REAL NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
    prediction BLOB NOT NULL, observation BLOB NOT NULL, updated_at REAL NOT NULL,
    delivered_at REAL, state_revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX results_by_patient ON results (patient_id, anchor);
"""

OLD_FEATURES = {
    "anchor": "2026-01-01T08:30:00+00:00",
    "age": 64.5,
    "male": True,
    "egfr": 17.57,
    "uacr_mg_g": 1761.8,
    "egfr_method": "ckd-epi-2021",
    "inputs": [
        {
            "feature": "creatinine",
            "value": 2.99774,
            "unit": "mg/dL",
            "effective": "2026-01-01T08:30:00+00:00",
            "ref": "SI-0001/OBX/3",
            "source_id": "SI-0001",
            "system": "LN",
            "code": "14682-9",
        }
    ],
    "episode": "day 2026-01-01",
}


def test_an_old_results_database_is_migrated_and_its_rows_read_back(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        row = ("ID1", "MRN-1", "2026-01-01T08:30:00+00:00", 0.2153, 0.5311, "kfre-4var 1 na")
        stored = ("delivered", b"{}", b'{"resourceType": "Observation"}', 1.0, 2.0, 7)
        conn.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", (*row, *stored))
    store = SqliteResultStore(path)
    try:
        old = store.get("ID1")
        assert old is not None
        assert old.outputs == {"risk_2y": 0.2153, "risk_5y": 0.5311}
        assert (old.status, old.state_revision, old.observation["resourceType"]) == (
            "delivered",
            7,
            "Observation",
        )
        summary = old.summary()  # what /api/results shows, as before the migration
        assert (summary["risk_2y"], summary["risk_5y_percent"]) == (0.2153, 53.11)
        new = prediction(CONFIG, "MRN-2", risk_2y=0.1, risk_5y=0.3)
        store.upsert([(new, {})], Delivery.SHADOW)
        again = store.get(new.identifier)
        assert again is not None and again.outputs == {"risk_2y": 0.1, "risk_5y": 0.3}
    finally:
        store.close()
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(results)")}
    assert "outputs" in columns and not {"risk_2y", "risk_5y"} & columns
    SqliteResultStore(path).close()  # opening a migrated store again changes nothing


def test_a_prediction_written_before_outputs_were_named_reads_back() -> None:
    current = orjson.loads(prediction(CONFIG).to_json())
    old = {k: v for k, v in current.items() if k != "outputs"}
    old.update({"risk_2y": 0.2153, "risk_5y": 0.5311, "features": OLD_FEATURES})
    read = Prediction.from_json(orjson.dumps(old))
    assert read.outputs == {"risk_2y": 0.2153, "risk_5y": 0.5311}
    features = read.features
    assert features.values == {"age": 64.5, "sex": 1.0, "egfr": 17.57, "uacr": 1761.8}
    assert features.method("egfr") == "ckd-epi-2021"
    source = features.source("egfr")  # the derived eGFR rests on the creatinine
    assert source is not None and source.feature == "creatinine"
    assert Prediction.from_json(read.to_json()) == read  # and round-trips in the new form


def test_a_record_keeps_only_what_one_model_takes() -> None:
    record = FeatureRecord.from_json(OLD_FEATURES)
    only = record.only(["age", "egfr"])
    assert only.values == {"age": 64.5, "egfr": 17.57}
    assert [f.ref for f in only.inputs] == ["SI-0001/OBX/3"]
    assert record.only(["age"]).inputs == ()
