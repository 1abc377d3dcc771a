"""Semantic checks of a site mapping, each reported at its file and line.

pydantic checks the shape of a mapping; this module checks what it *means*:

* a feature the model does not take (a note when another model takes it:
  a site running several models maps the inputs of each);
* a feature without a window;
* a unit that cannot be converted (``mmol/L`` for a UACR), a factor that
  contradicts the known one (``umol/L: {multiply: 88.4}``), ``mL/min`` for
  eGFR without ``accept_as``, a unit ehrbridge cannot verify (warning);
* a code mapped twice, or to two features; code map lines that feed nothing;
* a mapping that can never produce a complete feature record (no UACR, no
  eGFR and no creatinine to derive it, final results not used, triggers that
  never fire, a plausible range that lets a zero through to a log);
* a mapping file without co-located ``*_test.yaml`` cases (warning).

Errors stop a site from starting (:class:`ConfigError` at load); ``ehrbridge
mappings check`` prints errors and warnings and exits non-zero on errors.
"""

from __future__ import annotations

from pathlib import Path

from ehrbridge.mappings.codemaps import code_table
from ehrbridge.mappings.diagnostics import Diagnostic, Locator, PathKey
from ehrbridge.mappings.schema import LAB_FEATURES, MODELS, Mapping, UnitRule
from ehrbridge.mappings.units import describe_factor, known_unit, same_unit

_FACTOR_TOLERANCE = 0.01  # a stated factor within 1 % of the known one is the same factor


def lint_mapping(mapping: Mapping, locator: Locator) -> list[Diagnostic]:
    """Every semantic problem of a validated mapping (its code map already attached)."""
    out: list[Diagnostic] = []
    _features_taken(mapping, locator, out)
    _windows(mapping, locator, out)
    _units(mapping, locator, out)
    _plausible(mapping, locator, out)
    _codes(mapping, locator, out)
    _complete(mapping, locator, out)
    _triggers(mapping, locator, out)
    _tests_present(locator, out)
    return out


def _features_taken(mapping: Mapping, loc: Locator, out: list[Diagnostic]) -> None:
    spec = mapping.spec
    for_others: dict[str, list[str]] = {}
    for feature in mapping.features:
        if spec.takes(feature):
            continue
        takers = [name for name, other in MODELS.items() if other.takes(feature)]
        if takers:
            # A site running several models maps what each takes (KFRE-8's albumin beside
            # KFRE-4): not a mistake, but worth saying which model it is for.
            for_others.setdefault(" or ".join(takers), []).append(feature)
            continue
        out.append(
            loc.diagnostic(
                "error",
                ("features", feature),
                f"model {spec.name} does not take {feature} (its inputs: {', '.join(spec.inputs)})",
            )
        )
    for model, mapped in for_others.items():
        out.append(
            loc.diagnostic(
                "note",
                ("features", mapped[0]),
                f"{', '.join(mapped)}: {spec.name} does not take them, {model} does; they are "
                f"used when this site runs {model} (models:), else stored unused",
            )
        )


def _windows(mapping: Mapping, loc: Locator, out: list[Diagnostic]) -> None:
    for feature, rule in mapping.features.items():
        if rule.window_days is None:
            out.append(
                loc.diagnostic(
                    "error",
                    ("features", feature, "window_days"),
                    f"window missing: how many days back may a {feature} result be used? "
                    "(add window_days)",
                )
            )


def _units(mapping: Mapping, loc: Locator, out: list[Diagnostic]) -> None:
    for feature, rule in mapping.features.items():
        for unit, unit_rule in rule.units.items():
            problem = unit_problem(feature, unit, unit_rule)
            if problem is not None:
                severity, message = problem
                out.append(loc.diagnostic(severity, ("features", feature, "units", unit), message))


