"""Site configuration: validation, and errors that name file, line and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ehrbridge.config import Mode, SiteConfig, load_site_config, parse_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.mappings.units import normalise_unit

SANDBOX = Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml"


def sandbox_text() -> str:
    return SANDBOX.read_text()


def test_sandbox_site_is_valid_and_live() -> None:
    config = load_site_config(SANDBOX)
    assert config.site == "sandbox"
    assert config.mode is Mode.LIVE
    assert config.model.calibration.value == "north_american"
    assert config.data_dir.is_absolute()


def test_mode_defaults_to_shadow() -> None:
    text = sandbox_text().replace("mode: live ", "# mode removed ")
    assert parse_site_config(text).mode is Mode.SHADOW


def test_unknown_field_names_file_line_and_field(tmp_path: Path) -> None:
    text = sandbox_text().replace("  timeout_s: 2.0", "  timout_s: 2.0")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    line = 1 + text.splitlines().index("  timout_s: 2.0")
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    assert caught.value.file == str(path)
    assert caught.value.line == line
    assert caught.value.field == "model.timout_s"
    assert f"{path}:{line}: model.timout_s: unknown field" in str(caught.value)


def test_bad_value_points_at_its_line() -> None:
    text = sandbox_text().replace("window_days: 730", "window_days: -1")
    line = 1 + text.splitlines().index("      window_days: -1")
    with pytest.raises(ConfigError) as caught:
        parse_site_config(text, "site.yaml")
    assert (caught.value.line, caught.value.field) == (line, "mapping.features.uacr.window_days")


def test_missing_required_field_is_named() -> None:
    text = sandbox_text().replace("    fhir_system: urn:ehrbridge:sandbox:mrn\n", "")
    with pytest.raises(ConfigError) as caught:
        parse_site_config(text, "site.yaml")
    assert caught.value.field == "mapping.patient.fhir_system"
    assert "Field required" in str(caught.value)


def test_invalid_yaml_reports_the_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_site_config("site: x\nmodel: [unclosed\n", "broken.yaml")
    assert caught.value.file == "broken.yaml"
    assert caught.value.line is not None


def test_live_mode_requires_a_writeback_target() -> None:
    text = sandbox_text().replace("  fhir_base: http://127.0.0.1:8090/fhir\n", "  timeout_s: 5\n")
    with pytest.raises(ConfigError, match=r"writeback\.fhir_base is not set"):
        parse_site_config(text)


def test_a_code_mapped_to_two_features_is_refused() -> None:
    text = sandbox_text().replace("code: 9318-7}", "code: 2160-0}")
    with pytest.raises(ConfigError, match="2160-0 is mapped to both creatinine and uacr"):
        parse_site_config(text)


def test_unit_rule_needs_exactly_one_factor() -> None:
    text = sandbox_text().replace("umol/L: {divide: 88.4}", "umol/L: {divide: 88.4, multiply: 2}")
    with pytest.raises(ConfigError, match="exactly one"):
        parse_site_config(text)


def test_unit_conversion_factors() -> None:
    config = load_site_config(SANDBOX)
    creatinine = config.mapping.features["creatinine"].units
    uacr = config.mapping.features["uacr"].units
    assert creatinine["umol/L"].convert(265.0) == pytest.approx(265.0 / 88.4, abs=1e-12)
    assert uacr["mg/mmol"].convert(199.3) == pytest.approx(1761.812, abs=1e-9)


def test_units_that_differ_only_in_spelling_are_one_unit() -> None:
    assert normalise_unit(" µmol/L ") == normalise_unit("umol/l") == normalise_unit("μmol/L")
    text = sandbox_text().replace(
        "mg/dL: {multiply: 1}", "mg/dL: {multiply: 1}\n        mg/dl: {multiply: 1}"
    )
    with pytest.raises(ConfigError, match="same unit"):
        parse_site_config(text)


def test_site_name_must_be_a_topic_token() -> None:
    with pytest.raises(ConfigError, match="site"):
        parse_site_config(sandbox_text().replace("site: sandbox", "site: My Site"))


def test_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown time zone"):
        parse_site_config(sandbox_text().replace("timezone: UTC", "timezone: Mars/Olympus"))


def test_config_is_immutable() -> None:
    config: SiteConfig = load_site_config(SANDBOX)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error type
        config.site = "other"  # type: ignore[misc]


def test_a_kfre_site_without_its_calibration_is_refused_by_config_check(tmp_path: Path) -> None:
    """No default: the European site left on North American numbers is impossible."""
    text = sandbox_text().replace("  calibration: north_american\n", "")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    model_line = 1 + text.splitlines().index("model:")
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    error = caught.value
    assert (error.file, error.line, error.field) == (str(path), model_line, "model.calibration")
    assert "north_american or non_north_american" in str(error)
    checked = subprocess.run(
        [str(Path(sys.executable).with_name("ehrbridge")), "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode != 0
    assert f"{path}:{model_line}: model.calibration: required for kfre-4var" in checked.stderr


def test_a_stated_calibration_is_kept() -> None:
    text = sandbox_text().replace("calibration: north_american", "calibration: non_north_american")
    assert parse_site_config(text).model.calibration == "non_north_american"
