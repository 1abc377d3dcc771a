"""One contract, every Sink: memory, FHIR (the stand-in, and httpx.MockTransport), HL7v2-MLLP.

The Sink contract (``core/contracts.py``), case by case:

* ``write`` returns only once every item is at the destination;
* a later write of the same record supersedes the earlier one, also inside
  one batch (the destination holds the newest version);
* writing again is harmless (at-least-once): a replay adds no new identity
  at the destination, so the receiver can de-duplicate or upsert;
* a failure names what failed: a batch of one raises the item's own error,
  a larger batch a :class:`BatchError` naming only the failed items; the
  others are written;
* transient (destination down, slow, overloaded) is a :class:`TransientError`
  and nothing is lost: writing the failed items again delivers them;
* permanent (the destination refuses this item for good, or the item cannot
  be encoded) is a :class:`PermanentError` for that item alone;
* no third-party exception leaks: everything raised is an ``EhrbridgeError``;
* inside the write-back wrappers (RetryingSink, then DeadLetteringSink) what
  did not arrive comes back as data, by batch index, and nothing is lost;
* ``close`` releases the connection; a new sink (a restart) writes on, and
  closing twice is harmless; an empty batch sends nothing.

Each implementation gets a *bed*: its sink, a way to build record ``n`` in
version ``v``, a way to read back what the destination holds, and scripted
outages and refusals. The FHIR stand-in and the MLLP peer are real servers
on real sockets; the MockTransport bed is the unit-level double.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import httpx
import orjson
import pytest
from predictions import prediction

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.fhir_sink import FhirSink
from ehrbridge.adapters.memory import MemorySink
from ehrbridge.adapters.mllp_sink import MllpSink
from ehrbridge.config import Hl7v2Writeback, RetryPolicy, SiteConfig, load_site_config
from ehrbridge.core.contracts import CONTROL_ID_HEADER, BatchError, Envelope, Kind, Sink
from ehrbridge.core.errors import (
    EhrbridgeError,
    PermanentError,
    RemoteRejected,
    TransientError,
    UpstreamUnavailable,
)
from ehrbridge.pipelines.oru import build_oru
from ehrbridge.pipelines.provenance import result_transaction
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.retry import DeadLetteringSink, RetryingSink
from ehrbridge.sandbox.fhir_server import create_fhir_app
from ehrbridge.sandbox.mllp_peer import MllpPeer
from ehrbridge.sandbox.run import sandbox_site_file

CONFIG: SiteConfig = load_site_config(sandbox_site_file())
ORU_TARGET = Hl7v2Writeback(host="127.0.0.1", port=1, receiving_application="EHR")
ORU_CONFIG = CONFIG.model_copy(
    update={"writeback": CONFIG.writeback.model_copy(update={"hl7v2": ORU_TARGET})}
)


def result(n: int, version: int) -> Prediction:
    """Result ``n`` (patient MRN-n, one episode), its risk telling the version apart."""
    return prediction(CONFIG, f"MRN-{n}", risk_2y=0.10 + version / 100)


def version_of_risk(percent: float) -> int:
    return round(percent - 10.0)


class SinkBed(Protocol):
    def sink(self) -> Sink: ...

    def record(self, n: int, version: int = 0) -> Envelope: ...

    def delivered(self) -> dict[int, int]:
        """Record number -> the version the destination holds now."""
        ...

    def identities(self) -> set[str]:
        """What the destination would de-duplicate on, one per distinct record version."""
        ...

    def outage(self, exchanges: int) -> None:
        """The destination fails the next ``exchanges`` requests/messages transiently."""
        ...

    def refusing(self, n: int) -> Envelope:
        """Record ``n`` in a form the destination refuses for good."""
        ...

    def malformed(self) -> Envelope | None:
        """A record this sink cannot encode at all (None: every record can be)."""
        ...


# ------------------------------------------------------------------------ memory


class MemoryBed:
    def __init__(self) -> None:
        self.target = MemorySink()
        self.refused: set[str] = set()
        self.target.refuse = self._refusal
        self.pending_outages = 0

    def _refusal(self, envelope: Envelope) -> EhrbridgeError | None:
        if envelope.source_id in self.refused:
            return PermanentError("refused by the test", reason="memory.refused")
        return None

    def sink(self) -> Sink:
        return self.target  # memory outlives its clients, as a destination does

    def record(self, n: int, version: int = 0) -> Envelope:
        return Envelope("t", f"R{n}", f"{n}:{version}".encode(), Kind.PREDICTION, f"MRN-{n}")

    def delivered(self) -> dict[int, int]:
        pairs = (e.payload.decode().split(":") for e in self.target.written)
        return {int(n): int(v) for n, v in pairs}

    def identities(self) -> set[str]:
        return {f"{e.source_id}/{e.payload.decode()}" for e in self.target.written}

    def outage(self, exchanges: int) -> None:
        self.target.fail_next(UpstreamUnavailable("down (test)") for _ in range(exchanges))

    def refusing(self, n: int) -> Envelope:
        envelope = self.record(n)
        self.refused.add(envelope.source_id)
        return envelope

    def malformed(self) -> Envelope | None:
        return None


# -------------------------------------------------------------------------- FHIR


def fhir_envelope(n: int, version: int) -> Envelope:
    bundle = result_transaction(result(n, version), CONFIG)
    return Envelope(CONFIG.site, f"R{n}", orjson.dumps(bundle), Kind.FHIR, f"MRN-{n}")


def fhir_refusing(n: int) -> Envelope:
    bundle = result_transaction(result(n, 0), CONFIG)
    observation = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    observation["resource"]["status"] = "not-a-status"  # invalid code: a 4xx for good
    return Envelope(CONFIG.site, f"R{n}", orjson.dumps(bundle), Kind.FHIR, f"MRN-{n}")


def observations_by_patient(observations: list[dict[str, Any]]) -> dict[int, int]:
    held = {}
    for observation in observations:
        patient = observation["subject"]["identifier"]["value"]
        risk_2y = observation["component"][0]["valueQuantity"]["value"]
        held[int(patient.removeprefix("MRN-"))] = version_of_risk(risk_2y)
    return held


class FhirStandInBed:
    """The sandbox's FHIR server over real HTTP; faults through its admin routes."""

    def __init__(self, server: ThreadedServer) -> None:
        self.base = server.base_url
        self.opened: list[FhirSink] = []

    def sink(self) -> Sink:
        self.opened.append(FhirSink(f"{self.base}/fhir", timeout_s=5.0))
        return self.opened[-1]

    def record(self, n: int, version: int = 0) -> Envelope:
        return fhir_envelope(n, version)

    def _observations(self) -> list[dict[str, Any]]:
        bundle = httpx.get(f"{self.base}/fhir/Observation", params={"_count": 1000}).json()
        return [entry["resource"] for entry in bundle.get("entry", [])]

    def delivered(self) -> dict[int, int]:
        return observations_by_patient(self._observations())

    def identities(self) -> set[str]:
        return {o["identifier"][0]["value"] for o in self._observations()}

    def outage(self, exchanges: int) -> None:
        faults = {"status": 503, "count": exchanges}
        httpx.post(f"{self.base}/_admin/faults", json=faults).raise_for_status()

    def refusing(self, n: int) -> Envelope:
        return fhir_refusing(n)

    def malformed(self) -> Envelope | None:
        return Envelope(CONFIG.site, "bad", b"{not json", Kind.FHIR, "MRN-x")


