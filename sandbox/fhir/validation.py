"""Structural validation of resources (400 for syntax, 422 for content rules)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ehrbridge.sandbox.fhir.errors import FhirProblem, bad_request
from ehrbridge.sandbox.fhir.spec import ID_RE, OBSERVATION_STATUSES, R4_RESOURCE_TYPES, short


def validate_resource(resource: object, resource_type: str) -> dict[str, Any]:
    """Structural checks of a resource sent for ``resource_type``; returns it."""
    if not isinstance(resource, dict):
        raise bad_request(f"a {resource_type} resource must be a JSON object", code="structure")
    found = resource.get("resourceType")
    if found is None:
        raise bad_request("resourceType is missing", code="required", expression=resource_type)
    if found != resource_type:
        raise bad_request(
            f"resourceType '{short(found)}' does not match the type in the URL, '{resource_type}'",
            expression=f"{resource_type}.resourceType",
        )
    resource_id = resource.get("id")
    if resource_id is not None and not (isinstance(resource_id, str) and ID_RE.match(resource_id)):
        raise bad_request(
            f"{resource_type}.id '{short(resource_id)}' is not a FHIR id ([A-Za-z0-9-.]{{1,64}})",
            expression=f"{resource_type}.id",
        )
    if "meta" in resource and not isinstance(resource["meta"], dict):
        raise bad_request(f"{resource_type}.meta must be an object", code="structure")
    if resource_type == "Observation":
        _validate_observation(resource)
    return resource


def _validate_observation(resource: Mapping[str, Any]) -> None:
    allowed = "|".join(OBSERVATION_STATUSES)
    status = resource.get("status")
    if status is None:
        raise FhirProblem(
            422,
            "required",
            f"Observation.status is required (1..1; {allowed})",
            expression="Observation.status",
        )
    if status not in OBSERVATION_STATUSES:
        raise FhirProblem(
            422,
            "code-invalid",
            f"Observation.status '{short(status)}' is not in the R4 value set "
            f"observation-status ({allowed})",
            expression="Observation.status",
        )
    code = resource.get("code")
    if code is None:
        raise FhirProblem(
            422,
            "required",
            "Observation.code is required (1..1 CodeableConcept)",
            expression="Observation.code",
        )
    if not isinstance(code, dict) or not code:
        raise FhirProblem(
            422,
            "structure",
            "Observation.code must be a non-empty CodeableConcept object",
            expression="Observation.code",
        )
    if "coding" in code and not (
        isinstance(code["coding"], list) and all(isinstance(c, dict) for c in code["coding"])
    ):
        raise FhirProblem(
            422,
            "structure",
            "Observation.code.coding must be an array of Coding objects",
            expression="Observation.code.coding",
        )


def check_type(resource_type: str) -> str:
    if resource_type not in R4_RESOURCE_TYPES:
        raise FhirProblem(
            404, "not-supported", f"'{short(resource_type)}' is not a FHIR R4 resource type"
        )
    return resource_type


def check_id(resource_type: str, resource_id: str) -> str:
    if not ID_RE.match(resource_id):
        raise bad_request(
            f"'{short(resource_id)}' is not a valid {resource_type} id ([A-Za-z0-9-.]{{1,64}})"
        )
    return resource_id


def etag_version(etag: str) -> str:
    """``W/"3"`` -> ``3`` (If-Match / Bundle.entry.request.ifMatch)."""
    text = etag.strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"')
