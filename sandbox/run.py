"""``ehrbridge sandbox``: the whole system on one laptop, in one process.

Starts, in one event loop (plus the pipeline's worker threads):

* the KFRE model server (Open Inference Protocol v2) on 8091;
* a FHIR R4 server stand-in on 8090, playing the hospital's EHR;
* the sandbox site (``sandbox/site.yaml``, live mode, embedded transport):
  MLLP on 2575 and the ehrbridge HTTP API on 8080; from the command line it
  runs KFRE-4 and KFRE-8 side by side and also writes ORU^R01 to the inbox
  (:func:`sandbox_cli_site`);
* a synthetic EHR sending ADT and renal ORU^R01 messages for a few hundred
  synthetic CKD patients over MLLP (``--no-traffic`` turns it off);
* the sandbox FHIR site (``sandbox/site-fhir.yaml``): a hospital whose EHR
  speaks FHIR (Synthea-coded). FHIR ingest, Subscription notifications and
  CDS Hooks on 8081; results go back as FHIR transactions to the stand-in
  and as ORU^R01 over MLLP to
* the EHR's results inbox, an MLLP peer on 2576 that ACKs and files every
  ORU in ``<data dir>/ehr-inbox.hl7``.

:class:`Sandbox` is also what the end-to-end tests start, on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from ehrbridge._http import EmbeddedServer
from ehrbridge.adapters.mllp_client import AsyncMllpClient
from ehrbridge.adapters.tls import server_context
from ehrbridge.config import (
    ApiRole,
    ClientTls,
    ListenerTls,
    MllpTls,
    SiteConfig,
    Writeback,
    load_site_config,
    parse_site_config,
)
from ehrbridge.core.errors import ConfigError
from ehrbridge.datadir import secure_data_dir
from ehrbridge.pipelines.results import Delivery
from ehrbridge.runtime import SiteRuntime
from ehrbridge.sandbox.certs import sandbox_certificates
from ehrbridge.sandbox.credentials import (
    api_token,
    bearer,
    cds_token,
    ensure_credentials,
    tokens_dir,
    with_credentials,
)
from ehrbridge.sandbox.fhir import FhirStore, create_fhir_app
from ehrbridge.sandbox.mllp_peer import MllpPeer, purge_inbox
from ehrbridge.sandbox.model_server import create_model_app
from ehrbridge.sandbox.ports import Ports
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

log = logging.getLogger(__name__)
T = TypeVar("T")
FHIR_JOURNAL = "ehr-fhir-store.log"  # the EHR stand-in's resources, in the data dir


def sandbox_site_file() -> Path:
    return Path(str(resources.files("ehrbridge.sandbox").joinpath("site.yaml")))


def sandbox_fhir_site_file() -> Path:
    return Path(str(resources.files("ehrbridge.sandbox").joinpath("site-fhir.yaml")))


@dataclass
class TrafficStats:
    sent: int = 0
    acks: Counter[str] = field(default_factory=Counter)


Configure = Callable[[SiteConfig], SiteConfig]


def sandbox_cli_site(names: tuple[str, ...]) -> Configure:
    """The site ``ehrbridge sandbox`` runs: the models ``names`` side by side (``--models``),
    each a shipped model file served by the sandbox's model server, in the site's mode and
    calibration; and every result also as ORU^R01 to the EHR's results inbox.

    ``sandbox/site.yaml`` itself lists KFRE-4 and no ORU target, so that a site copied
    from it starts with one model and one write-back; its mapping already supplies
    KFRE-8's analytes. The tests' sandbox (:class:`BackgroundSandbox`) runs the file.
    """

    def configure(config: SiteConfig) -> SiteConfig:
        data = config.model_dump(mode="json", exclude_none=True)
        # The results inbox; the Sandbox points it at its own port (_writeback).
        data["writeback"].setdefault("hl7v2", {"host": "127.0.0.1", "port": 2576})
        if names != (config.model.name,):
            first = data.pop("model")
            first.pop("definition", None)
            shared = {"url": first["url"], "calibration": first["calibration"]}
            data["models"] = [
                first if name == first["name"] else {"name": name, **shared} for name in names
            ]
        return parse_site_config(yaml.safe_dump(data), f"{sandbox_site_file()} (sandbox)")

    return configure


class Sandbox:
    def __init__(
        self,
        data_dir: Path,
        ports: Ports | None = None,
        configure: Configure | None = None,
        *,
        fhir_site: bool = True,
        configure_fhir_site: Configure | None = None,
        tls: bool = False,
        ehr_base: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        # Private (0700) from the start: a data dir made 0755 here would be refused by the
        # site's own check a moment later (ehrbridge/datadir.py).
        secure_data_dir(data_dir)
        # --tls: a local CA and a server certificate, made on first use in <data dir>/tls.
        self.tls = sandbox_certificates(data_dir) if tls else None
        self.ports = ports or Ports()
        self.configure = configure
        self.configure_fhir_site = configure_fhir_site
        self.model = EmbeddedServer(
            create_model_app(), "127.0.0.1", self.ports.model, field="--model-port"
        )
        # ehr_base: a real FHIR server (--ehr hapi) takes the stand-in's place.
        self.ehr_base = ehr_base.rstrip("/") if ehr_base else None
        self.fhir_store: FhirStore | None = None
        self.fhir: EmbeddedServer | None = None
        if self.ehr_base is None:
            # The EHR stand-in keeps its resources in the data dir, as ehrbridge keeps its
            # results there: after a restart both still agree on what was delivered.
            self.fhir_store = FhirStore(data_dir / FHIR_JOURNAL)
            self.fhir = EmbeddedServer(
                create_fhir_app(store=self.fhir_store),
                "127.0.0.1",
                self.ports.fhir,
                field="--fhir-port",
            )
        self.inbox = MllpPeer(
            port=self.ports.ehr_inbox,
            record_to=data_dir / "ehr-inbox.hl7",
            ssl=self._server_ssl(),
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.runtime: SiteRuntime | None = None
        self.with_fhir_site = fhir_site
        self.fhir_runtime: SiteRuntime | None = None
        self.traffic = TrafficStats()

    async def start(self) -> None:
        if self.fhir is None:
            await self._check_ehr()  # before anything binds a port
        ensure_credentials(self.data_dir)
        await self.model.start()
        if self.fhir is not None:
            await self.fhir.start()
        await self.inbox.start()
        self.runtime = SiteRuntime(self._site_config())
        await self.runtime.start()
        if self.with_fhir_site:
            self.fhir_runtime = SiteRuntime(self._fhir_site_config())
            await self.fhir_runtime.start()
        if self.config.retention.inbox_days is not None:
            self._tasks.append(asyncio.create_task(self._purge_inbox()))

    async def _check_ehr(self) -> None:
        """Fail at start, not at the first write-back, when the real EHR does not answer."""
        assert self.ehr_base is not None
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(f"{self.ehr_base}/metadata")
                response.raise_for_status()
        except httpx.HTTPError as error:
            raise ConfigError(
                f"the FHIR server at {self.ehr_base} does not answer "
                f"({type(error).__name__}); start it with scripts/hapi start",
                field="--ehr-url",
            ) from None

    async def _purge_inbox(self) -> None:
        """retention.inbox_days on the results inbox, in the loop that files into it."""
        retention = self.config.retention
        assert retention.inbox_days is not None
        while True:
            older_than = datetime.now(UTC) - timedelta(days=retention.inbox_days)
            if self.inbox.record_to is not None:
                purge_inbox(self.inbox.record_to, older_than)
            await asyncio.sleep(retention.purge_interval_s)

    def _server_ssl(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        return server_context(self._listener_tls(), "sandbox.tls")

    def _listener_tls(self) -> ListenerTls:
        assert self.tls is not None
        return ListenerTls(cert_file=self.tls.cert_file, key_file=self.tls.key_file)

    def _with_tls(self, config: SiteConfig) -> SiteConfig:
        """TLS on both listeners, and the ORU write-back to the inbox over TLS too."""
        if self.tls is None:
            return config
        listener = self._listener_tls()
        mllp_tls = MllpTls(cert_file=listener.cert_file, key_file=listener.key_file)
        hl7v2 = config.writeback.hl7v2
        if hl7v2 is not None:
            hl7v2 = hl7v2.model_copy(update={"tls": ClientTls(ca_file=self.tls.ca_file)})
        return config.model_copy(
            update={
                "mllp": config.mllp.model_copy(update={"tls": mllp_tls}),
                "http": config.http.model_copy(update={"tls": listener}),
                "writeback": config.writeback.model_copy(update={"hl7v2": hl7v2}),
            }
        )

    def client_ssl(self) -> ssl.SSLContext | None:
        """What a client of the sandbox's listeners trusts (the synthetic EHR, tests)."""
        if self.tls is None:
            return None
        return ssl.create_default_context(cafile=self.tls.ca_file)

    def _fhir_site_config(self) -> SiteConfig:
        config = load_site_config(sandbox_fhir_site_file())
        writeback = config.writeback
        hl7v2 = writeback.hl7v2
        config = config.model_copy(
            update={
                "data_dir": self.data_dir / config.site,
                "mllp": config.mllp.model_copy(update={"port": self.ports.fhir_site_mllp}),
                "http": config.http.model_copy(update={"port": self.ports.fhir_site_http}),
                "model": config.model.model_copy(update={"url": self.model_url}),
                "writeback": writeback.model_copy(
                    update={
                        "fhir_base": self.fhir_base,
                        "hl7v2": hl7v2.model_copy(update={"port": self.inbox.port})
                        if hl7v2 is not None
                        else None,
                    }
                ),
                "subscriptions": config.subscriptions.model_copy(
                    update={"fhir_base": self.fhir_base}
                ),
            }
        )
        config = with_credentials(config, self.data_dir)
        config = self._with_tls(config)
        # Last, so that tests can point any part elsewhere (a fake FHIR server, auth).
        return self.configure_fhir_site(config) if self.configure_fhir_site else config

    def _site_config(self) -> SiteConfig:
        config = with_credentials(load_site_config(sandbox_site_file()), self.data_dir)
        if self.configure is not None:
            config = self.configure(config)
        config = config.model_copy(
            update={
                "data_dir": self.data_dir,
                "mllp": config.mllp.model_copy(update={"port": self.ports.mllp}),
                "http": config.http.model_copy(update={"port": self.ports.http}),
                "model": config.model.model_copy(update={"url": self.model_url}),
                # The sandbox's model server serves every model the sandbox site runs.
                "models": [m.model_copy(update={"url": self.model_url}) for m in config.models],
                "writeback": self._writeback(config),
            }
        )
        return self._with_tls(config)

    def _writeback(self, config: SiteConfig) -> Writeback:
        """To the FHIR stand-in; ORU^R01s, when the site sends them, to the results inbox."""
        hl7v2 = config.writeback.hl7v2
        if hl7v2 is not None:
            hl7v2 = hl7v2.model_copy(update={"port": self.inbox.port})
        return config.writeback.model_copy(update={"fhir_base": self.fhir_base, "hl7v2": hl7v2})

    def headers(self, role: ApiRole | str = ApiRole.ADMIN) -> dict[str, str]:
        """``Authorization`` for the sandbox's API token of ``role``."""
        return bearer(self.data_dir, role)

    def cds_headers(self, service_url: str, **claims: object) -> dict[str, str]:
        """``Authorization`` with a fresh JWT of the sandbox EHR for the CDS service's URL."""
        return {"Authorization": f"Bearer {cds_token(self.data_dir, service_url, **claims)}"}

    @property
    def config(self) -> SiteConfig:
        assert self.runtime is not None
        return self.runtime.config

    @property
    def model_url(self) -> str:
        return f"http://127.0.0.1:{self.model.port}"

    @property
    def fhir_base(self) -> str:
        """The EHR's FHIR base: the stand-in's, or the real server's (``--ehr hapi``)."""
        if self.ehr_base is not None:
            return self.ehr_base
        assert self.fhir is not None
        return f"http://127.0.0.1:{self.fhir.port}/fhir"

    @property
    def api_url(self) -> str:
        assert self.runtime is not None and self.runtime.http is not None
        return f"{self.runtime.http.scheme}://127.0.0.1:{self.runtime.http_port}"

    @property
    def mllp_port(self) -> int:
        assert self.runtime is not None
        return self.runtime.mllp_port

    @property
    def fhir_site_url(self) -> str:
        """The FHIR site's API: ``/fhir`` ingest, ``/cds-services``, ``/api/results``."""
        assert self.fhir_runtime is not None and self.fhir_runtime.http is not None
        return f"{self.fhir_runtime.http.scheme}://127.0.0.1:{self.fhir_runtime.http_port}"

    async def send_synthetic_traffic(
        self, ehr: SyntheticEhr, rate: float, *, live_after_backfill: bool = True
    ) -> None:
        """Replay the synthetic history at ``rate`` msg/s, then keep sending new labs."""
        client = AsyncMllpClient("127.0.0.1", self.mllp_port, tls=self.client_ssl())
        interval = 1.0 / rate if rate > 0 else 0.0
        try:
            for _, message in ehr.stream():
                await self._send(client, message)
                await asyncio.sleep(interval)
            rng = random.Random(1)
            while live_after_backfill:
                patient = rng.choice(ehr.patients)
                await self._send(client, ehr.oru(patient, datetime.now(UTC)))
                await asyncio.sleep(max(interval, 1.0))
        finally:
            await client.close()

    async def _send(self, client: AsyncMllpClient, message: bytes) -> None:
        ack = await client.send(message)
        self.traffic.sent += 1
        self.traffic.acks[ack.code] += 1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.fhir_runtime is not None:
            await self.fhir_runtime.stop()
        if self.runtime is not None:
            await self.runtime.stop()
        await self.inbox.stop()
        if self.fhir is not None:
            await self.fhir.stop()
        if self.fhir_store is not None:
            self.fhir_store.close()
        await self.model.stop()


