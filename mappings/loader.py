"""Loading site mappings, wherever they are written.

A mapping can be

* inline in a site config (``mapping:`` with the fields),
* in its own file, named by the site config (``mapping: {file: ../mappings/acme.yaml}``,
  relative to the site config),
* a site folder holding ``mapping.yaml`` (and its ``*_test.yaml`` cases),
* or the name of an example site shipped in ``mappings/sites/``.

Every load compiles the code maps and runs the lint (:mod:`.lint`); errors raise
:class:`ConfigError` naming file:line and field, so nothing starts with a broken
mapping. Warnings are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ehrbridge.core.errors import ConfigError
from ehrbridge.core.located_yaml import (
    LocatedYaml,
    load_located,
    located_problems,
    validate_located,
)
from ehrbridge.mappings.codemaps import read_source
from ehrbridge.mappings.diagnostics import Diagnostic, Locator
from ehrbridge.mappings.lint import lint_mapping
from ehrbridge.mappings.schema import Mapping

log = logging.getLogger(__name__)
SITES_DIR = Path(__file__).resolve().parent / "sites"
MAPPING_FILE = "mapping.yaml"


# --------------------------------------------------------------------------- validation glue


def finish_mapping(mapping: Mapping, context: dict[str, Any]) -> Mapping:
    """Compile the code maps and lint; raise on errors unless collecting diagnostics."""
    located = context.get("located")
    locator = Locator(located if isinstance(located, LocatedYaml) else None, _prefix(located))
    diagnostics = compile_and_lint(mapping, locator)
    sink = context.get("diagnostics")
    if isinstance(sink, list):
        sink.extend(diagnostics)
    else:
        raise_on_errors(diagnostics)
    return mapping


def _prefix(located: object) -> tuple[str, ...]:
    """Where the mapping sits in its file: under ``mapping:`` in a site config."""
    if isinstance(located, LocatedYaml) and isinstance(located.data, dict):
        return ("mapping",) if "mapping" in located.data else ()
    return ()


def mapping_from_file_reference(reference: object, context: dict[str, Any]) -> Mapping:
    """``mapping: {file: PATH}`` in a site config: PATH is relative to that config."""
    located = context.get("located")
    where = located if isinstance(located, LocatedYaml) else None
    if not isinstance(reference, str) or not reference.strip():
        raise ConfigError(
            "give the mapping file as a path",
            file=where.file if where else None,
            line=where.line_of(("mapping", "file")) if where else None,
            field="mapping.file",
        )
    path = _base_dir(where) / reference
    if not path.is_file():
        raise ConfigError(
            f"mapping file not found: {path}",
            file=where.file if where else None,
            line=where.line_of(("mapping", "file")) if where else None,
            field="mapping.file",
        )
    sink = context.get("diagnostics")
    return load_mapping_file(path, diagnostics=sink if isinstance(sink, list) else None)


def compile_and_lint(mapping: Mapping, locator: Locator) -> list[Diagnostic]:
    diagnostics: list[Diagnostic] = []
    base = _base_dir(locator.located)
    entries = []
    for index, source in enumerate(mapping.code_maps):
        item: tuple[str | int, ...] = ("code_maps", index)

        def place(code: str, item: tuple[str | int, ...] = item) -> str:
            return locator.place((*item, "codes", code))

        try:
            read = read_source(source, base, place)
        except ConfigError as error:
            key = "csv" if source.csv is not None else "concept_map"
            diagnostics.append(locator.diagnostic("error", (*item, key), error.detail))
            continue
        entries.extend(read.entries)
        diagnostics.extend(
            Diagnostic(p.severity, p.message, p.file, p.line, p.field) for p in read.problems
        )
    mapping.attach(locator.file or "", tuple(entries), locator)
    diagnostics.extend(lint_mapping(mapping, locator))
    return diagnostics


def raise_on_errors(diagnostics: Sequence[Diagnostic]) -> None:
    errors = [d for d in diagnostics if d.is_error]
    for warning in (d for d in diagnostics if d.severity == "warning" and not d.check_only):
        log.warning("mapping: %s", warning)
    if not errors:
        return
    first = errors[0]
    detail = _plain(first) if len(errors) == 1 else "\n  " + "\n  ".join(_plain(d) for d in errors)
    error = ConfigError(detail)
    error.file, error.line, error.field = first.file, first.line, first.field or None
    raise error


def _plain(d: Diagnostic) -> str:
    """A diagnostic without the severity word (ConfigError already means error)."""
    where = ":".join(str(p) for p in (d.file, d.line) if p is not None)
    return ": ".join(p for p in (where, d.field, d.message) if p)


def _base_dir(located: LocatedYaml | None) -> Path:
    if located is None or located.file.startswith("<"):
        return Path.cwd()
    return Path(located.file).resolve().parent


# --------------------------------------------------------------------------- loading


def load_mapping_file(path: Path | str, diagnostics: list[Diagnostic] | None = None) -> Mapping:
    """A mapping file (the :class:`Mapping` fields at the top level)."""
    located = load_located(path)
    context: dict[str, Any] = {}
    if diagnostics is not None:
        context["diagnostics"] = diagnostics
    return validate_located(Mapping, located, **context)


def is_site_config(located: LocatedYaml) -> bool:
    """Site configs have ``site:`` and ``mapping:``; a mapping file has neither key."""
    return isinstance(located.data, dict) and ("site" in located.data or "mapping" in located.data)


# --------------------------------------------------------------------------- checking


def check_path(path: Path) -> list[Diagnostic]:
    """Every diagnostic of a mapping file, a site config, or every mapping under a folder."""
    if path.is_dir():
        out: list[Diagnostic] = []
        for file in sorted(path.rglob("*.yaml")):
            if not file.name.endswith("_test.yaml"):
                out.extend(check_file(file))
        if not out and not any(path.rglob("*.yaml")):
            out.append(Diagnostic("error", "no mapping files here", str(path)))
        return out
    return check_file(path)


def check_file(path: Path) -> list[Diagnostic]:
    try:
        located = load_located(path)
    except ConfigError as error:
        return [Diagnostic("error", error.detail, error.file, error.line)]
    prefix: tuple[str, ...] = ()
    data = located.data
    if is_site_config(located):
        if not isinstance(data, dict) or "mapping" not in data:
            return [Diagnostic("error", "the site config has no mapping", str(path), 1)]
        prefix, data = ("mapping",), data["mapping"]
    sink: list[Diagnostic] = []
    try:
        Mapping.model_validate(data, context={"located": located, "diagnostics": sink})
    except ValidationError as exc:
        for line, field, message in located_problems(exc, located, prefix):
            sink.append(Diagnostic("error", message, located.file, line, field))
    except ConfigError as error:
        sink.append(Diagnostic("error", error.detail, error.file, error.line, error.field or ""))
    return sink
