"""tests/ mirrors the product's folders; the conftest puts each folder on the path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from conftest import MIRRORED

TESTS = Path(__file__).resolve().parents[1]
OWN_PACKAGES = {"conformance", "browser"}  # collected as they are, not by the path


def test_no_test_module_is_left_at_the_top() -> None:
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []


def test_every_folder_of_tests_is_mirrored_or_its_own_package() -> None:
    folders = {p.parent.name for p in TESTS.glob("*/test_*.py")}
    assert folders - OWN_PACKAGES == set(MIRRORED)


def test_test_file_names_are_unique_across_folders() -> None:
    """The default import mode names a module by its file: two alike would collide
    (a folder that is a package, like browser/, names its modules after itself)."""
    names = Counter(
        p.name for p in TESTS.glob("*/test_*.py") if not (p.parent / "__init__.py").exists()
    )
    assert [name for name, count in names.items() if count > 1] == []
