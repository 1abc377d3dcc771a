"""Mapping tests: ``*_test.yaml`` cases next to a mapping, run like code tests.

A case feeds one or more messages (HL7v2 or FHIR, files next to the test or
inline) through the *same* code the pipeline runs -- extraction, the patient
state merge, triggers and feature assembly (:func:`pipelines.features.evaluate`)
-- and compares what came out with what the engineer expects::

    mapping: mapping.yaml                 # default: mapping.yaml next to this file
    cases:
      - name: woman 57.28, creatinine 265 umol/L, UACR 199.3 mg/mmol
        messages: [oru-kfre-vector.hl7]   # or {inline: "MSH|..."}; several run in order
        expect:
          patient: U445566
          features: {age: 57.28, sex: F, egfr: 17.57, egfr_method: ckd-epi-2021,
                     uacr_mg_g: 1761.8}
      - name: no UACR yet
        messages: [oru-creatinine-only.hl7]
        expect:
          not_enough_data: {uacr: "no uacr result"}   # part of the stated reason

Other expectations: ``rejected: mapping.unknown_unit`` (a message is refused
with that reason -- what the sender would get as AE), ``unused: {CRP: "code
not mapped"}`` (by code), ``flagged: {creatinine: implausible}``,
``observations: 1`` (distinct predictions the EHR ends with: the debounce),
``triggered: false``, ``out_of_domain: "egfr 71.9 >= 60"`` (a complete record
the model's validated domain excludes: part of the stated reason). A number
matches to half a unit of its last written decimal (``17.57`` means
17.565..17.575) unless ``tolerance`` says otherwise.

``ehrbridge mappings test PATH`` runs them; ``tests/mappings/test_mapping_sites.py``
runs every case under ``mappings/sites`` inside pytest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator

from ehrbridge.core.errors import ConfigError, MessageRejected, MessageUnusable
from ehrbridge.core.located_yaml import load_located, validate_located
from ehrbridge.mappings.loader import load_mapping_file
from ehrbridge.mappings.schema import (
    CANONICAL_UNITS,
    DERIVED_FROM,
    LEGACY_RECORD_KEYS,
    Mapping,
    Strict,
)
from ehrbridge.pipelines.domain import OutOfDomain
from ehrbridge.pipelines.facts import Fact, FactRules, Unused
from ehrbridge.pipelines.features import FeatureRecord, NotEnoughData, evaluate
from ehrbridge.pipelines.state import PatientState
from ehrbridge.workbench.messages import Input, extract_input, inputs_from_bytes, read_inputs

Outcome = FeatureRecord | NotEnoughData | OutOfDomain

# A case may expect any feature (by name, or by the key records had before they were
# generic: uacr_mg_g), how one was obtained (egfr_method), the anchor and the episode.
_LABS = tuple(n for n in CANONICAL_UNITS if n not in DERIVED_FROM.values())
_NUMERIC = ("age", *_LABS, *(k for k, v in LEGACY_RECORD_KEYS.items() if v in _LABS))
FEATURE_KEYS = (*_NUMERIC, "sex", *(f"{n}_method" for n in DERIVED_FROM), "anchor", "episode")


# --------------------------------------------------------------------------- the file format


class MessageRef(Strict):
    file: str | None = Field(None, min_length=1)
    inline: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def short_form(cls, data: Any) -> Any:
        return {"file": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def one_source(self) -> Self:
        if (self.file is None) == (self.inline is None):
            raise ValueError("give exactly one of 'file' or 'inline'")
        return self


class Expect(Strict):
    patient: str | None = None
    features: dict[str, float | str] | None = None
    not_enough_data: dict[str, str] | None = None
    out_of_domain: str | None = None
    rejected: str | None = None
    unused: dict[str, str] | None = None
    flagged: dict[str, str] | None = None
    observations: int | None = Field(None, ge=0)
    triggered: bool | None = None
    tolerance: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def says_something(self) -> Self:
        checks = (
            self.features,
            self.not_enough_data,
            self.out_of_domain,
            self.rejected,
            self.unused,
            self.flagged,
            self.observations,
            self.triggered,
        )
        if all(c is None for c in checks):
            raise ValueError("expect nothing? give features, not_enough_data, rejected, ...")
        outcomes = (self.features, self.not_enough_data, self.out_of_domain)
        if sum(o is not None for o in outcomes) > 1:
            raise ValueError("expect one of features, not_enough_data or out_of_domain")
        unknown = sorted(set(self.features or {}) - set(FEATURE_KEYS))
        if unknown:
            raise ValueError(f"unknown feature keys {unknown}; known: {', '.join(FEATURE_KEYS)}")
        return self


class Case(Strict):
    name: str = Field(..., min_length=1)
    messages: list[MessageRef] = Field(..., min_length=1)
    expect: Expect


class TestFile(Strict):
    mapping: str = "mapping.yaml"
    cases: list[Case] = Field(..., min_length=1)


# --------------------------------------------------------------------------- running


@dataclass
class Replay:
    """What the pipeline did with a case's messages."""

    outcomes: list[tuple[str, Outcome]] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (input, reason, detail)
    unused: list[Unused] = field(default_factory=list)
    flagged: list[Fact] = field(default_factory=list)

    @property
    def observations(self) -> int:
        """Distinct prediction identities: what the EHR ends up holding."""
        return len({(p, r.episode) for p, r in self.outcomes if isinstance(r, FeatureRecord)})

    def final(self, patient: str | None) -> tuple[str, Outcome] | None:
        for pid, result in reversed(self.outcomes):
            if patient is None or pid == patient:
                return pid, result
        return None


