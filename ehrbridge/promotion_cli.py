"""``ehrbridge promote`` and ``ehrbridge demote``: a model to live or back to shadow.

    ehrbridge promote --site site.yaml [--model kfre-4var] [--override --reason TEXT]
                      [--evaluate OUT [--events DIR]]
    ehrbridge demote  --site site.yaml [--model kfre-4var] --reason TEXT

Calls the running site's ``POST /api/models/{model}/mode`` with an admin token
(``--token-file``, or ``EHRBRIDGE_TOKEN``), which judges the criteria of the
last ``ehrbridge evaluate`` (``--evaluate OUT`` runs one first), records the
decision in the audit trail and switches the running site without a restart
(``ehrbridge/promotion.py``).
``--local`` decides on the host instead, as the data dir's owner (a site not
running; the processes pick the switch up when they start or on their next batch).
Exit 0 when the mode switched, 1 when refused.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ehrbridge.config import Mode, SiteConfig, load_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.promotion import DEMOTE, PROMOTE, Caller, decide, for_model


def add_promotion_commands(sub: Any) -> None:
    for action, help_text in (
        (PROMOTE, "judge the promotion criteria; on pass (or --override) switch to live"),
        (DEMOTE, "switch the model back to shadow (a reason is required)"),
    ):
        cmd = sub.add_parser(
            action,
            help=help_text,
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_argument("--site", type=Path, required=True, help="the site YAML file")
        cmd.add_argument("--model", help="the model (default: the site's)")
        cmd.add_argument("--reason", help="why (recorded; required to demote or override)")
        if action == PROMOTE:
            cmd.add_argument(
                "--override",
                action="store_true",
                help="go live although the criteria did not pass (with --reason)",
            )
            cmd.add_argument(
                "--source",
                choices=["site", "backfill"],
                default="site",
                help="the evaluation judged: shadow predictions or backfill",
            )
            cmd.add_argument(
                "--evaluate",
                type=Path,
                metavar="OUT",
                help="run ehrbridge evaluate into OUT first, then judge that",
            )
            cmd.add_argument(
                "--events",
                type=Path,
                help="with --evaluate: the outcomes (default: evaluation.events)",
            )
        cmd.add_argument("--url", help="the site's API (default: from the site's http:)")
        cmd.add_argument("--token-file", type=Path, help="admin token (or EHRBRIDGE_TOKEN)")
        cmd.add_argument("--ca-file", type=Path, help="CA to trust for the API's TLS")
        cmd.add_argument(
            "--local",
            action="store_true",
            help="decide on this host as the data dir's owner, not via the API",
        )
        cmd.set_defaults(func=run_promotion, action=action)


def run_promotion(args: argparse.Namespace) -> int:
    config = load_site_config(args.site)
    model = args.model or config.model.name
    chosen = for_model(config, model)  # each of the site's models is promoted on its own
    if chosen is None:
        names = ", ".join(m.name for m in config.site_models)
        raise ConfigError(f"{args.site}: this site runs {names}, not {model!r}")
    config = chosen
    body = {
        "mode": (Mode.LIVE if args.action == PROMOTE else Mode.SHADOW).value,
        "reason": args.reason,
        "override": getattr(args, "override", False),
        "source": getattr(args, "source", "site"),
    }
    if getattr(args, "evaluate", None) is not None:
        _evaluate_first(args, model)
    status, answer = _local(config, args, body) if args.local else _remote(config, args, body)
    _print(answer)
    return 0 if status == 200 else 1


def _evaluate_first(args: argparse.Namespace, model: str) -> None:
    """``ehrbridge evaluate`` as its own command would run it: the judged copy is its."""
    from ehrbridge.evaluate import run_evaluate

    run_evaluate(
        argparse.Namespace(
            site=args.site,
            model=model,
            out=args.evaluate,
            events=args.events,
            source=args.source,
            as_of=None,
        )
    )


def _remote(config: SiteConfig, args: argparse.Namespace, body: dict[str, Any]) -> tuple[int, Any]:
    from ehrbridge.adapters.api_client import post_json

    scheme = "https" if config.http.tls else "http"
    base = args.url or f"{scheme}://{config.http.host}:{config.http.port}"
    url = f"{base.rstrip('/')}/api/models/{config.model.name}/mode"
    verify: Any = True
    if args.ca_file:
        import ssl

        verify = ssl.create_default_context(cafile=str(args.ca_file))
    status, answer = post_json(url, body, _token(args), verify)
    if status not in (200, 409):
        raise ConfigError(f"{url}: {status} {answer.get('detail', answer)}")
    return status, answer


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            return str(args.token_file.read_text(encoding="utf-8").strip())
        except OSError as error:
            raise ConfigError(f"{args.token_file}: {error.strerror}") from None
    token = os.environ.get("EHRBRIDGE_TOKEN")
    if not token:
        raise ConfigError("an admin token is needed: --token-file or EHRBRIDGE_TOKEN")
    return token


def _local(config: SiteConfig, args: argparse.Namespace, body: dict[str, Any]) -> tuple[int, Any]:
    from ehrbridge.audit import cli_caller

    promotion = config.evaluation.promotion
    if args.action == PROMOTE and promotion is not None and promotion.shadow_results != "none":
        raise ConfigError("shadow_results: latest needs the running site: promote without --local")
    decision = decide(
        config,
        Caller(cli_caller(), via="cli"),
        args.action,
        reason=body["reason"],
        override=body["override"],
        source=body["source"],
    )
    return (409 if decision.outcome == "refused" else 200), decision.to_json()


def _print(answer: dict[str, Any]) -> None:
    for verdict in answer.get("criteria") or []:
        print(f"  {verdict['criterion']}: {verdict['status']} ({verdict['evidence']})")
    if answer.get("overall"):
        print(f"criteria: {answer['overall']}")
    evidence = answer.get("evidence") or {}
    if evidence.get("sha256"):
        print(f"evidence: {evidence['evaluation']} (as of {evidence.get('as_of')})")
        print(f"  sha256 {evidence['sha256']}, report {evidence.get('report')}")
    if evidence.get("why"):
        print(f"evidence: {evidence['why']}")
    if answer.get("outcome") == "refused":
        print(f"{answer.get('action')} refused: {answer.get('why_refused')}")
    elif answer.get("outcome"):
        print(f"{answer['model']} is now {answer['outcome']} (was {answer.get('previous')})")
        if shadow := evidence.get("shadow_results"):
            skipped = ", ".join(f"{why}: {n}" for why, n in shadow.get("skipped", {}).items())
            print(
                f"shadow results ({shadow['setting']}): {shadow['written']} written"
                + (f"; not written: {skipped}" if skipped else "")
            )
    else:
        print(answer.get("detail", answer))
