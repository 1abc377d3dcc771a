"""The real components a benchmark runs against, each in a process of its own.

* the sandbox model server and FHIR stand-in (``python -m ehrbridge.bench.serve``);
* the site: ``python -m ehrbridge.cli run --config site.yaml [--role ...]``, one
  process per role group, from a site file written for the run (free ports,
  this run's model and FHIR URLs, the transport asked for);
* the Kafka broker of ``scripts/kafka`` (shared; started if needed, never stopped).

:class:`Services` starts them, knows their pids (for ``/proc`` CPU and RSS)
and stops, on exit, only the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from ehrbridge.bench.common import ChildExited, free_port, kafka_broker_pid, wait_port
from ehrbridge.sandbox.credentials import bearer, cds_token, localize_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SANDBOX_DIR = REPO_ROOT / "sandbox"
KAFKA_SCRIPT = REPO_ROOT / "scripts" / "kafka"


def kafka_bootstrap() -> str:
    """The shared broker's address: KAFKA_BOOTSTRAP, else ``scripts/kafka start`` (idempotent)."""
    address = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if address:
        return address
    done = subprocess.run(
        [str(KAFKA_SCRIPT), "start"], capture_output=True, text=True, timeout=600, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"scripts/kafka start failed: {done.stderr.strip()[-500:]}")
    return lines[-1].strip()


def delete_topics(bootstrap: str, prefix: str) -> None:
    """Remove a run's topics (names start with its unique site name)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        names = [t for t in admin.list_topics() if t.startswith(prefix)]
        if names:
            admin.delete_topics(names)
    except Exception:  # best effort: a leftover topic only costs disk
        pass
    finally:
        admin.close()


class Services:
    """Processes started for one benchmark run, and where they listen."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.site = f"bench{uuid.uuid4().hex[:8]}"  # unique: fresh Kafka topics per run
        self.credentials = run_dir / "credentials"  # sandbox tokens: <here>/tokens/<role>

    # ----------------------------------------------------------- servers --

    def start_server(self, name: str, *args: str) -> int:
        """``model``, ``fhir`` or ``naive-cds``; returns its port once it answers."""
        port = self.spawn_server(name, *args)
        self.wait_listening(name, port)
        return port

    def start_servers(self, *names: str, args: Mapping[str, Sequence[str]] | None = None) -> None:
        """Several servers, started side by side (imports take seconds on a busy machine).

        ``args``: extra command-line arguments per server (the model's latency options).
        """
        given = args or {}
        for name, port in [(name, self.spawn_server(name, *given.get(name, ()))) for name in names]:
            self.wait_listening(name, port)

    def spawn_server(self, name: str, *args: str) -> int:
        port = free_port()
        self._spawn(name, ["-m", "ehrbridge.bench.serve", name, "--port", str(port), *args])
        self.ports[name] = port
        return port

    @property
    def model_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['model']}"

    @property
    def fhir_base(self) -> str:
        return f"http://127.0.0.1:{self.ports['fhir']}/fhir"

    # -------------------------------------------------------------- site --

    def write_site_config(
        self,
        *,
        template: str = "site.yaml",
        transport: dict[str, Any] | None = None,
        name: str = "site",
        updates: dict[str, Any] | None = None,
    ) -> Path:
        """A site file for this run from a sandbox site file, on free ports."""
        path = SANDBOX_DIR / template
        config: dict[str, Any] = yaml.safe_load(path.read_text())
        mapping = config.get("mapping")
        if isinstance(mapping, dict) and "file" in mapping:
            mapping["file"] = str((path.parent / mapping["file"]).resolve())
        self.ports["mllp"] = free_port()
        self.ports["http"] = free_port()
        config.update(
            site=self.site,
            data_dir=str(self.run_dir / f"data-{name}"),
            transport=transport or {"kind": "embedded"},
        )
        config["mllp"]["port"] = self.ports["mllp"]
        config["http"]["port"] = self.ports["http"]
        config["model"]["url"] = self.model_url
        config["writeback"]["fhir_base"] = self.fhir_base
        config["writeback"].pop("hl7v2", None)  # the ORU inbox is not part of these runs
        localize_yaml(config, self.credentials)  # API tokens and the CDS client key
        if "subscriptions" in config:
            config["subscriptions"]["fhir_base"] = self.fhir_base
        for key, value in (updates or {}).items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        out = self.run_dir / f"{name}.yaml"
        out.write_text(yaml.safe_dump(config, sort_keys=False))
        return out

    def start_site(self, config: Path, name: str = "site", roles: Sequence[str] = ()) -> None:
        """``ehrbridge run`` as its own process; waits for the ingest ports when it has them."""
        self.spawn_site(config, name, roles)
        if not roles or "ingest" in roles:
            self.wait_ingest(name)

    def spawn_site(self, config: Path, name: str = "site", roles: Sequence[str] = ()) -> None:
        role_args = [a for role in roles for a in ("--role", role)]
        self._spawn(name, ["-m", "ehrbridge.cli", "run", "--config", str(config), *role_args])

    def wait_ingest(self, name: str) -> None:
        """Until process ``name`` (with the ingest role) listens for MLLP and HTTP."""
        self.wait_listening(name, self.ports["mllp"], timeout_s=120)
        self.wait_http(f"http://127.0.0.1:{self.ports['http']}/health")

    def auth(self, role: str = "admin") -> dict[str, str]:
        """``Authorization`` with this run's API token of ``role``."""
        return bearer(self.credentials, role)

    def cds_auth(self) -> dict[str, str]:
        """A fresh CDS Hooks JWT (the sandbox EHR's) for this run's site."""
        url = f"{self.api_url}/cds-services/kfre-patient-view"
        return {"Authorization": f"Bearer {cds_token(self.credentials, url)}"}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def wait_http(self, url: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 200")
            time.sleep(0.1)

    # ---------------------------------------------------------- processes --

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.run_dir / f"{name}.log").open("wb")
        command = [sys.executable, *args]
        profile = os.environ.get("EHRBRIDGE_BENCH_PYSPY")  # "SECONDS:DIR": profile the sites
        if profile and "ehrbridge.cli" in args:
            seconds, out = profile.split(":", 1)
            py_spy = str(Path(sys.executable).parent / "py-spy")
            prefix = [py_spy, "record", "--nonblocking", "-r", "50", "-f", "raw", "-d", seconds]
            command = [*prefix, "-o", str(Path(out) / f"{name}.txt"), "--", *command]
        self.procs[name] = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.run_dir,
        )
        log.close()

    def pids(self, *, broker: bool = False) -> dict[str, int]:
        pids = {name: proc.pid for name, proc in self.procs.items()}
        if broker and (pid := kafka_broker_pid()) is not None:
            pids["kafka-broker"] = pid
        return pids

    def wait_listening(self, name: str, port: int, timeout_s: float = 60) -> None:
        """Until process ``name`` listens on ``port``; its log's end if it exits or never does."""
        try:
            wait_port(port, timeout_s, self.procs[name])
        except (ChildExited, TimeoutError) as exc:
            raise RuntimeError(f"{name}: {exc}:\n{self.log_tail(name)}") from exc

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return (self.run_dir / f"{name}.log").read_text(errors="replace")[-chars:]

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        # Sites first (they drain into the servers), then the servers.
        for name in sorted(self.procs, key=lambda n: n in ("model", "fhir", "naive-cds")):
            self.stop(name)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
