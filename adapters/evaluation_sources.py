"""What ``ehrbridge evaluate`` reads: stored predictions, patient states, outcome exports.

Read-only: the result and state stores are opened with SQLite's ``mode=ro``
URI, so an evaluation running beside a live site can never write to them (and
a missing store is an error, not a new empty file). A FHIR Bulk Data export is
read the way ``$export`` writes it: one resource per line in files named by
resource type (``Patient.ndjson``, ``Condition.2.ndjson``; Bulk Data IG 2.0
"Bulk Data Output File Request"). Patients are read first, so every other
resource's ``subject`` resolves to the identifier predictions carry.
A line that is not a JSON object is counted, not fatal: exports are large and
one bad line must not hide the rest.
"""

from __future__ import annotations

import gzip
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import orjson

from ehrbridge.adapters._sqlite import connect_readonly
from ehrbridge.core.errors import ConfigError


def _open_ro(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise ConfigError(f"{path}: no such store (has this site run, or is data_dir right?)")
    return connect_readonly(path)


def stored_predictions(results: Path, model: str) -> list[dict[str, Any]]:
    """Every stored prediction of ``model`` (the JSON the pipeline wrote), oldest first."""
    conn = _open_ro(results)
    try:
        rows = conn.execute(
            "SELECT prediction FROM results WHERE model LIKE ? ORDER BY anchor, identifier",
            (f"{model} %",),
        ).fetchall()
    finally:
        conn.close()
    return [orjson.loads(row[0]) for row in rows]


def last_outcomes(state: Path) -> dict[str, dict[str, Any] | None]:
    """Each patient's last processing outcome (``PatientState.last_outcome``)."""
    if not state.exists():
        return {}
    conn = _open_ro(state)
    try:
        rows = conn.execute("SELECT patient_id, doc FROM patient_state").fetchall()
    finally:
        conn.close()
    return {pid: orjson.loads(doc).get("last_outcome") for pid, doc in rows}


@dataclass
class BulkExport:
    """A directory of NDJSON files; iterate for ``(patient key, resource)`` pairs."""

    directory: Path
    patient_system: str | None = None  # the identifier system predictions use
    bad_lines: int = 0
    unlinked: int = 0  # resources whose subject is no exported Patient
    keys: dict[str, str] = field(default_factory=dict)  # Patient.id -> patient key

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            raise ConfigError(f"{self.directory}: not a directory of NDJSON files")
        found = [*self.directory.glob("*.ndjson"), *self.directory.glob("*.ndjson.gz")]
        return sorted(found, key=lambda p: (not p.name.startswith("Patient"), p.name))

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        from ehrbridge.evaluation.outcomes import patient_key, subject_id

        for path in self.files():
            for resource in self.resources(path):
                if resource.get("resourceType") == "Patient":
                    key = patient_key(resource, self.patient_system)
                    if key and resource.get("id"):
                        self.keys[str(resource["id"])] = key
                        yield key, resource
                    continue
                subject = subject_id(resource)
                if subject is None or subject not in self.keys:
                    self.unlinked += 1
                    continue
                yield self.keys[subject], resource

    def resources(self, path: Path) -> Iterator[dict[str, Any]]:
        with _open_text(path) as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    value = orjson.loads(line)
                except orjson.JSONDecodeError:
                    value = None
                if isinstance(value, dict):
                    yield value
                else:
                    self.bad_lines += 1


def _open_text(path: Path) -> BinaryIO:
    # gzip's and io's readers are both binary files; typeshed names them apart.
    return cast(BinaryIO, gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb"))


def patient_bundles(directory: Path) -> tuple[list[tuple[str, bytes]], int]:
    """A Bulk export regrouped as one collection Bundle per patient: Patient + Observations.

    What the mapping reads of a FHIR patient (``pipelines/fhir_facts.py``); the
    pipeline then replays each Bundle's history one episode at a time, in time
    order. Bundles are ordered by their patient's first result, then id, so a
    replay is the same every time. Returns the Bundles (id, JSON) and the
    number of unreadable lines.
    """
    export = BulkExport(directory)
    patients: dict[str, dict[str, Any]] = {}
    observations: dict[str, list[dict[str, Any]]] = {}
    for path in export.files():
        for resource in export.resources(path):
            kind = resource.get("resourceType")
            if kind == "Patient" and resource.get("id"):
                patients[str(resource["id"])] = resource
            elif kind == "Observation":
                from ehrbridge.evaluation.outcomes import subject_id

                if subject := subject_id(resource):
                    observations.setdefault(subject, []).append(resource)
    bundles = [
        (pid, _first_time(observations.get(pid, [])), _bundle(patient, observations.get(pid, [])))
        for pid, patient in patients.items()
    ]
    bundles.sort(key=lambda b: (b[1], b[0]))
    return [(pid, payload) for pid, _, payload in bundles], export.bad_lines


def _first_time(observations: list[dict[str, Any]]) -> str:
    times = [str(o.get("effectiveDateTime") or o.get("issued") or "") for o in observations]
    return min((t for t in times if t), default="9999")


def _bundle(patient: dict[str, Any], observations: list[dict[str, Any]]) -> bytes:
    entries = [{"fullUrl": f"Patient/{patient['id']}", "resource": patient}]
    entries += [{"resource": o} for o in observations]
    return orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries})


def logged_records(log: Path, topic: str, after: int, limit: int) -> list[Any]:
    """Records of ``topic`` in the embedded log after offset ``after``, read-only, in order.

    For ``evaluate``'s live feed: it reads what the site received without
    joining a consumer group, so it never holds back the log's retention.
    """
    from ehrbridge.adapters.sqlite_log import _record

    conn = _open_ro(log)
    try:
        rows = conn.execute(
            "SELECT offset, key, value, headers, ts FROM records "
            "WHERE topic = ? AND offset > ? ORDER BY offset LIMIT ?",
            (topic, after, limit),
        ).fetchall()
    finally:
        conn.close()
    return [_record(topic, row) for row in rows]
