"""Read local code → standard concept translations: inline, CSV, FHIR ConceptMap.

Every entry remembers where it was written (``local-codes.csv:3``), so that a
duplicate, a conflict or an unknown equivalence is reported at its place and
``mappings explain`` can say which line consumed a result.

* **CSV**: a header naming the columns ``system,code,target_code`` and
  optionally ``target_system`` (default ``LN``) and ``display``; blank lines
  and lines starting with ``#`` are skipped. The same local code twice in one
  file is an error naming both lines.
* **ConceptMap** (FHIR R4 JSON): ``group[].source`` is the local system,
  ``group[].target`` the standard one, ``element[].target[].equivalence``
  says whether a translation may be used:

  ========================================  ==========================================
  used                                      ``equivalent``, ``equal``, ``wider``,
                                            ``subsumes`` (R4); ``equivalent``,
                                            ``source-is-narrower-than-target`` (R5)
  not used, with a warning                  ``narrower``, ``specializes``, ``inexact``,
                                            ``relatedto`` (R4); ``source-is-broader-
                                            than-target``, ``related-to`` (R5)
  not used (says "no mapping")              ``unmatched``, ``disjoint``, ``not-related-to``
  anything else                             an error naming the place
  ========================================  ==========================================

  A local result is a valid instance of a *wider* concept (a local
  "creatinine, enzymatic" is a creatinine), never of a narrower one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ehrbridge.core.bounded_cache import short_key_cache
from ehrbridge.core.errors import ConfigError
from ehrbridge.core.located_yaml import LocatedYaml, parse_located
from ehrbridge.mappings.diagnostics import Locator
from ehrbridge.mappings.schema import CodeMapEntry, CodeMapSource, Mapping

USABLE = frozenset({"equivalent", "equal", "wider", "subsumes", "source-is-narrower-than-target"})
NOT_SAFE = frozenset(
    {
        "narrower",
        "specializes",
        "inexact",
        "relatedto",
        "source-is-broader-than-target",
        "related-to",
    }
)
NO_MAPPING = frozenset({"unmatched", "disjoint", "not-related-to"})
_CSV_REQUIRED = ("system", "code", "target_code")
_CSV_COLUMNS = frozenset({*_CSV_REQUIRED, "target_system", "display"})
_LOINC_ALIASES = {"ln": "LN", "loinc": "LN", "http://loinc.org": "LN"}


# Called for every OBX-3 coding; sites use a handful of systems (short: OBX-3.3 or a URI).
@short_key_cache(maxsize=1024)
def normalise_system(system: str) -> str:
    """LOINC has three spellings (OBX-3.3 ``LN``/``LOINC``, FHIR ``http://loinc.org``)."""
    stripped = system.strip()
    return _LOINC_ALIASES.get(stripped.casefold(), stripped)


@dataclass
class Problem:
    """An error or warning found while reading a code map source."""

    severity: str  # "error" | "warning"
    message: str
    file: str
    line: int | None
    field: str = ""


@dataclass
class CodeMapRead:
    entries: list[CodeMapEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def read_source(source: CodeMapSource, base_dir: Path, place: Callable[[str], str]) -> CodeMapRead:
    """Entries of one ``code_maps`` item. ``place(code)`` names where an inline code is."""
    if source.codes is not None:
        return _inline(source, place)
    if source.csv is not None:
        return read_csv(base_dir / source.csv)
    assert source.concept_map is not None
    return read_concept_map(base_dir / source.concept_map, alias=source.system)


def _inline(source: CodeMapSource, place: Callable[[str], str]) -> CodeMapRead:
    assert source.codes is not None and source.system is not None
    read = CodeMapRead()
    for local, target in source.codes.items():
        read.entries.append(CodeMapEntry(source.system, local, source.target, target, place(local)))
    return read


def shown(path: Path) -> str:
    """A path as an engineer can click it: relative to the working directory if under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_csv(path: Path) -> CodeMapRead:
    """Entries of a code map CSV; problems name the file and line."""
    name = shown(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read code map: {exc.strerror}", file=str(path)) from exc
    read = CodeMapRead()
    rows = list(csv.reader(io.StringIO(text)))
    header_index = _first_data_row(rows)
    if header_index is None:
        read.problems.append(Problem("error", "the CSV file is empty (it needs a header)", name, 1))
        return read
    header = [h.strip().lower() for h in rows[header_index]]
    if not _header_ok(header, name, header_index + 1, read):
        return read
    seen: dict[tuple[str, str], int] = {}
    for index in range(header_index + 1, len(rows)):
        row = rows[index]
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        entry = _csv_entry(dict(zip(header, (c.strip() for c in row), strict=False)), name, index)
        if isinstance(entry, Problem):
            read.problems.append(entry)
            continue
        key = (normalise_system(entry.system), entry.code)
        if key in seen:
            read.problems.append(
                Problem(
                    "error",
                    f"{entry.system}|{entry.code} is mapped twice (first at line {seen[key]})",
                    name,
                    index + 1,
                )
            )
            continue
        seen[key] = index + 1
        read.entries.append(entry)
    return read


def _first_data_row(rows: list[list[str]]) -> int | None:
    for index, row in enumerate(rows):
        if row and "".join(row).strip() and not row[0].lstrip().startswith("#"):
            return index
    return None


def _header_ok(header: list[str], name: str, line: int, read: CodeMapRead) -> bool:
    missing = [c for c in _CSV_REQUIRED if c not in header]
    unknown = [c for c in header if c not in _CSV_COLUMNS]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(unknown)}")
        read.problems.append(
            Problem(
                "error",
                "; ".join(parts) + " (columns: system,code,target_system,target_code,display)",
                name,
                line,
            )
        )
        return False
    return True


def _csv_entry(row: dict[str, str], name: str, index: int) -> CodeMapEntry | Problem:
    empty = [c for c in _CSV_REQUIRED if not row.get(c)]
    if empty:
        return Problem("error", f"empty {', '.join(empty)}", name, index + 1)
    return CodeMapEntry(
        system=row["system"],
        code=row["code"],
        target_system=row.get("target_system") or "LN",
        target_code=row["target_code"],
        where=f"{Path(name).name}:{index + 1}",
        display=row.get("display", ""),
    )


def read_concept_map(path: Path, alias: str | None = None) -> CodeMapRead:
    """Translations of a FHIR ConceptMap (JSON). ``alias``: the OBX-3.3 name of group.source."""
    name = shown(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read ConceptMap: {exc.strerror}", file=str(path)) from exc
    located = parse_located(text, name)  # JSON is YAML: this keeps line numbers
    read = CodeMapRead()
    data = located.data
    if not isinstance(data, dict) or data.get("resourceType") != "ConceptMap":
        read.problems.append(
            Problem("error", "not a FHIR ConceptMap (resourceType)", name, located.line_of(()))
        )
        return read
    groups = data.get("group")
    if not isinstance(groups, list) or not groups:
        read.problems.append(
            Problem("error", "the ConceptMap has no group", name, located.line_of(()), "group")
        )
        return read
    seen: dict[tuple[str, str], str] = {}
    for g, group in enumerate(groups):
        _read_group(group, ("group", g), located, alias=alias, read=read, seen=seen)
    return read


def _read_group(
    group: Any,
    path: tuple[str | int, ...],
    located: LocatedYaml,
    *,
    alias: str | None,
    read: CodeMapRead,
    seen: dict[tuple[str, str], str],
) -> None:
    def problem(severity: str, message: str, at: tuple[str | int, ...]) -> None:
        read.problems.append(
            Problem(severity, message, located.file, located.line_of(at), _dotted(at))
        )

    if not isinstance(group, dict) or not group.get("source") or not group.get("target"):
        problem("error", "a group needs 'source' and 'target' code systems", path)
        return
    source, target = str(group["source"]), str(group["target"])
    for e, element in enumerate(group.get("element") or []):
        at = (*path, "element", e)
        code = element.get("code") if isinstance(element, dict) else None
        if not code:
            problem("error", "an element needs a 'code'", at)
            continue
        chosen = _element_target(element, at, located, problem)
        if chosen is None:
            continue
        target_code, line = chosen
        for system in {source, alias} - {None}:
            assert system is not None
            key = (normalise_system(system), str(code))
            if key in seen:
                problem("error", f"{system}|{code} is mapped twice (first at {seen[key]})", at)
                continue
            where = f"{Path(located.file).name}:{line}"
            seen[key] = where
            display = str(element.get("display", ""))
            read.entries.append(
                CodeMapEntry(system, str(code), target, target_code, where, display)
            )


def _element_target(
    element: dict[str, Any], at: tuple[str | int, ...], located: LocatedYaml, problem: Any
) -> tuple[str, int | None] | None:
    usable: list[tuple[str, int | None]] = []
    for t, target in enumerate(element.get("target") or []):
        t_at = (*at, "target", t)
        if not isinstance(target, dict):
            problem("error", "a target must be an object", t_at)
            continue
        key = "equivalence" if "equivalence" in target else "relationship"
        value = target.get(key)
        if value is None:
            problem("error", "a target needs an 'equivalence' (R4) or 'relationship' (R5)", t_at)
        elif value in USABLE and target.get("code"):
            usable.append((str(target["code"]), located.line_of((*t_at, key))))
        elif value in NOT_SAFE:
            problem(
                "warning",
                f"{key} {value!r} is not safe to use for model features; translation skipped",
                (*t_at, key),
            )
        elif value not in NO_MAPPING and value not in USABLE:
            known = ", ".join(sorted(USABLE | NOT_SAFE | NO_MAPPING))
            problem("error", f"unknown {key} {value!r} (known: {known})", (*t_at, key))
    if len(usable) > 1:
        problem("error", "the code translates to more than one usable target", at)
        return None
    return usable[0] if usable else None


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --------------------------------------------------------------------------- the compiled table


@dataclass(frozen=True, slots=True)
class CodeRule:
    """What one (system, code) feeds, and which lines of the mapping say so."""

    feature: str
    concept: str  # the standard concept, "LN|2160-0"
    rule: str  # the feature rule that takes the concept: "features.creatinine.codes[0]"
    rule_place: str  # "mapping.yaml:31" ('' when unknown)
    via: str = ""  # the code map line that translated a local code: "local-codes.csv:3"


@dataclass(frozen=True, slots=True)
class Conflict:
    severity: str
    message: str
    path: tuple[str | int, ...]  # where in the mapping to report it


@dataclass
class CodeTable:
    rules: dict[tuple[str, str], CodeRule] = field(default_factory=dict)
    # Local codes whose translation feeds no feature (explain says so instead of "not mapped").
    dead_ends: dict[tuple[str, str], CodeMapEntry] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)


def build_code_table(
    features: dict[str, list[tuple[str, str]]],
    code_map: tuple[CodeMapEntry, ...] | list[CodeMapEntry],
    place: Callable[[tuple[str | int, ...]], str],
) -> CodeTable:
    """(normalised system, code) → :class:`CodeRule`, and every conflict found.

    ``features`` is feature → its codes as (system, code); a local code reaches
    a feature through a code map entry whose target is one of those codes.
    """
    table = CodeTable()
    for feature, codes in features.items():
        for index, (system, code) in enumerate(codes):
            key = (normalise_system(system), code)
            _add_feature_code(table, feature, index, key, place)
    mapped: dict[tuple[str, str], CodeMapEntry] = {}
    for entry in code_map:
        _add_translation(table, mapped, entry)
    return table


def _add_feature_code(
    table: CodeTable,
    feature: str,
    index: int,
    key: tuple[str, str],
    place: Callable[[tuple[str | int, ...]], str],
) -> None:
    system, code = key
    path: tuple[str | int, ...] = ("features", feature, "codes", index)
    known = table.rules.get((system, code))
    if known is not None:
        severity = "error" if known.feature != feature else "warning"
        what = (
            f"is mapped to both {known.feature} and {feature}"
            if known.feature != feature
            else f"is listed twice under {feature}"
        )
        lines = f" ({known.rule_place} and {place(path)})" if known.rule_place else ""
        table.conflicts.append(Conflict(severity, f"code {system}|{code} {what}{lines}", path))
        if known.feature != feature:
            return
    dotted = f"features.{feature}.codes[{index}]"
    table.rules[(system, code)] = CodeRule(feature, f"{system}|{code}", dotted, place(path))


def _add_translation(
    table: CodeTable, mapped: dict[tuple[str, str], CodeMapEntry], entry: CodeMapEntry
) -> None:
    key = (normalise_system(entry.system), entry.code)
    target = table.rules.get((normalise_system(entry.target_system), entry.target_code))
    earlier = mapped.get(key)
    if earlier is not None:
        same = (normalise_system(earlier.target_system), earlier.target_code) == (
            normalise_system(entry.target_system),
            entry.target_code,
        )
        table.conflicts.append(
            Conflict(
                "warning" if same else "error",
                f"local code {entry.system}|{entry.code} is mapped twice: "
                f"{earlier.where} → {earlier.target}, {entry.where} → {entry.target}",
                ("code_maps",),
            )
        )
        return
    mapped[key] = entry
    direct = table.rules.get(key)
    if direct is not None and not direct.via:
        if target is None or target.feature != direct.feature:
            fed = target.feature if target else "no feature"
            table.conflicts.append(
                Conflict(
                    "error",
                    f"code {entry.system}|{entry.code} feeds {direct.feature} directly "
                    f"({direct.rule_place}) but {entry.where} translates it to {entry.target} "
                    f"({fed})",
                    ("code_maps",),
                )
            )
        return
    if target is None:
        table.dead_ends[key] = entry
        return
    table.rules[key] = CodeRule(
        target.feature, target.concept, target.rule, target.rule_place, entry.where
    )


def code_table(mapping: Mapping, locator: Locator) -> CodeTable:
    """The mapping's codes and its code map as one lookup table; clashes name their line."""
    codes = {f: [(c.system, c.code) for c in rule.codes] for f, rule in mapping.features.items()}
    return build_code_table(codes, mapping.code_map, locator.place)
