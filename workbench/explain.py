"""``ehrbridge mappings explain``: what the mapping does with each result of a message.

For every OBX (HL7v2) or Observation (FHIR) it prints which rule consumed it
-- the code map line and the feature rule, with their file:line -- the value
before and after unit conversion, the time it counts at and where that time
came from, or why it was not used. Nothing is dropped without a line saying
so. Then the feature record this message alone would give (or the stated
"not enough data" reason), and the problems that would make the pipeline
answer AE.

HL7 field names come from hl7apy's structure tables (``OBR-7 Observation
Date/Time``); values are read with the lean reader, exactly as the pipeline
reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ehrbridge.adapters.hl7_reference import field_name
from ehrbridge.config import describe_model
from ehrbridge.core.contracts import Kind
from ehrbridge.core.errors import MessageRejected, MessageUnusable
from ehrbridge.mappings.schema import CANONICAL_UNITS, DERIVED_FROM
from ehrbridge.pipelines.domain import OutOfDomain
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import FactRules, ObservationTrace, PatientTrace, Trace
from ehrbridge.pipelines.features import FeatureRecord, NotEnoughData
from ehrbridge.workbench.messages import Input, extract_input, read_inputs
from ehrbridge.workbench.site import SiteMapping
from ehrbridge.workbench.testing import replay

_OUTCOME_WORDS = {
    "used": "USED",
    "flagged": "FLAGGED (kept, never used)",
    "withdrawn": "WITHDRAWS",
    "unused": "UNUSED",
    "error": "ERROR",
}


def explain_file(site: SiteMapping, path: Path) -> str:
    """The explanation of every message in a file."""
    rules = FactRules(site.mapping)
    header = (
        f"site '{site.name}', mapping {site.mapping.version} ({_shown(site.path)})\n"
        f"model {site.mapping.model}, time zone {site.mapping.timezone}"
    )
    if site.config is not None:
        for model in site.config.site_models:
            header += f"\nmodel: {describe_model(site.config, model)}"
    else:
        header += f"\ndomain: {', '.join(str(rule) for rule in site.mapping.domain) or 'none'}"
    parts = [header]
    for item in read_inputs(path):
        parts.append("\n".join(explain_input(item, rules, site)))
    return "\n\n".join(parts) + "\n"


def explain_input(item: Input, rules: FactRules, site: SiteMapping) -> Iterator[str]:
    trace = Trace()
    version = ""
    try:
        if item.kind is Kind.HL7V2:
            message = Message.parse(item.payload)
            version = message.version
            yield (
                f"message {item.name}: {'^'.join(p for p in message.message_type if p)}, "
                f"control id {message.control_id}, HL7 v{version}"
            )
        else:
            yield f"message {item.name}: FHIR"
        extract_input(item, rules, trace)
    except MessageRejected as error:
        yield f"  REJECTED (the sender gets AR): {error.reason}: {error.detail}"
        return
    except MessageUnusable as error:
        yield f"  UNUSABLE (the sender gets AE): {error.reason}: {error.detail}"
        return
    for patient in trace.patients:
        yield from _patient_lines(patient, version)
    for note in trace.observations:
        yield from _observation_lines(note, version)
    yield from _summary(trace)
    yield from _record_lines(item, site)


def _patient_lines(patient: PatientTrace, version: str) -> Iterator[str]:
    yield ""
    yield f"patient {patient.patient_id}   (id from {patient.id_source})"
    birth = patient.birth_date.isoformat() if patient.birth_date else "none"
    sex = patient.sex or "none"
    yield (
        f"  birth date {birth}{_source(patient.birth_source, version)}   "
        f"sex {sex}{_source(patient.sex_source, version)}"
    )


def _source(path: str, version: str) -> str:
    if not path:
        return ""
    name = field_name(path, version) if "-" in path else ""
    return f" ({path}{' ' + name if name else ''})"


def _observation_lines(note: ObservationTrace, version: str) -> Iterator[str]:
    kind = "OBX" if "/OBX/" in note.ref else "Observation"
    label = f"#{note.ref.rsplit('/', 1)[-1]}" if kind == "OBX" else note.ref.split("/", 1)[-1]
    display = f' "{note.display}"' if note.display else ""
    value = f"{note.raw_value} {note.raw_unit}".strip() or "(no value)"
    yield ""
    yield (
        f"{kind} {label} ({note.position})  {note.code}{display} {note.system}  = {value}"
        f"  [{note.status or 'no status'}]"
    )
    word = _OUTCOME_WORDS.get(note.outcome, note.outcome.upper() or "?")
    if note.outcome in ("used", "flagged", "withdrawn") or note.feature:
        yield f"  {word:<8} {note.feature or '-'}  {_rule_text(note)}"
    else:
        yield f"  {word:<8} {note.reason}"
        return
    if note.value is not None and note.outcome != "withdrawn":
        at = note.effective.isoformat() if note.effective else "?"
        yield (
            f"           {value} {note.conversion} = {note.value:.6g} {note.unit}   "
            f"at {at}{_source(note.time_source, version)}"
        )
    if "accepted as" in note.conversion:
        yield "           (used only when no properly labelled value has the same time)"
    if note.reason:
        yield f"           {note.reason}"


def _rule_text(note: ObservationTrace) -> str:
    via = f"via {note.via} -> {note.concept}, " if note.via else f"as {note.concept}, "
    return f"{via}rule {note.rule}"


def _summary(trace: Trace) -> Iterator[str]:
    counts = {k: sum(1 for o in trace.observations if o.outcome == k) for k in _OUTCOME_WORDS}
    yield ""
    yield (
        f"{len(trace.observations)} result(s): {counts['used']} used, {counts['flagged']} flagged, "
        f"{counts['withdrawn']} withdrawing, {counts['unused']} unused, {counts['error']} error(s)"
    )
    if trace.skipped:
        skipped = ", ".join(f"{k} {v}" for k, v in trace.skipped.most_common())
        yield f"resources not read (no results in them): {skipped}"
    if trace.problems:
        yield "the pipeline would refuse this message (AE) and keep it in the dead-letter store:"
        yield from (f"  {p}" for p in trace.problems)


def _record_lines(item: Input, site: SiteMapping) -> Iterator[str]:
    result = replay([item], site.mapping)
    if result.rejected:
        return
    if not result.outcomes:
        yield "no prediction: nothing in this message triggers one (triggers.features)"
        return
    for patient, outcome in result.outcomes:
        yield f"feature record for {patient} from this message alone:"
        if isinstance(outcome, NotEnoughData):
            yield "  not enough data:"
            yield from (f"    {k}: {v}" for k, v in sorted(outcome.missing.items()))
        elif isinstance(outcome, OutOfDomain):
            yield "  not scored, outside the model's validated domain (its rules: 'domain' above):"
            yield from (f"    {r}" for r in outcome.reasons)
        else:
            yield from _features(outcome)


def _features(record: FeatureRecord) -> Iterator[str]:
    yield "  " + "  ".join(_feature(record, name, value) for name, value in record.values.items())
    yield f"  anchor {record.anchor.isoformat()}, episode {record.episode}"
    yield f"  inputs {', '.join(f.ref for f in record.inputs)}"


def _feature(record: FeatureRecord, name: str, value: float) -> str:
    if name == "sex":
        return f"sex {'M' if value else 'F'}"
    unit = f" {CANONICAL_UNITS[name]}" if name in CANONICAL_UNITS else ""
    fact = record.source(name)
    if fact is None or name not in DERIVED_FROM:  # only a derivable value says how it was got
        return f"{name} {value:.2f}{unit}"
    source = f"{fact.feature} {fact.value:.6g} {fact.unit}"
    return f"{name} {value:.2f} ({record.method(name)} from {source})"


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
