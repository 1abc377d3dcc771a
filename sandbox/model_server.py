"""Sandbox model server: the 4- and 8-variable KFRE behind the Open Inference Protocol v2.

It stands in for a hospital's KServe / Triton / MLServer deployment so that
ehrbridge can be developed and tested end to end. It serves two models, each
under its own name in the URL: ``kfre-4var`` (Tangri 2011, recalibrated 2016)
and ``kfre-8var`` (the same paper's 8-variable model, ``models/kfre-8.yaml``).
Endpoints (OIP v2 REST)::

    GET  /v2                                        server metadata
    GET  /v2/health/live | /v2/health/ready         200 {"live"|"ready": true}
    GET  /v2/models/{name}[/versions/{v}]           model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready     200 {"name", "ready": true}
    POST /v2/models/{name}[/versions/{v}]/infer     inference

Inference request: four inputs, each of shape ``[N]`` or ``[N, 1]`` (one row
per patient), ``data`` flat or nested in row-major order as the protocol
allows:

==========  =====================================  ====================
input       datatype accepted                      unit
==========  =====================================  ====================
``age``     FP64 (declared) or FP32                years
``male``    BOOL (true/false); INT32, INT64,       1 male / 0 female
            FP32, FP64 holding 0 or 1
``egfr``    FP64 (declared) or FP32                mL/min/1.73 m2
``uacr``    FP64 (declared) or FP32                mg/g
==========  =====================================  ====================

``kfre-8var`` takes those four and four serum analytes, each FP64 (or FP32)
in the unit the equation is centred in (ehrbridge converts SI results before
sending; ``GET /v2/models/kfre-8var`` states each unit):

===============  ==========
``albumin``      g/dL
``phosphate``    mg/dL
``bicarbonate``  mmol/L
``calcium``      mg/dL
===============  ==========

``parameters.calibration`` is ``"north_american"`` or ``"non_north_american"``;
when absent the server uses **north_american** (Tangri 2016) and echoes the
choice in the response ``parameters``. Outputs ``risk_2y`` and ``risk_5y`` are
FP64 fractions 0..1 of shape ``[N]``; a request may name a subset in
``outputs``. The binary tensor extension is not supported (400). Each model
uses its own baseline survivals (Tangri 2016) for the calibration asked.

Errors follow the protocol: ``{"error": "<message>"}`` with 400 for a bad
request (missing/unexpected input, bad shape, wrong datatype, non-positive or
non-finite value, unknown calibration, invalid JSON) and 404 for an unknown
model or version. Messages name inputs and row numbers, never values.

Fault injection (sandbox only -- never expose these routes outside a test bed)::

    POST   /_admin/faults  {"status": 503, "count": 3}   next 3 infer calls answer 503
                           {"delay_s": 2.0, "count": 1}  next call sleeps 2 s first
                           {"down_for_s": 30}            infer and readiness answer 503
                                                         for 30 s (liveness stays 200)
                           optional "retry_after_s": n   adds a Retry-After header
    GET    /_admin/faults                                the current plan
    DELETE /_admin/faults                                clear it
    GET    /_admin/stats                                 infer call and row counters
    DELETE /_admin/stats                                 reset the counters

A POST replaces the whole plan; ``status`` and ``delay_s`` in one POST share
``count`` (each of those calls is delayed, then answered with ``status``).
Counted calls are only those addressed to a served model (either of them).

A slower model endpoint (``--latency-ms``, ``--row-latency-ms``; ``Latency``):
every successful infer call is answered after ``per request + rows x per row``,
as a remote or heavier model would be. The wait is an ``asyncio.sleep``, so the
server keeps serving other callers meanwhile (a model deployment with capacity
to spare, not a queue): ``ehrbridge bench scale`` uses it to measure what a
second processing worker adds when the model call, not the CPU, is the limit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ehrbridge.sandbox.kfre import (
    EQUATION_UNITS,
    Calibration,
    Kfre8Inputs,
    kfre_4var_batch,
    kfre_8var_batch,
)

DEFAULT_CALIBRATION = Calibration.NORTH_AMERICAN
DEFAULT_MAX_BATCH_ROWS = 100_000
SERVER_NAME = "ehrbridge-sandbox-model-server"
SERVER_VERSION = "1.0.0"
PLATFORM = "ehrbridge_python"

_JSON_MEDIA_TYPE = "application/json"
_FLOATS = ("FP64", "FP32")
_MALE_DATATYPES = ("BOOL", "INT32", "INT64", "FP32", "FP64")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of the model, as model metadata declares it."""

    name: str
    datatype: str  # the declared OIP datatype
    unit: str | None  # UCUM, as the FHIR Observation will carry it
    accepted: tuple[str, ...]  # datatypes a request may use for it


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("age", "FP64", "a", _FLOATS),
    TensorSpec("male", "BOOL", None, _MALE_DATATYPES),  # true / 1 = male
    TensorSpec("egfr", "FP64", "mL/min/{1.73_m2}", _FLOATS),
    TensorSpec("uacr", "FP64", "mg/g", _FLOATS),
)
# The 8-variable model's further inputs, in the units its coefficients are centred in.
KFRE8_INPUTS: tuple[TensorSpec, ...] = (
    *INPUTS,
    *(
        TensorSpec(name, "FP64", EQUATION_UNITS[name], _FLOATS)
        for name in ("albumin", "phosphate", "bicarbonate", "calcium")
    ),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("risk_2y", "FP64", "1", ("FP64",)),
    TensorSpec("risk_5y", "FP64", "1", ("FP64",)),
)
_OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)
_CALIBRATIONS = frozenset(c.value for c in Calibration)