async def count_observations(fhir_base: str) -> int:
    """How many Observations the EHR holds.

    HAPI leaves ``Bundle.total`` out of searchsets unless asked for an accurate
    one, and answers a repeated search from a cache for up to a minute unless
    told ``Cache-Control: no-cache`` (README, Write-back to a real FHIR server).
    """
    params = {"_summary": "count", "_total": "accurate"}
    async with httpx.AsyncClient(timeout=30, headers={"Cache-Control": "no-cache"}) as client:
        response = await client.get(f"{fhir_base}/Observation", params=params)
        response.raise_for_status()
        return int(response.json()["total"])


def example_message_file() -> Path:
    """The ORU^R01 the banner and the README show (``examples/oru-r01-sandbox.hl7``)."""
    return Path(str(resources.files("ehrbridge.sandbox").joinpath("oru-r01-example.hl7")))


def _shown(path: Path) -> str:
    """A path as the user would type it from here: relative when under the current folder."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def banner(sandbox: Sandbox, traffic: bool) -> str:
    runtime = sandbox.runtime
    assert runtime is not None
    lines = [
        "",
        f"ehrbridge sandbox is running: site '{runtime.config.site}', "
        f"{runtime.config.mode.value} mode, {runtime.config.transport.kind} transport",
        f"  MLLP listener       127.0.0.1:{sandbox.mllp_port}   (send HL7v2 ADT / ORU^R01 here)",
        f"  risk Observations   {sandbox.fhir_base}/Observation   <- {_ehr_name(sandbox)}",
        f"  ehrbridge API       {sandbox.api_url}/api/results   (also /health, /api/dlq, /docs)",
        f"  operator console    {sandbox.api_url}/console   (sign in with a token, below)",
        f"  Prometheus metrics  {sandbox.api_url}/metrics   (also /health/ready, /api/monitoring)",
        f"  model server        {sandbox.model_url}/v2/models/{{name}}   (site models: "
        f"{', '.join(model.name for model in runtime.config.site_models)})",
        f"  data                {sandbox.data_dir}",
    ]
    if sandbox.fhir_runtime is not None:
        site = sandbox.fhir_site_url
        lines += [
            f"FHIR site '{sandbox.fhir_runtime.config.site}' (a FHIR-speaking EHR, Synthea-coded):",
            f"  FHIR ingest         {site}/fhir   (POST a Synthea patient Bundle here)",
            f"  CDS Hooks           {site}/cds-services",
            f"  ORU results inbox   127.0.0.1:{sandbox.inbox.port} -> "
            f"{sandbox.data_dir / 'ehr-inbox.hl7'}",
        ]
    if sandbox.tls is not None:
        lines += [
            f"TLS on (--tls): trust the sandbox's local CA {sandbox.tls.ca_file}",
            f"  curl --cacert {sandbox.tls.ca_file} {sandbox.api_url}/api/results",
            f"  MLLP: openssl s_client -CAfile {sandbox.tls.ca_file} "
            f"-connect 127.0.0.1:{sandbox.mllp_port}",
        ]
    if traffic:
        lines.append("  synthetic EHR       sending ADT + renal ORU^R01 over MLLP (Ctrl-C stops)")
    else:
        lines.append("  synthetic EHR       off (--no-traffic)")
    calls = [*_how_to_call(sandbox), *_send_your_own(sandbox), *_kept(sandbox)]
    return "\n".join([*lines, *calls]) + "\n"


def _ehr_name(sandbox: Sandbox) -> str:
    if sandbox.ehr_base is None:
        return "the EHR stand-in; look here"
    return "the real FHIR server (--ehr hapi); look here"


def _send_your_own(sandbox: Sandbox) -> list[str]:
    """How to send a first message by hand: PID-3 must carry the site's assigning authority."""
    patient = sandbox.config.mapping.patient
    cli = _shown(Path(sys.executable).parent / "ehrbridge")
    example = example_message_file().read_text().splitlines()
    port = "" if sandbox.mllp_port == Ports.mllp else f" --port {sandbox.mllp_port}"
    if sandbox.tls is not None:  # --tls: the listener takes TLS only
        port += f" --ca-file {_shown(sandbox.tls.ca_file)}"
    return [
        "",
        f"Send your own HL7v2 to port {sandbox.mllp_port}. PID-3 needs an identifier "
        f"^^^{patient.assigning_authority}^{patient.type_code}; an ORU^R01 to copy "
        "(examples/oru-r01-sandbox.hl7):",
        *(f"  {segment}" for segment in example),
        f"  {cli} send examples/oru-r01-sandbox.hl7{port}     (prints the ACK)",
        f"  {cli} mappings explain --site {_shown(sandbox_site_file())} FILE"
        "   (what the site does with each OBX)",
        f"  {_data_dir_env(sandbox)}{cli} dlq list --config {_shown(sandbox_site_file())}"
        "   (messages that got AE or AR, with the reason)",
    ]


