"""Fault tests: real Apache Kafka, real processes, real kill -9.

Every site here runs its roles as separate ``ehrbridge run --role``
processes on the Kafka transport (tests/site_processes.py). The promise
under test: every message that got an AA becomes exactly one current risk
Observation in the EHR -- none lost, none duplicated -- whatever dies in
between; and what cannot be processed is in the DLQ with its reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from kafka_fixture import KAFKA_SCRIPT
from site_processes import (
    KafkaSite,
    accepted,
    all_observations,
    free_port,
    observation_count,
    renal_messages,
    send_all,
    subjects,
    wait_for_observations,
)

from ehrbridge._http import ThreadedServer
from ehrbridge.pipelines.transport import Record
from ehrbridge.sandbox.fhir_server import create_fhir_app
from ehrbridge.sandbox.model_server import create_model_app

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def fhir() -> Iterator[ThreadedServer]:
    with ThreadedServer(create_fhir_app()) as server:
        yield server


@pytest.fixture
def model_port() -> Iterator[int]:
    port = free_port()
    with ThreadedServer(create_model_app(), port=port):
        yield port


def new_site(tmp_path: Path, bootstrap: str, fhir: ThreadedServer, model_port: int) -> KafkaSite:
    return KafkaSite(tmp_path, bootstrap, f"{fhir.base_url}/fhir", model_port)


@pytest.fixture
def site(
    tmp_path: Path, kafka_bootstrap: str, fhir: ThreadedServer, model_port: int
) -> Iterator[KafkaSite]:
    running = new_site(tmp_path, kafka_bootstrap, fhir, model_port)
    yield running
    running.close()


def assert_exactly_one_observation_per_accepted_message(site: KafkaSite, aa: set[str]) -> None:
    wait_for_observations(site, len(aa))
    time.sleep(2)  # anything still in flight would show up as an extra
    found = subjects(all_observations(site.fhir_base))
    duplicates = [mrn for mrn, n in Counter(found).items() if n > 1]
    assert duplicates == [], f"{len(duplicates)} patients have more than one Observation"
    assert set(found) == aa, (
        f"lost {len(aa - set(found))}, unexpected {len(set(found) - aa)}\n{site.diagnostics()}"
    )


def in_background(target: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(target(*args)))
    thread.start()
    return thread, out


def test_kill_9_of_workers_mid_stream_loses_and_duplicates_nothing(site: KafkaSite) -> None:
    site.start_all()
    messages = renal_messages(10_000)
    sender, result = in_background(send_all, site.mllp_port, messages, 6, 15.0, 60)
    wait_for(lambda: observation_count(site.fhir_base) >= 1500, 240, "the stream to flow")
    worker = next(p for p in site.processes if p.name == "process-0")
    worker.kill9()
    site.start("process", "process-0")  # same name: same local state dir
    wait_for(lambda: observation_count(site.fhir_base) >= 4000, 240, "the stream to resume")
    ingest = next(p for p in site.processes if p.name == "ingest")
    ingest.kill9()  # senders see dropped connections; whatever got AA must survive
    site.processes.remove(ingest)
    site.start("ingest")
    sender.join()
    sent = result[0]
    aa = accepted(sent)
    # The sender resends what got no answer while ingest was down, as an EHR does.
    assert len(aa) == 10_000, Counter(s.ack for s in sent)
    assert_exactly_one_observation_per_accepted_message(site, aa)
    assert site.dead_letters() == []


def test_broker_restart_mid_stream_loses_nothing_and_never_acks_unstored(
    tmp_path: Path, fhir: ThreadedServer, model_port: int
) -> None:
    env = {
        **os.environ,
        "EHRBRIDGE_KAFKA_DATA": str(tmp_path / "broker"),
        "EHRBRIDGE_KAFKA_PORT": str(free_port()),
    }

    def broker(command: str) -> str:
        done = subprocess.run(
            [str(KAFKA_SCRIPT), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    bootstrap = broker("start")
    site = new_site(tmp_path / "site", bootstrap, fhir, model_port)
    site.root.mkdir()
    try:
        site.start_all()
        before = send_all(site.mllp_port, renal_messages(600, seed=1))
        broker("stop")
        during = send_all(site.mllp_port, renal_messages(30, seed=2), connections=3)
        broker("start")
        after = send_all(site.mllp_port, renal_messages(600, seed=3))
        # Not one message was acknowledged while nothing could store it.
        assert accepted(during) == set(), Counter(s.ack for s in during)
        assert len(accepted(before)) == 600 and len(accepted(after)) >= 590
        aa = accepted(before) | accepted(after)
        assert_exactly_one_observation_per_accepted_message(site, aa)
    finally:
        site.close()
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False, timeout=120)


def test_model_down_30_s_records_wait_and_complete_without_dead_letters(
    site: KafkaSite,
) -> None:
    model = ThreadedServer(create_model_app(), port=free_port())
    model.start()
    site.model_port = model.port
    site.start_all()
    first = send_all(site.mllp_port, renal_messages(200, seed=7))
    wait_for_observations(site, 200, 120)
    port = model.port
    model.stop()  # connection refused from now on
    down = send_all(site.mllp_port, renal_messages(200, seed=8))
    time.sleep(30)
    assert observation_count(site.fhir_base) == 200  # nothing could be scored meanwhile
    with ThreadedServer(create_model_app(), port=port):
        aa = accepted(first) | accepted(down)
        assert_exactly_one_observation_per_accepted_message(site, aa)
    assert site.dead_letters() == []


def test_a_poison_record_is_dead_lettered_and_the_stream_continues(site: KafkaSite) -> None:
    site.start_all()
    messages = renal_messages(100, seed=9)
    poison_patient = messages[50][0]
    poison = Record(
        topic=f"{site.site}.raw",
        key=poison_patient,  # the same partition as that patient's real results
        value=b"MSH|^~\\&|LAB|X|||20260101||ORU^R01|POISON-1|P|2.5\rPID|1||",
        headers={
            "site": site.site,
            "source_id": "POISON-1",
            "kind": "hl7v2",
            "received_at": "2026-01-01T00:00:00+00:00",
            "attempt": "0",
        },
    )
    kafka = site.kafka()
    kafka.append([poison])
    kafka.close()
    sent = send_all(site.mllp_port, messages)
    assert_exactly_one_observation_per_accepted_message(site, accepted(sent))
    dead = site.dead_letters()
    assert [r.headers.get("source_id") for r in dead] == ["POISON-1"]
    assert dead[0].value == poison.value
    assert dead[0].headers["error.reason"]


def risk_by_patient_episode(observations: list[dict[str, Any]]) -> dict[Any, Any]:
    """Site-independent view (identifiers include the site name): what the EHR shows."""
    return {
        (o["subject"]["identifier"]["value"], o["effectiveDateTime"]): (
            [c["valueQuantity"]["value"] for c in o["component"]],
            sorted(d["identifier"]["value"] for d in o.get("derivedFrom", [])),
        )
        for o in observations
    }


def test_a_second_worker_joining_mid_stream_gives_the_single_worker_results(
    tmp_path: Path, kafka_bootstrap: str, model_port: int
) -> None:
    from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

    history = [m for _, m in SyntheticEhr(patients=60, seed=21).stream(visits_per_patient=4)]
    half = len(history) // 2

    def run(root: Path, join_mid_stream: bool) -> tuple[dict[str, Any], str]:
        root.mkdir()
        with ThreadedServer(create_fhir_app()) as fhir:
            site = new_site(root, kafka_bootstrap, fhir, model_port)
            try:
                site.start_all()
                send_in_order(site.mllp_port, history[:half])
                if join_mid_stream:
                    site.start("process", "process-1")  # its own, empty, state dir
                send_in_order(site.mllp_port, history[half:])
                expected = wait_for_stable(site)
                return risk_by_patient_episode(all_observations(site.fhir_base)), (
                    site.diagnostics() + f"\n{expected} Observations"
                )
            finally:
                site.close()

    single, _ = run(tmp_path / "single", join_mid_stream=False)
    scaled, diagnostics = run(tmp_path / "scaled", join_mid_stream=True)
    assert len(single) > 60
    assert scaled == single, diagnostics
    joined_log = (tmp_path / "scaled" / "process-1.log").read_text()
    restored = [
        int(n)
        for n in re.findall(r"state restored from \S+ partitions .*?: (\d+) documents", joined_log)
    ]
    assert sum(restored) > 0, f"the joining worker restored no state\n{diagnostics}"


def send_in_order(port: int, messages: list[bytes]) -> None:
    """One connection, in order: one patient's history must arrive as the EHR sent it."""
    from ehrbridge.adapters.mllp_client import MllpClient

    with MllpClient("127.0.0.1", port) as client:
        for message in messages:
            assert client.send(message).code == "AA"


def wait_for_stable(site: KafkaSite, quiet_s: float = 6.0, timeout_s: float = 180) -> int:
    """Wait until the Observation count stops changing (the pipeline has drained)."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = observation_count(site.fhir_base)
        if count != last:
            last, since = count, time.monotonic()
        elif count > 0 and time.monotonic() - since >= quiet_s:
            return count
        time.sleep(0.5)
    raise AssertionError(f"the pipeline did not drain\n{site.diagnostics()}")
