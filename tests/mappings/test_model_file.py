"""A model declared as a YAML file: loading, refusals, and the model end to end.

The model file is copied into a temporary folder outside the package and run
from an MLLP message to the Observation in the EHR stand-in; an answer outside
a declared output range is dead-lettered, never written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from conftest import all_resources, wait_for
from model_servers_fixture import RecordModel

from ehrbridge.adapters import load
from ehrbridge.adapters.declared_model import DeclaredModel
from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.adapters.mlflow_scoring import MlflowScoringClient
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.model_http import ModelEndpointSettings
from ehrbridge.adapters.oip_v2 import OipV2Client
from ehrbridge.bench.model_servers import MODEL_NAME
from ehrbridge.cli import main
from ehrbridge.config import SiteConfig, load_site_config, parse_site_config
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import ConfigError
from ehrbridge.mappings.loader import SITES_DIR
from ehrbridge.mappings.model_file import load_model_file
from ehrbridge.pipelines.process import ProcessStage
from ehrbridge.pipelines.records import Prediction
from ehrbridge.sandbox.run import BackgroundSandbox

REPO = Path(__file__).resolve().parents[2]
KFRE_4 = REPO / "models" / "kfre-4.yaml"
SITE = SITES_DIR / "eu-si-local-codes"
VECTOR = (SITE / "oru-kfre-vector.hl7").read_bytes()
# The published acceptance vector (tests/sandbox/test_kfre_vector.py), non-North-American.
RISK_2Y, RISK_5Y = 35.89, 82.12


def model_text(**changes: Any) -> str:
    """kfre-4.yaml renamed (a model the package does not know), with ``changes``."""
    data = yaml.safe_load(KFRE_4.read_text())
    data["model"]["name"] = "ckd-risk-local"
    data["endpoint"]["model"] = "kfre-4var"  # what the sandbox server serves
    for key, value in changes.items():
        data[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def site_text(model: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"site": "declared", "mapping": {"file": str(SITE / "mapping.yaml")}, "model": model}
    )


def test_the_shipped_kfre_4_file_loads_with_its_domain() -> None:
    model = load_model_file(KFRE_4)
    assert (model.model.name, model.endpoint.protocol) == ("kfre-4var", "oip-v2")
    assert model.calibrations is not None
    assert model.domain[:2] == ("age >= 18", "egfr < 60")
    assert "uacr in [0.1, 50000]" in model.domain  # a valid range is a domain rule


def test_an_unknown_field_in_a_model_file_names_file_line_and_field(tmp_path: Path) -> None:
    text = KFRE_4.read_text().replace("  timeout_s: 2.0", "  timeout: 2.0")
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_model_file(path)
    line = 1 + text.splitlines().index("  timeout: 2.0")
    assert (caught.value.file, caught.value.line) == (str(path), line)
    assert caught.value.field == "endpoint.timeout"


@pytest.mark.parametrize(
    ("old", "new", "field", "says"),
    [
        ("unit: mg/g,", "unit: mg/mmol,", "inputs[3]", "given in 'mg/g', not 'mg/mmol'"),
        ("{name: egfr,", "{name: cystatin,", "inputs[2]", "a feature record offers"),
        ("protocol: oip-v2", "protocol: grpc", "endpoint.protocol", "'oip-v2'"),
        ("unit: a,", "unit: a, required: false,", "inputs[0]", "optional inputs are not"),
        ("{min: 0, max: 1}}\n", "{min: 1, max: 0}}\n", "outputs[0].valid", "must not be above"),
    ],
)
def test_a_wrong_model_file_is_refused(
    tmp_path: Path, old: str, new: str, field: str, says: str
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(KFRE_4.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_model_file(path)
    assert caught.value.field == field
    assert says in str(caught.value)


def test_a_site_naming_a_model_file_without_its_calibration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.yaml").write_text(model_text())
    site = tmp_path / "site.yaml"
    site.write_text(site_text({"file": "models/m.yaml"}))  # relative to the site file
    with pytest.raises(ConfigError) as caught:
        load_site_config(site)
    assert (caught.value.file, caught.value.field) == (str(site), "model.calibration")
    assert "required for ckd-risk-local" in str(caught.value)


def test_a_calibration_the_model_file_does_not_list_is_refused(tmp_path: Path) -> None:
    calibrations = {"parameter": "calibration", "choices": ["north_american", "pooled"]}
    (tmp_path / "m.yaml").write_text(model_text(calibrations=calibrations))
    site = tmp_path / "site.yaml"
    site.write_text(site_text({"file": "m.yaml", "calibration": "non_north_american"}))
    with pytest.raises(ConfigError) as caught:
        load_site_config(site)
    assert caught.value.field == "model.calibration"
    assert "non_north_american is not a calibration of ckd-risk-local" in str(caught.value)


def test_a_site_takes_name_url_and_domain_from_its_model_file(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(model_text())
    site = tmp_path / "site.yaml"
    site.write_text(site_text({"file": "m.yaml", "calibration": "non_north_american"}))
    config = load_site_config(site)
    assert (config.model.name, config.model.url) == ("ckd-risk-local", "http://127.0.0.1:8091")
    assert [str(rule) for rule in config.mapping.domain][:2] == ["age >= 18", "egfr < 60"]
    assert load("model", "declared") is DeclaredModel


@pytest.mark.parametrize(
    ("protocol", "client"), [("oip-v2", OipV2Client), ("mlflow", MlflowScoringClient)]
)
def test_the_protocol_is_chosen_by_yaml_alone(protocol: str, client: type) -> None:
    endpoint = {"protocol": protocol, "url": "http://model.test"}
    config = parse_site_config(
        site_text(
            {
                "definition": yaml.safe_load(model_text(endpoint=endpoint)),
                "calibration": "north_american",
            }
        )
    )
    model = DeclaredModel(config.model)
    try:
        assert type(model._client) is client
    finally:
        model.close()


def out_of_range_server(request: httpx.Request) -> httpx.Response:
    """An OIP v2 server whose 5-year risk is 1.7: a broken model."""
    rows = orjson.loads(request.content)["inputs"][0]["shape"][0]
    outputs = [
        {"name": "risk_2y", "datatype": "FP64", "shape": [rows], "data": [0.3] * rows},
        {"name": "risk_5y", "datatype": "FP64", "shape": [rows], "data": [1.7] * rows},
    ]
    return httpx.Response(200, json={"model_name": "kfre-4var", "outputs": outputs})


def test_an_answer_out_of_its_range_is_dead_lettered_not_written(tmp_path: Path) -> None:
    config = parse_site_config(
        site_text(
            {
                "definition": yaml.safe_load(model_text()),
                "calibration": "non_north_american",
                "url": "http://model.test",
            }
        )
    )
    http = httpx.Client(transport=httpx.MockTransport(out_of_range_server))
    settings = ModelEndpointSettings(url="http://model.test", model="kfre-4var")
    model = DeclaredModel(config.model, client=OipV2Client(settings, client=http))
    stage = ProcessStage(config, MemoryStateStore(), model)
    envelope = Envelope("declared", "SI-0001", VECTOR, Kind.HL7V2, "SI-0001")
    [outcome] = stage.process([envelope])
    assert isinstance(outcome, Failure)  # the worker dead-letters a Failure, raw bytes kept
    assert outcome.envelope.payload == VECTOR
    assert outcome.error.reason == "model.out_of_range"
    assert "risk_5y: 1 of 1 answers outside the valid range [0, 1]" in str(outcome.error)


def declared_site(model_file: Path) -> Any:
    def configure(config: SiteConfig) -> SiteConfig:
        data = config.model_dump(mode="json")
        data["mapping"] = {"file": str(SITE / "mapping.yaml")}
        data["model"] = {
            "file": str(model_file),
            "url": config.model.url,
            "calibration": "non_north_american",
        }
        return parse_site_config(yaml.safe_dump(data), "declared-site.yaml")

    return configure


def component(observation: dict[str, Any], code: str) -> float:
    for part in observation["component"]:
        if part["code"]["coding"][0]["code"] == code:
            return float(part["valueQuantity"]["value"])
    raise KeyError(code)


def test_a_model_file_outside_the_package_runs_from_mllp_to_observation(tmp_path: Path) -> None:
    model_file = tmp_path / "elsewhere" / "ckd-risk-local.yaml"
    model_file.parent.mkdir()
    model_file.write_text(model_text())
    with BackgroundSandbox(tmp_path / "sandbox", configure=declared_site(model_file)) as running:
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
    # The non-North-American numbers of the published vector: the site's calibration was sent.
    assert component(observation, "kfre-risk-2y") == pytest.approx(RISK_2Y, abs=0.005)
    assert component(observation, "kfre-risk-5y") == pytest.approx(RISK_5Y, abs=0.005)
    assert "ckd-risk-local" in orjson.dumps(observation).decode()


# What each real server needs in the model file: its protocol, name and answer.
REAL_SERVERS = {
    "mlflow": ({"protocol": "mlflow"}, "predictions"),
    "mlserver": (
        {"protocol": "oip-v2", "model": MODEL_NAME, "layout": "matrix"},
        "predict_proba",
    ),
}


@pytest.mark.modelservers
@pytest.mark.parametrize("server", list(REAL_SERVERS))
def test_a_model_file_scores_on_a_real_model_server_named_by_yaml_alone(
    record_model_servers: RecordModel, server: str
) -> None:
    """A classifier trained here, served by `mlflow models serve` and by MLServer."""
    endpoint, output = REAL_SERVERS[server]
    answer = {"from": output, "index": 1, "unit": "1", "valid": {"min": 0, "max": 1}}
    url = record_model_servers.urls[server]
    definition = yaml.safe_load(
        model_text(
            endpoint={**endpoint, "url": url, "timeout_s": 60},
            # One classifier, one probability: both horizons carry it until outputs are free.
            outputs=[{"name": "risk_2y", **answer}, {"name": "risk_5y", **answer}],
        )
    )
    del definition["calibrations"]  # a trained classifier has no published calibrations
    config = parse_site_config(site_text({"definition": definition}))
    model = load("model", "declared")(config.model)
    try:
        envelope = Envelope("declared", "SI-0001", VECTOR, Kind.HL7V2, "SI-0001")
        [outcome] = ProcessStage(config, MemoryStateStore(), model).process([envelope])
    finally:
        model.close()
    assert isinstance(outcome, Envelope) and outcome.kind is Kind.PREDICTION
    prediction = Prediction.from_json(outcome.payload)
    f = prediction.features
    row = [[f["age"], 1.0 if bool(f["sex"]) else 0.0, f["egfr"], f["uacr"]]]
    expected = float(record_model_servers.model.estimator.predict_proba(row)[0][1])
    assert prediction.outputs["risk_2y"] == pytest.approx(expected, abs=1e-9)
    assert prediction.model.name == "ckd-risk-local"


def test_over_mllp_an_answer_out_of_range_is_a_dead_letter_and_no_observation(
    tmp_path: Path,
) -> None:
    """The vector's 2-year risk is 0.36; a model file that says at most 0.3 refuses it."""
    narrow = {"unit": "1", "valid": {"min": 0, "max": 0.3}}
    outputs = [
        {"name": "risk_2y", "from": "risk_2y", **narrow},
        {"name": "risk_5y", "from": "risk_5y", "unit": "1", "valid": {"min": 0, "max": 1}},
    ]
    model_file = tmp_path / "narrow.yaml"
    model_file.write_text(model_text(outputs=outputs))
    with BackgroundSandbox(tmp_path / "sandbox", configure=declared_site(model_file)) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            assert client.send(VECTOR).code == "AA"  # stored durably: the EHR's part is done
        api, operator = running.sandbox.api_url, running.sandbox.headers("operator")
        [letter] = wait_for(
            lambda: [
                r
                for r in httpx.get(f"{api}/api/dlq", headers=operator).json()["records"]
                if r["source_id"] == "SI-0001"
            ],
            what="the dead letter",
        )
        shown = httpx.get(f"{api}/api/dlq/{letter['offset']}", headers=operator).json()
        observations = all_resources(f"{running.sandbox.fhir_base}/Observation", {})
    assert letter["reason"] == "model.out_of_range"
    assert "risk_2y: 1 of 1 answers outside the valid range [0, 0.3]" in str(shown)
    assert shown["raw"].startswith("MSH|")  # the message, kept for a replay once fixed
    assert observations == []


