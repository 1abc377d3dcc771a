"""`ehrbridge evaluate` end to end: real result and state stores, a FHIR Bulk export, the CLI.

The cohort's outcomes are drawn from the stored risks themselves, so the
report must find the model calibrated; stored with risks doubled, it must say
the model over-predicts. Linkage counts are known from how the cohort was
made (deaths, a recent cohort still pending, prevalent dialysis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pytest
from sklearn.metrics import roc_auc_score

from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.adapters.sqlite_state import SqliteStateStore
from ehrbridge.cli import main
from ehrbridge.config import load_site_config
from ehrbridge.pipelines.facts import Fact
from ehrbridge.pipelines.features import FeatureRecord
from ehrbridge.pipelines.process import site_prediction
from ehrbridge.pipelines.records import ModelInfo
from ehrbridge.pipelines.results import Delivery
from ehrbridge.pipelines.state import PatientState

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelInfo("kfre-4var", "1.0.0", "north_american")
AS_OF = datetime(2026, 12, 1, tzinfo=UTC)
SYSTEM = "urn:ehrbridge:sandbox:mrn"  # sandbox/site.yaml's patient.fhir_system
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


@dataclass
class Patient:
    key: str
    anchor: datetime
    risk_2y: float
    risk_5y: float
    male: bool
    age: float
    event_day: int | None = None  # days after anchor
    death_day: int | None = None
    prevalent: bool = False


def make_cohort(n: int, seed: int) -> list[Patient]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r2 = float(1 / (1 + math.exp(-rng.normal(-2.4, 1.0))))
        r5 = 1 - (1 - r2) ** 2.2
        anchor = datetime(2018, 1, 1, 9, tzinfo=UTC) + timedelta(days=int(rng.integers(0, 365)))
        p = Patient(
            f"P{i:05d}", anchor, r2, r5, bool(rng.random() < 0.5), float(rng.uniform(30, 90))
        )
        if rng.random() < r2:
            p.event_day = int(rng.integers(1, 730))
        elif rng.random() < (r5 - r2) / (1 - r2):
            p.event_day = int(rng.integers(731, 1826))
        out.append(p)
    return out


def add_special_cases(cohort: list[Patient]) -> dict[str, int]:
    """Deaths before any event, a recent (pending) cohort, prevalent dialysis; their counts."""
    deaths = 0
    for p in cohort[:60]:
        if p.event_day is None or p.event_day > 400:
            p.death_day, deaths = 300, deaths + 1  # censored at both horizons
    for p in cohort[60:90]:
        p.anchor = AS_OF - timedelta(days=200)  # 2y window still open
        p.event_day = None
    for p in cohort[90:100]:
        p.prevalent, p.event_day, p.death_day = True, None, None
    return {"censored": deaths, "pending": 30, "prevalent": 10}


def store_predictions(
    data_dir: Path, cohort: list[Patient], factor: float = 1.0, model: ModelInfo = MODEL
) -> None:
    config = load_site_config(REPO / "sandbox" / "site.yaml", data_dir=str(data_dir))
    store = SqliteResultStore(data_dir / "results.sqlite")
    items = []
    for p in cohort:
        fact = Fact(
            "egfr", 30.0, "mL/min/{1.73_m2}", p.anchor, f"{p.key}/OBX/1", p.key, "LN", "33914-3"
        )
        features = FeatureRecord(
            p.anchor,
            {"age": p.age, "sex": 1.0 if p.male else 0.0, "egfr": 30.0, "uacr": 300.0},
            (fact,),
            episode=f"day {p.anchor.date()}",
            sources={"egfr": fact.ref},
        )
        risks = {
            "risk_2y": min(p.risk_2y * factor, 0.999),
            "risk_5y": min(p.risk_5y * factor, 0.999),
        }
        items.append((site_prediction(config, model, p.key, features, risks, source_id=p.key), {}))
    store.upsert(items, Delivery.SHADOW)
    store.close()


def write_export(directory: Path, cohort: list[Patient]) -> None:
    directory.mkdir()
    patients, conditions, encounters = [], [], []
    for p in cohort:
        patient = {
            "resourceType": "Patient",
            "id": f"id-{p.key}",
            "identifier": [{"system": SYSTEM, "value": p.key}],
        }
        if p.death_day is not None:
            patient["deceasedDateTime"] = (p.anchor + timedelta(days=p.death_day)).isoformat()
        patients.append(patient)
        subject = {"reference": f"Patient/id-{p.key}"}
        if p.event_day is not None and (p.death_day is None or p.event_day < p.death_day):
            at = p.anchor + timedelta(days=p.event_day)
            conditions.append(
                {
                    "resourceType": "Condition",
                    "subject": subject,
                    "onsetDateTime": at.isoformat(),
                    "code": {"coding": [{"system": ICD10, "code": "N18.6"}]},
                }
            )
        if p.prevalent:
            conditions.append(
                {
                    "resourceType": "Condition",
                    "subject": subject,
                    "onsetDateTime": (p.anchor - timedelta(days=30)).isoformat(),
                    "code": {"coding": [{"system": ICD10, "code": "Z99.2"}]},
                }
            )
        if p.death_day is None:  # seen again after 5 years (or at the end of a recent cohort)
            seen = min(p.anchor + timedelta(days=1900), AS_OF - timedelta(days=1))
            encounters.append(
                {
                    "resourceType": "Encounter",
                    "subject": subject,
                    "status": "finished",
                    "period": {"start": seen.isoformat()},
                }
            )
    for name, rows in (("Patient", patients), ("Condition", conditions), ("Encounter", encounters)):
        lines = b"\n".join(orjson.dumps(r) for r in rows)
        (directory / f"{name}.ndjson").write_bytes(lines + b"\n{not json\n")


CRITERIA = """
evaluation:
  promotion:
    min_days: 30
    min_scored_patients: 1000
    max_flags_per_day: 100
    min_auroc_lower_ci: 0.6
    calibration_slope: [0.8, 1.2]
    max_abs_calibration_in_the_large: 0.2
