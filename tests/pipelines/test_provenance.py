"""The write-back transaction's URLs, built by hand for speed, equal the library's.

``full_url`` is RFC 4122 uuid5 and ``conditional_search`` is ``urlencode``:
``pipelines/provenance.py`` builds both without the library's objects and
caches only what every result shares (the Devices, the identifier systems).
A changed fullUrl or search string would make a replay write a second
resource instead of updating the first, so they must match exactly.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

import pytest
from predictions import MODEL, prediction

from ehrbridge.config import load_site_config
from ehrbridge.pipelines import provenance
from ehrbridge.pipelines.provenance import (
    conditional_search,
    device_url,
    full_url,
    model_device,
    result_transaction,
)
from ehrbridge.pipelines.records import ModelInfo
from ehrbridge.sandbox.run import sandbox_site_file

TEXTS = [
    "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "urn:ehrbridge:sandbox:prediction",
    "http://hospital.example/mrn",
    "MRN 0042/ä&x=y|z+%",
    "",
    " leading and trailing ",
]


@pytest.mark.parametrize("system", TEXTS)
@pytest.mark.parametrize("value", TEXTS)
def test_conditional_search_is_what_urlencode_writes(system: str, value: str) -> None:
    assert conditional_search(system, value) == urlencode({"identifier": f"{system}|{value}"})


@pytest.mark.parametrize("parts", [("Observation", *TEXTS[1::-1]), ("Provenance", "ehrbridge-x")])
def test_full_urls_are_rfc_4122_uuid5_in_ehrbridges_namespace(parts: tuple[str, ...]) -> None:
    expected = f"urn:uuid:{uuid.uuid5(provenance._NAMESPACE, '|'.join(parts))}"
    assert full_url(*parts) == provenance._uuid_url(*parts) == expected


def test_each_model_names_its_own_device_in_the_transaction() -> None:
    config = load_site_config(sandbox_site_file())
    other = ModelInfo("kfre-8var", "2.0.0", "non_north_american")
    for model in (MODEL, other, MODEL):
        bundle = result_transaction(prediction(config, model=model), config)
        urls = [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]
        observation = next(
            e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
        )
        assert urls[1] == device_url(model_device(model))
        assert observation["device"]["reference"] == urls[1]
