"""``ehrbridge evaluate``: how well a model works at this site, as a report and a JSON.

    ehrbridge evaluate --site site.yaml [--model kfre-4var] --out report/ [--events DIR]
                       [--source backfill]

Reads the site's stored predictions (shadow and live alike; the result store
in ``data_dir``), links each to the outcome found in a FHIR Bulk Data export
of the site's history (``--events`` or ``evaluation.events``), and writes
``evaluation.json`` (every number), ``report.html`` (offline, figures inline)
and ``links.json`` (each prediction's linkage, by prediction identifier; no
patient identifiers). Without outcomes the report still shows the label-free
view: score distribution, flag burden and coverage.

A site running several models (``models:``) has each evaluated on its own: its
predictions, its outcome file (``evaluation.models.<name>.outcome``, else the
one shipped for it), its linkage store, its promotion criteria and its report.
``--model NAME`` evaluates that one into ``--out``; without it, every model of
the site is evaluated, each into ``--out/<model>/``, so none is left unjudged
(a second model never evaluated could only go live by override).

Needs the ``evaluate`` extra: ``pip install 'ehrbridge[evaluate]'``.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.core.located_yaml import load_located, validate_located


def add_evaluate_command(sub: Any) -> None:
    cmd = sub.add_parser(
        "evaluate",
        help="a model's discrimination, calibration, burden and fairness at this site",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--site", type=Path, required=True, help="the site YAML file")
    cmd.add_argument(
        "--model",
        help="the model to evaluate, e.g. kfre-4var (default: every model of the site, "
        "each in OUT/<model>/)",
    )
    cmd.add_argument("--out", type=Path, required=True, help="directory for the report(s)")
    cmd.add_argument(
        "--events",
        type=Path,
        help="outcomes: a FHIR Bulk Data export (NDJSON directory) or an HL7v2 batch file",
    )
    cmd.add_argument(
        "--source",
        choices=["site", "backfill"],
        default="site",
        help="the site's own predictions (shadow and live), or those `ehrbridge backfill` "
        "made from history (default: site)",
    )
    cmd.add_argument(
        "--as-of", type=_aware, help="evaluate as of this time (ISO 8601; default: now)"
    )
    cmd.set_defaults(func=run_evaluate)


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def run_evaluate(args: argparse.Namespace) -> int:
    _needs_extra()
    from ehrbridge.stores import unlock_stores

    site = load_site_config(args.site)
    chosen = evaluated_models(site, args.model, args.site)
    for config in chosen:  # a bad outcome file stops the run before any report is written
        _outcome_of_each(config, args.model)
    unlock_stores(site)
    as_of = args.as_of or datetime.now(UTC)
    for config in chosen:
        out: Path = args.out if args.model else args.out / config.model.name
        if len(chosen) > 1:
            print(f"model {config.model.name}:")
        _evaluate_one(config, args, as_of, out)
    return 0


def _outcome_of_each(config: SiteConfig, chosen: str | None) -> None:
    try:
        load_outcome(config)
    except ConfigError as error:
        if chosen is not None:
            raise
        raise ConfigError(
            f"{error}; nothing was evaluated (--model NAME evaluates the site's others alone)"
        ) from None


def evaluated_models(site: SiteConfig, model: str | None, path: Path) -> list[SiteConfig]:
    """The site as each evaluated model sees it (``SiteConfig.for_model``): ``model``
    only, or every model of the site."""
    if model is None:
        return [c for m in site.site_models if (c := site.for_model(m.name)) is not None]
    config = site.for_model(model)
    if config is None:
        names = ", ".join(m.name for m in site.site_models)
        raise ConfigError(f"{path}: this site runs {names}, not {model!r}")
    return [config]


def _evaluate_one(config: SiteConfig, args: argparse.Namespace, as_of: datetime, out: Path) -> None:
    from ehrbridge.evaluation.html import render

    stores = config.data_dir / "evaluation" if args.source == "backfill" else config.data_dir
    evaluation, links = build(config, args.events, as_of, stores)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)  # it describes patients: private
    document = orjson.dumps(evaluation, option=orjson.OPT_INDENT_2)
    _write(out / "evaluation.json", document)
    _write(out / "links.json", orjson.dumps(links, option=orjson.OPT_INDENT_2))
    _write(out / "report.html", render(evaluation).encode())
    _keep_for_the_console(config, args.source, document, out)
    _print_summary(evaluation, out)


def _keep_for_the_console(config: SiteConfig, source: str, document: bytes, out: Path) -> None:
    """A copy in the data dir, served at /api/evaluation/<model> (ehrbridge/evaluation_api.py).

    Byte for byte the ``evaluation.json`` written to ``--out``, so the SHA-256 a
    promotion decision records (ehrbridge/promotion.py) is that file's; beside it
    the report's path, which the decision records too.
    """
    from ehrbridge.datadir import secure_data_dir
    from ehrbridge.evaluation_api import saved_path

    path = saved_path(config.data_dir, config.model.name, source)
    secure_data_dir(path.parent, "data_dir/evaluation")
    _write(path, document)
    report = {"report": str((out / "report.html").resolve()), "out": str(out.resolve())}
    _write(path.with_suffix(".report.json"), orjson.dumps(report))


def _needs_extra() -> None:
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import statsmodels  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"ehrbridge evaluate needs the evaluate extra ({error.name} is missing): "
            "pip install 'ehrbridge[evaluate]'"
        ) from None


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def build(
    config: SiteConfig, events_dir: Path | None, as_of: datetime, stores: Path | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The evaluation JSON and the links, from the site's stores and an outcome export."""
    from ehrbridge.adapters.evaluation_sources import last_outcomes, stored_predictions
    from ehrbridge.evaluation.report import EvaluationInput, evaluate, link_summary

    settings = config.evaluation
    spec = load_outcome(config)
    attributes = _declared_attributes(settings.attributes)
    stores = stores or config.data_dir
    stored = stored_predictions(stores / "results.sqlite", config.model.name)
    predictions = [_ref(p, attributes) for p in stored]
    book = _link(config, spec, predictions, events_dir, as_of=as_of, stores=stores)
    scored = {p.patient_id for p in predictions}
    states = last_outcomes(stores / "state.sqlite")
    inp = EvaluationInput(
        site=config.site,
        spec=spec,
        predictions=predictions,
        book=book,
        bands=_bands(config, spec.horizons),
        as_of=as_of,
        coverage={
            pid: None if pid in scored else _unscored(_own_outcome(o, config))
            for pid, o in states.items()
        },
        subgroups=[
            *settings.subgroups,
            *(a for a in _attribute_names(attributes) if a not in settings.subgroups),
        ],
        references=settings.reference_groups,
        unit=settings.unit,
    )
    evaluation = evaluate(inp)
    evaluation["drift"] = psi_by_month(stored, config.model.declared.shown.score_output)
    # Links the evaluation store kept from the last evaluation rather than recomputed.
    evaluation["relinked"] = {"relinked": book.relinked, "kept": len(book.links) - book.relinked}
    if settings.promotion is not None:
        from ehrbridge.evaluation.gates import judge, overall

        verdicts = judge(settings.promotion.model_dump(), evaluation)
        evaluation["promotion"] = {
            "overall": overall(verdicts),
            "criteria": [v.to_json() for v in verdicts],
        }
    return evaluation, link_summary(book.links)


