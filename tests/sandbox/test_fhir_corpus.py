"""Every FHIR JSON of the shared corpus, posted to ingest: accepted, or refused with a reason.

About 240 files: the R4 specification's examples (Bundles up to 2.5 MB,
Subscriptions, DiagnosticReports ...), US Core examples, the Inferno
Subscriptions test kit and whole-patient Synthea exports. Nothing may get a
500, every refusal must name its problem, every refused file must be in the
dead-letter store, and the endpoint must still serve afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import orjson
import pytest
from auth_tokens import headers as auth
from conftest import CORPUS
from fhir_validation import r4b

from ehrbridge.sandbox.run import BackgroundSandbox

FHIR_FILES = sorted((CORPUS / "fhir").rglob("*.json"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("fhir-corpus")) as running:
        yield running


def target(raw: bytes) -> str:
    """Where an integrator would post it: a resource to its type, anything else to the base."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "/fhir"
    kind = doc.get("resourceType") if isinstance(doc, dict) else None
    return (
        f"/fhir/{kind}"
        if isinstance(kind, str) and kind.isalpha() and kind != "Bundle"
        else "/fhir"
    )


def test_the_corpus_is_there() -> None:
    assert len(FHIR_FILES) > 200, "../shared/corpus/fhir is missing"


def test_every_corpus_file_is_accepted_or_refused_with_an_operation_outcome(
    sandbox: BackgroundSandbox,
) -> None:
    runtime = sandbox.sandbox.fhir_runtime
    assert runtime is not None
    base = sandbox.sandbox.fhir_site_url
    outcomes: Counter[int] = Counter()
    status_of: dict[str, int] = {}
    refused = 0
    with httpx.Client(timeout=60) as client:
        for path in FHIR_FILES:
            raw = path.read_bytes()
            response = client.post(
                f"{base}{target(raw)}",
                content=raw,
                headers={"content-type": "application/fhir+json", **auth(sandbox, "sender")},
            )
            where = path.relative_to(CORPUS)
            assert response.status_code in (200, 201, 400, 413, 422), (where, response.text[:300])
            body = response.json()
            outcomes[response.status_code] += 1
            status_of[path.name] = response.status_code
            if response.status_code >= 400:
                refused += 1
                assert body["resourceType"] == "OperationOutcome", where
                r4b(body)
                assert all(i["diagnostics"] for i in body["issue"]), where
            elif target(raw) == "/fhir" and body["resourceType"] == "Bundle":
                r4b(body)  # transaction-response / batch-response
                # A batch refuses entries one by one; each is dead-lettered too.
                refused += sum(1 for e in body["entry"] if e["response"]["status"][0] == "4")
        assert client.get(f"{base}/health").status_code == 200  # still serving
    dlq = runtime.log.read(runtime.topic("dlq"), limit=100_000)
    assert len(dlq) == refused
    assert outcomes[200] + outcomes[201] > 50, outcomes  # most of it is usable FHIR
    # The whole-patient Synthea exports are accepted whole, one record each.
    synthea = [p.name for p in FHIR_FILES if p.parent.name == "synthea-ckd"]
    assert len(synthea) == 4 and {status_of[name] for name in synthea} == {200}
    stored = runtime.log.read(runtime.topic("raw"), limit=100_000)
    stats = httpx.get(f"{base}/api/fhir", headers=auth(sandbox)).json()["ingest"]
    assert len(stored) == stats["records_stored"] >= outcomes[201] + len(synthea)
