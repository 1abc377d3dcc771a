"""Session fixture: a classifier trained here, served by real MLflow and MLServer.

The model is trained in this process on synthetic data (bench/model_servers.py
makes both), saved as an MLflow model by the MLflow venv, and served by
``scripts/mlflow start`` (``mlflow models serve``) and ``scripts/mlserver
start`` (MLServer's scikit-learn runtime, OIP v2), each with a data directory
of this session, so parallel sessions never share a server. Both are stopped
at the end of the session.

The servers live in their own virtualenvs (``scripts/mlflow install``,
``scripts/mlserver install``; ``scripts/test`` runs both). Without them the
``modelservers`` tests skip, except under ``CI=true`` where the fixture
installs them and any failure fails the session: CI never goes green without
the real servers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka_fixture import running_in_ci

from ehrbridge.bench.model_servers import (
    MLFLOW_SCRIPT,
    MLSERVER_SCRIPT,
    ModelServerError,
    TrainedModel,
    run_script,
    server_stats,
    train_and_save,
)

SCRIPTS = {"mlflow": MLFLOW_SCRIPT, "mlserver": MLSERVER_SCRIPT}


@dataclass(frozen=True)
class RealModelServers:
    model: TrainedModel
    urls: dict[str, str]  # "mlflow" / "mlserver" -> base URL
    stats: dict[str, dict[str, int]]  # startup_ms, rss_kib right after start


def _unavailable(message: str) -> Any:
    if running_in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _ensure_installed() -> None:
    for name, script in SCRIPTS.items():
        if running_in_ci():
            run_script(script, ["install"], timeout_s=1800)
        else:
            try:
                run_script(script, ["installed"], timeout_s=30)
            except ModelServerError:
                _unavailable(f"{name} is not installed: run scripts/{name} install")


@pytest.fixture(scope="session")
def real_model_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealModelServers]:
    """Both real servers, serving the same freshly trained classifier."""
    workdir = tmp_path_factory.mktemp("modelservers")
    started: list[str] = []
    try:
        _ensure_installed()
        model = train_and_save(workdir)
        targets = {"mlflow": model.mlflow_dir, "mlserver": model.mlserver_repo}
        urls, stats = {}, {}
        for name, script in SCRIPTS.items():
            data_dir = workdir / f"{name}-data"
            urls[name] = run_script(
                script, ["start", str(targets[name])], timeout_s=600, data_dir=data_dir
            )
            started.append(name)
            stats[name] = server_stats(script, data_dir)
    except ModelServerError as exc:
        _stop(started, workdir)
        _unavailable(f"real model servers unavailable: {exc}")
    try:
        yield RealModelServers(model, urls, stats)
    finally:
        _stop(started, workdir)


def _stop(names: list[str], workdir: Path) -> None:
    for name in names:
        try:
            run_script(SCRIPTS[name], ["stop"], timeout_s=120, data_dir=workdir / f"{name}-data")
        except ModelServerError as exc:
            warnings.warn(f"scripts/{name} stop failed: {exc}", stacklevel=2)


# The columns of a feature record a model file can send (mappings/model_file.py).
RECORD_COLUMNS = ("age", "male", "egfr", "uacr")


def record_cohort(rows: int, seed: int) -> tuple[Any, Any]:
    """Synthetic feature records (age, male, eGFR, UACR mg/g) and a kidney-failure outcome."""
    import numpy as np

    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 95, rows)
    male = (rng.random(rows) < 0.55).astype(float)
    egfr = rng.uniform(8, 59, rows)
    uacr = np.exp(rng.normal(4.5, 1.6, rows))
    logit = -0.03 * (age - 60) + 0.3 * male - 0.09 * (egfr - 30) + 0.6 * (np.log(uacr) - 4.5)
    outcome = rng.random(rows) < 1 / (1 + np.exp(-logit))
    return np.column_stack([age, male, egfr, uacr]), outcome.astype(int)


@dataclass(frozen=True)
class RecordModel:
    model: TrainedModel
    urls: dict[str, str]  # "mlflow" / "mlserver" -> base URL of a classifier on record columns


@pytest.fixture(scope="session")
def record_model_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordModel]:
    """A classifier on feature-record columns, served by real MLflow and real MLServer."""
    workdir = tmp_path_factory.mktemp("record-model")
    urls: dict[str, str] = {}
    try:
        _ensure_installed()
        model = train_and_save(workdir, columns=RECORD_COLUMNS, cohort=record_cohort)
        targets = {"mlflow": model.mlflow_dir, "mlserver": model.mlserver_repo}
        for name, script in SCRIPTS.items():
            data_dir = workdir / f"{name}-data"
            urls[name] = run_script(
                script, ["start", str(targets[name])], timeout_s=600, data_dir=data_dir
            )
    except ModelServerError as exc:
        _stop(list(SCRIPTS), workdir)  # a start that failed half way too
        _unavailable(f"real model servers unavailable: {exc}")
    try:
        yield RecordModel(model, urls)
    finally:
        _stop(list(SCRIPTS), workdir)
