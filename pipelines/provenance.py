"""One result as a FHIR R4 transaction: the risk Observation, its Provenance and Devices.

A clinician trusts a score when they can see what produced it. Every result
goes to the EHR as one transaction Bundle (https://hl7.org/fhir/R4/http.html#transaction),
all or nothing, holding

* the two **Devices** that produced it (shared by every result, so written
  by conditional create, ``ifNoneExist: identifier=...``): ehrbridge itself
  (identifier ``urn:ehrbridge:device|ehrbridge/<version>``) and the model
  (``urn:ehrbridge:model|<name>/<version>/<calibration>``), in the style of
  HL7's AI Transparency on FHIR: a model is a Device with a name and version;
* the risk **Observation** (``pipelines/observation.py``), written by
  conditional update on its deterministic identifier
  (``PUT Observation?identifier=<system>|<value>``), so a replay updates it
  instead of adding a second one; its ``device`` names the model Device;
* a **Provenance** whose ``target`` is the Observation, ``agent`` the
  ehrbridge Device (assembler) and the model Device (performer), ``entity``
  the input lab results (role ``source``, by identifier, as in
  ``Observation.derivedFrom``), and ``policy`` the site mapping and its
  version (``urn:ehrbridge:mapping:<site>:<version>``). R4 Provenance has no
  ``identifier`` to be conditional on, so it is written with a
  deterministic, client-assigned id (``PUT Provenance/ehrbridge-<identifier>``,
  update-as-create): a replay updates the same Provenance.

The Observation's ``subject`` follows ``writeback.subject``: a conditional
reference ``Patient?identifier=...`` resolved by the server (default), or a
conditional create of the Patient first (``reference-or-create``), or the
identifier alone (see :func:`subject_reference`).

Within the transaction the Observation and Devices are referenced by
``urn:uuid:`` fullUrls derived from their identifiers (uuid5), which the
server resolves to the ids it assigns or finds (http.html#trules).

Built as plain dicts, like the Observation: the tests validate every shape
with fhir.resources (R4B) and the npm ``fhir`` validator.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus

from ehrbridge.config import SiteConfig
from ehrbridge.core.bounded_cache import short_key_cache
from ehrbridge.core.version import __version__
from ehrbridge.pipelines.observation import build_observation, fact_identifier_system
from ehrbridge.pipelines.records import ModelInfo, Prediction

DEVICE_SYSTEM = "urn:ehrbridge:device"
MODEL_SYSTEM = "urn:ehrbridge:model"
PARTICIPANT_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_NAMESPACE = uuid.UUID("6f1b3c57-8a0e-4c0a-9b1e-2d6a1f3e5c70")  # ehrbridge's uuid5 namespace
_NAMESPACE_BYTES = _NAMESPACE.bytes


# Cached: every result's transaction names the same two Devices, and uuid5 and
# urlencode were half the cost of building one (write-back profile, 250 msg/s).
@short_key_cache(maxsize=4096, max_chars=512)
def full_url(*parts: str) -> str:
    """A stable ``urn:uuid:`` for a resource within a transaction."""
    return _uuid_url(*parts)


def _uuid_url(*parts: str) -> str:
    """:func:`full_url` uncached, for names seen once (each result's own resources).

    ``uuid.uuid5`` by hand (RFC 4122 §4.3: SHA-1 of namespace and name, version 5,
    variant 10xx), the same value without building a ``UUID`` object.
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + "|".join(parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def provenance_id(prediction: Prediction) -> str:
    # FHIR ids: [A-Za-z0-9\-\.]{1,64}; the identifier is 32 hex digits.
    return f"ehrbridge-{prediction.identifier}"


def ehrbridge_device() -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_SYSTEM, "value": f"ehrbridge/{__version__}"}],
        "status": "active",
        "manufacturer": "ehrbridge",
        "deviceName": [{"name": "ehrbridge", "type": "manufacturer-name"}],
        "type": {"text": "Integration software: EHR data to a clinical prediction model and back"},
        "version": [{"type": {"text": "software"}, "value": __version__}],
    }


def model_device(model: ModelInfo) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "identifier": [{"system": MODEL_SYSTEM, "value": model_key(model)}],
        "status": "active",
        "deviceName": [
            {"name": "Kidney Failure Risk Equation, 4-variable", "type": "user-friendly-name"},
            {"name": model.name, "type": "model-name"},
        ],
        "type": {"text": "Clinical prediction model"},
        "version": [{"type": {"text": "model"}, "value": model.version}],
        "property": [{"type": {"text": "calibration"}, "valueCode": [{"text": model.calibration}]}],
    }


def model_key(model: ModelInfo) -> str:
    return f"{model.name}/{model.version}/{model.calibration}"


@short_key_cache(maxsize=256, max_chars=512)  # one site, a few mapping versions
def mapping_policy(site: str, version: str) -> str:
    return f"urn:ehrbridge:mapping:{quote(site, safe='')}:{quote(version, safe='')}"


