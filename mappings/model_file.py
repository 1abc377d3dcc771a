"""The model file: a prediction model declared as data (``models/<name>.yaml``).

A site names it under ``model: {file: models/kfre-4.yaml}`` (relative to the
site file) or writes it inline (``model: {definition: {...}}``). It declares:

* ``model`` -- identity: name, version, publisher, citation, intended use and
  the population it was validated in, in words;
* ``inputs`` -- what the model takes, each read from the site's feature record
  (``age``, ``sex``, ``egfr``, ``uacr``, and the 8-variable KFRE's ``albumin``,
  ``phosphate``, ``bicarbonate``, ``calcium``) with its type, UCUM unit, whether it is
  required, its valid range, and the missing-input policy; or an aggregate
  of one lab feature's results over a window (``egfr_slope``: min, max, mean,
  count or slope per year; ``schema.Aggregate``), under a name of its own;
* ``applicability`` -- the validated domain as rules (``egfr < 60``): a record
  outside gets no score and a recorded reason (``pipelines/domain.py``);
* ``endpoint`` -- the protocol (``oip-v2``, ``mlflow``, ``kserve-v1``,
  ``ubiops``), URL, timeout, batching and auth (a token from the environment
  or a file, never the YAML);
* ``outputs`` -- each with the server's output it is read from, its unit and
  valid range. An answer outside its range is an error (dead-lettered), never
  a written result. Output names are the model's own: nothing downstream
  knows them except through ``rendering``;
* ``rendering`` -- how a result is shown: the FHIR Observation's code, one
  component per output, interpretation bands, the CDS card's summary, and
  the HL7v2 ORU^R01 OBR-4/OBX-3 codes.

Every model here forbids unknown fields; errors name file, line and field.
The reference is ``docs/config.md`` ("The model file").
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ehrbridge.core.located_yaml import load_located, validate_located
from ehrbridge.mappings.schema import (
    CANONICAL_UNITS,
    KFRE8_ANALYTES,
    Aggregate,
    DomainRule,
    DomainRuleText,
    aggregate_name,
)
from ehrbridge.mappings.units import normalise_unit

__all__ = [
    "FEATURE_INPUTS",
    "ModelFile",
    "Rendering",
    "builtin_model",
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
LOCAL_CODES = "urn:ehrbridge:codes"  # the code system of codes ehrbridge itself defines
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
    # An input computed over a window of a lab feature's results (an eGFR slope):
    # the model declares it, so a site cannot hand it another definition.
    aggregate: Aggregate | None = None

    @model_validator(mode="after")
    def offered_in_its_unit(self) -> Self:
        if self.aggregate is not None:
            return self._aggregated()
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

    def _aggregated(self) -> Self:
        assert self.aggregate is not None
        aggregate_name(self.name)
        if self.type != "number" or not self.required:
            raise ValueError(f"input {self.name!r} is an aggregate: a required number")
        if normalise_unit(self.unit) != normalise_unit(self.aggregate.unit):
            raise ValueError(
                f"input {self.name!r} is given in {self.aggregate.unit!r}, not {self.unit!r}"
            )
        if self.valid is not None:
            raise ValueError(
                f"input {self.name!r}: a valid range on an aggregate is not supported yet "
                "(domain rules test the record's plain features)"
            )
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

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]{0,62}$")  # what rendering refers to
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


class Coding(Strict):
    """A FHIR Coding: LOINC where one exists, else a declared (local) system."""

    system: str = Field(..., min_length=1)
    code: str = Field(..., min_length=1)
    display: str = Field(..., min_length=1)


class Hl7Coding(Strict):
    """A coded element (CWE) as the receiving EHR knows it: OBR-4, OBX-3."""

    code: str = Field(..., min_length=1)
    text: str = ""
    system: str = "99EHB"  # HL7 table 0396: 99zzz is a local coding system


class RenderedOutput(Strict):
    """One output as an Observation component, an OBX, and a phrase on the card."""

    output: str  # an output's name
    key: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$")  # a short name bands may use ("2y")
    code: Coding  # Observation.component.code
    hl7: Hl7Coding  # OBX-3
    unit: Literal["%"] = "%"  # shown in percent (UCUM %), the fraction times 100


class Band(Strict):
    """An interpretation band: reached when ``output`` is at least ``at_least`` (a fraction)."""

    output: str
    at_least: float = Field(..., ge=0, le=1)
    code: str = Field(..., min_length=1)  # v3-ObservationInterpretation code, e.g. H
    display: str = Field(..., min_length=1)


class Card(Strict):
    """The CDS Hooks card: ``summary`` names outputs in braces (``{risk}``), shown in percent."""

    summary: str = Field(..., min_length=1, max_length=140)
    label: str = Field(..., min_length=1)  # card.source.label, before the model's name
    topic: str = Field(..., min_length=1)  # card.source.topic.display, before the model's name


class Rendering(Strict):
    """How results are shown: Observation, CDS card, ORU^R01 (docs/config.md)."""

    code: Coding  # Observation.code
    method: str = Field(..., min_length=1)  # Observation.method.text, before name and version
    calibration_text: dict[str, str] = Field(default_factory=dict)  # a calibration in words
    components: list[RenderedOutput] = Field(..., min_length=1)
    # The first band reached sets Observation.interpretation, OBX-8 and the card indicator;
    # cited in `guideline`. Bands of one output also give its OBX-7 reference range.
    interpretation: list[Band] = Field(default_factory=list)
    guideline: str = ""
    # The output monitored for drift and in the score histogram (default: the last one).
    score: str | None = None
    card: Card
    order: Hl7Coding  # OBR-4 universal service identifier

    def check_outputs(self, produced: list[str]) -> None:
        shown = [c.output for c in self.components]
        if sorted(shown) != sorted(produced):
            raise ValueError(
                f"rendering.components must show each output once ({', '.join(produced)})"
            )
        if self.score is not None and self.score not in produced:
            raise ValueError(f"score {self.score!r}: not an output")
        keys = {c.key for c in self.components} | set(produced)
        for band in self.interpretation:
            if band.output not in keys:
                raise ValueError(f"interpretation band on {band.output!r}: not an output")
        try:
            self.card.summary.format_map({name: "" for name in produced})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"card.summary names no output {exc}") from exc

    @property
    def score_output(self) -> str:
        return self.score or self.components[-1].output

    def output_of(self, key: str) -> str:
        """An output's name from itself or its short key (a band's ``output: 2y``)."""
        return next((c.output for c in self.components if key in (c.key, c.output)), key)


class ModelFile(Strict):
    model: Identity
    inputs: list[ModelInput] = Field(..., min_length=1)
    applicability: list[DomainRuleText] = Field(default_factory=list)
    endpoint: Endpoint
    outputs: list[ModelOutput] = Field(..., min_length=1)
    calibrations: Calibrations | None = None
    rendering: Rendering | None = None  # None: a plain rendering made from the outputs

    @model_validator(mode="after")
    def consistent(self) -> Self:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("an input is listed twice")
        for text in self.applicability:
            if DomainRule.parse(text).feature not in names:
                raise ValueError(f"applicability {text!r} tests an input the model does not take")
        produced = [o.name for o in self.outputs]
        if len(set(produced)) != len(produced):
            raise ValueError("an output is listed twice")
        if self.rendering is not None:
            self.rendering.check_outputs(produced)
        return self

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def shown(self) -> Rendering:
        """The declared rendering, else a plain one: each output under a local code."""
        if self.rendering is not None:
            return self.rendering
        name = self.model.name
        return Rendering(
            code=Coding(system=LOCAL_CODES, code=name, display=name),
            method=name,
            components=[
                RenderedOutput(
                    output=o.name,
                    code=Coding(system=LOCAL_CODES, code=f"{name}-{o.name}", display=o.name),
                    hl7=Hl7Coding(code=o.name.upper()[:20], text=o.name),
                )
                for o in self.outputs
            ],
            card=Card(
                summary=", ".join(f"{o.name} {{{o.name}}}" for o in self.outputs),
                label="ehrbridge: model",
                topic="Prediction",
            ),
            order=Hl7Coding(code=name.upper()[:20], text=name),
        )

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


# The model files that ship beside the code (models/*.yaml in a checkout).
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


@functools.cache
def builtin_model(name: str) -> ModelFile | None:
    """The shipped model file declaring model ``name`` (``models/*.yaml``), if any.

    A site written before model files (``model: {url: ...}`` and a mapping
    naming ``kfre-4var``) still needs its model's inputs, outputs and
    rendering: they come from the shipped file, never from code.
    """
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        definition = load_model_file(path)
        if definition.model.name == name:
            return definition
    return None
