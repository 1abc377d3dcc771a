"""ehrbridge's adapters against the real MLflow scoring server and real MLServer.

A scikit-learn classifier is trained in this process on synthetic data
(tests/model_servers_fixture.py), served by ``mlflow models serve`` and by
MLServer (OIP v2), and the probabilities that come back through
:mod:`ehrbridge.adapters.mlflow_scoring` and :mod:`ehrbridge.adapters.oip_v2`
must equal ``predict_proba`` computed here on the same features, to 1e-9.

The OIP v2 conformance cases (tests/oip_conformance.py) run against MLServer
and against the sandbox's own model server: the same cases, both must pass.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from model_servers_fixture import RealModelServers
from oip_conformance import CASES, KNOWN_DEVIATIONS, OipTarget

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.mlflow_scoring import MlflowScoringClient
from ehrbridge.adapters.model_http import FeatureBatch, ModelEndpointSettings
from ehrbridge.adapters.oip_v2 import OipV2Client
from ehrbridge.bench.model_servers import (
    FEATURES,
    MODEL_NAME,
    REPO_ROOT,
    adapter_for,
    probabilities,
)
from ehrbridge.core.errors import RemoteRejected, UpstreamUnavailable
from ehrbridge.sandbox.model_server import create_model_app

AGREEMENT = 1e-9
real = pytest.mark.modelservers


@real
@pytest.mark.parametrize("server", ["mlflow", "mlserver"])
def test_probabilities_equal_predict_proba_in_this_process(
    real_model_servers: RealModelServers, server: str
) -> None:
    model = real_model_servers.model
    expected = model.estimator.predict_proba(model.features)[:, 1]
    with adapter_for(server, real_model_servers.urls[server]) as client:
        got = probabilities(client, model.features)
    assert len(got) == len(expected) == 500
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= AGREEMENT
    # Not a constant model: the comparison means something.
    assert max(got) - min(got) > 0.3


@real
@pytest.mark.parametrize("server", ["mlflow", "mlserver"])
def test_a_batch_over_the_row_limit_is_split_and_still_agrees(
    real_model_servers: RealModelServers, server: str
) -> None:
    model = real_model_servers.model
    rows = model.features[:23]
    settings = ModelEndpointSettings(
        url=real_model_servers.urls[server], model=MODEL_NAME, max_batch_rows=7, timeout_s=30
    )
    client: MlflowScoringClient | OipV2Client
    if server == "mlflow":
        client = MlflowScoringClient(settings)
    else:
        client = OipV2Client(settings, layout="matrix", outputs=("predict_proba",))
    with client:
        got = probabilities(client, rows)
    expected = model.estimator.predict_proba(rows)[:, 1]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= AGREEMENT


@real
def test_mlflow_refusal_is_dead_lettered_with_its_error_code(
    real_model_servers: RealModelServers,
) -> None:
    settings = ModelEndpointSettings(url=real_model_servers.urls["mlflow"], model=MODEL_NAME)
    wrong_columns = FeatureBatch(("age", "shoe_size"), [[60.0, 43.0]])
    with MlflowScoringClient(settings) as client, pytest.raises(RemoteRejected) as caught:
        client.predict(wrong_columns)
    assert (caught.value.reason, caught.value.status) == ("model.rejected", 400)
    assert b"error_code" in caught.value.body


@real
def test_mlserver_unknown_model_is_dead_lettered(real_model_servers: RealModelServers) -> None:
    settings = ModelEndpointSettings(url=real_model_servers.urls["mlserver"], model="no-such")
    with OipV2Client(settings, layout="matrix") as client, pytest.raises(RemoteRejected) as caught:
        client.predict(FeatureBatch(FEATURES, [[60.0, 30.0, 4.0, 3.9, 24.0]]))
    assert (caught.value.reason, caught.value.status) == ("model.rejected", 404)


@real
def test_mlserver_model_is_ready_and_mlflow_pings(real_model_servers: RealModelServers) -> None:
    urls = real_model_servers.urls
    with OipV2Client(
        ModelEndpointSettings(url=urls["mlserver"], model=MODEL_NAME), layout="matrix"
    ) as oip:
        assert oip.ready()
    with MlflowScoringClient(ModelEndpointSettings(url=urls["mlflow"], model=MODEL_NAME)) as mlf:
        assert mlf.ready()


@real
def test_start_up_time_and_memory_are_reported(real_model_servers: RealModelServers) -> None:
    for name, stats in real_model_servers.stats.items():
        assert stats["startup_ms"] > 0, name
        assert stats["rss_kib"] > 20 * 1024, name  # a Python server with numpy loaded


def test_a_server_that_is_gone_is_upstream_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed when the block ends: nobody listens
    settings = ModelEndpointSettings(url=f"http://127.0.0.1:{port}", model=MODEL_NAME)
    for client in (MlflowScoringClient(settings), OipV2Client(settings)):
        with client, pytest.raises(UpstreamUnavailable, match="unreachable"):
            client.predict(FeatureBatch(FEATURES, [[60.0, 30.0, 4.0, 3.9, 24.0]]))


# ------------------------------------------------------------ OIP v2 conformance

Case = Callable[[OipTarget, httpx.Client], None]


def _with_deviations(server: str) -> list[object]:
    deviations = KNOWN_DEVIATIONS.get(server, {})
    return [
        pytest.param(
            case,
            id=case.__name__.removeprefix("case_"),
            marks=[pytest.mark.xfail(strict=True, reason=deviations[case.__name__])]
            if case.__name__ in deviations
            else [],
        )
        for case in CASES
    ]


@pytest.fixture(scope="module")
def sandbox_target() -> Iterator[OipTarget]:
    rows = 3
    request = {
        "inputs": [
            {"name": "age", "datatype": "FP64", "shape": [rows], "data": [61.0, 45.0, 80.0]},
            {"name": "male", "datatype": "BOOL", "shape": [rows], "data": [True, False, True]},
            {"name": "egfr", "datatype": "FP64", "shape": [rows], "data": [22.5, 48.0, 12.0]},
            {"name": "uacr", "datatype": "FP64", "shape": [rows], "data": [300.0, 30.0, 1200.0]},
        ]
    }
    with ThreadedServer(create_model_app()) as server:
        yield OipTarget(server.base_url, "kfre-4var", request, rows)


@pytest.fixture(scope="module")
def sandbox_kfre8_target() -> Iterator[OipTarget]:
    # The second model the sandbox serves: eight inputs, the analytes in their equation units.
    columns = {
        "age": [61.0, 45.0], "egfr": [22.5, 48.0], "uacr": [300.0, 30.0],
        "albumin": [3.4, 4.2], "phosphate": [4.9, 3.6], "bicarbonate": [19.0, 26.0],
        "calcium": [8.9, 9.6],
    }  # fmt: skip
    inputs = [{"name": n, "datatype": "FP64", "shape": [2], "data": d} for n, d in columns.items()]
    inputs.append({"name": "male", "datatype": "BOOL", "shape": [2], "data": [True, False]})
    with ThreadedServer(create_model_app()) as server:
        yield OipTarget(server.base_url, "kfre-8var", {"inputs": inputs}, 2)


def _mlserver_target(servers: RealModelServers) -> OipTarget:
    rows = servers.model.features[:4]
    request = {
        "inputs": [
            {
                "name": "input-0",
                "datatype": "FP64",
                "shape": [len(rows), len(FEATURES)],
                "data": rows.flatten().tolist(),
            }
        ],
        "outputs": [{"name": "predict_proba"}],
    }
    return OipTarget(servers.urls["mlserver"], MODEL_NAME, request, len(rows))


@pytest.mark.parametrize("case", _with_deviations("sandbox"))
def test_sandbox_model_server_conforms(sandbox_target: OipTarget, case: Case) -> None:
    with httpx.Client(timeout=10) as http:
        case(sandbox_target, http)


@pytest.mark.parametrize("case", _with_deviations("sandbox"))
def test_sandbox_kfre8_conforms(sandbox_kfre8_target: OipTarget, case: Case) -> None:
    with httpx.Client(timeout=10) as http:
        case(sandbox_kfre8_target, http)


@real
@pytest.mark.parametrize("case", _with_deviations("mlserver"))
def test_mlserver_conforms(real_model_servers: RealModelServers, case: Case) -> None:
    with httpx.Client(timeout=30) as http:
        case(_mlserver_target(real_model_servers), http)


# ------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", ["mlflow", "mlserver"])
def test_scripts_report_a_stopped_server_and_stop_idempotently(script: str, tmp_path: Path) -> None:
    env = {**os.environ, f"EHRBRIDGE_{script.upper()}_DATA": str(tmp_path / "data")}
    path = str(REPO_ROOT / "scripts" / script)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [path, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    status = run("status")
    assert (status.returncode, status.stdout) == (3, "")
    assert "not running" in status.stderr
    assert run("stop").returncode == 0
    assert run("stop").returncode == 0
    missing = run("start", str(tmp_path / "no-such-model"))
    assert missing.returncode != 0 and missing.stdout == ""
    assert run("bogus").returncode == 2
