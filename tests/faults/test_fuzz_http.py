"""The HTTP fuzzer in CI: hostile requests to every route that takes a body (issue 10).

Valid FHIR input (a resource, a transaction, a batch, a Subscription
notification) and a valid CDS Hooks request are mutated by hypothesis, as the
MLLP fuzzer mutates frames: values replaced by JSON of any shape, keys
dropped or repeated, resource types swapped, nesting 200 to 100,000 deep,
``NaN``/``Infinity``/``1e400``/5,000-digit numbers, invalid UTF-8 and lone
surrogates, truncation, bit flips, bodies over the site's limit (declared and
chunked), every kind of content type. The query-parameter routes (``/api``)
are fuzzed from the OpenAPI document by ``tests/facade/test_api_schema.py``.

Asserted per request, on real sockets against the sandbox's FHIR site:

* an answer within :data:`ANSWER_BOUND_S`, never a 5xx;
* the route's contract: FHIR routes answer ``application/fhir+json`` with an
  OperationOutcome (or the posted resource, or a response Bundle); CDS Hooks
  answers JSON, ``{"error": ...}`` when it refuses;
* every refused FHIR input (400, 413, 422, and each refused batch entry) has a
  dead-letter record with its raw bytes (a 413: its first bytes) and a reason,
  never ``internal``; 401/403/404/405/415 are refused unread, before the body.

And for the whole run: no traceback logged, and a valid resource afterwards is
stored (201). The seed is printed; ``EHRBRIDGE_HTTP_FUZZ_SEED=S`` replays a run,
``EHRBRIDGE_HTTP_FUZZ_EXAMPLES=N`` makes it longer (``scripts/fuzz --http``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from auth_tokens import cds_headers, headers
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ehrbridge.config import SiteConfig
from ehrbridge.runtime import SiteRuntime
from ehrbridge.sandbox.run import BackgroundSandbox

EXAMPLES = int(os.environ.get("EHRBRIDGE_HTTP_FUZZ_EXAMPLES", "600"))
SEED = int(os.environ.get("EHRBRIDGE_HTTP_FUZZ_SEED") or random.SystemRandom().randrange(10**9))
LIMIT = 262_144  # http.max_body_bytes and cds_hooks.max_body_bytes here: oversize stays cheap
ANSWER_BOUND_S = 10.0  # every answer, under a loaded 2-core CI machine
FHIR_JSON = "application/fhir+json"
MRN_SYSTEM = "http://hospital.smarthealthit.org"  # sandbox/site-fhir.yaml's patient system
KNOWN_SUBSCRIPTION = "Subscription/sandbox-labs"  # sandbox/site-fhir.yaml subscriptions.known
HOOK = "/cds-services/kfre-patient-view"
DEAD_LETTERED = frozenset({400, 413, 422})


def small_limits(config: SiteConfig) -> SiteConfig:
    return config.model_copy(
        update={
            "http": config.http.model_copy(update={"max_body_bytes": LIMIT}),
            "cds_hooks": config.cds_hooks.model_copy(update={"max_body_bytes": LIMIT}),
        }
    )


class Tracebacks(logging.Handler):
    """Every log record that carries an exception: a crash somewhere behind an answer."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append(f"{record.name}: {record.getMessage()[:200]}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    data_dir = tmp_path_factory.mktemp("fuzz-http")
    with BackgroundSandbox(data_dir, configure_fhir_site=small_limits) as running:
        yield running


@pytest.fixture(scope="module")
def tracebacks() -> Iterator[Tracebacks]:
    handler = Tracebacks()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn.error")]  # uvicorn's: no propagation
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------- valid input


def patient(mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"p-{mrn}",
        "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
        "gender": "female",
        "birthDate": "1958-03-14",
    }


