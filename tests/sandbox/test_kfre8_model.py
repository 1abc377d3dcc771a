"""KFRE 8-variable as a model file, served by the sandbox model server over OIP v2.

The risks the server answers, on a real socket, are checked to 1e-4 against
the published rows of the shared corpus (lshpaner/kfre README) and against
the PyPI ``kfre`` package, an independent implementation used here as an
oracle only (a dev dependency the product never imports), for both
calibrations and both horizons. A patient reported in SI units and converted
with the unit table ehrbridge's mappings use gets the same risk.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from auth_tokens import cds_headers
from conftest import all_resources, wait_for
from kfre import RiskPredictor  # the oracle (dev dependency)

from ehrbridge._http import ThreadedServer
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.config import parse_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.mappings.model_file import load_model_file
from ehrbridge.mappings.schema import CANONICAL_UNITS, KFRE8_ANALYTES
from ehrbridge.mappings.units import known_unit
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_cli_site
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

REPO = Path(__file__).resolve().parents[2]
KFRE_8 = REPO / "models" / "kfre-8.yaml"
CORPUS = Path("/work/shared/corpus/kfre/lshpaner-kfre/test_vectors.json")
TOLERANCE = 1e-4
CALIBRATIONS = ("north_american", "non_north_american")
# The server's inputs, in the order of a row below.
COLUMNS = ("age", "male", "egfr", "uacr", "albumin", "phosphate", "bicarbonate", "calcium")

Row = tuple[float, bool, float, float, float, float, float, float]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with (
        ThreadedServer(create_model_app()) as server,
        httpx.Client(base_url=server.base_url, timeout=10) as client,
    ):
        yield client


def request(rows: list[Row], calibration: str) -> dict[str, Any]:
    columns = list(zip(*rows, strict=True))
    return {
        "inputs": [
            {
                "name": name,
                "datatype": "BOOL" if name == "male" else "FP64",
                "shape": [len(rows)],
                "data": list(column),
            }
            for name, column in zip(COLUMNS, columns, strict=True)
        ],
        "parameters": {"calibration": calibration},
    }


def infer(http: httpx.Client, rows: list[Row], calibration: str) -> dict[str, list[float]]:
    response = http.post("/v2/models/kfre-8var/infer", json=request(rows, calibration))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["parameters"] == {"calibration": calibration}
    return {output["name"]: output["data"] for output in body["outputs"]}


def oracle(row: Row, years: int, calibration: str) -> float:
    age, male, egfr, uacr, albumin, phosphate, bicarbonate, calcium = row
    risk = RiskPredictor().kfre_person(
        age, male, egfr, uacr, calibration == "north_american", years=years,
        albumin=albumin, phosphorous=phosphate, bicarbonate=bicarbonate, calcium=calcium,
    )  # fmt: skip
    return float(risk)


# ----------------------------------------------------------------------- the model file


def test_the_kfre8_file_declares_every_input_in_its_canonical_unit() -> None:
    model = load_model_file(KFRE_8)
    assert (model.model.name, model.endpoint.protocol) == ("kfre-8var", "oip-v2")
    assert "2011" in model.model.citation and "2016" in model.model.citation
    assert [i.sent_as for i in model.inputs] == list(COLUMNS)
    for name in KFRE8_ANALYTES:
        [declared] = [i for i in model.inputs if i.name == name]
        assert declared.unit == CANONICAL_UNITS[name]
        assert declared.valid is not None
    assert model.calibrations is not None and tuple(model.calibrations.choices) == CALIBRATIONS
    assert model.domain[:2] == ("age >= 18", "egfr < 60")
    assert "albumin in [1, 6]" in model.domain  # out of range: not scored
    assert [o.name for o in model.outputs] == ["risk_2y", "risk_5y"]


def test_the_server_states_the_units_the_file_declares(http: httpx.Client) -> None:
    model = load_model_file(KFRE_8)
    metadata = http.get("/v2/models/kfre-8var").json()
    served = {t["name"]: t["parameters"].get("unit") for t in metadata["inputs"]}
    declared = {i.sent_as: i.unit for i in model.inputs if i.type == "number"}
    assert {name: served[name] for name in declared} == declared
    assert set(served) == set(COLUMNS)


# ------------------------------------------------------------------ vectors and oracle


def test_the_published_rows_to_1e_4(http: httpx.Client) -> None:
    every = json.loads(CORPUS.read_text())["vectors"]
    vectors = [v for v in every if isinstance(v.get("expected"), dict)]  # 4-var rows: floats
    assert len(vectors) >= 5
    for vector in vectors:
        row = vector["inputs"]
        patient: Row = (
            row["age"], bool(row["male"]), row["eGFR"], row["uACR_mg_g"], row["albumin_g_dL"],
            row["phosphorous_mg_dL"], row["bicarbonate_mEq_L"], row["calcium_mg_dL"],
        )  # fmt: skip
        calibration = CALIBRATIONS[0] if row["north_american"] else CALIBRATIONS[1]
        risks = infer(http, [patient], calibration)
        assert abs(risks["risk_2y"][0] - vector["expected"]["8var_2y"]) < TOLERANCE
        assert abs(risks["risk_5y"][0] - vector["expected"]["8var_5y"]) < TOLERANCE


def patient(rng: random.Random) -> Row:
    """Adults with CKD G3-G5 and analytes from severe to normal, in the equation's units."""
    return (
        rng.uniform(18, 95), rng.random() < 0.5, rng.uniform(5, 59.9),
        rng.lognormvariate(4.5, 1.5), rng.uniform(2.0, 5.2), rng.uniform(2.0, 8.0),
        rng.uniform(12, 34), rng.uniform(7.0, 11.5),
    )  # fmt: skip


