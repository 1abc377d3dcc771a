"""``ehrbridge mappings check|test|explain|unmapped``: site mappings without Python.

    ehrbridge mappings check PATH                 schema + lint, file:line; exit 1 on errors
    ehrbridge mappings test PATH                  run the *_test.yaml cases; exit 1 on failure
    ehrbridge mappings explain --site X FILE      what the mapping does with each result
    ehrbridge mappings unmapped --site SITE.yaml  codes the site sent that nothing maps

PATH is a mapping file, a site config, a site folder, or a folder of them
(``mappings/sites``). ``--site`` is a site config, a mapping file, a site folder
or the name of an example site (``eu-si-local-codes``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ehrbridge.core.errors import ConfigError


def add_mapping_commands(sub: Any) -> None:
    """Register the ``mappings`` command group on the main parser's subparsers."""
    mappings = sub.add_parser("mappings", help="check, test and explain site mappings")
    actions = mappings.add_subparsers(required=True, metavar="ACTION")

    check = actions.add_parser("check", help="validate and lint mappings (file:line messages)")
    check.add_argument("path", type=Path)
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.set_defaults(func=_check)

    test = actions.add_parser("test", help="run the co-located *_test.yaml cases")
    test.add_argument("path", type=Path)
    test.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    test.set_defaults(func=_test)

    explain = actions.add_parser("explain", help="show what the mapping does with a message")
    explain.add_argument("--site", required=True, help="site config, mapping, folder or name")
    explain.add_argument("message", type=Path, help="an HL7v2 file (one or more) or FHIR JSON")
    explain.set_defaults(func=_explain)

    unmapped = actions.add_parser("unmapped", help="codes a running site sent that nothing maps")
    unmapped.add_argument(
        "--site",
        "--config",
        dest="site",
        required=True,
        type=Path,
        help="the site config (its data_dir holds the log)",
    )
    unmapped.add_argument(
        "--limit",
        type=int,
        default=100_000,
        help="read at most this many messages per topic (default 100000)",
    )
    unmapped.set_defaults(func=_unmapped)


def _check(args: argparse.Namespace) -> int:
    from ehrbridge.mappings.loader import check_path

    if not args.path.exists():
        raise ConfigError(f"{args.path}: no such file or folder")
    diagnostics = check_path(args.path)
    for diagnostic in diagnostics:
        print(diagnostic)
    errors = sum(d.is_error for d in diagnostics)
    warnings = sum(d.severity == "warning" for d in diagnostics)
    print(f"{args.path}: {errors} error(s), {warnings} warning(s)")
    return 1 if errors or (args.strict and warnings) else 0


def _test(args: argparse.Namespace) -> int:
    from ehrbridge.workbench.testing import run_path

    if not args.path.exists():
        raise ConfigError(f"{args.path}: no such file or folder")
    results = run_path(args.path)
    if not results:
        print(f"{args.path}: no *_test.yaml cases found")
        return 1
    for result in results:
        if not (args.quiet and result.passed):
            print(result.report())
    failed = sum(not r.passed for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _explain(args: argparse.Namespace) -> int:
    from ehrbridge.workbench.explain import explain_file
    from ehrbridge.workbench.site import resolve_site

    if not args.message.is_file():
        raise ConfigError(f"{args.message}: no such file")
    site = resolve_site(args.site)
    sys.stdout.write(explain_file(site, args.message))
    return 0


def _unmapped(args: argparse.Namespace) -> int:
    from ehrbridge.config import load_site_config
    from ehrbridge.pipelines.facts import FactRules
    from ehrbridge.stores import open_existing_log
    from ehrbridge.workbench.unmapped import collect, render

    config = load_site_config(args.site)
    try:
        log = open_existing_log(config, args.site)
    except NotImplementedError as exc:
        raise ConfigError(f"cannot read the {config.transport.kind} log here: {exc}") from exc
    try:
        report = collect(log, config.site, FactRules(config.mapping), args.limit)
    finally:
        log.close()
    sys.stdout.write(render(report, config.site))
    return 0