class TransactionDouble:
    """A FHIR server's transaction endpoint in a MockTransport handler.

    It keeps each conditional update's resource by its URL (an upsert, as a
    server does), answers one ``transaction-response`` entry per entry, 422
    for an invalid Observation status, and plays scripted faults first.
    """

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.faults: list[Callable[[httpx.Request], httpx.Response]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.faults:
            return self.faults.pop(0)(request)
        bundle = orjson.loads(request.content)
        entries = bundle["entry"]
        if any(e["resource"].get("status") == "not-a-status" for e in entries):
            outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "status"}]}
            return httpx.Response(422, json=outcome)
        for entry in entries:
            if entry["request"]["method"] == "PUT":
                self.resources[entry["request"]["url"]] = entry["resource"]
        answers = [{"response": {"status": "200 OK"}} for _ in entries]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        )


def unavailable(_: httpx.Request) -> httpx.Response:
    return httpx.Response(503)


class FhirMockBed:
    def __init__(self) -> None:
        self.double = TransactionDouble()

    def sink(self) -> Sink:
        client = httpx.Client(transport=httpx.MockTransport(self.double))
        return FhirSink("https://ehr.test/fhir", client=client)

    def record(self, n: int, version: int = 0) -> Envelope:
        return fhir_envelope(n, version)

    def _observations(self) -> list[dict[str, Any]]:
        return [r for r in self.double.resources.values() if r["resourceType"] == "Observation"]

    def delivered(self) -> dict[int, int]:
        return observations_by_patient(self._observations())

    def identities(self) -> set[str]:
        return {o["identifier"][0]["value"] for o in self._observations()}

    def outage(self, exchanges: int) -> None:
        self.double.faults.extend(unavailable for _ in range(exchanges))

    def refusing(self, n: int) -> Envelope:
        return fhir_refusing(n)

    def malformed(self) -> Envelope | None:
        return Envelope(CONFIG.site, "bad", b"{not json", Kind.FHIR, "MRN-x")