def _data_dir_env(sandbox: Sandbox) -> str:
    """What makes a command given sandbox/site.yaml read this run's data dir."""
    named = load_site_config(sandbox_site_file()).data_dir.resolve()
    return "" if named == sandbox.data_dir.resolve() else f"EHRBRIDGE_DATA_DIR={sandbox.data_dir} "


def _kept(sandbox: Sandbox) -> list[str]:
    """What outlives Ctrl-C, and a warning when the EHR lost what ehrbridge delivered."""
    if sandbox.fhir_store is None:
        return [
            "",
            f"Kept across restarts, in {_shown(sandbox.data_dir)}: ehrbridge's log, results, "
            f"patient state and dead letters. The FHIR server at {sandbox.fhir_base} keeps its "
            "own data (scripts/hapi reset empties HAPI's). --fresh starts ehrbridge over.",
        ]
    lines = [
        "",
        f"Kept across restarts, in {_shown(sandbox.data_dir)}: ehrbridge's log, results, patient "
        f"state and dead letters, and the EHR stand-in's resources ({FHIR_JOURNAL}). "
        "--fresh starts over.",
    ]
    assert sandbox.runtime is not None
    delivered = sandbox.runtime.results.count(Delivery.DELIVERED)
    if delivered and not sandbox.fhir_store.counts().get("Observation"):
        lines.append(
            f"WARNING: {delivered} result(s) were delivered by an earlier run, but the EHR "
            f"stand-in holds none (its store {FHIR_JOURNAL} is missing): run with --fresh."
        )
    return lines


