"""Several models on one site, and a model whose outputs no code knows by name.

A site lists two models under ``models:``: the shipped KFRE-4 and a model
file from a temporary folder outside the package whose only output is called
``progression`` -- a name nothing in ehrbridge knows -- and which has no
``rendering`` section. One renal ORU^R01 over MLLP must give one Observation
per model in the EHR stand-in, each with its own code and components, and
each model's results must be listed apart by the API (``?model=``).
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import all_resources, wait_for
from predictions import MODEL, prediction

from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.cds_hooks import CdsService
from ehrbridge.cli import _parser as cli_parser
from ehrbridge.config import Mode, SiteConfig, load_site_config, parse_site_config
from ehrbridge.mappings.loader import SITES_DIR
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.records import ModelInfo
from ehrbridge.pipelines.results import Delivery
from ehrbridge.promotion import mode_path
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_cli_site, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

REPO = Path(__file__).resolve().parents[2]
KFRE_4 = REPO / "models" / "kfre-4.yaml"
SITE = SITES_DIR / "eu-si-local-codes"
VECTOR = (SITE / "oru-kfre-vector.hl7").read_bytes()
RISK_5Y = 82.12  # the published vector's 5-year risk, non-North-American (percent)
MRN = "urn:ehrbridge:example:ukclj:mrn|U445566"


def toy_model() -> str:
    """A model file the package has never seen: one output, ``progression``, no rendering."""
    data = yaml.safe_load(KFRE_4.read_text())
    data["model"]["name"] = "progression-toy"
    data["endpoint"]["model"] = "kfre-4var"  # what the sandbox server serves
    data["outputs"] = [
        {"name": "progression", "from": "risk_5y", "unit": "1", "valid": {"min": 0, "max": 1}}
    ]
    del data["rendering"]
    return yaml.safe_dump(data, sort_keys=False)


def two_models(toy: Path) -> Any:
    def configure(config: SiteConfig) -> SiteConfig:
        data = config.model_dump(mode="json")
        url = config.model.url
        data["mapping"] = {"file": str(SITE / "mapping.yaml")}
        del data["model"]
        data["models"] = [
            {"url": url, "name": "kfre-4var", "calibration": "non_north_american"},
            {"file": str(toy), "url": url, "calibration": "non_north_american"},
        ]
        return parse_site_config(yaml.safe_dump(data), "two-models.yaml")

    return configure


def two_or_none(found: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return found if len(found) == 2 else None


def coded(observation: dict[str, Any]) -> str:
    return str(observation["code"]["coding"][0]["code"])


def values(observation: dict[str, Any]) -> dict[str, float]:
    return {
        part["code"]["coding"][0]["code"]: float(part["valueQuantity"]["value"])
        for part in observation["component"]
    }


def test_two_models_on_one_site_each_write_their_own_observation(tmp_path: Path) -> None:
    toy = tmp_path / "elsewhere" / "progression-toy.yaml"
    toy.parent.mkdir()
    toy.write_text(toy_model())
    with BackgroundSandbox(tmp_path / "sandbox", configure=two_models(toy)) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            assert client.send(VECTOR).code == "AA"
        fhir = running.sandbox.fhir_base
        found = wait_for(
            lambda: two_or_none(all_resources(f"{fhir}/Observation", {"patient.identifier": MRN})),
            what="one Observation per model",
        )
        api, viewer = running.sandbox.api_url, running.sandbox.headers("viewer")
        toy_results = httpx.get(
            f"{api}/api/results", params={"model": "progression-toy"}, headers=viewer
        ).json()
        kfre_results = httpx.get(
            f"{api}/api/results", params={"model": "kfre-4var"}, headers=viewer
        ).json()
    by_code = {coded(o): o for o in found}
    assert set(by_code) == {"kfre-4var", "progression-toy"}
    kfre, toy_observation = values(by_code["kfre-4var"]), values(by_code["progression-toy"])
    assert set(kfre) == {"kfre-risk-2y", "kfre-risk-5y"}
    # The toy reads the same server's 5-year risk: the same number, under its own code.
    assert toy_observation == {"progression-toy-progression": pytest.approx(RISK_5Y, abs=0.005)}
    assert kfre["kfre-risk-5y"] == pytest.approx(RISK_5Y, abs=0.005)
    assert by_code["progression-toy"]["identifier"] != by_code["kfre-4var"]["identifier"]
    [toy_result] = toy_results["results"]
    assert toy_results["total"] == 1 and toy_result["model"].startswith("progression-toy ")
    assert toy_result["progression_percent"] == pytest.approx(RISK_5Y, abs=0.005)
    assert "risk_2y" not in toy_result
    [kfre_result] = kfre_results["results"]
    assert kfre_result["risk_5y_percent"] == pytest.approx(RISK_5Y, abs=0.005)


def test_a_site_gives_model_or_models_not_both() -> None:
    data = yaml.safe_load((REPO / "sandbox" / "site.yaml").read_text())
    first = data.pop("model")
    data["models"] = [first]
    data["model"] = {**first, "url": "http://127.0.0.1:1"}  # not the first of `models`
    with pytest.raises(Exception, match="'model' \\(one model\\) or 'models'"):
        parse_site_config(yaml.safe_dump(data))
    del data["model"]
    data["models"] = [first, {**first, "url": "http://127.0.0.1:1"}]
    with pytest.raises(Exception, match="each model once by name"):
        parse_site_config(yaml.safe_dump(data))


# What `ehrbridge sandbox` runs unless --models says otherwise (its default).
kfre_4_and_8 = sandbox_cli_site(("kfre-4var", "kfre-8var"))


def test_the_sandbox_command_runs_both_kfre_models_by_default() -> None:
    args = cli_parser().parse_args(["sandbox"])
    assert args.models == "kfre-4var,kfre-8var"


def test_the_sandbox_runs_kfre_4_and_kfre_8_side_by_side(tmp_path: Path) -> None:
    """One renal panel with KFRE-8's analytes: two results, from the sandbox's model server."""
    ehr = SyntheticEhr(patients=1)
    serum = {
        "albumin": (38.0, "g/L"),
        "phosphate": (1.6, "mmol/L"),
        "bicarbonate": (21.0, "mmol/L"),
        "calcium": (2.3, "mmol/L"),
    }
    at = datetime(2026, 1, 1, tzinfo=UTC)
    message = ehr.renal_oru_for(
        mrn="SIDE1", control_id="SIDE-1", age=66, female=False, at=at,
        creatinine_umol_l=265, uacr_mg_mmol=40.0, serum=serum,
    )  # fmt: skip
    with BackgroundSandbox(tmp_path / "sandbox", configure=kfre_4_and_8) as running:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            assert client.send(message).code == "AA"
        fhir = running.sandbox.fhir_base
        found = wait_for(
            lambda: two_or_none(
                all_resources(
                    f"{fhir}/Observation", {"patient.identifier": "urn:ehrbridge:sandbox:mrn|SIDE1"}
                )
            ),
            what="a KFRE-4 and a KFRE-8 Observation",
        )
        api, viewer = running.sandbox.api_url, running.sandbox.headers("viewer")
        listed = {
            name: httpx.get(
                f"{api}/api/results", params={"model": name, "patient": "SIDE1"}, headers=viewer
            ).json()["total"]
            for name in ("kfre-4var", "kfre-8var")
        }
    by_code = {coded(o): values(o) for o in found}
    assert set(by_code) == {"kfre-4var", "kfre-8var"}
    assert set(by_code["kfre-8var"]) == {"kfre8-risk-2y", "kfre8-risk-5y"}
    # Two equations on the same patient: two different numbers, each its own Observation.
    assert by_code["kfre-8var"]["kfre8-risk-5y"] != by_code["kfre-4var"]["kfre-risk-5y"]
    assert listed == {"kfre-4var": 1, "kfre-8var": 1}


HOOK = {
    "hook": "patient-view",
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "context": {"userId": "Practitioner/example", "patientId": "MRN-MODES"},
}


def test_each_model_shows_cards_in_its_own_mode(tmp_path: Path) -> None:
    """The first model in shadow must not hide the cards of a second one promoted to live."""
    config = kfre_4_and_8(load_site_config(sandbox_site_file()))
    config = config.model_copy(update={"mode": Mode.SHADOW, "data_dir": tmp_path})
    live = mode_path(tmp_path, "kfre-8var")
    live.parent.mkdir()
    live.write_text(json.dumps({"model": "kfre-8var", "mode": "live"}))
    store = SqliteResultStore(tmp_path / "results.sqlite")
    for info in (MODEL, ModelInfo("kfre-8var", "2016", "north_american")):
        result = prediction(config, "MRN-MODES", model=info)
        store.upsert([(result, build_observation(result, config))], Delivery.SHADOW)
    service = CdsService(config, store, state=MemoryStateStore())
    [card] = service.patient_view(HOOK, "http://x/")["cards"]
    assert card["source"]["topic"]["code"] == "kfre-8var"  # KFRE-4's stays hidden in shadow
    live.write_text(json.dumps({"model": "kfre-8var", "mode": "shadow"}))
    os.utime(live, ns=(time.time_ns() + 10**9,) * 2)  # a new stamp even within the same tick
    assert service.patient_view(HOOK, "http://x/") == {"cards": []}  # demoted: none at all
