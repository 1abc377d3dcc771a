"""Promotion and demotion: a model goes live (or back to shadow) as a recorded decision.

``ehrbridge promote`` judges the site's promotion criteria
(``evaluation.promotion``, ``evaluation/gates.py``) against the last
``ehrbridge evaluate`` of the model (the copy kept in
``<data_dir>/evaluation/<model>.<source>.json``). On an overall *pass*, or with
an explicit override and its reason, the model goes live; a *fail* or an
*inconclusive* is refused. ``ehrbridge demote`` goes back to shadow and needs
only a reason.

**The decision log** is the audit trail (``ehrbridge/audit.py``): one
hash-chained entry per decision, refused ones too, with who, when, the
criteria and their verdicts, the SHA-256 of the evaluation judged, the report's
path and the override's reason. The trail's chain is what makes it
append-only and tamper-evident (``ehrbridge audit verify``).

**The switch is a file**, ``<data_dir>/mode/<model>.json``, written atomically
(write, fsync, rename) only after the decision's entry is in the trail. Every
process of the site that acts on the mode reads it (:class:`ModeSwitch`: one
``stat`` per batch, re-read when it changed), so no process restarts: the
write-back workers deliver to the EHR from their next batch, the CDS Hooks
service shows cards, ``/health`` says ``live``. A file, not an HTTP call to
each process, because on Kafka a site runs as several processes (one
ingest, N process, M write-back) that the one answering the CLI does not
know; they already share the data dir, where the result store the API reads
is written. It survives a restart: **the mode file, when present, wins over
the site YAML's** ``mode:`` (which is then only the mode of a site never
promoted nor demoted); a start with the two differing says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ehrbridge.audit import AuditEvent, AuditTrail
from ehrbridge.config import Mode, SiteConfig
from ehrbridge.core.contracts import Envelope, Kind, utcnow
from ehrbridge.datadir import secure_data_dir
from ehrbridge.pipelines.results import Delivery, ResultStore
from ehrbridge.pipelines.state import StateStore
from ehrbridge.pipelines.transport import Log, Record, to_record, topic_name
from ehrbridge.stores import audit_dir

log = logging.getLogger(__name__)

PROMOTE, DEMOTE = "promote", "demote"


def mode_path(data_dir: Path, model: str) -> Path:
    return data_dir / "mode" / f"{model}.json"


def read_mode_file(path: Path) -> dict[str, Any] | None:
    """A small JSON document of ours (the mode file, the report's pointer); None if absent."""
    try:
        doc: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        # An unreadable switch must not silently mean "live": keep the YAML's mode.
        log.error("mode file %s unreadable (%s); using the site file's mode", path, error)
        return None
    return doc


def effective_mode(config: SiteConfig, model: str | None = None) -> Mode:
    """The model's mode now: the last decision's, else the site YAML's ``mode:``.

    ``model`` is one of the site's models (default: its first); each has its own file.
    """
    doc = read_mode_file(mode_path(config.data_dir, model or config.model.name))
    return Mode(doc["mode"]) if doc and doc.get("mode") in set(Mode) else config.mode


def for_model(config: SiteConfig, name: str) -> SiteConfig | None:
    """The site's config as seen by its model ``name`` (that model as ``model``); None if
    the site runs no such model. Everything here judges, records and switches
    ``config.model`` with ``config.evaluation`` (that model's own criteria,
    ``evaluation.models.<name>``): each model has its own evaluation and mode file."""
    return config.for_model(name)


class ModeSwitch:
    """The model's current mode, read from its mode file whenever the file changed."""

    def __init__(self, config: SiteConfig, model: str | None = None) -> None:
        self.config = config
        self.model = model or config.model.name
        self.path = mode_path(config.data_dir, self.model)
        self._seen: tuple[int, int] | None = None
        self._mode = config.mode

    def __call__(self) -> Mode:
        try:
            info = self.path.stat()
            stamp = (info.st_mtime_ns, info.st_ino)  # a rename gives a new inode
        except FileNotFoundError:
            stamp = None
        if stamp != self._seen:
            self._seen = stamp
            self._mode = effective_mode(self.config, self.model)
        return self._mode


@dataclass
class Decision:
    """One promotion or demotion, as the trail records it and the CLI prints it."""

    action: str
    model: str
    requested: Mode
    outcome: str  # "live", "shadow", or "refused"
    overall: str | None = None  # the criteria's: pass, fail, inconclusive
    criteria: list[dict[str, str]] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    override: bool = False
    reason: str | None = None
    why_refused: str | None = None
    previous: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: v.value if isinstance(v, Mode) else v for k, v in self.__dict__.items()}


