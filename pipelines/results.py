"""The local result store: every prediction, in shadow and in live mode.

In shadow mode this is where results are "stored and viewable locally"
(``GET /api/results``); in live mode it also records whether and when each
Observation reached the EHR. It is keyed by the prediction identifier, so a
replay updates a row instead of adding one, exactly as the EHR does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from ehrbridge.pipelines.observation import percent
from ehrbridge.pipelines.records import Prediction


class Delivery(StrEnum):
    SHADOW = "shadow"  # kept locally only (shadow mode)
    PENDING = "pending"  # live: built, not yet confirmed by the EHR
    DELIVERED = "delivered"  # live: the EHR accepted it


@dataclass(frozen=True, slots=True)
class StoredResult:
    identifier: str
    patient_id: str
    anchor: str
    outputs: dict[str, float]  # by the model file's output names, fractions
    model: str
    status: str
    observation: dict[str, Any]
    state_revision: int = 0  # of the patient state the prediction was computed from

    @property
    def model_name(self) -> str:
        return self.model.split(" ", 1)[0]

    def summary(self) -> dict[str, Any]:
        # Each output in percent (``<name>_percent``), as the Observation's valueQuantity
        # and the CDS card state it, and as the model's fraction, for existing readers.
        shown: dict[str, Any] = {f"{k}_percent": percent(v) for k, v in self.outputs.items()}
        return {
            "identifier": self.identifier,
            "patient_id": self.patient_id,
            "anchor": self.anchor,
            **shown,
            **self.outputs,
            "outputs": self.outputs,
            "model": self.model,
            "status": self.status,
        }


class ResultStore(Protocol):
    """What the write-back stage and the API need from the result store
    (``adapters/sqlite_results.py`` keeps it in SQLite)."""

    def upsert(
        self, items: Sequence[tuple[Prediction, dict[str, Any]]], status: Delivery
    ) -> None: ...
    def mark_delivered(self, identifiers: Sequence[str]) -> None: ...
    def get(self, identifier: str) -> StoredResult | None: ...
    def get_many(self, identifiers: Sequence[str]) -> dict[str, StoredResult]:
        """Those of ``identifiers`` stored, by identifier (one read for a batch)."""
        ...

    def latest(
        self, patient_id: str, not_after: datetime | None = None, *, model: str | None = None
    ) -> StoredResult | None: ...
    def list(
        self,
        *,
        patient_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
        model: str | None = None,
    ) -> list[StoredResult]: ...
    def count(
        self,
        status: Delivery | None = None,
        *,
        patient_id: str | None = None,
        model: str | None = None,
    ) -> int: ...