def test_config_check_says_which_model_where_and_in_which_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.yaml").write_text(model_text())
    site = tmp_path / "site.yaml"
    site.write_text(site_text({"file": "m.yaml", "calibration": "non_north_american"}))
    assert main(["config", "check", str(site)]) == 0
    printed = capsys.readouterr().out
    assert f"model: ckd-risk-local 2016 from {tmp_path / 'm.yaml'} over oip-v2" in printed
    assert "calibration non_north_american; domain: age >= 18, egfr < 60" in printed
    assert "uacr in [0.1, 50000]" in printed


def test_mappings_explain_shows_the_model_files_domain_and_why_a_record_is_outside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = yaml.safe_load(KFRE_4.read_text())["inputs"]
    inputs[3]["valid"] = {"min": 0.1, "max": 1000}  # the vector's UACR is 1761.8 mg/g
    (tmp_path / "m.yaml").write_text(model_text(inputs=inputs))
    site = tmp_path / "site.yaml"
    site.write_text(site_text({"file": "m.yaml", "calibration": "non_north_american"}))
    message = SITE / "oru-kfre-vector.hl7"
    assert main(["mappings", "explain", "--site", str(site), str(message)]) == 0
    printed = capsys.readouterr().out
    assert "model: ckd-risk-local 2016 from" in printed
    assert "domain: age >= 18, egfr < 60, age in [18, 120]" in printed
    assert "out_of_range: uacr 1762 outside [0.1, 1000]" in printed
