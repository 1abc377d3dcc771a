"""CDS Hooks: discovery, and patient-view cards that show the stored prediction's numbers.

End to end on the sandbox: results arrive (HL7v2 over MLLP, or FHIR), are
scored and stored; the hook answers from the store. The card's numbers are
compared with the stored prediction, its indicator with the site's bands.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_tokens import cds_headers, headers
from conftest import CORPUS, wait_for
from predictions import prediction

from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.cds_hooks import SUMMARY_LIMIT, WITHHELD, CdsService, shown
from ehrbridge.config import Mode, ModelEndpoint, SiteConfig, load_site_config
from ehrbridge.pipelines.observation import build_observation, percent
from ehrbridge.pipelines.results import Delivery
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

SYNTHEA = (
    CORPUS / "fhir" / "synthea-ckd" / "Stewart_Stanton_e1c92057-888b-4d8a-a459-5c1c4eed82c7.json"
)
SYNTHEA_MRN = "e1c92057-888b-4d8a-a459-5c1c4eed82c7"
SYNTHEA_PATIENT_ID = "ecaea95c-46de-4ac9-a58d-4847d1a3e574"  # Patient.id in the export
SERVICE = "/cds-services/kfre-patient-view"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("cds")) as running:
        yield running


def hook(patient_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/example", "patientId": patient_id},
        **extra,
    }


def call(sandbox: BackgroundSandbox, api: str, body: dict[str, Any]) -> httpx.Response:
    """The hook, signed by the sandbox's EHR (a fresh JWT: each jti is taken once)."""
    auth = cds_headers(sandbox, api)
    return httpx.post(f"{api}{SERVICE}", json=body, headers=auth, timeout=10)


def stored(sandbox: BackgroundSandbox, api: str, patient: str) -> dict[str, Any]:
    results = httpx.get(
        f"{api}/api/results",
        params={"patient": patient, "limit": 1},
        headers=headers(sandbox, "viewer"),
    ).json()
    latest: dict[str, Any] = results["results"][0]
    return latest


def send_renal(sandbox: BackgroundSandbox, mrn: str, egfr: float, uacr: float) -> None:
    message = SyntheticEhr(patients=1).renal_oru_for(
        age=66,
        female=True,
        at=datetime(2026, 1, 10, tzinfo=UTC),
        egfr=egfr,
        uacr_mg_g=uacr,
        mrn=mrn,
        control_id=f"C{uuid.uuid4().hex[:10]}",
    )
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        assert client.send(message).code == "AA"


def expected_indicator(config: SiteConfig, risk_2y: float, risk_5y: float) -> str:
    """The first band of the model file's rendering the risks reach (the site sets none)."""
    assert config.writeback.interpretation is None
    rendering = config.model.declared.rendering
    assert rendering is not None
    risks = {"risk_2y": risk_2y, "risk_5y": risk_5y}
    band = next((b for b in rendering.interpretation if risks[b.output] >= b.at_least), None)
    code = band.code if band else "N"
    return {"HH": "critical", "H": "warning"}.get(code, "info")


def test_discovery_names_the_patient_view_service_and_its_prefetch(
    sandbox: BackgroundSandbox,
) -> None:
    services = httpx.get(f"{sandbox.sandbox.api_url}/cds-services").json()["services"]
    [service] = services
    assert service["hook"] == "patient-view" and service["id"] == "kfre-patient-view"
    assert service["description"] and service["title"]
    assert service["prefetch"] == {"patient": "Patient/{{context.patientId}}"}