# -------------------------------------------------------------------------- MLLP


class PeerThread:
    """An :class:`MllpPeer` on its own event loop thread (the sink is synchronous)."""

    def __init__(self, peer: MllpPeer) -> None:
        self.peer = peer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> MllpPeer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.start(), self.loop).result(10)
        return self.peer

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.peer.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class MllpBed:
    """The sandbox's MLLP peer on a real socket: AA, AE for refused records, or silence."""

    def __init__(self) -> None:
        self.versions: dict[str, tuple[int, int]] = {}  # MSH-10 -> (record, version)
        self.refused: set[str] = set()
        self.silences = 0
        self.peer = MllpPeer(answer=self._answer)
        self.opened: list[MllpSink] = []

    def _answer(self, message: bytes) -> str | None:
        control_id = message.split(b"\r", 1)[0].split(b"|")[9].decode()
        if self.silences:
            self.silences -= 1
            return None  # no ACK: the sender times out
        return "AE" if control_id in self.refused else "AA"

    def sink(self) -> Sink:
        target = Hl7v2Writeback(host="127.0.0.1", port=self.peer.port, ack_timeout_s=0.5, resends=0)
        self.opened.append(MllpSink(target))
        return self.opened[-1]

    def record(self, n: int, version: int = 0) -> Envelope:
        message, control_id = build_oru(result(n, version), ORU_CONFIG)
        self.versions[control_id] = (n, version)
        headers = {CONTROL_ID_HEADER: control_id}
        return Envelope(CONFIG.site, f"R{n}", message, Kind.HL7V2, f"MRN-{n}", headers=headers)

    def delivered(self) -> dict[int, int]:
        return dict(self.versions[r.control_id] for r in self.peer.messages("AA"))

    def identities(self) -> set[str]:
        return {r.control_id for r in self.peer.messages("AA")}

    def outage(self, exchanges: int) -> None:
        self.silences += exchanges

    def refusing(self, n: int) -> Envelope:
        envelope = self.record(n)
        self.refused.add(envelope.headers[CONTROL_ID_HEADER])
        return envelope

    def malformed(self) -> Envelope | None:
        return Envelope(CONFIG.site, "bad", b"MSH|^~\\&|no control id header", Kind.HL7V2, "x")


# ------------------------------------------------------------------- wrappers

FAST = RetryPolicy(attempts=3, initial_backoff_s=0.001, max_backoff_s=0.005, delayed_s=[])


class RetryingBed:
    """A bed's sink inside :class:`RetryingSink`: a wrapper is a Sink and keeps the contract.

    Its outages outlast the in-place budget (``attempts`` exchanges each);
    shorter ones it rides out (the retry cases at the end of this module).
    """

    def __init__(self, inner: MemoryBed | FhirMockBed) -> None:
        self.inner = inner

    def sink(self) -> Sink:
        return RetryingSink(self.inner.sink(), FAST)

    def record(self, n: int, version: int = 0) -> Envelope:
        return self.inner.record(n, version)

    def delivered(self) -> dict[int, int]:
        return self.inner.delivered()

    def identities(self) -> set[str]:
        return self.inner.identities()

    def outage(self, exchanges: int) -> None:
        self.inner.outage(exchanges * FAST.attempts)

    def refusing(self, n: int) -> Envelope:
        return self.inner.refusing(n)

    def malformed(self) -> Envelope | None:
        return self.inner.malformed()


