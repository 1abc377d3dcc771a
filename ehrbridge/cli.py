"""ehrbridge: puts a clinical prediction model (KFRE) into a hospital's EHR workflow.

It takes lab results in over HL7v2 (MLLP) and FHIR R4, turns each site's codes and
units into model features, calls the model, and writes the risk back as a FHIR
Observation, an ORU^R01 or a CDS Hooks card. Start with `ehrbridge sandbox`.

commands:
  sandbox                                  the whole system on this machine, with a synthetic EHR
  send FILE                                send HL7v2 message(s) over MLLP and print each ACK
  run --config SITE.yaml                   run a site (all roles, or --role ...)
  config check SITE.yaml                   validate a site file
  dlq list|show|replay --config SITE.yaml  inspect and replay dead letters
  audit list|verify --config SITE.yaml     who read which patient's data; check the chain
  cds-token [--audience URL]               a fresh CDS Hooks JWT of the sandbox's EHR
  purge --config SITE.yaml                 delete what the site's retention policy expires
  mappings check|test|explain|unmapped     site mappings: lint, tests, explanations
  bench SCENARIO                           benchmarks (bench/)
  evaluate --site S [--model M] --out DIR  each model's performance at this site: report + JSON
  backfill --site S --from PATH            score history (FHIR Bulk, HL7v2 batch) for evaluate
  promote --site S [--override --reason R] judge the criteria, then switch the model to live
  demote --site S --reason R               switch the model back to shadow

`ehrbridge COMMAND --help` describes each one.
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
from typing import TYPE_CHECKING, Any

from ehrbridge.audit import AuditUnavailable
from ehrbridge.core.errors import ConfigError

if TYPE_CHECKING:
    import ssl

    from ehrbridge.config import SiteConfig


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
    except AuditUnavailable as error:  # no read of patient data without its audit entry
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    summary, _, rest = __doc__.partition("\n\n")
    summary = summary.removeprefix("ehrbridge: ")
    parser = argparse.ArgumentParser(
        prog="ehrbridge",
        description=f"ehrbridge {summary}",
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ehrbridge.core.version import __version__

    parser.add_argument("--version", action="version", version=f"ehrbridge {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        metavar="LEVEL",
        help="DEBUG, INFO (default) or WARNING; logs never carry names, ids or messages",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_sandbox_command(sub)
    _add_send_command(sub)
    cds_token = sub.add_parser(
        "cds-token", help="print a fresh CDS Hooks JWT signed by the sandbox's EHR key"
    )
    cds_token.add_argument("--data-dir", type=Path, default=Path(".ehrbridge-sandbox"))
    cds_token.add_argument(
        "--audience",
        default="http://127.0.0.1:8081/cds-services/kfre-patient-view",
        help="the CDS service URL being called (the JWT's aud)",
    )
    cds_token.set_defaults(func=_cds_token)

    run = sub.add_parser("run", help="run a site from its YAML config")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument(
        "--role",
        action="append",
        choices=["ingest", "process", "writeback"],
        help="run only these roles (repeatable); default: all, in one process or, with "
        "transport.processes: per-role (embedded), one child process per role",
    )
    run.add_argument(
        "--monitoring-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /metrics and /health here (a process without the ingest role); "
        "overrides monitoring.port, for role processes that share one site file",
    )
    run.set_defaults(func=_run)

    purge = sub.add_parser("purge", help="apply the site's retention policy once (for cron)")
    purge.add_argument("--config", type=Path, required=True)
    purge.set_defaults(func=_purge)

    config = sub.add_parser("config", help="site configuration tools")
    config_sub = config.add_subparsers(required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a site YAML file")
    check.add_argument("path", type=Path)
    check.set_defaults(func=_config_check)

    from ehrbridge.audit_cli import add_audit_commands
    from ehrbridge.bench.cli import add_bench_command
    from ehrbridge.dlq import add_dlq_commands
    from ehrbridge.workbench.cli import add_mapping_commands

    add_dlq_commands(sub)
    add_audit_commands(sub)
    add_mapping_commands(sub)
    add_bench_command(sub)
    from ehrbridge.backfill import add_backfill_command
    from ehrbridge.evaluate import add_evaluate_command
    from ehrbridge.promotion_cli import add_promotion_commands

    add_evaluate_command(sub)
    add_backfill_command(sub)
    add_promotion_commands(sub)
    return parser


def _add_sandbox_command(sub: Any) -> None:
    from ehrbridge.sandbox.ports import PORT_ROLES, Ports

    sandbox = sub.add_parser(
        "sandbox",
        help="run the whole system locally with synthetic traffic",
        description="Run the whole system on this machine: a synthetic EHR, the ehrbridge "
        "pipeline, the KFRE model server and a FHIR server standing in for the EHR. "
        "Ctrl-C stops it; its data stays in --data-dir for the next run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sandbox.add_argument("--no-traffic", action="store_true", help="do not start the synthetic EHR")
    sandbox.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".ehrbridge-sandbox"),
        help="where the log, results and the EHR stand-in's resources are kept",
    )
    sandbox.add_argument("--patients", type=int, default=300, help="synthetic patients")
    sandbox.add_argument("--rate", type=float, default=50.0, help="synthetic messages per second")
    sandbox.add_argument("--seed", type=int, default=7, help="seed of the synthetic patients")
    sandbox.add_argument("--fresh", action="store_true", help="delete the data dir first")
    sandbox.add_argument(
        "--models",
        default="kfre-4var,kfre-8var",
        metavar="NAMES",
        help="the shipped models the sandbox site runs side by side, comma-separated",
    )
    sandbox.add_argument(
        "--tls",
        action="store_true",
        help="TLS on the HTTP and MLLP listeners, with a local CA made in <data dir>/tls",
    )
    sandbox.add_argument(
        "--ehr",
        choices=["stand-in", "hapi"],
        default="stand-in",
        help="the EHR's FHIR server: the quick in-process stand-in, or a real HAPI FHIR JPA "
        "server (scripts/hapi start; scripts/sandbox --ehr hapi starts it)",
    )
    sandbox.add_argument(
        "--ehr-url",
        metavar="URL",
        default=argparse.SUPPRESS,  # so that the help names $HAPI_BASE_URL, not None
        help="with --ehr hapi: the server's FHIR base (default: $HAPI_BASE_URL)",
    )
    for port in dataclasses.fields(Ports):
        flag = "--" + port.name.replace("_", "-") + "-port"
        sandbox.add_argument(
            flag, type=int, default=port.default, metavar="PORT", help=PORT_ROLES[port.name]
        )
    sandbox.set_defaults(func=_sandbox)


def _add_send_command(sub: Any) -> None:
    send = sub.add_parser(
        "send",
        help="send HL7v2 message(s) from a file over MLLP and print each ACK",
        description="Send every HL7v2 message in FILE (CR or LF line ends, several messages "
        "allowed) to an MLLP listener, and print each ACK: MSA-1 code, MSA-2 control id, and "
        "the error text. Exit 0 when every message got AA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    send.add_argument("file", type=Path, help="an .hl7 file, or - for standard input")
    send.add_argument("--host", default="127.0.0.1", help="MLLP listener host")
    send.add_argument("--port", type=int, default=2575, help="MLLP listener port")
    send.add_argument(
        "--tls", action="store_true", help="MLLP over TLS, the server verified (system CAs)"
    )
    send.add_argument(
        "--ca-file", type=Path, help="MLLP over TLS, the server verified against this PEM CA"
    )
    send.add_argument("--cert-file", type=Path, help="client certificate, for mTLS")
    send.add_argument("--key-file", type=Path, help="the client certificate's key")
    send.set_defaults(func=_send)


def _send_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """--tls or --ca-file: a verifying client context (adapters/tls.py), else plain TCP."""
    from ehrbridge.adapters.tls import client_context
    from ehrbridge.config import ClientTls

    wanted = args.tls or args.ca_file or args.cert_file or args.key_file
    if not wanted:
        return None
    if (args.cert_file is None) != (args.key_file is None):
        raise ConfigError("give both --cert-file and --key-file, or neither")
    tls = ClientTls(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    return client_context(tls, "--ca-file")


def _send(args: argparse.Namespace) -> int:
    from ehrbridge.adapters.mllp_client import MllpClient
    from ehrbridge.core.errors import UpstreamUnavailable
    from ehrbridge.workbench.messages import split_hl7

    raw = sys.stdin.buffer.read() if str(args.file) == "-" else _read_file(args.file)
    messages = [_segments_with_cr(m) for m in split_hl7(raw)]
    if not messages:
        raise ConfigError(f"{args.file}: no HL7v2 message in it (it should start with MSH)")
    codes = []
    try:
        with MllpClient(args.host, args.port, tls=_send_tls(args)) as client:
            for message in messages:
                ack = client.send(message)
                codes.append(ack.code)
                print(f"{ack.code} {ack.control_id} {ack.text}".rstrip())
    except UpstreamUnavailable as error:
        print(f"error: {error} (is the sandbox or site running?)", file=sys.stderr)
        return 1
    return 0 if all(code == "AA" for code in codes) else 1


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    return path.read_bytes()


def _segments_with_cr(message: bytes) -> bytes:
    """HL7v2 separates segments with CR; files copied from a web page have LF or CRLF."""
    return b"\r".join(line for line in message.splitlines() if line.strip())


def _config_check(args: argparse.Namespace) -> int:
    from ehrbridge.config import describe_model, load_site_config
    from ehrbridge.promotion import effective_mode, mode_path

    config = load_site_config(args.path)
    print(f"{args.path}: ok (site {config.site}, mode {config.mode.value})")
    for model in config.site_models:
        print(f"  model: {describe_model(config, model)}")
    if (mode := effective_mode(config)) is not config.mode:  # the last promote/demote wins
        where = mode_path(config.data_dir, config.model.name)
        print(f"  mode in force: {mode.value}, by the last promote/demote ({where})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ehrbridge.config import load_site_config
    from ehrbridge.runtime import ALL_ROLES, Role, hold_role_locks, signal_event, start_when_ready
    from ehrbridge.supervisor import Supervisor, watch_lifeline

    config = load_site_config(args.config)
    if args.monitoring_port is not None:
        monitoring = config.monitoring.model_copy(update={"port": args.monitoring_port})
        config = config.model_copy(update={"monitoring": monitoring})
    if not args.role and _per_role(config):  # this process supervises one child per role
        return Supervisor(args.config, config, args.log_level).run()
    watch_lifeline()  # a supervised child stops when its supervisor dies
    roles = {Role(r) for r in args.role} if args.role else ALL_ROLES
    locks = hold_role_locks(config, roles)

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

    try:
        asyncio.run(serve())
    finally:
        locks.close()
    return 0


def _per_role(config: SiteConfig) -> bool:
    """An embedded site whose roles run as processes (``transport.processes: per-role``)."""
    from ehrbridge.config import EmbeddedTransport

    transport = config.transport
    return isinstance(transport, EmbeddedTransport) and transport.processes == "per-role"


def _cds_token(args: argparse.Namespace) -> int:
    from ehrbridge.sandbox.credentials import CDS_KEY, cds_token, tokens_dir

    if not (tokens_dir(args.data_dir) / CDS_KEY).exists():
        raise ConfigError(
            f"no sandbox EHR key in {tokens_dir(args.data_dir)}: run the sandbox first"
        )
    print(cds_token(args.data_dir, args.audience))
    return 0


def _purge(args: argparse.Namespace) -> int:
    from ehrbridge.config import load_site_config
    from ehrbridge.runtime import SiteRuntime

    config = load_site_config(args.config)
    runtime = SiteRuntime(config, roles=())  # opens the stores, starts nothing
    try:
        purger = runtime.purger()
        if not purger.enabled:
            print(f"{args.config}: no retention set; nothing purged")
            return 0
        counts = purger.purge()
    finally:
        asyncio.run(runtime.stop())
    print(", ".join(f"{store} {count}" for store, count in counts.items()) + " removed")
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from ehrbridge.sandbox.run import run_sandbox

    asyncio.run(run_sandbox(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