# --------------------------------------------------------------------------- faults


class FaultSpec(BaseModel):
    """The body of ``POST /_admin/faults``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    status: int | None = Field(default=None, ge=400, le=599)
    delay_s: float | None = Field(default=None, ge=0, le=600)
    count: int | None = Field(default=None, ge=1)
    down_for_s: float | None = Field(default=None, gt=0, le=86_400)
    retry_after_s: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _says_something(self) -> Self:
        if self.status is None and self.delay_s is None and self.down_for_s is None:
            raise ValueError("give at least one of status, delay_s, down_for_s")
        if self.count is not None and self.status is None and self.delay_s is None:
            raise ValueError("count applies to status/delay_s only")
        return self


@dataclass(frozen=True, slots=True)
class FaultAction:
    """What to do to one infer call: wait ``delay_s``, then answer ``status`` if set."""

    delay_s: float = 0.0
    status: int | None = None
    retry_after_s: int | None = None


class FaultInjector:
    """The fault plan shared by all requests. Thread-safe; one plan at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spec: FaultSpec | None = None
        self._remaining = 0
        self._down_until = 0.0

    def inject(self, spec: FaultSpec) -> None:
        """Replace the current plan with ``spec``."""
        with self._lock:
            self._spec = spec
            counted = spec.status is not None or spec.delay_s is not None
            self._remaining = (spec.count or 1) if counted else 0
            self._down_until = time.monotonic() + (spec.down_for_s or 0.0)

    def clear(self) -> None:
        with self._lock:
            self._spec, self._remaining, self._down_until = None, 0, 0.0

    def is_down(self) -> bool:
        with self._lock:
            return time.monotonic() < self._down_until

    def claim(self) -> FaultAction | None:
        """The fault for the infer call now arriving (consumes one count), or None."""
        with self._lock:
            spec = self._spec
            if spec is None:
                return None
            down = time.monotonic() < self._down_until
            counted = self._remaining > 0
            if counted:
                self._remaining -= 1
            if not (down or counted):
                return None
            status = spec.status if counted else None
            return FaultAction(
                delay_s=(spec.delay_s or 0.0) if counted else 0.0,
                status=503 if down else status,
                retry_after_s=spec.retry_after_s,
            )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            spec = self._spec
            return {
                "status": spec.status if spec else None,
                "delay_s": spec.delay_s if spec else None,
                "remaining": self._remaining,
                "down_for_s": max(0.0, self._down_until - time.monotonic()),
                "retry_after_s": spec.retry_after_s if spec else None,
            }


@dataclass(frozen=True, slots=True)
class Latency:
    """How long every successful infer call takes: ``per_request_s + rows * per_row_s``."""

    per_request_s: float = 0.0
    per_row_s: float = 0.0

    def __post_init__(self) -> None:
        if self.per_request_s < 0 or self.per_row_s < 0:
            raise ValueError("model latency cannot be negative")

    def seconds(self, rows: int) -> float:
        return self.per_request_s + rows * self.per_row_s


