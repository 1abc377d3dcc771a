"""Two models on one site (``models: [kfre-4var, kfre-8var]``), each evaluated on its own.

One cohort, one outcome export, one result store holding both models' predictions:
KFRE-4's risks are the ones the outcomes were drawn from (calibrated), KFRE-8's are
the same risks doubled (over-predicting). Each model gets its own evaluation, links,
report and gate, so KFRE-8 fails its criteria on its own numbers (not "inconclusive"
for want of an evaluation) while KFRE-4 passes the same criteria, and the API serves
each. The linkage counts are the cohort's, known from how it was made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_evaluate_cli import (
    AS_OF,
    MODEL,
    REPO,
    Patient,
    add_special_cases,
    evaluate_again,
    make_cohort,
    run,
    site_file,
    store_predictions,
    write_export,
)

from ehrbridge.cli import main
from ehrbridge.config import Mode, load_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.evaluation_api import add_evaluation_routes
from ehrbridge.pipelines.records import ModelInfo
from ehrbridge.promotion import effective_mode, mode_path

KFRE8 = ModelInfo("kfre-8var", "2016", "north_american")
NAMES = ("kfre-4var", "kfre-8var")
CRITERIA = {
    "min_days": 30,
    "min_scored_patients": 1000,
    "min_auroc_lower_ci": 0.6,
    "calibration_slope": [0.7, 1.3],
    "max_abs_calibration_in_the_large": 0.2,
}


@pytest.fixture(scope="module")
def cohort() -> tuple[list[Patient], dict[str, int]]:
    people = make_cohort(1500, seed=5)
    return people, add_special_cases(people)


def two_model_site(tmp: Path, evaluation: dict[str, Any]) -> Path:
    """The sandbox site in shadow running KFRE-4 and the shipped KFRE-8 side by side."""
    data = yaml.safe_load(site_file(tmp).read_text())
    first = data.pop("model")
    second = {
        "file": str(REPO / "models" / "kfre-8.yaml"),
        "url": first["url"],
        "calibration": "north_american",
    }
    data |= {"mode": "shadow", "models": [first, second], "evaluation": evaluation}
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stored_cohort(tmp: Path, people: list[Patient]) -> None:
    (tmp / "data").mkdir(mode=0o700)
    store_predictions(tmp / "data", people, 1.0)  # KFRE-4: calibrated
    store_predictions(tmp / "data", people, 2.0, model=KFRE8)  # KFRE-8: risks x2
    write_export(tmp / "export", people)


def evaluate(site: Path, tmp: Path, *model: str) -> int:
    args = ["--out", str(tmp / "report"), "--events", str(tmp / "export")]
    return main(["evaluate", "--site", str(site), *args, "--as-of", AS_OF.isoformat(), *model])


def test_each_model_is_evaluated_apart_and_gated_on_its_own_numbers(
    tmp_path: Path,
    cohort: tuple[list[Patient], dict[str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    people, expected = cohort
    stored_cohort(tmp_path, people)
    site = two_model_site(tmp_path, {"promotion": CRITERIA})
    assert evaluate(site, tmp_path) == 0  # no --model: every model, each in report/<model>/
    printed = capsys.readouterr().out
    assert "model kfre-4var:" in printed and "model kfre-8var:" in printed
    found = {
        name: orjson.loads((tmp_path / "report" / name / "evaluation.json").read_bytes())
        for name in NAMES
    }
    for name, evaluation in found.items():
        assert evaluation["model"] == name and evaluation["predictions"] == len(people)
        for horizon in ("2y", "5y"):  # linked apart, to the same outcomes
            linkage = evaluation["horizons"][horizon]["linkage"]
            assert linkage["censored"] == expected["censored"], (name, horizon)
            assert linkage["prevalent"] == expected["prevalent"], (name, horizon)
        assert evaluation["horizons"]["2y"]["linkage"]["pending"] == expected["pending"]
        # Each model's own linkage store and the copy the gate and the console read.
        assert (tmp_path / "data" / "evaluation" / f"links.{name}.sqlite").is_file()
        kept = tmp_path / "data" / "evaluation" / f"{name}.site.json"
        assert orjson.loads(kept.read_bytes()) == evaluation
    calibrated, doubled = found["kfre-4var"], found["kfre-8var"]
    assert calibrated["promotion"]["overall"] == "pass", calibrated["promotion"]
    assert doubled["promotion"]["overall"] == "fail", doubled["promotion"]
    verdicts = {v["criterion"]: v["status"] for v in doubled["promotion"]["criteria"]}
    assert verdicts["calibration_slope"] == "fail"
    assert verdicts["max_abs_calibration_in_the_large"] == "fail"
    assert verdicts["min_scored_patients"] == "pass"  # its own 1,500 predictions
    assert doubled["horizons"]["2y"]["calibration"]["observed_expected"]["high"] < 0.8
    over = [[f for f in e["findings"] if "over-predicts" in f["text"]] for e in found.values()]
    assert not over[0] and over[1], over
    # Doubling (capped at 0.999) keeps the order: discrimination is the same.
    aurocs = [e["horizons"]["2y"]["discrimination"]["auroc"]["value"] for e in found.values()]
    assert aurocs[0] == pytest.approx(aurocs[1], abs=1e-3)

    promote = ["promote", "--site", str(site), "--local", "--model"]
    assert main([*promote, "kfre-8var"]) == 1
    printed = capsys.readouterr().out
    assert "calibration_slope: fail" in printed and "criteria: fail" in printed
    assert "inconclusive" not in printed
    assert not mode_path(tmp_path / "data", "kfre-8var").exists()
    assert main([*promote, "kfre-4var"]) == 0
    assert "kfre-4var is now live (was shadow)" in capsys.readouterr().out
    config = load_site_config(site)
    assert effective_mode(config, "kfre-4var") is Mode.LIVE
    assert effective_mode(config, "kfre-8var") is Mode.SHADOW
    assert_served(site, found)


def assert_served(site: Path, found: dict[str, dict[str, Any]]) -> None:
    """``/api/evaluation`` lists both models' evaluations and serves each (the product's
    routes on an app of their own: authorisation is tests/facade/test_evaluation_api.py's)."""
    app = FastAPI()
    add_evaluation_routes(app, load_site_config(site), [])
    with TestClient(app) as client:
        listed = client.get("/api/evaluation").json()
        assert listed["models"] == list(NAMES)
        rows = [(e["model"], e["source"], e["promotion"]) for e in listed["evaluations"]]
        assert rows == [("kfre-4var", "site", "pass"), ("kfre-8var", "site", "fail")]
        for name in NAMES:
            assert client.get(f"/api/evaluation/{name}").json() == found[name]
        assert client.get("/api/evaluation/kfre-8var?source=backfill").status_code == 404
        assert client.get("/api/evaluation/other").status_code == 404


