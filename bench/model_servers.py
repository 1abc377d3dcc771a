"""Real third-party model servers: a trained classifier, served two ways, measured.

``python -m ehrbridge.bench.model_servers [--runs 3]`` trains a scikit-learn
classifier on synthetic data made here, saves it as an MLflow model, serves
it with the real ``mlflow models serve`` (``scripts/mlflow``) and the real
MLServer (``scripts/mlserver``, OIP v2), and reports for each server its
start-up time (process start to ready), the resident memory of its process
group, the per-request latency of one-row calls through ehrbridge's adapters,
and the largest difference from ``predict_proba`` computed in this process.

The helpers are shared with tests/model_servers_fixture.py. scikit-learn is a
development dependency: this module imports it only inside functions, so the
product never needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ehrbridge.adapters.model_http import HttpModelClient

REPO_ROOT = Path(__file__).resolve().parent.parent
MLFLOW_SCRIPT = REPO_ROOT / "scripts" / "mlflow"
MLSERVER_SCRIPT = REPO_ROOT / "scripts" / "mlserver"
FEATURES = ("age", "egfr", "ln_uacr", "albumin", "bicarbonate")
MODEL_NAME = "ckd-progression-clf"
MODEL_VERSION = "1"

# Run in the MLflow venv: saves the pickled estimator as an MLflow model whose
# pyfunc predict is predict_proba (MLflow 3's pyfunc_predict_fn), in plain
# pickle format so MLServer's scikit-learn runtime can load the same file.
_SAVE_MLFLOW_MODEL = """
import pickle, sys
import pandas as pd
import mlflow.sklearn
from mlflow.models import infer_signature
estimator_file, out_dir, columns = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
with open(estimator_file, "rb") as handle:
    estimator, sample = pickle.load(handle)
frame = pd.DataFrame(sample, columns=columns)
signature = infer_signature(frame, estimator.predict_proba(sample))
mlflow.sklearn.save_model(estimator, out_dir, serialization_format="pickle",
                          signature=signature, pyfunc_predict_fn="predict_proba")
"""


class ModelServerError(RuntimeError):
    """A model-server script failed; the message carries its stderr tail."""


@dataclass(frozen=True)
class TrainedModel:
    estimator: Any  # sklearn classifier
    features: Any  # numpy array, held-out rows to score
    mlflow_dir: Path
    mlserver_repo: Path


def synthetic_cohort(rows: int, seed: int) -> tuple[Any, Any]:
    """Features and a binary outcome whose log-odds depend on them non-linearly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 95, rows)
    egfr = rng.uniform(8, 59, rows)
    ln_uacr = rng.normal(4.5, 1.6, rows)
    albumin = rng.normal(3.9, 0.45, rows)
    bicarbonate = rng.normal(24, 3.5, rows)
    logit = -0.03 * (age - 60) - 0.09 * (egfr - 30) + 0.6 * (ln_uacr - 4.5) - 0.8 * (albumin - 3.9)
    logit += 0.02 * (egfr < 15) * (ln_uacr**2)
    outcome = rng.random(rows) < 1 / (1 + np.exp(-logit))
    return np.column_stack([age, egfr, ln_uacr, albumin, bicarbonate]), outcome.astype(int)


def train_and_save(
    workdir: Path,
    seed: int = 20261207,
    *,
    columns: tuple[str, ...] = FEATURES,
    cohort: Callable[[int, int], tuple[Any, Any]] = synthetic_cohort,
) -> TrainedModel:
    """Train a classifier here and lay it out for both servers under ``workdir``.

    ``cohort(rows, seed)`` makes the synthetic features (in ``columns`` order) and outcome.
    """
    from sklearn.ensemble import RandomForestClassifier

    features, outcome = cohort(2000, seed)
    estimator = RandomForestClassifier(n_estimators=40, max_depth=6, random_state=seed)
    estimator.fit(features[:1500], outcome[:1500])
    held_out = features[1500:]
    estimator_file = workdir / "estimator.pkl"
    estimator_file.write_bytes(pickle.dumps((estimator, held_out[:20])))
    mlflow_dir = workdir / "mlflow-model"
    run_script(
        MLFLOW_SCRIPT,
        [
            "python",
            "-c",
            _SAVE_MLFLOW_MODEL,
            str(estimator_file),
            str(mlflow_dir),
            ",".join(columns),
        ],
        timeout_s=600,
    )
    return TrainedModel(estimator, held_out, mlflow_dir, _mlserver_repository(workdir, mlflow_dir))