@pytest.mark.parametrize(
    ("egfr", "uacr", "indicator"),
    [(11.0, 2400.0, "critical"), (30.0, 300.0, "warning"), (58.0, 12.0, "info")],
)
def test_the_card_shows_the_stored_prediction(
    sandbox: BackgroundSandbox, egfr: float, uacr: float, indicator: str
) -> None:
    api, mrn = sandbox.sandbox.api_url, f"M{uuid.uuid4().hex[:10]}"
    send_renal(sandbox, mrn, egfr, uacr)
    wait_for(
        lambda: httpx.get(
            f"{api}/api/results", params={"patient": mrn}, headers=headers(sandbox)
        ).json()["results"],
        what="a score",
    )
    result = stored(sandbox, api, mrn)
    response = call(sandbox, api, hook(mrn))
    assert response.status_code == 200
    [card] = response.json()["cards"]
    risk_2y, risk_5y = percent(result["risk_2y"]), percent(result["risk_5y"])
    assert card["summary"].startswith(
        f"Kidney failure risk {shown(risk_2y)} in 2 years, {shown(risk_5y)} in 5 years (KFRE)"
    )
    assert len(card["summary"]) < SUMMARY_LIMIT
    assert f"{risk_2y:.2f}%" in card["detail"] and f"{risk_5y:.2f}%" in card["detail"]
    config = sandbox.sandbox.config
    assert card["indicator"] == expected_indicator(config, result["risk_2y"], result["risk_5y"])
    assert card["indicator"] == indicator  # the three bands are all exercised
    name, version, _ = result["model"].split()
    assert name in card["source"]["label"] and version in card["source"]["label"]
    [link] = card["links"]
    assert link["type"] == "absolute" and link["url"].endswith(
        f"/ui/patients/{mrn}?result={result['identifier']}"
    )
    details = httpx.get(link["url"], headers=headers(sandbox, "viewer")).text  # the risk page
    assert f"Kidney failure risk within 2 years: {risk_2y:.1f}%" in details


def test_no_score_is_200_with_no_cards(sandbox: BackgroundSandbox) -> None:
    response = call(sandbox, sandbox.sandbox.api_url, hook("nobody-we-know"))
    assert response.status_code == 200 and response.json() == {"cards": []}


@pytest.mark.parametrize(
    "body",
    [
        {"hook": "order-select", "hookInstance": "x", "context": {"patientId": "1"}},
        {"hook": "patient-view", "hookInstance": "x", "context": {}},
        {"hook": "patient-view", "context": {"patientId": "1"}},
    ],
    ids=["another hook", "no patientId", "no hookInstance"],
)
def test_a_malformed_request_is_400(sandbox: BackgroundSandbox, body: dict[str, Any]) -> None:
    response = call(sandbox, sandbox.sandbox.api_url, body)
    assert response.status_code == 400 and response.json()["error"]


def test_a_fhir_patient_is_found_by_its_fhir_id_by_prefetch_or_by_reading_it(
    sandbox: BackgroundSandbox,
) -> None:
    api = sandbox.sandbox.fhir_site_url
    posted = httpx.post(
        f"{api}/fhir",
        content=SYNTHEA.read_bytes(),
        headers={"content-type": "application/fhir+json", **headers(sandbox, "sender")},
    )
    assert posted.status_code == 200
    wait_for(
        lambda: httpx.get(
            f"{api}/api/results", params={"patient": SYNTHEA_MRN}, headers=headers(sandbox)
        ).json()["results"],
        what="scores",
    )
    result = stored(sandbox, api, SYNTHEA_MRN)
    summary = f"Kidney failure risk {shown(percent(result['risk_2y']))} in 2 years"

    # 1. the Patient.id learned when the Bundle came in
    by_link = call(sandbox, api, hook(SYNTHEA_PATIENT_ID)).json()["cards"]
    assert by_link[0]["summary"].startswith(summary)
    # 2. prefetch: the EHR sends the Patient, whose identifier names the patient
    patient = {
        "resourceType": "Patient",
        "id": "ehr-42",
        "identifier": [{"system": "http://hospital.smarthealthit.org", "value": SYNTHEA_MRN}],
    }
    by_prefetch = call(sandbox, api, hook("ehr-42", prefetch={"patient": patient})).json()["cards"]
    assert by_prefetch[0]["summary"].startswith(summary)
    # 3. neither: read Patient/<id> from the site's own FHIR server
    fhir_base = sandbox.sandbox.fhir_base
    unsaved = {k: v for k, v in patient.items() if k != "id"}
    created = httpx.post(f"{fhir_base}/Patient", json=unsaved).json()
    read = call(sandbox, api, hook(created["id"], fhirServer=fhir_base)).json()["cards"]
    assert read[0]["summary"].startswith(summary)
    # ... but never from a server the request names that the site does not know
    elsewhere = call(sandbox, api, hook(created["id"], fhirServer="http://127.0.0.1:9/fhir")).json()
    assert elsewhere == {"cards": []}


