"""The sandbox FHIR R4 server, over real HTTP on a real socket.

Every Bundle, CapabilityStatement, OperationOutcome and Observation the server
returns is also validated with the fhir.resources R4B models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from ehrbridge._http import ThreadedServer
from ehrbridge.sandbox.fhir_server import FhirStore, create_fhir_app

LOINC = "http://loinc.org"
EGFR = "33914-3"  # eGFR (MDRD) LOINC
UACR = "9318-7"  # albumin/creatinine ratio, urine
OBS_SYSTEM = "urn:ehrbridge:obs"
MRN_SYSTEM = "urn:hospital:mrn"
MODELS: dict[str, Any] = {
    "Bundle": Bundle,
    "CapabilityStatement": CapabilityStatement,
    "Observation": Observation,
    "OperationOutcome": OperationOutcome,
    "Patient": Patient,
}


# --------------------------------------------------------------------------- helpers


def fhir(response: httpx.Response) -> dict[str, Any]:
    """The JSON body, checked to be FHIR JSON and valid for the R4B model."""
    assert response.headers["content-type"].startswith("application/fhir+json")
    document: dict[str, Any] = response.json()
    MODELS[document["resourceType"]].model_validate(document)
    return document


def outcome(response: httpx.Response, status: int) -> str:
    """Assert an OperationOutcome error with ``status``; return its diagnostics."""
    assert response.status_code == status, response.text
    document = fhir(response)
    assert document["resourceType"] == "OperationOutcome"
    issue = document["issue"][0]
    assert issue["severity"] == "error"
    assert issue["code"]
    assert issue["diagnostics"]
    return str(issue["diagnostics"])


def observation(
    key: str,
    *,
    subject: dict[str, Any] | None = None,
    code: str = EGFR,
    status: str = "final",
    value: float = 42.0,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": OBS_SYSTEM, "value": key}],
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": subject if subject is not None else {"reference": "Patient/p1"},
        "valueQuantity": {"value": value, "unit": "mL/min/1.73m2"},
    }


def searchset(client: httpx.Client, path: str, **params: Any) -> dict[str, Any]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    bundle = fhir(response)
    assert bundle["type"] == "searchset"
    return bundle


def ids_of(bundle: dict[str, Any]) -> list[str]:
    return [entry["resource"]["id"] for entry in bundle.get("entry", [])]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in bundle["link"] if x["relation"] == relation), None)


def transaction(entries: list[dict[str, Any]], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def post_entry(
    resource: dict[str, Any], full_url: str | None = None, **request: str
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url is not None:
        entry["fullUrl"] = full_url
    return entry


def put_entry(resource: dict[str, Any], url: str, full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "request": {"method": "PUT", "url": url}}
    if full_url is not None:
        entry["fullUrl"] = full_url
    return entry


def live_counts(admin: httpx.Client) -> dict[str, int]:
    counts: dict[str, int] = admin.get("/_admin/stats").json()["resources"]
    return counts


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_fhir_app()) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def _fhir_client(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.base_url}/fhir", timeout=10) as client:
        yield client


@pytest.fixture
def client(_fhir_client: httpx.Client, admin: httpx.Client) -> httpx.Client:
    """The FHIR client, on an empty store with no faults and zeroed counters."""
    for path in ("/_admin/store", "/_admin/faults", "/_admin/stats"):
        assert admin.delete(path).status_code in (200, 204)
    return _fhir_client


# --------------------------------------------------------------------------- metadata, CRUD


def test_capability_statement_describes_the_server(client: httpx.Client) -> None:
    response = client.get("/metadata")
    assert response.status_code == 200
    statement = fhir(response)
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["kind"] == "instance"
    rest = statement["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    described = {r["type"]: r for r in rest["resource"]}
    assert described["Observation"]["conditionalUpdate"] is True
    assert {p["name"] for p in described["Observation"]["searchParam"]} >= {
        "identifier",
        "subject",
        "code",
    }


def test_create_assigns_id_version_and_location(
    client: httpx.Client, server: ThreadedServer
) -> None:
    sent = observation("c1") | {"id": "client-chosen"}
    response = client.post(
        "/Observation", json=sent, headers={"Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 201
    created = fhir(response)
    new_id = created["id"]
    assert new_id != "client-chosen"  # the server assigns ids on create
    assert response.headers["location"] == f"{server.base_url}/fhir/Observation/{new_id}/_history/1"
    assert response.headers["etag"] == 'W/"1"'
    assert created["meta"]["versionId"] == "1"
    assert created["valueQuantity"] == sent["valueQuantity"]

    by_location = client.get(response.headers["location"])
    by_id = client.get(f"/Observation/{new_id}")
    assert by_location.status_code == by_id.status_code == 200
    assert fhir(by_location) == fhir(by_id) == created
    assert by_id.headers["etag"] == 'W/"1"'


def test_create_honours_prefer_return(client: httpx.Client) -> None:
    minimal = client.post(
        "/Observation", json=observation("m1"), headers={"Prefer": "return=minimal"}
    )
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert client.get(minimal.headers["location"]).status_code == 200

    informed = client.post(
        "/Observation", json=observation("m2"), headers={"Prefer": "return=OperationOutcome"}
    )
    assert informed.status_code == 201
    assert fhir(informed)["issue"][0]["severity"] == "information"


def test_update_versions_and_keeps_history(client: httpx.Client) -> None:
    created = fhir(client.post("/Observation", json=observation("u1", value=10.0)))
    resource_id = created["id"]
    changed = observation("u1", value=11.0) | {"id": resource_id}
    response = client.put(f"/Observation/{resource_id}", json=changed)
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"2"'
    updated = fhir(response)
    assert updated["meta"]["versionId"] == "2"
    assert updated["meta"]["lastUpdated"] > created["meta"]["lastUpdated"]

    first = fhir(client.get(f"/Observation/{resource_id}/_history/1"))
    assert first["valueQuantity"]["value"] == 10.0
    assert fhir(client.get(f"/Observation/{resource_id}"))["valueQuantity"]["value"] == 11.0

    history = fhir(client.get(f"/Observation/{resource_id}/_history"))
    assert history["type"] == "history"
    assert history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    outcome(client.get(f"/Observation/{resource_id}/_history/3"), 404)


def test_update_creates_when_absent_and_checks_ids(
    client: httpx.Client, server: ThreadedServer
) -> None:
    response = client.put("/Observation/chosen-1", json=observation("u2") | {"id": "chosen-1"})
    assert response.status_code == 201
    assert response.headers["location"] == f"{server.base_url}/fhir/Observation/chosen-1/_history/1"

    mismatch = client.put("/Observation/chosen-1", json=observation("u2") | {"id": "other"})
    assert "other" in outcome(mismatch, 400)
    assert "no id" in outcome(client.put("/Observation/chosen-1", json=observation("u2")), 400)
    bad_id = client.put("/Observation/bad_id!", json=observation("u2") | {"id": "bad_id!"})
    outcome(bad_id, 400)

    stale = client.put(
        "/Observation/chosen-1",
        json=observation("u2") | {"id": "chosen-1"},
        headers={"If-Match": 'W/"7"'},
    )
    outcome(stale, 412)
    fresh = client.put(
        "/Observation/chosen-1",
        json=observation("u2") | {"id": "chosen-1"},
        headers={"If-Match": 'W/"1"'},
    )
    assert fresh.status_code == 200
    assert fresh.headers["etag"] == 'W/"2"'


def test_delete_then_read_is_gone_and_put_revives(client: httpx.Client) -> None:
    resource_id = fhir(client.post("/Observation", json=observation("d1")))["id"]
    deleted = client.delete(f"/Observation/{resource_id}")
    assert deleted.status_code == 204
    assert deleted.headers["etag"] == 'W/"2"'
    outcome(client.get(f"/Observation/{resource_id}"), 410)
    assert client.get(f"/Observation/{resource_id}/_history/1").status_code == 200
    assert searchset(client, "/Observation", identifier=f"{OBS_SYSTEM}|d1")["total"] == 0
    assert client.delete(f"/Observation/{resource_id}").status_code == 204  # idempotent

    revived = client.put(
        f"/Observation/{resource_id}", json=observation("d1") | {"id": resource_id}
    )
    assert revived.status_code == 201
    assert fhir(revived)["meta"]["versionId"] == "3"


def test_unknown_things_answer_operation_outcome(client: httpx.Client) -> None:
    outcome(client.get("/Observation/never-written"), 404)
    assert "Observatoin" in outcome(client.get("/Observatoin/1"), 404)
    outcome(client.get("/Observation/1/what/is/this"), 404)
    outcome(client.patch("/Observation/1", json={}), 405)


# ------------------------------------------------------------------ conditional interactions


def test_conditional_create(client: httpx.Client) -> None:
    header = {"If-None-Exist": f"identifier={OBS_SYSTEM}|cc1"}
    first = client.post("/Observation", json=observation("cc1"), headers=header)
    assert first.status_code == 201
    again = client.post("/Observation", json=observation("cc1", value=99.0), headers=header)
    assert again.status_code == 200
    existing = fhir(again)
    assert existing["id"] == fhir(first)["id"]
    assert existing["meta"]["versionId"] == "1"
    assert existing["valueQuantity"]["value"] == 42.0  # not overwritten

    client.put("/Observation/dup-2", json=observation("cc1") | {"id": "dup-2"})
    outcome(client.post("/Observation", json=observation("cc1"), headers=header), 412)
    unknown = client.post(
        "/Observation", json=observation("cc9"), headers={"If-None-Exist": "colour=red"}
    )
    assert "colour" in outcome(unknown, 400)


def test_conditional_update_creates_updates_then_refuses_ambiguity(client: httpx.Client) -> None:
    criteria = {"identifier": f"{OBS_SYSTEM}|cu1"}
    created = client.put("/Observation", params=criteria, json=observation("cu1", value=1.0))
    assert created.status_code == 201
    resource_id = fhir(created)["id"]

    updated = client.put("/Observation", params=criteria, json=observation("cu1", value=2.0))
    assert updated.status_code == 200
    assert fhir(updated)["id"] == resource_id
    assert fhir(updated)["meta"]["versionId"] == "2"

    # The percent-encoded form an HTTP client produces for "system|value".
    encoded = client.put(
        f"/Observation?identifier={OBS_SYSTEM.replace(':', '%3A')}%7Ccu1",
        json=observation("cu1", value=3.0) | {"id": resource_id},
    )
    assert encoded.status_code == 200
    assert fhir(encoded)["meta"]["versionId"] == "3"

    conflicting = client.put(
        "/Observation", params=criteria, json=observation("cu1") | {"id": "elsewhere"}
    )
    assert "elsewhere" in outcome(conflicting, 400)

    client.put("/Observation/second", json=observation("cu1") | {"id": "second"})
    outcome(client.put("/Observation", params=criteria, json=observation("cu1")), 412)
    assert searchset(client, "/Observation", **criteria)["total"] == 2

    outcome(client.put("/Observation", params={"colour": "red"}, json=observation("x")), 400)
    outcome(client.put("/Observation", json=observation("x")), 405)


def test_conditional_delete(client: httpx.Client) -> None:
    client.put("/Observation", params={"identifier": f"{OBS_SYSTEM}|cd1"}, json=observation("cd1"))
    assert (
        client.delete("/Observation", params={"identifier": f"{OBS_SYSTEM}|cd1"}).status_code == 204
    )
    assert searchset(client, "/Observation", identifier=f"{OBS_SYSTEM}|cd1")["total"] == 0


# --------------------------------------------------------------------------- search


@pytest.fixture
def search_corpus(client: httpx.Client) -> dict[str, str]:
    """Five Observations over two patients and two codes; key -> id."""
    specs: dict[str, tuple[dict[str, Any], str]] = {
        "s1": ({"reference": "Patient/p1"}, EGFR),
        "s2": ({"reference": "Patient/p1"}, UACR),
        "s3": ({"reference": "Patient/p2"}, EGFR),
        "s4": ({"identifier": {"system": MRN_SYSTEM, "value": "mrn-7"}, "type": "Patient"}, EGFR),
        "s5": ({"reference": "Group/g1"}, UACR),
    }
    made = {}
    for key, (subject, code) in specs.items():
        made[key] = fhir(
            client.post("/Observation", json=observation(key, subject=subject, code=code))
        )["id"]
    no_system = {**observation("s6"), "identifier": [{"value": "bare-6"}]}
    made["s6"] = fhir(client.post("/Observation", json=no_system))["id"]
    return made


def test_search_by_identifier(client: httpx.Client, search_corpus: dict[str, str]) -> None:
    def found(**params: str) -> set[str]:
        bundle = searchset(client, "/Observation", **params)
        assert bundle["total"] == len(bundle.get("entry", []))
        return set(ids_of(bundle))

    assert found(identifier=f"{OBS_SYSTEM}|s2") == {search_corpus["s2"]}
    assert found(identifier="s3") == {search_corpus["s3"]}
    assert found(identifier="|bare-6") == {search_corpus["s6"]}
    assert found(identifier="|s1") == set()  # s1 has a system
    assert found(identifier=f"{OBS_SYSTEM}|s1,{OBS_SYSTEM}|s4") == {
        search_corpus["s1"],
        search_corpus["s4"],
    }
    assert found(identifier=f"{OBS_SYSTEM}|") == {
        search_corpus[k] for k in ("s1", "s2", "s3", "s4", "s5")
    }
    assert found(identifier="urn:other|s1") == set()


def test_search_by_subject_patient_and_code(
    client: httpx.Client, search_corpus: dict[str, str]
) -> None:
    def found(**params: str) -> set[str]:
        return set(ids_of(searchset(client, "/Observation", **params)))

    p1 = {search_corpus["s1"], search_corpus["s2"], search_corpus["s6"]}
    assert found(subject="Patient/p1") == p1
    assert found(subject="p1") == p1
    assert found(**{"subject:Patient": "p1"}) == p1
    assert found(patient="Patient/p1") == p1
    assert found(patient="g1") == set()  # a Group is not a patient
    assert found(subject="Group/g1") == {search_corpus["s5"]}
    assert found(**{"subject.identifier": f"{MRN_SYSTEM}|mrn-7"}) == {search_corpus["s4"]}
    assert found(**{"patient.identifier": "mrn-7"}) == {search_corpus["s4"]}
    # HAPI JPA has no :identifier modifier (HAPI-2498); neither has the stand-in.
    for param in ("subject:identifier", "patient:identifier"):
        refused = client.get("/Observation", params={param: f"{MRN_SYSTEM}|mrn-7"})
        assert "HAPI-2498" in outcome(refused, 400)

    assert found(code=f"{LOINC}|{UACR}") == {search_corpus["s2"], search_corpus["s5"]}
    assert found(code=UACR) == {search_corpus["s2"], search_corpus["s5"]}
    assert found(code=f"http://snomed.info/sct|{UACR}") == set()
    assert found(code=f"{LOINC}|{EGFR}", subject="Patient/p1") == {
        search_corpus["s1"],
        search_corpus["s6"],
    }
    assert found(_id=f"{search_corpus['s3']},nope") == {search_corpus["s3"]}


def test_search_ignores_unknown_parameters_unless_strict(
    client: httpx.Client, search_corpus: dict[str, str]
) -> None:
    lenient = searchset(client, "/Observation", identifier=f"{OBS_SYSTEM}|s1", colour="red")
    assert ids_of(lenient) == [search_corpus["s1"]]
    self_link = link(lenient, "self")
    assert self_link is not None
    assert "identifier=" in self_link
    assert "colour" not in self_link
    strict = client.get(
        "/Observation", params={"colour": "red"}, headers={"Prefer": "handling=strict"}
    )
    assert "colour" in outcome(strict, 400)
    outcome(client.get("/Observation", params={"identifier:above": "x"}), 400)
    outcome(client.get("/Observation", params={"_count": "-1"}), 400)


def test_search_by_post_form(client: httpx.Client, search_corpus: dict[str, str]) -> None:
    response = client.post("/Observation/_search", data={"identifier": f"{OBS_SYSTEM}|s5"})
    assert response.status_code == 200
    assert ids_of(fhir(response)) == [search_corpus["s5"]]


def test_search_total_only(client: httpx.Client, search_corpus: dict[str, str]) -> None:
    for params in ({"_count": "0"}, {"_summary": "count"}):
        bundle = searchset(client, "/Observation", **params)
        assert bundle["total"] == len(search_corpus)
        assert "entry" not in bundle


def _create_many(client: httpx.Client, count: int, prefix: str) -> list[str]:
    entries = [post_entry(observation(f"{prefix}{n:03d}")) for n in range(count)]
    response = client.post("", json=transaction(entries))
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in fhir(response)["entry"]]


def _follow(client: httpx.Client, first_url: str, relation: str = "next") -> list[dict[str, Any]]:
    pages = []
    url: str | None = first_url
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.text
        pages.append(fhir(response))
        url = link(pages[-1], relation)
        assert len(pages) < 1000
    return pages


def test_paging_visits_every_resource_once_forwards_and_back(
    client: httpx.Client, server: ThreadedServer
) -> None:
    created = _create_many(client, 23, "pg")
    pages = _follow(client, f"{server.base_url}/fhir/Observation?_count=5")
    assert [len(ids_of(p)) for p in pages] == [5, 5, 5, 5, 3]
    # As on HAPI: no total while more pages follow; the last page knows it.
    assert ["total" in p for p in pages] == [False] * 4 + [True]
    assert pages[-1]["total"] == 23
    seen = [i for p in pages for i in ids_of(p)]
    assert sorted(seen) == sorted(created)
    assert seen == created  # default order: creation order
    for page in pages:
        for entry in page["entry"]:
            assert (
                entry["fullUrl"] == f"{server.base_url}/fhir/Observation/{entry['resource']['id']}"
            )
    for page in pages[1:]:
        url = link(page, "next") or link(page, "previous")
        assert url is not None
        assert url.startswith(f"{server.base_url}/fhir/Observation?")

    backwards = _follow(client, link(pages[-1], "self") or "", relation="previous")
    assert [ids_of(p) for p in backwards] == [ids_of(p) for p in reversed(pages)]


def test_bundle_total_is_stated_on_every_page_only_when_asked(
    client: httpx.Client, server: ThreadedServer
) -> None:
    _create_many(client, 7, "tt")
    criteria = {"identifier": ",".join(f"{OBS_SYSTEM}|tt{n:03d}" for n in range(7))}
    base = f"{server.base_url}/fhir/Observation"
    unasked = searchset(client, "/Observation", **criteria, _count=3)
    assert "total" not in unasked  # HAPI leaves it out: more pages follow
    accurate = _follow(
        client, f"{base}?{urlencode({**criteria, '_count': 3, '_total': 'accurate'})}"
    )
    assert [p["total"] for p in accurate] == [7, 7, 7]
    assert searchset(client, "/Observation", **criteria, _summary="count")["total"] == 7
    assert searchset(client, "/Observation", **criteria, _count=0)["total"] == 7
    assert searchset(client, "/Observation", **criteria, _count=50)["total"] == 7  # one page
    assert "total" not in searchset(client, "/Observation", **criteria, _count=3, _total="none")


def test_paging_is_stable_while_resources_change(
    client: httpx.Client, server: ThreadedServer
) -> None:
    created = _create_many(client, 12, "st")
    first = searchset(client, "/Observation", _count="4")
    client.delete(f"/Observation/{created[0]}")  # already seen
    client.delete(f"/Observation/{created[10]}")  # not yet seen
    added = _create_many(client, 2, "new")
    later = _follow(client, link(first, "next") or "")
    seen = ids_of(first) + [i for p in later for i in ids_of(p)]
    assert len(seen) == len(set(seen))
    assert set(seen) == (set(created) - {created[10]}) | set(added)


def test_count_is_clamped_and_filters_page_too(
    client: httpx.Client, server: ThreadedServer
) -> None:
    _create_many(client, 7, "cl")
    client.post("/Observation", json=observation("other", subject={"reference": "Patient/p9"}))
    bundle = searchset(client, "/Observation", _count="5000")
    assert "_count=1000" in (link(bundle, "self") or "")
    pages = _follow(client, f"{server.base_url}/fhir/Observation?subject=Patient/p1&_count=3")
    assert [len(ids_of(p)) for p in pages] == [3, 3, 1]
    assert len({i for p in pages for i in ids_of(p)}) == 7


def test_last_updated_filters_and_sort(client: httpx.Client, server: ThreadedServer) -> None:
    made = [fhir(client.post("/Observation", json=observation(f"lu{n}"))) for n in range(4)]
    ids = [m["id"] for m in made]
    second = made[1]["meta"]["lastUpdated"]

    def found(value: str) -> list[str]:
        return ids_of(searchset(client, "/Observation", _lastUpdated=value))

    assert found(f"gt{second}") == ids[2:]
    assert found(f"ge{second}") == ids[1:]
    assert found(f"lt{second}") == ids[:1]
    assert found(f"le{second}") == ids[:2]
    assert found(second) == [ids[1]]
    assert found(f"ge{second[:10]}") == ids  # day precision: the whole day
    assert found(f"lt{second[:4]}") == []
    outcome(client.get("/Observation", params={"_lastUpdated": "gtyesterday"}), 400)

    client.put(f"/Observation/{ids[0]}", json=observation("lu0") | {"id": ids[0]})
    pages = _follow(client, f"{server.base_url}/fhir/Observation?_sort=-_lastUpdated&_count=3")
    assert [i for p in pages for i in ids_of(p)] == [ids[0], ids[3], ids[2], ids[1]]


# --------------------------------------------------------------------------- transaction & batch


def test_transaction_rewrites_urn_uuid_references(client: httpx.Client) -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": "t-1"}]}
    egfr = observation("t-egfr", subject={"reference": "urn:uuid:pat"})
    egfr["derivedFrom"] = [{"reference": "urn:uuid:uacr"}]
    uacr = observation("t-uacr", subject={"reference": "urn:uuid:pat"}, code=UACR)
    uacr["extension"] = [
        {"url": "urn:ehrbridge:ext:source", "valueReference": {"reference": "urn:uuid:pat"}}
    ]
    bundle = transaction(
        [
            post_entry(patient, "urn:uuid:pat", ifNoneExist=f"identifier={MRN_SYSTEM}|t-1"),
            post_entry(egfr, "urn:uuid:egfr"),
            put_entry(uacr, f"Observation?identifier={OBS_SYSTEM}|t-uacr", "urn:uuid:uacr"),
            {"request": {"method": "GET", "url": f"Patient?identifier={MRN_SYSTEM}|t-1"}},
        ]
    )
    response = client.post("", json=bundle)
    assert response.status_code == 200, response.text
    result = fhir(response)
    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created", "201 Created", "201 Created", "200 OK"]
    patient_id = result["entry"][0]["resource"]["id"]
    uacr_id = result["entry"][2]["resource"]["id"]
    assert result["entry"][0]["response"]["location"] == f"Patient/{patient_id}/_history/1"
    assert result["entry"][0]["response"]["etag"] == 'W/"1"'
    assert ids_of(result["entry"][3]["resource"]) == [patient_id]  # GETs see the writes

    egfr_id = result["entry"][1]["resource"]["id"]
    stored_egfr = fhir(client.get(f"/Observation/{egfr_id}"))
    assert stored_egfr["subject"] == {"reference": f"Patient/{patient_id}"}
    assert stored_egfr["derivedFrom"] == [{"reference": f"Observation/{uacr_id}"}]
    stored_uacr = fhir(client.get(f"/Observation/{uacr_id}"))
    assert stored_uacr["extension"][0]["valueReference"] == {"reference": f"Patient/{patient_id}"}
    assert set(ids_of(searchset(client, "/Observation", subject=f"Patient/{patient_id}"))) == {
        egfr_id,
        uacr_id,
    }

    again = fhir(client.post("", json=bundle))
    assert [e["response"]["status"] for e in again["entry"]] == [
        "200 OK",
        "201 Created",
        "200 OK",
        "200 OK",
    ]
    assert again["entry"][2]["resource"]["id"] == uacr_id
    assert again["entry"][2]["resource"]["meta"]["versionId"] == "2"


def test_transaction_resolves_conditional_references(client: httpx.Client) -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": "cr-1"}]}
    patient_id = fhir(client.post("/Patient", json=patient))["id"]
    reference = {"reference": f"Patient?identifier={MRN_SYSTEM}|cr-1"}
    result = fhir(
        client.post("", json=transaction([post_entry(observation("cr", subject=reference))]))
    )
    assert result["entry"][0]["resource"]["subject"] == {"reference": f"Patient/{patient_id}"}

    dangling = {"reference": f"Patient?identifier={MRN_SYSTEM}|nobody"}
    outcome(
        client.post("", json=transaction([post_entry(observation("cr2", subject=dangling))])), 412
    )


@pytest.fixture
def existing(client: httpx.Client) -> dict[str, Any]:
    return fhir(
        client.put(
            "/Observation",
            params={"identifier": f"{OBS_SYSTEM}|keep"},
            json=observation("keep", value=5.0),
        )
    )


def _assert_untouched(client: httpx.Client, admin: httpx.Client, existing: dict[str, Any]) -> None:
    current = fhir(client.get(f"/Observation/{existing['id']}"))
    assert current == existing
    assert live_counts(admin) == {"Observation": 1}
    assert searchset(client, "/Observation", identifier=f"{OBS_SYSTEM}|keep")["total"] == 1
    assert searchset(client, "/Observation", identifier=f"{OBS_SYSTEM}|new")["total"] == 0


def test_transaction_is_all_or_nothing_on_invalid_entry(
    client: httpx.Client, admin: httpx.Client, existing: dict[str, Any]
) -> None:
    bundle = transaction(
        [
            put_entry(observation("keep", value=6.0), f"Observation?identifier={OBS_SYSTEM}|keep"),
            post_entry(observation("new")),
            post_entry(observation("bad", status="done")),
        ]
    )
    diagnostics = outcome(client.post("", json=bundle), 422)
    assert "Bundle.entry[2]" in diagnostics
    assert "Observation.status" in diagnostics
    _assert_untouched(client, admin, existing)


def test_transaction_rolls_back_writes_when_a_read_fails(
    client: httpx.Client, admin: httpx.Client, existing: dict[str, Any]
) -> None:
    keep_changed = observation("keep", value=7.0) | {"id": existing["id"]}
    bundle = transaction(
        [
            post_entry(observation("new")),
            put_entry(keep_changed, f"Observation/{existing['id']}"),
            {"request": {"method": "DELETE", "url": "Observation/some-other"}},
            {"request": {"method": "GET", "url": "Observation/does-not-exist"}},
        ]
    )
    assert "Bundle.entry[3]" in outcome(client.post("", json=bundle), 404)
    _assert_untouched(client, admin, existing)
    history = fhir(client.get(f"/Observation/{existing['id']}/_history"))
    assert history["total"] == 1


@pytest.mark.parametrize(
    ("entries", "status", "phrase"),
    [
        (
            [post_entry(observation("new", subject={"reference": "urn:uuid:missing"}))],
            400,
            "urn:uuid:missing",
        ),
        (
            [
                put_entry(observation("new") | {"id": "same"}, "Observation/same"),
                put_entry(observation("new") | {"id": "same"}, "Observation/same"),
            ],
            400,
            "only once",
        ),
        (
            [
                post_entry(observation("new"), ifNoneExist=f"identifier={OBS_SYSTEM}|new"),
                post_entry(observation("new"), ifNoneExist=f"identifier={OBS_SYSTEM}|new"),
            ],
            400,
            "only once",
        ),
        (
            [
                post_entry({"resourceType": "Patient"} | {"id": "x"})
                | {"request": {"method": "POST", "url": "Observation"}}
            ],
            400,
            "resourceType",
        ),
        ([{"request": {"method": "PATCH", "url": "Observation/x"}}], 400, "PATCH"),
        ([{"resource": observation("new")}], 400, "request"),
    ],
)
def test_transaction_failures_change_nothing(
    client: httpx.Client,
    admin: httpx.Client,
    existing: dict[str, Any],
    *,
    entries: list[dict[str, Any]],
    status: int,
    phrase: str,
) -> None:
    entries = [post_entry(observation("new")), *entries]
    assert phrase in outcome(client.post("", json=transaction(entries)), status)
    _assert_untouched(client, admin, existing)


def test_transaction_refuses_ambiguous_conditional_update(
    client: httpx.Client, admin: httpx.Client, existing: dict[str, Any]
) -> None:
    client.put("/Observation/twin", json=observation("keep") | {"id": "twin"})
    bundle = transaction(
        [
            post_entry(observation("new")),
            put_entry(observation("keep"), f"Observation?identifier={OBS_SYSTEM}|keep"),
        ]
    )
    outcome(client.post("", json=bundle), 412)
    assert live_counts(admin) == {"Observation": 2}
    assert searchset(client, "/Observation", identifier=f"{OBS_SYSTEM}|new")["total"] == 0


def test_batch_reports_each_entry(client: httpx.Client, existing: dict[str, Any]) -> None:
    bundle = transaction(
        [
            post_entry(observation("b-ok")),
            post_entry(observation("b-bad", status="done")),
            {"request": {"method": "GET", "url": "Observation/missing"}},
            {"request": {"method": "DELETE", "url": f"Observation/{existing['id']}"}},
            {"request": {"method": "GET", "url": f"Observation?identifier={OBS_SYSTEM}|b-ok"}},
        ],
        kind="batch",
    )
    response = client.post("", json=bundle, headers={"Prefer": "return=minimal"})
    assert response.status_code == 200
    result = fhir(response)
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == [
        "201 Created",
        "422 Unprocessable Entity",
        "404 Not Found",
        "204 No Content",
        "200 OK",
    ]
    assert "resource" not in result["entry"][0]  # Prefer: return=minimal
    assert (
        "Observation.status" in result["entry"][1]["response"]["outcome"]["issue"][0]["diagnostics"]
    )
    assert result["entry"][4]["resource"]["total"] == 1
    outcome(client.get(f"/Observation/{existing['id']}"), 410)


def test_bundle_endpoint_accepts_only_transaction_and_batch(client: httpx.Client) -> None:
    assert "collection" in outcome(
        client.post("", json={"resourceType": "Bundle", "type": "collection"}), 400
    )
    outcome(client.post("", json=observation("x")), 400)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "content_type", "status", "phrase"),
    [
        (b"{not json", "application/fhir+json", 400, "JSON"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (b"", "application/fhir+json", 400, "empty"),
        (b'{"resourceType": "Patient"}', "application/fhir+json", 400, "Patient"),
        (b'{"status": "final"}', "application/fhir+json", 400, "resourceType"),
        (
            b'{"resourceType": "Observation", "code": {"text": "eGFR"}}',
            "application/fhir+json",
            422,
            "Observation.status",
        ),
        (
            b'{"resourceType": "Observation", "status": "done", "code": {"text": "eGFR"}}',
            "application/fhir+json",
            422,
            "'done'",
        ),
        (
            b'{"resourceType": "Observation", "status": "final"}',
            "application/fhir+json",
            422,
            "Observation.code",
        ),
        (
            b'{"resourceType": "Observation", "status": "final", "code": "x"}',
            "application/fhir+json",
            422,
            "CodeableConcept",
        ),
        (b'{"resourceType": "Observation"}', "text/plain", 415, "text/plain"),
    ],
)
def test_invalid_bodies_answer_operation_outcome(
    client: httpx.Client, body: bytes, content_type: str, status: int, phrase: str
) -> None:
    response = client.post("/Observation", content=body, headers={"Content-Type": content_type})
    assert phrase in outcome(response, status)


def test_small_server_limits_body_size_and_uses_its_base_path() -> None:
    small_app = create_fhir_app(base_path="/r4", max_body_bytes=4096)
    with (
        ThreadedServer(small_app) as small,
        httpx.Client(base_url=f"{small.base_url}/r4") as client,
    ):
        big = observation("big") | {"note": [{"text": "x" * 5000}]}
        outcome(client.post("/Observation", json=big), 413)

        def chunks() -> Iterator[bytes]:
            yield b'{"resourceType": "Observation", "note": [{"text": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        chunked = client.post(
            "/Observation", content=chunks(), headers={"Content-Type": "application/fhir+json"}
        )
        outcome(chunked, 413)

        assert client.post("/Observation", json=observation("fits")).status_code == 201
        assert client.post("/Observation", json=observation("fits2")).status_code == 201
        assert fhir(client.get("/metadata"))["implementation"]["url"] == f"{small.base_url}/r4"
        first = searchset(client, "/Observation", _count="1")
        next_url = link(first, "next")
        assert next_url is not None
        assert next_url.startswith(f"{small.base_url}/r4/Observation?")
        assert ids_of(searchset(client, next_url)) != ids_of(first)


# --------------------------------------------------------------------------- faults & stats


def _inject(admin: httpx.Client, plan: dict[str, Any]) -> None:
    response = admin.post("/_admin/faults", json=plan)
    assert response.status_code == 200, response.text


def test_status_faults_hit_the_next_writes_only(client: httpx.Client, admin: httpx.Client) -> None:
    _inject(admin, {"status": 503, "count": 2, "retry_after_s": 1})
    failed = client.post("/Observation", json=observation("f1"))
    assert "injected" in outcome(failed, 503)
    assert failed.headers["retry-after"] == "1"
    assert client.get("/Observation").status_code == 200  # reads are not counted
    outcome(
        client.put(
            "/Observation", params={"identifier": f"{OBS_SYSTEM}|f1"}, json=observation("f1")
        ),
        503,
    )
    assert client.post("/Observation", json=observation("f1")).status_code == 201
    assert admin.get("/_admin/faults").json()["remaining"] == 0

    stats = admin.get("/_admin/stats").json()
    assert stats["faulted"] == 2
    assert stats["requests"]["POST"]["Observation"] == 2
    assert stats["requests"]["PUT"]["Observation"] == 1
    assert stats["requests"]["GET"]["Observation"] == 1
    assert stats["resources"] == {"Observation": 1}  # unprocessed faults wrote nothing


def test_applied_fault_loses_the_answer_and_a_conditional_retry_is_safe(
    client: httpx.Client, admin: httpx.Client
) -> None:
    _inject(admin, {"status": 500, "apply": True})
    criteria = {"identifier": f"{OBS_SYSTEM}|lost"}
    outcome(client.put("/Observation", params=criteria, json=observation("lost")), 500)
    assert searchset(client, "/Observation", **criteria)["total"] == 1  # yet it was written
    retried = client.put("/Observation", params=criteria, json=observation("lost"))
    assert retried.status_code == 200
    assert searchset(client, "/Observation", **criteria)["total"] == 1


def test_delay_fault_outlasts_a_client_timeout(
    client: httpx.Client, admin: httpx.Client, server: ThreadedServer
) -> None:
    _inject(admin, {"delay_s": 0.6, "count": 1})
    criteria = {"identifier": f"{OBS_SYSTEM}|slow"}
    resource = {**observation("slow", value=1.0), "id": "slow"}
    impatient = httpx.Client(base_url=f"{server.base_url}/fhir", timeout=0.1)
    with impatient, pytest.raises(httpx.ReadTimeout):
        impatient.put("/Observation/slow", json=resource)
    retried = client.put("/Observation/slow", json=resource)
    assert retried.status_code in (200, 201)

    def delayed_write_landed() -> bool:
        bundle = searchset(client, "/Observation", **criteria)
        return bool(bundle["entry"][0]["resource"]["meta"]["versionId"] == "2")

    wait_for(delayed_write_landed)
    assert searchset(client, "/Observation", **criteria)["total"] == 1


@pytest.mark.parametrize("interaction", ["conditional create", "conditional update"])
def test_a_conditional_write_overtaken_by_an_identical_one_gets_409_as_on_hapi(
    client: httpx.Client, admin: httpx.Client, server: ThreadedServer, interaction: str
) -> None:
    """HAPI searches, then inserts: of two overlapping conditional creates of one
    identifier, the later insert fails with 409 (HAPI-2745). The stand-in answers
    the same, so clients tested against it must retry 409 too."""
    key = f"race-{interaction.split()[1]}"
    criteria = {"identifier": f"{OBS_SYSTEM}|{key}"}

    def write(own: httpx.Client) -> httpx.Response:
        if interaction == "conditional create":
            headers = {"If-None-Exist": urlencode(criteria)}
            return own.post("/Observation", json=observation(key), headers=headers)
        return own.put("/Observation", params=criteria, json=observation(key))

    _inject(admin, {"delay_s": 0.5, "count": 1})  # the first write is received, then waits
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(write(_client_of(server))))
    slow.start()
    wait_for(lambda: admin.get("/_admin/faults").json()["remaining"] == 0)
    assert write(client).status_code == 201  # overtakes it and creates the resource
    slow.join()
    diagnostics = outcome(answers[0], 409)
    assert "HAPI-2745" in diagnostics
    assert write(client).status_code == 200  # a retry, now in sequence, finds it
    assert len(ids_of(searchset(client, "/Observation", **criteria))) == 1  # one resource


def _client_of(server: ThreadedServer) -> httpx.Client:
    return httpx.Client(base_url=f"{server.base_url}/fhir", timeout=10)


def test_down_fault_refuses_everything_until_cleared(
    client: httpx.Client, admin: httpx.Client
) -> None:
    _inject(admin, {"down_for_s": 30})
    down = client.get("/metadata")
    outcome(down, 503)
    assert int(down.headers["retry-after"]) > 0
    outcome(client.get("/Observation"), 503)
    outcome(client.post("/Observation", json=observation("d")), 503)
    assert admin.delete("/_admin/faults").status_code == 200
    assert client.get("/metadata").status_code == 200


@pytest.mark.parametrize(
    "plan",
    [
        {},
        {"status": 200},
        {"colour": 1},
        {"count": 2},
        {"delay_s": -1},
        {"apply": True, "delay_s": 1},
        [1],
    ],
)
def test_bad_fault_plans_are_refused(admin: httpx.Client, plan: Any) -> None:
    outcome(admin.post("/_admin/faults", json=plan), 400)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_conditional_updates_make_one_resource(
    client: httpx.Client, server: ThreadedServer
) -> None:
    criteria = {"identifier": f"{OBS_SYSTEM}|race"}
    statuses: list[int] = []

    def writer() -> None:
        with httpx.Client(base_url=f"{server.base_url}/fhir", timeout=10) as own:
            for _ in range(10):
                statuses.append(
                    own.put("/Observation", params=criteria, json=observation("race")).status_code
                )

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One create; writers that overlapped it get HAPI's 409; every other write updates.
    assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 409}
    bundle = searchset(client, "/Observation", **criteria)
    assert bundle["total"] == 1
    versions = statuses.count(200) + 1
    assert bundle["entry"][0]["resource"]["meta"]["versionId"] == str(versions)


def test_store_is_thread_safe_and_its_clock_strictly_increases() -> None:
    store = FhirStore()

    def writer(worker: int) -> None:
        for n in range(200):
            store.write("Observation", f"w{worker}-{n}", observation(f"{worker}-{n}"))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.counts() == {"Observation": 1600}
    stamps = [
        store.history("Observation", f"w{w}-{n}")[0].last_updated_us
        for w in range(8)
        for n in range(200)
    ]
    assert len(set(stamps)) == 1600
    stored = store.read("Observation", "w3-7")
    assert stored is not None
    assert stored["identifier"][0]["value"] == "3-7"
    assert stored["meta"]["versionId"] == "1"


def test_last_updated_strictly_increases_even_if_the_clock_stalls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = FhirStore()
    frozen = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: frozen)
    versions = [store.write("Observation", "same", observation("clock")) for _ in range(3)]
    versions.append(store.write("Patient", "p", {"resourceType": "Patient"}))
    stamps = [v.last_updated for v in versions]
    assert stamps == sorted(set(stamps))  # "gt<last seen>" polling never misses a write
    assert [v.version_id for v in versions] == [1, 2, 3, 1]
