"""scripts/kafka and scripts/hapi refuse jars that differ from their SHA-256 pins.

Each test copies the real, verified cache (symlinks, so HAPI's 290 MB are not
copied), tampers with one jar, and runs the real script against the copy: a
changed byte, a missing jar or an extra one stops ``start`` before a JVM is
launched, with the jar named. The untouched copy still verifies, so the
refusal is the tampering's doing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from kafka_fixture import running_in_ci

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / name), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def cached(path: str) -> Path:
    """A directory of the real cache; skipped (failed in CI) when the service was never built."""
    where = Path(path)
    if not where.is_dir():
        if running_in_ci():
            pytest.fail(f"{where} missing: scripts/test starts Kafka and HAPI before pytest")
        pytest.skip(f"{where} missing: run scripts/kafka install and scripts/hapi build")
    return where


def mirror(source: Path, target: Path) -> Path:
    """``target`` with a symlink to each file of ``source``, and real copies of stamps."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name.startswith("."):
            shutil.copy(item, target / item.name)  # .complete: the cache key
        elif item.is_file():
            (target / item.name).symlink_to(item)
    return target


def tamper_with(libs: Path, jar: str) -> None:
    """One byte appended to a jar: a different file under the same name."""
    original = (libs / jar).resolve()
    (libs / jar).unlink()
    (libs / jar).write_bytes(original.read_bytes() + b"\0")


# ---------------------------------------------------------------- Kafka ----


@pytest.fixture
def kafka_home(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    installed = subprocess.run(
        [str(SCRIPTS / "kafka"), "install"], capture_output=True, text=True, check=False
    )
    libs = cached(installed.stdout.strip().splitlines()[-1] if installed.returncode == 0 else "")
    home = tmp_path / "kafka-home"
    mirror(libs, home / "libs")
    env = {"EHRBRIDGE_KAFKA_HOME": str(home), "EHRBRIDGE_KAFKA_DATA": str(tmp_path / "data")}
    return home / "libs", env


def test_kafka_jars_as_resolved_match_their_pins(kafka_home: tuple[Path, dict[str, str]]) -> None:
    _, env = kafka_home
    verified = script("kafka", "verify", env=env)
    assert verified.returncode == 0, verified.stderr
    assert "45 jars" in verified.stderr


def test_kafka_refuses_to_start_with_a_changed_jar(
    kafka_home: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    libs, env = kafka_home
    tamper_with(libs, "kafka-clients-4.4.0.jar")
    started = script("kafka", "start", env=env)
    assert started.returncode != 0
    assert "MISMATCH:   kafka-clients-4.4.0.jar" in started.stderr
    assert "refusing" in started.stderr
    assert not (tmp_path / "data" / "kafka.pid").exists()  # no JVM was launched
    assert started.stdout == ""  # no bootstrap address for a caller to use


def test_kafka_refuses_a_missing_or_an_extra_jar(kafka_home: tuple[Path, dict[str, str]]) -> None:
    libs, env = kafka_home
    gone = sorted(libs.glob("*.jar"))[0]
    gone.unlink()
    (libs / "extra-1.0.jar").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    verified = script("kafka", "verify", env=env)
    assert verified.returncode != 0
    assert "not pinned: extra-1.0.jar" in verified.stderr
    assert f"missing:    {gone.name}" in verified.stderr


def test_a_kafka_version_without_pins_is_refused_before_any_download(tmp_path: Path) -> None:
    env = {"EHRBRIDGE_KAFKA_VERSION": "9.9.9", "EHRBRIDGE_KAFKA_HOME": str(tmp_path / "home")}
    installed = script("kafka", "install", env=env)
    assert installed.returncode != 0
    assert "no SHA-256 pins for Kafka 9.9.9" in installed.stderr
    assert "resolving" not in installed.stderr and not (tmp_path / "home").exists()


# ----------------------------------------------------------------- HAPI ----


@pytest.mark.hapi
def test_hapi_refuses_to_start_with_a_changed_jar(tmp_path: Path) -> None:
    built = script("hapi", "build", env={})
    build = cached(built.stdout.strip().splitlines()[-1] if built.returncode == 0 else "")
    home = tmp_path / "hapi-home"
    copy = mirror(build, home / build.name)
    libs = mirror(build / "libs", copy / "libs")
    env = {"EHRBRIDGE_HAPI_HOME": str(home), "EHRBRIDGE_HAPI_DATA": str(tmp_path / "data")}
    assert script("hapi", "verify", env=env).returncode == 0

    jar = next(p.name for p in sorted(libs.iterdir()) if p.name.startswith("hapi-fhir-base-"))
    tamper_with(libs, jar)
    started = script("hapi", "start", env=env)
    assert started.returncode != 0
    assert f"MISMATCH:   {jar}" in started.stderr and "refusing" in started.stderr
    assert not (tmp_path / "data" / "hapi.pid").exists()
    assert started.stdout == ""
