"""Every mapping test case under mappings/sites, run inside pytest.

The same cases ``ehrbridge mappings test mappings/sites`` runs: a new site's
``*_test.yaml`` is picked up here without touching this file, so CI runs every
mapping test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrbridge.mappings.loader import SITES_DIR, check_path
from ehrbridge.mappings.testing import LoadedCase, collect_cases, run_case

CASES = list(collect_cases(SITES_DIR))
SITES = sorted(p for p in SITES_DIR.iterdir() if p.is_dir())


def test_every_example_site_has_cases() -> None:
    with_cases = {case.file.parent for case in CASES}
    assert {"us-lab-loinc", "eu-si-local-codes", "fhir-synthea"} <= {p.name for p in SITES}
    assert set(SITES) == with_cases, "every site folder needs a *_test.yaml"


@pytest.mark.parametrize("loaded", CASES, ids=[c.id for c in CASES])
def test_mapping_case(loaded: LoadedCase) -> None:
    result = run_case(loaded)
    assert result.passed, result.report()


@pytest.mark.parametrize("site", SITES, ids=[p.name for p in SITES])
def test_example_site_mapping_is_clean(site: Path) -> None:
    problems = [d for d in check_path(site) if d.severity in ("error", "warning")]
    assert problems == []
