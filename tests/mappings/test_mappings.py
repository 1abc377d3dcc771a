"""The mapping format: units, code maps, lint, loading, and errors that name file:line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ehrbridge.config import load_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.mappings.codemaps import read_concept_map, read_csv
from ehrbridge.mappings.diagnostics import Diagnostic
from ehrbridge.mappings.loader import SITES_DIR, check_path, load_mapping_file
from ehrbridge.mappings.schema import UnitRule
from ehrbridge.mappings.units import known_unit, same_unit
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import FactRules, extract
from ehrbridge.workbench.site import resolve_site

BASE = """\
version: t-1
timezone: Europe/Ljubljana
patient:
  assigning_authority: HOSP
  fhir_system: urn:test:mrn
code_maps:
  - system: 99LAB
    codes:
      CREA: 14682-9
      U-ACR: 9318-7
features:
  creatinine:
    codes: [LN|14682-9]
    units:
      umol/L: {divide: 88.4}
    window_days: 365
  uacr:
    codes: [LN|9318-7]
    units:
      mg/mmol: {multiply: 8.84}
    window_days: 730
"""


def write(folder: Path, text: str, name: str = "mapping.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def diagnostics(folder: Path, text: str) -> list[Diagnostic]:
    (folder / "mapping_test.yaml").touch()  # silence the "no tests" warning
    return check_path(write(folder, text))


def errors(folder: Path, text: str) -> list[Diagnostic]:
    return [d for d in diagnostics(folder, text) if d.is_error]


# --------------------------------------------------------------------------- units


def test_unit_conversions_match_hand_computed_values() -> None:
    # 265 umol/L / 88.4 umol/L per mg/dL, worked by hand: 2.99773755656...
    assert UnitRule(divide=88.4).convert(265.0) == pytest.approx(2.997737556561086, rel=1e-12)
    # 199.3 mg/mmol x 8.84 = 1761.812 mg/g
    assert UnitRule(multiply=8.84).convert(199.3) == pytest.approx(1761.812, rel=1e-12)
    # accept_as: the same number under another label
    assert UnitRule(accept_as="mL/min/{1.73_m2}").convert(44.5) == 44.5


def factor(feature: str, unit: str) -> float | None:
    known = known_unit(feature, unit)
    assert known is not None, f"{unit} is not in the table"
    return known.factor


def test_the_unit_table_agrees_with_the_chemistry() -> None:
    creatinine_mg_per_mmol = 113.12
    # 1 mg/mmol = 1 mg per 113.12 mg creatinine = 8.84 mg/g
    assert factor("uacr", "mg/mmol") == pytest.approx(8.84)
    assert 1000 / creatinine_mg_per_mmol == pytest.approx(8.84, abs=1e-3)
    assert factor("uacr", "g/mol") == pytest.approx(8.84)
    assert factor("uacr", "g/g") == 1000
    # 1 umol/L creatinine = 113.12 ug/L = 0.011312 mg/dL, i.e. / 88.4
    assert factor("creatinine", "µmol/L") == pytest.approx(1 / 88.4)
    assert factor("creatinine", "mmol/L") == pytest.approx(11.312, abs=1e-3)
    assert factor("creatinine", "mg/L") == pytest.approx(0.1)
    assert factor("egfr", "mL/s/1.73m2") == 60
    # mL/min is a clearance not indexed to body surface area: not convertible by a factor
    ml_min = known_unit("egfr", "mL/min")
    assert ml_min is not None and ml_min.factor is None
    assert same_unit("mL/min/1.73m2", "mL/min/{1.73_m2}")
    assert not same_unit("mL/min", "mL/min/{1.73_m2}")


def test_extraction_converts_with_the_site_factors(tmp_path: Path) -> None:
    rules = FactRules(load_mapping_file(write(tmp_path, BASE)))
    message = Message.parse(
        "MSH|^~\\&|LIS|LAB|X|Y|20260101091500||ORU^R01|C1|P|2.5\r"
        "PID|1||OTHER1^^^ZZZS^HC~M42^^^HOSP^MR||Doe^Ann||19680921|F\r"
        "OBR|1|||PANEL|||20260101083000\r"
        "OBX|1|NM|CREA^Kreatinin^99LAB||265|umol/L|||||F\r"
        "OBX|2|NM|U-ACR^ACR^99LAB||199.3|mg/mmol|||||F"
    )
    [patient] = extract(message, rules).patients
    assert patient.patient_id == "M42"  # the HOSP repetition, not the first one
    facts = {f.feature: f for f in patient.facts}
    assert facts["creatinine"].value == pytest.approx(2.997737556561086, rel=1e-12)
    assert facts["creatinine"].concept == "LN|14682-9" and facts["creatinine"].code == "CREA"
    assert facts["uacr"].value == pytest.approx(1761.812, rel=1e-12)
    assert facts["uacr"].effective.isoformat() == "2026-01-01T08:30:00+01:00"


# --------------------------------------------------------------------------- lint


def test_the_base_mapping_is_clean(tmp_path: Path) -> None:
    assert [d for d in diagnostics(tmp_path, BASE) if d.severity != "note"] == []


def test_a_feature_the_model_does_not_take_names_its_line(tmp_path: Path) -> None:
    text = BASE + "  potassium:\n    codes: [LN|2823-3]\n    units: {mmol/L: {multiply: 1}}\n"
    [error] = errors(tmp_path, text)
    assert error.line == line_of(text, "potassium:")
    assert error.field == "features.potassium"
    assert "not a lab feature" in error.message


def test_age_is_not_a_lab_feature_and_the_error_says_where_it_comes_from(tmp_path: Path) -> None:
    text = BASE + "  age:\n    codes: [LN|30525-0]\n    units: {a: {multiply: 1}}\n"
    [error] = errors(tmp_path, text)
    assert "birth date" in error.message


def test_a_wrong_factor_is_an_error(tmp_path: Path) -> None:
    text = BASE.replace("umol/L: {divide: 88.4}", "umol/L: {multiply: 88.4}")
    [error] = errors(tmp_path, text)
    assert (error.line, error.field) == (
        line_of(text, "umol/L: {multiply"),
        "features.creatinine.units.umol/L",
    )
    assert "÷ 88.4" in error.message and "× 88.4" in error.message


def test_a_unit_of_another_kind_cannot_be_converted(tmp_path: Path) -> None:
    text = BASE.replace("mg/mmol: {multiply: 8.84}", "mmol/L: {multiply: 8.84}")
    [error] = errors(tmp_path, text)
    assert "cannot convert mmol/L (substance concentration) to mg/g" in error.message


def test_egfr_in_ml_min_needs_the_site_to_say_so(tmp_path: Path) -> None:
    egfr = (
        "  egfr:\n    codes: [LN|33914-3]\n    units:\n      mL/min: {UNIT}\n    window_days: 365\n"
    )
    plain = BASE + egfr.replace("{UNIT}", "{multiply: 1}")
    [error] = errors(tmp_path, plain)
    assert "accept_as" in error.message and error.line == line_of(plain, "mL/min:")
    accepted = BASE + egfr.replace("{UNIT}", '{accept_as: "mL/min/{1.73_m2}"}')
    assert errors(tmp_path, accepted) == []
    wrong = BASE + egfr.replace("{UNIT}", "{accept_as: mg/dL}")
    [error] = errors(tmp_path, wrong)
    assert "accept_as must name the egfr unit" in error.message


def test_an_unknown_unit_is_a_warning_not_a_guess(tmp_path: Path) -> None:
    text = BASE.replace(
        "umol/L: {divide: 88.4}", "umol/L: {divide: 88.4}\n      xyz: {multiply: 3}"
    )
    [warning] = [d for d in diagnostics(tmp_path, text) if d.severity == "warning"]
    assert "cannot be verified" in warning.message and warning.line == line_of(text, "xyz")


def test_a_code_mapped_to_two_features_is_an_error(tmp_path: Path) -> None:
    text = BASE.replace("codes: [LN|9318-7]", "codes: [LN|9318-7, LN|14682-9]")
    [error] = errors(tmp_path, text)
    assert "LN|14682-9 is mapped to both creatinine and uacr" in error.message
    assert error.line == line_of(text, "codes: [LN|9318-7, LN|14682-9]")


def test_a_missing_window_is_an_error(tmp_path: Path) -> None:
    text = BASE.replace("    window_days: 730\n", "")
    [error] = errors(tmp_path, text)
    assert error.field == "features.uacr.window_days" and "window missing" in error.message


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("  uacr:\n    codes: [LN|9318-7]\n", "  egfr:\n    codes: [LN|9318-7]\n"), "needs uacr"),
        (("features:", "derived: {egfr: null}\nfeatures:"), "needs egfr"),
        (("features:", "values: {statuses: [C]}\nfeatures:"), "final results (F) are never used"),
    ],
)
def test_a_mapping_that_can_never_complete_a_record_is_an_error(
    tmp_path: Path, change: tuple[str, str], why: str
) -> None:
    text = BASE.replace(*change)
    problems = [e.message for e in errors(tmp_path, text)]
    assert any("can never produce a complete feature record" in p and why in p for p in problems)


def test_triggering_on_a_feature_the_site_never_sends_is_an_error(tmp_path: Path) -> None:
    text = BASE + "triggers:\n  features: [egfr]\n"
    messages = [e.message for e in errors(tmp_path, text)]
    assert any("egfr is not mapped at this site, so it never triggers" in m for m in messages)
    assert any("no mapped result ever triggers a prediction" in m for m in messages)


def test_a_uacr_range_that_lets_zero_reach_a_logarithm_is_an_error(tmp_path: Path) -> None:
    text = BASE.replace(
        "    window_days: 730", "    plausible: {min: 0, max: 5000}\n    window_days: 730"
    )
    [error] = errors(tmp_path, text)
    assert "KFRE takes its log" in error.message


def test_a_mapping_without_tests_gets_a_warning(tmp_path: Path) -> None:
    found = check_path(write(tmp_path, BASE))
    assert any("no *_test.yaml" in d.message for d in found)


# --------------------------------------------------------------------------- code maps


def test_csv_with_a_duplicate_code_names_both_lines(tmp_path: Path) -> None:
    csv = write(
        tmp_path,
        "system,code,target_system,target_code,display\n"
        "99LAB,CREA,LN,14682-9,Kreatinin\n"
        "# a comment\n"
        "99LAB,CREA,LN,2160-0,Kreatinin again\n",
        "codes.csv",
    )
    read = read_csv(csv)
    [problem] = read.problems
    assert (problem.line, problem.severity) == (4, "error")
    assert "99LAB|CREA is mapped twice (first at line 2)" in problem.message
    text = BASE.replace(
        "  - system: 99LAB\n    codes:\n      CREA: 14682-9\n      U-ACR: 9318-7\n",
        "  - csv: codes.csv\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_mapping_file(write(tmp_path, text))
    assert caught.value.file is not None and caught.value.file.endswith("codes.csv")
    assert caught.value.line == 4


def test_csv_needs_its_columns(tmp_path: Path) -> None:
    read = read_csv(write(tmp_path, "local,loinc\nCREA,2160-0\n", "codes.csv"))
    [problem] = read.problems
    assert problem.line == 1 and "missing column(s) system, code, target_code" in problem.message


def concept_map(equivalences: list[tuple[str, str, str, str]], key: str = "equivalence") -> str:
    elements = [
        {"code": code, "display": display, "target": [{"code": target, key: equivalence}]}
        for code, display, target, equivalence in equivalences
    ]
    doc = {
        "resourceType": "ConceptMap",
        "id": "lab",
        "status": "active",
        "group": [
            {
                "source": "http://lab.example/codes",
                "target": "http://loinc.org",
                "element": elements,
            }
        ],
    }
    return json.dumps(doc, indent=2)


def test_concept_map_with_an_unknown_equivalence_names_the_place(tmp_path: Path) -> None:
    text = concept_map(
        [("CREA", "Kreatinin", "14682-9", "equivalent"), ("ACR", "ACR", "9318-7", "equivalnt")]
    )
    path = write(tmp_path, text, "lab.json")
    read = read_concept_map(path)
    [problem] = read.problems
    assert problem.severity == "error"
    assert problem.line == line_of(text, '"equivalnt"')
    assert problem.field == "group[0].element[1].target[0].equivalence"
    assert [e.code for e in read.entries] == ["CREA"]


def test_concept_map_translations_reach_features(tmp_path: Path) -> None:
    write(
        tmp_path,
        concept_map(
            [
                ("CREA", "Kreatinin", "14682-9", "equivalent"),
                ("ACR", "ACR", "9318-7", "source-is-narrower-than-target"),  # R5 spelling
                ("ALB", "Albumin", "9318-7", "narrower"),  # not safe: skipped, warned
            ],
            key="relationship",
        ).replace('"relationship": "narrower"', '"equivalence": "narrower"'),
        "lab.json",
    )
    text = BASE.replace(
        "  - system: 99LAB\n    codes:\n      CREA: 14682-9\n      U-ACR: 9318-7\n",
        "  - concept_map: lab.json\n    system: 99LAB   # OBX-3.3 name of the group source\n",
    )
    found = diagnostics(tmp_path, text)
    assert [d.severity for d in found] == ["warning"]
    assert "narrower" in found[0].message
    rules = FactRules(load_mapping_file(tmp_path / "mapping.yaml"))
    assert rules.feature_of("99LAB", "CREA") == "creatinine"
    assert rules.feature_of("http://lab.example/codes", "ACR") == "uacr"
    assert rules.feature_of("99LAB", "ALB") is None
    assert rules.rule_for("99LAB", "CREA").via == f"lab.json:{line_of(_cm(tmp_path), 'equivalent')}"  # type: ignore[union-attr]


def _cm(folder: Path) -> str:
    return (folder / "lab.json").read_text()


def test_a_local_code_feeding_a_feature_directly_and_elsewhere_by_the_map_is_an_error(
    tmp_path: Path,
) -> None:
    text = BASE.replace("codes: [LN|9318-7]", "codes: [LN|9318-7, 99LAB|CREA]")
    [error] = errors(tmp_path, text)
    assert "99LAB|CREA feeds uacr directly" in error.message and "14682-9" in error.message


# --------------------------------------------------------------------------- loading


def site_config(mapping_section: str) -> str:
    return (
        "site: t\nmapping:\n"
        + mapping_section
        + "model:\n  url: http://127.0.0.1:1\n  calibration: non_north_american\n"
    )


def test_a_site_config_can_name_a_mapping_file(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    mapping = write(tmp_path / "mappings", BASE)
    config = load_site_config(
        write(tmp_path, site_config("  file: mappings/mapping.yaml\n"), "site.yaml")
    )
    assert config.mapping.version == "t-1"
    assert Path(config.mapping.source) == mapping
    assert FactRules(config.mapping).feature_of("99LAB", "U-ACR") == "uacr"


def test_nothing_starts_with_a_broken_mapping_file(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    broken = BASE.replace("umol/L: {divide: 88.4}", "umol/L: {multiply: 88.4}")
    write(tmp_path / "mappings", broken)
    site = write(tmp_path, site_config("  file: mappings/mapping.yaml\n"), "site.yaml")
    with pytest.raises(ConfigError) as caught:
        load_site_config(site)
    assert caught.value.file == str(tmp_path / "mappings" / "mapping.yaml")
    assert caught.value.line == line_of(broken, "umol/L:")
    assert caught.value.field == "features.creatinine.units.umol/L"


def test_a_missing_mapping_file_names_the_site_config_line(tmp_path: Path) -> None:
    text = site_config("  file: nowhere.yaml\n")
    with pytest.raises(ConfigError) as caught:
        load_site_config(write(tmp_path, text, "site.yaml"))
    assert (caught.value.line, caught.value.field) == (line_of(text, "nowhere"), "mapping.file")


def test_malformed_mapping_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_mapping_file(write(tmp_path, BASE.replace("window_days: 365", "window_days: [365")))
    assert caught.value.line is not None and "invalid YAML" in str(caught.value)


def test_inline_mapping_errors_point_into_the_site_config(tmp_path: Path) -> None:
    inline = "".join(f"  {line}\n" for line in BASE.splitlines())
    text = site_config(
        inline.replace("window_days: 730", "window_days: 730\n      plausible: {min: 0, max: 1}")
    )
    with pytest.raises(ConfigError) as caught:
        load_site_config(write(tmp_path, text, "site.yaml"))
    assert caught.value.field == "mapping.features.uacr.plausible.min"
    assert caught.value.line == line_of(text, "plausible")


def test_warnings_are_logged_at_load_without_stopping(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = BASE.replace(
        "umol/L: {divide: 88.4}", "umol/L: {divide: 88.4}\n      xyz: {multiply: 3}"
    )
    (tmp_path / "mapping_test.yaml").touch()
    with caplog.at_level(logging.WARNING):
        mapping = load_mapping_file(write(tmp_path, text))
    assert "xyz" in mapping.features["creatinine"].units
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)


def test_sites_resolve_by_name_folder_file_and_site_config(tmp_path: Path) -> None:
    by_name = resolve_site("eu-si-local-codes")
    assert by_name.name == "eu-si-local-codes" and by_name.config is None
    assert resolve_site(SITES_DIR / "eu-si-local-codes").path == by_name.path
    assert resolve_site(by_name.path).mapping.version == by_name.mapping.version
    sandbox = resolve_site(Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml")
    assert sandbox.name == "sandbox" and sandbox.config is not None
    with pytest.raises(ConfigError, match="eu-si-local-codes"):
        resolve_site(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- declarative fields


def test_sex_is_read_from_a_z_segment_with_a_value_map() -> None:
    rules = FactRules(resolve_site("eu-si-local-codes").mapping)
    message = Message.parse(
        "MSH|^~\\&|LIS|LAB|X|Y|20260101091500||ORU^R01|C1|P|2.5\r"
        "PID|1||U1^^^UKCLJ^MR||Doe^Ann||19680921|U\r"
        "ZPI|1|Ž\r"
        "OBR|1|||BIOKEM|||20260101083000\r"
        "OBX|1|NM|CREA^Kreatinin^99UKC||265|umol/L|||||F"
    )
    [patient] = extract(message, rules).patients
    assert patient.demographics.sex == "F"  # ZPI-2 wins over PID-8 "U"
    without_z = Message.parse(message.to_er7().replace("\rZPI|1|Ž", ""))
    assert extract(without_z, rules).patients[0].demographics.sex == "U"
