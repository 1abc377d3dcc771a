"""The site mapping format: how one site's messages become model features.

A mapping is YAML, either inline under ``mapping:`` in a site config or in its
own file (``mapping: {file: mappings/sites/acme/mapping.yaml}``). Every model
here forbids unknown fields, so a typo is an error naming file, line and
field. The guide with a worked example is ``mappings/README.md``; the field
reference is ``docs/config.md``.

Validation happens in two passes, both at load time so that nothing starts
with a broken mapping:

1. these pydantic models (shape, types, ranges);
2. :mod:`ehrbridge.mappings.lint` (code maps read from CSV / ConceptMap files,
   codes mapped twice, units that cannot be converted, features the model
   does not take, a mapping that can never produce a complete record ...).

Errors of either pass raise :class:`~ehrbridge.core.errors.ConfigError`;
``ehrbridge mappings check`` prints all of them, and the warnings, instead.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta, tzinfo
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from ehrbridge.mappings.units import normalise_unit

if TYPE_CHECKING:
    from ehrbridge.mappings.diagnostics import Locator

# --------------------------------------------------------------------------- what models take


@dataclass(frozen=True, slots=True)
class LabFeature:
    """A feature read from lab results, with its canonical unit and plausible range."""

    name: str
    canonical_unit: str
    plausible: tuple[float, float]  # default range, canonical unit
    description: str


LAB_FEATURES: dict[str, LabFeature] = {
    "creatinine": LabFeature(
        "creatinine", "mg/dL", (0.1, 40.0), "serum/plasma creatinine (feeds derived eGFR)"
    ),
    "egfr": LabFeature("egfr", "mL/min/{1.73_m2}", (1.0, 250.0), "eGFR indexed to 1.73 m2"),
    # KFRE takes log(UACR): zero is not usable, so the default floor is above it.
    "uacr": LabFeature("uacr", "mg/g", (0.1, 50_000.0), "urine albumin/creatinine ratio"),
    # The serum analytes of the 8-variable KFRE (Tangri 2011), canonical in the US
    # conventional units the equation is centred in; mappings/units.py has the factors.
    "albumin": LabFeature("albumin", "g/dL", (0.5, 7.0), "serum/plasma albumin"),
    "phosphate": LabFeature(
        "phosphate", "mg/dL", (0.3, 20.0), "serum/plasma phosphate (as phosphorus)"
    ),
    "bicarbonate": LabFeature(
        "bicarbonate", "mmol/L", (2.0, 60.0), "serum/plasma bicarbonate or total CO2"
    ),
    # Total calcium: ionised calcium (LOINC 1994-3) is another quantity, about half of it.
    "calcium": LabFeature("calcium", "mg/dL", (2.0, 20.0), "serum/plasma total calcium"),
}
KFRE8_ANALYTES = ("albumin", "phosphate", "bicarbonate", "calcium")
FEATURES = tuple(LAB_FEATURES)
CANONICAL_UNITS = {name: f.canonical_unit for name, f in LAB_FEATURES.items()}


_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_DOMAIN_RULE = re.compile(rf"^\s*([a-z_]+)\s*(<=|>=|<|>)\s*({_NUMBER})\s*$")
_RANGE_RULE = re.compile(rf"^\s*([a-z_]+)\s+in\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]\s*$")
# What a domain rule can test: every numeric input a feature record offers.
NUMERIC_INPUTS = frozenset({"age", "egfr", "uacr", *KFRE8_ANALYTES})


@dataclass(frozen=True, slots=True)
class DomainRule:
    """One condition of a model's validated domain, written ``egfr < 60``.

    Values are the model inputs in their canonical units: age in years, eGFR
    in mL/min/1.73 m2, UACR in mg/g. A record outside the domain is not scored.

    ``uacr in [0.1, 50000]`` is an input's valid range (a model file's
    ``inputs[].valid``): it tests the value the model would be sent, so a
    result reported as ``<3`` is sent as 3 and meets it, where ``uacr >= 0.1``
    would ask about the unknown true value below 3.
    """

    feature: str
    op: str
    threshold: float
    upper: float | None = None  # op "in": the range is [threshold, upper]

    @classmethod
    def parse(cls, text: str) -> DomainRule:
        ranged = _RANGE_RULE.match(text)
        match = ranged or _DOMAIN_RULE.match(text)
        if match is None:
            raise ValueError(
                f"write a domain rule as 'INPUT OP NUMBER' (e.g. egfr < 60) or "
                f"'INPUT in [LOW, HIGH]', not {text!r}"
            )
        feature = match.group(1)
        if feature not in NUMERIC_INPUTS:
            known = ", ".join(sorted(NUMERIC_INPUTS))
            raise ValueError(f"{text!r}: a domain rule tests one of {known}, not {feature!r}")
        if ranged is None:
            return cls(feature, match.group(2), float(match.group(3)))
        low, high = float(match.group(2)), float(match.group(3))
        if low > high:
            raise ValueError(f"{text!r}: the range's low end is above its high end")
        return cls(feature, "in", low, high)

    @property
    def on_value_sent(self) -> bool:
        """A valid range: tested on the value sent, never on a bound's open end."""
        return self.upper is not None

    def holds(self, value: float) -> bool:
        if self.upper is not None:
            return self.threshold <= value <= self.upper
        return _COMPARISONS[self.op](value, self.threshold)

    def broken_by(self, value: float, shown: str = "") -> str:
        """Why ``value`` is outside: ``egfr 71.9 >= 60``."""
        number = shown or f"{value:.4g}"
        if self.upper is not None:
            return f"{self.feature} {number} outside [{self.threshold:g}, {self.upper:g}]"
        return f"{self.feature} {number} {_NEGATED[self.op]} {self.threshold:g}"

    def __str__(self) -> str:
        if self.upper is not None:
            return f"{self.feature} in [{self.threshold:g}, {self.upper:g}]"
        return f"{self.feature} {self.op} {self.threshold:g}"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The inputs of a model, which lab features can supply them, and its validated domain."""

    name: str
    inputs: tuple[str, ...]
    lab_inputs: frozenset[str]  # inputs read directly from a lab feature of the same name
    derivations: dict[str, str]  # input -> lab feature it can be derived from
    # Where the model was developed and validated; outside it there is no score.
    applicability: tuple[str, ...] = ()
    # Published calibrations (baseline risks) a site must choose between: with more
    # than one there is no safe default, so `model.calibration` is required.
    calibrations: tuple[str, ...] = ()

    def takes(self, feature: str) -> bool:
        return feature in self.lab_inputs or feature in self.derivations.values()


# A feature derived from another when not reported (CKD-EPI 2021: eGFR from creatinine).
DERIVED_FROM: dict[str, str] = {"egfr": "creatinine"}

# Feature records written before they were generic kept each value under its own key;
# these are the keys that differ from the feature's name (read by FeatureRecord.from_json).
LEGACY_RECORD_KEYS: dict[str, str] = {"male": "sex", "uacr_mg_g": "uacr"}

# Drift monitoring's fixed bins per feature (upper-exclusive edges), around the clinical
# cut points: KDIGO G (eGFR) and A (UACR) categories. "score" bins a model's score output
# (a fraction) around KFRE's 3%/5%/10%/40%.
DRIFT_BINS: dict[str, tuple[float, ...]] = {
    "age": (30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0),
    "sex": (0.5,),
    "egfr": (10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0),  # mL/min/1.73m2, KDIGO G1-G5
    "uacr": (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0),  # mg/g, KDIGO A1 <30, A3 >300
    # KFRE-8's analytes, around their reference limits and CKD's treatment targets.
    "albumin": (2.5, 3.0, 3.5, 4.0, 4.5, 5.0),  # g/dL, lower reference limit 3.5
    "phosphate": (2.5, 3.5, 4.5, 5.5, 7.0),  # mg/dL, reference 2.5-4.5
    "bicarbonate": (16.0, 18.0, 22.0, 26.0, 30.0),  # mmol/L, KDIGO treats below 18
    "calcium": (8.0, 8.5, 9.0, 9.5, 10.2, 11.0),  # mg/dL, reference 8.5-10.2
    "score": (0.01, 0.03, 0.05, 0.1, 0.2, 0.4, 0.6),  # fraction
}
# Drift state saved before bins were keyed by feature name.
LEGACY_DRIFT_KEYS: dict[str, str] = {**LEGACY_RECORD_KEYS, "risk_5y": "score"}

MODELS: dict[str, ModelSpec] = {
    "kfre-4var": ModelSpec(
        name="kfre-4var",
        inputs=("age", "sex", "egfr", "uacr"),
        lab_inputs=frozenset({"egfr", "uacr"}),
        derivations={"egfr": "creatinine"},
        # Tangri et al. 2011/2016: adults with CKD G3-G5 (eGFR < 60 mL/min/1.73 m2).
        applicability=("age >= 18", "egfr < 60"),
        # Tangri 2016: the non-North-American baseline is lower by up to 3.5 points.
        calibrations=("north_american", "non_north_american"),
    ),
    # Tangri 2011 "model 6", recalibrated in 2016: the four inputs above and four serum
    # analytes; the same adult CKD G3-G5 population and the same two calibrations.
    "kfre-8var": ModelSpec(
        name="kfre-8var",
        inputs=("age", "sex", "egfr", "uacr", *KFRE8_ANALYTES),
        lab_inputs=frozenset({"egfr", "uacr", *KFRE8_ANALYTES}),
        derivations={"egfr": "creatinine"},
        applicability=("age >= 18", "egfr < 60"),
        calibrations=("north_american", "non_north_american"),
    ),
}

# HL7 table 0085 observation result status, and table 0001 administrative sex.
RESULT_STATUSES = frozenset("ABCDFIMNOPRSUVWX")
SEXES = frozenset({"F", "M", "O", "U", "A", "N"})
_HL7_PATH = re.compile(r"^[A-Z][A-Z0-9]{2}-\d+(?:\(\d+\))?(?:\.\d+(?:\.\d+)?)?$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _hl7_path(value: str) -> str:
    value = value.strip()
    if not _HL7_PATH.match(value):
        raise ValueError(
            f"{value!r} is not an HL7v2 field path; write e.g. PID-8, ZPI-2, PID-3(2).1"
        )
    return value


Hl7Path = Annotated[str, AfterValidator(_hl7_path)]


def _text(value: Any) -> Any:
    """YAML reads ``12345`` as a number; codes are text."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# --------------------------------------------------------------------------- codes and units