def judge_saved(
    config: SiteConfig, source: str
) -> tuple[str, list[dict[str, str]], dict[str, Any]]:
    """Overall verdict, per-criterion verdicts and the evidence (file, hash, report)."""
    from ehrbridge.evaluation.gates import INCONCLUSIVE, judge, overall
    from ehrbridge.evaluation_api import saved_path

    path = saved_path(config.data_dir, config.model.name, source)
    criteria = config.evaluation.promotion
    if criteria is None:
        return INCONCLUSIVE, [], {"why": "no promotion criteria (evaluation.promotion) set"}
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return INCONCLUSIVE, [], {"why": f"no {source} evaluation: run ehrbridge evaluate first"}
    evaluation = orjson.loads(raw)
    verdicts = judge(criteria.model_dump(), evaluation)
    where = read_mode_file(path.with_suffix(".report.json")) or {}  # evaluate's --out
    evidence = {
        "evaluation": str(path),  # a copy of <out>/evaluation.json, byte for byte
        "sha256": hashlib.sha256(raw).hexdigest(),
        "as_of": evaluation.get("as_of"),
        "report": where.get("report"),
    }
    return overall(verdicts), [v.to_json() for v in verdicts], evidence


@dataclass(frozen=True)
class Caller:
    who: str
    via: str = ""
    roles: tuple[str, ...] = ()
    source: str = ""


def decide(
    config: SiteConfig,
    caller: Caller,
    action: str,
    *,
    reason: str | None = None,
    override: bool = False,
    source: str = "site",
    on_live: Callable[[], dict[str, Any]] | None = None,
) -> Decision:
    """Judge, record in the audit trail, then switch: nothing switches without its entry.

    ``on_live`` runs after a promotion switched (the shadow-period results the
    site chose to write, ``evaluation.promotion.shadow_results``); what it
    returns is recorded in a second entry, chained to the decision's.
    """
    decision = _judged(config, action, reason, override, source)
    trail = AuditTrail(audit_dir(config))
    entry = trail.record(_event(caller, decision))  # AuditUnavailable: nothing switches
    if decision.outcome != "refused":
        _write_mode(config, decision, entry, caller)
        if decision.outcome == Mode.LIVE.value and on_live is not None:
            done = on_live()
            decision.evidence["shadow_results"] = done
            trail.record(_event(caller, decision, action=f"{action} shadow results"))
    return decision


def _judged(
    config: SiteConfig, action: str, reason: str | None, override: bool, source: str
) -> Decision:
    model = config.model.name
    previous = effective_mode(config).value
    if action == DEMOTE:
        outcome = Mode.SHADOW.value if reason else "refused"
        why = None if reason else "a demotion needs a reason"
        return Decision(
            action, model, Mode.SHADOW, outcome, reason=reason, why_refused=why, previous=previous
        )
    overall, criteria, evidence = judge_saved(config, source)
    decision = Decision(
        action,
        model,
        Mode.LIVE,
        Mode.LIVE.value,
        overall,
        criteria,
        evidence,
        override,
        reason,
        previous=previous,
    )
    wb = config.writeback
    if not wb.fhir_base and wb.hl7v2 is None:
        decision.outcome, decision.why_refused = "refused", "no write-back target configured"
    elif override and not reason:
        decision.outcome, decision.why_refused = "refused", "an override needs a reason"
    elif overall != "pass" and not override:
        decision.outcome = "refused"
        decision.why_refused = f"criteria {overall}; --override --reason to go live anyway"
    return decision