def link_store_path(config: SiteConfig, stores: Path) -> Path:
    """The model's evaluation store, ``links.<model>.sqlite``, beside the evaluated stores
    (the backfill's or the site's).

    One per model: its events are those its outcome recognises, and a store is
    reset when the outcome it was fed for changes, so two models sharing one
    would wipe each other's (and the live log's offset) at every evaluation.
    """
    where = stores if stores != config.data_dir else config.data_dir / "evaluation"
    path = where / f"links.{config.model.name}.sqlite"
    _adopt_one_model_store(where / "links.sqlite", path, config)
    return path


def _adopt_one_model_store(old: Path, path: Path, config: SiteConfig) -> None:
    """A store kept before stores were per model is the first model's: renamed, not lost
    (it holds the live events read so far, which the log's retention may have purged)."""
    if path.exists() or not old.exists() or not _is_first_model(config):
        return
    for suffix in ("", "-wal", "-shm"):  # SQLite's journal files go with their database
        if Path(f"{old}{suffix}").exists():
            os.replace(f"{old}{suffix}", f"{path}{suffix}")


def _link(
    config: SiteConfig,
    spec: Any,
    predictions: list[Any],
    events_dir: Path | None,
    *,
    as_of: datetime,
    stores: Path,
) -> Any:
    """Links for ``predictions``: the stored ones kept where nothing could change them.

    The evaluation store (adapters/sqlite_evaluation.py) keeps every event fed so
    far and the last evaluation's links; this one feeds the export's new events,
    then re-links the patients who had one or whose stored events fell due since
    the last as-of time, the pending links and the new predictions.
    """
    from ehrbridge.adapters.sqlite_evaluation import SqliteLinkStore
    from ehrbridge.datadir import secure_data_dir

    path = link_store_path(config, stores)
    secure_data_dir(path.parent, "data_dir/evaluation")
    store = SqliteLinkStore(path)
    try:
        store.reset_unless(spec.model_dump_json())
        changed = _feed_events(store, spec, events_dir or config.evaluation.events, config)
        if stores == config.data_dir:  # the site's own predictions: its live traffic too
            changed |= feed_live(store, spec, config)
        return relink(store, spec, predictions, changed, as_of=as_of)
    finally:
        store.close()


