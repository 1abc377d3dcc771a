"""FHIR write-back: one transaction per result, conditional, with Provenance; bearer and SMART auth.

Against the sandbox FHIR stand-in on a real socket. For authentication it
sits behind ``smart_fake.GuardedFhir``: a token endpoint and a bearer check
faked at the HTTP level only, so ehrbridge's client code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from auth_tokens import headers as auth
from conftest import all_resources, wait_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir_validation import assert_npm_valid, assert_round_trip
from predictions import prediction
from smart_fake import AuthState, Client, GuardedFhir

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.fhir_sink import FhirSink
from ehrbridge.adapters.smart_auth import SmartBackendServices, StaticBearer, token_source
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.config import (
    BearerAuth,
    Hl7v2Writeback,
    SiteConfig,
    SmartBackendAuth,
    load_site_config,
)
from ehrbridge.core.contracts import BatchError, Envelope, Failure, Kind
from ehrbridge.core.errors import ConfigError, RemoteRejected, UpstreamUnavailable
from ehrbridge.pipelines.provenance import result_transaction
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.results import Delivery
from ehrbridge.pipelines.writeback import DELIVERED_HEADER, WritebackStage
from ehrbridge.sandbox.fhir_server import create_fhir_app
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file

CLIENT_ID = "ehrbridge-test-client"


@pytest.fixture
def fhir() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_fhir_app()) as server:
        yield server


@pytest.fixture
def auth_state() -> AuthState:
    return AuthState()


@pytest.fixture
def guarded(auth_state: AuthState) -> Iterator[ThreadedServer]:
    with ThreadedServer(GuardedFhir(create_fhir_app(), auth_state)) as server:
        yield server


@pytest.fixture
def config() -> SiteConfig:
    return load_site_config(sandbox_site_file())


def envelope_for(result: Prediction, config: SiteConfig) -> Envelope:
    bundle = result_transaction(result, config)
    return Envelope(
        config.site, result.source_id, orjson.dumps(bundle), Kind.FHIR, result.patient_id
    )


def resources(server: ThreadedServer, kind: str) -> list[dict[str, Any]]:
    return all_resources(f"{server.base_url}/fhir/{kind}", {"_count": 1000})


def test_a_result_is_one_transaction_of_devices_observation_and_provenance(
    config: SiteConfig,
) -> None:
    bundle = result_transaction(prediction(config), config)
    kinds = [(e["resource"]["resourceType"], e["request"]["method"]) for e in bundle["entry"]]
    assert bundle["type"] == "transaction"
    assert kinds == [
        ("Patient", "POST"),  # the sandbox's writeback.subject: reference-or-create
        ("Device", "POST"),
        ("Device", "POST"),
        ("Observation", "PUT"),
        ("Provenance", "PUT"),
    ]
    observation = bundle["entry"][3]
    assert observation["request"]["url"].startswith("Observation?identifier=")
    assert all("ifNoneExist" in e["request"] for e in bundle["entry"][:3])
    assert observation["resource"]["subject"]["reference"] == bundle["entry"][0]["fullUrl"]
    for item in [bundle, *(e["resource"] for e in bundle["entry"])]:
        assert_round_trip(item)
    assert_npm_valid([bundle, *(e["resource"] for e in bundle["entry"])])


def test_a_replay_updates_the_observation_and_provenance_instead_of_adding(
    fhir: ThreadedServer, config: SiteConfig
) -> None:
    sink = FhirSink(f"{fhir.base_url}/fhir")
    result = prediction(config)
    sink.write([envelope_for(result, config)])
    sink.write([envelope_for(result, config)])  # at-least-once: the same result again
    observations = resources(fhir, "Observation")
    provenances = resources(fhir, "Provenance")
    assert len(observations) == 1 and len(provenances) == 1
    assert observations[0]["meta"]["versionId"] == "2"  # updated in place
    assert len(resources(fhir, "Device")) == 2  # conditional create: found, not added
    assert observations[0]["identifier"][0]["value"] == result.identifier


def test_provenance_names_the_observation_the_devices_the_inputs_and_the_mapping(
    fhir: ThreadedServer, config: SiteConfig
) -> None:
    FhirSink(f"{fhir.base_url}/fhir").write([envelope_for(prediction(config), config)])
    [observation] = resources(fhir, "Observation")
    [provenance] = resources(fhir, "Provenance")
    devices = {f"Device/{d['id']}": d for d in resources(fhir, "Device")}
    assert provenance["target"] == [{"reference": f"Observation/{observation['id']}"}]
    agents = {a["type"]["coding"][0]["code"]: a["who"]["reference"] for a in provenance["agent"]}
    assert set(agents) == {"assembler", "performer"} and set(agents.values()) == set(devices)
    ehrbridge, model = devices[agents["assembler"]], devices[agents["performer"]]
    assert ehrbridge["deviceName"][0]["name"] == "ehrbridge"
    assert model["version"][0]["value"] == "1.0.0"
    assert {"name": "kfre-4var", "type": "model-name"} in model["deviceName"]
    assert observation["device"]["reference"] == agents["performer"]
    inputs = [e["what"]["identifier"] for e in provenance["entity"]]
    assert inputs == [d["identifier"] for d in observation["derivedFrom"]]
    assert {e["role"] for e in provenance["entity"]} == {"source"}
    assert provenance["policy"] == [f"urn:ehrbridge:mapping:sandbox:{config.mapping.version}"]


def test_several_results_travel_in_one_transaction(
    fhir: ThreadedServer, config: SiteConfig
) -> None:
    sink = FhirSink(f"{fhir.base_url}/fhir", results_per_request=20)
    batch = [envelope_for(prediction(config, f"MRN-{n}"), config) for n in range(5)]
    sink.write(batch)
    assert sink.requests == 1
    assert len(resources(fhir, "Observation")) == 5
    assert len(resources(fhir, "Provenance")) == 5
    assert len(resources(fhir, "Device")) == 2


def test_a_refused_result_fails_alone_and_the_others_are_written(
    fhir: ThreadedServer, config: SiteConfig
) -> None:
    sink = FhirSink(f"{fhir.base_url}/fhir")
    batch = [envelope_for(prediction(config, f"MRN-{n}"), config) for n in range(4)]
    broken = orjson.loads(batch[2].payload)
    broken["entry"][3]["resource"]["status"] = "not-a-status"  # the server refuses it (4xx)
    batch[2] = Envelope(config.site, "bad", orjson.dumps(broken), Kind.FHIR, "MRN-2")
    with pytest.raises(BatchError) as caught:
        sink.write(batch)
    assert list(caught.value.errors) == [2]
    assert isinstance(caught.value.errors[2], RemoteRejected)
    assert "status" in caught.value.errors[2].detail
    assert sink.requests == 1 + 4  # the batch, then each result on its own
    stored = {o["subject"]["identifier"]["value"] for o in resources(fhir, "Observation")}
    assert stored == {"MRN-0", "MRN-1", "MRN-3"}


def test_a_server_error_is_transient_and_writes_nothing(
    fhir: ThreadedServer, config: SiteConfig
) -> None:
    httpx.post(f"{fhir.base_url}/_admin/faults", json={"status": 503, "count": 1})
    sink = FhirSink(f"{fhir.base_url}/fhir")
    batch = [envelope_for(prediction(config, f"MRN-{n}"), config) for n in range(3)]
    with pytest.raises(BatchError) as caught:
        sink.write(batch)
    assert all(isinstance(e, UpstreamUnavailable) for e in caught.value.errors.values())
    assert resources(fhir, "Observation") == []
    sink.write(batch)  # the retry
    assert len(resources(fhir, "Observation")) == 3


def test_writeback_stage_sends_a_replayed_unchanged_result_nowhere(
    fhir: ThreadedServer, config: SiteConfig, tmp_path: Path
) -> None:
    sink = FhirSink(f"{fhir.base_url}/fhir")
    store = SqliteResultStore(tmp_path / "results.sqlite")
    stage = WritebackStage(config, store, {"fhir": sink})
    result = prediction(config)
    record = Envelope(config.site, result.source_id, result.to_json(), Kind.PREDICTION, "MRN-1")
    assert stage.process([record]) == []
    assert stage.process([record]) == []  # a replay
    assert sink.requests == 1
    assert store.get(result.identifier).status == Delivery.DELIVERED  # type: ignore[union-attr]
    changed = prediction(config, risk_2y=0.3)  # same episode, new values: sent again
    assert (
        stage.process([Envelope(config.site, "x", changed.to_json(), Kind.PREDICTION, "MRN-1")])
        == []
    )
    assert sink.requests == 2
    [observation] = resources(fhir, "Observation")
    assert observation["component"][0]["valueQuantity"]["value"] == 30.0


def _record(result: Prediction, config: SiteConfig) -> Envelope:
    return Envelope(config.site, result.source_id, result.to_json(), Kind.PREDICTION, "MRN-1")


def test_a_late_retry_of_an_older_result_of_the_episode_changes_nothing(
    fhir: ThreadedServer, config: SiteConfig, tmp_path: Path
) -> None:
    sink = FhirSink(f"{fhir.base_url}/fhir")
    store = SqliteResultStore(tmp_path / "results.sqlite")
    stage = WritebackStage(config, store, {"fhir": sink})
    older = prediction(config, uacr=300.0, risk_2y=0.11, revision=4)
    newer = prediction(config, uacr=420.0, risk_2y=0.22, revision=5)
    assert older.identifier == newer.identifier  # one episode, one Observation
    assert stage.process([_record(newer, config)]) == []
    assert stage.process([_record(older, config)]) == []  # back from a delayed tier
    assert sink.requests == 1
    [observation] = resources(fhir, "Observation")
    assert observation["component"][0]["valueQuantity"]["value"] == 22.0
    kept = store.get(newer.identifier)
    assert kept is not None and (kept.outputs["risk_2y"], kept.state_revision) == (0.22, 5)


@pytest.mark.parametrize("order", ["older first", "newer first"])
def test_one_batch_writes_only_the_newest_result_of_an_episode(
    fhir: ThreadedServer, config: SiteConfig, tmp_path: Path, order: str
) -> None:
    sink = FhirSink(f"{fhir.base_url}/fhir")
    stage = WritebackStage(config, SqliteResultStore(tmp_path / "r.sqlite"), {"fhir": sink})
    older = _record(prediction(config, risk_2y=0.11, revision=4), config)
    newer = _record(prediction(config, risk_2y=0.22, revision=5), config)
    batch = [older, newer] if order == "older first" else [newer, older]
    assert stage.process(batch) == []
    [observation] = resources(fhir, "Observation")
    assert observation["component"][0]["valueQuantity"]["value"] == 22.0


def test_the_result_store_never_replaces_a_result_with_an_older_one(
    config: SiteConfig, tmp_path: Path
) -> None:
    store = SqliteResultStore(tmp_path / "r.sqlite")
    newer = prediction(config, risk_2y=0.22, revision=5)
    older = prediction(config, risk_2y=0.11, revision=4)
    store.upsert([(newer, {})], Delivery.SHADOW)
    store.upsert([(older, {})], Delivery.SHADOW)
    kept = store.get(newer.identifier)
    assert kept is not None and kept.outputs["risk_2y"] == 0.22


def test_a_result_store_from_before_revisions_is_upgraded_in_place(
    config: SiteConfig, tmp_path: Path
) -> None:
    import sqlite3

    path = tmp_path / "r.sqlite"
    SqliteResultStore(path).upsert([(prediction(config), {})], Delivery.SHADOW)
    with sqlite3.connect(path) as conn:  # the table as it was created before the column
        conn.execute("ALTER TABLE results DROP COLUMN state_revision")
    store = SqliteResultStore(path)
    [old] = store.list()
    assert old.state_revision == 0
    store.upsert([(prediction(config, risk_2y=0.3, revision=2), {})], Delivery.SHADOW)
    [new] = store.list()
    assert (new.outputs["risk_2y"], new.state_revision) == (0.3, 2)


def test_a_failed_result_keeps_the_targets_that_already_have_it(
    fhir: ThreadedServer, config: SiteConfig, tmp_path: Path
) -> None:
    class Refusing:
        name = "hl7v2"

        def write(self, batch: list[Envelope]) -> None:
            raise RemoteRejected("refused", reason="hl7.ack_ae")

        def close(self) -> None: ...

    oru = Hl7v2Writeback(host="127.0.0.1", port=9)  # never reached: Refusing stands in
    config = config.model_copy(
        update={"writeback": config.writeback.model_copy(update={"hl7v2": oru})}
    )
    sink = FhirSink(f"{fhir.base_url}/fhir")
    targets = {"fhir": sink, "hl7v2": Refusing()}
    stage = WritebackStage(config, SqliteResultStore(tmp_path / "r.sqlite"), targets)
    result = prediction(config)
    record = Envelope(config.site, result.source_id, result.to_json(), Kind.PREDICTION, "MRN-1")
    [failure] = stage.process([record])
    assert isinstance(failure, Failure) and failure.permanent
    assert failure.envelope.headers[DELIVERED_HEADER] == "fhir"
    stage.process([failure.envelope])  # a dead-letter replay: FHIR already has it
    assert sink.requests == 1


# --------------------------------------------------------------------------- bearer token


def test_a_static_bearer_token_from_the_environment(
    guarded: ThreadedServer,
    auth_state: AuthState,
    config: SiteConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth_state.static_tokens.add("s3cret-token")
    monkeypatch.setenv("EHR_TOKEN", "s3cret-token")
    source = token_source(BearerAuth(kind="bearer", token_env="EHR_TOKEN"), None)
    FhirSink(f"{guarded.base_url}/fhir", auth=source).write(
        [envelope_for(prediction(config), config)]
    )
    assert auth_state.unauthorized == 0
    monkeypatch.setenv("EHR_TOKEN", "wrong")
    source = token_source(BearerAuth(kind="bearer", token_env="EHR_TOKEN"), None)
    with pytest.raises(UpstreamUnavailable) as caught:
        FhirSink(f"{guarded.base_url}/fhir", auth=source).write(
            [envelope_for(prediction(config), config)]
        )
    assert caught.value.reason == "auth.unauthorized"


def test_bearer_token_file_is_relative_to_the_site_yaml_and_never_in_it(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ehr.token").write_text("from-a-file\n")
    text = (
        sandbox_site_file()
        .read_text()
        .replace(
            "  fhir_base: http://127.0.0.1:8090/fhir\n",
            "  fhir_base: http://127.0.0.1:8090/fhir\n"
            "  auth: {kind: bearer, token_file: secrets/ehr.token}\n",
        )
    )
    (tmp_path / "site.yaml").write_text(text)
    loaded = load_site_config(tmp_path / "site.yaml")
    assert isinstance(loaded.writeback.auth, BearerAuth)
    assert loaded.writeback.auth.token_file == tmp_path / "secrets" / "ehr.token"
    assert StaticBearer(loaded.writeback.auth).authorization() == "Bearer from-a-file"


def test_a_missing_secret_stops_the_site_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        token_source(BearerAuth(kind="bearer", token_env="NOT_SET_ANYWHERE"), None)


# --------------------------------------------------------------------------- SMART Backend Services


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def smart(
    guarded: ThreadedServer,
    auth_state: AuthState,
    tmp_path: Path,
    *,
    algorithm: str = "RS384",
    registered: bool = True,
) -> SmartBackendServices:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa_key() if algorithm == "RS384" else ec.generate_private_key(ec.SECP384R1())
    )
    if registered:
        auth_state.clients[CLIENT_ID] = Client(CLIENT_ID, key.public_key(), algorithm, "key-1")
    path = tmp_path / "client-key.pem"
    path.write_bytes(pem(key))
    auth = SmartBackendAuth(
        kind="smart-backend-services",
        client_id=CLIENT_ID,
        key_id="key-1",
        algorithm=algorithm,  # type: ignore[arg-type]
        private_key_file=path,
    )
    return SmartBackendServices(auth, f"{guarded.base_url}/fhir")


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_smart_backend_services_token_is_fetched_once_and_cached(
    guarded: ThreadedServer,
    auth_state: AuthState,
    config: SiteConfig,
    tmp_path: Path,
    algorithm: str,
) -> None:
    source = smart(guarded, auth_state, tmp_path, algorithm=algorithm)
    sink = FhirSink(f"{guarded.base_url}/fhir", auth=source, results_per_request=1)
    sink.write([envelope_for(prediction(config, f"MRN-{n}"), config) for n in range(4)])
    assert auth_state.refused == []
    assert auth_state.tokens_issued == 1  # discovered the token endpoint, then one token
    assert source.token_url == f"{guarded.base_url}/auth/token"
    assert sink.requests == 4 and auth_state.unauthorized == 0
    assert len(resources_with_token(guarded, auth_state, "Observation")) == 4


def resources_with_token(
    server: ThreadedServer, state: AuthState, kind: str
) -> list[dict[str, Any]]:
    state.static_tokens.add("test-reader")
    response = httpx.get(
        f"{server.base_url}/fhir/{kind}",
        params={"_count": 1000},
        headers={"authorization": "Bearer test-reader"},
    )
    return [e["resource"] for e in response.json().get("entry", [])]


def test_an_expired_or_revoked_token_is_replaced_and_the_request_repeated(
    guarded: ThreadedServer, auth_state: AuthState, config: SiteConfig, tmp_path: Path
) -> None:
    source = smart(guarded, auth_state, tmp_path)
    sink = FhirSink(f"{guarded.base_url}/fhir", auth=source)
    sink.write([envelope_for(prediction(config, "MRN-1"), config)])
    auth_state.revoke_all()  # the EHR ends the token early: 401, new token, same request again
    sink.write([envelope_for(prediction(config, "MRN-2"), config)])
    assert auth_state.tokens_issued == 2 and auth_state.unauthorized == 1
    auth_state.expires_in = 0  # tokens that expire at once are never reused
    source.invalidate()
    sink.write([envelope_for(prediction(config, f"MRN-{n}"), config) for n in (3, 4)])
    assert auth_state.tokens_issued == 3  # one transaction
    sink.write([envelope_for(prediction(config, "MRN-5"), config)])
    assert auth_state.tokens_issued == 4
    assert len(resources_with_token(guarded, auth_state, "Observation")) == 5


def test_an_unregistered_client_is_refused_by_the_token_endpoint(
    guarded: ThreadedServer, auth_state: AuthState, config: SiteConfig, tmp_path: Path
) -> None:
    source = smart(guarded, auth_state, tmp_path, registered=False)
    sink = FhirSink(f"{guarded.base_url}/fhir", auth=source)
    with pytest.raises(UpstreamUnavailable) as caught:
        sink.write([envelope_for(prediction(config), config)])
    assert caught.value.reason == "auth.token_refused"
    assert "unknown client" in caught.value.detail
    assert auth_state.tokens_issued == 0


def test_the_private_key_must_fit_the_algorithm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EHRBRIDGE_TEST_KEY", pem(rsa_key()).decode())
    auth = SmartBackendAuth(
        kind="smart-backend-services",
        client_id=CLIENT_ID,
        key_id="k",
        algorithm="ES384",
        private_key_env="EHRBRIDGE_TEST_KEY",
    )
    with pytest.raises(ConfigError, match="ES384"):
        SmartBackendServices(auth, "http://127.0.0.1:1/fhir")


def test_a_live_site_writes_through_smart_backend_services(
    guarded: ThreadedServer, auth_state: AuthState, tmp_path: Path
) -> None:
    """The wiring: site YAML → runtime → FhirSink with SMART → the guarded EHR."""
    key = rsa_key()
    auth_state.clients[CLIENT_ID] = Client(CLIENT_ID, key.public_key(), "RS384", "key-1")
    (tmp_path / "key.pem").write_bytes(pem(key))
    smart_auth = SmartBackendAuth(
        kind="smart-backend-services",
        client_id=CLIENT_ID,
        key_id="key-1",
        private_key_file=tmp_path / "key.pem",
    )

    def to_guarded_ehr(site: SiteConfig) -> SiteConfig:
        writeback = site.writeback.model_copy(
            update={"fhir_base": f"{guarded.base_url}/fhir", "auth": smart_auth, "hl7v2": None}
        )
        return site.model_copy(update={"writeback": writeback})

    mrn = "MRN-SMART-1"
    visit = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": f"{code}-smart",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                    "subject": {
                        "identifier": {"system": "http://hospital.smarthealthit.org", "value": mrn}
                    },
                    "effectiveDateTime": "2026-03-01T09:00:00+00:00",
                    "valueQuantity": {
                        "value": value,
                        "unit": unit,
                        "system": "http://unitsofmeasure.org",
                        "code": unit,
                    },
                }
            }
            for code, value, unit in (
                ("33914-3", 19.0, "mL/min/{1.73_m2}"),
                ("14959-1", 800.0, "mg/g"),
            )
        ],
    }
    visit["entry"].insert(
        0,
        {
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": "http://hospital.smarthealthit.org", "value": mrn}],
                "birthDate": "1955-07-01",
                "gender": "female",
            }
        },
    )
    with BackgroundSandbox(tmp_path / "site", configure_fhir_site=to_guarded_ehr) as running:
        response = httpx.post(
            f"{running.sandbox.fhir_site_url}/fhir",
            content=orjson.dumps(visit),
            headers={"content-type": "application/fhir+json", **auth(running, "sender")},
        )
        assert response.status_code == 200, response.text
        found = wait_for(
            lambda: resources_with_token(guarded, auth_state, "Observation"),
            what="the risk Observation written with a SMART token",
        )
    assert found[0]["subject"]["identifier"]["value"] == mrn
    assert auth_state.tokens_issued == 1 and auth_state.refused == []
    assert len(resources_with_token(guarded, auth_state, "Provenance")) == 1


def test_the_readme_search_by_patient_identifier_works_on_the_stand_in_too(
    fhir: ThreadedServer, config: SiteConfig
) -> None:
    """``Observation?patient.identifier=`` is the README's search: HAPI answers it as well."""
    mine, other = prediction(config, "MRN-README"), prediction(config, "MRN-OTHER")
    FhirSink(f"{fhir.base_url}/fhir").write([envelope_for(r, config) for r in (mine, other)])
    query = {"patient.identifier": f"{mine.patient_system}|MRN-README"}
    [found] = all_resources(f"{fhir.base_url}/fhir/Observation", query)
    assert found["identifier"][0]["value"] == mine.identifier
    assert found["subject"]["reference"].startswith("Patient/")  # resolved in the transaction