def replay(inputs: list[Input], mapping: Mapping) -> Replay:
    """Feed messages in order through extraction, state merge, triggers and features."""
    rules = FactRules(mapping)
    states: dict[str, PatientState] = {}
    out = Replay()
    for item in inputs:
        try:
            extraction = extract_input(item, rules)
        except (MessageRejected, MessageUnusable) as error:
            out.rejected.append((item.name, error.reason, error.detail))
            continue
        for patient in extraction.patients:
            state = states.setdefault(patient.patient_id, PatientState(patient.patient_id))
            out.unused.extend(patient.unused)
            out.flagged.extend(f for f in patient.facts if f.flag)
            result = evaluate(state, patient, mapping)
            if result is not None:
                out.outcomes.append((patient.patient_id, result))
    return out


@dataclass
class CaseResult:
    file: str
    line: int | None
    name: str
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def report(self) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'}  {self.name}  ({self.where})"
        lines = [line for failure in self.failures for line in failure.splitlines()]
        return "\n".join([head, *(f"      {line}" for line in lines)])


@dataclass
class LoadedCase:
    file: Path
    line: int | None
    case: Case
    mapping_path: Path

    @property
    def id(self) -> str:
        return f"{self.file.parent.name}::{self.case.name}"


def find_test_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.rglob("*_test.yaml"))


def load_cases(test_file: Path) -> list[LoadedCase]:
    located = load_located(test_file)
    parsed = validate_located(TestFile, located)
    mapping_path = test_file.parent / parsed.mapping
    return [
        LoadedCase(test_file, located.line_of(("cases", i)), case, mapping_path)
        for i, case in enumerate(parsed.cases)
    ]


def collect_cases(root: Path) -> Iterator[LoadedCase]:
    for test_file in find_test_files(root):
        yield from load_cases(test_file)


def run_case(loaded: LoadedCase, mapping: Mapping | None = None) -> CaseResult:
    result = CaseResult(str(loaded.file), loaded.line, loaded.case.name, [])
    try:
        mapping = mapping or load_mapping_file(loaded.mapping_path)
        inputs = _inputs(loaded)
    except ConfigError as error:
        result.failures.append(f"cannot run: {error.detail}")
        return result
    except OSError as error:
        result.failures.append(f"cannot read a message: {error}")
        return result
    result.failures = compare(loaded.case.expect, replay(inputs, mapping))
    return result


