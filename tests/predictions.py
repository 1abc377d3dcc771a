"""Prediction records for write-back tests, built the way the processing stage builds them."""

from __future__ import annotations

from datetime import UTC, datetime

from ehrbridge.config import SiteConfig
from ehrbridge.pipelines.facts import Fact
from ehrbridge.pipelines.features import FeatureRecord
from ehrbridge.pipelines.process import site_prediction
from ehrbridge.pipelines.records import ModelInfo, Prediction

MODEL = ModelInfo("kfre-4var", "1.0.0", "north_american")


def prediction(
    config: SiteConfig,
    patient_id: str = "MRN-1",
    *,
    day: int = 1,
    egfr: float = 28.0,
    uacr: float = 420.0,
    risk_2y: float = 0.2153,
    risk_5y: float = 0.5311,
    model: ModelInfo = MODEL,
    revision: int = 0,
) -> Prediction:
    """One result for ``patient_id`` on 2026-01-<day> (the episode is the day)."""
    at = datetime(2026, 1, day, 8, 30, tzinfo=UTC)
    source = f"MSG-{patient_id}-{day}"
    inputs = (
        Fact("egfr", egfr, "mL/min/{1.73_m2}", at, f"{source}/OBX/1", source, "LN", "33914-3"),
        Fact("uacr", uacr, "mg/g", at, f"{source}/OBX/2", source, "LN", "9318-7"),
    )
    features = FeatureRecord(
        anchor=at,
        values={"age": 64.5, "sex": 1.0, "egfr": egfr, "uacr": uacr},
        inputs=inputs,
        episode=f"day 2026-01-{day:02d}",
        sources={"egfr": inputs[0].ref, "uacr": inputs[1].ref},
    )
    return site_prediction(
        config,
        model,
        patient_id,
        features,
        {"risk_2y": risk_2y, "risk_5y": risk_5y},
        source_id=source,
        state_revision=revision,
    )
