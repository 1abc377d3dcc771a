"""One contract, every Source: MLLP, FHIR REST, FHIR Subscription notifications, and memory.

The Source contract (``core/contracts.py``), case by case, each against the
real ingest (``pipelines/ingest.py``) and a real embedded log:

* the positive answer (MLLP AA, HTTP 2xx, a memory ack) goes out only once
  the record is durable in ``<site>.raw``: while the durable append is held
  back, the sender hears nothing;
* unusable input gets a negative answer for good (AE/AR, 4xx), and its raw
  bytes and reason are in ``<site>.dlq`` before that answer goes out;
* storage failing is a negative answer that asks for a resend (AR, 503 with
  ``Retry-After``) and stores nothing; the resend, once storage is back, is
  stored once;
* one sender's messages are stored in the order they were sent;
* a resend of the same message is taken again (at-least-once): the copies
  carry the same bytes, so downstream identifiers make them one;
* a restarted source (a new listener over the same log) keeps what was
  acknowledged and takes new input.

The MLLP listener and the FHIR endpoint serve on real sockets; the memory
source is the same contract without a wire (Bytewax-style, for unit tests).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson
import pytest
from auth_tokens import auth_section, token_headers
from fastapi import FastAPI

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.fhir_client import FhirReader
from ehrbridge.adapters.memory import MemorySource
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.mllp_source import MllpSource
from ehrbridge.adapters.patient_links import PatientLinks
from ehrbridge.adapters.sqlite_log import SqliteLog
from ehrbridge.adapters.subscription_ledger import SubscriptionLedger
from ehrbridge.auth import Authenticator
from ehrbridge.config import RetryPolicy, SiteConfig, load_site_config
from ehrbridge.core.contracts import Envelope, Kind
from ehrbridge.core.errors import PermanentError, UpstreamUnavailable
from ehrbridge.fhir_api import NOTIFICATION_PATH, FhirEndpoint, add_fhir_routes
from ehrbridge.pipelines.fhir_ingest import Checker
from ehrbridge.pipelines.groupcommit import GroupCommitter
from ehrbridge.pipelines.ingest import Ingest
from ehrbridge.pipelines.transport import Consumer, Record, topic_name
from ehrbridge.sandbox.run import sandbox_fhir_site_file, sandbox_site_file

NUMBERED = re.compile(rb"conf-(\d+)")


class HeldLog:
    """The embedded log, with appends that can be held back or made to fail."""

    def __init__(self, path: Path) -> None:
        self.inner = SqliteLog(path)
        self.released = threading.Event()
        self.released.set()
        self.down = False

    def append(self, records: Sequence[Record]) -> None:
        self.released.wait(30)
        if self.down:
            raise UpstreamUnavailable("disk full (test)")
        self.inner.append(records)

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        return self.inner.consumer(group, topics)

    def read(self, topic: str, *, after: int = -1, limit: int = 100) -> list[Record]:
        return self.inner.read(topic, after=after, limit=limit)

    def close(self) -> None:
        self.inner.close()


class SourceBed(Protocol):
    site: Site
    accepted: frozenset[str]  # answers meaning "stored"
    refused: frozenset[str]  # answers meaning "never send this again"
    retry: frozenset[str]  # answers meaning "send it again later"
    bug: frozenset[str]  # answers to input ehrbridge failed on (kept for a replay)

    def send(self, n: int, patient: int = 1) -> str:
        """Send usable message ``n`` about patient ``patient``; the answer's code."""
        ...

    def send_unusable(self) -> tuple[str, bytes]:
        """Send input this site cannot use; the answer's code and the bytes sent."""
        ...

    def restart(self) -> None: ...


