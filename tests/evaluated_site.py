"""A sandbox site in shadow whose model has a real ``ehrbridge evaluate`` behind it.

For the console's models page (tests/facade/test_console_models.py and the browser
test): 1,500 patients whose outcomes are drawn from their stored risks
(tests/evaluation/test_evaluate_cli.py), evaluated by the CLI with outcomes linked, so
the page has calibration, ROC and criteria that pass. The evaluation's files
are copied into the sandbox's data dir before it starts, where ``ehrbridge evaluate`` keeps
them for the console and for ``POST /api/models/{model}/mode``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from test_evaluate_cli import (
    AS_OF,
    add_special_cases,
    make_cohort,
    site_file,
    store_predictions,
    write_export,
)

from ehrbridge.cli import main
from ehrbridge.config import Mode, PromotionCriteria, SiteConfig
from ehrbridge.datadir import secure_data_dir

MODEL = "kfre-4var"
CRITERIA = PromotionCriteria(
    min_days=30, min_scored_patients=1000, min_auroc_lower_ci=0.6, calibration_slope=(0.7, 1.3)
)


def evaluate_cohort(tmp: Path) -> Path:
    """Run ``ehrbridge evaluate`` on a calibrated cohort; the folder it kept for the console."""
    data = tmp / "data"
    data.mkdir(mode=0o700)
    cohort = make_cohort(1500, seed=5)
    add_special_cases(cohort)
    store_predictions(data, cohort)
    write_export(tmp / "export", cohort)
    args = ["--model", MODEL, "--out", str(tmp / "report"), "--events", str(tmp / "export")]
    code = main(["evaluate", "--site", str(site_file(tmp)), *args, "--as-of", AS_OF.isoformat()])
    assert code == 0
    return data / "evaluation"


def keep_evaluation(kept: Path, data_dir: Path) -> None:
    """Put the evaluation ``kept`` where a site with ``data_dir`` looks for it."""
    target = data_dir / "evaluation"
    secure_data_dir(target, "data_dir/evaluation")
    for path in kept.iterdir():
        shutil.copy(path, target / path.name)


def in_shadow_with_criteria(config: SiteConfig) -> SiteConfig:
    """The sandbox site (live) in shadow, with promotion criteria the evaluation passes."""
    evaluation = config.evaluation.model_copy(update={"promotion": CRITERIA})
    return config.model_copy(update={"mode": Mode.SHADOW, "evaluation": evaluation})