class ServerStats:
    """Counters of infer calls addressed to the served model. Thread-safe."""

    _FIELDS = ("infer_requests", "infer_ok", "infer_rejected", "infer_faulted", "rows_served")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self._FIELDS, 0)

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                self._counts[name] += amount

    def reset(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self._FIELDS, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# ----------------------------------------------------------------- request parsing


class InferRequestError(ValueError):
    """The request cannot be served as sent: an OIP 400."""


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A validated inference request, each input column converted to Python values."""

    request_id: str | None
    calibration: Calibration
    columns: dict[str, list[Any]]  # input name -> one value per row (floats; male: bools)
    outputs: tuple[str, ...]  # names of the outputs to return, in order

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def floats(self, name: str) -> list[float]:
        return [float(value) for value in self.columns[name]]


def parse_infer_request(
    body: bytes,
    *,
    max_rows: int = DEFAULT_MAX_BATCH_ROWS,
    inputs: Sequence[TensorSpec] = INPUTS,
) -> InferRequest:
    """Validate an OIP v2 JSON inference request for a model taking ``inputs``.

    Raises InferRequestError with a value-free message on anything malformed.
    Range checks (positive eGFR, ...) are left to the equation (``sandbox/kfre.py``).
    """
    doc = _json_object(body)
    parameters = _optional_object(doc, "parameters", "request")
    _refuse_binary(parameters, "request")
    by_name = {spec.name: spec for spec in inputs}
    tensors = _input_tensors(doc.get("inputs"), by_name)
    columns = {name: _column(by_name[name], tensors[name]) for name in by_name}
    request = InferRequest(
        request_id=_request_id(doc),
        calibration=_calibration(parameters),
        columns=columns,
        outputs=_requested_outputs(doc.get("outputs")),
    )
    if len({len(column) for column in columns.values()}) != 1:
        raise InferRequestError("inputs have different batch sizes")
    if request.rows > max_rows:
        raise InferRequestError(f"batch of {request.rows} rows exceeds the limit of {max_rows}")
    return request


def _column(spec: TensorSpec, tensor: Mapping[str, Any]) -> list[Any]:
    elements = _elements(spec, tensor)
    if spec.datatype == "BOOL":
        return _booleans(spec.name, elements)
    return _floats(spec.name, elements)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # NaN/Infinity literals land here too: they are not JSON.
        raise InferRequestError(f"request body is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InferRequestError("request body must be a JSON object")
    return doc


def _optional_object(doc: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InferRequestError(f"{where} '{key}' must be a JSON object")
    return value


def _refuse_binary(parameters: Mapping[str, Any], where: str) -> None:
    for key in ("binary_data", "binary_data_output", "binary_data_size"):
        if parameters.get(key) not in (None, False):
            raise InferRequestError(f"{where}: binary tensor data ('{key}') is not supported")


def _request_id(doc: Mapping[str, Any]) -> str | None:
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InferRequestError("'id' must be a string")
    return request_id


def _calibration(parameters: Mapping[str, Any]) -> Calibration:
    value = parameters.get("calibration", DEFAULT_CALIBRATION.value)
    if not isinstance(value, str) or value not in _CALIBRATIONS:
        allowed = ", ".join(c.value for c in Calibration)
        raise InferRequestError(f"parameters.calibration must be one of: {allowed}")
    return Calibration(value)


def _input_tensors(inputs: object, specs: Mapping[str, TensorSpec]) -> dict[str, dict[str, Any]]:
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise InferRequestError("'inputs' must be a JSON array of tensor objects")
    tensors: dict[str, dict[str, Any]] = {}
    for tensor in inputs:
        name = tensor.get("name")
        if name not in specs:
            raise InferRequestError(f"unexpected input {_label(name)}; expected {', '.join(specs)}")
        if name in tensors:
            raise InferRequestError(f"input '{name}' given more than once")
        tensors[name] = tensor
    missing = [name for name in specs if name not in tensors]
    if missing:
        raise InferRequestError(f"missing input(s): {', '.join(missing)}")
    return tensors


@dataclass(frozen=True, slots=True)
class _Elements:
    """A tensor's datatype and its elements in row-major order."""

    datatype: str
    values: list[Any]


def _elements(spec: TensorSpec, tensor: Mapping[str, Any]) -> _Elements:
    _refuse_binary(_optional_object(tensor, "parameters", f"input '{spec.name}'"), spec.name)
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in spec.accepted:
        raise InferRequestError(
            f"input '{spec.name}' has datatype {_label(datatype)}; "
            f"expected one of {', '.join(spec.accepted)}"
        )
    shape = _shape(spec.name, tensor.get("shape"))
    return _Elements(datatype, _flatten(spec.name, tensor.get("data"), shape))


def _shape(name: str, shape: object) -> list[int]:
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))
    ):
        raise InferRequestError(f"input '{name}' must have shape [N] or [N, 1]")
    return [int(d) for d in shape]


