"""Which site patient id a FHIR ``Patient.id`` stands for.

ehrbridge keys everything by the site's patient identifier (the MRN,
``mapping.patient``). A CDS Hooks request names the patient by the EHR's
FHIR logical id (``context.patientId``). When FHIR input brings a Patient
with both -- its ``id`` and the site's identifier -- the pair is kept here,
so the hook can find the patient without a prefetch or a FHIR read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ehrbridge.adapters._sqlite import DB_ERRORS, PerThreadConnection, transaction
from ehrbridge.core.errors import UpstreamUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patient_links (
    fhir_id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL
);
"""


class PatientLinks:
    def __init__(self, path: Path | str) -> None:
        self._connections = PerThreadConnection(Path(path))
        self._connections.get().executescript(_SCHEMA)

    def add(self, links: Iterable[tuple[str, str]]) -> None:
        rows = list(links)
        if not rows:
            return
        try:
            with transaction(self._connections.get()) as conn:
                conn.executemany("INSERT OR REPLACE INTO patient_links VALUES (?, ?)", rows)
        except DB_ERRORS as exc:
            raise UpstreamUnavailable(f"patient links: {exc}") from exc

    def patient_for(self, fhir_id: str) -> str | None:
        row = (
            self._connections.get()
            .execute("SELECT patient_id FROM patient_links WHERE fhir_id = ?", (fhir_id,))
            .fetchone()
        )
        return str(row[0]) if row else None

    def close(self) -> None:
        self._connections.close()
