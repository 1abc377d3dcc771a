"""The hashed lock files scripts/bootstrap installs from match pyproject.toml.

scripts/bootstrap runs ``pip install --require-hashes -r requirements/*.txt`` and
then installs ehrbridge itself with ``--no-deps``: a dependency added to
pyproject.toml but missing from a lock would go uninstalled (bootstrap's
``pip check`` stops there too, but only on the machine that bootstraps). These
checks read the files, so a stale lock fails CI before anyone installs it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self) -> bool:
        """Whether pip installs this pin here (numpy and scipy differ by Python version)."""
        return self.marker is None or self.marker.evaluate()


def read_lock(path: Path) -> list[Pin]:
    """The pins of a pip requirements file with ``--hash`` options, as uv writes it."""
    text = path.read_text().replace("\\\n", " ")
    pins = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement, *options = line.split(" --hash=")
        req = Requirement(requirement.strip())
        [(op, version)] = [(s.operator, s.version) for s in req.specifier]
        assert op == "==", f"{path.name}: {requirement.strip()} is not pinned exactly"
        hashes = tuple(option.split()[0] for option in options)
        pins.append(Pin(canonicalize_name(req.name), Version(version), req.marker, hashes))
    return pins


def extra(name: str) -> list[str]:
    """An extra's requirements, with ``ehrbridge[other]`` replaced by that extra's own."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    found = []
    for line in extras[name]:
        requirement = Requirement(line)
        if requirement.name == "ehrbridge":
            found += [r for other in sorted(requirement.extras) for r in extra(other)]
        else:
            found.append(line)
    return found


def project() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build_in = (LOCKS / "build.in").read_text().splitlines()
    build = [line.strip() for line in build_in if line.strip() and not line.startswith("#")]
    product = [*data["project"]["dependencies"], *build]
    return {"product": product, "dev": [*product, *extra("dev")]}


@pytest.mark.parametrize("lock", ["product", "dev"])
def test_every_pin_is_exact_and_hashed_with_sha256(lock: str) -> None:
    pins = read_lock(LOCKS / f"{lock}.txt")
    assert len(pins) > 20
    for pin in pins:
        assert pin.hashes, f"{pin.name} has no --hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), pin.name


@pytest.mark.parametrize("lock", ["product", "dev"])
def test_the_lock_satisfies_every_requirement_of_pyproject(lock: str) -> None:
    installed = {p.name: p for p in read_lock(LOCKS / f"{lock}.txt") if p.applies()}
    for line in project()[lock]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in installed, f"{name} is in pyproject.toml but not in {lock}.txt: scripts/lock"
        version = installed[name].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock}.txt pins {name}=={version}, pyproject.toml asks {requirement.specifier}"
        )


def test_the_product_runs_on_the_same_versions_in_the_dev_set() -> None:
    """dev.txt is resolved with product.txt as constraints: tests run what ships.

    Versions and hashes must match; a marker may be wider in dev.txt, where a
    dev tool needs the same package on more platforms (cffi on Windows).
    """
    dev: dict[str, list[Pin]] = {}
    for pin in read_lock(LOCKS / "dev.txt"):
        dev.setdefault(pin.name, []).append(pin)
    for pin in read_lock(LOCKS / "product.txt"):
        assert pin.name in dev, f"{pin.name} is in product.txt but not in dev.txt"
        same = [d for d in dev[pin.name] if d.version == pin.version]
        assert same, f"dev.txt pins {pin.name} at another version than product.txt"
        assert set(same[0].hashes) == set(pin.hashes)


def test_bootstrap_installs_only_from_the_locks_with_hashes_required() -> None:
    """Nothing unhashed: the locks with --require-hashes, ehrbridge without deps or isolation."""
    script = (ROOT / "scripts" / "bootstrap").read_text()
    installs = [line.strip() for line in script.splitlines() if "pip install" in line]
    assert installs == [
        '.venv/bin/python -m pip install --quiet --require-hashes --only-binary :all: -r "$2"',
        '.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e ".$3"',
    ]