def _flatten(name: str, data: object, shape: Sequence[int]) -> list[Any]:
    """Row-major elements of a [N] or [N, 1] tensor given flat or nested."""
    if not isinstance(data, list):
        raise InferRequestError(f"input '{name}': 'data' must be a JSON array")
    if len(shape) == 2 and any(isinstance(item, list) for item in data):
        if not all(isinstance(item, list) and len(item) == 1 for item in data):
            raise InferRequestError(f"input '{name}': nested 'data' does not match shape [N, 1]")
        data = [item[0] for item in data]
    if len(data) != shape[0]:
        raise InferRequestError(
            f"input '{name}': {len(data)} elements do not match shape {list(shape)}"
        )
    return data


def _floats(name: str, elements: _Elements) -> list[float]:
    values: list[float] = []
    for row, item in enumerate(elements.values):
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise InferRequestError(f"{name}[{row}] must be a number")
        try:
            values.append(float(item))
        except OverflowError as exc:
            raise InferRequestError(f"{name}[{row}] must be a finite number") from exc
    return values


def _booleans(name: str, elements: _Elements) -> list[bool]:
    datatype, values = elements.datatype, elements.values
    if datatype == "BOOL":
        if not all(isinstance(item, bool) for item in values):
            raise InferRequestError(f"input '{name}' (BOOL) must hold true/false")
        return values
    allowed: type | tuple[type, ...] = int if datatype.startswith("INT") else (int, float)
    for row, item in enumerate(values):
        if isinstance(item, bool) or not isinstance(item, allowed) or item not in (0, 1):
            raise InferRequestError(f"{name}[{row}] must be 0 or 1 ({datatype})")
    return [item == 1 for item in values]


def _requested_outputs(outputs: object) -> tuple[str, ...]:
    if outputs is None:
        return _OUTPUT_NAMES
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InferRequestError("'outputs' must be a JSON array of objects")
    names: list[str] = []
    for output in outputs:
        name = output.get("name")
        if name not in _OUTPUT_NAMES:
            raise InferRequestError(f"unknown output {_label(name)}; expected risk_2y, risk_5y")
        _refuse_binary(_optional_object(output, "parameters", f"output '{name}'"), name)
        if name not in names:
            names.append(name)
    return tuple(names)


def _label(value: object) -> str:
    # Client-chosen names and datatypes are echoed, but only short strings.
    return f"'{value}'" if isinstance(value, str) and len(value) <= 40 else "(invalid)"


# ------------------------------------------------------------------------- the app


Scorer = Callable[[InferRequest], tuple[list[float], list[float]]]


def _score_kfre4(request: InferRequest) -> tuple[list[float], list[float]]:
    return kfre_4var_batch(
        request.floats("age"),
        request.columns["male"],
        request.floats("egfr"),
        request.floats("uacr"),
        request.calibration,
    )


def _score_kfre8(request: InferRequest) -> tuple[list[float], list[float]]:
    names = ("age", "male", "egfr", "uacr", "albumin", "phosphate", "bicarbonate", "calcium")
    rows = [Kfre8Inputs(*row) for row in zip(*(request.columns[n] for n in names), strict=True)]
    return kfre_8var_batch(rows, request.calibration)


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model the server answers for: its name in URLs, inputs and equation."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    score: Scorer


@dataclass(frozen=True, slots=True)
class _Catalogue:
    """The served models by name; finds the one a URL path addresses."""

    models: Mapping[str, ServedModel]

    def lookup(self, request: Request) -> ServedModel | str:
        """The model/version in the URL path, or why it is not served here."""
        name: str = request.path_params["name"]
        version: str | None = request.path_params.get("version")
        model = self.models.get(name)
        if model is None:
            return f"model '{_short(name)}' is not served here"
        if version is not None and version != model.version:
            return f"model '{model.name}' has no version '{_short(version)}'"
        return model


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:60] + "..."


