"""FHIR Subscription notifications: each kind handled as it demands; gaps seen; id-only fetched.

The Inferno Subscriptions test kit's notification Bundles (R4 Backport IG)
are posted as they are, with only the Subscription's id made unique per
test. id-only notifications are followed up by reading the resources from
the EHR's FHIR server (the sandbox stand-in; behind a bearer check and with
failing reads where retries and authentication are the point).
"""

from __future__ import annotations

import copy
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from auth_tokens import headers as auth
from conftest import CORPUS, all_resources, wait_for
from fhir_validation import r4b
from smart_fake import AuthState, GuardedFhir
from starlette.types import ASGIApp, Receive, Scope, Send

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.fhir_client import FhirReader
from ehrbridge.adapters.smart_auth import StaticBearer
from ehrbridge.adapters.subscription_ledger import SubscriptionLedger
from ehrbridge.config import BearerAuth, KnownSubscription, SiteConfig
from ehrbridge.core.errors import RemoteRejected
from ehrbridge.pipelines.fhir_ingest import FhirRejected
from ehrbridge.pipelines.subscriptions import UNREAD, parse_notification
from ehrbridge.runtime import SiteRuntime
from ehrbridge.sandbox.fhir_server import create_fhir_app
from ehrbridge.sandbox.run import BackgroundSandbox

KIT = CORPUS / "fhir" / "inferno-subscriptions-test-kit" / "notification_bundles"
MRN_SYSTEM = "http://hospital.smarthealthit.org"
LOINC = "http://loinc.org"
NOTIFY = "/fhir/subscription-notification"


def kit(name: str, subscription: str) -> dict[str, Any]:
    """A test-kit notification, addressed from ``subscription``."""
    text = (KIT / f"{name}.json").read_text()
    doc: dict[str, Any] = orjson.loads(text.replace("Subscription/123", subscription))
    doc["entry"][0]["resource"]["parameter"][0]["valueReference"]["reference"] = (
        f"https://fhirserver.org/fhir/{subscription}"
    )
    return doc


# The Subscriptions the test site knows (subscriptions.known); each test takes fresh ones.
KNOWN = [f"Subscription/test-{n}-{uuid.uuid4().hex[:6]}" for n in range(100)]
_unused = iter(KNOWN)


def new_subscription() -> str:
    return next(_unused)


def knowing_the_test_subscriptions(config: SiteConfig) -> SiteConfig:
    known = [*config.subscriptions.known, *(KnownSubscription(reference=r) for r in KNOWN)]
    subscriptions = config.subscriptions.model_copy(update={"known": known})
    return config.model_copy(update={"subscriptions": subscriptions})


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(
        tmp_path_factory.mktemp("subscriptions"), configure_fhir_site=knowing_the_test_subscriptions
    ) as running:
        yield running


def site(sandbox: BackgroundSandbox) -> SiteRuntime:
    runtime = sandbox.sandbox.fhir_runtime
    assert runtime is not None
    return runtime


def notify(sandbox: BackgroundSandbox, doc: dict[str, Any], **headers: str) -> httpx.Response:
    """POST a notification; with the sandbox's sender token unless ``authorization`` is given."""
    credentials = {} if "authorization" in headers else auth(sandbox, "sender")
    return httpx.post(
        f"{sandbox.sandbox.fhir_site_url}{NOTIFY}",
        content=orjson.dumps(doc),
        headers={"content-type": "application/fhir+json", **credentials, **headers},
        timeout=30,
    )


def subscriptions_listed(sandbox: BackgroundSandbox) -> list[dict[str, Any]]:
    api = sandbox.sandbox.fhir_site_url
    listed: list[dict[str, Any]] = httpx.get(
        f"{api}/api/fhir", headers=auth(sandbox, "viewer")
    ).json()["subscriptions"]
    return listed


def state_of(sandbox: BackgroundSandbox, subscription: str) -> dict[str, Any]:
    listed = subscriptions_listed(sandbox)
    return next(s for s in listed if s["subscription"].endswith(subscription))


