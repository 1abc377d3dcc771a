"""One contract, every model client: the OIP v2 client against the sandbox's model server
(real HTTP on a real socket) and against an httpx.MockTransport double, and the shipped
model file (models/kfre-4.yaml, DeclaredModel over adapters/oip_v2.py) against the same
server.

The Model contract (``core/contracts.py``), case by case:

* ``infer(records)`` answers one risk per record per horizon, **in the order
  of the records**, in one request for the whole batch, and names the
  model and its version (they go into the result's Provenance);
* it is deterministic: the same records give the same risks, which is what
  makes a replayed message's prediction the same prediction;
* transient (server down, overloaded, 5xx, 429, slow past ``timeout_s``,
  connection refused) is :class:`UpstreamUnavailable`; the stage retries;
* permanent (4xx, an answer that is not OIP v2 with ``risk_2y`` and
  ``risk_5y``, the wrong number of rows) is :class:`RemoteRejected`;
* no third-party exception leaks (httpx, orjson);
* ``ready()`` says whether the server takes requests and never raises;
* ``close`` is idempotent and a new client (a restart) works.

The malformed answers a real server does not give on purpose are unit cases
against the MockTransport double only.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson
import pytest
from model_double import OipDouble

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.declared_model import DeclaredModel
from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.config import Calibration as SiteCalibration
from ehrbridge.config import ModelEndpoint
from ehrbridge.core.errors import (
    EhrbridgeError,
    RemoteRejected,
    TransientError,
    UpstreamUnavailable,
)
from ehrbridge.mappings.model_file import load_model_file
from ehrbridge.pipelines.features import FeatureRecord
from ehrbridge.pipelines.model import Model
from ehrbridge.sandbox.kfre import Calibration, kfre_4var
from ehrbridge.sandbox.model_server import create_model_app

NA = SiteCalibration.NORTH_AMERICAN
KFRE_4_FILE = Path(__file__).resolve().parents[2] / "models" / "kfre-4.yaml"

# (age, male, eGFR, UACR mg/g), low to high risk, deliberately not sorted by risk.
PATIENTS = [(70.0, False, 50.0, 35.0), (57.28, False, 15.0, 1762.0), (65.0, True, 19.0, 30.0)]
PATIENTS.append((44.5, True, 27.25, 612.0))


def features(age: float, male: bool, egfr: float, uacr: float) -> FeatureRecord:
    return FeatureRecord(
        anchor=datetime(2026, 1, 1, tzinfo=UTC),
        values={"age": age, "sex": 1.0 if male else 0.0, "egfr": egfr, "uacr": uacr},
        inputs=(),
        episode="day 2026-01-01",
    )


RECORDS = [features(*p) for p in PATIENTS]


class Client(Model, Protocol):
    def ready(self) -> bool: ...

    def close(self) -> None: ...


class ModelBed(Protocol):
    def client(self, timeout_s: float = 5.0) -> Client: ...

    def expected(self) -> tuple[list[float], list[float]]:
        """The risks (2y, 5y) of ``RECORDS``, in order, from an independent oracle."""
        ...

    def requests(self) -> int: ...

    def fault(self, status: int | None = None, delay_s: float | None = None) -> None:
        """The next infer call is answered ``status``, or after ``delay_s``."""
        ...

    def down(self) -> None: ...


class SandboxBed:
    """The sandbox's OIP v2 server; faults and counters through its admin routes."""

    def __init__(self, server: ThreadedServer) -> None:
        self.url = server.base_url
        self.admin = httpx.Client(base_url=server.base_url, timeout=10)
        self.opened: list[Client] = []

    def client(self, timeout_s: float = 5.0) -> Client:
        self.opened.append(
            InferenceClient(ModelEndpoint(url=self.url, timeout_s=timeout_s, calibration=NA))
        )
        return self.opened[-1]

    def expected(self) -> tuple[list[float], list[float]]:
        calibration = Calibration.NORTH_AMERICAN
        return (
            [kfre_4var(*p, 2, calibration) for p in PATIENTS],
            [kfre_4var(*p, 5, calibration) for p in PATIENTS],
        )

    def requests(self) -> int:
        count: int = self.admin.get("/_admin/stats").json()["infer_requests"]
        return count

    def fault(self, status: int | None = None, delay_s: float | None = None) -> None:
        spec = {k: v for k, v in {"status": status, "delay_s": delay_s}.items() if v is not None}
        self.admin.post("/_admin/faults", json={**spec, "count": 1}).raise_for_status()

    def down(self) -> None:
        self.admin.post("/_admin/faults", json={"down_for_s": 30}).raise_for_status()