LIVE_BATCH = 2000


def feed_live(store: Any, spec: Any, config: SiteConfig) -> set[str]:
    """Outcome events from what the site received live, since the last evaluation read it.

    The embedded log's ``raw`` topic holds every message ingest accepted (HL7v2
    ADT/DFT/ORU: DG1, PR1, PID-29, OBX; FHIR resources and Bundles: Condition,
    Procedure, Encounter, Observation, Patient.deceased), keyed by patient.
    Read in order from the offset kept in the evaluation store; a record the
    retention purged before an evaluation read it is not seen, so evaluate at
    least as often as ``retention`` keeps the log. A Kafka site's log is not
    read here (its topics are the brokers'); give ``--events`` instead.
    """
    from ehrbridge.adapters.evaluation_sources import logged_records
    from ehrbridge.evaluation.outcomes import Recogniser
    from ehrbridge.hl7_outcomes import Hl7OutcomeReader
    from ehrbridge.pipelines.facts import FactRules
    from ehrbridge.pipelines.transport import from_record, topic_name

    log = config.data_dir / "log.sqlite"
    if config.transport.kind != "embedded" or not log.exists():
        return set()
    recogniser = Recogniser.of(spec)
    reader = Hl7OutcomeReader(recogniser, FactRules(config.mapping))
    topic, after = topic_name(config.site, "raw"), int(store.meta("live_offset") or -1)
    changed: set[str] = set()
    while records := logged_records(log, topic, after, LIVE_BATCH):
        envelopes = [from_record(r) for r in records]
        changed |= store.add(e for env in envelopes for e in _live_events(env, reader))
        after = records[-1].offset
        store.set_meta("live_offset", str(after))  # after the events: a crash re-reads, idempotent
    return changed


def _live_events(envelope: Any, reader: Any) -> list[Any]:
    from ehrbridge.core.contracts import Kind

    if envelope.kind is Kind.HL7V2:
        return list(reader.events([envelope.payload]))
    if envelope.kind is not Kind.FHIR:
        return []
    try:
        document = orjson.loads(envelope.payload)
    except orjson.JSONDecodeError:
        return []
    entries = document.get("entry") if isinstance(document, dict) else None
    resources = [e.get("resource") for e in entries or [] if isinstance(e, dict)]
    resources = resources if entries is not None else [document]
    # The record's key is the patient ingest resolved (its identifier): every resource
    # of the record is that patient's.
    return [
        event
        for resource in resources
        if isinstance(resource, dict)
        for event in reader.recogniser.events(resource, envelope.key)
    ]


def relink(
    store: Any, spec: Any, predictions: list[Any], changed: set[str], as_of: datetime
) -> Any:
    """The stored links brought to ``as_of``: only those an event could change are redone.

    ``changed``: the patients the feed brought new events for. Then saved back.
    """
    from ehrbridge.evaluation.linkage import LinkBook, Linker

    linker = Linker(spec)
    linker.add(store.events())
    book, previous = LinkBook(), store.last_as_of()
    if previous is not None and previous <= as_of:  # else (an earlier as-of): link all afresh
        current = {p.identifier for p in predictions}
        book.links = {k: v for k, v in store.links().items() if k[0] in current}
        changed = changed | store.falling_due(previous, as_of)
    book.refresh(linker, predictions, changed, as_of)
    store.save_links(book.links, as_of)
    return book


