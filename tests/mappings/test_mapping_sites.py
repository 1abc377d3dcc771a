"""Every mapping test case under mappings/sites, run inside pytest.

The same cases ``ehrbridge mappings test mappings/sites`` runs: a new site's
``*_test.yaml`` is picked up here without touching this file, so CI runs every
mapping test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ehrbridge.mappings.loader import SITES_DIR, check_path
from ehrbridge.workbench.testing import LoadedCase, collect_cases, run_case

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


def test_a_whole_synthea_history_replays_as_one_prediction_per_episode_as_in_the_pipeline() -> None:
    """`mappings test` must agree with ProcessStage: a Bundle is split into episodes."""
    from ehrbridge.core.contracts import Kind
    from ehrbridge.mappings.loader import load_mapping_file
    from ehrbridge.pipelines.features import FeatureRecord
    from ehrbridge.workbench.messages import Input
    from ehrbridge.workbench.testing import replay

    corpus = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "fhir" / "synthea-ckd"
    # The longest history, Stewart Stanton: 8 of its 16 episodes are in KFRE's domain (eGFR
    # < 60); the others are not scored (pipelines/domain.py), and Dirk Kuhlman's none are.
    bundle = max(corpus.glob("*.json"), key=lambda p: p.stat().st_size)
    mapping = load_mapping_file(SITES_DIR / "fhir-synthea" / "mapping.yaml")
    got = replay([Input(Kind.FHIR, bundle.read_bytes(), bundle.name)], mapping)
    records = [r for _, r in got.outcomes if isinstance(r, FeatureRecord)]
    assert len(records) > 1, "a multi-year history gave a single prediction"
    assert [r.anchor for r in records] == sorted(r.anchor for r in records)
    assert len({r.episode for r in records}) == len(records)