class DeclaredBed(SandboxBed):
    """models/kfre-4.yaml (DeclaredModel over the OIP v2 adapter) against the sandbox server."""

    def client(self, timeout_s: float = 5.0) -> Client:
        definition = load_model_file(KFRE_4_FILE)
        endpoint = definition.endpoint.model_copy(update={"timeout_s": timeout_s})
        definition = definition.model_copy(update={"endpoint": endpoint})
        model = ModelEndpoint(url=self.url, definition=definition, calibration=NA)
        self.opened.append(DeclaredModel(model))
        return self.opened[-1]


class MockBed:
    def __init__(self) -> None:
        self.double = OipDouble()

    def client(self, timeout_s: float = 5.0) -> Client:
        http = httpx.Client(transport=httpx.MockTransport(self.double))
        endpoint = ModelEndpoint(url="https://model.test", timeout_s=timeout_s, calibration=NA)
        return InferenceClient(endpoint, client=http)

    def expected(self) -> tuple[list[float], list[float]]:
        return [p[2] / 1000 for p in PATIENTS], [p[3] / 1e4 for p in PATIENTS]

    def requests(self) -> int:
        return self.double.calls

    def fault(self, status: int | None = None, delay_s: float | None = None) -> None:
        if delay_s is not None:  # what httpx raises when the read outlasts the timeout
            self.double.faults.append(raising(httpx.ReadTimeout("slow")))
        else:
            self.double.faults.append(answer(status or 500))

    def down(self) -> None:
        self.double.ready = False
        self.double.faults.extend(answer(503) for _ in range(10))


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def answer(status: int, body: Any = None, **headers: str) -> Callable[..., httpx.Response]:
    content = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else b""
    return lambda request: httpx.Response(status, content=content, headers=headers)


@pytest.fixture(scope="module")
def model_server() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_model_app()) as server:
        yield server


@pytest.fixture(params=["oip-v2-sandbox", "oip-v2-mock", "model-file-sandbox"])
def bed(request: pytest.FixtureRequest) -> Iterator[ModelBed]:
    if request.param == "oip-v2-mock":
        yield MockBed()
        return
    server = request.getfixturevalue("model_server")
    sandbox = SandboxBed(server) if request.param == "oip-v2-sandbox" else DeclaredBed(server)
    sandbox.admin.delete("/_admin/faults").raise_for_status()
    yield sandbox
    sandbox.admin.delete("/_admin/faults").raise_for_status()
    for client in sandbox.opened:
        client.close()


# ------------------------------------------------------------------------- cases


def test_one_request_answers_every_record_in_order(bed: ModelBed) -> None:
    before = bed.requests()
    result = bed.client().infer(RECORDS, "MSG-1")
    risk_2y, risk_5y = bed.expected()
    assert result.outputs["risk_2y"] == pytest.approx(risk_2y, abs=1e-9)
    assert result.outputs["risk_5y"] == pytest.approx(risk_5y, abs=1e-9)
    assert bed.requests() - before == 1
    assert result.model_name == "kfre-4var" and result.model_version == "1.0.0"


def test_the_same_records_give_the_same_risks(bed: ModelBed) -> None:
    client = bed.client()
    first = client.infer(RECORDS)
    again = client.infer(list(reversed(RECORDS)))
    assert again.outputs["risk_2y"] == list(reversed(first.outputs["risk_2y"]))
    assert again.outputs["risk_5y"] == list(reversed(first.outputs["risk_5y"]))


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_a_server_error_or_overload_is_transient(bed: ModelBed, status: int) -> None:
    client = bed.client()
    bed.fault(status=status)
    with pytest.raises(UpstreamUnavailable):
        client.infer(RECORDS)
    assert client.infer(RECORDS).outputs["risk_2y"] == pytest.approx(
        bed.expected()[0]
    )  # then it passes


