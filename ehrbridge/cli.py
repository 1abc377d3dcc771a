"""The ``ehrbridge`` command.

ehrbridge sandbox [--no-traffic]          everything on one laptop, one process
ehrbridge run --config SITE.yaml          run a site (all roles, or --role ...)
ehrbridge config check SITE.yaml          validate a site file
ehrbridge dlq list|show|replay            inspect and replay dead letters
ehrbridge mappings check|test|explain|unmapped   site mappings: lint, tests, explanations
ehrbridge bench SCENARIO [--rate R] [--seconds S] [--json FILE]   benchmarks (bench/)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ehrbridge.pipelines.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from ehrbridge.logs import setup_logging

    setup_logging(getattr(args, "log_level", None))
    try:
        result: int = args.func(args)
        return result
    except ConfigError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehrbridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    sandbox = sub.add_parser("sandbox", help="run the whole system locally with synthetic traffic")
    sandbox.add_argument("--no-traffic", action="store_true", help="do not start the synthetic EHR")
    sandbox.add_argument("--data-dir", type=Path, default=Path(".ehrbridge-sandbox"))
    sandbox.add_argument("--patients", type=int, default=300)
    sandbox.add_argument("--rate", type=float, default=50.0, help="synthetic messages per second")
    sandbox.add_argument("--seed", type=int, default=7)
    sandbox.add_argument("--fresh", action="store_true", help="delete the data dir first")
    from ehrbridge.sandbox.ports import Ports

    for port in dataclasses.fields(Ports):
        flag = "--" + port.name.replace("_", "-") + "-port"
        sandbox.add_argument(flag, type=int, default=port.default, metavar="PORT")
    sandbox.set_defaults(func=_sandbox)

    run = sub.add_parser("run", help="run a site from its YAML config")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument(
        "--role",
        action="append",
        choices=["ingest", "process", "writeback"],
        help="run only these roles (repeatable); default: all",
    )
    run.set_defaults(func=_run)

    config = sub.add_parser("config", help="site configuration tools")
    config_sub = config.add_subparsers(required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a site YAML file")
    check.add_argument("path", type=Path)
    check.set_defaults(func=_config_check)

    from ehrbridge.bench.cli import add_bench_command
    from ehrbridge.dlq import add_dlq_commands
    from ehrbridge.mappings.cli import add_mapping_commands

    add_dlq_commands(sub)
    add_mapping_commands(sub)
    add_bench_command(sub)
    return parser


def _config_check(args: argparse.Namespace) -> int:
    from ehrbridge.config import load_site_config

    config = load_site_config(args.path)
    print(f"{args.path}: ok (site {config.site}, mode {config.mode.value})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ehrbridge.config import load_site_config
    from ehrbridge.runtime import ALL_ROLES, Role, start_when_ready

    config = load_site_config(args.config)
    roles = {Role(r) for r in args.role} if args.role else ALL_ROLES

    async def serve() -> None:
        stop = signal_event()
        runtime = await start_when_ready(config, roles, stop)
        if runtime is None:
            return  # stopped while waiting for the broker
        with contextlib.suppress(NotImplementedError):  # a renewed certificate, at once
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, runtime.reload_certificates
            )
        try:
            await stop.wait()
        finally:
            await runtime.stop()

    asyncio.run(serve())
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from ehrbridge.sandbox.run import run_sandbox

    asyncio.run(run_sandbox(args))
    return 0


def signal_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (in the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    await signal_event().wait()


if __name__ == "__main__":
    raise SystemExit(main())