def _json(status: int, content: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status_code=status, media_type=_JSON_MEDIA_TYPE, headers=headers
    )


def _error(status: int, message: str, retry_after_s: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return _json(status, {"error": message}, headers)


def _model_metadata(model: ServedModel) -> dict[str, Any]:
    def tensor(spec: TensorSpec) -> dict[str, Any]:
        parameters: dict[str, Any] = {"accepted_datatypes": list(spec.accepted)}
        if spec.unit is not None:
            parameters["unit"] = spec.unit
        return {
            "name": spec.name,
            "datatype": spec.datatype,
            "shape": [-1],
            "parameters": parameters,
        }

    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [tensor(spec) for spec in model.inputs],
        "outputs": [tensor(spec) for spec in OUTPUTS],
        "parameters": {
            "calibration": {
                "default": DEFAULT_CALIBRATION.value,
                "allowed": [c.value for c in Calibration],
            },
        },
    }


def _infer_response(model: ServedModel, request: InferRequest) -> bytes:
    risks_2y, risks_5y = model.score(request)
    data = {"risk_2y": risks_2y, "risk_5y": risks_5y}
    response: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "parameters": {"calibration": request.calibration.value},
        "outputs": [
            {"name": name, "datatype": "FP64", "shape": [request.rows], "data": data[name]}
            for name in request.outputs
        ],
    }
    if request.request_id is not None:
        response["id"] = request.request_id
    return orjson.dumps(response)


def create_model_app(
    *,
    model_name: str = "kfre-4var",
    model_version: str = "1.0.0",
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    faults: FaultInjector | None = None,
    stats: ServerStats | None = None,
    admin: bool = True,
    kfre8_name: str | None = "kfre-8var",
    latency: Latency | None = None,
) -> FastAPI:
    """The OIP v2 sandbox app serving the 4-variable KFRE as ``model_name``.

    The 8-variable KFRE is served beside it as ``kfre8_name`` (None: not
    served), with the same version. Pass your own ``faults``/``stats`` to
    drive or read them in-process; they are also on ``app.state.faults`` /
    ``app.state.stats``. ``admin=False`` drops the ``/_admin`` routes.
    ``latency`` makes every successful infer call that much slower (a slow endpoint).
    """
    served = [ServedModel(model_name, model_version, INPUTS, _score_kfre4)]
    if kfre8_name is not None and kfre8_name != model_name:
        served.append(ServedModel(kfre8_name, model_version, KFRE8_INPUTS, _score_kfre8))
    catalogue = _Catalogue({m.name: m for m in served})
    app = FastAPI(title=SERVER_NAME, version=SERVER_VERSION, docs_url=None, redoc_url=None)
    app.state.faults = FaultInjector() if faults is None else faults
    app.state.stats = ServerStats() if stats is None else stats
    app.add_exception_handler(StarletteHTTPException, _http_exception_as_oip_error)
    _add_health_routes(app, catalogue)
    _add_infer_routes(app, catalogue, max_batch_rows, latency or Latency())
    if admin:
        _add_admin_routes(app)
    return app


async def _http_exception_as_oip_error(request: Request, exc: Exception) -> Response:
    # Unknown routes and wrong methods answer {"error": ...} like the rest of OIP.
    assert isinstance(exc, StarletteHTTPException)
    return _json(exc.status_code, {"error": str(exc.detail)}, exc.headers)


def _add_health_routes(app: FastAPI, catalogue: _Catalogue) -> None:
    faults: FaultInjector = app.state.faults

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json(200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []})

    @app.get("/v2/health/live")
    async def server_live() -> Response:
        return _json(200, {"live": True})

    @app.get("/v2/health/ready")
    async def server_ready() -> Response:
        ready = not faults.is_down()
        return _json(200 if ready else 503, {"ready": ready})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request) -> Response:
        model = catalogue.lookup(request)
        if isinstance(model, str):
            return _error(404, model)
        return _json(200, _model_metadata(model))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request) -> Response:
        model = catalogue.lookup(request)
        if isinstance(model, str):
            return _error(404, model)
        ready = not faults.is_down()
        return _json(200 if ready else 503, {"name": model.name, "ready": ready})