def test_an_answer_slower_than_the_timeout_is_transient(bed: ModelBed) -> None:
    client = bed.client(timeout_s=0.3)
    bed.fault(delay_s=1.5)
    with pytest.raises(UpstreamUnavailable, match="timed out"):
        client.infer(RECORDS)


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_a_refusal_is_permanent_and_keeps_the_answer(bed: ModelBed, status: int) -> None:
    bed.fault(status=status)
    with pytest.raises(RemoteRejected) as caught:
        bed.client().infer(RECORDS)
    assert caught.value.status == status


def test_ready_follows_the_server_and_never_raises(bed: ModelBed) -> None:
    client = bed.client()
    assert client.ready() is True
    bed.down()
    assert client.ready() is False
    with pytest.raises(UpstreamUnavailable):
        client.infer(RECORDS)


def test_close_is_idempotent_and_a_new_client_works(bed: ModelBed) -> None:
    first = bed.client()
    first.infer(RECORDS[:1])
    first.close()
    first.close()
    assert bed.client().infer(RECORDS[:2]).outputs["risk_2y"] == pytest.approx(
        bed.expected()[0][:2]
    )


def test_a_server_nobody_listens_on_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = InferenceClient(
        ModelEndpoint(url=f"http://127.0.0.1:{port}", timeout_s=1.0, calibration=NA)
    )
    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        client.infer(RECORDS)
    assert client.ready() is False
    client.close()


# ----------------------------------------- malformed answers (unit cases, MockTransport)


def outputs(risk_2y: Any, risk_5y: Any) -> dict[str, Any]:
    return {
        "model_name": "kfre-4var",
        "outputs": [{"name": "risk_2y", "data": risk_2y}, {"name": "risk_5y", "data": risk_5y}],
    }


FOUR = [0.1, 0.2, 0.3, 0.4]
MALFORMED = {
    "not-json": answer(200, b"<html>gateway</html>"),
    "json-array": answer(200, []),
    "no-outputs": answer(200, {"model_name": "kfre-4var"}),
    "outputs-not-a-list": answer(200, {"model_name": "kfre-4var", "outputs": {"risk_2y": 1}}),
    "no-model-name": answer(200, {"outputs": outputs(FOUR, FOUR)["outputs"]}),
    "missing-horizon": answer(
        200, {"model_name": "m", "outputs": outputs(FOUR, FOUR)["outputs"][:1]}
    ),
    "text-risks": answer(200, outputs(["high", "low", "low", "low"], FOUR)),
    "null-risk": answer(200, outputs([None, 0.2, 0.3, 0.4], FOUR)),
    "too-few-rows": answer(200, outputs(FOUR[:3], FOUR[:3])),
    "too-many-rows": answer(200, outputs([*FOUR, 0.5], [*FOUR, 0.5])),
    "bad-gzip": answer(200, b"not gzip at all", **{"content-encoding": "gzip"}),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_an_answer_that_is_not_oip_v2_risks_is_permanent(name: str) -> None:
    bed = MockBed()
    bed.double.faults.append(MALFORMED[name])
    with pytest.raises(RemoteRejected) as caught:
        bed.client().infer(RECORDS)
    assert caught.value.reason == "model.bad_response"


def test_risks_outside_zero_to_one_are_permanent() -> None:
    # A probability of 1.7 or -0.2 is a broken model; shown to a clinician it would mislead.
    bed = MockBed()
    bed.double.faults.append(answer(200, outputs([0.1, 1.7, 0.3, -0.2], FOUR)))
    with pytest.raises(RemoteRejected, match="0 and 1"):
        bed.client().infer(RECORDS)


TRANSPORT = {
    "connect-error": httpx.ConnectError("refused"),
    "connect-timeout": httpx.ConnectTimeout("slow connect"),
    "read-error": httpx.ReadError("reset"),
    "remote-protocol": httpx.RemoteProtocolError("cut off"),
    "pool-timeout": httpx.PoolTimeout("busy"),
}


@pytest.mark.parametrize("name", TRANSPORT)
def test_transport_failures_are_translated_as_transient(name: str) -> None:
    bed = MockBed()
    bed.double.faults.append(raising(TRANSPORT[name]))
    with pytest.raises(TransientError) as caught:
        bed.client().infer(RECORDS)
    assert isinstance(caught.value, EhrbridgeError)
    assert isinstance(caught.value.__cause__, httpx.HTTPError)  # kept for the log, not leaked
