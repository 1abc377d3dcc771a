"""The sandbox OIP v2 model server, over real HTTP on a real socket."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ehrbridge._http import ThreadedServer
from ehrbridge.sandbox.kfre import Calibration, kfre_4var
from ehrbridge.sandbox.model_server import (
    FaultInjector,
    FaultSpec,
    create_model_app,
)

MODEL = "kfre-4var"
INFER = f"/v2/models/{MODEL}/infer"

# Four patients spanning low to high risk: (age, male, eGFR, UACR mg/g).
PATIENTS = [(65.0, True, 19.0, 30.0), (70.0, False, 50.0, 35.0), (57.28, False, 15.0, 1762.0)]
PATIENTS.append((44.5, True, 27.25, 612.0))


def _tensor(
    name: str, datatype: str, data: list[Any], shape: list[int] | None = None
) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def _request(patients: list[tuple[float, bool, float, float]], **extra: Any) -> dict[str, Any]:
    ages, males, egfrs, uacrs = (list(column) for column in zip(*patients, strict=True))
    body: dict[str, Any] = {
        "inputs": [
            _tensor("age", "FP64", ages),
            _tensor("male", "BOOL", males),
            _tensor("egfr", "FP64", egfrs),
            _tensor("uacr", "FP64", uacrs),
        ]
    }
    body.update(extra)
    return body


def _outputs(response: httpx.Response) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in response.json()["outputs"]}


def _expected(
    patient: tuple[float, bool, float, float], calibration: Calibration
) -> tuple[float, float]:
    return (kfre_4var(*patient, 2, calibration), kfre_4var(*patient, 5, calibration))


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with ThreadedServer(create_model_app()) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def shared_client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10.0) as http:
        yield http


@pytest.fixture
def client(shared_client: httpx.Client) -> httpx.Client:
    """The module's client, with the server's fault plan and counters cleared."""
    shared_client.delete("/_admin/faults").raise_for_status()
    shared_client.delete("/_admin/stats").raise_for_status()
    return shared_client


def _stats(client: httpx.Client) -> dict[str, int]:
    stats: dict[str, int] = client.get("/_admin/stats").json()
    return stats


# ------------------------------------------------------------- metadata and health


def test_server_metadata(client: httpx.Client) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] and body["version"]
    assert body["extensions"] == []


def test_model_metadata_declares_inputs_and_outputs(client: httpx.Client) -> None:
    response = client.get(f"/v2/models/{MODEL}")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == MODEL
    assert body["versions"] == ["1.0.0"]
    assert body["platform"]
    declared = {t["name"]: (t["datatype"], t["shape"]) for t in body["inputs"]}
    assert declared == {
        "age": ("FP64", [-1]),
        "male": ("BOOL", [-1]),
        "egfr": ("FP64", [-1]),
        "uacr": ("FP64", [-1]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in body["outputs"]} == {
        "risk_2y": ("FP64", [-1]),
        "risk_5y": ("FP64", [-1]),
    }
    assert client.get(f"/v2/models/{MODEL}/versions/1.0.0").json() == body


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    ready = client.get(f"/v2/models/{MODEL}/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert client.get(f"/v2/models/{MODEL}/versions/1.0.0/ready").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/other-model",
        "/v2/models/other-model/ready",
        f"/v2/models/{MODEL}/versions/9.9.9",
        f"/v2/models/{MODEL}/versions/9.9.9/ready",
        "/v2/no/such/route",
    ],
)
def test_unknown_model_version_or_route_is_404_with_error(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert isinstance(response.json()["error"], str)


# ------------------------------------------------------------------------ inference


def test_single_patient_infer_matches_kfre_with_default_calibration(client: httpx.Client) -> None:
    response = client.post(INFER, json=_request(PATIENTS[:1], id="req-1"))
    assert response.status_code == 200
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (MODEL, "1.0.0", "req-1")
    assert body["parameters"] == {"calibration": "north_american"}
    outputs = _outputs(response)
    expected_2y, expected_5y = _expected(PATIENTS[0], Calibration.NORTH_AMERICAN)
    assert outputs["risk_2y"]["datatype"] == "FP64"
    assert outputs["risk_2y"]["shape"] == [1]
    assert outputs["risk_2y"]["data"] == [expected_2y]
    assert outputs["risk_5y"]["data"] == [expected_5y]


@pytest.mark.parametrize("calibration", list(Calibration))
def test_batch_infer_matches_kfre_row_by_row(
    client: httpx.Client, calibration: Calibration
) -> None:
    request = _request(PATIENTS, parameters={"calibration": calibration.value})
    response = client.post(INFER, json=request)
    assert response.status_code == 200
    assert response.json()["parameters"] == {"calibration": calibration.value}
    outputs = _outputs(response)
    expected = [_expected(patient, calibration) for patient in PATIENTS]
    assert outputs["risk_2y"]["shape"] == outputs["risk_5y"]["shape"] == [len(PATIENTS)]
    assert outputs["risk_2y"]["data"] == [e[0] for e in expected]
    assert outputs["risk_5y"]["data"] == [e[1] for e in expected]
    assert _stats(client)["rows_served"] == len(PATIENTS)


def test_calibration_parameter_changes_the_answer(client: httpx.Client) -> None:
    default = _outputs(client.post(INFER, json=_request(PATIENTS)))
    non_na = _outputs(
        client.post(
            INFER, json=_request(PATIENTS, parameters={"calibration": "non_north_american"})
        )
    )
    for name in ("risk_2y", "risk_5y"):
        assert all(
            na > other
            for na, other in zip(default[name]["data"], non_na[name]["data"], strict=True)
        )


def test_versioned_route_and_nested_n_by_1_data(client: httpx.Client) -> None:
    flat = _request(PATIENTS)
    nested = _request(PATIENTS)
    for tensor in nested["inputs"]:
        tensor["shape"] = [len(PATIENTS), 1]
        tensor["data"] = [[value] for value in tensor["data"]]
    flat_answer = client.post(INFER, json=flat)
    nested_answer = client.post(f"/v2/models/{MODEL}/versions/1.0.0/infer", json=nested)
    assert nested_answer.status_code == 200
    assert _outputs(nested_answer) == _outputs(flat_answer)


def test_n_by_1_shape_with_flat_data_is_accepted(client: httpx.Client) -> None:
    request = _request(PATIENTS)
    for tensor in request["inputs"]:
        tensor["shape"] = [len(PATIENTS), 1]
    response = client.post(INFER, json=request)
    assert response.status_code == 200
    assert _outputs(response) == _outputs(client.post(INFER, json=_request(PATIENTS)))


@pytest.mark.parametrize(
    ("datatype", "encode"),
    [("INT32", int), ("INT64", int), ("FP32", float), ("FP64", float)],
)
def test_male_as_numeric_zero_one(client: httpx.Client, datatype: str, encode: type) -> None:
    as_bool = _outputs(client.post(INFER, json=_request(PATIENTS)))
    request = _request(PATIENTS)
    males = [encode(p[1]) for p in PATIENTS]
    request["inputs"][1] = _tensor("male", datatype, males)
    response = client.post(INFER, json=request)
    assert response.status_code == 200
    assert _outputs(response) == as_bool


def test_requested_outputs_subset(client: httpx.Client) -> None:
    response = client.post(INFER, json=_request(PATIENTS, outputs=[{"name": "risk_5y"}]))
    assert response.status_code == 200
    assert list(_outputs(response)) == ["risk_5y"]


def test_age_given_as_json_integers_is_fine(client: httpx.Client) -> None:
    request = _request([(65, True, 19, 30)])
    response = client.post(INFER, json=request)
    assert response.status_code == 200
    assert _outputs(response)["risk_2y"]["data"] == [
        kfre_4var(65.0, True, 19.0, 30.0, 2, Calibration.NORTH_AMERICAN)
    ]


# -------------------------------------------------------------------- 400 answers


def _with_input(name: str, **changes: Any) -> dict[str, Any]:
    request = _request(PATIENTS)
    for tensor in request["inputs"]:
        if tensor["name"] == name:
            tensor.update(changes)
    return request


def _without_input(name: str) -> dict[str, Any]:
    request = _request(PATIENTS)
    request["inputs"] = [t for t in request["inputs"] if t["name"] != name]
    return request


def _with_extra_input(tensor: dict[str, Any]) -> dict[str, Any]:
    request = _request(PATIENTS)
    request["inputs"].append(tensor)
    return request


BAD_REQUESTS: dict[str, Any] = {
    "missing uacr": _without_input("uacr"),
    "unexpected input": _with_extra_input(_tensor("bmi", "FP64", [25.0] * 4)),
    "duplicate input": _with_extra_input(_tensor("age", "FP64", [50.0] * 4)),
    "data shorter than shape": _with_input("egfr", shape=[5]),
    "shape N x 2": _with_input("egfr", shape=[2, 2]),
    "scalar shape": _with_input("egfr", shape=[]),
    "batch sizes differ": _with_input("age", shape=[3], data=[60.0, 61.0, 62.0]),
    "nested data for flat shape": _with_input("egfr", data=[[19.0], [50.0], [15.0], [27.0]]),
    "ragged nested data": _with_input(
        "egfr", shape=[4, 1], data=[[19.0], [50.0, 1.0], [15.0], [27.0]]
    ),
    "age as INT64": _with_input("age", datatype="INT64", data=[65, 70, 57, 44]),
    "age as BYTES": _with_input("age", datatype="BYTES", data=["65", "70", "57", "44"]),
    "male BOOL given 1/0": _with_input("male", data=[1, 0, 0, 1]),
    "male INT64 given 2": _with_input("male", datatype="INT64", data=[1, 0, 2, 1]),
    "male FP64 given 0.5": _with_input("male", datatype="FP64", data=[1.0, 0.0, 0.5, 1.0]),
    "string in FP64": _with_input("uacr", data=[30.0, "35", 1762.0, 612.0]),
    "null in FP64": _with_input("uacr", data=[30.0, None, 1762.0, 612.0]),
    "boolean in FP64": _with_input("age", data=[True, 70.0, 57.0, 44.0]),
    "zero eGFR": _with_input("egfr", data=[19.0, 0.0, 15.0, 27.0]),
    "negative UACR": _with_input("uacr", data=[30.0, 35.0, -1.0, 612.0]),
    "zero UACR": _with_input("uacr", data=[0.0, 35.0, 1762.0, 612.0]),
    "negative age": _with_input("age", data=[65.0, -70.0, 57.0, 44.0]),
    "unknown calibration": _request(PATIENTS, parameters={"calibration": "european"}),
    "calibration not a string": _request(PATIENTS, parameters={"calibration": 1}),
    "unknown output": _request(PATIENTS, outputs=[{"name": "risk_10y"}]),
    "binary data asked": _request(PATIENTS, parameters={"binary_data_output": True}),
    "id not a string": _request(PATIENTS, id=42),
    "inputs not a list": {"inputs": {"age": [1]}},
    "body not an object": [1, 2, 3],
}


@pytest.mark.parametrize("request_body", BAD_REQUESTS.values(), ids=list(BAD_REQUESTS))
def test_bad_tensors_are_400_with_error_and_serve_nothing(
    client: httpx.Client, request_body: Any
) -> None:
    response = client.post(INFER, json=request_body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert response.json()["error"]
    stats = _stats(client)
    assert (stats["infer_rejected"], stats["infer_ok"], stats["rows_served"]) == (1, 0, 0)


@pytest.mark.parametrize(
    "raw",
    [
        # Python's json writes the non-standard NaN / Infinity literals.
        json.dumps(_with_input("egfr", data=[19.0, float("nan"), 15.0, 27.0])),
        json.dumps(_with_input("uacr", data=[30.0, float("inf"), 15.0, 27.0])),
        '{"inputs": [',
        "",
    ],
    ids=["NaN literal", "Infinity literal", "truncated JSON", "empty body"],
)
def test_non_finite_and_invalid_json_are_400(client: httpx.Client, raw: str) -> None:
    response = client.post(INFER, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]


def test_error_messages_do_not_echo_values(client: httpx.Client) -> None:
    response = client.post(INFER, json=_with_input("egfr", data=[19.0, -4321.5, 15.0, 27.0]))
    assert response.status_code == 400
    assert "egfr[1]" in response.json()["error"]
    assert "4321" not in response.json()["error"]


def test_binary_extension_header_is_refused(client: httpx.Client) -> None:
    response = client.post(
        INFER, json=_request(PATIENTS), headers={"Inference-Header-Content-Length": "10"}
    )
    assert response.status_code == 400


def test_unknown_model_infer_is_404_and_not_counted(client: httpx.Client) -> None:
    response = client.post("/v2/models/other/infer", json=_request(PATIENTS))
    assert response.status_code == 404
    assert "error" in response.json()
    wrong_version = client.post(f"/v2/models/{MODEL}/versions/2.0.0/infer", json=_request(PATIENTS))
    assert wrong_version.status_code == 404
    assert _stats(client)["infer_requests"] == 0


# ----------------------------------------------------------------- fault injection


def test_status_fault_answers_the_next_n_calls_then_recovers(client: httpx.Client) -> None:
    plan = client.post("/_admin/faults", json={"status": 503, "count": 3, "retry_after_s": 1})
    assert plan.status_code == 200
    statuses = []
    for _ in range(3):
        response = client.post(INFER, json=_request(PATIENTS))
        statuses.append(response.status_code)
        assert response.headers["retry-after"] == "1"
        assert "error" in response.json()
    assert statuses == [503, 503, 503]
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 200
    stats = _stats(client)
    assert stats == {
        "infer_requests": 4,
        "infer_ok": 1,
        "infer_rejected": 0,
        "infer_faulted": 3,
        "rows_served": len(PATIENTS),
    }


def test_other_status_codes_can_be_injected(client: httpx.Client) -> None:
    client.post("/_admin/faults", json={"status": 429}).raise_for_status()
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 429
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 200


def test_clearing_faults_restores_service(client: httpx.Client) -> None:
    client.post("/_admin/faults", json={"status": 500, "count": 50}).raise_for_status()
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 500
    client.delete("/_admin/faults").raise_for_status()
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 200
    assert client.get("/_admin/faults").json()["remaining"] == 0


def _wait_for_stat(client: httpx.Client, name: str, value: int) -> None:
    deadline = time.monotonic() + 15
    while _stats(client)[name] < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_delay_fault_holds_the_answer_back(client: httpx.Client) -> None:
    client.post("/_admin/faults", json={"delay_s": 1.0, "count": 1}).raise_for_status()
    # The server sleeps 1 s before answering, so a 0.2 s read timeout must fire.
    with pytest.raises(httpx.ReadTimeout):
        client.post(INFER, json=_request(PATIENTS), timeout=0.2)
    assert client.get("/_admin/faults").json()["remaining"] == 0
    assert client.get("/v2/health/live").status_code == 200  # the loop is not blocked
    # The delayed call is still served once its delay is over (nobody reads it).
    _wait_for_stat(client, "infer_ok", 1)
    # Count spent: the next call is answered at once and normally.
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 200
    assert _stats(client)["infer_ok"] == 2


def test_down_window_answers_503_then_recovers(client: httpx.Client) -> None:
    client.post("/_admin/faults", json={"down_for_s": 1.0}).raise_for_status()
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 503
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 503
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 503
    assert client.get("/v2/health/live").status_code == 200
    # Poll (no timing assertion) until the window has passed.
    deadline = time.monotonic() + 15
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "down window never ended"
        time.sleep(0.1)
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 200
    assert _stats(client)["infer_faulted"] == 2


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"count": 3},
        {"status": 200},
        {"status": 503, "count": 0},
        {"delay_s": -1},
        {"down_for_s": 0},
        {"status": 503, "colour": "red"},
        {"down_for_s": 5, "count": 2},
    ],
    ids=str,
)
def test_invalid_fault_specs_are_400(client: httpx.Client, spec: dict[str, Any]) -> None:
    response = client.post("/_admin/faults", json=spec)
    assert response.status_code == 400
    assert response.json()["error"]
    assert client.post(INFER, json=_request(PATIENTS)).status_code == 200


def test_stats_count_requests_and_rows_and_reset(client: httpx.Client) -> None:
    client.post(INFER, json=_request(PATIENTS[:1]))
    client.post(INFER, json=_request(PATIENTS))
    stats = _stats(client)
    assert (stats["infer_requests"], stats["infer_ok"], stats["rows_served"]) == (2, 2, 5)
    client.delete("/_admin/stats").raise_for_status()
    assert set(_stats(client).values()) == {0}


def test_fault_injector_counts_are_exact_under_concurrency() -> None:
    faults = FaultInjector()
    faults.inject(FaultSpec(status=503, count=100))
    claimed: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(50):
            action = faults.claim()
            if action is not None:
                with lock:
                    claimed.append(action.status or 0)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert claimed == [503] * 100


# ------------------------------------------------------------------ threaded server


def test_threaded_server_serves_then_stops_and_releases_the_port() -> None:
    server = ThreadedServer(create_model_app(model_name="other", model_version="7")).start()
    url = server.base_url
    with httpx.Client(base_url=url) as http:
        assert http.get("/v2/models/other/versions/7").status_code == 200
    server.stop()
    with httpx.Client(base_url=url) as http, pytest.raises(httpx.ConnectError):
        http.get("/v2/health/live")


def test_admin_routes_can_be_left_out() -> None:
    with (
        ThreadedServer(create_model_app(admin=False)) as server,
        httpx.Client(base_url=server.base_url) as http,
    ):
        assert http.post("/_admin/faults", json={"status": 503}).status_code in {404, 405}
        assert http.get("/v2/health/ready").status_code == 200