# ---------------------------------------------------------------------- fixtures


SINKS = ["memory", "fhir-standin", "fhir-mock", "hl7v2-mllp", "retrying-memory", "retrying-fhir"]


@pytest.fixture(params=SINKS)
def bed(request: pytest.FixtureRequest) -> Iterator[SinkBed]:
    if request.param == "memory":
        yield MemoryBed()
    elif request.param == "retrying-memory":
        yield RetryingBed(MemoryBed())
    elif request.param == "retrying-fhir":
        yield RetryingBed(FhirMockBed())
    elif request.param == "fhir-mock":
        yield FhirMockBed()
    elif request.param == "fhir-standin":
        with ThreadedServer(create_fhir_app()) as server:
            standin = FhirStandInBed(server)
            yield standin
            for opened in standin.opened:
                opened.close()
    else:
        mllp = MllpBed()
        with PeerThread(mllp.peer):
            yield mllp
            for sent in mllp.opened:
                sent.close()


def failed(error: EhrbridgeError, batch_size: int) -> dict[int, EhrbridgeError]:
    """The items a write's error names: a BatchError's, or else the whole batch."""
    if isinstance(error, BatchError):
        return error.errors
    return dict.fromkeys(range(batch_size), error)


def write_until_written(sink: Sink, batch: list[Envelope], attempts: int = 5) -> int:
    """What a retry wrapper does: write again only what failed transiently; the writes."""
    for attempt in range(1, attempts + 1):
        try:
            sink.write(batch)
            return attempt
        except EhrbridgeError as error:
            errors = failed(error, len(batch))
            assert all(isinstance(e, TransientError) for e in errors.values()), errors
            batch = [batch[i] for i in sorted(errors)]
    raise AssertionError(f"still failing after {attempts} writes")


# ------------------------------------------------------------------------- cases


def test_write_returns_once_every_item_is_at_the_destination(bed: SinkBed) -> None:
    sink = bed.sink()
    sink.write([bed.record(n) for n in range(4)])
    assert bed.delivered() == {0: 0, 1: 0, 2: 0, 3: 0}
    assert isinstance(sink, Sink) and sink.name


def test_a_later_write_supersedes_an_earlier_one(bed: SinkBed) -> None:
    sink = bed.sink()
    sink.write([bed.record(n, version=0) for n in range(3)])
    sink.write([bed.record(n, version=1) for n in range(2)])
    assert bed.delivered() == {0: 1, 1: 1, 2: 0}


def test_inside_one_batch_the_later_version_of_a_record_wins(bed: SinkBed) -> None:
    bed.sink().write([bed.record(0, version=1), bed.record(1), bed.record(0, version=2)])
    assert bed.delivered() == {0: 2, 1: 0}


def test_writing_again_adds_no_new_identity(bed: SinkBed) -> None:
    sink = bed.sink()
    batch = [bed.record(n) for n in range(3)]
    sink.write(batch)
    once = bed.identities()
    sink.write(batch)  # at-least-once: a replay after a crash before the commit
    assert bed.identities() == once and len(once) == 3
    assert bed.delivered() == {0: 0, 1: 0, 2: 0}


def test_a_transient_outage_is_a_transient_error_and_loses_nothing(bed: SinkBed) -> None:
    sink = bed.sink()
    batch = [bed.record(n) for n in range(3)]
    bed.outage(1)
    with pytest.raises(EhrbridgeError) as caught:
        sink.write(batch)
    errors = failed(caught.value, len(batch))
    assert errors and all(isinstance(e, TransientError) for e in errors.values())
    assert write_until_written(sink, [batch[i] for i in sorted(errors)]) == 1
    assert bed.delivered() == {0: 0, 1: 0, 2: 0}