def _event(caller: Caller, decision: Decision, action: str | None = None) -> AuditEvent:
    return AuditEvent(
        who=caller.who,
        via=caller.via,
        roles=caller.roles,
        source=caller.source,
        action=f"{action or decision.action} {decision.model}",
        outcome=decision.outcome,
        detail=decision.to_json(),
    )


def _write_mode(
    config: SiteConfig, decision: Decision, entry: dict[str, Any], caller: Caller
) -> None:
    path = mode_path(config.data_dir, decision.model)
    secure_data_dir(path.parent, "data_dir/mode")
    doc = {
        "model": decision.model,
        "mode": decision.outcome,
        "decided_at": datetime.now(UTC).isoformat(),
        "by": caller.who,
        "audit_seq": entry["seq"],
        "audit_hash": entry["hash"],
    }
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)  # atomic: a reader sees the old switch or the new one
    log.warning("model %s is now %s (audit seq %s)", decision.model, decision.outcome, entry["seq"])


def shadow_results_at_promotion(
    config: SiteConfig, log_: Log, results: ResultStore, state: StateStore | None
) -> dict[str, Any]:
    """Put each patient's latest shadow result back on ``predictions``, if the site chose to.

    ``evaluation.promotion.shadow_results``: ``none`` (the default) writes
    nothing from the shadow period; ``latest`` writes, per patient, the newest
    shadow result, and only when it is still the patient's latest result, not
    dated in the future, and the patient's last processing left it inside the
    model's domain (a later record that fell outside, or lacked an input,
    makes the old score stale). The live write-back workers deliver them like
    any other result, with their retries and dead letters.
    """
    from ehrbridge.adapters.evaluation_sources import stored_predictions

    criteria = config.evaluation.promotion
    setting = criteria.shadow_results if criteria is not None else "none"
    if setting == "none":
        return {"setting": "none", "written": 0}
    if state is None:  # a Kafka ingest process: the state lives with the processing role
        return {"setting": setting, "written": 0, "skipped": {"patient state not readable": 1}}
    not_after = utcnow() + config.mapping.values.future_tolerance
    stored = stored_predictions(config.data_dir / "results.sqlite", config.model.name)
    skipped: dict[str, int] = {}
    records = []
    for prediction in _newest_per_patient(stored, not_after).values():
        why = _why_not_written(prediction, results, state, not_after)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        records.append(_record(config, prediction))
    log_.append(records)
    return {"setting": setting, "written": len(records), "skipped": skipped}


def _newest_per_patient(
    stored: list[dict[str, Any]], not_after: datetime
) -> dict[str, dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    for prediction in stored:  # oldest anchor first
        anchor = datetime.fromisoformat(prediction["features"]["anchor"])
        if anchor.tzinfo is None:
            anchor = anchor.replace(tzinfo=UTC)
        if anchor <= not_after:
            newest[prediction["patient_id"]] = prediction
    return newest


def _why_not_written(
    prediction: dict[str, Any], results: ResultStore, state: StateStore, not_after: datetime
) -> str | None:
    patient = prediction["patient_id"]
    latest = results.latest(patient, not_after)
    if latest is None or latest.identifier != prediction["identifier"]:
        return "no longer the latest"
    if latest.status != Delivery.SHADOW:
        return "already live"
    known = state.get(patient)
    outcome = known.last_outcome if known is not None else None
    if not outcome or outcome.get("out_of_domain") or outcome.get("not_enough_data"):
        return "outside the model's domain now"
    return None


def _record(config: SiteConfig, prediction: dict[str, Any]) -> Record:
    envelope = Envelope(
        site=config.site,
        source_id=f"promotion:{prediction['identifier']}",
        payload=orjson.dumps(prediction),
        kind=Kind.PREDICTION,
        key=prediction["patient_id"],
    )
    return to_record(envelope, topic_name(config.site, "predictions"))
