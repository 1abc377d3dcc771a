"""The model-protocol adapters against httpx.MockTransport.

One conformance table runs against every adapter (OIP v2, MLflow scoring,
KServe v1, UbiOps): timeouts, unreachable servers, 5xx/429, 4xx with the body
kept, 401 with a rotated token, oversize or malformed answers, batching
limits. Then each protocol's own request and answer shapes. The real
MLServer and MLflow servers are in tests/adapters/test_real_model_servers.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ehrbridge.adapters.kserve_v1 import KserveV1Client
from ehrbridge.adapters.mlflow_scoring import MlflowScoringClient
from ehrbridge.adapters.model_http import (
    FeatureBatch,
    HttpModelClient,
    ModelAuth,
    ModelEndpointSettings,
)
from ehrbridge.adapters.oip_v2 import OipV2Client
from ehrbridge.adapters.ubiops import UbiOpsClient
from ehrbridge.core.errors import ConfigError, RemoteRejected, UpstreamUnavailable

Handler = Callable[[httpx.Request], httpx.Response]
BATCH = FeatureBatch(("age", "egfr"), [[61.0, 22.5], [45.0, 48.0], [80.0, 12.0]])


def _good_answer(protocol: str, rows: int) -> Any:
    """A well-formed answer of each protocol for ``rows`` rows (risk = 0.1 * row)."""
    values = [round(0.1 * (i + 1), 3) for i in range(rows)]
    if protocol == "oip":
        return {
            "model_name": "m",
            "model_version": "3",
            "outputs": [{"name": "risk", "datatype": "FP64", "shape": [rows], "data": values}],
        }
    if protocol == "ubiops":
        result: Any = [{"risk": v} for v in values] if rows > 1 else {"risk": values[0]}
        return {
            "id": "r1",
            "deployment": "m",
            "version": "v1",
            "status": "completed",
            "result": result,
            "error_message": None,
        }
    return {"predictions": values}


def _client(protocol: str, handler: Handler, **settings: Any) -> HttpModelClient:
    config = ModelEndpointSettings(url="http://model.test", model="m", **settings)
    http = httpx.Client(transport=httpx.MockTransport(handler), timeout=config.timeout_s)
    if protocol == "oip":
        return OipV2Client(config, client=http)
    if protocol == "mlflow":
        return MlflowScoringClient(config, client=http)
    if protocol == "kserve":
        return KserveV1Client(config, client=http)
    return UbiOpsClient(config, project="p", client=http)


def _rows_sent(protocol: str, request: httpx.Request) -> int:
    body = orjson.loads(request.content)
    if protocol == "oip":
        return int(body["inputs"][0]["shape"][0])
    if protocol == "mlflow":
        return len(body["dataframe_split"]["data"])
    if protocol == "kserve":
        return len(body["instances"])
    return len(body) if isinstance(body, list) else 1


def _answering(protocol: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_good_answer(protocol, _rows_sent(protocol, request)))

    return handler


PROTOCOLS = ["oip", "mlflow", "kserve", "ubiops"]


# ------------------------------------------------------------ the shared table


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_good_answer_is_read_row_by_row(protocol: str) -> None:
    with _client(protocol, _answering(protocol), max_batch_rows=10) as client:
        answer = client.predict(BATCH)
    name = "predictions" if protocol in ("mlflow", "kserve") else "risk"
    assert answer.column(name) == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_batches_are_split_at_the_limit_and_joined_in_order(protocol: str) -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        rows = _rows_sent(protocol, request)
        sizes.append(rows)
        answer = _good_answer(protocol, rows)
        return httpx.Response(200, json=answer)

    batch = FeatureBatch(("a", "b"), [[float(i), 1.0] for i in range(5)])
    with _client(protocol, handler, max_batch_rows=2) as client:
        answer = client.predict(batch)
    assert sizes == [2, 2, 1]
    name = "predictions" if protocol in ("mlflow", "kserve") else "risk"
    # Each chunk's answer restarts at 0.1: the join keeps chunk order.
    assert answer.column(name) == [0.1, 0.2, 0.1, 0.2, 0.1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
    ids=["connect", "timeout", "protocol"],
)
def test_transport_failures_are_upstream_unavailable(protocol: str, failure: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    with _client(protocol, handler) as client, pytest.raises(UpstreamUnavailable) as caught:
        client.predict(BATCH)
    assert isinstance(caught.value.__cause__, httpx.HTTPError)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_overload_and_server_errors_are_retried(protocol: str, status: int) -> None:
    with (
        _client(protocol, lambda r: httpx.Response(status, text="busy")) as client,
        pytest.raises(UpstreamUnavailable, match=str(status)),
    ):
        client.predict(BATCH)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_refusals_are_dead_lettered_with_the_answer(protocol: str, status: int) -> None:
    body = b'{"error": "input age has the wrong shape"}'
    with (
        _client(protocol, lambda r: httpx.Response(status, content=body)) as client,
        pytest.raises(RemoteRejected) as caught,
    ):
        client.predict(BATCH)
    assert (caught.value.reason, caught.value.status, caught.value.body) == (
        "model.rejected",
        status,
        body,
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "answer",
    [b"not json", b"[]", b'{"unexpected": 1}', b"null"],
    ids=["not-json", "array", "no-outputs", "null"],
)
def test_answers_that_are_not_the_protocol_are_bad_responses(protocol: str, answer: bytes) -> None:
    with (
        _client(protocol, lambda r: httpx.Response(200, content=answer)) as client,
        pytest.raises(RemoteRejected) as caught,
    ):
        client.predict(BATCH)
    assert caught.value.reason == "model.bad_response"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_answer_with_the_wrong_row_count_is_refused(protocol: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_good_answer(protocol, _rows_sent(protocol, request) - 1))

    batch = FeatureBatch(("a",), [[1.0], [2.0], [3.0]])
    with _client(protocol, handler) as client, pytest.raises(RemoteRejected) as caught:
        client.predict(batch)
    assert caught.value.reason == "model.bad_response"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_oversize_answers_are_refused_before_they_are_read(protocol: str) -> None:
    huge = b'{"predictions": [' + b"0.5," * 100_000 + b"0.5]}"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=huge)

    with (
        _client(protocol, handler, max_response_bytes=64 * 1024) as client,
        pytest.raises(RemoteRejected, match="exceeds"),
    ):
        client.predict(BATCH)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_token_is_sent_and_reread_after_a_401(protocol: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old-token\n")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        if request.headers.get("authorization", "").endswith("old-token"):
            token_file.write_text("new-token")  # the operator rotated it meanwhile
            return httpx.Response(401, json={"error": "expired"})
        return httpx.Response(200, json=_good_answer(protocol, _rows_sent(protocol, request)))

    scheme = "Token" if protocol == "ubiops" else "Bearer"
    auth = ModelAuth(token_file=token_file, scheme=scheme)
    with _client(protocol, handler, auth=auth) as client:
        client.predict(BATCH)
    assert seen == [f"{scheme} old-token", f"{scheme} new-token"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_token_still_refused_is_unauthorized(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_TOKEN", "s3cret")
    with (
        _client(
            protocol, lambda r: httpx.Response(403), auth=ModelAuth(token_env="MODEL_TOKEN")
        ) as client,
        pytest.raises(RemoteRejected) as caught,
    ):
        client.predict(BATCH)
    assert caught.value.reason == "model.unauthorized"
    assert "s3cret" not in str(caught.value)


def test_a_missing_token_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_MODEL_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_MODEL_TOKEN"):
        _client("oip", _answering("oip"), auth=ModelAuth(token_env="NO_SUCH_MODEL_TOKEN"))


def test_auth_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ModelAuth()
    with pytest.raises(ValueError, match="exactly one"):
        ModelAuth(token_env="A", token_file=Path("b"))


def test_settings_refuse_unknown_keys_and_silly_limits() -> None:
    with pytest.raises(ValueError, match="extra"):
        ModelEndpointSettings(url="http://x", model="m", batch=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        ModelEndpointSettings(url="http://x", model="m", max_batch_rows=0)
    with pytest.raises(ValueError):
        ModelEndpointSettings(url="http://x", model="m", timeout_s=0)


def test_a_real_timeout_on_a_silent_socket_is_upstream_unavailable() -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection, never answers
        port = listener.getsockname()[1]
        config = ModelEndpointSettings(url=f"http://127.0.0.1:{port}", model="m", timeout_s=0.3)
        with OipV2Client(config) as client, pytest.raises(UpstreamUnavailable, match="timed out"):
            client.predict(BATCH)


def test_an_empty_batch_is_a_caller_error() -> None:
    with _client("oip", _answering("oip")) as client, pytest.raises(ValueError, match="empty"):
        client.predict(FeatureBatch(("a",), []))


def test_ragged_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="row 1"):
        FeatureBatch(("a", "b"), [[1.0, 2.0], [1.0]])


# ------------------------------------------------------------------ per protocol


def _capture(protocol: str, answer: Any) -> tuple[list[httpx.Request], Handler]:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=answer)

    return requests, handler


def test_oip_columns_layout_sends_one_tensor_per_feature() -> None:
    requests, handler = _capture("oip", _good_answer("oip", 3))
    batch = FeatureBatch(BATCH.columns, BATCH.rows, {"calibration": "north_american"})
    config = ModelEndpointSettings(url="http://m.test/", model="kfre", version="2")
    http = httpx.Client(transport=httpx.MockTransport(handler))
    with OipV2Client(config, client=http) as client:
        answer = client.predict(batch)
    [request] = requests
    assert request.url.path == "/v2/models/kfre/versions/2/infer"
    assert orjson.loads(request.content) == {
        "inputs": [
            {"name": "age", "datatype": "FP64", "shape": [3], "data": [61.0, 45.0, 80.0]},
            {"name": "egfr", "datatype": "FP64", "shape": [3], "data": [22.5, 48.0, 12.0]},
        ],
        "parameters": {"calibration": "north_american"},
    }
    assert (answer.model_name, answer.model_version) == ("m", "3")


def test_oip_matrix_layout_and_a_two_column_output() -> None:
    proba = {
        "model_name": "clf",
        "outputs": [
            {
                "name": "predict_proba",
                "datatype": "FP64",
                "shape": [3, 2],
                "data": [0.9, 0.1, 0.4, 0.6, 0.25, 0.75],
            },
        ],
    }
    requests, handler = _capture("oip", proba)
    config = ModelEndpointSettings(url="http://m.test", model="clf")
    http = httpx.Client(transport=httpx.MockTransport(handler))
    with OipV2Client(config, layout="matrix", outputs=("predict_proba",), client=http) as client:
        answer = client.predict(BATCH)
    body = orjson.loads(requests[0].content)
    assert body["inputs"] == [
        {
            "name": "input-0",
            "datatype": "FP64",
            "shape": [3, 2],
            "data": [61.0, 22.5, 45.0, 48.0, 80.0, 12.0],
        },
    ]
    assert body["outputs"] == [{"name": "predict_proba"}]
    assert answer.column("predict_proba", 1) == [0.1, 0.6, 0.75]
    assert answer.model_version == "unversioned"


@pytest.mark.parametrize(
    "output",
    [
        {"name": "p", "datatype": "FP64", "shape": [3, 2], "data": [0.1] * 5},
        {"name": "p", "datatype": "FP64", "shape": [3], "data": [0.1, "x", 0.3]},
        {"name": "p", "datatype": "FP64", "shape": [3], "data": [0.1, True, 0.3]},
    ],
    ids=["shape-mismatch", "string", "bool"],
)
def test_oip_malformed_tensors_are_bad_responses(output: dict[str, Any]) -> None:
    _, handler = _capture("oip", {"model_name": "m", "outputs": [output]})
    with _client("oip", handler) as client, pytest.raises(RemoteRejected) as caught:
        client.predict(BATCH)
    assert caught.value.reason == "model.bad_response"


def test_oip_requested_output_missing_is_a_bad_response() -> None:
    _, handler = _capture("oip", _good_answer("oip", 3))
    config = ModelEndpointSettings(url="http://m.test", model="m")
    http = httpx.Client(transport=httpx.MockTransport(handler))
    with (
        OipV2Client(config, outputs=("predict_proba",), client=http) as client,
        pytest.raises(RemoteRejected, match="predict_proba"),
    ):
        client.predict(BATCH)


def test_mlflow_sends_dataframe_split_and_params() -> None:
    requests, handler = _capture("mlflow", {"predictions": [[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]})
    batch = FeatureBatch(BATCH.columns, BATCH.rows, {"threshold": 0.5})
    config = ModelEndpointSettings(url="http://m.test", model="clf", version="4")
    http = httpx.Client(transport=httpx.MockTransport(handler))
    with MlflowScoringClient(config, client=http) as client:
        answer = client.predict(batch)
    [request] = requests
    assert request.url.path == "/invocations"
    assert orjson.loads(request.content) == {
        "dataframe_split": {
            "columns": ["age", "egfr"],
            "data": [[61.0, 22.5], [45.0, 48.0], [80.0, 12.0]],
        },
        "params": {"threshold": 0.5},
    }
    assert answer.column("predictions", 1) == [0.3, 0.8, 0.5]
    assert (answer.model_name, answer.model_version) == ("clf", "4")


def test_mlflow_record_predictions_become_named_outputs() -> None:
    records = [{"risk": 0.1, "band": 1}, {"risk": 0.2, "band": 2}, {"risk": 0.3, "band": 2}]
    _, handler = _capture("mlflow", {"predictions": records})
    with _client("mlflow", handler) as client:
        answer = client.predict(BATCH)
    assert answer.column("risk") == [0.1, 0.2, 0.3]
    assert answer.column("band") == [1.0, 2.0, 2.0]


def test_kserve_v1_sends_instances_to_predict() -> None:
    requests, handler = _capture("kserve", {"predictions": [0, 1, 1]})
    with _client("kserve", handler) as client:
        answer = client.predict(BATCH)
    assert requests[0].url.path == "/v1/models/m:predict"
    assert orjson.loads(requests[0].content) == {
        "instances": [[61.0, 22.5], [45.0, 48.0], [80.0, 12.0]]
    }
    assert answer.column("predictions") == [0.0, 1.0, 1.0]


def test_ubiops_one_request_per_row_by_default_with_token_scheme(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UBIOPS_TOKEN", "Token abc123")  # copied with its scheme
    requests, handler = _capture("ubiops", _good_answer("ubiops", 1))
    config = ModelEndpointSettings(
        url="https://api.ubiops.test/v2.1",
        model="kfre",
        version="v3",
        max_batch_rows=1,
        timeout_s=2.5,
        auth=ModelAuth(token_env="UBIOPS_TOKEN", scheme="Token"),
    )
    http = httpx.Client(transport=httpx.MockTransport(handler))
    with UbiOpsClient(config, project="renal", client=http) as client:
        answer = client.predict(BATCH)
    assert len(requests) == 3
    first = requests[0]
    assert first.url.path == "/v2.1/projects/renal/deployments/kfre/versions/v3/requests"
    assert first.url.params["timeout"] == "3"
    assert first.headers["authorization"] == "Token abc123"
    assert orjson.loads(first.content) == {"age": 61.0, "egfr": 22.5}
    assert answer.column("risk") == [0.1, 0.1, 0.1]
    assert answer.model_version == "v1"


def test_ubiops_failed_request_is_dead_lettered_with_its_message() -> None:
    failed = {"id": "r", "status": "failed", "result": None, "error_message": "KeyError: egfr"}
    _, handler = _capture("ubiops", failed)
    with (
        _client("ubiops", handler, max_batch_rows=1) as client,
        pytest.raises(RemoteRejected) as caught,
    ):
        client.predict(BATCH)
    assert caught.value.reason == "model.failed"
    assert caught.value.body == b"KeyError: egfr"


@pytest.mark.parametrize("status", ["pending", "processing", "cancelled"])
def test_ubiops_unfinished_request_is_retried(status: str) -> None:
    _, handler = _capture("ubiops", {"id": "r", "status": status, "result": None})
    with _client("ubiops", handler, max_batch_rows=1) as client, pytest.raises(UpstreamUnavailable):
        client.predict(BATCH)


@pytest.mark.parametrize(
    ("status", "body", "ready"),
    [(200, {"name": "m", "ready": True}, True), (200, {"ready": False}, False), (503, {}, False)],
)
def test_kserve_v1_ready_follows_the_model_status(
    status: int, body: dict[str, object], ready: bool
) -> None:
    def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models/m"
        return httpx.Response(status, json=body)

    http = httpx.Client(transport=httpx.MockTransport(server))
    client = KserveV1Client(ModelEndpointSettings(url="http://k.test", model="m"), client=http)
    assert client.ready() is ready
