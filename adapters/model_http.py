"""What every model-protocol adapter shares: endpoint settings, auth, batching, errors.

One adapter per protocol sits beside this file (``oip_v2``, ``mlflow_scoring``,
``kserve_v1``, ``ubiops``). Each turns a :class:`FeatureBatch` into that
protocol's HTTP request and its answer into a :class:`ModelAnswer`; this module
does the rest the same way for all of them:

* **Timeouts** -- one ``timeout_s`` for connect, write, read and pool.
* **Batching** -- a batch larger than ``max_batch_rows`` is split into several
  requests (in order); the answers are joined, so callers never see the limit.
* **Auth** -- a token from an environment variable or a file (never the YAML),
  sent as ``Authorization: <scheme> <token>``; after a 401 the token is read
  again once (a rotated file is picked up) and the request repeated.
* **Capped answers** -- a body above ``max_response_bytes`` is refused unread.

Third-party errors are translated here, at the boundary, into the project's
exception tree (``ehrbridge.core.errors``)::

    UpstreamUnavailable (retried)   connection refused/reset, timeout, 408, 425,
                                    429, 5xx
    RemoteRejected (dead-lettered)  401/403 reason ``model.unauthorized``;
                                    other 4xx ``model.rejected``; an answer that
                                    is not the protocol ``model.bad_response``
    ConfigError                     the token's variable or file is empty/missing

Messages name the protocol, status and field; never a feature value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ehrbridge.adapters.smart_auth import read_secret
from ehrbridge.core.errors import RemoteRejected, UpstreamUnavailable

__all__ = [
    "FeatureBatch",
    "HttpModelClient",
    "ModelAnswer",
    "ModelAuth",
    "ModelEndpointSettings",
    "join_answers",
    "rows_of",
]

_RETRYABLE_4XX = frozenset({408, 425, 429})
_BODY_KEPT = 4096  # bytes of a refusal kept for the dead-letter record


class ModelAuth(BaseModel):
    """A static token from an environment variable or a file, never inline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_env: str | None = None
    token_file: Path | None = None
    scheme: str = Field("Bearer", min_length=1)  # UbiOps uses "Token"

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("give exactly one of 'token_env' or 'token_file'")
        return self

    def header(self) -> str:
        token = read_secret(self.token_env, self.token_file, "the model token", "model.auth")
        # A token copied with its scheme ("Token abc") is sent as it is.
        if token.split(" ", 1)[0].lower() == self.scheme.lower() and " " in token:
            return token
        return f"{self.scheme} {token}"


