"""Wiring: one site's components, started and stopped together.

``SiteRuntime`` builds the log, stores and stages from a :class:`SiteConfig`
and runs the roles asked of it:

* ``ingest``: the MLLP listener and the HTTP API; stores inbound messages
  on ``raw`` (or the DLQ) and ACKs them;
* ``process``: the processing worker (raw → predictions);
* ``writeback``: the write-back worker (predictions → result store, EHR)
  and the delayed-retry forwarder.

All roles in one process is the default (and the sandbox). Each role can
also run in its own processes (``ehrbridge run --role``), scaled out on the
Kafka transport. A process builds only what its roles use: the stores open on
first use, and the adapters the site config names (``transport.kind``, the
write-back targets) come from ``ehrbridge.adapters.REGISTRY``, imported then.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ehrbridge._http import EmbeddedServer
from ehrbridge.adapters import load
from ehrbridge.adapters.fhir_client import FhirReader
from ehrbridge.adapters.mllp_source import MllpSource
from ehrbridge.adapters.patient_links import PatientLinks
from ehrbridge.adapters.smart_auth import token_source
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.adapters.subscription_ledger import SubscriptionLedger
from ehrbridge.adapters.tls import CertificateReloader, httpx_verify
from ehrbridge.audit import AuditTrail
from ehrbridge.auth import Authenticator
from ehrbridge.cds_auth import CdsClientAuth
from ehrbridge.config import KafkaTransport, Mode, ModelEndpoint, SiteConfig
from ehrbridge.core.contracts import Sink, Stage
from ehrbridge.core.errors import ConfigError, TransientError
from ehrbridge.datadir import secure_data_dir
from ehrbridge.monitoring import SiteMonitoring, tcp_check, url_check
from ehrbridge.pipelines.groupcommit import GroupCommitter
from ehrbridge.pipelines.ingest import Ingest
from ehrbridge.pipelines.process import ProcessStage
from ehrbridge.pipelines.retry import (
    DelayedRetryForwarder,
    FailureRouter,
    RetryingSink,
    RetryingStage,
)
from ehrbridge.pipelines.state import StateStore
from ehrbridge.pipelines.transport import Consumer, Record, topic_name
from ehrbridge.pipelines.worker import StageWorker
from ehrbridge.pipelines.writeback import WritebackStage
from ehrbridge.pipelines.writeback_requests import FHIR_TARGET, HL7V2_TARGET
from ehrbridge.promotion import ModeSwitch, mode_path
from ehrbridge.retention import Purger
from ehrbridge.stores import audit_dir, open_log, unlock_stores

if TYPE_CHECKING:
    from ehrbridge.adapters.kafka_log import KafkaLog
    from ehrbridge.adapters.kafka_state import ChangelogStateStore
    from ehrbridge.api import ApiParts
    from ehrbridge.fhir_api import FhirEndpoint

log = logging.getLogger(__name__)


class Role(StrEnum):
    INGEST = "ingest"
    PROCESS = "process"
    WRITEBACK = "writeback"


ALL_ROLES = frozenset(Role)


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


def hold_role_locks(config: SiteConfig, roles: Iterable[Role]) -> contextlib.ExitStack:
    """Each role of an embedded site in one process at a time; released by ``close()``.

    On the embedded log a consumer group has one member, which reads every
    record: a second processing (or write-back) process on the same files would
    do all the work again, and two ingest processes would both bind the ports.
    Kafka shares a group's partitions among its members, so there nothing is held.
    The locks are ``flock``s, dropped by the kernel when the process dies (kill -9).
    """
    held = contextlib.ExitStack()
    if isinstance(config.transport, KafkaTransport):
        return held
    folder = secure_data_dir(config.data_dir) / "roles"
    folder.mkdir(mode=0o700, exist_ok=True)
    for role in sorted(roles):
        lock = held.enter_context((folder / f"{role}.lock").open("a"))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            held.close()
            raise ConfigError(
                f"another process already runs the {role} role of site {config.site} on "
                f"{config.data_dir} (embedded transport: one process per role; scale out "
                "on Kafka)",
                field="data_dir",
            ) from exc
    return held


async def start_when_ready(
    config: SiteConfig, roles: Iterable[Role], stop: asyncio.Event, max_delay_s: float = 30.0
) -> SiteRuntime | None:
    """A started site, once what it needs is reachable; None if ``stop`` is set first.

    A role that needs the broker at start (processing restores state, every
    consumer joins its group) waits for it, trying again with a growing delay,
    so that a site can start before Kafka does (boot order, a broker restart).
    Anything but an outage (a config error, a port in use) fails at once.
    """
    delay = 1.0
    while not stop.is_set():
        runtime: SiteRuntime | None = None
        try:
            runtime = SiteRuntime(config, roles)
            await runtime.start()
            return runtime
        except TransientError as error:
            log.warning(
                "site %s cannot start yet: %s; trying again in %.0f s", config.site, error, delay
            )
            if runtime is not None:
                await runtime.stop()
        except BaseException:
            if runtime is not None:  # stop what did start
                await runtime.stop()
            raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, max_delay_s)
    return None


class SiteRuntime:
    def __init__(self, config: SiteConfig, roles: Iterable[Role] = ALL_ROLES) -> None:
        self.config = config
        self.roles = frozenset(roles)
        secure_data_dir(config.data_dir)
        if isinstance(config.transport, KafkaTransport) and config.transport.state_dir:
            secure_data_dir(config.transport.state_dir, "transport.state_dir")
        unlock_stores(config)
        self.log = open_log(config)
        self.changelog_state: ChangelogStateStore | None = None  # kafka transport only
        self.audit = AuditTrail(audit_dir(config))  # who read which patient's data
        self.router = FailureRouter(config.site, config.retry)
        self.stop_event = threading.Event()
        self.workers: list[StageWorker] = []
        self._threads: list[threading.Thread] = []
        self._closers: list[Callable[[], None]] = []
        self.mllp: MllpSource | None = None
        self.http: EmbeddedServer | None = None
        self.committer: GroupCommitter | None = None
        self.ingest: Ingest | None = None  # ingest role
        self.process_stage: ProcessStage | None = None
        self.fhir: FhirEndpoint | None = None  # the FHIR ingest endpoint (ingest role)
        self.authenticator: Authenticator | None = None  # API credentials (ingest role)
        self.writeback_targets: dict[str, Sink] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.monitoring = SiteMonitoring(config, self.roles)
        self.monitoring.add_check("log", lambda: self.log.unready(self.topic("raw")))

    def _opened(self, store: Any) -> Any:
        self._closers.append(store.close)
        return store

    @functools.cached_property
    def results(self) -> SqliteResultStore:
        """Written by the write-back role; read by the API, CDS Hooks and the purge."""
        return cast(SqliteResultStore, self._opened(SqliteResultStore(self._data("results"))))

    @functools.cached_property
    def patient_links(self) -> PatientLinks:
        """Identifiers FHIR ingest has seen together; read by CDS Hooks (ingest role)."""
        return cast(PatientLinks, self._opened(PatientLinks(self._data("patient_links"))))

    @functools.cached_property
    def state(self) -> StateStore:
        """Per-patient state as the processing role keeps it (``transport.kind``).

        Embedded: one SQLite file that every process of the site shares. Kafka:
        the processing role's store, one file per partition restored from the
        compacted changelog as partitions are assigned.
        """
        transport = self.config.transport
        store_class = load("state", transport.kind)
        if not isinstance(transport, KafkaTransport):
            return cast(StateStore, self._opened(store_class(self._data("state"))))
        state_dir = transport.state_dir or self.config.data_dir / "state-kafka"
        changelog = store_class(
            state_dir, self.log, self.topic("state-changelog"), input_topic=self.topic("raw")
        )
        self.changelog_state = changelog
        return cast(StateStore, self._opened(changelog))

    def readable_state(self) -> StateStore | None:
        """The patient state this process can answer from; None if it has none.

        On Kafka an ingest-only process keeps no state (the processing role's
        partitions live elsewhere), so it serves no ``/api/patients``.
        """
        if self.config.transport.kind == "kafka" and Role.PROCESS not in self.roles:
            return None
        return self.state

    def _data(self, name: str) -> Path:
        return self.config.data_dir / f"{name}.sqlite"

    def topic(self, name: str) -> str:
        return topic_name(self.config.site, name)

    async def start(self) -> None:
        if Role.INGEST in self.roles:
            await self._start_ingest()
        if Role.PROCESS in self.roles:
            self._start_processing()
        if Role.WRITEBACK in self.roles:
            self._start_writeback()
        await self.monitoring.start(serve_http=Role.INGEST not in self.roles)
        log.info(
            "site %s started: roles=%s mode=%s transport=%s",
            self.config.site,
            ",".join(sorted(self.roles)),
            self.config.mode.value,
            self.config.transport.kind,
        )

    async def _start_ingest(self) -> None:
        from ehrbridge.api import create_api

        auth = Authenticator(self.config.auth)  # a missing secret stops the start here
        self._closers.append(auth.close)
        self.authenticator = auth
        self.committer = GroupCommitter(self.log)
        metrics = self.monitoring.metrics
        ingest = self.ingest = Ingest(self.config, self.committer, metrics)
        self.fhir = self._fhir_endpoint(ingest, auth)
        self.fhir.start()
        self.mllp = MllpSource(self.config.mllp, self.config.site)
        metrics.filtered = lambda: ingest.message_types.filtered
        metrics.mllp_stats = self.mllp.stats.snapshot
        await self.mllp.start(ingest.deliver)
        http = self.config.http
        parts = self.api_parts(auth)
        if parts.state is None and self.config.cds_hooks.enabled:
            self._warn_blind_to_domain()
        app = create_api(parts)
        self.http = EmbeddedServer(app, http.host, http.port, field="http.port", tls=http.tls)
        await self.http.start()
        if self.certificate_reloaders:
            self._tasks.append(asyncio.create_task(self._watch_certificates()))

    def _warn_blind_to_domain(self) -> None:
        # A CDS card or the risk page must withhold a score once the patient's newest record
        # falls outside the model's domain, read from the patient state, which this process
        # does not hold: so its hook answers no card and its risk page is a 404 (fail-safe).
        # Said once at start, so the operator can move CDS Hooks where the state is.
        log.warning(
            "This process cannot see the patient state (%s transport, roles %s): its CDS "
            "Hooks service answers every patient with no card and its risk page is not "
            "served. Serve them from a process that also runs the process role.",
            self.config.transport.kind,
            ",".join(sorted(self.roles)),
        )

    def api_parts(self, auth: Authenticator) -> ApiParts:
        """What this process's API answers from: only what its roles keep."""
        from ehrbridge.api import ApiParts

        return ApiParts(
            config=self.config,
            auth=auth,
            cds_clients=self._cds_clients(),
            monitoring=self.monitoring,
            results=self.results,
            log=self.log,
            audit=self.audit,
            patient_links=self.patient_links,
            state=self.readable_state(),
            roles=frozenset(role.value for role in self.roles),
            fhir=self.fhir,
            counts=self._health_counts,
        )

    @property
    def certificate_reloaders(self) -> list[CertificateReloader]:
        listeners = (self.mllp, self.http)
        return [x.reloader for x in listeners if x is not None and x.reloader is not None]

    def reload_certificates(self) -> int:
        """Load every listener's certificate again (SIGHUP); how many were reloaded."""
        return sum(reloader.reload() for reloader in self.certificate_reloaders)

    async def _watch_certificates(self) -> None:
        """Reload a listener's certificate when its files change (a renewal, e.g. certbot)."""
        period = min(r.tls.reload_s for r in self.certificate_reloaders)
        while True:
            await asyncio.sleep(period)
            for reloader in self.certificate_reloaders:
                reloader.check()

    def _cds_clients(self) -> CdsClientAuth:
        clients = CdsClientAuth(self.config.cds_hooks)
        self._closers.append(clients.close)
        return clients

    def _fhir_endpoint(self, ingest: Ingest, callers: Authenticator) -> FhirEndpoint:
        """FHIR REST and Subscription ingest; id-only notifications read from the EHR."""
        from ehrbridge.fhir_api import FhirEndpoint

        subs, wb = self.config.subscriptions, self.config.writeback
        ledger = SubscriptionLedger(self.config.data_dir / "subscriptions.sqlite")
        self._closers.append(ledger.close)
        reader = None
        base = subs.fhir_base or wb.fhir_base
        if base:
            field = "subscriptions.tls" if subs.tls else "writeback.tls"
            verify = httpx_verify(subs.tls or wb.tls, field)
            auth = token_source(subs.auth or wb.auth, base, timeout_s=subs.timeout_s, verify=verify)
            reader = FhirReader(
                base, timeout_s=subs.timeout_s, auth=auth, stop=self.stop_event, verify=verify
            )
            self._closers.append(reader.close)
            if auth is not None:
                self._closers.append(auth.close)
        return FhirEndpoint(self.config, ingest, self.patient_links, ledger, callers, reader=reader)

    def _start_processing(self) -> None:
        model = self._model_client(self.config.model, "model")
        others = {
            endpoint.name: self._model_client(endpoint, f"model.{endpoint.name}")
            for endpoint in self.config.site_models[1:]
        }
        stage = ProcessStage(self.config, self.state, model, self.monitoring.metrics, others)
        self.process_stage = stage
        if self.changelog_state is None:
            self._worker("process", [self.topic("raw")], stage, self.topic("predictions"))
            return
        self._start_changelog_worker(stage, self.changelog_state)

    def _model_client(self, endpoint: ModelEndpoint, check: str) -> Any:
        """One model's client (its readiness a check of its own), closed on stop."""
        kind = "oip-v2" if endpoint.definition is None else "declared"
        client = self._opened(load("model", kind)(endpoint))
        self.monitoring.add_check(
            check, lambda: None if client.ready() else f"not ready at {endpoint.url}"
        )
        return client

    def _start_changelog_worker(self, stage: ProcessStage, state: ChangelogStateStore) -> None:
        """Per-partition state, restored from the changelog whenever partitions arrive."""
        kafka = cast("KafkaLog", self.log)
        consumer = kafka.consumer(self.topic("process"), [self.topic("raw")], state.restore)
        self._worker(
            "process",
            [self.topic("raw")],
            stage,
            self.topic("predictions"),
            consumer=consumer,
            side_outputs=state.drain,
        )

    def _start_writeback(self) -> None:
        # Targets are built whenever configured, in shadow too: a promotion switches the
        # running stage to live (ehrbridge/promotion.py) without a restart.
        wb = self.config.writeback
        if wb.fhir_base or wb.hl7v2 is not None:
            self.writeback_targets = self._writeback_targets()
        mode = ModeSwitch(self.config)
        self._say_which_mode(mode())
        modes = {m.name: ModeSwitch(self.config, m.name) for m in self.config.site_models[1:]}
        stage = WritebackStage(
            self.config,
            self.results,
            self.writeback_targets,
            self.monitoring.metrics,
            mode,
            modes=modes,
        )
        # A shadow site's readiness does not hang on the EHR.
        if any(m() is Mode.LIVE for m in stage.modes.values()):
            self._check_writeback_targets()
        # In-place retries sit around each sink (RetryingSink), where the call is; a
        # RetryingStage around the stage as well would multiply the attempts.
        self._worker("writeback", [self.topic("predictions")], stage, None, retry_in_place=False)
        forwarder = DelayedRetryForwarder(self.log, self.router, self.stop_event)
        self._thread("retry-forwarder", forwarder.run)
        purger = self.purger()
        if purger.enabled:  # where results are written: one purging process per site
            self._thread("purge", lambda: purger.run(self.stop_event))

    def _say_which_mode(self, mode: Mode) -> None:
        if mode is not self.config.mode:
            log.warning(
                "model %s runs %s by its last promote/demote decision (%s); the site file says %s",
                self.config.model.name,
                mode.value,
                mode_path(self.config.data_dir, self.config.model.name),
                self.config.mode.value,
            )

    def purger(self) -> Purger:
        """This site's retention purge (``retention:``) over its log and result store."""
        config = self.config
        tiers = len(config.retry.delayed_s)
        return Purger(
            config.site, config.retention, self.log, self.results, tiers, audit=self.audit
        )

    def _check_writeback_targets(self) -> None:
        wb = self.config.writeback
        if FHIR_TARGET in self.writeback_targets and wb.fhir_base:
            self.monitoring.add_check("writeback.fhir", url_check(wb.fhir_base))
        if HL7V2_TARGET in self.writeback_targets and wb.hl7v2 is not None:
            self.monitoring.add_check("writeback.hl7v2", tcp_check(wb.hl7v2.host, wb.hl7v2.port))

    def _health_counts(self) -> dict[str, Any]:
        """What /health adds per role: not scored (processing), MLLP and filtered (ingest)."""
        counts: dict[str, Any] = {"not_scored": None}
        if self.process_stage is not None:
            stage = self.process_stage
            # out_of_domain: outside the model's validated domain (pipelines/domain.py).
            counts["not_scored"] = {
                "not_enough_data": stage.not_enough_data,
                "out_of_domain": stage.out_of_domain,
            }
        if self.mllp is not None:
            counts["mllp"] = self.mllp.stats.snapshot()
        if self.ingest is not None:
            counts["filtered"] = dict(sorted(self.ingest.message_types.filtered.items()))
        return counts

    def _writeback_targets(self) -> dict[str, Sink]:
        """FHIR transactions and/or HL7v2 ORU over MLLP, as the site config names them."""
        wb = self.config.writeback
        targets: dict[str, Sink] = {}
        if wb.fhir_base:
            verify = httpx_verify(wb.tls, "writeback.tls")
            auth = token_source(wb.auth, wb.fhir_base, timeout_s=wb.timeout_s, verify=verify)
            if auth is not None:
                self._closers.append(auth.close)
            targets[FHIR_TARGET] = load("sink", FHIR_TARGET)(
                wb.fhir_base,
                timeout_s=wb.timeout_s,
                auth=auth,
                results_per_request=wb.results_per_request,
                verify=verify,
            )
        if wb.hl7v2 is not None:
            targets[HL7V2_TARGET] = load("sink", HL7V2_TARGET)(wb.hl7v2)
        self._closers.extend(sink.close for sink in targets.values())
        retry, stop = self.config.retry, self.stop_event
        return {name: RetryingSink(sink, retry, stop) for name, sink in targets.items()}

    def _worker(
        self,
        group: str,
        topics: list[str],
        stage: Stage,
        output: str | None,
        *,
        consumer: Consumer | None = None,
        side_outputs: Callable[[], list[Record]] | None = None,
        retry_in_place: bool = True,
    ) -> None:
        if retry_in_place:
            stage = RetryingStage(stage, self.config.retry, self.stop_event)
        worker = StageWorker(
            log_=self.log,
            group=self.topic(group),  # consumer groups are per site, like topics
            topics=topics,
            stage=stage,
            output_topic=output,
            router=self.router,
            stop=self.stop_event,
            consumer=consumer,
            side_outputs=side_outputs,
            metrics=self.monitoring.metrics,
        )
        lag = getattr(worker.consumer, "lag", None)
        if isinstance(lag, dict):  # a Kafka group member measures its own lag
            self.monitoring.metrics.lag_sources.append(lambda: getattr(worker.consumer, "lag", {}))
        self.workers.append(worker)
        self._thread(group, worker.run)

    def _thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"{self.config.site}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def mllp_port(self) -> int:
        assert self.mllp is not None and self.mllp.port is not None
        return self.mllp.port

    @property
    def http_port(self) -> int:
        assert self.http is not None
        return self.http.port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.mllp is not None:
            await self.mllp.stop()
        if self.http is not None:
            await self.http.stop()
        if self.fhir is not None:
            await self.fhir.close()
        self.stop_event.set()
        await asyncio.to_thread(self._join)
        await self.monitoring.stop()
        if self.committer is not None:
            self.committer.close()
        for close in self._closers:
            close()
        self.log.close()
        log.info("site %s stopped", self.config.site)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=15)