def raw_records(sandbox: BackgroundSandbox) -> int:
    runtime = site(sandbox)
    return len(runtime.log.read(runtime.topic("raw"), limit=100_000))


def issues(response: httpx.Response) -> list[dict[str, Any]]:
    body = response.json()
    r4b(body)
    assert body["resourceType"] == "OperationOutcome"
    found: list[dict[str, Any]] = body["issue"]
    return found


# --------------------------------------------------------------------------- the test kit


def test_handshake_then_heartbeat_reveals_missed_events_and_a_late_event_fills_in(
    sandbox: BackgroundSandbox,
) -> None:
    subscription = new_subscription()
    handshake = notify(sandbox, kit("handshake_bundle_example", subscription))
    assert handshake.status_code == 200
    assert "handshake" in issues(handshake)[0]["diagnostics"]
    assert state_of(sandbox, subscription)["status"] == "requested"

    heartbeat = notify(sandbox, kit("heartbeat_bundle_example", subscription))  # 2 events so far
    assert heartbeat.status_code == 200
    warnings = [i for i in issues(heartbeat) if i["severity"] == "warning"]
    assert [w["code"] for w in warnings] == ["incomplete"]
    assert state_of(sandbox, subscription)["gaps"] == ["1-2"]

    before = raw_records(sandbox)
    empty = notify(sandbox, kit("empty_notification_bundle_example", subscription))  # event 1
    assert empty.status_code == 200
    assert "event(s) 1 will be read from the EHR" in issues(empty)[0]["diagnostics"]
    assert raw_records(sandbox) == before
    state = state_of(sandbox, subscription)
    assert state["gaps"] == ["2"] and state["last_event"] == 2 and state["status"] == "active"
    assert state["unread"] == ["1"], "arrived, but without content: still to be read"
    # The kit's Subscription is on another server: its events are never asked for there.
    backfill = wait_for(lambda: state_of(sandbox, subscription)["backfill"], what="the reason")
    assert set(backfill) == {"1", "2"}
    assert all(r.startswith("subscription.foreign_reference") for r in backfill.values())


def test_full_resource_of_a_type_not_read_is_counted(sandbox: BackgroundSandbox) -> None:
    before = raw_records(sandbox)
    response = notify(sandbox, kit("full_resource_notification_bundle_example", new_subscription()))
    assert response.status_code == 200
    assert "1 Encounter" in issues(response)[0]["diagnostics"]
    assert raw_records(sandbox) == before


def test_id_only_of_a_type_not_read_is_not_fetched(sandbox: BackgroundSandbox) -> None:
    endpoint = site(sandbox).fhir
    assert endpoint is not None and endpoint.reader is not None
    reads = endpoint.reader.reads
    response = notify(sandbox, kit("id_only_notification_bundle_example", new_subscription()))
    assert response.status_code == 200
    assert endpoint.reader.reads == reads  # an Encounter: nothing this site reads


def test_a_non_conformant_notification_is_refused_and_kept(sandbox: BackgroundSandbox) -> None:
    runtime = site(sandbox)
    subscription = new_subscription()
    response = notify(
        sandbox, kit("empty_notification_bundle_non_conformant_example", subscription)
    )
    assert response.status_code == 400
    [issue] = issues(response)
    assert issue["expression"] == ["Bundle.entry[0].request"] and "bdl-3" in issue["diagnostics"]
    dlq = runtime.log.read(runtime.topic("dlq"), limit=100_000)
    assert any(r.headers.get("error.reason") == "subscription.non_conformant" for r in dlq)
    listed = subscriptions_listed(sandbox)
    assert not any(s["subscription"].endswith(subscription) for s in listed)


def test_every_kit_notification_gets_an_operation_outcome(sandbox: BackgroundSandbox) -> None:
    for path in sorted(KIT.glob("*.json")):
        response = notify(sandbox, kit(path.stem, new_subscription()))
        expected = 400 if "non_conformant" in path.name else 200
        assert response.status_code == expected, path.name
        issues(response)