class Site:
    """What every bed shares: a site's ingest over a held-back embedded log."""

    def __init__(self, config: SiteConfig, tmp_path: Path) -> None:
        self.config = config
        self.log = HeldLog(tmp_path / "log.sqlite")
        self.committer = GroupCommitter(self.log)
        self.ingest = Ingest(config, self.committer)

    def raw(self) -> list[Record]:
        """``<site>.raw`` read by a second client: what is durable, not what is cached."""
        reader = SqliteLog(self.log.inner.path)
        try:
            return reader.read(topic_name(self.config.site, "raw"), limit=1000)
        finally:
            reader.close()

    def dead_letters(self) -> list[Record]:
        return self.log.read(topic_name(self.config.site, "dlq"), limit=1000)

    def numbers(self) -> list[int]:
        return [int(m.group(1)) for r in self.raw() if (m := NUMBERED.search(r.value))]

    def close(self) -> None:
        self.committer.close()
        self.log.close()


# ------------------------------------------------------------------- HL7v2 input


def oru(n: int, patient: int = 1) -> bytes:
    return (
        f"MSH|^~\\&|LAB|SANDBOX|EHRBRIDGE|SANDBOX|20260101090000||ORU^R01^ORU_R01|conf-{n}|P|2.5.1\r"
        f"PID|1||MRN-{patient}^^^SANDBOX^MR||Doe^Jane||19600101|F\r"
        "OBR|1||F-1|24362-6^Renal panel^LN|||20260101083000\r"
        f"OBX|1|NM|33914-3^eGFR^LN||{20 + n % 40}|mL/min/{{1.73_m2}}|||||F|||20260101083000\r"
    ).encode()


NO_PID = (
    b"MSH|^~\\&|LAB|SANDBOX|EHRBRIDGE|SANDBOX|20260101090000||ORU^R01^ORU_R01|conf-bad|P|2.5.1\r"
    b"OBR|1||F-1|24362-6^Renal panel^LN|||20260101083000\r"
    b"OBX|1|NM|33914-3^eGFR^LN||28|mL/min/{1.73_m2}|||||F|||20260101083000\r"
)


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class MllpBed:
    accepted = frozenset({"AA"})
    refused = frozenset({"AE", "AR"})
    retry = frozenset({"AR"})
    bug = frozenset({"AE"})

    def __init__(self, tmp_path: Path) -> None:
        config = load_site_config(sandbox_site_file(), data_dir=str(tmp_path / "data"))
        mllp = config.mllp.model_copy(update={"port": 0})
        self.site = Site(config.model_copy(update={"mllp": mllp}), tmp_path)
        self.loop = LoopThread()
        self.source = self._listen()
        self.client = MllpClient("127.0.0.1", self.port, timeout_s=30)

    def _listen(self) -> MllpSource:
        source = MllpSource(self.site.config.mllp, self.site.config.site)
        self.loop.run(source.start(self.site.ingest.deliver))
        assert source.port is not None
        self.port = source.port
        return source

    def send(self, n: int, patient: int = 1) -> str:
        return self.client.send(oru(n, patient)).code

    def send_unusable(self) -> tuple[str, bytes]:
        return self.client.send(NO_PID).code, NO_PID

    def restart(self) -> None:
        self.client.close()
        self.loop.run(self.source.stop())
        self.source = self._listen()
        self.client = MllpClient("127.0.0.1", self.port, timeout_s=30)

    def close(self) -> None:
        self.client.close()
        self.loop.run(self.source.stop())
        self.loop.close()
        self.site.close()


class MemoryBed:
    accepted = frozenset({"acked"})
    refused = frozenset({"nacked-permanent"})
    retry = frozenset({"nacked-transient"})
    bug = frozenset({"nacked-permanent"})

    def __init__(self, tmp_path: Path) -> None:
        config = load_site_config(sandbox_site_file(), data_dir=str(tmp_path / "data"))
        self.site = Site(config, tmp_path)

    def _deliver(self, payload: bytes, n: str) -> str:
        envelope = Envelope(self.site.config.site, n, payload, Kind.HL7V2, n)
        source = MemorySource([envelope])
        asyncio.run(source.run(self.site.ingest.deliver))
        if source.acked:
            return "acked"
        permanent = isinstance(source.nacked[0][1], PermanentError)
        return "nacked-permanent" if permanent else "nacked-transient"

    def send(self, n: int, patient: int = 1) -> str:
        return self._deliver(oru(n, patient), f"conf-{n}")

    def send_unusable(self) -> tuple[str, bytes]:
        return self._deliver(NO_PID, "conf-bad"), NO_PID

    def restart(self) -> None:
        """A memory source holds nothing between runs: a new one is a restart."""

    def close(self) -> None:
        self.site.close()