def test_a_models_own_criteria_and_outcome_replace_the_sites(
    tmp_path: Path,
    cohort: tuple[list[Patient], dict[str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``evaluation.models.kfre-8var``: its own bar (volume only) and outcome file; the
    site's criteria still judge KFRE-4. ``--model`` writes that one report into --out."""
    people, _ = cohort
    stored_cohort(tmp_path, people)
    outcome = REPO / "evaluation" / "outcome-files" / "kfre-8var.yaml"
    own = {"outcome": str(outcome), "promotion": {"min_scored_patients": 1000}}
    site = two_model_site(tmp_path, {"promotion": CRITERIA, "models": {"kfre-8var": own}})
    assert evaluate(site, tmp_path, "--model", "kfre-8var") == 0
    evaluation = orjson.loads((tmp_path / "report" / "evaluation.json").read_bytes())
    assert evaluation["model"] == "kfre-8var"
    assert [v["criterion"] for v in evaluation["promotion"]["criteria"]] == ["min_scored_patients"]
    assert evaluation["promotion"]["overall"] == "pass"
    assert not (tmp_path / "data" / "evaluation" / "kfre-4var.site.json").exists()
    first = load_site_config(site).for_model("kfre-4var")
    assert first is not None and first.evaluation.promotion is not None
    assert first.evaluation.promotion.min_auroc_lower_ci == 0.6
    assert "promotion: pass" in capsys.readouterr().out


def test_a_second_model_given_the_first_models_outcome_is_refused_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir(mode=0o700)
    store_predictions(tmp_path / "data", make_cohort(5, seed=1), model=KFRE8)
    kfre4_outcome = REPO / "evaluation" / "outcome-files" / f"{MODEL.name}.yaml"
    site = two_model_site(tmp_path, {"outcome": str(kfre4_outcome)})
    assert main(["evaluate", "--site", str(site), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not 'kfre-8var'" in err and "evaluation.models.kfre-8var.outcome" in err, err
    assert "nothing was evaluated" in err
    assert not (tmp_path / "r").exists()  # nothing written for either model


def test_settings_for_a_model_the_site_does_not_run_are_refused(tmp_path: Path) -> None:
    site = two_model_site(tmp_path, {"models": {"kfre-9var": {"promotion": {}}}})
    with pytest.raises(ConfigError, match="kfre-9var not among the site's models"):
        load_site_config(site)


def test_a_store_kept_before_stores_were_per_model_is_the_first_models(
    tmp_path: Path,
    cohort: tuple[list[Patient], dict[str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``links.sqlite`` (one store per site, as kept before) becomes KFRE-4's, links kept."""
    run(tmp_path, cohort[0], 1.0, capsys)
    where = tmp_path / "data" / "evaluation"
    os.replace(where / "links.kfre-4var.sqlite", where / "links.sqlite")
    again = evaluate_again(tmp_path)
    assert again["relinked"]["kept"] > 0  # adopted, not rebuilt
    assert not (where / "links.sqlite").exists()
