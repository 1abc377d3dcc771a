"""Validation of the evaluation metrics on cohorts whose truth is known by construction.

Outcomes are drawn from known probabilities, so a correct implementation must
find the model calibrated (slope ~1, intercept ~0, within their 95 % CIs); the
same cohort with risks doubled must be flagged. AUROC and Brier must equal
scikit-learn's on the same arrays; the DeLong interval must match a bootstrap.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from ehrbridge.evaluation import metrics
from ehrbridge.evaluation.metrics import Row


def cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Risks spread over 0.5 %..60 % (logit-normal); outcomes drawn from exactly those risks."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(-2.2, 1.1, n)))
    y = (rng.random(n) < p).astype(float)
    return y, p


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_calibrated_cohort_has_slope_one_and_intercept_zero_within_ci(seed: int) -> None:
    y, p = cohort(6000, seed)
    cal = metrics.calibration(y, p)
    assert cal.slope.low is not None and cal.slope.low <= 1.0 <= cal.slope.high
    assert cal.in_the_large.low is not None and cal.in_the_large.low <= 0.0 <= cal.in_the_large.high
    assert abs(cal.slope.value - 1) < 0.12 and abs(cal.in_the_large.value) < 0.12
    assert cal.observed_expected.low <= 1.0 <= cal.observed_expected.high
    assert cal.ece is not None and cal.ece < 0.02


def test_doubled_risks_are_flagged_as_over_prediction() -> None:
    y, p = cohort(6000, 4)
    cal = metrics.calibration(y, np.minimum(2 * p, 0.999))
    assert cal.in_the_large.excludes(0.0) and cal.in_the_large.value < -0.4  # over-predicts
    assert cal.observed_expected.high < 0.8
    assert cal.ece > metrics.calibration(y, p).ece + 0.03


def test_auroc_and_brier_equal_sklearn_on_the_same_arrays() -> None:
    y, p = cohort(3000, 5)
    got = metrics.auroc(y, p)
    assert got.value == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert metrics.calibration(y, p).brier == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert got.low < got.value < got.high


def test_delong_interval_agrees_with_a_bootstrap() -> None:
    y, p = cohort(1500, 6)
    rng = np.random.default_rng(7)
    boots = []
    for _ in range(400):
        i = rng.integers(0, len(y), len(y))
        boots.append(roc_auc_score(y[i], p[i]))
    assert metrics.delong_se(y, p) == pytest.approx(np.std(boots, ddof=1), rel=0.15)


def _delong_by_definition(y: np.ndarray, p: np.ndarray) -> float:
    """DeLong et al. 1988 straight from the definition: the O(m*n) kernel, ties count 1/2."""
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(np.sqrt(np.var(v10, ddof=1) / len(pos) + np.var(v01, ddof=1) / len(neg)))


def test_delong_with_ties_matches_the_definition() -> None:
    # Hanley & McNeil 1982 rating data: a 5-point scale, so nearly every score is tied.
    normal = [1] * 33 + [2] * 6 + [3] * 6 + [4] * 11 + [5] * 2
    abnormal = [1] * 3 + [2] * 2 + [3] * 2 + [4] * 11 + [5] * 33
    p = np.array(normal + abnormal, dtype=float)
    y = np.array([0] * len(normal) + [1] * len(abnormal), dtype=float)
    assert metrics.auroc(y, p).value == pytest.approx(0.8932, abs=1e-4)  # as published
    assert metrics.delong_se(y, p) == pytest.approx(_delong_by_definition(y, p), abs=1e-12)
    y2, p2 = cohort(800, 8)
    assert metrics.delong_se(y2, p2) == pytest.approx(_delong_by_definition(y2, p2), abs=1e-12)


def test_too_few_events_gives_no_number_and_says_why() -> None:
    y = np.array([0.0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert metrics.auroc(y, p).value is None
    assert "2 events" in metrics.auroc(y, p).reason
    assert metrics.calibration_slope(y, p).value is None


def test_threshold_metrics_hand_computed() -> None:
    d0 = date(2026, 1, 1)
    rows = [
        Row("a", d0, 0.50, 1),  # TP
        Row("b", d0, 0.30, 0),  # FP
        Row("c", d0 + timedelta(days=1), 0.05, 1),  # FN
        Row("d", d0 + timedelta(days=3), 0.01, 0),  # TN
        Row("e", d0 + timedelta(days=3), 0.40, None),  # flagged, outcome pending
    ]
    t = metrics.at_threshold(rows, 0.2)
    assert t.flagged == 3 and t.flags_per_day == pytest.approx(3 / 4)
    assert t.flagged_patients_per_1000 == pytest.approx(600)
    assert t.ppv.value == pytest.approx(0.5) and t.sensitivity.value == pytest.approx(0.5)
    assert t.specificity.value == pytest.approx(0.5) and t.nne == pytest.approx(2)
    assert metrics.flags_by_day(rows, 0.2) == {
        "2026-01-01": 2,
        "2026-01-02": 0,
        "2026-01-04": 1,
    }


def _group_rows(group: str, n: int, flagged: int, attribute: str = "sex") -> list[Row]:
    return [
        Row(
            f"{group}{i}",
            date(2026, 1, 1),
            0.5 if i < flagged else 0.01,
            int(i < flagged),
            {attribute: group},
        )
        for i in range(n)
    ]


def test_subgroup_audit_ratios_flags_and_hiding() -> None:
    rows = _group_rows("F", 40, 10) + _group_rows("M", 20, 2) + _group_rows("O", 9, 3)
    audit = {g.group: g for g in metrics.subgroup_audit(rows, "sex", 0.2)}
    assert audit["F"].reference  # the largest group
    assert audit["M"].ratios["flag_rate"] == pytest.approx((2 / 20) / (10 / 40))
    assert "flag_rate" in audit["M"].flagged  # 0.4, outside [0.8, 1.25]
    assert "sensitivity" not in audit["M"].flagged  # 1.0 / 1.0
    hidden = audit["O"].to_json()
    assert hidden["hidden"] and hidden["metrics"] == {} and hidden["patients"] == "<10"


def test_subgroup_reference_can_be_declared() -> None:
    rows = _group_rows("F", 40, 10) + _group_rows("M", 20, 5)
    audit = {g.group: g for g in metrics.subgroup_audit(rows, "sex", 0.2, reference="M")}
    assert audit["M"].reference and audit["F"].ratios["flag_rate"] == pytest.approx(1.0)


def test_age_bands_and_coverage() -> None:
    assert [metrics.age_band(a) for a in (17, 18, 44.9, 45, 64, 65, 74, 75, None)] == [
        "<18",
        "18-44",
        "18-44",
        "45-64",
        "45-64",
        "65-74",
        "65-74",
        "75+",
        "unknown",
    ]
    cov = metrics.coverage({"a": None, "b": "egfr >= 60", "c": "egfr >= 60", "d": "missing uacr"})
    assert cov["share_scored"] == pytest.approx(0.25)
    assert cov["not_scored_by_reason"] == {"egfr >= 60": 2, "missing uacr": 1}
