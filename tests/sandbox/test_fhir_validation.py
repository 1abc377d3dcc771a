"""Every FHIR shape ehrbridge builds passes two validators and survives a round trip.

fhir.resources (R4B models) and the npm ``fhir`` package (FHIR.js, which also
checks required value-set bindings). Round trip: dump → validate → equal.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from fhir_validation import assert_npm_valid, assert_round_trip, r4b
from predictions import prediction

from ehrbridge.adapters.fhir_sink import merge_transactions
from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.fhir_api import capability_statement
from ehrbridge.pipelines.fhir_ingest import Issue, operation_outcome
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.provenance import (
    build_provenance,
    ehrbridge_device,
    model_device,
    result_transaction,
)
from ehrbridge.sandbox.run import sandbox_fhir_site_file, sandbox_site_file


@pytest.fixture(params=["hl7v2-site", "fhir-site"])
def config(request: pytest.FixtureRequest) -> SiteConfig:
    path = sandbox_site_file() if request.param == "hl7v2-site" else sandbox_fhir_site_file()
    return load_site_config(path)


def shapes(config: SiteConfig) -> list[dict[str, Any]]:
    """One of everything we build, over low, middle and high risks."""
    built: list[dict[str, Any]] = []
    for n, (risk_2y, risk_5y) in enumerate([(0.0001, 0.0003), (0.06, 0.18), (0.73, 0.98)]):
        result = prediction(config, f"MRN-{n}", risk_2y=risk_2y, risk_5y=risk_5y)
        observation = build_observation(result, config)
        built.append(observation)
        built.append(
            build_provenance(
                result, config, target="Observation/1", devices=("Device/a", "Device/b")
            )
        )
        built.append(result_transaction(result, config, observation))
    built += [ehrbridge_device(), model_device(prediction(config).model)]
    built.append(
        merge_transactions(
            [result_transaction(prediction(config, f"M{n}"), config) for n in range(3)]
        )
    )
    return built


def test_everything_we_build_is_valid_r4_and_round_trips(config: SiteConfig) -> None:
    for resource in shapes(config):
        r4b(resource)
        assert_round_trip(resource)


def test_everything_we_build_passes_the_npm_fhir_validator(config: SiteConfig) -> None:
    resources = shapes(config)
    nested = [e["resource"] for r in resources if r["resourceType"] == "Bundle" for e in r["entry"]]
    assert_npm_valid(resources + nested)


def test_a_comparator_input_is_shown_in_derived_from_and_provenance(config: SiteConfig) -> None:
    result = prediction(config)
    egfr, uacr = result.features.inputs
    bound = replace(egfr, comparator=">", value=90.0)  # eGFR reported as >90
    changed = replace(result, features=replace(result.features, inputs=(bound, uacr)))
    bundle = result_transaction(changed, config)
    assert ">90" in bundle["entry"][3]["resource"]["derivedFrom"][0]["display"]
    assert_round_trip(bundle)
    assert_npm_valid([bundle])


def test_what_the_ingest_endpoint_answers_is_valid_r4() -> None:
    config = load_site_config(sandbox_fhir_site_file())
    answers: list[dict[str, Any]] = [
        capability_statement(config, "http://127.0.0.1:8081/"),
        operation_outcome(
            [
                Issue(
                    "required",
                    "Observation.subject is required",
                    "Bundle.entry[3].resource.subject",
                ),
                Issue("informational", "stored", severity="information"),
            ]
        ),
        {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {"response": {"status": "201 Created", "location": "http://x/fhir/Observation/1"}},
                {"response": {"status": "200 OK"}},
            ],
        },
        {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [
                {
                    "response": {
                        "status": "422 Unprocessable Entity",
                        "outcome": operation_outcome([Issue("required", "no subject")]),
                    }
                }
            ],
        },
    ]
    for answer in answers:
        assert_round_trip(answer)
    assert_npm_valid(answers)
