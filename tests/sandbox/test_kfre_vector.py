"""The acceptance vector through a site mapping and the real model server.

A woman aged 57.28, creatinine 265 umol/L and UACR 199.3 mg/mmol, sent the way
the eu-si-local-codes laboratory sends it (local codes CREA / U-ACR, SI units,
no eGFR, the patient id from the UKCLJ PID-3 repetition, sex from ZPI-2), gives
eGFR 17.57 by CKD-EPI 2021 and KFRE 4-variable 35.89 % at 2 years and 82.12 % at
5 years with the non-North-American calibration.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import all_resources, wait_for

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.sqlite_state import SqliteStateStore
from ehrbridge.config import Calibration, SiteConfig, parse_site_config
from ehrbridge.core.contracts import Envelope, Kind
from ehrbridge.mappings.loader import SITES_DIR, load_mapping_file
from ehrbridge.pipelines.process import ProcessStage
from ehrbridge.pipelines.records import Prediction
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.sandbox.run import BackgroundSandbox

SITE = SITES_DIR / "eu-si-local-codes"
VECTOR = (SITE / "oru-kfre-vector.hl7").read_bytes()
# The acceptance values of the issue, to their published precision.
EGFR, RISK_2Y, RISK_5Y = 17.57, 35.89, 82.12


@pytest.fixture(scope="module")
def model_server() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_model_app()) as server:
        yield server


def site_config(model_url: str, data_dir: Path) -> SiteConfig:
    return parse_site_config(
        f"""
site: eu-si
data_dir: {data_dir}
mapping:
  file: {SITE / "mapping.yaml"}
model:
  url: {model_url}
  calibration: non_north_american
"""
    )


def test_the_vector_through_the_process_stage_and_the_model_server(
    model_server: ThreadedServer, tmp_path: Path
) -> None:
    config = site_config(model_server.base_url, tmp_path)
    state = SqliteStateStore(tmp_path / "state.sqlite")
    model = InferenceClient(config.model)
    try:
        stage = ProcessStage(config, state, model)
        envelope = Envelope("eu-si", "SI-0001", VECTOR, Kind.HL7V2, "SI-0001")
        [outcome] = stage.process([envelope])
    finally:
        model.close()
        state.close()
    assert isinstance(outcome, Envelope) and outcome.kind is Kind.PREDICTION
    prediction = Prediction.from_json(outcome.payload)
    assert prediction.patient_id == "U445566"
    assert prediction.patient_system == "urn:ehrbridge:example:ukclj:mrn"
    features = prediction.features
    assert (bool(features["sex"]), features.method("egfr")) == (False, "ckd-epi-2021")
    assert features["age"] == pytest.approx(57.28, abs=0.005)
    assert features["egfr"] == pytest.approx(EGFR, abs=0.005)
    assert features["uacr"] == pytest.approx(199.3 * 8.84, rel=1e-12)
    assert prediction.model.calibration == "non_north_american"
    assert prediction.outputs["risk_2y"] * 100 == pytest.approx(RISK_2Y, abs=0.005)
    assert prediction.outputs["risk_5y"] * 100 == pytest.approx(RISK_5Y, abs=0.005)
    assert prediction.mapping_version == "eu-si-local-codes-2026.1"


def eu_si_site(config: SiteConfig) -> SiteConfig:
    mapping = load_mapping_file(SITE / "mapping.yaml")
    model = config.model.model_copy(update={"calibration": Calibration.NON_NORTH_AMERICAN})
    return config.model_copy(update={"mapping": mapping, "model": model})


def component(observation: dict[str, Any], code: str) -> float:
    for part in observation["component"]:
        if part["code"]["coding"][0]["code"] == code:
            return float(part["valueQuantity"]["value"])
    raise KeyError(code)


def test_the_vector_over_mllp_ends_as_an_observation_in_the_ehr(tmp_path: Path) -> None:
    with BackgroundSandbox(tmp_path, configure=eu_si_site) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            ack = client.send(VECTOR)
        assert (ack.code, ack.control_id) == ("AA", "SI-0001")
        [observation] = wait_for(
            lambda: all_resources(
                f"{running.sandbox.fhir_base}/Observation",
                {"patient.identifier": "urn:ehrbridge:example:ukclj:mrn|U445566"},
            ),
            what="the risk Observation",
        )
    assert component(observation, "kfre-risk-2y") == pytest.approx(RISK_2Y, abs=0.005)
    assert component(observation, "kfre-risk-5y") == pytest.approx(RISK_5Y, abs=0.005)
    assert observation["effectiveDateTime"] == "2026-01-01T08:30:00+01:00"
    derived = {d["identifier"]["value"] for d in observation["derivedFrom"]}
    assert derived == {"SI-0001/OBX/3", "SI-0001/OBX/8"}  # CREA and U-ACR, nothing else