def psi_by_month(stored: list[dict[str, Any]], score: str, min_count: int = 30) -> dict[str, Any]:
    """PSI of each input and of the ``score`` output per month against the first month.

    The monitoring's bins and thresholds (``pipelines/drift.py``: KDIGO and KFRE
    cut points; 0.1 worth a look, 0.2 drift), so the report and the console
    agree. A month with fewer than ``min_count`` predictions gets no PSI.
    """
    from collections import defaultdict

    from ehrbridge.pipelines.drift import BINS, PSI_ALARM, PSI_WARN, SCORE, bin_index, psi
    from ehrbridge.pipelines.features import FeatureRecord
    from ehrbridge.pipelines.records import outputs_of

    counts: dict[str, dict[str, list[int]]] = defaultdict(
        lambda: {name: [0] * (len(edges) + 1) for name, edges in BINS.items()}
    )
    for p in stored:
        features = FeatureRecord.from_json(p["features"])
        values = {**features.values, SCORE: outputs_of(p)[score]}
        binned = counts[features.anchor.isoformat()[:7]]
        for name, edges in BINS.items():
            if isinstance(values.get(name), int | float):
                binned[name][bin_index(edges, float(values[name]))] += 1
    months = sorted(counts)
    series: dict[str, dict[str, float | None]] = {name: {} for name in BINS}
    if months and sum(counts[months[0]][SCORE]) >= min_count:
        reference = counts[months[0]]
        for month in months:
            for name in BINS:
                enough = sum(counts[month][name]) >= min_count
                series[name][month] = psi(reference[name], counts[month][name]) if enough else None
    return {
        "reference_month": months[0] if months else None,
        "warn": PSI_WARN,
        "alarm": PSI_ALARM,
        "min_count": min_count,
        "psi": series,
    }


def _is_first_model(config: SiteConfig) -> bool:
    """Whether ``config`` (as ``SiteConfig.for_model`` gives it) is its site's first model,
    the one a site without ``models:`` runs. Not ``site_models[0]``: that is ``model``."""
    return not config.models or config.models[0].name == config.model.name