def build_provenance(
    prediction: Prediction,
    config: SiteConfig,
    *,
    target: str,
    devices: tuple[str, str],
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """The Provenance of one result. ``target`` and ``devices`` are references."""
    ehrbridge_ref, model_ref = devices
    model = prediction.model
    when = (recorded or datetime.now(UTC)).astimezone(UTC)
    return {
        "resourceType": "Provenance",
        "id": provenance_id(prediction),
        "target": [{"reference": target}],
        "recorded": when.isoformat(timespec="milliseconds"),
        "policy": [mapping_policy(prediction.site, prediction.mapping_version)],
        "activity": {
            "coding": [{"system": DATA_OPERATION_SYSTEM, "code": "CREATE", "display": "create"}],
            "text": "Kidney failure risk computed by ehrbridge from the listed lab results",
        },
        "agent": [
            {
                "type": _participant("assembler", "Assembler"),
                "who": {"reference": ehrbridge_ref, "display": f"ehrbridge {__version__}"},
            },
            {
                "type": _participant("performer", "Performer"),
                "who": {
                    "reference": model_ref,
                    "display": f"{model.name} {model.version} ({model.calibration})",
                },
            },
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {
                        "system": fact_identifier_system(prediction.site),
                        "value": fact.ref,
                    },
                    "display": f"{fact.feature} ({fact.system} {fact.code}, "
                    f"{fact.effective.date()}), mapping {prediction.mapping_version}",
                },
            }
            for fact in prediction.features.inputs
        ],
    }


def _participant(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": PARTICIPANT_SYSTEM, "code": code, "display": display}]}


def conditional_search(system: str, value: str) -> str:
    """``identifier=<system>|<value>`` as ``urlencode`` writes it.

    Percent-encoding works character by character, so the encoded system (one
    of a few, cached) joined to the encoded value is the encoding of the whole;
    the value (a result's own identifier) is seen once and not cached.
    """
    return f"identifier={_quoted(system)}%7C{quote_plus(value, safe='')}"


@short_key_cache(maxsize=256, max_chars=512)
def _quoted(text: str) -> str:
    return quote_plus(text, safe="")


def result_transaction(
    prediction: Prediction,
    config: SiteConfig,
    observation: dict[str, Any] | None = None,
    *,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """The transaction Bundle that writes one result (see the module docstring)."""
    observation = dict(observation or build_observation(prediction, config))
    system = config.prediction_identifier_system
    observation_url = _uuid_url("Observation", system, prediction.identifier)
    entries: list[dict[str, Any]] = []
    subject, patient_entry = subject_reference(prediction, config.writeback.subject)
    observation["subject"] = subject
    if patient_entry is not None:
        entries.append(patient_entry)
    if config.writeback.provenance:
        addresses = _device_addresses(prediction.model)
        device_urls = (addresses[0][0], addresses[1][0])
        entries += [
            _device_entry(ehrbridge_device(), addresses[0]),
            _device_entry(model_device(prediction.model), addresses[1]),
        ]
        observation["device"] = {
            "reference": device_urls[1],
            "display": observation.get("device", {}).get("display", prediction.model.name),
        }
    entries.append(
        {
            "fullUrl": observation_url,
            "resource": observation,
            "request": {
                "method": "PUT",
                "url": f"Observation?{conditional_search(system, prediction.identifier)}",
            },
        }
    )
    if config.writeback.provenance:
        provenance = build_provenance(
            prediction, config, target=observation_url, devices=device_urls, recorded=recorded
        )
        entries.append(
            {
                "fullUrl": _uuid_url("Provenance", provenance["id"]),
                "resource": provenance,
                "request": {"method": "PUT", "url": f"Provenance/{provenance['id']}"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def subject_reference(
    prediction: Prediction, mode: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Observation.subject for ``writeback.subject``, and the Patient entry it needs.

    A logical reference (identifier only) cannot be searched on servers without
    the ``:identifier`` modifier (HAPI JPA: HAPI-2498), so by default the
    subject is a conditional reference (R4 http.html#trules) that the server
    resolves to its Patient; ``reference-or-create`` adds a conditional create
    of a Patient holding only the identifier. The identifier stays beside the
    reference either way.
    """
    system, value = prediction.patient_system, prediction.patient_id
    subject: dict[str, Any] = {"identifier": {"system": system, "value": value}}
    if mode == "identifier":
        return subject, None
    if mode == "reference":
        return {"reference": f"Patient?{conditional_search(system, value)}", **subject}, None
    patient = {"resourceType": "Patient", "identifier": [{"system": system, "value": value}]}
    url = full_url("Patient", system, value)
    entry = {
        "fullUrl": url,
        "resource": patient,
        "request": {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": conditional_search(system, value),
        },
    }
    return {"reference": url, **subject}, entry


def device_url(device: dict[str, Any]) -> str:
    identifier = device["identifier"][0]
    return full_url("Device", identifier["system"], identifier["value"])


@functools.lru_cache(maxsize=64)  # one entry per model a site serves
def _device_addresses(model: ModelInfo) -> tuple[tuple[str, str], tuple[str, str]]:
    """(fullUrl, conditional search) of ehrbridge's Device and of ``model``'s."""
    return _address(ehrbridge_device()), _address(model_device(model))


def _address(device: dict[str, Any]) -> tuple[str, str]:
    identifier = device["identifier"][0]
    return device_url(device), conditional_search(identifier["system"], identifier["value"])


def _device_entry(device: dict[str, Any], address: tuple[str, str]) -> dict[str, Any]:
    url, search = address
    return {
        "fullUrl": url,
        "resource": device,
        "request": {"method": "POST", "url": "Device", "ifNoneExist": search},
    }