class Code(Strict):
    """A coded concept: ``{system: LN, code: 2160-0}``, or the short form ``LN|2160-0``."""

    system: str = Field(..., min_length=1)  # OBX-3.3 coding system / FHIR Coding.system
    code: str = Field(..., min_length=1)  # OBX-3.1 / Coding.code

    @model_validator(mode="before")
    @classmethod
    def from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            system, sep, code = data.partition("|")
            if not sep:
                raise ValueError(f"write a code as SYSTEM|CODE (e.g. LN|2160-0), not {data!r}")
            return {"system": system.strip(), "code": code.strip()}
        if isinstance(data, dict) and "code" in data:
            return {**data, "code": _text(data["code"])}
        return data

    def __str__(self) -> str:
        return f"{self.system}|{self.code}"


class UnitRule(Strict):
    """How one reported unit converts to the feature's canonical unit.

    Exactly one of ``multiply`` or ``divide`` (``divide: 88.4`` states the
    published factor instead of a rounded reciprocal), or ``accept_as``: the
    site reports the canonical quantity under another label (Synthea's eGFR
    in ``mL/min``). A value accepted that way is used only when no value in
    a proper unit has the same time.
    """

    multiply: float | None = Field(None, gt=0)
    divide: float | None = Field(None, gt=0)
    accept_as: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def one_factor(self) -> Self:
        factors = (self.multiply is not None) + (self.divide is not None)
        if self.accept_as is None and factors != 1:
            raise ValueError("give exactly one of 'multiply' or 'divide' (or 'accept_as')")
        if factors > 1:
            raise ValueError("give exactly one of 'multiply' or 'divide'")
        return self

    @property
    def factor(self) -> float:
        if self.multiply is not None:
            return self.multiply
        return 1 / self.divide if self.divide is not None else 1.0

    def convert(self, value: float) -> float:
        if self.multiply is not None:
            return value * self.multiply
        return value / self.divide if self.divide is not None else value

    def describe(self) -> str:
        if self.multiply is not None:
            text = f"× {self.multiply:g}"
        elif self.divide is not None:
            text = f"÷ {self.divide:g}"
        else:
            text = "× 1"
        return f"{text}, accepted as {self.accept_as}" if self.accept_as else text


