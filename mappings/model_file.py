"""The model file: a prediction model declared as data (``models/<name>.yaml``).

A site names it under ``model: {file: models/kfre-4.yaml}`` (relative to the
site file) or writes it inline (``model: {definition: {...}}``). It declares:

* ``model`` -- identity: name, version, publisher, citation, intended use and
  the population it was validated in, in words;
* ``inputs`` -- what the model takes, each read from the site's feature record
  (``age``, ``sex``, ``egfr``, ``uacr``, and the 8-variable KFRE's ``albumin``,
  ``phosphate``, ``bicarbonate``, ``calcium``) with its type, UCUM unit, whether it is
  required, its valid range, and the missing-input policy;
* ``applicability`` -- the validated domain as rules (``egfr < 60``): a record
  outside gets no score and a recorded reason (``pipelines/domain.py``);
* ``endpoint`` -- the protocol (``oip-v2``, ``mlflow``, ``kserve-v1``,
  ``ubiops``), URL, timeout, batching and auth (a token from the environment
  or a file, never the YAML);
* ``outputs`` -- each with the server's output it is read from, its unit and
  valid range. An answer outside its range is an error (dead-lettered), never
  a written result.

Every model here forbids unknown fields; errors name file, line and field.
The reference is ``docs/config.md`` ("The model file").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ehrbridge.core.located_yaml import load_located, validate_located
from ehrbridge.mappings.schema import (
    CANONICAL_UNITS,
    KFRE8_ANALYTES,
    DomainRule,
    DomainRuleText,
)
from ehrbridge.mappings.units import normalise_unit

__all__ = [
    "FEATURE_INPUTS",
    "OUTPUTS",
    "ModelFile",
    "load_model_file",
]

# What a feature record offers a model today, with its unit (UCUM) and type.
FEATURE_INPUTS: dict[str, tuple[str, str]] = {
    "age": ("a", "number"),  # years at the anchor
    "sex": ("1", "boolean"),  # 1 male, 0 female (administrative sex, HL7 table 0001)
    "egfr": (CANONICAL_UNITS["egfr"], "number"),
    "uacr": (CANONICAL_UNITS["uacr"], "number"),
    # The 8-variable KFRE's serum analytes, each in its canonical unit.
    **{name: (CANONICAL_UNITS[name], "number") for name in KFRE8_ANALYTES},
}
# The results the Observation, ORU^R01 and card builders render today.
OUTPUTS = ("risk_2y", "risk_5y")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Range(Strict):
    """A closed range ``[min, max]``; a value outside is not a valid one."""

    min: float
    max: float

    @model_validator(mode="after")
    def ordered(self) -> Self:
        if not self.min <= self.max:
            raise ValueError(f"min ({self.min:g}) must not be above max ({self.max:g})")
        return self

    def holds(self, value: float) -> bool:
        return self.min <= value <= self.max


class Identity(Strict):
    name: str
    version: str = Field(..., min_length=1)
    publisher: str = Field(..., min_length=1)
    citation: str = Field(..., min_length=1)
    intended_use: str = Field(..., min_length=1)
    # Shown to clinicians beside a score: who the number is valid for.
    intended_population: str = Field(..., min_length=1)

    @field_validator("name")
    @classmethod
    def a_token(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lower-case letters, digits, '-', '_' or '.'")
        return value

    @field_validator("version", mode="before")
    @classmethod
    def version_is_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value  # `version: 2016`


class ModelInput(Strict):
    """One input, read from the feature record and sent under ``column``."""

    name: str  # the feature it is read from: age, sex, egfr, uacr
    column: str | None = Field(None, min_length=1)  # what the server calls it (default: name)
    type: Literal["number", "boolean"]
    unit: str = Field(..., min_length=1)  # UCUM; must be the feature's unit (no silent scaling)
    # Every input is required for now: a feature record exists only when all are present.
    required: bool = True
    valid: Range | None = None  # outside it the record is not scored (a domain rule)
    # A feature record is built only when every required input is present (features.py):
    # a missing one leaves the patient unscored, with "not enough data" recorded.
    missing: Literal["refuse"] = "refuse"

    @model_validator(mode="after")
    def offered_in_its_unit(self) -> Self:
        if self.name not in FEATURE_INPUTS:
            known = ", ".join(FEATURE_INPUTS)
            raise ValueError(f"input {self.name!r}: a feature record offers {known}")
        unit, kind = FEATURE_INPUTS[self.name]
        if self.type != kind:
            raise ValueError(f"input {self.name!r} is a {kind}, not a {self.type}")
        if normalise_unit(self.unit) != normalise_unit(unit):
            raise ValueError(f"input {self.name!r} is given in {unit!r}, not {self.unit!r}")
        if not self.required:
            raise ValueError(
                f"input {self.name!r}: optional inputs are not supported yet "
                "(a record without it is not scored); leave 'required' out"
            )
        if self.valid is not None and self.type == "boolean":
            raise ValueError(f"input {self.name!r} is a boolean: it has no valid range")
        return self

    @property
    def sent_as(self) -> str:
        return self.column or self.name

    def domain_rules(self) -> tuple[str, ...]:
        """The valid range as a domain rule, so a record outside it is not scored."""
        if self.valid is None:
            return ()
        return (f"{self.name} in [{_number(self.valid.min)}, {_number(self.valid.max)}]",)


class ModelOutput(Strict):
    """One result, read from the server's answer."""

    name: Literal["risk_2y", "risk_5y"]
    from_: str = Field(..., alias="from", min_length=1)  # the server's output name
    index: int = Field(0, ge=0)  # the column of that output (1: P(class 1) of predict_proba)
    unit: Literal["1", "%"]  # a fraction, or percent (divided by 100 before use)
    valid: Range

    def as_fraction(self, value: float) -> float:
        return value / 100 if self.unit == "%" else value