def load_outcome(config: SiteConfig) -> Any:
    from ehrbridge.evaluation.outcomes import OutcomeSpec, builtin_outcome, read_code_map

    name = config.model.name
    path = config.evaluation.outcome or builtin_outcome(name)
    where = "evaluation.outcome" if _is_first_model(config) else ""
    where = where or f"evaluation.models.{name}.outcome"
    if not path.exists():
        raise ConfigError(f"no outcome declared for model {name!r}: set {where} in the site file")
    spec = validate_located(OutcomeSpec, load_located(path))
    if spec.model != name:
        raise ConfigError(
            f"{path}: outcome is for model {spec.model!r}, not {name!r}: set {where} "
            "in the site file"
        )
    if config.evaluation.code_map:
        try:
            extra = read_code_map(config.evaluation.code_map.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{config.evaluation.code_map}: {error}") from None
        spec = spec.with_codes(extra)
    return spec


def _feed_events(linker: Any, spec: Any, events_dir: Path | None, config: SiteConfig) -> set[str]:
    """Recognised events into ``linker`` (anything with ``add(events) -> changed patients``)."""
    from ehrbridge.adapters.evaluation_sources import BulkExport
    from ehrbridge.evaluation.outcomes import Recogniser

    if events_dir is None:
        return set()
    recogniser = Recogniser.of(spec)
    if events_dir.is_file():  # an HL7v2 batch (ADT/DFT/ORU): DG1, PR1, PID-29, OBX
        return _feed_hl7(linker, recogniser, events_dir, config)
    export = BulkExport(events_dir, config.mapping.patient.fhir_system)
    changed: set[str] = linker.add(e for key, res in export for e in recogniser.events(res, key))
    return changed


def _feed_hl7(linker: Any, recogniser: Any, path: Path, config: SiteConfig) -> set[str]:
    from ehrbridge.hl7_outcomes import Hl7OutcomeReader
    from ehrbridge.pipelines.facts import FactRules
    from ehrbridge.workbench.messages import split_hl7

    reader = Hl7OutcomeReader(recogniser, FactRules(config.mapping))
    try:
        messages = split_hl7(path.read_bytes())
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    changed: set[str] = linker.add(reader.events(messages))
    if reader.unreadable:
        print(f"{path}: {reader.unreadable} messages could not be read and were skipped")
    return changed


def _ref(p: Mapping[str, Any], attributes: Mapping[str, Mapping[str, str]]) -> Any:
    from ehrbridge.evaluation.linkage import PredictionRef
    from ehrbridge.evaluation.metrics import age_band
    from ehrbridge.pipelines.features import FeatureRecord
    from ehrbridge.pipelines.records import outputs_of

    features = FeatureRecord.from_json(dict(p["features"]))
    sex = features.values.get("sex")
    own = {
        "sex": "unknown" if sex is None else ("male" if sex else "female"),
        "age_band": age_band(features.values.get("age")),
    }
    return PredictionRef(
        identifier=p["identifier"],
        patient_id=p["patient_id"],
        anchor=_aware(features.anchor.isoformat()),
        risks=outputs_of(dict(p)),
        attributes={**own, **attributes.get(p["patient_id"], {})},
    )


def _bands(config: SiteConfig, horizons: Mapping[str, Any]) -> list[Any]:
    """The site's interpretation bands, each on the outcome horizon its output is read for."""
    from ehrbridge.evaluation.report import Band
    from ehrbridge.pipelines.rendering import shown

    horizon_of = {h.risk: key for key, h in horizons.items()}
    return [
        Band(horizon_of.get(b.output, b.output), b.at_least, b.code) for b in shown(config).bands
    ]


def _own_outcome(outcome: Mapping[str, Any] | None, config: SiteConfig) -> Any:
    """The patient's last processing outcome for the evaluated model: with several models
    the state keeps each one's under ``models`` (pipelines/features.py), the first's on top."""
    if outcome and isinstance(outcome.get("models"), dict):
        return outcome["models"].get(config.model.name)
    return outcome if _is_first_model(config) else None  # a state from before it ran


def _unscored(outcome: Mapping[str, Any] | None) -> str:
    """Why a patient has no score, from the last processing outcome kept on its state."""
    if not outcome:
        return "no prediction triggered"
    if reasons := outcome.get("out_of_domain"):
        return "outside the model's domain: " + "; ".join(sorted(reasons))
    if missing := outcome.get("not_enough_data"):
        return "missing input: " + ", ".join(sorted(missing))
    return "scored, result not stored"


def _declared_attributes(path: Path | None) -> dict[str, dict[str, str]]:
    """Site-declared audit attributes: CSV with a patient_id column and one per attribute."""
    if path is None:
        return {}
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    if rows and "patient_id" not in rows[0]:
        raise ConfigError(f"{path}: needs a patient_id column")
    return {r["patient_id"]: {k: v for k, v in r.items() if k != "patient_id"} for r in rows}


def _attribute_names(attributes: Mapping[str, Mapping[str, str]]) -> list[str]:
    return sorted({k for row in attributes.values() for k in row})


def _print_summary(evaluation: Mapping[str, Any], out: Path) -> None:
    for horizon, r in evaluation["horizons"].items():
        auroc = r["discrimination"]["auroc"]["value"]
        slope = r["calibration"]["calibration_slope"]["value"]
        shown = ", ".join(f"{k} {v}" for k, v in r["linkage"].items())
        print(f"{horizon}: {shown}; AUROC {_fmt(auroc)}, calibration slope {_fmt(slope)}")
    for finding in evaluation["findings"]:
        print(f"finding ({finding['horizon']}): {finding['text']}")
    if promotion := evaluation.get("promotion"):
        for v in promotion["criteria"]:
            print(f"promotion criterion {v['criterion']}: {v['status']} ({v['evidence']})")
        print(f"promotion: {promotion['overall']}")
    if relinked := evaluation.get("relinked"):
        print(f"links: {relinked['relinked']} computed, {relinked['kept']} kept from the last run")
    print(f"report: {out / 'report.html'}  numbers: {out / 'evaluation.json'}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