# --------------------------------------------------------------------- FHIR input

SYNTHEA_MRN = "http://hospital.smarthealthit.org"


def patient_and_egfr(n: int, patient: int) -> list[dict[str, Any]]:
    return [
        {
            "fullUrl": f"urn:uuid:patient-{patient}",
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": SYNTHEA_MRN, "value": f"MRN-{patient}"}],
                "gender": "female",
                "birthDate": "1960-01-01",
            },
        },
        {
            "fullUrl": f"urn:uuid:conf-{n}",
            "resource": {
                "resourceType": "Observation",
                "id": f"conf-{n}",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "33914-3"}]},
                "subject": {"reference": f"urn:uuid:patient-{patient}"},
                "effectiveDateTime": "2026-01-01T08:30:00Z",
                "valueQuantity": {
                    "value": 20 + n % 40,
                    "unit": "mL/min/{1.73_m2}",
                    "system": "http://unitsofmeasure.org",
                    "code": "mL/min/{1.73_m2}",
                },
            },
        },
    ]


def collection(n: int, patient: int) -> bytes:
    bundle = {"resourceType": "Bundle", "type": "collection", "id": f"conf-{n}"}
    return orjson.dumps({**bundle, "entry": patient_and_egfr(n, patient)})


def notification(n: int, patient: int) -> bytes:
    status = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": "event-notification",
        "subscription": {"reference": "Subscription/sandbox-labs"},
        "topic": "http://example.org/topics/labs",
        "eventsSinceSubscriptionStart": n,
        "notificationEvent": [{"eventNumber": n, "focus": {"reference": f"urn:uuid:conf-{n}"}}],
    }
    bundle = {"resourceType": "Bundle", "type": "subscription-notification", "id": f"conf-{n}"}
    return orjson.dumps({**bundle, "entry": [{"resource": status}, *patient_and_egfr(n, patient)]})


NOT_A_NOTIFICATION = orjson.dumps(
    {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "entry": [{"resource": {"resourceType": "Basic"}}],
    }
)


EHR_BASE = "https://ehr.test/fhir"


def id_only_notification(n: int, patient: int) -> bytes:
    """Event ``n`` naming its Observation only; the subscriber reads it (and its Patient)."""
    focus = {"reference": f"{EHR_BASE}/Observation/conf-{n}"}
    status = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": "event-notification",
        "subscription": {"reference": "Subscription/sandbox-labs"},
        "eventsSinceSubscriptionStart": n,
        "notificationEvent": [{"eventNumber": n, "focus": focus}],
    }
    bundle = {"resourceType": "Bundle", "type": "subscription-notification", "id": f"conf-{n}"}
    return orjson.dumps({**bundle, "entry": [{"resource": status}]})