# --------------------------------------------------------------------------- shadow mode


def shadow_service(tmp_path: Path, *, cards_in_shadow: bool) -> tuple[CdsService, str]:
    config = load_site_config(sandbox_site_file()).model_copy(update={"mode": Mode.SHADOW})
    config = config.model_copy(
        update={
            "cds_hooks": config.cds_hooks.model_copy(
                update={"cards_in_shadow_mode": cards_in_shadow}
            )
        }
    )
    store = SqliteResultStore(tmp_path / f"results-{cards_in_shadow}.sqlite")
    result = prediction(config, "MRN-SHADOW")
    store.upsert([(result, build_observation(result, config))], Delivery.SHADOW)
    return CdsService(config, store, state=MemoryStateStore()), "MRN-SHADOW"


def test_shadow_mode_shows_clinicians_nothing_unless_asked(tmp_path: Path) -> None:
    quiet, patient = shadow_service(tmp_path, cards_in_shadow=False)
    assert quiet.patient_view(hook(patient), "http://x/") == {"cards": []}
    pilot, patient = shadow_service(tmp_path, cards_in_shadow=True)
    [card] = pilot.patient_view(hook(patient), "http://x/")["cards"]
    result = pilot.results.latest(patient)
    assert result is not None
    assert card["indicator"] == expected_indicator(
        pilot.config, result.outputs["risk_2y"], result.outputs["risk_5y"]
    )
    assert card["links"][0]["url"] == f"http://x/ui/patients/{patient}?result={result.identifier}"


KFRE_4_FILE = Path(__file__).resolve().parents[2] / "models" / "kfre-4.yaml"


def test_a_card_states_the_model_files_intended_population(tmp_path: Path) -> None:
    """With a model file, the card says whom the number is valid for in the file's words."""
    config = load_site_config(sandbox_site_file())
    model = config.model.model_dump(mode="json") | {"file": str(KFRE_4_FILE)}
    model.pop("definition")
    config = config.model_copy(update={"model": ModelEndpoint.model_validate(model)})
    store = SqliteResultStore(tmp_path / "results.sqlite")
    result = prediction(config, "MRN-CARD")
    store.upsert([(result, build_observation(result, config))], Delivery.DELIVERED)
    service = CdsService(config, store, state=MemoryStateStore())
    [card] = service.patient_view(hook("MRN-CARD"), "http://x/")["cards"]
    assert "**Valid for:** Adults (18 or older) with CKD G3-G5" in card["detail"]
    assert "doi:10.1001/jama.2011.451" in card["detail"]


def test_without_the_patient_state_a_stored_score_gets_no_card(tmp_path: Path) -> None:
    """Whether the newest record left the domain is on the state: unseen, no score is shown."""
    config = load_site_config(sandbox_site_file())
    store = SqliteResultStore(tmp_path / "results.sqlite")
    result = prediction(config, "MRN-BLIND")
    store.upsert([(result, build_observation(result, config))], Delivery.DELIVERED)
    seeing = CdsService(config, store, state=MemoryStateStore())
    assert len(seeing.patient_view(hook("MRN-BLIND"), "http://x/")["cards"]) == 1
    answer = CdsService(config, store, state=None).patient_view(hook("MRN-BLIND"), "http://x/")
    assert answer["cards"] == [] and answer["extension"][WITHHELD]["served_by_role"] == "process"