def unit_problem(feature: str, unit: str, rule: UnitRule) -> tuple[str, str] | None:
    """(severity, message) when a unit rule is wrong or cannot be verified."""
    canonical = LAB_FEATURES[feature].canonical_unit
    known = known_unit(feature, unit)
    target = known_unit(feature, canonical)
    if rule.accept_as is not None:
        if not same_unit(rule.accept_as, canonical):
            return "error", f"accept_as must name the {feature} unit {canonical}"
        if known is not None and known.factor is not None:
            return "warning", (
                f"{unit} already converts to {canonical} ({describe_factor(known.factor)}); "
                "accept_as is not needed"
            )
        return None
    if known is None:
        return "warning", (
            f"ehrbridge does not know {unit!r} as a unit of {feature}, so the factor cannot be "
            "verified; make sure a mapping test covers it"
        )
    if known.factor is None:
        dimension = target.dimension if target else canonical
        hint = (
            "; if this site labels indexed eGFR as mL/min, say "
            f"`{unit}: {{accept_as: {canonical}}}`"
            if feature == "egfr"
            else ""
        )
        return "error", (
            f"cannot convert {unit} ({known.dimension}) to {canonical} ({dimension}){hint}"
        )
    if abs(rule.factor / known.factor - 1) > _FACTOR_TOLERANCE:
        return "error", (
            f"{unit} → {canonical} is {describe_factor(known.factor)}, "
            f"but this rule gives {rule.describe()}"
        )
    return None


def _plausible(mapping: Mapping, loc: Locator, out: list[Diagnostic]) -> None:
    for feature, rule in mapping.features.items():
        low, _ = mapping.plausible(feature)
        # eGFR and UACR go into KFRE's logarithms: zero or below can never be used.
        if feature in ("egfr", "uacr") and low <= 0 and rule.plausible is not None:
            path = ("features", feature, "plausible", "min")
            out.append(
                loc.diagnostic(
                    "error", path, f"{feature} must be above 0 to be used (KFRE takes its log)"
                )
            )


def _codes(mapping: Mapping, loc: Locator, out: list[Diagnostic]) -> None:
    table = code_table(mapping, loc)
    for conflict in table.conflicts:
        out.append(loc.diagnostic(conflict.severity, conflict.path, conflict.message))
    if table.dead_ends:
        examples = ", ".join(
            f"{e.system}|{e.code} → {e.target} ({e.where})"
            for e in list(table.dead_ends.values())[:3]
        )
        out.append(
            loc.diagnostic(
                "note",
                ("code_maps",),
                f"{len(table.dead_ends)} code map translation(s) reach a concept no feature "
                f"takes, e.g. {examples}; add the concept to a feature's codes if it should count",
            )
        )


def _complete(mapping: Mapping, loc: Locator, out: list[Diagnostic]) -> None:
    spec = mapping.spec

    def never(path: PathKey, why: str) -> None:
        out.append(
            loc.diagnostic(
                "error", path, f"this mapping can never produce a complete feature record: {why}"
            )
        )

    for needed in sorted(spec.lab_inputs):
        if needed in mapping.features:
            continue
        source = spec.derivations.get(needed)
        if needed == "egfr" and source and mapping.egfr_derivation() is not None:
            continue
        if source and source in mapping.features:
            never(("derived",), f"{spec.name} needs {needed}; derive it from {source} (derived)")
        elif source:
            never(("features",), f"{spec.name} needs {needed} (or {source} to derive it from)")
        else:
            never(("features",), f"{spec.name} needs {needed}, and no feature rule supplies it")
    derived = mapping.derived.egfr
    if derived is not None and derived.prefer == "derived" and "creatinine" not in mapping.features:
        never(("derived", "egfr", "prefer"), "eGFR is always derived, but creatinine is not mapped")
    if "F" not in mapping.values.statuses:
        never(("values", "statuses"), "final results (F) are never used")


def _triggers(mapping: Mapping, loc: Locator, out: list[Diagnostic]) -> None:
    wanted = mapping.triggers.features
    if wanted is None:
        return
    for index, feature in enumerate(wanted):
        path = ("triggers", "features", index)
        if feature not in LAB_FEATURES:
            out.append(loc.diagnostic("error", path, f"{feature!r} is not a lab feature"))
        elif feature not in mapping.features:
            derived = " (it is derived here; trigger on creatinine)" if feature == "egfr" else ""
            out.append(
                loc.diagnostic(
                    "error",
                    path,
                    f"{feature} is not mapped at this site, so it never triggers{derived}",
                )
            )
    if not set(wanted) & set(mapping.features):
        out.append(
            loc.diagnostic(
                "error", ("triggers", "features"), "no mapped result ever triggers a prediction"
            )
        )


def _tests_present(loc: Locator, out: list[Diagnostic]) -> None:
    """A mapping file of its own should have its tests next to it."""
    if loc.located is None or loc.prefix:
        return
    folder = Path(loc.located.file).parent
    if folder.is_dir() and not any(folder.glob("*_test.yaml")):
        out.append(
            Diagnostic(
                "warning",
                f"no *_test.yaml next to this mapping in {folder}: nothing shows it works",
                loc.file,
                1,
                check_only=True,
            )
        )