def _inputs(loaded: LoadedCase) -> list[Input]:
    inputs: list[Input] = []
    for index, ref in enumerate(loaded.case.messages, start=1):
        if ref.file is not None:
            inputs.extend(read_inputs(loaded.file.parent / ref.file))
        else:
            assert ref.inline is not None
            inputs.extend(inputs_from_bytes(ref.inline.encode(), f"inline message {index}"))
    return inputs


def run_path(path: Path) -> list[CaseResult]:
    """Every case of every ``*_test.yaml`` at or under ``path``."""
    results: list[CaseResult] = []
    mappings: dict[Path, Mapping] = {}
    for test_file in find_test_files(path):
        try:
            cases = load_cases(test_file)
        except ConfigError as error:
            results.append(CaseResult(str(test_file), error.line, "(test file)", [error.detail]))
            continue
        for loaded in cases:
            mapping = mappings.get(loaded.mapping_path)
            if mapping is None:
                try:
                    mapping = mappings[loaded.mapping_path] = load_mapping_file(loaded.mapping_path)
                except ConfigError as error:
                    results.append(
                        CaseResult(str(test_file), loaded.line, loaded.case.name, [error.detail])
                    )
                    continue
            results.append(run_case(loaded, mapping))
    return results


# --------------------------------------------------------------------------- comparing


def compare(expect: Expect, got: Replay) -> list[str]:
    """Readable mismatch lines; empty when the case passes."""
    lines: list[str] = []
    lines += _compare_rejections(expect, got)
    final = got.final(expect.patient)
    if expect.features is not None:
        lines += _compare_features(expect, final, got)
    if expect.not_enough_data is not None:
        lines += _compare_not_enough(expect.not_enough_data, final)
    if expect.out_of_domain is not None:
        lines += _compare_out_of_domain(expect.out_of_domain, final)
    if expect.unused is not None:
        lines += _compare_unused(expect.unused, got.unused)
    if expect.flagged is not None:
        lines += _compare_flagged(expect.flagged, got.flagged)
    if expect.observations is not None and got.observations != expect.observations:
        lines.append(
            _row("observations", str(expect.observations), str(got.observations))
            + "  (distinct predictions the EHR would hold)"
        )
    if expect.triggered is not None and bool(got.outcomes) != expect.triggered:
        lines.append(_row("triggered", str(expect.triggered), str(bool(got.outcomes))))
    return lines


def _row(name: str, expected: str, got: str) -> str:
    return f"{name + ':':<16} expected {expected}\n{'':<16}      got {got}"


def _compare_rejections(expect: Expect, got: Replay) -> list[str]:
    reasons = [reason for _, reason, _ in got.rejected]
    if expect.rejected is not None:
        if expect.rejected in reasons:
            return []
        shown = "; ".join(f"{n}: {r}" for n, r, _ in got.rejected) or "no message was rejected"
        return [_row("rejected", expect.rejected, shown)]
    return [
        f"{name} was rejected (the sender would get AE/AR): {reason}: {detail}"
        for name, reason, detail in got.rejected
    ]


def _compare_features(expect: Expect, final: tuple[str, Outcome] | None, got: Replay) -> list[str]:
    assert expect.features is not None
    if final is None:
        who = f" for patient {expect.patient}" if expect.patient else ""
        return [f"no prediction was triggered{who}; patients seen: {_patients(got)}"]
    patient, result = final
    lines = []
    if expect.patient is None and got.outcomes and patient != got.outcomes[-1][0]:
        lines.append(f"several patients; compared the last ({patient})")
    if isinstance(result, NotEnoughData):
        return [*lines, "expected a feature record, got not enough data:"] + [
            f"  {k}: {v}" for k, v in sorted(result.missing.items())
        ]
    if isinstance(result, OutOfDomain):
        return [*lines, "expected a feature record, got one outside the model's domain:"] + [
            f"  {r}" for r in result.reasons
        ]
    values = _record_values(result)
    for key, wanted in expect.features.items():
        actual = values[key]
        if not _matches(key, wanted, actual, expect.tolerance):
            shown = (
                f"{wanted} ± {_tolerance(wanted, expect.tolerance):g}"
                if (key in _NUMERIC and isinstance(wanted, int | float))
                else str(wanted)
            )
            lines.append(_row(key, shown, _show(actual)))
    return lines