def lab(code: str, value: float, unit: str, subject: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o-{code}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": subject,
        "effectiveDateTime": "2026-01-05T09:00:00+00:00",
        "issued": "2026-01-05T10:00:00+00:00",
        "valueQuantity": {
            "value": value,
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    }


def bundle(kind: str) -> dict[str, Any]:
    subject = {"reference": "urn:uuid:0b7e4c9e-2d7f-4b55-a3f4-3c2c1e9f0001"}
    resources = [
        patient("FUZZ-1"),
        lab("33914-3", 24.0, "mL/min/{1.73_m2}", subject),
        lab("14959-1", 510.0, "mg/g", subject),
    ]
    entries = []
    for n, resource in enumerate(resources, start=1):
        entry: dict[str, Any] = {
            "fullUrl": f"urn:uuid:0b7e4c9e-2d7f-4b55-a3f4-3c2c1e9f000{n}",
            "resource": resource,
        }
        if kind != "collection":
            entry["request"] = {"method": "POST", "url": resource["resourceType"]}
        entries.append(entry)
    return {"resourceType": "Bundle", "id": f"fuzz-{kind}", "type": kind, "entry": entries}


def notification() -> dict[str, Any]:
    """An R4 Backport full-resource event notification from the site's known Subscription."""
    status = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": KNOWN_SUBSCRIPTION}},
            {"name": "topic", "valueCanonical": "http://example.org/topics/labs"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": "1"},
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": "1"},
                    {"name": "focus", "valueReference": {"reference": "Observation/o-33914-3"}},
                ],
            },
        ],
    }
    observation = lab("33914-3", 24.0, "mL/min/{1.73_m2}", {"reference": "Patient/p-FUZZ-1"})
    return {
        "resourceType": "Bundle",
        "id": "fuzz-notification",
        "type": "history",
        "timestamp": "2026-01-05T10:00:00+00:00",
        "entry": [
            {"fullUrl": "urn:uuid:5a4c1a7e-0000-4000-8000-000000000001", "resource": status},
            {
                "fullUrl": "http://127.0.0.1/fhir/Observation/o-33914-3",
                "resource": observation,
                "request": {"method": "POST", "url": "Observation"},
                "response": {"status": "201"},
            },
        ],
    }


def id_only_notification() -> dict[str, Any]:
    """The same event, id-only: the site reads the focus from the EHR (the sandbox's)."""
    doc = notification()
    doc["entry"][1].pop("resource")
    doc["entry"][1]["fullUrl"] = "Observation/o-33914-3"
    return doc


def handshake() -> dict[str, Any]:
    doc = notification()
    status = doc["entry"][0]["resource"]
    status["parameter"] = status["parameter"][:5]
    status["parameter"][3]["valueCode"] = "handshake"
    status["parameter"][4]["valueString"] = "0"
    doc["entry"] = doc["entry"][:1]
    return doc


def hook_request() -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/1", "patientId": "p-FUZZ-1"},
        "prefetch": {"patient": patient("FUZZ-1")},
    }


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    seed: Callable[[], dict[str, Any]]

    @property
    def fhir(self) -> bool:
        return self.path.startswith("/fhir")


ROUTES = [
    Route("POST", "/fhir", lambda: bundle("transaction")),
    Route("POST", "/fhir", lambda: bundle("batch")),
    Route("POST", "/fhir", lambda: bundle("collection")),
    Route("POST", "/fhir/Bundle", lambda: bundle("transaction")),
    Route("POST", "/fhir/Observation", lambda: bundle("collection")["entry"][1]["resource"]),
    Route("POST", "/fhir/Patient", lambda: patient("FUZZ-2")),
    Route("PUT", "/fhir/Patient/p-FUZZ-2", lambda: patient("FUZZ-2")),
    Route("POST", "/fhir/subscription-notification", notification),
    Route("POST", "/fhir/subscription-notification", id_only_notification),
    Route("POST", "/fhir/subscription-notification", handshake),
    Route("POST", HOOK, hook_request),
    Route("POST", f"{HOOK}/feedback", lambda: {"feedback": [{"card": "x", "outcome": "accepted"}]}),
]


# --------------------------------------------------------------------------- mutations

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # orjson writes 64 bits; longer ones: BAD_TOKENS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)
# Tokens JSON has no room for, or numbers at the edge of every parser.
BAD_TOKENS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"1" + b"0" * 5000,
    b"18446744073709551616",
    b"-9223372036854775809",
    b"0.1e99999999999",
    b"-0",
    b'"\\ud800"',
    b'"\\u0000"',
    b"undefined",
    b"'single'",
]
BAD_BYTES = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\xc0\xaf"]
RESOURCE_TYPES = ["Bundle", "Observation", "Patient", "Parameters", "Claim", "Foo", "", "patient"]
TAKEN_TYPES = [FHIR_JSON, "application/json", f"{FHIR_JSON}; charset=utf-8"]
CONTENT_TYPES = [
    f"{FHIR_JSON}; charset=latin-1",
    "application/json+fhir",
    None,
    "",
    "text/plain",
    "application/xml",
    "application/fhir+xml",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    ";;;==",
    "application/fhir+json\x7f",
]