def _add_infer_routes(app: FastAPI, catalogue: _Catalogue, max_rows: int, latency: Latency) -> None:
    faults: FaultInjector = app.state.faults
    stats: ServerStats = app.state.stats

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request) -> Response:
        model = catalogue.lookup(request)
        if isinstance(model, str):
            return _error(404, model)
        stats.add(infer_requests=1)
        # Read the request before any injected delay, as a slow model would.
        raw = await request.body()
        action = faults.claim()
        if action is not None:
            if action.delay_s:
                await asyncio.sleep(action.delay_s)
            if action.status is not None:
                stats.add(infer_faulted=1)
                return _error(action.status, "injected fault", action.retry_after_s)
        try:
            if "inference-header-content-length" in request.headers:
                raise InferRequestError("binary tensor data extension is not supported")
            parsed = parse_infer_request(raw, max_rows=max_rows, inputs=model.inputs)
            body = _infer_response(model, parsed)
        except ValueError as exc:  # InferRequestError, or kfre's range checks
            stats.add(infer_rejected=1)
            return _error(400, str(exc))
        if wait_s := latency.seconds(parsed.rows):
            await asyncio.sleep(wait_s)  # not time.sleep: other callers are served meanwhile
        stats.add(infer_ok=1, rows_served=parsed.rows)
        return Response(body, media_type=_JSON_MEDIA_TYPE)


def _add_admin_routes(app: FastAPI) -> None:
    faults: FaultInjector = app.state.faults
    stats: ServerStats = app.state.stats

    @app.post("/_admin/faults")
    async def inject_faults(request: Request) -> Response:
        try:
            spec = FaultSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            return _error(400, problems)
        faults.inject(spec)
        return _json(200, faults.snapshot())

    @app.get("/_admin/faults")
    async def show_faults() -> Response:
        return _json(200, faults.snapshot())

    @app.delete("/_admin/faults")
    async def clear_faults() -> Response:
        faults.clear()
        return _json(200, faults.snapshot())

    @app.get("/_admin/stats")
    async def show_stats() -> Response:
        return _json(200, stats.snapshot())

    @app.delete("/_admin/stats")
    async def reset_stats() -> Response:
        stats.reset()
        return _json(200, stats.snapshot())


# ------------------------------------------------------------------ running it


def serve_model(
    host: str = "127.0.0.1",
    port: int = 8091,
    *,
    model_name: str = "kfre-4var",
    model_version: str = "1.0.0",
    latency: Latency | None = None,
) -> None:
    """Serve the sandbox model with uvicorn until interrupted (blocking)."""
    app = create_model_app(model_name=model_name, model_version=model_version, latency=latency)
    uvicorn.run(app, host=host, port=port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    """``python -m ehrbridge.sandbox.model_server``: the model server on its own."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ehrbridge.sandbox.model_server",
        description="The sandbox's KFRE model server alone (Open Inference Protocol v2): "
        "POST /v2/models/kfre-4var/infer and /v2/models/kfre-8var/infer. "
        "Point a site's model.url at it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8091, help="port to listen on")
    parser.add_argument("--model-name", default="kfre-4var", help="the model's name in URLs")
    parser.add_argument("--model-version", default="1.0.0", help="the version it reports")
    add_latency_arguments(parser)
    args = parser.parse_args(argv)
    serve_model(
        args.host,
        args.port,
        model_name=args.model_name,
        model_version=args.model_version,
        latency=latency_from(args),
    )


def add_latency_arguments(parser: Any) -> None:
    """``--latency-ms`` and ``--row-latency-ms`` on an argparse parser (a slow endpoint)."""
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="answer each infer call this much later"
    )
    parser.add_argument(
        "--row-latency-ms", type=float, default=0.0, help="...and this much more per row"
    )


def latency_from(args: Any) -> Latency:
    """The Latency that ``add_latency_arguments``' options ask for."""
    return Latency(args.latency_ms / 1000, args.row_latency_ms / 1000)


if __name__ == "__main__":
    main()


__all__ = [
    "DEFAULT_CALIBRATION",
    "INPUTS",
    "KFRE8_INPUTS",
    "OUTPUTS",
    "FaultAction",
    "FaultInjector",
    "FaultSpec",
    "InferRequest",
    "InferRequestError",
    "Latency",
    "ServedModel",
    "ServerStats",
    "TensorSpec",
    "create_model_app",
    "parse_infer_request",
    "serve_model",
]