class ModelAuth(Strict):
    token_env: str | None = None
    token_file: Path | None = None
    scheme: str = Field("Bearer", min_length=1)  # UbiOps: Token

    @model_validator(mode="after")
    def one_source(self) -> Self:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("give exactly one of 'token_env' or 'token_file'")
        return self


class Endpoint(Strict):
    """Where and how the model is called. A site may give its own ``model.url``."""

    protocol: Literal["oip-v2", "mlflow", "kserve-v1", "ubiops"]
    url: str | None = Field(None, min_length=1)  # base URL, without the protocol's path
    model: str | None = Field(None, min_length=1)  # name on the server (default: model.name)
    version: str | None = None
    timeout_s: float = Field(2.0, gt=0, le=3600)
    max_batch_rows: int = Field(64, ge=1, le=100_000)
    auth: ModelAuth | None = None
    # oip-v2: one tensor per input (columns), or one [N, F] tensor (matrix: MLServer sklearn).
    layout: Literal["columns", "matrix"] = "columns"
    project: str | None = None  # ubiops: the project of the deployment

    @model_validator(mode="after")
    def protocol_settings(self) -> Self:
        if self.protocol == "ubiops" and not self.project:
            raise ValueError("a ubiops endpoint needs its 'project'")
        if self.project and self.protocol != "ubiops":
            raise ValueError("'project' is for ubiops endpoints")
        return self


class Calibrations(Strict):
    """Published calibrations: a site must state one (``model.calibration``)."""

    parameter: str = Field("calibration", min_length=1)  # the request parameter carrying it
    choices: list[str] = Field(..., min_length=2)


class ModelFile(Strict):
    model: Identity
    inputs: list[ModelInput] = Field(..., min_length=1)
    applicability: list[DomainRuleText] = Field(default_factory=list)
    endpoint: Endpoint
    outputs: list[ModelOutput] = Field(..., min_length=1)
    calibrations: Calibrations | None = None

    @model_validator(mode="after")
    def consistent(self) -> Self:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("an input is listed twice")
        for text in self.applicability:
            if DomainRule.parse(text).feature not in names:
                raise ValueError(f"applicability {text!r} tests an input the model does not take")
        produced = sorted(o.name for o in self.outputs)
        if produced != sorted(OUTPUTS):
            raise ValueError(f"outputs must be {' and '.join(OUTPUTS)}, each once")
        return self

    @property
    def domain(self) -> tuple[str, ...]:
        """Applicability rules, then each input's valid range as rules."""
        ranges = tuple(rule for i in self.inputs for rule in i.domain_rules())
        return tuple(dict.fromkeys((*self.applicability, *ranges)))


def _number(value: float) -> str:
    """Plain decimal notation, as a domain rule is written (never 1e-05)."""
    return f"{value:f}".rstrip("0").rstrip(".") or "0"


def load_model_file(path: Path | str) -> ModelFile:
    """Read and validate a model file. Raises ConfigError naming file:line:field."""
    return validate_located(ModelFile, load_located(path))
