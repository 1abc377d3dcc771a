"""An embedded site whose roles run as processes (``transport.processes: per-role``).

For tests/e2e/test_embedded_per_role.py and tests/faults/test_embedded_per_role_faults.py:
the site file (from ``sandbox/site.yaml``, on free ports), the real
``ehrbridge run`` supervisor as a process, and its children found in ``/proc``
by their parent pid, named by the ``--role`` on their command line.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from auth_tokens import localize
from conftest import all_resources, wait_for

from ehrbridge.bench.common import free_port, port_open
from ehrbridge.sandbox.run import sandbox_site_file

ROLES = {"ingest", "process", "writeback"}


def per_role_site_file(
    tmp_path: Path, fhir_base: str, model_port: int, **updates: Any
) -> tuple[Path, int, int]:
    """A site file with its roles as processes; (path, MLLP port, HTTP port)."""
    config = yaml.safe_load(sandbox_site_file().read_text())
    mllp_port, http_port = free_port(), free_port()
    config["data_dir"] = str(tmp_path / "data")
    localize(config, tmp_path / "data")  # the API's token files
    config["transport"] = {"kind": "embedded", "processes": "per-role"}
    config["mllp"]["port"] = mllp_port
    config["http"]["port"] = http_port
    config["model"]["url"] = f"http://127.0.0.1:{model_port}"
    config["writeback"]["fhir_base"] = fhir_base
    config["writeback"].pop("hl7v2", None)
    config["retry"] = {
        "attempts": 3,
        "initial_backoff_s": 0.1,
        "max_backoff_s": 0.5,
        "delayed_s": [1.0, 2.0],
    }
    config.update(updates)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, mllp_port, http_port


def start_supervisor(config: Path, mllp_port: int, log: Path) -> subprocess.Popen[bytes]:
    """``ehrbridge run`` (the supervisor), once its ingest child listens and all roles run."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ehrbridge.cli", "run", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: port_open(mllp_port) or process.poll() is not None, 60, "the site to listen")
    assert process.poll() is None, log.read_text()
    wait_for(lambda: set(children(process.pid)) == ROLES, 30, "a child per role")
    return process


def children(parent: int) -> dict[str, int]:
    """The live processes whose parent is ``parent``, by the role they run."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z" and b"--role" in argv:
            found[argv[argv.index(b"--role") + 1].decode()] = int(entry.name)
    return found


def at_least(url: str, count: int) -> list[dict[str, Any]] | None:
    """Every resource of a FHIR search once there are ``count`` of them, else None."""
    found = all_resources(url)
    return found if len(found) >= count else None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
