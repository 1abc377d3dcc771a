"""Done when: the README's sandbox commands work in a fresh clone, with no ../shared beside it.

The commands are read from README.md's "Try it" section itself, so the test
breaks when the README drifts: the set-up command, the ORU^R01 to copy (it must
get AA), `ehrbridge send`, the Synthea Bundle from examples/, the CDS Hooks call
(it must answer a card) and `dlq list` against the running sandbox. Only the
ports change: the sandbox runs on free ones, and the commands are pointed there.

Set-up installs the product into the clone's own .venv (pip's cache is reused),
which takes about a minute: marked slow, and CI runs it with the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
from kafka_fixture import running_in_ci

from ehrbridge.bench.common import free_port
from ehrbridge.sandbox.ports import Ports

ROOT = Path(__file__).resolve().parents[2]
SET_UP_TIMEOUT_S = 600


def try_it_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Try it: the sandbox")
    return text[start : text.index("\n## ", start + 1)]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", try_it_section(), flags=re.DOTALL)


def commands() -> list[str]:
    """Every command of the section's ``sh`` blocks, as bash would read them."""
    found: list[str] = []
    for block in blocks("sh"):
        current = ""
        for line in block.splitlines():
            current = f"{current}\n{line}" if current else line
            if current.endswith("\\") or current.count("'") % 2:
                continue  # a continuation line, or inside a quoted argument
            found.append(current.strip())
            current = ""
    return [c for c in found if c]


def command(starting: str, containing: str = "") -> str:
    return next(c for c in commands() if c.startswith(starting) and containing in c)


def on_ports(cmd: str, ports: Ports) -> str:
    """A README command pointed at the test's sandbox instead of the default ports."""
    for port in fields(Ports):
        ours = getattr(ports, port.name)
        cmd = cmd.replace(f"127.0.0.1:{port.default}", f"127.0.0.1:{ours}")
        cmd = cmd.replace(f'"127.0.0.1",{port.default})', f'"127.0.0.1",{ours})')  # python3 -c
    return cmd


def run(cmd: str, cwd: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("curl") is None and not running_in_ci():
        pytest.skip("the README's FHIR examples use curl")
    where = tmp_path_factory.mktemp("newcomer") / "ehrbridge"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True, timeout=120)
    assert not (where.parent / "shared").exists()
    return where


@pytest.fixture(scope="module")
def sandbox(clone: Path) -> Iterator[Ports]:
    ports = Ports(*(free_port() for _ in fields(Ports)))
    flags = [f"--{p.name.replace('_', '-')}-port={getattr(ports, p.name)}" for p in fields(Ports)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    setup = command("scripts/sandbox")
    assert setup == "scripts/sandbox"
    process = subprocess.Popen(
        [*setup.split(), "--no-traffic", *flags],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        banner = read_until(process, "--fresh starts over", time.monotonic() + SET_UP_TIMEOUT_S)
        assert "BuildBackendWarning" not in banner and "Editable installation" not in banner
        assert "^^^SANDBOX^MR" in banner  # the banner says what PID-3 needs
        assert "\n  .venv/bin/ehrbridge dlq list --config sandbox/site.yaml " in banner
        yield ports
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(60)


def read_until(process: subprocess.Popen[str], marker: str, deadline: float) -> str:
    assert process.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} from scripts/sandbox:\n{''.join(seen)[-4000:]}")


@pytest.mark.slow
def test_the_readmes_sandbox_commands_work_in_a_fresh_clone(clone: Path, sandbox: Ports) -> None:
    [message] = blocks("hl7")
    assert message == (clone / "examples" / "oru-r01-sandbox.hl7").read_text()
    (clone / "copied-from-the-readme.hl7").write_text(message)
    send = command(".venv/bin/ehrbridge send")
    send = send.replace("examples/oru-r01-sandbox.hl7", "copied-from-the-readme.hl7")
    sent = run(f"{send} --port {sandbox.mllp}", clone)
    assert sent.returncode == 0 and sent.stdout.startswith("AA MY-0001"), sent

    by_hand = run(on_ports(command("python3 -c", "socket"), sandbox), clone)
    assert "MSA|AA|MY-0001" in by_hand.stdout, by_hand
    explained = run(command(".venv/bin/ehrbridge mappings explain"), clone)
    assert "2 result(s): 2 used" in explained.stdout, explained

    refused = message.replace("^^^SANDBOX^MR", "^^^OTHER^MR")  # the mistake the README warns of
    (clone / "refused.hl7").write_text(refused)
    assert run(f"{send.split(' copied')[0]} refused.hl7 --port {sandbox.mllp}", clone).returncode

    posted = run(on_ports(command("curl -s -X POST", "/fhir "), sandbox), clone)
    assert '"transaction-response"' in posted.stdout, posted

    cds = on_ports(command("curl -s -X POST", "cds-services"), sandbox)
    cards: list[object] = []
    deadline = time.monotonic() + 60
    while not cards and time.monotonic() < deadline:
        cards = json.loads(run(cds, clone).stdout)["cards"]
        time.sleep(0.5)
    assert len(cards) == 1

    listing = run(command(".venv/bin/ehrbridge dlq list"), clone)
    assert listing.returncode == 0, listing
    assert "hl7.missing_patient_id" in listing.stdout and "1 dead letter(s)" in listing.stdout