def _how_to_call(sandbox: Sandbox) -> list[str]:
    """The API needs a token: where the sandbox's are, and a call to copy."""
    tokens = tokens_dir(sandbox.data_dir)
    cli = _shown(Path(sys.executable).parent / "ehrbridge")
    lines = [
        "",
        f"API tokens (one per role: viewer, operator, admin, sender) in {tokens}/",
        f'  curl -H "Authorization: Bearer $(cat {tokens}/viewer)" {sandbox.api_url}/api/results',
        f"Console login {sandbox.api_url}/console/login with the operator token "
        f"{api_token(sandbox.data_dir, ApiRole.OPERATOR)}",
    ]
    if sandbox.fhir_runtime is not None:
        hook = f"{sandbox.fhir_site_url}/cds-services/kfre-patient-view"
        lines += [
            "CDS Hooks calls need a JWT of the sandbox EHR: "
            f"{cli} cds-token --data-dir {sandbox.data_dir} --audience {hook}",
        ]
    return lines


async def run_sandbox(args: argparse.Namespace) -> None:
    from ehrbridge.runtime import wait_for_signal

    data_dir: Path = args.data_dir.resolve()
    if args.fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    if data_dir.exists():  # made 0755 by an older version; the sandbox owns it
        data_dir.chmod(0o700)
    ports = Ports(**{port.name: getattr(args, f"{port.name}_port") for port in fields(Ports)})
    models = tuple(name.strip() for name in args.models.split(",") if name.strip())
    sandbox = Sandbox(
        data_dir, ports, sandbox_cli_site(models), tls=args.tls, ehr_base=ehr_base_of(args)
    )
    await sandbox.start()
    print(banner(sandbox, not args.no_traffic), flush=True)
    tasks = [asyncio.create_task(_report_progress(sandbox))]  # your own messages count too
    if not args.no_traffic:
        ehr = SyntheticEhr(seed=args.seed, patients=args.patients)
        tasks.append(asyncio.create_task(sandbox.send_synthetic_traffic(ehr, args.rate)))
    try:
        await wait_for_signal()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await sandbox.stop()