def patients(count: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    return [patient(rng) for _ in range(count)]


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_a_batch_agrees_with_the_kfre_package(http: httpx.Client, calibration: str) -> None:
    rows = patients(60, seed=len(calibration))
    risks = infer(http, rows, calibration)
    worst = max(
        abs(risks[f"risk_{years}y"][i] - oracle(row, years, calibration))
        for i, row in enumerate(rows)
        for years in (2, 5)
    )
    assert worst < TOLERANCE


def test_the_calibrations_are_the_8_variable_models_own(http: httpx.Client) -> None:
    [row] = patients(1, seed=3)
    north = infer(http, [row], "north_american")
    other = infer(http, [row], "non_north_american")
    assert north != other
    # Not the 4-variable baselines: the non-North-American 5-year risk is the higher one here.
    assert other["risk_5y"][0] > north["risk_5y"][0]
    assert abs(other["risk_5y"][0] - oracle(row, 5, "non_north_american")) < TOLERANCE


def test_si_results_converted_by_the_unit_table_get_the_same_risk(http: httpx.Client) -> None:
    # Albumin 36 g/L, phosphate 1.55 mmol/L, bicarbonate 19 mEq/L, calcium 2.21 mmol/L.
    si = {"albumin": (36.0, "g/L"), "phosphate": (1.55, "mmol/L"),
          "bicarbonate": (19.0, "mEq/L"), "calcium": (2.21, "mmol/L")}  # fmt: skip
    converted = {}
    for name, (value, unit) in si.items():
        known = known_unit(name, unit)
        assert known is not None and known.factor is not None
        converted[name] = value * known.factor
    # Worked by hand: 3.6 g/dL, 1.55 x 3.0973762 = 4.80093 mg/dL, 19, 2.21 x 4.0078 = 8.85724.
    assert converted == pytest.approx(
        {"albumin": 3.6, "phosphate": 4.80093311, "bicarbonate": 19.0, "calcium": 8.857238}
    )
    row: Row = (72.0, False, 24.0, 410.0, *converted.values())  # type: ignore[assignment]
    risks = infer(http, [row], "non_north_american")
    assert abs(risks["risk_5y"][0] - oracle(row, 5, "non_north_american")) < TOLERANCE


# --------------------------------------------------------------- two models, one server


def test_kfre4_and_kfre8_are_served_side_by_side(http: httpx.Client) -> None:
    [row] = patients(1, seed=5)
    four = {
        "inputs": request([row], "north_american")["inputs"][:4],
        "parameters": {"calibration": "north_american"},
    }
    answer_4 = http.post("/v2/models/kfre-4var/infer", json=four)
    assert answer_4.status_code == 200
    assert answer_4.json()["model_name"] == "kfre-4var"
    eight = infer(http, [row], "north_american")
    assert answer_4.json()["outputs"][0]["data"] != eight["risk_2y"]
    assert http.get("/v2/models/kfre-8var/ready").json() == {"name": "kfre-8var", "ready": True}
    assert http.get("/v2/models/kfre-12var").status_code == 404


def test_kfre8_without_an_analyte_is_a_400_naming_it(http: httpx.Client) -> None:
    [row] = patients(1, seed=6)
    body = request([row], "north_american")
    body["inputs"] = [t for t in body["inputs"] if t["name"] != "calcium"]
    response = http.post("/v2/models/kfre-8var/infer", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "missing input(s): calcium"}


def test_kfre8_refuses_a_non_positive_analyte_without_echoing_it(http: httpx.Client) -> None:
    row: Row = (60.0, True, 30.0, 200.0, 4.0, -3.25, 25.0, 9.4)
    response = http.post("/v2/models/kfre-8var/infer", json=request([row], "north_american"))
    assert response.status_code == 400
    assert "phosphate" in response.json()["error"] and "3.25" not in response.text


def test_the_8_variable_model_can_be_left_out() -> None:
    with (
        ThreadedServer(create_model_app(kfre8_name=None)) as server,
        httpx.Client(base_url=server.base_url) as http,
    ):
        assert http.get("/v2/models/kfre-8var").status_code == 404
        assert http.get("/v2/models/kfre-4var").status_code == 200


def test_kfre8_ships_the_outcome_it_predicts() -> None:
    # `ehrbridge evaluate --model kfre-8var` judges it on the same outcome as KFRE-4.
    from ehrbridge.evaluation.outcomes import OutcomeSpec, builtin_outcome

    eight, four = (
        OutcomeSpec.model_validate(yaml.safe_load(builtin_outcome(name).read_text()))
        for name in ("kfre-8var", "kfre-4var")
    )
    assert eight.model == "kfre-8var"
    assert eight.model_copy(update={"model": "kfre-4var"}) == four
    outputs = {o.name for o in load_model_file(KFRE_8).outputs}
    assert {h.risk for h in eight.horizons.values()} == outputs


# -------------------------------------------- the sandbox site: KFRE-4 and KFRE-8 side by side

# The analytes as a European lab reports them; the sandbox site's mapping converts them.
SI_ANALYTES = {
    "albumin": (34.0, "g/L"),
    "phosphate": (1.61, "mmol/L"),
    "bicarbonate": (18.0, "mEq/L"),
    "calcium": (2.18, "mmol/L"),
}


side_by_side = sandbox_cli_site(("kfre-4var", "kfre-8var"))  # what `ehrbridge sandbox` runs


def two(found: list[Any]) -> list[Any] | None:
    return found if len(found) == 2 else None


def component(observation: dict[str, Any], code: str) -> float:
    [value] = [
        part["valueQuantity"]["value"]
        for part in observation["component"]
        if part["code"]["coding"][0]["code"] == code
    ]
    return float(value)


def test_the_sandbox_runs_kfre4_and_kfre8_side_by_side_on_one_site(tmp_path: Path) -> None:
    mrn = "MRN0008008"
    message = SyntheticEhr(patients=1).renal_oru_for(
        age=68.0, female=True, at=SyntheticEhr(patients=1).start, creatinine_umol_l=190,
        egfr=24, uacr_mg_mmol=45.0, serum=SI_ANALYTES, mrn=mrn, control_id="K8-1",
    )  # fmt: skip
    with BackgroundSandbox(tmp_path / "sandbox", configure=side_by_side) as running:
        sandbox = running.sandbox
        assert [m.name for m in sandbox.config.site_models] == ["kfre-4var", "kfre-8var"]
        with MllpClient("127.0.0.1", sandbox.mllp_port) as client:
            assert client.send(message).code == "AA"
        found = wait_for(
            lambda: two(
                all_resources(
                    f"{sandbox.fhir_base}/Observation",
                    {"patient.identifier": f"urn:ehrbridge:sandbox:mrn|{mrn}"},
                )
            ),
            what="one Observation per model",
        )
        orus = wait_for(
            lambda: two([r.message for r in sandbox.inbox.messages() if mrn.encode() in r.message]),
            what="one ORU^R01 per model at the results inbox",
        )
        cards = httpx.post(
            f"{sandbox.api_url}/cds-services/kfre-patient-view",
            json={
                "hook": "patient-view",
                "hookInstance": "6f3c0b1e-kfre8",
                "context": {"userId": "Practitioner/example", "patientId": mrn},
            },
            headers=cds_headers(running, sandbox.api_url),
            timeout=10,
        ).json()["cards"]
    by_code = {o["code"]["coding"][0]["code"]: o for o in found}
    assert set(by_code) == {"kfre-4var", "kfre-8var"}
    # KFRE-8 was sent each analyte converted by the site's factor, North American calibration.
    row: Row = (68.0, False, 24.0, 45.0 * 8.84, 3.4, 1.61 * 3.097, 18.0, 2.18 * 4.008)
    for years in (2, 5):
        expected = 100 * oracle(row, years, "north_american")
        # Rendered in percent to two decimals: within 0.005 points, i.e. 5e-5 of risk.
        observed = component(by_code["kfre-8var"], f"kfre8-risk-{years}y")
        assert observed == pytest.approx(expected, abs=0.0051)
    assert component(by_code["kfre-4var"], "kfre-risk-5y") != component(
        by_code["kfre-8var"], "kfre8-risk-5y"
    )
    # ORU^R01: KFRE-8 under its own OBR-4 and OBX-3 codes, beside KFRE-4's.
    [eight] = [m.decode() for m in orus if b"|KFRE8^" in m]
    assert "|KFRE8R2Y^" in eight and "|KFRE8R5Y^" in eight
    assert any(b"|KFRE^" in m and b"|KFRE2Y^" in m for m in orus)
    # CDS Hooks: one card per model, KFRE-8's saying so.
    summaries = [card["summary"] for card in cards]
    assert len(summaries) == 2
    assert any("(KFRE 8-variable)" in summary for summary in summaries)


def test_a_site_running_the_kfre8_file_survives_a_dump_and_a_reparse() -> None:
    # How the sandbox and the tests rewrite a site: dump it, change it, parse it again.
    text = (REPO / "sandbox" / "site.yaml").read_text()
    data = yaml.safe_load(text)
    data["mapping"]["model"] = "kfre-8var"  # a site running KFRE-8 alone
    data["model"] = {"file": str(KFRE_8), "url": "http://127.0.0.1:8091",
                     "calibration": "non_north_american"}  # fmt: skip
    config = parse_site_config(yaml.safe_dump(data))
    again = parse_site_config(yaml.safe_dump(config.model_dump(mode="json")))
    assert again.model == config.model and again.model.declared.model.name == "kfre-8var"
    # Both, but not the same model: still refused.
    dumped = config.model_dump(mode="json")
    dumped["model"]["definition"]["model"]["version"] = "2099"
    with pytest.raises(ConfigError, match="give 'file' or 'definition', not both"):
        parse_site_config(yaml.safe_dump(dumped))