def paths_of(doc: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in ``doc`` (the seeds are small: no depth concern)."""
    found = [here]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += paths_of(value, (*here, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += paths_of(value, (*here, index))
    return found


def put(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


MARK = "\x00fuzz-mark\x00"
MARK_JSON = orjson.dumps(MARK)


def with_raw(doc: Any, path: tuple[Any, ...], raw: bytes) -> bytes:
    """``doc`` as JSON with the value at ``path`` replaced by ``raw`` bytes, as they are."""
    return orjson.dumps(put(doc, path, MARK)).replace(MARK_JSON, raw, 1)


@st.composite
def hostile_body(draw: st.DrawFn, route: Route) -> bytes:
    doc = route.seed()
    paths = paths_of(doc)
    path = draw(st.sampled_from(paths))
    how = draw(
        st.sampled_from(
            [
                "value",
                "value",
                "drop",
                "type",
                "deep",
                "token",
                "bad-bytes",
                "duplicate-key",
                "truncate",
                "flip",
                "oversize",
                "scalar",
                "valid",
            ]
        )
    )
    if how == "value":
        return orjson.dumps(put(doc, path, draw(JSON_VALUES)))
    if how == "drop" and path:
        return orjson.dumps(put(doc, path[:-1], _without(_at(doc, path[:-1]), path[-1])))
    if how == "type":
        named = [p for p in paths if p and p[-1] == "resourceType"] or [("resourceType",)]
        where = draw(st.sampled_from(named))
        return orjson.dumps(put(doc, where, draw(st.sampled_from(RESOURCE_TYPES) | JSON_VALUES)))
    if how == "deep":
        depth = draw(st.sampled_from([64, 200, 254, 255, 300, 1023, 1024, 1025, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return with_raw(doc, path, opener * depth + b"1" * (opener == b"[") + closer * depth)
    if how == "token":
        return with_raw(doc, path, draw(st.sampled_from(BAD_TOKENS)))
    if how == "bad-bytes":
        text = orjson.dumps(doc)
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from(BAD_BYTES)) + text[at:]
    if how == "duplicate-key":
        key = draw(st.sampled_from(["resourceType", "type", "id", "entry", "hook", "status"]))
        value = orjson.dumps(draw(st.sampled_from(RESOURCE_TYPES) | JSON_VALUES))
        return b"{" + orjson.dumps(key) + b":" + value + b"," + orjson.dumps(doc)[1:]
    if how == "truncate":
        text = orjson.dumps(doc)
        return text[: draw(st.integers(0, len(text) - 1))]
    if how == "flip":
        text = bytearray(orjson.dumps(doc))
        for _ in range(draw(st.integers(1, 8))):
            text[draw(st.integers(0, len(text) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(text)
    if how == "oversize":
        return with_raw(doc, path, orjson.dumps("x" * draw(st.sampled_from([LIMIT, 4 * LIMIT]))))
    if how == "scalar":
        return draw(st.sampled_from([b"", b" ", b"null", b"[]", b"{}", b'"x"', b"0", b"[{}]"]))
    return orjson.dumps(doc)


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _without(container: Any, key: Any) -> Any:
    if isinstance(container, dict):
        return {k: v for k, v in container.items() if k != key}
    return [v for i, v in enumerate(container) if i != key]


class Request:
    def __init__(self, route: Route, body: bytes, content_type: str | None, chunked: bool) -> None:
        self.route = route
        self.body = body
        self.content_type = content_type
        self.chunked = chunked  # no Content-Length: the body streams in, counted as it comes

    def __repr__(self) -> str:  # what hypothesis prints for a failure: short, replayable
        shown = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return (
            f"Request({self.route.method} {self.route.path}, ct={self.content_type!r}, "
            f"chunked={self.chunked}, {len(self.body)} bytes: {shown!r})"
        )


@st.composite
def hostile_request(draw: st.DrawFn) -> Request:
    route = draw(st.sampled_from(ROUTES))
    return Request(
        route,
        draw(hostile_body(route)),
        draw(st.sampled_from(TAKEN_TYPES) | st.sampled_from(CONTENT_TYPES)),
        draw(st.booleans()),
    )


# --------------------------------------------------------------------------- the checks


def fhir_runtime(site: BackgroundSandbox) -> SiteRuntime:
    runtime = site.sandbox.fhir_runtime
    assert runtime is not None
    return runtime


def dead_letters_after(runtime: SiteRuntime, offset: int) -> list[Any]:
    return list(runtime.log.read(runtime.topic("dlq"), after=offset, limit=100_000))


def last_offset(runtime: SiteRuntime) -> int:
    records = dead_letters_after(runtime, -1)
    return records[-1].offset if records else -1


def send(client: httpx.Client, site: BackgroundSandbox, request: Request) -> httpx.Response:
    api = site.sandbox.fhir_site_url
    route = request.route
    auth = headers(site, "sender") if route.fhir else cds_headers(site, api)
    sent = {**auth}
    if request.content_type is not None:
        sent["content-type"] = request.content_type
    body = request.body
    content: bytes | Iterator[bytes] = (
        iter([body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""])
        if request.chunked
        else body
    )
    return client.request(route.method, api + route.path, content=content, headers=sent)


def check_contract(request: Request, response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code in (201, 200) and not response.content:
        return  # Prefer: return=minimal, or CDS feedback taken
    answer = response.json()
    if request.route.fhir:
        assert response.headers["content-type"].startswith(FHIR_JSON)
        if response.status_code >= 400:
            assert answer["resourceType"] == "OperationOutcome", answer
            assert answer["issue"] and all(i["severity"] == "error" for i in answer["issue"])
        else:
            # Prefer: return=representation (the default) echoes the body as sent.
            assert response.content == request.body or answer["resourceType"] in (
                "OperationOutcome",
                "Bundle",
            )
    else:
        assert response.headers["content-type"].startswith("application/json")
        if response.status_code >= 400:
            assert isinstance(answer["error"], str) and answer["error"]
        elif request.route.path == HOOK:
            assert isinstance(answer["cards"], list)


def refused_entries(response: httpx.Response) -> int:
    """How many entries of a batch-response were refused (each one a dead letter)."""
    answer = response.json()
    if answer.get("type") != "batch-response":
        return 0
    return sum(1 for e in answer["entry"] if e["response"]["status"][:3] in ("400", "422"))


def check_dead_letters(request: Request, response: httpx.Response, letters: list[Any]) -> None:
    ours = [r for r in letters if r.headers.get("error.stage", "ingest") == "ingest"]
    reasons = [r.headers.get("error.reason") for r in ours]
    assert "internal" not in reasons, reasons
    status = response.status_code
    if not request.route.fhir:
        return
    if status in DEAD_LETTERED:
        kept = [r for r in ours if request.body.startswith(r.value)]
        if status != 413:
            kept = [r for r in kept if r.value == request.body]
        assert len(kept) == 1, (status, reasons, [len(r.value) for r in ours])
        assert kept[0].headers.get("error.reason"), kept[0].headers
    elif status == 200 and response.content:
        assert len(ours) >= refused_entries(response), (reasons, response.text[:300])
    else:
        assert not ours, (status, reasons)


def test_every_hostile_request_gets_a_well_formed_answer_and_every_refusal_a_dead_letter(
    site: BackgroundSandbox, tracebacks: Tracebacks
) -> None:
    print(f"\nHTTP fuzz seed {SEED}: replay with EHRBRIDGE_HTTP_FUZZ_SEED={SEED}")
    runtime = fhir_runtime(site)
    statuses: dict[int, int] = {}
    slowest = 0.0
    with httpx.Client(timeout=ANSWER_BOUND_S * 3) as client:

        @seed(SEED)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=hostile_request())
        def answered_well(request: Request) -> None:
            nonlocal slowest
            before = last_offset(runtime)
            started = time.perf_counter()
            response = send(client, site, request)
            elapsed = time.perf_counter() - started
            slowest = max(slowest, elapsed)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert elapsed < ANSWER_BOUND_S, f"{elapsed:.1f}s"
            check_contract(request, response)
            check_dead_letters(request, response, dead_letters_after(runtime, before))

        answered_well()
    print(
        f"HTTP fuzz: {sum(statuses.values())} requests, {dict(sorted(statuses.items()))}, "
        f"slowest answer {slowest:.2f}s"
    )
    assert not tracebacks.seen, tracebacks.seen[:5]
    assert {400, 413} <= statuses.keys(), statuses  # the mutations reach the refusals
    assert statuses.keys() & {200, 201}, statuses  # ... and input that is taken


def test_a_valid_resource_afterwards_is_stored(site: BackgroundSandbox) -> None:
    response = httpx.post(
        f"{site.sandbox.fhir_site_url}/fhir/Patient",
        content=orjson.dumps(patient("FUZZ-AFTER")),
        headers={"content-type": FHIR_JSON, **headers(site, "sender")},
        timeout=30,
    )
    assert response.status_code == 201, response.text