def ehr_base_of(args: argparse.Namespace) -> str | None:
    """The real FHIR server's base for ``--ehr hapi`` (None: the stand-in)."""
    if args.ehr == "stand-in":
        return None
    base: str | None = getattr(args, "ehr_url", None) or os.environ.get("HAPI_BASE_URL")
    if not base:
        raise ConfigError(
            "--ehr hapi needs the server's FHIR base: start it with scripts/hapi start "
            "(scripts/sandbox --ehr hapi does) and pass --ehr-url URL or set HAPI_BASE_URL",
            field="--ehr",
        )
    return base


async def _report_progress(sandbox: Sandbox, every_s: float = 5.0) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        print(f"[{time.monotonic() - started:5.0f}s] {await progress(sandbox)}", flush=True)


async def progress(sandbox: Sandbox) -> str:
    """One progress line: what the sandbox site answered (every sender) and what reached the EHR."""
    stored = await count_observations(sandbox.fhir_base)
    runtime = sandbox.runtime
    assert runtime is not None and runtime.mllp is not None
    acks = runtime.mllp.acks  # every sender's messages: the synthetic EHR's and yours
    stage = runtime.process_stage
    waiting = stage.not_enough_data if stage else 0
    outside = stage.out_of_domain if stage else 0
    return (
        f"synthetic EHR sent {sandbox.traffic.sent}; MLLP answers to all senders: "
        f"AA {acks['AA']}, AE {acks['AE']}, AR {acks['AR']}; "
        f"risk Observations in the EHR: {stored}; "
        f"ORUs in the results inbox: {len(sandbox.inbox.messages())}; "
        f"messages without enough data for a score yet: {waiting}; "
        f"outside the model's validated domain (not scored): {outside}"
    )


class BackgroundSandbox:
    """A :class:`Sandbox` running in its own thread and event loop.

    For synchronous callers -- the tests and the benchmarks -- that want the
    real servers on real sockets without managing an event loop.
    """

    def __init__(
        self,
        data_dir: Path,
        ports: Ports | None = None,
        configure: Configure | None = None,
        *,
        fhir_site: bool = True,
        configure_fhir_site: Configure | None = None,
        tls: bool = False,
        ehr_base: str | None = None,
    ) -> None:
        self.sandbox = Sandbox(
            data_dir,
            ports or Ports.free(),
            configure,
            fhir_site=fhir_site,
            configure_fhir_site=configure_fhir_site,
            tls=tls,
            ehr_base=ehr_base,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="sandbox")

    def start(self) -> BackgroundSandbox:
        self._thread.start()
        self.call(self.sandbox.start(), timeout_s=60)
        return self

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
        """Run a coroutine on the sandbox's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def stop(self) -> None:
        try:
            self.call(self.sandbox.stop(), timeout_s=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> BackgroundSandbox:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