def test_a_batch_of_one_raises_its_own_error(bed: SinkBed) -> None:
    sink = bed.sink()
    bed.outage(1)
    with pytest.raises(TransientError):
        sink.write([bed.record(0)])
    with pytest.raises(PermanentError):
        sink.write([bed.refusing(1)])
    assert bed.delivered() == {}


def test_a_refused_item_fails_alone_for_good(bed: SinkBed) -> None:
    sink = bed.sink()
    batch = [bed.record(0), bed.refusing(1), bed.record(2)]
    with pytest.raises(BatchError) as caught:
        sink.write(batch)
    assert list(caught.value.errors) == [1]
    assert isinstance(caught.value.errors[1], PermanentError)
    assert bed.delivered() == {0: 0, 2: 0}


def test_an_item_that_cannot_be_encoded_is_refused_alone(bed: SinkBed) -> None:
    bad = bed.malformed()
    if bad is None:
        pytest.skip("every record this sink takes can be written")
    sink = bed.sink()
    with pytest.raises(BatchError) as caught:
        sink.write([bed.record(0), bad, bed.record(2)])
    assert list(caught.value.errors) == [1]
    assert isinstance(caught.value.errors[1], PermanentError)
    assert bed.delivered() == {0: 0, 2: 0}


def test_as_write_back_wraps_it_what_did_not_arrive_comes_back_as_data(bed: SinkBed) -> None:
    """The write-back chain: the sink inside RetryingSink inside DeadLetteringSink."""
    sink = DeadLetteringSink(RetryingSink(bed.sink(), FAST))
    errors = sink.write([bed.record(0), bed.refusing(1), bed.record(2)])
    assert list(errors) == [1] and isinstance(errors[1], PermanentError)
    batch = [bed.record(n) for n in (3, 4, 5)]
    bed.outage(len(batch) * FAST.attempts)  # past the budget, a batch or an item an exchange
    errors = sink.write(batch)
    assert errors and all(isinstance(e, TransientError) for e in errors.values())
    pending = [batch[i] for i in sorted(errors)]
    for _ in range(len(batch) * FAST.attempts):  # what the delayed-retry tiers do
        pending = [pending[i] for i in sorted(sink.write(pending))] if pending else []
    assert not pending and bed.delivered() == {0: 0, 2: 0, 3: 0, 4: 0, 5: 0}  # none lost


def test_an_empty_batch_sends_nothing(bed: SinkBed) -> None:
    bed.sink().write([])
    assert bed.delivered() == {}


def test_close_is_idempotent_and_a_new_sink_writes_on(bed: SinkBed) -> None:
    first = bed.sink()
    first.write([bed.record(0)])
    first.close()
    first.close()
    second = bed.sink()  # the restart
    second.write([bed.record(0), bed.record(1)])  # the first item again: harmless
    assert bed.delivered() == {0: 0, 1: 0}
    assert len(bed.identities()) == 2


# ------------------------------------------------ FHIR error translation (MockTransport)


