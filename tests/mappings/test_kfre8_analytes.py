"""The 8-variable KFRE's serum analytes as lab features: units, lint, extraction.

Albumin, phosphate, bicarbonate and calcium are canonical in the US
conventional units the equation is centred in (g/dL, mg/dL, mmol/L, mg/dL).
Every factor here is worked by hand from the molar mass, so a table that
drifts from the chemistry fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrbridge.mappings.diagnostics import Diagnostic
from ehrbridge.mappings.loader import check_path, load_mapping_file
from ehrbridge.mappings.schema import KFRE8_ANALYTES, LAB_FEATURES, MODELS, UnitRule
from ehrbridge.mappings.units import known_unit, same_unit
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import FactRules, extract
from ehrbridge.sandbox import kfre

# A European lab: SI units everywhere, LOINC codes of the molar quantities.
SI_MAPPING = """\
version: t-8
model: kfre-8var
timezone: UTC
patient:
  assigning_authority: HOSP
  fhir_system: urn:test:mrn
features:
  creatinine:
    codes: [LN|14682-9]
    units: {umol/L: {divide: 88.4}}
    window_days: 365
  uacr:
    codes: [LN|9318-7]
    units: {mg/mmol: {multiply: 8.84}}
    window_days: 730
  albumin:
    codes: [LN|1751-7]
    units: {g/L: {divide: 10}, g/dL: {multiply: 1}}
    window_days: 365
  phosphate:
    codes: [LN|14879-1, LN|2777-1]
    units: {mmol/L: {multiply: 3.097}, mg/dL: {multiply: 1}}
    window_days: 365
  bicarbonate:
    codes: [LN|1963-8, LN|2028-9]
    units: {mmol/L: {multiply: 1}, meq/L: {multiply: 1}}
    window_days: 365
  calcium:
    codes: [LN|2000-8, LN|17861-6]
    units: {mmol/L: {multiply: 4.008}, mg/dL: {multiply: 1}}
    window_days: 365