class Plausible(Strict):
    """Values outside ``[min, max]`` (canonical unit) are flagged and never used."""

    min: float
    max: float

    @model_validator(mode="after")
    def ordered(self) -> Self:
        if not self.min < self.max:
            raise ValueError(f"min ({self.min:g}) must be below max ({self.max:g})")
        return self


class FeatureRule(Strict):
    codes: list[Code] = Field(..., min_length=1)  # standard concepts, or local codes directly
    units: dict[str, UnitRule] = Field(..., min_length=1)
    # Required; optional here only so the lint can say what is missing in its own words.
    window_days: float | None = Field(None, gt=0)
    plausible: Plausible | None = None  # default: the feature's built-in range
    comparators: Literal["bound", "reject"] | None = None  # overrides values.comparators

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


class CodeMapSource(Strict):
    """Local code → standard concept translations: inline, a CSV file, or a FHIR ConceptMap.

    Inline::

        - system: 99SI            # the local coding system as sent (OBX-3.3)
          target: LN              # default LN (LOINC)
          codes: {CREA: 2160-0, U-ACR: 9318-7}

    ``csv: local-codes.csv`` (columns ``system,code,target_system,target_code``
    and optionally ``display``), or ``concept_map: crea.json`` (FHIR R4
    ConceptMap; R5 ``relationship`` is read too). Paths are relative to the
    file that names them.
    """

    # Inline codes: the local system as sent. ConceptMap: the OBX-3.3 name of group.source.
    system: str | None = Field(None, min_length=1)
    target: str = Field("LN", min_length=1)
    codes: dict[str, str] | None = None
    csv: str | None = Field(None, min_length=1)
    concept_map: str | None = Field(None, min_length=1)

    @field_validator("codes", mode="before")
    @classmethod
    def codes_are_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(_text(k)): _text(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def one_source(self) -> Self:
        given = [k for k in ("codes", "csv", "concept_map") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'codes' (with 'system'), 'csv' or 'concept_map'")
        if self.codes is not None and self.system is None:
            raise ValueError("inline 'codes' need the local coding 'system' they come from")
        if self.csv is not None and self.system is not None:
            raise ValueError("a CSV names its own systems: 'system' is for inline 'codes'")
        return self


# --------------------------------------------------------------------------- identity and fields


class PatientIdRule(Strict):
    """Which identifier is the patient id.

    HL7v2: the first PID-3 repetition (CX) whose CX.4 assigning authority and
    CX.5 identifier type both match (where given); with neither given,
    repetition ``repetition`` (1-based). FHIR: the ``Patient.identifier`` (or
    ``Observation.subject.identifier``) whose system is ``fhir_system``.
    """

    assigning_authority: str | None = None  # PID-3.4 (CX.4), namespace or universal id
    type_code: str | None = None  # PID-3.5 (CX.5), e.g. MR
    repetition: int = Field(1, ge=1)
    fhir_system: str = Field(..., min_length=1)  # Identifier.system, read (FHIR) and written


class FieldSource(Strict):
    """Where a value is read in HL7v2: the first non-empty path wins.

    ``values`` translates what the site sends (``Ž: F``); a value not listed
    is used as sent.
    """

    paths: list[Hl7Path] = Field(..., min_length=1)
    values: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def short_forms(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"paths": [data]}
        if isinstance(data, list):
            return {"paths": data}
        return data


def _sex_values(source: FieldSource) -> FieldSource:
    wrong = sorted({v for v in source.values.values() if v not in SEXES})
    if wrong:
        raise ValueError(f"sex values must be HL7 table 0001 codes (F, M, O, U, A, N): {wrong}")
    return source


def _order_paths(paths: list[str]) -> list[str]:
    for path in paths:
        if path[:3] not in ("OBX", "OBR"):
            raise ValueError(f"{path}: observation times are read from OBX or OBR fields")
    return paths


class Hl7v2Rules(Strict):
    """Declarative reads from HL7v2 fields, Z-segments included.

    Patient-level paths (``sex``, ``birth_date``) are read from the segments
    of the patient's group (PID up to the next PID, so ``ZPI`` after ``PID``);
    ``observation_time`` from the OBX itself or its OBR.
    """

    sex: Annotated[FieldSource, AfterValidator(_sex_values)] = FieldSource(paths=["PID-8"])
    birth_date: FieldSource = FieldSource(paths=["PID-7"])
    observation_time: Annotated[list[Hl7Path], AfterValidator(_order_paths)] = Field(
        default_factory=lambda: ["OBX-14", "OBR-7"], min_length=1
    )


# --------------------------------------------------------------------------- policies


class DerivedEgfr(Strict):
    """eGFR from creatinine by CKD-EPI 2021, with age and sex at the specimen time."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: Literal["creatinine"] = Field("creatinine", alias="from")
    equation: Literal["ckd-epi-2021"] = "ckd-epi-2021"
    # reported: a reported eGFR in its window wins, else derive. derived: always
    # derive when a creatinine is in its window (sites reporting MDRD eGFR).
    prefer: Literal["reported", "derived"] = "reported"


class Derived(Strict):
    egfr: DerivedEgfr | None = DerivedEgfr()  # null: never derive eGFR


class ValuePolicy(Strict):
    """How to read values, result statuses (OBX-11 / Observation.status) and result times.

    comparators: ``bound`` uses ``<5`` as 5 and keeps the comparator on the
    fact (it shows in derivedFrom); ``reject`` leaves such results unused.
    statuses: result statuses whose values are used (F final, C corrected;
    P preliminary waits for its final). withdraw: statuses that withdraw an
    earlier result of the same code and time (D deleted, W wrong).
    future_tolerance_s / earliest_date: a mapped result timed later than its
    receipt plus the tolerance (clocks differ by seconds, not days), or before
    the earliest date or the patient's birth date, is refused, never stored.
    """

    comparators: Literal["bound", "reject"] = "bound"
    statuses: list[str] = Field(default_factory=lambda: ["F", "C"], min_length=1)
    withdraw: list[str] = Field(default_factory=lambda: ["D", "W"])
    future_tolerance_s: float = Field(300.0, ge=0)
    earliest_date: date = date(1900, 1, 1)

    @property
    def future_tolerance(self) -> timedelta:
        return timedelta(seconds=self.future_tolerance_s)

    @field_validator("statuses", "withdraw")
    @classmethod
    def known_statuses(cls, value: list[str]) -> list[str]:
        upper = [s.strip().upper() for s in value]
        wrong = [s for s in upper if s not in RESULT_STATUSES]
        if wrong:
            raise ValueError(f"not HL7 table 0085 result statuses: {wrong}")
        return upper

    @model_validator(mode="after")
    def disjoint(self) -> Self:
        both = sorted(set(self.statuses) & set(self.withdraw))
        if both:
            raise ValueError(f"statuses {both} are both used and withdrawing")
        return self


class Triggers(Strict):
    """Which results cause a prediction, and how results are grouped into one.

    ``features``: a message carrying a usable result of one of these (default:
    every lab feature the mapping has) triggers a prediction. ``debounce``:
    results of one *episode* share one prediction, which is updated as more of
    them arrive -- ``day`` (the calendar day of the result, site time zone) or
    an HL7v2 field naming the visit or order (``PV1-19``, ``OBR-3``); FHIR input
    then uses ``Observation.encounter``. See mappings/README.md, "Triggers".
    """

    features: list[str] | None = Field(None, min_length=1)
    debounce: str = "day"

    @field_validator("debounce")
    @classmethod
    def day_or_path(cls, value: str) -> str:
        return value if value == "day" else _hl7_path(value)


def _feature_name(name: str) -> str:
    if name not in LAB_FEATURES:
        known = ", ".join(LAB_FEATURES)
        hint = (
            " (age comes from the birth date and sex from hl7v2.sex / Patient.gender)"
            if name in ("age", "sex")
            else ""
        )
        raise ValueError(f"feature {name!r} is not a lab feature ehrbridge reads ({known}){hint}")
    return name


FeatureName = Annotated[str, AfterValidator(_feature_name)]


AGGREGATIONS = ("latest", "min", "max", "mean", "count", "slope_per_year")
Aggregation = Literal["latest", "min", "max", "mean", "count", "slope_per_year"]
_AGGREGATE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class Aggregate(Strict):
    """A feature computed over the results of one lab feature in a window.

    A model file declares it on an input (``inputs[].aggregate``): the model
    was validated on one definition of it, which a site does not change; the
    site maps the lab feature's codes, units and window as for any feature.
    ``of`` is a lab feature the site maps; its results are taken in the
    canonical unit, one per result time, never after the record's anchor
    (so never a future-dated one). ``window_days`` defaults to that feature's
    window. ``aggregation``: ``latest`` (what a plain feature is), ``min``,
    ``max``, ``mean``, ``count`` (results in the window, 0 when none), or
    ``slope_per_year`` (least squares of value on time in years), which needs
    results at two or more times spanning ``min_span_days``. A comparator-bounded
    result (``<3``) counts as its bound in ``min``, ``max``, ``latest`` and
    ``count``; ``mean`` and ``slope_per_year`` refuse a window holding one,
    since a bound has no value to average or fit.
    """

    of: FeatureName
    aggregation: Aggregation = "latest"
    window_days: float | None = Field(None, gt=0)
    min_span_days: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def span_for_slopes(self) -> Self:
        slope = self.aggregation == "slope_per_year"
        if slope and self.min_span_days is None:
            raise ValueError("slope_per_year needs 'min_span_days': the shortest span to fit")
        if not slope and self.min_span_days is not None:
            raise ValueError("'min_span_days' is for slope_per_year")
        return self

    @property
    def unit(self) -> str:
        """The result's UCUM unit: the feature's, a count's 1, or the feature's per year."""
        if self.aggregation == "count":
            return "1"
        unit = CANONICAL_UNITS[self.of]
        return f"{unit}/a" if self.aggregation == "slope_per_year" else unit


def aggregate_name(name: str) -> str:
    """An aggregate's own feature name: not a lab feature, age or sex."""
    if not _AGGREGATE_NAME.match(name):
        raise ValueError(f"aggregate {name!r}: use lower-case letters, digits and '_'")
    if name in LAB_FEATURES or name in ("age", "sex"):
        raise ValueError(f"aggregate {name!r}: that name is a feature already; name it apart")
    return name


@functools.lru_cache(maxsize=64)
def _domain_rules(texts: tuple[str, ...]) -> tuple[DomainRule, ...]:
    return tuple(DomainRule.parse(t) for t in texts)


def _domain_rule(text: str) -> str:
    return str(DomainRule.parse(text))


DomainRuleText = Annotated[str, AfterValidator(_domain_rule)]


# --------------------------------------------------------------------------- the mapping


@dataclass(frozen=True, slots=True)
class CodeMapEntry:
    """One local code → standard concept translation, and where it was written."""

    system: str
    code: str
    target_system: str
    target_code: str
    where: str  # "local-codes.csv:3", "mapping.yaml:14"
    display: str = ""

    @property
    def target(self) -> str:
        return f"{self.target_system}|{self.target_code}"


class Mapping(Strict):
    """Site-specific translation from local messages to model features."""

    version: str = "1"  # recorded on every prediction
    model: str = "kfre-4var"  # whose inputs the features must supply
    # The model's validated domain as rules on its inputs; default: the model's own.
    applicability: list[DomainRuleText] | None = None
    timezone: str = "UTC"  # for HL7 / FHIR times that carry no UTC offset
    patient: PatientIdRule
    hl7v2: Hl7v2Rules = Hl7v2Rules()
    code_maps: list[CodeMapSource] = Field(default_factory=list)
    features: dict[FeatureName, FeatureRule]
    derived: Derived = Derived()
    values: ValuePolicy = ValuePolicy()
    triggers: Triggers = Triggers()

    _code_map: tuple[CodeMapEntry, ...] = PrivateAttr(default=())
    _source: str = PrivateAttr(default="")
    _locator: Locator | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def load_and_check(
        cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """``{file: path}`` loads a mapping file; every mapping is linted before use."""
        from ehrbridge.mappings.loader import finish_mapping, mapping_from_file_reference

        if isinstance(data, Mapping):
            return data
        context = info.context if isinstance(info.context, dict) else {}
        if isinstance(data, dict) and set(data) == {"file"}:
            return mapping_from_file_reference(data["file"], context)
        mapping = handler(data)
        assert isinstance(mapping, Mapping)
        return finish_mapping(mapping, context)

    @field_validator("timezone")
    @classmethod
    def known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("model")
    @classmethod
    def known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; known: {', '.join(MODELS)}")
        return value

    @model_validator(mode="after")
    def domain_tests_model_inputs(self) -> Self:
        for text in self.applicability or ():
            rule = DomainRule.parse(text)
            if rule.feature not in MODELS[self.model].inputs:
                raise ValueError(f"applicability {text!r}: {self.model} takes no {rule.feature}")
        return self

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.timezone)

    @property
    def domain(self) -> tuple[DomainRule, ...]:
        """The rules a record must meet to be scored (``applicability``, else the model's)."""
        texts = self.applicability if self.applicability is not None else self.spec.applicability
        return _domain_rules(tuple(texts))

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def source(self) -> str:
        """The file this mapping was read from ('' when built in code)."""
        return self._source

    @property
    def code_map(self) -> tuple[CodeMapEntry, ...]:
        """Every local code translation, from all ``code_maps`` sources, in order."""
        return self._code_map

    @property
    def trigger_features(self) -> frozenset[str]:
        if self.triggers.features is not None:
            return frozenset(self.triggers.features)
        return frozenset(self.features)

    def plausible(self, feature: str) -> tuple[float, float]:
        rule = self.features.get(feature)
        if rule is not None and rule.plausible is not None:
            return rule.plausible.min, rule.plausible.max
        return LAB_FEATURES[feature].plausible

    def comparators(self, feature: str) -> str:
        rule = self.features.get(feature)
        if rule is not None and rule.comparators is not None:
            return rule.comparators
        return self.values.comparators

    def egfr_derivation(self) -> DerivedEgfr | None:
        """The eGFR derivation, when it can run (creatinine is mapped)."""
        derived = self.derived.egfr
        return derived if derived is not None and "creatinine" in self.features else None

    @property
    def locator(self) -> Locator | None:
        """Turns a path in the mapping into file:line (None when built in code)."""
        return self._locator

    def attach(
        self, source: str, code_map: tuple[CodeMapEntry, ...], locator: Locator | None
    ) -> None:
        """Record where the mapping came from and its code map (the loader calls this)."""
        self._source = source
        self._code_map = code_map
        self._locator = locator