def fail_with(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def answer(status: int, body: bytes = b"", **headers: str) -> Callable[..., httpx.Response]:
    return lambda request: httpx.Response(status, content=body, headers=headers)


def short_answer(request: httpx.Request) -> httpx.Response:
    """200, but one transaction-response entry fewer than the transaction had."""
    entries = orjson.loads(request.content)["entry"][1:]
    body = {"resourceType": "Bundle", "entry": [{"response": {"status": "200"}} for _ in entries]}
    return httpx.Response(200, json=body)


def entry_refused(request: httpx.Request) -> httpx.Response:
    """200, with one entry's status a 4xx (a lenient server's partial answer)."""
    entries = orjson.loads(request.content)["entry"]
    answers = [{"response": {"status": "201 Created"}} for _ in entries]
    answers[-1]["response"]["status"] = "400 Bad Request"
    return httpx.Response(200, json={"resourceType": "Bundle", "entry": answers})


TRANSIENT_ANSWERS = {
    "connect-error": fail_with(httpx.ConnectError("refused")),
    "read-timeout": fail_with(httpx.ReadTimeout("slow")),
    "remote-protocol": fail_with(httpx.RemoteProtocolError("cut off")),
    "500": answer(500),
    "503": answer(503),
    "429": answer(429, **{"retry-after": "1"}),
    "409-concurrent-write": answer(409),
    "401-after-refresh": answer(401),
}
PERMANENT_ANSWERS = {
    "400": answer(400, b'{"resourceType":"OperationOutcome","issue":[]}'),
    "404": answer(404),
    "422": answer(422, b"not even json"),
    "200-not-json": answer(200, b"<html>proxy</html>"),
    "200-json-array": answer(200, b"[]"),
    "200-too-few-entries": short_answer,
    "200-entry-refused": entry_refused,
    "bad-gzip": answer(200, b"definitely not gzip", **{"content-encoding": "gzip"}),
}


@pytest.mark.parametrize("name", TRANSIENT_ANSWERS)
def test_fhir_failures_that_may_pass_are_transient(name: str) -> None:
    bed = FhirMockBed()
    bed.double.faults.append(TRANSIENT_ANSWERS[name])
    with pytest.raises(TransientError) as caught:
        bed.sink().write([bed.record(0)])
    assert caught.value.__cause__ is None or not isinstance(caught.value, httpx.HTTPError)
    assert bed.delivered() == {}


@pytest.mark.parametrize("name", PERMANENT_ANSWERS)
def test_fhir_answers_that_will_not_change_are_permanent(name: str) -> None:
    bed = FhirMockBed()
    bed.double.faults.append(PERMANENT_ANSWERS[name])
    with pytest.raises(PermanentError):
        bed.sink().write([bed.record(0)])


def test_fhir_a_refused_batch_is_sent_again_item_by_item_to_find_the_culprit() -> None:
    bed = FhirMockBed()
    batch = [bed.record(0), bed.refusing(1), bed.record(2)]
    requests = Counter[str]()
    handler = bed.double

    def counting(request: httpx.Request) -> httpx.Response:
        requests[request.method] += 1
        return handler(request)

    client = httpx.Client(transport=httpx.MockTransport(counting))
    sink = FhirSink("https://ehr.test/fhir", client=client)
    with pytest.raises(BatchError) as caught:
        sink.write(batch)
    assert list(caught.value.errors) == [1] and requests["POST"] == 1 + 3
    assert bed.delivered() == {0: 0, 2: 0}


# ------------------------------------------------- RetryingSink inside its budget (memory)


def retrying(memory: MemorySink) -> RetryingSink:
    return RetryingSink(memory, FAST)


def test_retrying_rides_out_an_outage_inside_its_budget() -> None:
    bed = MemoryBed()
    bed.outage(FAST.attempts - 1)
    retrying(bed.target).write([bed.record(n) for n in range(3)])
    assert bed.delivered() == {0: 0, 1: 0, 2: 0} and bed.target.calls == FAST.attempts


def test_retrying_writes_again_only_the_items_that_failed_transiently() -> None:
    bed = MemoryBed()
    flaky = {"R1": 2}  # record 1 fails twice, then passes; record 3 is refused for good
    bed.refused.add("R3")

    def refusal(envelope: Envelope) -> EhrbridgeError | None:
        if flaky.get(envelope.source_id):
            flaky[envelope.source_id] -= 1
            return UpstreamUnavailable("busy (test)")
        return bed._refusal(envelope)

    bed.target.refuse = refusal
    with pytest.raises(BatchError) as caught:
        retrying(bed.target).write([bed.record(n) for n in range(4)])
    assert list(caught.value.errors) == [3]  # the batch's own index, not the retry's
    assert isinstance(caught.value.errors[3], PermanentError)
    assert [e.source_id for e in bed.target.written] == ["R0", "R2", "R1"]  # each once


def test_retrying_never_lets_an_older_version_of_a_record_win() -> None:
    bed = MemoryBed()
    flaky = {b"0:1": 1}  # the older version fails once; the newer one passes at once

    def refusal(envelope: Envelope) -> EhrbridgeError | None:
        if flaky.get(envelope.payload):
            flaky[envelope.payload] -= 1
            return UpstreamUnavailable("busy (test)")
        return None

    bed.target.refuse = refusal
    batch = [bed.record(0, version=1), bed.record(1), bed.record(0, version=2)]
    retrying(bed.target).write(batch)
    assert bed.delivered() == {0: 2, 1: 0}  # v2 written again after v1's retry
    assert [e.payload for e in bed.target.written] == [b"1:0", b"0:2", b"0:1", b"0:2"]


def test_retrying_never_retries_a_permanent_failure() -> None:
    bed = MemoryBed()
    bed.target.fail_next([PermanentError("no (test)")])
    with pytest.raises(PermanentError):
        retrying(bed.target).write([bed.record(0)])
    assert bed.target.calls == 1


def test_retrying_stops_at_once_when_shutting_down() -> None:
    bed = MemoryBed()
    bed.outage(10)
    stop = threading.Event()
    stop.set()
    with pytest.raises(BatchError) as caught:
        RetryingSink(bed.target, FAST, stop).write([bed.record(0), bed.record(1)])
    assert all(isinstance(e, TransientError) for e in caught.value.errors.values())
    assert bed.target.calls == 1  # left uncommitted for the next owner, not retried


# ------------------------------------------- MLLP error translation (a misbehaving peer)


class ScriptedPeer:
    """A TCP peer that answers each frame with ``reply(control_id)`` (None: nothing, then
    it closes the connection); real sockets, so the sink's own socket errors are met."""

    def __init__(self, reply: Callable[[str], bytes | None]) -> None:
        self.reply = reply
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\x1c\r" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                control_id = data.split(b"\r", 1)[0].split(b"|")[9].decode() if data else ""
                answer = self.reply(control_id)
                if answer is not None:
                    conn.sendall(answer)

    def close(self) -> None:
        self.server.close()


def framed_ack(code: str, control_id: str) -> bytes:
    ack = f"MSH|^~\\&|EHR|H|EHRBRIDGE|S|20260101||ACK|A1|P|2.5.1\rMSA|{code}|{control_id}\r"
    return b"\x0b" + ack.encode() + b"\x1c\r"


MLLP_TRANSIENT = {
    "closes-without-answer": lambda cid: None,
    "garbage-frame": lambda cid: b"\x0bnot an ACK at all\x1c\r",
    "unframed-bytes": lambda cid: b"HTTP/1.1 400 Bad Request\r\n\r\n",
    "ack-for-another-message": lambda cid: framed_ack("AA", "SOMEONE-ELSE"),
    "ack-cut-off": lambda cid: framed_ack("AA", cid)[:20],
    "application-reject": lambda cid: framed_ack("AR", cid),  # default on_reject: retry
}
MLLP_PERMANENT = {
    "application-error": lambda cid: framed_ack("AE", cid),  # default on_error: dead-letter
    "unknown-code": lambda cid: framed_ack("ZZ", cid),
}


def mllp_sink_to(port: int) -> MllpSink:
    target = Hl7v2Writeback(host="127.0.0.1", port=port, ack_timeout_s=0.3, resends=1)
    return MllpSink(target)


@pytest.mark.parametrize("name", MLLP_TRANSIENT)
def test_mllp_answers_that_may_pass_are_transient(name: str) -> None:
    peer = ScriptedPeer(MLLP_TRANSIENT[name])
    sink = mllp_sink_to(peer.port)
    try:
        with pytest.raises(TransientError):
            sink.write([MllpBed().record(0)])
    finally:
        sink.close()
        peer.close()


@pytest.mark.parametrize("name", MLLP_PERMANENT)
def test_mllp_answers_that_will_not_change_are_permanent(name: str) -> None:
    peer = ScriptedPeer(MLLP_PERMANENT[name])
    sink = mllp_sink_to(peer.port)
    try:
        with pytest.raises(PermanentError) as caught:
            sink.write([MllpBed().record(0)])
        assert isinstance(caught.value, RemoteRejected) and caught.value.body  # the ACK kept
    finally:
        sink.close()
        peer.close()


def test_mllp_a_peer_nobody_listens_on_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = mllp_sink_to(port)
    with pytest.raises(UpstreamUnavailable):
        sink.write([MllpBed().record(0)])
    sink.close()