"""


COVERAGE_CRITERIA = """
evaluation:
  promotion: {max_missing_input_rate: 0.01, min_auroc_lower_ci: 0.6, min_scored_patients: 40}
"""


def site_file(tmp: Path, extra: str = "") -> Path:
    text = (REPO / "sandbox" / "site.yaml").read_text() + extra
    text = text.replace("data_dir: ../.ehrbridge-sandbox", f"data_dir: {tmp / 'data'}")
    path = tmp / "site.yaml"
    path.write_text(text)
    return path


def run(
    tmp: Path, cohort: list[Patient], factor: float, capsys: pytest.CaptureFixture[str]
) -> tuple[dict, list, str]:
    (tmp / "data").mkdir(mode=0o700)
    store_predictions(tmp / "data", cohort, factor)
    write_export(tmp / "export", cohort)
    out = tmp / "report"
    code = main(
        [
            "evaluate",
            "--site",
            str(site_file(tmp, CRITERIA)),
            "--model",
            "kfre-4var",
            "--out",
            str(out),
            "--events",
            str(tmp / "export"),
            "--as-of",
            AS_OF.isoformat(),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    evaluation = orjson.loads((out / "evaluation.json").read_bytes())
    links = orjson.loads((out / "links.json").read_bytes())
    return evaluation, links, printed


def evaluate_again(tmp: Path) -> dict:
    site, out = tmp / "site.yaml", tmp / "again"
    assert site.exists()
    args = ["evaluate", "--site", str(site), "--model", "kfre-4var", "--out", str(out),
            "--events", str(tmp / "export"), "--as-of", AS_OF.isoformat()]  # fmt: skip
    assert main(args) == 0
    return dict(orjson.loads((out / "evaluation.json").read_bytes()))


@pytest.fixture(scope="module")
def cohort() -> tuple[list[Patient], dict[str, int]]:
    people = make_cohort(3000, seed=11)
    return people, add_special_cases(people)


def test_a_calibrated_cohort_is_found_calibrated(
    tmp_path: Path,
    cohort: tuple[list[Patient], dict[str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    people, expected = cohort
    evaluation, links, printed = run(tmp_path, people, 1.0, capsys)
    for horizon in ("2y", "5y"):
        r = evaluation["horizons"][horizon]
        assert r["linkage"]["censored"] == expected["censored"]
        assert r["linkage"]["prevalent"] == expected["prevalent"]
        slope = r["calibration"]["calibration_slope"]
        citl = r["calibration"]["calibration_in_the_large"]
        assert slope["low"] <= 1.0 <= slope["high"], (horizon, slope)
        assert citl["low"] <= 0.0 <= citl["high"], (horizon, citl)
    assert evaluation["horizons"]["2y"]["linkage"]["pending"] == expected["pending"]
    assert not [f for f in evaluation["findings"] if f["kind"] == "miscalibrated"]
    verdicts = {v["criterion"]: v["status"] for v in evaluation["promotion"]["criteria"]}
    assert evaluation["promotion"]["overall"] == "pass", evaluation["promotion"]
    assert len(verdicts) == 6 and "promotion: pass" in printed
    # AUROC equals scikit-learn's on the arrays rebuilt from the written links.
    by_id = {p.key: p for p in people}
    labels = {row["prediction"]: row["status"] for row in links if row["horizon"] == "2y"}
    stored = SqliteResultStore(tmp_path / "data" / "results.sqlite").list(limit=10_000)
    y, p = [], []
    for s in stored:
        if labels[s.identifier] in ("event", "no_event"):
            y.append(labels[s.identifier] == "event")
            p.append(by_id[s.patient_id].risk_2y)
    auroc = evaluation["horizons"]["2y"]["discrimination"]["auroc"]["value"]
    assert auroc == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert "AUROC" in printed and "report.html" in printed
    # Again with the same export: the evaluation store (links.sqlite) keeps every settled
    # link and redoes only the pending ones, with the same result.
    again = evaluate_again(tmp_path)
    pending = sum(evaluation["horizons"][h]["linkage"]["pending"] for h in ("2y", "5y"))
    assert pending > 0
    assert again["relinked"] == {"relinked": pending, "kept": 2 * len(stored) - pending}
    for horizon in ("2y", "5y"):
        assert again["horizons"][horizon]["linkage"] == evaluation["horizons"][horizon]["linkage"]


def test_doubled_risks_are_reported_as_over_prediction(
    tmp_path: Path,
    cohort: tuple[list[Patient], dict[str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    evaluation, _, printed = run(tmp_path, cohort[0], 2.0, capsys)
    texts = [f["text"] for f in evaluation["findings"] if f["kind"] == "miscalibrated"]
    assert any("over-predicts" in t for t in texts), evaluation["findings"]
    oe = evaluation["horizons"]["2y"]["calibration"]["observed_expected"]
    assert oe["high"] < 0.8
    assert "over-predicts" in printed
    verdicts = {v["criterion"]: v["status"] for v in evaluation["promotion"]["criteria"]}
    assert evaluation["promotion"]["overall"] == "fail"
    assert verdicts["max_abs_calibration_in_the_large"] == "fail"
    assert verdicts["calibration_slope"] == "fail"
    assert verdicts["min_scored_patients"] == "pass"  # the volume is there; the risks are not
    html = (tmp_path / "report" / "report.html").read_text()
    assert "over-predicts" in html


def test_report_is_self_contained_with_every_figure(
    tmp_path: Path,
    cohort: tuple[list[Patient], dict[str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    evaluation, _, _ = run(tmp_path, cohort[0], 1.0, capsys)
    html = (tmp_path / "report" / "report.html").read_text()
    for title in (
        "Calibration, 2y",
        "ROC, 5y",
        "Predicted 2y risk by month",
        "Flags per day",
        "Subgroups, 2y &gt;= 0.1 (H)",
    ):
        assert title in html, title
    # Drift; per horizon 4 figures; 3 bands' forest plots.
    assert html.count("<svg") == 1 + 2 * 4 + 3
    assert "<script" not in html and 'src="http' not in html and 'href="http' not in html
    assert (tmp_path / "report" / "evaluation.json").stat().st_mode & 0o077 == 0
    band = evaluation["horizons"]["2y"]["thresholds"][0]
    assert band["flags_per_day"] > 0 and band["ppv"]["value"] is not None
    groups = evaluation["horizons"]["2y"]["subgroups"]["2y >= 0.4 (HH)"]["sex"]
    assert {g["group"] for g in groups} == {"female", "male"}


def test_coverage_counts_unscored_patients_by_reason(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    people = make_cohort(40, seed=3)
    store_predictions(data, people)
    states = SqliteStateStore(data / "state.sqlite")
    anchor = {"anchor": "2018-01-01T00:00:00+00:00"}
    states.put_many(
        [
            *(PatientState(p.key) for p in people),
            PatientState("OUT1", last_outcome={**anchor, "out_of_domain": ["egfr >= 60"]}),
            PatientState("OUT2", last_outcome={**anchor, "out_of_domain": ["egfr >= 60"]}),
            PatientState("MISS", last_outcome={**anchor, "not_enough_data": {"uacr": "none"}}),
        ]
    )
    states.close()
    out = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--site",
                str(site_file(tmp_path, COVERAGE_CRITERIA)),
                "--model",
                "kfre-4var",
                "--out",
                str(out),
                "--as-of",
                AS_OF.isoformat(),
            ]
        )
        == 0
    )
    cov = orjson.loads((out / "evaluation.json").read_bytes())["coverage"]
    assert cov["patients_seen"] == 43 and cov["patients_scored"] == 40
    assert cov["not_scored_by_reason"] == {
        "outside the model's domain: egfr >= 60": 2,
        "missing input: uacr": 1,
    }
    # No outcome export: everything pending or censored, the label-free view still there.
    evaluation = orjson.loads((out / "evaluation.json").read_bytes())
    assert evaluation["horizons"]["2y"]["labelled"] == 0
    assert evaluation["horizons"]["2y"]["label_free"]["score_distribution_by_month"]
    verdicts = {v["criterion"]: v for v in evaluation["promotion"]["criteria"]}
    assert verdicts["max_missing_input_rate"]["status"] == "fail"  # 1 of 43: 2.3 % > 1 %
    assert "1/43" in verdicts["max_missing_input_rate"]["evidence"]
    assert verdicts["min_auroc_lower_ci"]["status"] == "inconclusive"  # no outcomes yet
    assert verdicts["min_scored_patients"]["status"] == "pass"


def test_wrong_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "evaluate",
            "--site",
            str(site_file(tmp_path)),
            "--model",
            "other",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "this site runs kfre-4var, not 'other'" in capsys.readouterr().err


def test_psi_by_month_finds_a_shifted_input_and_spares_a_stable_one() -> None:
    from ehrbridge.evaluate import psi_by_month

    def month(name: str, egfrs: list[float]) -> list[dict]:
        return [
            {
                "features": {
                    "anchor": f"{name}-15T00:00:00+00:00",
                    "age": 50 + i % 30,
                    "male": i % 2 == 0,
                    "egfr": e,
                    "uacr_mg_g": 300.0,
                },
                "risk_5y": 0.2,
            }
            for i, e in enumerate(egfrs)
        ]

    spread = [float(e) for e in range(16, 60)] * 3  # 132 values over G3a-G4
    stored = [
        *month("2025-01", spread),
        *month("2025-02", spread[::-1]),
        *month("2025-03", [12.0] * 132),  # an assay or unit change: all G5
        *month("2025-04", spread[:10]),
    ]  # too few to judge
    drift = psi_by_month(stored, "risk_5y")
    egfr = drift["psi"]["egfr"]
    assert drift["reference_month"] == "2025-01"
    assert egfr["2025-01"] == pytest.approx(0) and egfr["2025-02"] == pytest.approx(0)
    assert egfr["2025-03"] > drift["alarm"]
    assert egfr["2025-04"] is None
    assert drift["psi"]["uacr"]["2025-03"] == pytest.approx(0)


def test_a_bad_outcome_file_is_refused_naming_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = tmp_path / "outcome.yaml"
    outcome.write_text(
        "model: kfre-4var\noutcome: kidney_failure\n"
        "horizons: {2y: {days: 730, risk: risk_2y}}\ncodes: []\nhorizon_days: 730\n"
    )
    site = site_file(tmp_path)
    site.write_text(site.read_text() + "\nevaluation:\n  outcome: outcome.yaml\n")
    (tmp_path / "data").mkdir(mode=0o700)
    store_predictions(tmp_path / "data", make_cohort(5, seed=1))
    code = main(
        ["evaluate", "--site", str(site), "--model", "kfre-4var", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "outcome.yaml" in err and ":5" in err and "horizon_days" in err, err
    codes = tmp_path / "codes.csv"
    codes.write_text("code_system,value\nx,y\n")
    site.write_text(site.read_text().replace("outcome: outcome.yaml", "code_map: codes.csv"))
    assert (
        main(
            ["evaluate", "--site", str(site), "--model", "kfre-4var", "--out", str(tmp_path / "r")]
        )
        == 2
    )
    assert "codes.csv" in capsys.readouterr().err