def _patients(got: Replay) -> str:
    return ", ".join(sorted({p for p, _ in got.outcomes})) or "none with a trigger"


def _record_values(record: FeatureRecord) -> dict[str, object]:
    values: dict[str, object] = dict(record.values)
    values.update({old: values[new] for old, new in LEGACY_RECORD_KEYS.items() if new in values})
    if "sex" in values:
        values["sex"] = "M" if values["sex"] else "F"
    methods = {f"{name}_method": record.method(name) for name in DERIVED_FROM if name in values}
    return {**values, **methods, "anchor": record.anchor, "episode": record.episode}


def _matches(key: str, wanted: float | str, actual: object, tolerance: float | None) -> bool:
    if key in _NUMERIC:
        if not isinstance(wanted, int | float) or not isinstance(actual, float):
            return False
        return abs(actual - wanted) <= _tolerance(wanted, tolerance) + 1e-12
    if key == "anchor" and isinstance(actual, datetime):
        return actual.isoformat().startswith(str(wanted))
    return str(actual) == str(wanted)


def _tolerance(wanted: float | str, explicit: float | None) -> float:
    """Half a unit of the last decimal written: ``17.57`` → 0.005, ``57`` → 0.5."""
    if explicit is not None:
        return explicit
    text = repr(wanted)
    if isinstance(wanted, float) and "." in text and "e" not in text:
        return 0.5 * 10.0 ** -len(text.split(".")[1])
    return 0.5


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _compare_not_enough(wanted: dict[str, str], final: tuple[str, Outcome] | None) -> list[str]:
    if final is None:
        return ["expected not enough data, but no prediction was triggered at all"]
    _, result = final
    if not isinstance(result, NotEnoughData):
        return [f"expected not enough data, got {_outcome_text(result)}"]
    lines = []
    for feature, text in wanted.items():
        actual = result.missing.get(feature)
        if actual is None or text not in actual:
            lines.append(_row(feature, f"…{text}…", actual or "(not missing)"))
    if lines:
        lines.append("stated reasons: " + result.reason)
    return lines


def _compare_out_of_domain(wanted: str, final: tuple[str, Outcome] | None) -> list[str]:
    if final is None:
        return ["expected a record outside the domain, but no prediction was triggered at all"]
    _, result = final
    if not isinstance(result, OutOfDomain):
        return [f"expected a record outside the domain, got {_outcome_text(result)}"]
    if any(wanted in reason for reason in result.reasons):
        return []
    return [_row("out_of_domain", f"…{wanted}…", result.reason)]


def _outcome_text(result: Outcome) -> str:
    if isinstance(result, FeatureRecord):
        values = ", ".join(f"{k} {_show(v)}" for k, v in _record_values(result).items())
        return f"a feature record: {values}"
    if isinstance(result, OutOfDomain):
        return f"a record outside the model's domain: {result.reason}"
    return f"not enough data: {result.reason}"


def _compare_unused(wanted: dict[str, str], unused: list[Unused]) -> list[str]:
    lines = []
    for code, text in wanted.items():
        found = [u for u in unused if code in (u.code, u.ref)]
        if not any(text in u.reason for u in found):
            shown = "; ".join(f"{u.code}: {u.reason}" for u in found) or "(used, or not sent)"
            lines.append(_row(f"unused {code}", f"…{text}…", shown))
    return lines


def _compare_flagged(wanted: dict[str, str], flagged: list[Fact]) -> list[str]:
    lines = []
    for feature, text in wanted.items():
        found = [f for f in flagged if f.feature == feature]
        if not any(text in f.flag for f in found):
            shown = "; ".join(f.flag for f in found) or "(nothing flagged)"
            lines.append(_row(f"flagged {feature}", f"…{text}…", shown))
    return lines