def _mlserver_repository(workdir: Path, mlflow_dir: Path) -> Path:
    # MLServer's scikit-learn runtime loads the very pickle MLflow saved.
    repo = workdir / "mlserver-models"
    model_dir = repo / MODEL_NAME
    model_dir.mkdir(parents=True)
    settings = {
        "name": MODEL_NAME,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(mlflow_dir / "model.pkl"), "version": MODEL_VERSION},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(settings, indent=2))
    return repo


def run_script(
    script: Path, args: list[str], *, timeout_s: float, data_dir: Path | None = None
) -> str:
    """Run a scripts/ model-server command; its last stdout line, or ModelServerError."""
    env = dict(os.environ)
    if data_dir is not None:
        env[f"EHRBRIDGE_{script.name.upper()}_DATA"] = str(data_dir)
    try:
        done = subprocess.run(
            [str(script), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelServerError(f"{script.name} {args[0]}: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-30:])
        raise ModelServerError(f"{script.name} {args[0]} exited {done.returncode}:\n{tail}")
    lines = done.stdout.strip().splitlines()
    return lines[-1].strip() if lines else ""


def server_stats(script: Path, data_dir: Path) -> dict[str, int]:
    """pid, startup_ms and rss_kib of a running server (``scripts/X stats``)."""
    env = {**os.environ, f"EHRBRIDGE_{script.name.upper()}_DATA": str(data_dir)}
    out = subprocess.run(
        [str(script), "stats"], capture_output=True, text=True, check=True, env=env, timeout=30
    ).stdout
    pairs = (line.split() for line in out.splitlines() if line.strip())
    return {key: int(value) for key, value in pairs}


# ------------------------------------------------------------------- the bench


def adapter_for(server: str, url: str) -> HttpModelClient:
    """The ehrbridge adapter that speaks ``server``'s protocol ("mlflow" or "mlserver")."""
    from ehrbridge.adapters.mlflow_scoring import MlflowScoringClient
    from ehrbridge.adapters.model_http import ModelEndpointSettings
    from ehrbridge.adapters.oip_v2 import OipV2Client

    settings = ModelEndpointSettings(url=url, model=MODEL_NAME, timeout_s=30, max_batch_rows=500)
    if server == "mlflow":
        return MlflowScoringClient(settings)
    return OipV2Client(settings, layout="matrix", outputs=("predict_proba",))


def probabilities(client: HttpModelClient, rows: Any) -> list[float]:
    """P(class 1) for each row through an ehrbridge adapter."""
    from ehrbridge.adapters.mlflow_scoring import MlflowScoringClient
    from ehrbridge.adapters.model_http import FeatureBatch

    # MLflow answers "predictions" (the pyfunc's predict_proba); MLServer the
    # tensor asked for.
    output = "predictions" if isinstance(client, MlflowScoringClient) else "predict_proba"
    return client.predict(FeatureBatch(FEATURES, rows.tolist())).column(output, 1)


def _measure(name: str, client: Any, model: TrainedModel, calls: int) -> dict[str, float]:
    expected = model.estimator.predict_proba(model.features)[:, 1]
    got = probabilities(client, model.features)
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    latencies = []
    for index in range(calls):
        row = model.features[index % len(model.features) : index % len(model.features) + 1]
        started = time.perf_counter()
        probabilities(client, row)
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return {
        "max_abs_diff": worst,
        "rows_checked": len(got),
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))],
    }


def run(runs: int, calls: int) -> dict[str, Any]:
    """Cold-start each server ``runs`` times; measure the last start in full."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ehrbridge-modelservers-") as tmp:
        workdir = Path(tmp)
        model = train_and_save(workdir)
        targets = {"mlflow": model.mlflow_dir, "mlserver": model.mlserver_repo}
        scripts = {"mlflow": MLFLOW_SCRIPT, "mlserver": MLSERVER_SCRIPT}
        for name, script in scripts.items():
            data_dir = workdir / f"{name}-data"
            starts = []
            for _ in range(runs):
                url = run_script(
                    script, ["start", str(targets[name])], timeout_s=600, data_dir=data_dir
                )
                stats = server_stats(script, data_dir)
                starts.append(stats["startup_ms"])
                last_run = runs == len(starts)
                if last_run:
                    client = adapter_for(name, url)
                    results[name] = _measure(name, client, model, calls)
                    results[name]["rss_mib_idle"] = stats["rss_kib"] / 1024
                    results[name]["rss_mib_after"] = (
                        server_stats(script, data_dir)["rss_kib"] / 1024
                    )
                    client.close()
                run_script(script, ["stop"], timeout_s=120, data_dir=data_dir)
            results[name]["startup_ms"] = starts
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts per server")
    parser.add_argument("--calls", type=int, default=200, help="one-row calls timed per server")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.runs, args.calls), indent=2))


if __name__ == "__main__":
    main()