# --------------------------------------------------------------------------- resources from the EHR


def ehr_patient(fhir_base: str, mrn: str) -> str:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
        "gender": "female",
        "birthDate": "1958-03-04",
    }
    created = httpx.post(f"{fhir_base}/Patient", json=patient).json()
    return str(created["id"])


def ehr_lab(fhir_base: str, patient_id: str, code: str, value: float, unit: str) -> dict[str, Any]:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2026-02-03T10:00:00+00:00",
        "valueQuantity": {
            "value": value,
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    }
    created: dict[str, Any] = httpx.post(f"{fhir_base}/Observation", json=observation).json()
    return created


def ehr_renal_results(fhir_base: str, egfr: float, uacr: float) -> tuple[str, list[dict[str, Any]]]:
    """A new patient in the EHR with an eGFR and a UACR: (MRN, the two Observations)."""
    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    patient_id = ehr_patient(fhir_base, mrn)
    labs = [
        ehr_lab(fhir_base, patient_id, "33914-3", egfr, "mL/min/{1.73_m2}"),
        ehr_lab(fhir_base, patient_id, "14959-1", uacr, "mg/g"),
    ]
    return mrn, labs


def event(
    subscription: str, number: int, focus: list[str], *, full: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An R4 Backport event notification: id-only (focus) or full-resource."""
    doc = kit("id_only_notification_bundle_example", subscription)
    status = doc["entry"][0]
    params = status["resource"]["parameter"]
    params[4]["valueString"] = str(number)
    template = params[5]
    params[5:] = []
    for offset, reference in enumerate(focus):
        part = copy.deepcopy(template)
        part["part"][0]["valueString"] = str(number + offset)
        part["part"][2]["valueReference"]["reference"] = reference
        params.append(part)
    params[4]["valueString"] = str(number + len(focus) - 1)
    entries = [status]
    for reference, resource in zip(focus, full or [None] * len(focus), strict=True):
        entry: dict[str, Any] = {
            "fullUrl": reference,
            "request": {"method": "POST", "url": reference.split("/")[-2]},
            "response": {"status": "201"},
        }
        if resource is not None:
            entry["resource"] = resource
        entries.append(entry)
    doc["entry"] = entries
    return doc


def risk_observations(sandbox: BackgroundSandbox, mrn: str) -> list[dict[str, Any]]:
    return all_resources(
        f"{sandbox.sandbox.fhir_base}/Observation",
        {"patient.identifier": f"{MRN_SYSTEM}|{mrn}", "code": "urn:ehrbridge:codes|kfre-4var"},
    )


def test_id_only_notification_reads_the_results_and_their_patient_from_the_ehr(
    sandbox: BackgroundSandbox,
) -> None:
    base = sandbox.sandbox.fhir_base
    mrn, labs = ehr_renal_results(base, 21.0, 640.0)
    focus = [f"{base}/Observation/{lab['id']}" for lab in labs]
    subscription = new_subscription()
    response = notify(sandbox, event(subscription, 1, focus))
    assert response.status_code == 200, response.text
    assert "stored 2 Observation, 1 Patient" in issues(response)[0]["diagnostics"]
    [risk] = wait_for(lambda: risk_observations(sandbox, mrn), what="the risk from fetched results")
    assert {d["identifier"]["value"] for d in risk["derivedFrom"]} == {
        f"Observation/{lab['id']}" for lab in labs
    }
    assert state_of(sandbox, subscription)["last_event"] == 2


def test_full_resource_notification_fetches_only_the_missing_patient(
    sandbox: BackgroundSandbox,
) -> None:
    base = sandbox.sandbox.fhir_base
    mrn, labs = ehr_renal_results(base, 18.0, 900.0)
    endpoint = site(sandbox).fhir
    assert endpoint is not None and endpoint.reader is not None
    reads = endpoint.reader.reads
    focus = [f"{base}/Observation/{lab['id']}" for lab in labs]
    response = notify(sandbox, event(new_subscription(), 1, focus, full=labs))
    assert response.status_code == 200, response.text
    assert endpoint.reader.reads == reads + 1  # the Patient; the results came with it
    wait_for(lambda: risk_observations(sandbox, mrn), what="the risk from full-resource results")


def test_a_reference_to_another_server_is_never_fetched(sandbox: BackgroundSandbox) -> None:
    endpoint = site(sandbox).fhir
    assert endpoint is not None and endpoint.reader is not None
    reads = endpoint.reader.reads
    foreign = "https://attacker.example/fhir/Observation/1"
    response = notify(sandbox, event(new_subscription(), 1, [foreign]))
    assert response.status_code == 200
    warnings = [i for i in issues(response) if i["severity"] == "warning"]
    assert "subscription.foreign_reference" in warnings[0]["diagnostics"]
    assert endpoint.reader.reads == reads


def test_an_r5_subscription_status_notification_is_understood(sandbox: BackgroundSandbox) -> None:
    subscription = f"https://ehr.example/fhir/{new_subscription()}"
    doc = {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "entry": [
            {
                "fullUrl": "urn:uuid:" + str(uuid.uuid4()),
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "heartbeat",
                    "eventsSinceSubscriptionStart": "3",
                    "subscription": {"reference": subscription},
                    "topic": "http://example.org/topics/lab-results",
                },
            }
        ],
    }
    response = notify(sandbox, doc)
    assert response.status_code == 200
    assert state_of(sandbox, subscription)["gaps"] == ["1-3"]


# --------------------------------------------------------------------------- reads: retries, auth


class FlakyReads:
    """The first ``failures`` reads of an Observation answer 503, as a busy EHR does."""

    def __init__(self, app: ASGIApp, failures: int) -> None:
        self.app = app
        self.failures = failures
        self.reads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and "/Observation/" in scope["path"]
        ):
            self.reads += 1
            if self.reads <= self.failures:
                await send({"type": "http.response.start", "status": 503, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


@pytest.fixture
def guarded_ehr() -> Iterator[tuple[ThreadedServer, AuthState, FlakyReads]]:
    state = AuthState(static_tokens={"ehr-read-token"})
    flaky = FlakyReads(create_fhir_app(), failures=2)
    with ThreadedServer(GuardedFhir(flaky, state)) as server:
        yield server, state, flaky


def test_reads_retry_a_busy_server_with_the_sites_credentials(
    guarded_ehr: tuple[ThreadedServer, AuthState, FlakyReads], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, state, flaky = guarded_ehr
    base = f"{server.base_url}/fhir"
    headers = {"authorization": "Bearer ehr-read-token"}
    patient = httpx.post(
        f"{base}/Patient", json={"resourceType": "Patient"}, headers=headers
    ).json()
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{patient['id']}"},
    }
    created = httpx.post(f"{base}/Observation", json=observation, headers=headers).json()
    monkeypatch.setenv("EHR_READ_TOKEN", "ehr-read-token")
    reader = FhirReader(
        base, auth=StaticBearer(BearerAuth(kind="bearer", token_env="EHR_READ_TOKEN"))
    )
    found = reader.read(f"{base}/Observation/{created['id']}")
    assert found["id"] == created["id"]
    assert flaky.reads == 3 and state.unauthorized == 0  # two 503s, then the answer
    without = FhirReader(base)
    with pytest.raises(Exception) as caught:
        without.read(f"Patient/{patient['id']}")
    assert getattr(caught.value, "reason", "") == "auth.unauthorized"
    with pytest.raises(RemoteRejected):
        reader.read("https://elsewhere.example/fhir/Patient/1")


def test_the_endpoint_demands_the_agreed_token_and_reads_with_its_own(
    guarded_ehr: tuple[ThreadedServer, AuthState, FlakyReads],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, state, flaky = guarded_ehr
    flaky.failures = 0
    base = f"{server.base_url}/fhir"
    monkeypatch.setenv("EHR_READ_TOKEN", "ehr-read-token")
    monkeypatch.setenv("NOTIFY_TOKEN", "from-the-subscription-channel-header")

    def point_at_guarded_ehr(config: SiteConfig) -> SiteConfig:
        subscriptions = config.subscriptions.model_copy(
            update={
                "fhir_base": base,
                "auth": BearerAuth(kind="bearer", token_env="EHR_READ_TOKEN"),
                "token_env": "NOTIFY_TOKEN",
            }
        )
        return knowing_the_test_subscriptions(
            config.model_copy(update={"subscriptions": subscriptions})
        )

    headers = {"authorization": "Bearer ehr-read-token"}
    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    patient = httpx.post(
        f"{base}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
            "birthDate": "1950-01-01",
            "gender": "male",
        },
        headers=headers,
    ).json()
    lab = httpx.post(
        f"{base}/Observation",
        json={
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "14959-1"}]},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "effectiveDateTime": "2026-02-03T10:00:00+00:00",
            "valueQuantity": {
                "value": 120,
                "unit": "mg/g",
                "system": "http://unitsofmeasure.org",
                "code": "mg/g",
            },
        },
        headers=headers,
    ).json()
    with BackgroundSandbox(tmp_path, configure_fhir_site=point_at_guarded_ehr) as running:
        doc = event(new_subscription(), 1, [f"{base}/Observation/{lab['id']}"])
        assert notify(running, doc, authorization="").status_code == 401  # no channel header
        response = notify(running, doc, authorization="Bearer from-the-subscription-channel-header")
        assert response.status_code == 200, response.text
        assert "stored 1 Observation, 1 Patient" in issues(response)[0]["diagnostics"]
    assert state.unauthorized == 0


# --------------------------------------------------------------------------- the ledger


def test_gaps_survive_a_restart_and_duplicates_make_none(tmp_path: Path) -> None:
    path = tmp_path / "subscriptions.sqlite"
    ledger = SubscriptionLedger(path)
    subscription = "Subscription/ledger"

    def events(*numbers: int) -> Any:
        doc = event(subscription, numbers[0], [f"Observation/{n}" for n in numbers])
        return parse_notification(doc)

    assert ledger.record(events(1, 2)) == []
    assert [str(g) for g in ledger.record(events(5))] == ["3-4"]
    assert ledger.record(events(2)) == []  # a re-delivery: no new gap
    ledger.close()
    reopened = SubscriptionLedger(path)
    assert [str(g) for g in reopened.gaps(f"https://fhirserver.org/fhir/{subscription}")] == ["3-4"]
    reopened.record(events(3))  # late after all
    assert [str(g) for g in reopened.gaps()] == ["4"]
    reopened.close()


# --------------------------------------------------------------------------- missed events


class EventsArchive:
    """An EHR's ``Subscription/[id]/$events`` (Backport IG) over the FHIR stand-in.

    ``events[n]`` is event *n*'s focus reference and, for a full-resource
    answer, the resource. Each call is kept with its query parameters.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.events: dict[int, tuple[str, dict[str, Any] | None]] = {}
        self.calls: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.endswith("/$events"):
            await self.app(scope, receive, send)
            return
        query = dict(httpx.QueryParams(scope["query_string"].decode()))
        self.calls.append(query)
        subscription = "/".join(path.split("/")[-3:-1])  # Subscription/<id>
        wanted = range(int(query["eventsSinceNumber"]), int(query["eventsUntilNumber"]) + 1)
        found = [n for n in wanted if n in self.events]
        body = orjson.dumps(self.answer(subscription, found))
        headers = [(b"content-type", b"application/fhir+json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def answer(self, subscription: str, numbers: list[int]) -> dict[str, Any]:
        """A query-event notification with these events (consecutive, as the test stores)."""
        focus = [self.events[n][0] for n in numbers]
        full = [self.events[n][1] for n in numbers]
        if not numbers:
            doc = kit("heartbeat_bundle_example", subscription)
        elif all(r is not None for r in full):
            doc = event(subscription, numbers[0], focus, full=[r for r in full if r is not None])
        else:
            doc = event(subscription, numbers[0], focus)
        doc["entry"][0]["resource"]["parameter"][3]["valueCode"] = "query-event"
        return doc


def heartbeat(subscription_url: str, events_so_far: int) -> dict[str, Any]:
    doc = kit("heartbeat_bundle_example", "Subscription/x")
    params = doc["entry"][0]["resource"]["parameter"]
    params[0]["valueReference"]["reference"] = subscription_url
    params[4]["valueString"] = str(events_so_far)
    return doc


@pytest.fixture
def ehr_with_events() -> Iterator[tuple[str, EventsArchive]]:
    archive = EventsArchive(create_fhir_app())
    with ThreadedServer(archive) as server:
        yield f"{server.base_url}/fhir", archive


def backfilling_from(base: str) -> Callable[[SiteConfig], SiteConfig]:
    def configure(config: SiteConfig) -> SiteConfig:
        update = {"fhir_base": base, "backfill_retry_s": 0.2}
        subscriptions = config.subscriptions.model_copy(update=update)
        return knowing_the_test_subscriptions(
            config.model_copy(update={"subscriptions": subscriptions})
        )

    return configure


def test_missed_events_are_asked_for_again_and_their_results_scored(
    ehr_with_events: tuple[str, EventsArchive], tmp_path: Path
) -> None:
    base, archive = ehr_with_events
    mrn, labs = ehr_renal_results(base, 17.0, 1200.0)
    subscription = f"{base}/{new_subscription()}"
    archive.events = {1: (f"{base}/Observation/{labs[0]['id']}", labs[0])}  # event 2 not yet
    with BackgroundSandbox(tmp_path, configure_fhir_site=backfilling_from(base)) as running:
        response = notify(running, heartbeat(subscription, 2))  # two events we never saw
        assert response.status_code == 200
        assert [i["code"] for i in issues(response) if i["severity"] == "warning"] == ["incomplete"]
        state = wait_for(
            lambda: (s := state_of(running, subscription))["backfill"] and s, what="a backfill"
        )
        assert state["gaps"] == ["2"], "event 1 recovered, event 2 not on the server yet"
        assert state["backfill"]["2"].startswith("subscription.events_missing")
        assert archive.calls[0] == {
            "eventsSinceNumber": "1",
            "eventsUntilNumber": "2",
            "content": "full-resource",
        }

        archive.events[2] = (f"{base}/Observation/{labs[1]['id']}", None)  # id-only this time
        # No further notification: the sweep (every backfill_retry_s) asks again.
        wait_for(lambda: state_of(running, subscription)["gaps"] == [] or None, what="gap 2 closed")
        assert archive.calls[-1]["eventsSinceNumber"] == "2"
        [risk] = wait_for(lambda: risk_observations(running, mrn), what="the recovered results")
    assert {d["identifier"]["value"] for d in risk["derivedFrom"]} == {
        f"Observation/{lab['id']}" for lab in labs
    }


def test_a_server_without_events_leaves_the_gap_listed_with_the_reason(
    sandbox: BackgroundSandbox,
) -> None:
    subscription = f"{sandbox.sandbox.fhir_base}/{new_subscription()}"  # the stand-in: no $events
    assert notify(sandbox, heartbeat(subscription, 3)).status_code == 200
    state = wait_for(
        lambda: (s := state_of(sandbox, subscription))["backfill"] and s, what="the failed backfill"
    )
    assert state["gaps"] == ["1-3"]
    assert state["backfill"]["1-3"].startswith("fhir.http_4")


def test_an_empty_notifications_events_are_read_with_events(
    ehr_with_events: tuple[str, EventsArchive], tmp_path: Path
) -> None:
    """An empty notification says only that events happened: the subscriber reads them."""
    base, archive = ehr_with_events
    mrn, labs = ehr_renal_results(base, 26.0, 310.0)
    subscription = f"{base}/{new_subscription()}"
    focus = [f"{base}/Observation/{lab['id']}" for lab in labs]
    archive.events = {n + 1: (reference, None) for n, reference in enumerate(focus)}
    empty = event("Subscription/x", 1, focus)
    empty["entry"] = empty["entry"][:1]  # the status only
    params = empty["entry"][0]["resource"]["parameter"]
    params[0]["valueReference"]["reference"] = subscription
    for part in params[5:]:
        part["part"] = part["part"][:2]  # event-number and timestamp; no focus
    with BackgroundSandbox(tmp_path, configure_fhir_site=backfilling_from(base)) as running:
        response = notify(running, empty)
        assert response.status_code == 200, response.text
        assert "event(s) 1, 2 will be read" in issues(response)[0]["diagnostics"]
        wait_for(lambda: state_of(running, subscription)["unread"] == [] or None, what="the read")
        [risk] = wait_for(lambda: risk_observations(running, mrn), what="the risk")
        assert state_of(running, subscription)["gaps"] == []
    assert archive.calls == [
        {"eventsSinceNumber": "1", "eventsUntilNumber": "2", "content": "full-resource"}
    ]
    assert {d["identifier"]["value"] for d in risk["derivedFrom"]} == {
        f"Observation/{lab['id']}" for lab in labs
    }


def test_a_ledger_from_before_unread_ranges_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "subscriptions.sqlite"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE subscription_gaps (subscription TEXT NOT NULL, first_missing INTEGER"
            " NOT NULL, last_missing INTEGER NOT NULL, detected_at REAL NOT NULL,"
            " PRIMARY KEY (subscription, first_missing))"
        )
        old.execute("INSERT INTO subscription_gaps VALUES ('Subscription/old', 3, 4, 0)")
    old.close()
    ledger = SubscriptionLedger(path)
    assert [(str(g), g.kind) for g in ledger.gaps(kind=None)] == [("3-4", "missed")]
    empty = parse_notification(event("Subscription/old", 7, ["Observation/7", "Observation/8"]))
    ledger.record(empty, unread=True)
    subscription = "https://fhirserver.org/fhir/Subscription/old"
    assert [str(g) for g in ledger.gaps(subscription, UNREAD)] == ["7-8"]
    assert [str(g) for g in ledger.gaps(subscription)] == ["1-6"]  # never seen before
    ledger.close()


def test_a_query_may_find_no_events_but_an_event_notification_carries_one() -> None:
    found_nothing = kit("heartbeat_bundle_example", "Subscription/q")
    status = found_nothing["entry"][0]["resource"]["parameter"]
    status[3]["valueCode"] = "query-event"  # an $events answer for events the server lacks
    assert parse_notification(found_nothing).events == []
    status[3]["valueCode"] = "event-notification"
    with pytest.raises(FhirRejected, match="at least one notification event"):
        parse_notification(found_nothing)


def test_gaps_left_open_by_a_previous_run_are_asked_for_at_start(
    ehr_with_events: tuple[str, EventsArchive], tmp_path: Path
) -> None:
    base, archive = ehr_with_events
    mrn, labs = ehr_renal_results(base, 22.0, 450.0)
    subscription = f"{base}/{new_subscription()}"
    configure = backfilling_from(base)
    with BackgroundSandbox(tmp_path, configure_fhir_site=configure) as first:
        assert notify(first, heartbeat(subscription, 2)).status_code == 200
        wait_for(lambda: state_of(first, subscription)["backfill"], what="a failed backfill")
    archive.events = {
        n + 1: (f"{base}/Observation/{lab['id']}", lab) for n, lab in enumerate(labs)
    }  # the EHR has them now; nothing notifies again
    with BackgroundSandbox(tmp_path, configure_fhir_site=configure) as second:
        wait_for(lambda: state_of(second, subscription)["gaps"] == [] or None, what="the gap")
        wait_for(lambda: risk_observations(second, mrn), what="the risk from the recovered events")