class ModelEndpointSettings(BaseModel):
    """Where and how to call one model, whatever its protocol."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(..., min_length=1)  # base URL, without the protocol's path
    model: str = Field(..., min_length=1)  # model (OIP, KServe) or deployment (UbiOps) name
    version: str | None = None
    timeout_s: float = Field(2.0, gt=0, le=3600)
    max_batch_rows: int = Field(64, ge=1, le=100_000)
    max_response_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    auth: ModelAuth | None = None


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """Rows of numeric features, columns in the order the model was trained on."""

    columns: tuple[str, ...]
    rows: Sequence[Sequence[float]]
    parameters: Mapping[str, Any] = field(default_factory=dict)  # protocol-level options

    def __post_init__(self) -> None:
        width = len(self.columns)
        for index, row in enumerate(self.rows):
            if len(row) != width:
                raise ValueError(f"row {index} has {len(row)} values for {width} columns")

    def chunks(self, size: int) -> Iterator[FeatureBatch]:
        for start in range(0, len(self.rows), size):
            yield FeatureBatch(self.columns, self.rows[start : start + size], self.parameters)


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """Each output as rows: N rows of K numbers (K = 1 for a scalar output)."""

    model_name: str
    model_version: str
    outputs: Mapping[str, list[list[float]]]

    def column(self, output: str, index: int = 0) -> list[float]:
        """One column of an output, e.g. ``column("predict_proba", 1)`` for P(class 1)."""
        return [row[index] for row in self.outputs[output]]


def rows_of(values: object, expected: int, what: str) -> list[list[float]]:
    """``[N]`` numbers or ``[N][K]`` nested numbers as N rows of K finite floats."""
    if not isinstance(values, list) or len(values) != expected:
        count = len(values) if isinstance(values, list) else "no"
        raise ValueError(f"{what}: {count} rows for {expected} inputs")
    rows = [item if isinstance(item, list) else [item] for item in values]
    return [[_finite(value, what) for value in row] for row in rows]


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what}: a value is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what}: a value is not finite")
    return number


def join_answers(answers: Sequence[ModelAnswer]) -> ModelAnswer:
    """The answers to consecutive chunks of one batch, as one answer."""
    first = answers[0]
    outputs = {name: [row for a in answers for row in a.outputs[name]] for name in first.outputs}
    return ModelAnswer(first.model_name, first.model_version, outputs)


class HttpModelClient:
    """Base of the protocol adapters. Subclasses give :meth:`_request` and :meth:`_answer`."""

    protocol = "model"

    def __init__(
        self, settings: ModelEndpointSettings, *, client: httpx.Client | None = None
    ) -> None:
        self.settings = settings
        self._client = client or httpx.Client(timeout=settings.timeout_s)
        self._authorization = settings.auth.header() if settings.auth else None

    def predict(self, batch: FeatureBatch) -> ModelAnswer:
        """The model's outputs for every row, in order, in as many calls as the limit needs."""
        if not batch.rows:
            raise ValueError("an empty batch has no prediction")
        answers = []
        for chunk in batch.chunks(self.settings.max_batch_rows):
            path, body = self._request(chunk)
            document = self._post(path, body)
            answers.append(self._checked(document, len(chunk.rows)))
        return join_answers(answers)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------- per protocol

    def _request(self, chunk: FeatureBatch) -> tuple[str, object]:
        """The path below ``settings.url`` and the JSON body for one chunk."""
        raise NotImplementedError

    def _answer(self, document: Any, rows: int) -> ModelAnswer:
        """The protocol's answer as a ModelAnswer; raise ValueError if it is not one."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared

    def _checked(self, document: Any, rows: int) -> ModelAnswer:
        try:
            return self._answer(document, rows)
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteRejected(
                f"{self.protocol} answer is not a prediction: {exc}",
                reason="model.bad_response",
            ) from exc

    def _post(self, path: str, body: object) -> Any:
        url = self.settings.url.rstrip("/") + path
        content = orjson.dumps(body)
        status, raw = self._send(url, content)
        if status == 401 and self.settings.auth is not None:
            self._authorization = self.settings.auth.header()  # a rotated token
            status, raw = self._send(url, content)
        self._raise_for_status(status, raw)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RemoteRejected(
                f"{self.protocol} answer is not JSON",
                reason="model.bad_response",
                status=status,
                body=raw[:_BODY_KEPT],
            ) from exc

    def _send(self, url: str, content: bytes) -> tuple[int, bytes]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self._authorization is not None:
            headers["authorization"] = self._authorization
        try:
            with self._client.stream("POST", url, content=content, headers=headers) as response:
                return response.status_code, self._read_capped(response)
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable(
                f"{self.protocol} server timed out after {self.settings.timeout_s}s"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(
                f"{self.protocol} server unreachable: {type(exc).__name__}"
            ) from exc

    def _read_capped(self, response: httpx.Response) -> bytes:
        limit = self.settings.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RemoteRejected(
                f"{self.protocol} answer of {declared} bytes exceeds {limit}",
                reason="model.bad_response",
                status=response.status_code,
            )
        received = bytearray()
        for piece in response.iter_bytes():
            received += piece
            if len(received) > limit:
                raise RemoteRejected(
                    f"{self.protocol} answer exceeds {limit} bytes",
                    reason="model.bad_response",
                    status=response.status_code,
                )
        return bytes(received)

    def _raise_for_status(self, status: int, raw: bytes) -> None:
        if status < 400:
            return
        if status >= 500 or status in _RETRYABLE_4XX:
            raise UpstreamUnavailable(f"{self.protocol} server answered {status}")
        reason = "model.unauthorized" if status in (401, 403) else "model.rejected"
        raise RemoteRejected(
            f"{self.protocol} server refused the request ({status})",
            reason=reason,
            status=status,
            body=raw[:_BODY_KEPT],
        )