"""


def factor(feature: str, unit: str) -> float:
    known = known_unit(feature, unit)
    assert known is not None and known.factor is not None, f"{feature} in {unit}"
    return known.factor


# --------------------------------------------------------------------------- units


def test_the_analytes_are_lab_features_in_the_equation_units() -> None:
    canonical = {name: LAB_FEATURES[name].canonical_unit for name in KFRE8_ANALYTES}
    assert canonical == {
        "albumin": "g/dL",
        "phosphate": "mg/dL",
        "bicarbonate": "mmol/L",
        "calcium": "mg/dL",
    }
    assert canonical == dict(kfre.EQUATION_UNITS)  # the units the sandbox equation takes


def test_factors_are_worked_from_the_molar_mass() -> None:
    # Ca 40.078 g/mol: 2.40 mmol/L = 96.1872 mg/L = 9.61872 mg/dL
    assert 2.40 * factor("calcium", "mmol/L") == pytest.approx(9.61872, abs=1e-9)
    # Ca2+ carries two charges: 4.8 mEq/L = 2.4 mmol/L = 9.61872 mg/dL
    assert 4.8 * factor("calcium", "mEq/L") == pytest.approx(9.61872, abs=1e-9)
    # P 30.973762 g/mol: 1.30 mmol/L = 40.2658906 mg/L = 4.02658906 mg/dL
    assert 1.30 * factor("phosphate", "mmol/L") == pytest.approx(4.02658906, abs=1e-9)
    # 38 g/L = 3.8 g/dL; 3800 mg/dL would be 3.8 g/dL too
    assert 38 * factor("albumin", "g/L") == pytest.approx(3.8)
    assert 3800 * factor("albumin", "mg/dL") == pytest.approx(3.8)
    # HCO3- is monovalent: 22 mEq/L = 22 mmol/L
    assert 22 * factor("bicarbonate", "mEq/L") == 22
    assert factor("calcium", "mg/dL") == factor("phosphate", "mg/dL") == 1.0


def test_the_mapping_factors_of_the_brief_are_within_the_lint_tolerance() -> None:
    # Sites write the rounded factors (4.008, 3.097); the table holds the molar masses.
    assert UnitRule(multiply=4.008).convert(2.40) == pytest.approx(9.6192, abs=1e-9)
    assert UnitRule(multiply=3.097).convert(1.30) == pytest.approx(4.0261, abs=1e-9)
    assert UnitRule(divide=10).convert(38.0) == pytest.approx(3.8)
    assert abs(4.008 / factor("calcium", "mmol/L") - 1) < 1e-4
    assert abs(3.097 / factor("phosphate", "mmol/L") - 1) < 1e-3


def test_the_equation_and_the_mapping_use_the_same_molar_masses() -> None:
    assert factor("calcium", "mmol/L") == pytest.approx(kfre.CALCIUM_MG_DL_PER_MMOL_L)
    assert factor("phosphate", "mmol/L") == pytest.approx(kfre.PHOSPHATE_MG_DL_PER_MMOL_L)


def test_what_cannot_be_converted_says_so() -> None:
    # Phosphate's charge depends on pH; albumin in umol/L would need its molar mass.
    for feature, unit in (("phosphate", "mEq/L"), ("albumin", "umol/L"), ("bicarbonate", "mg/dL")):
        known = known_unit(feature, unit)
        assert known is not None and known.factor is None, (feature, unit)
    # mEq/L and mmol/L are the same number for bicarbonate only: not one unit in general.
    assert not same_unit("mEq/L", "mmol/L")


# --------------------------------------------------------------------------- lint


def findings(folder: Path, text: str) -> list[Diagnostic]:
    (folder / "mapping_test.yaml").touch()  # silence the "no tests" warning
    path = folder / "mapping.yaml"
    path.write_text(text, encoding="utf-8")
    return [d for d in check_path(path) if d.severity != "note"]


def test_a_kfre8_mapping_in_si_units_is_clean(tmp_path: Path) -> None:
    assert findings(tmp_path, SI_MAPPING) == []
    assert MODELS["kfre-8var"].takes("albumin")
    assert not MODELS["kfre-4var"].takes("albumin")


@pytest.mark.parametrize(
    ("wrong", "right", "expected"),
    [
        # calcium's and phosphate's factors swapped: 0.7 mg/dL off at a normal calcium
        ("mmol/L: {multiply: 4.008}", "mmol/L: {multiply: 3.097}", "× 4.0078"),
        ("g/L: {divide: 10}", "g/L: {multiply: 10}", "÷ 10"),
    ],
)
def test_a_wrong_factor_is_an_error(tmp_path: Path, wrong: str, right: str, expected: str) -> None:
    [error] = [d for d in findings(tmp_path, SI_MAPPING.replace(wrong, right)) if d.is_error]
    assert expected in error.message


def test_phosphate_in_meq_is_refused(tmp_path: Path) -> None:
    text = SI_MAPPING.replace(
        "{mmol/L: {multiply: 3.097}, mg/dL: {multiply: 1}}",
        "{mmol/L: {multiply: 3.097}, mEq/L: {multiply: 1}}",
    )
    [error] = [d for d in findings(tmp_path, text) if d.is_error]
    assert error.field == "features.phosphate.units.mEq/L"
    assert "cannot convert" in error.message


def test_a_kfre8_mapping_needs_all_four_analytes(tmp_path: Path) -> None:
    text = SI_MAPPING.split("  albumin:", maxsplit=1)[0]
    messages = [d.message for d in findings(tmp_path, text) if d.is_error]
    assert len(messages) == 4
    assert all("never produce a complete feature record" in m for m in messages)


def test_a_kfre4_mapping_with_the_analytes_says_which_model_takes_them(tmp_path: Path) -> None:
    # A site running KFRE-4 and KFRE-8 maps all eight inputs under a kfre-4var mapping.
    text = SI_MAPPING.replace("model: kfre-8var", "model: kfre-4var")
    (tmp_path / "mapping_test.yaml").touch()
    path = tmp_path / "mapping.yaml"
    path.write_text(text, encoding="utf-8")
    found = check_path(path)
    assert [d for d in found if d.severity != "note"] == []
    [note] = [d for d in found if "kfre-8var" in d.message]
    assert note.field == "features.albumin"
    assert note.message.startswith("albumin, phosphate, bicarbonate, calcium: kfre-4var does not")


# --------------------------------------------------------------------------- extraction

SI_PANEL = (
    "MSH|^~\\&|LIS|LAB|X|Y|20260101091500||ORU^R01|C1|P|2.5\r"
    "PID|1||M42^^^HOSP^MR||Doe^Ann||19580921|F\r"
    "OBR|1|||PANEL|||20260101083000\r"
    "OBX|1|NM|1751-7^Albumin^LN||38|g/L|||||F\r"
    "OBX|2|NM|14879-1^Phosphate^LN||1.30|mmol/L|||||F\r"
    "OBX|3|NM|2028-9^Total CO2^LN||22|mmol/L|||||F\r"
    "OBX|4|NM|2000-8^Calcium^LN||2.40|mmol/L|||||F\r"
    "OBX|5|NM|17861-6^Calcium^LN||9.6|mg/dL|||||F"
)


def test_extraction_converts_si_results_to_the_equation_units(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(SI_MAPPING, encoding="utf-8")
    rules = FactRules(load_mapping_file(path))
    [patient] = extract(Message.parse(SI_PANEL), rules).patients
    values = [(f.feature, round(f.value, 6)) for f in patient.facts]
    assert values == [
        ("albumin", 3.8),
        ("phosphate", round(1.30 * 3.097, 6)),  # the site's stated factor, 4.0261
        ("bicarbonate", 22.0),
        ("calcium", round(2.40 * 4.008, 6)),  # 9.6192
        ("calcium", 9.6),
    ]


# --------------------------------------------------------------- the synthetic EHR's panels

SANDBOX_SITE = Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml"


def test_si_and_conventional_labs_agree_once_converted() -> None:
    # The same population measured by SI and by US labs: after the sandbox site's
    # conversion the two kinds of lab must describe the same patients, analyte by analyte.
    from ehrbridge.config import load_site_config
    from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

    mapping = load_site_config(SANDBOX_SITE).mapping
    assert set(KFRE8_ANALYTES) <= set(mapping.features)
    rules = FactRules(mapping)
    by_lab: dict[tuple[str, bool], list[float]] = {}
    for _, message in SyntheticEhr(seed=3, patients=200).stream(visits_per_patient=2):
        for patient in extract(Message.parse(message.decode("ascii")), rules).patients:
            si = any(f.raw_unit == "umol/L" for f in patient.facts if f.feature == "creatinine")
            for fact in patient.facts:
                by_lab.setdefault((fact.feature, si), []).append(fact.value)
    for analyte, tolerance in (("albumin", 0.15), ("phosphate", 0.4), ("calcium", 0.15)):
        si, us = by_lab[analyte, True], by_lab[analyte, False]
        assert len(si) > 50 and len(us) > 50
        # Within a tenth of the population's spread: a lab unit read as the other,
        # or the wrong molar mass, moves the mean by far more.
        assert abs(sum(si) / len(si) - sum(us) / len(us)) < tolerance, analyte
    assert 8.5 < sum(by_lab["calcium", True]) / len(by_lab["calcium", True]) < 10.0
