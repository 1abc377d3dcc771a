"""Site configuration: one YAML file per site deployment.

Every model here forbids unknown fields, so a typo is an error that names the
file, the line and the field (see ``ehrbridge._yaml``) instead of a setting
that silently does nothing. The annotated reference is ``docs/config.md``; the
sandbox's own file, ``sandbox/site.yaml``, is a complete working example.
"""

from __future__ import annotations

import os
import re
from datetime import tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ehrbridge._yaml import load_located, parse_located, validate_located

FEATURES = ("creatinine", "egfr", "uacr")  # facts the KFRE 4-variable pipeline reads
CANONICAL_UNITS = {"creatinine": "mg/dL", "egfr": "mL/min/{1.73_m2}", "uacr": "mg/g"}
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Mode(StrEnum):
    SHADOW = "shadow"  # everything runs, results are kept locally, nothing reaches the EHR
    LIVE = "live"  # results are written to the EHR


class Calibration(StrEnum):
    NORTH_AMERICAN = "north_american"
    NON_NORTH_AMERICAN = "non_north_american"


class MllpListen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(2575, ge=0, le=65535)
    max_message_bytes: int = Field(1_048_576, ge=1024)
    # A sender that opens a connection and goes quiet must not hold it forever.
    idle_timeout_s: float = Field(300.0, gt=0)


class HttpListen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class EmbeddedTransport(Strict):
    kind: Literal["embedded"] = "embedded"


class KafkaTransport(Strict):
    kind: Literal["kafka"]
    bootstrap: str = Field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP", ""))
    partitions: int = Field(6, ge=1)


Transport = Annotated[EmbeddedTransport | KafkaTransport, Field(discriminator="kind")]


class PatientIdRule(Strict):
    """Which PID-3 repetition is the patient id (CX datatype).

    The first repetition whose CX.4 assigning authority and CX.5 identifier
    type both match (where given) wins; with neither given, repetition
    ``repetition`` (1-based) is used.
    """

    assigning_authority: str | None = None  # PID-3.4 (CX.4), namespace id component
    type_code: str | None = None  # PID-3.5 (CX.5), e.g. MR
    repetition: int = Field(1, ge=1)
    fhir_system: str = Field(..., min_length=1)  # Identifier.system for Observation.subject


class UnitRule(Strict):
    """How one reported unit converts to the feature's canonical unit.

    Exactly one of ``multiply`` or ``divide``; ``divide: 88.4`` states the
    published factor instead of a rounded reciprocal.
    """

    multiply: float | None = Field(None, gt=0)
    divide: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def one_factor(self) -> Self:
        if (self.multiply is None) == (self.divide is None):
            raise ValueError("give exactly one of 'multiply' or 'divide'")
        return self

    def convert(self, value: float) -> float:
        return value * self.multiply if self.multiply is not None else value / (self.divide or 1)


class Code(Strict):
    system: str = Field(..., min_length=1)  # OBX-3.3 coding system, e.g. LN
    code: str = Field(..., min_length=1)  # OBX-3.1


class FeatureRule(Strict):
    codes: list[Code] = Field(..., min_length=1)
    units: dict[str, UnitRule] = Field(..., min_length=1)
    window_days: float = Field(..., gt=0)

    @field_validator("units")
    @classmethod
    def unique_normalised_units(cls, units: dict[str, UnitRule]) -> dict[str, UnitRule]:
        seen: dict[str, str] = {}
        for unit in units:
            norm = normalise_unit(unit)
            if norm in seen:
                raise ValueError(f"units {seen[norm]!r} and {unit!r} are the same unit")
            seen[norm] = unit
        return units


class ValuePolicy(Strict):
    """How to read OBX-5 and OBX-11.

    comparators: ``bound`` uses ``<5`` as 5 and keeps the comparator on the
    fact (it shows in derivedFrom); ``reject`` makes such a result unusable.
    statuses: OBX-11 result statuses whose values are used. F final and
    C corrected by default; P preliminary is ignored until finalised.
    """

    comparators: Literal["bound", "reject"] = "bound"
    statuses: list[str] = Field(default_factory=lambda: ["F", "C"])


class Mapping(Strict):
    """Site-specific translation from local messages to model features."""

    version: str = "1"
    timezone: str = "UTC"  # for HL7 times that carry no UTC offset
    patient: PatientIdRule
    features: dict[Literal["creatinine", "egfr", "uacr"], FeatureRule]
    values: ValuePolicy = ValuePolicy()

    @field_validator("timezone")
    @classmethod
    def known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def complete_and_unambiguous(self) -> Self:
        if "uacr" not in self.features:
            raise ValueError("features: 'uacr' is required by KFRE 4-variable")
        if "egfr" not in self.features and "creatinine" not in self.features:
            raise ValueError("features: need 'egfr' or 'creatinine' (eGFR is derived from it)")
        owner: dict[tuple[str, str], str] = {}
        for name, rule in self.features.items():
            for code in rule.codes:
                key = (code.system, code.code)
                if key in owner:
                    raise ValueError(
                        f"code {code.system}|{code.code} is mapped to both {owner[key]} and {name}"
                    )
                owner[key] = name
        return self

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.timezone)


