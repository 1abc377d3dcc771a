"""A model file from a folder outside the package takes an eGFR slope as an input.

Three renal panels of one patient, as HL7v2 ORU^R01 over two years, go through
the processing stage (parse, facts, state, features, model call, result). The
model file declares ``egfr_slope`` (slope per year over 730 days, 180 days of
span at least); the test reads the OIP v2 request the model was sent -- the
sandbox's model server scores only the models it knows, so the server is an
OIP v2 double in ``httpx.MockTransport`` (tests/model_double.py) that records
what it was sent. The slope is checked against a hand computation, and the
prediction rests on all three eGFR results (its derivedFrom).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from model_double import OipDouble

from ehrbridge.adapters.declared_model import DeclaredModel
from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.adapters.model_http import ModelEndpointSettings
from ehrbridge.adapters.oip_v2 import OipV2Client
from ehrbridge.config import load_site_config
from ehrbridge.core.contracts import Envelope, Kind
from ehrbridge.mappings.loader import SITES_DIR
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.process import ProcessStage
from ehrbridge.pipelines.records import Prediction

REPO = Path(__file__).resolve().parents[2]
SITE = SITES_DIR / "us-lab-loinc"
PANEL = (SITE / "oru-visit-2001.hl7").read_text()  # 2025-11-12: creatinine, eGFR 31, UACR
SLOPE_INPUT = {
    "name": "egfr_slope",
    "type": "number",
    "unit": "mL/min/{1.73_m2}/a",
    "aggregate": {
        "of": "egfr",
        "aggregation": "slope_per_year",
        "window_days": 730,
        "min_span_days": 180,
    },
}


def panel(day: str, egfr: int, number: int) -> bytes:
    """The site's renal panel on another day, with another eGFR and message id."""
    text = PANEL.replace("20251112", day).replace("|31|", f"|{egfr}|")
    text = text.replace("US-0101", f"US-01{number:02d}").replace("V2001", f"V20{number:02d}")
    return text.replace("\n", "\r").encode()


class RecordingDouble(OipDouble):
    """The OIP v2 double, keeping each request's input tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, list[Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = orjson.loads(request.content)
            self.sent.append({t["name"]: t["data"] for t in body["inputs"]})
        return super().__call__(request)


def slope_model(folder: Path) -> Path:
    data = yaml.safe_load((REPO / "models" / "kfre-4.yaml").read_text())
    data["model"]["name"] = "ckd-slope-toy"
    data["inputs"].append(SLOPE_INPUT)
    del data["rendering"]
    folder.mkdir()
    path = folder / "ckd-slope-toy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[tuple[ProcessStage, RecordingDouble]]:
    model_file = slope_model(tmp_path / "elsewhere")
    site = tmp_path / "site.yaml"
    site.write_text(
        f"site: us\ndata_dir: {tmp_path / 'data'}\n"
        f"mapping: {{file: {SITE / 'mapping.yaml'}}}\n"
        f"model: {{file: {model_file}, url: 'https://model.test', calibration: north_american}}\n"
    )
    config = load_site_config(site)
    double = RecordingDouble()
    http = httpx.Client(transport=httpx.MockTransport(double))
    settings = ModelEndpointSettings(url="https://model.test", model="ckd-slope-toy")
    model = DeclaredModel(config.model, client=OipV2Client(settings, client=http))
    state = MemoryStateStore()
    yield ProcessStage(config, state, model), double
    model.close()
    state.close()


def run(stage: ProcessStage, message: bytes, number: int) -> list[Prediction]:
    outcomes = stage.process([Envelope("us", f"m{number}", message, Kind.HL7V2, "MRN00789")])
    return [Prediction.from_json(o.payload) for o in outcomes if isinstance(o, Envelope)]


def test_the_model_is_sent_the_egfr_slope_its_file_declares(
    stage: tuple[ProcessStage, RecordingDouble],
) -> None:
    process, double = stage
    # A first panel alone has no slope: not enough data, and no request to the model.
    assert run(process, panel("20231120", 50, 1), 1) == []  # 723 days before the last
    assert double.sent == []
    kept = process.state.get("MRN00789")
    assert kept is not None and kept.last_outcome["not_enough_data"] == {
        "egfr_slope": "1 egfr result in the window; a slope needs results at 2 or more times"
    }
    run(process, panel("20250513", 44, 2), 2)
    [prediction] = run(process, panel("20251112", 41, 3), 3)
    # t (years before the last panel) = -723/365.2425, -183/365.2425, 0
    #   = -1.979507, -0.501037, 0; mean -0.826848; eGFR 50, 44, 41, mean 45.
    # sum dt*dv = (-1.152659)(5) + (0.325811)(-1) + (0.826848)(-4) = -9.396497
    # sum dt^2 = 1.328623 + 0.106153 + 0.683678 = 2.118453 -> slope -4.43555 per year.
    sent = double.sent[-1]
    assert sent["egfr_slope"] == [pytest.approx(-4.43555, abs=1e-4)]
    assert sent["egfr"] == [41] and prediction.features["egfr_slope"] == sent["egfr_slope"][0]
    # The result rests on all three eGFR results, which the Observation lists.
    slope_refs = prediction.features.aggregated["egfr_slope"]
    assert [r.split("/")[0] for r in slope_refs] == ["US-0101", "US-0102", "US-0103"]
    observation = build_observation(prediction, process.config)
    derived = str(observation["derivedFrom"])
    assert all(r.split("/")[0] in derived for r in slope_refs)