class EhrDouble:
    """The EHR's FHIR server for id-only reads, in a MockTransport handler."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.faults: list[Callable[[], httpx.Response]] = []

    def add(self, n: int, patient: int) -> None:
        patient_entry, observation_entry = patient_and_egfr(n, patient)
        observation = {**observation_entry["resource"]}
        observation["subject"] = {"reference": f"Patient/p{patient}"}
        self.resources[f"Observation/conf-{n}"] = observation
        self.resources[f"Patient/p{patient}"] = {**patient_entry["resource"], "id": f"p{patient}"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.faults:
            return self.faults.pop(0)()
        found = self.resources.get(request.url.path.removeprefix("/fhir/"))
        return httpx.Response(200, json=found) if found else httpx.Response(404)


class FhirBed:
    """FHIR REST (``POST /fhir``) or Subscription notifications, on a real HTTP socket."""

    accepted = frozenset({"200", "201"})
    refused = frozenset({"400", "422"})
    retry = frozenset({"503"})
    bug = frozenset({"500"})  # with an OperationOutcome; the input is in the dead-letter store

    def __init__(self, tmp_path: Path, *, subscription: bool, id_only: bool = False) -> None:
        tokens = tmp_path / "tokens"
        config = load_site_config(
            sandbox_fhir_site_file(), data_dir=str(tmp_path / "data"), auth=auth_section(tokens)
        )
        no_sweep = config.subscriptions.model_copy(update={"backfill": False})
        config = config.model_copy(update={"subscriptions": no_sweep})
        self.tmp_path = tmp_path
        self.site = Site(config, tmp_path)
        self.subscription = subscription or id_only
        self.ehr = EhrDouble() if id_only else None
        self.headers = {"content-type": "application/fhir+json", **token_headers(tokens, "sender")}
        self.server = self._serve()

    def _serve(self) -> ThreadedServer:
        config = self.site.config
        self.ledger = SubscriptionLedger(self.tmp_path / "subscriptions.sqlite")
        self.links = PatientLinks(self.tmp_path / "links.sqlite")
        reader = None
        if self.ehr is not None:
            http = httpx.Client(transport=httpx.MockTransport(self.ehr))
            once = RetryPolicy(attempts=1, delayed_s=[])  # the sender's resend is the retry
            reader = FhirReader(EHR_BASE, client=http, policy=once)
        endpoint = FhirEndpoint(
            config,
            self.site.ingest,
            self.links,
            self.ledger,
            Authenticator(config.auth),
            reader=reader,
        )
        app = FastAPI()
        add_fhir_routes(app, endpoint)
        return ThreadedServer(app).start()

    def _post(self, body: bytes) -> str:
        path = NOTIFICATION_PATH if self.subscription else "/fhir"
        response = httpx.post(
            f"{self.server.base_url}{path}", content=body, headers=self.headers, timeout=30
        )
        if response.status_code == 503:
            assert response.headers.get("retry-after"), "a 503 says when to send again"
        return str(response.status_code)

    def send(self, n: int, patient: int = 1) -> str:
        if self.ehr is not None:
            self.ehr.add(n, patient)
            return self._post(id_only_notification(n, patient))
        return self._post((notification if self.subscription else collection)(n, patient))

    def send_unusable(self) -> tuple[str, bytes]:
        body = NOT_A_NOTIFICATION if self.subscription else b'{"resourceType": "Bundle", oops'
        return self._post(body), body

    def _stop(self) -> None:
        self.server.stop()
        self.ledger.close()
        self.links.close()

    def restart(self) -> None:
        self._stop()
        self.server = self._serve()

    def close(self) -> None:
        self._stop()
        self.site.close()


SOURCES = ["mllp", "fhir-rest", "fhir-subscription", "fhir-subscription-id-only", "memory"]


@pytest.fixture(params=SOURCES)
def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceBed]:
    tmp_path.chmod(0o700)  # a site's data lives in private directories only
    made: MllpBed | MemoryBed | FhirBed
    if request.param == "mllp":
        made = MllpBed(tmp_path)
    elif request.param == "memory":
        made = MemoryBed(tmp_path)
    else:
        subscription, id_only = (
            request.param.startswith("fhir-sub"),
            request.param.endswith("id-only"),
        )
        made = FhirBed(tmp_path, subscription=subscription, id_only=id_only)
    yield made
    made.close()


# ------------------------------------------------------------------------- cases


def test_the_positive_answer_waits_for_the_durable_append(bed: SourceBed) -> None:
    bed.site.log.released.clear()  # the disk is slow: nothing is durable yet
    answers: list[str] = []
    sender = threading.Thread(target=lambda: answers.append(bed.send(1)))
    sender.start()
    time.sleep(0.5)
    assert answers == [] and bed.site.raw() == []
    bed.site.log.released.set()
    sender.join(30)
    assert answers and answers[0] in bed.accepted
    assert bed.site.numbers() == [1]


def test_unusable_input_is_dead_lettered_with_its_bytes_before_the_refusal(bed: SourceBed) -> None:
    code, sent = bed.send_unusable()
    assert code in bed.refused
    [kept] = bed.site.dead_letters()  # already there when the answer came
    assert kept.value == sent
    assert kept.headers.get("error.reason")
    assert bed.site.raw() == []


def test_storage_failing_asks_for_a_resend_and_stores_nothing(bed: SourceBed) -> None:
    bed.site.log.down = True
    assert bed.send(1) in bed.retry
    assert bed.site.raw() == [] and bed.site.dead_letters() == []
    bed.site.log.down = False
    assert bed.send(1) in bed.accepted  # the sender's resend
    assert bed.site.numbers() == [1]


def test_one_senders_messages_are_stored_in_the_order_sent(bed: SourceBed) -> None:
    for n in range(1, 7):
        assert bed.send(n, patient=1 + n % 2) in bed.accepted
    assert bed.site.numbers() == [1, 2, 3, 4, 5, 6]


def test_a_resend_is_taken_again_with_the_same_bytes(bed: SourceBed) -> None:
    assert bed.send(1) in bed.accepted
    assert bed.send(1) in bed.accepted  # the ACK was lost on the way; the sender resends
    first, again = bed.site.raw()
    assert first.value == again.value and first.key == again.key


def test_a_restarted_source_keeps_what_it_acknowledged_and_takes_more(bed: SourceBed) -> None:
    assert bed.send(1) in bed.accepted
    bed.restart()
    assert bed.send(2) in bed.accepted
    assert bed.site.numbers() == [1, 2]


# ------------------------------------------- id-only notifications: reading from the EHR


@pytest.fixture
def id_only(tmp_path: Path) -> Iterator[FhirBed]:
    tmp_path.chmod(0o700)
    made = FhirBed(tmp_path, subscription=True, id_only=True)
    yield made
    made.close()


@pytest.mark.parametrize("status", [500, 503, 429])
def test_an_ehr_that_cannot_answer_now_makes_the_notification_a_retry(
    id_only: FhirBed, status: int
) -> None:
    assert id_only.ehr is not None
    id_only.ehr.faults.append(lambda: httpx.Response(status))
    assert id_only.send(1) in id_only.retry
    assert id_only.site.raw() == [] and id_only.site.dead_letters() == []
    assert id_only.send(1) in id_only.accepted  # the EHR's resend, once it answers
    assert id_only.site.numbers() == [1]


@pytest.mark.parametrize(
    "answer",
    [
        lambda: httpx.Response(404),
        lambda: httpx.Response(200, content=b"<html>portal</html>"),
        lambda: httpx.Response(200, json={"resourceType": "Patient", "id": "wrong-type"}),
        lambda: httpx.Response(
            200, stream=httpx.ByteStream(b"not gzip"), headers={"content-encoding": "gzip"}
        ),
    ],
    ids=["404", "not-json", "wrong-type", "bad-gzip"],
)
def test_an_ehr_answer_that_will_not_change_is_noted_not_crashed_on(
    id_only: FhirBed, answer: Callable[[], httpx.Response]
) -> None:
    assert id_only.ehr is not None
    id_only.ehr.faults.append(answer)
    assert id_only.send(1) == "200"  # the notification is taken; the resource is not there
    assert id_only.site.raw() == []


def test_a_bug_while_checking_input_is_kept_and_the_source_serves_on(
    bed: SourceBed, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise ZeroDivisionError("a bug (test)")

    monkeypatch.setattr(Ingest, "validate", broken)  # HL7v2 and memory sources
    monkeypatch.setattr(Checker, "check_bundle", broken)  # FHIR REST and notifications
    assert bed.send(1) in bed.bug
    [kept] = bed.site.dead_letters()
    assert kept.headers.get("error.reason") == "internal" and b"conf-1" in kept.value
    monkeypatch.undo()  # the fix is deployed; the source still serves
    assert bed.send(2) in bed.accepted