class ModelEndpoint(Strict):
    url: str = Field(..., min_length=1)  # Open Inference Protocol v2 base URL
    name: str = "kfre-4var"
    calibration: Calibration = Calibration.NORTH_AMERICAN
    timeout_s: float = Field(2.0, gt=0)
    batch_size: int = Field(64, ge=1)


class InterpretationBand(Strict):
    horizon: Literal["2y", "5y"]
    at_least: float = Field(..., ge=0, le=1)  # risk as a fraction
    code: str  # v3-ObservationInterpretation code, e.g. H
    display: str


class ResultCoding(Strict):
    system: str = "urn:ehrbridge:codes"
    code: str = "kfre-4var"
    display: str = "Kidney failure risk (KFRE 4-variable)"


class Writeback(Strict):
    fhir_base: str | None = None  # the EHR's FHIR server base URL; required in live mode
    timeout_s: float = Field(5.0, gt=0)
    code: ResultCoding = ResultCoding()
    identifier_system: str | None = None  # default: urn:ehrbridge:<site>:prediction
    interpretation: list[InterpretationBand] = Field(
        default_factory=lambda: [
            InterpretationBand(
                horizon="2y", at_least=0.40, code="HH", display="Critical high (2-year risk >= 40%)"
            ),
            InterpretationBand(
                horizon="2y", at_least=0.10, code="H", display="High (2-year risk >= 10%)"
            ),
            InterpretationBand(
                horizon="5y", at_least=0.05, code="H", display="High (5-year risk >= 5%)"
            ),
        ]
    )


class RetryPolicy(Strict):
    attempts: int = Field(5, ge=1)  # in-place attempts before the delayed retry queue
    initial_backoff_s: float = Field(0.2, gt=0)
    max_backoff_s: float = Field(5.0, gt=0)
    # Delays of the delayed-retry queue; after the last one the record is dead-lettered.
    delayed_s: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 3600.0])


class SiteConfig(Strict):
    site: str
    mode: Mode = Mode.SHADOW
    data_dir: Path = Path("data")
    mllp: MllpListen = MllpListen()
    http: HttpListen = HttpListen()
    transport: Transport = EmbeddedTransport()
    mapping: Mapping
    model: ModelEndpoint
    writeback: Writeback = Writeback()
    retry: RetryPolicy = RetryPolicy()
    strict_hl7: bool = False  # validate message structure with hl7apy (slow; for debugging)

    @field_validator("site")
    @classmethod
    def site_name_is_a_token(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError("use lower-case letters, digits, '-', '_' or '.' (it prefixes topics)")
        return value

    @model_validator(mode="after")
    def live_needs_a_target(self) -> Self:
        if self.mode is Mode.LIVE and not self.writeback.fhir_base:
            raise ValueError("mode is 'live' but writeback.fhir_base is not set")
        return self

    @property
    def prediction_identifier_system(self) -> str:
        return self.writeback.identifier_system or f"urn:ehrbridge:{self.site}:prediction"


def normalise_unit(unit: str) -> str:
    """Compare units the way labs write them: µ/μ as u, case-insensitive, trimmed.

    UCUM is case-sensitive in principle, but senders write ``umol/l`` and
    ``mg/dl``; no unit we map differs from another only by case.
    """
    return unit.strip().replace("µ", "u").replace("μ", "u").casefold()


def load_site_config(path: Path | str, **overrides: object) -> SiteConfig:
    """Load and validate a site YAML file. Raises ConfigError naming file:line:field."""
    located = load_located(path)
    if overrides and isinstance(located.data, dict):
        located.data = {**located.data, **overrides}
    config = validate_located(SiteConfig, located)
    if not config.data_dir.is_absolute():
        base = Path(path).resolve().parent
        env_dir = os.environ.get("EHRBRIDGE_DATA_DIR")
        data_dir = Path(env_dir) if env_dir else base / config.data_dir
        config = config.model_copy(update={"data_dir": data_dir})
    return config


def parse_site_config(text: str, file: str = "<string>") -> SiteConfig:
    """Validate YAML text (tests, and configs that arrive over an API)."""
    return validate_located(SiteConfig, parse_located(text, file))
