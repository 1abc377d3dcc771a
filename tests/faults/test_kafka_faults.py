"""Fault tests: real Apache Kafka, real role processes, real ``kill -9``.

Each site runs its roles as separate ``ehrbridge run --role`` processes on
the Kafka transport, with the sandbox model server and FHIR stand-in as
processes of their own (tests/site_processes.py). The promise under test
(issue 3, "Fault tests"): every message that got an AA becomes its one
current risk Observation in the EHR -- none lost, none duplicated --
whatever dies in between; what cannot be processed is in the DLQ with its
reason, and the stream goes on behind it.

"One current Observation per message" here means: per *patient episode*
(the mapping's debounce, a calendar day for the sandbox site), because the
messages of one episode update one Observation. The expected identifiers
are computed with the product's own functions from the AA'd messages
(``site_processes.expected_observations``), and compared exactly, together
with what each Observation shows (anchor time and input results).

Run: ``scripts/kafka start`` then ``.venv/bin/pytest -m kafka tests/faults/test_kafka_faults.py``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from site_processes import (
    HISTORY_START,
    KafkaSite,
    MllpTraffic,
    OwnBroker,
    ProcessRegistry,
    ServerProcess,
    all_observations,
    birth_date_of,
    ehr_problems,
    expected_observations,
    failure_context,
    observation_total,
    renal_histories,
    renal_message,
    risk_view,
    stream_histories,
    wait_until,
)

from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@dataclass
class Servers:
    model: ServerProcess
    fhir: ServerProcess

    @property
    def fhir_base(self) -> str:
        return f"{self.fhir.url}/fhir"


@pytest.fixture
def registry() -> Iterator[ProcessRegistry]:
    processes = ProcessRegistry()
    yield processes
    processes.close()


@pytest.fixture
def servers(tmp_path: Path, registry: ProcessRegistry) -> Servers:
    return Servers(
        model=ServerProcess.create(registry, tmp_path, "model"),
        fhir=ServerProcess.create(registry, tmp_path, "fhir"),
    )


def new_site(root: Path, bootstrap: str, servers: Servers, registry: ProcessRegistry) -> KafkaSite:
    return KafkaSite(root, bootstrap, servers.fhir_base, servers.model.url, registry)


@pytest.fixture
def site(
    tmp_path: Path, kafka_bootstrap: str, servers: Servers, registry: ProcessRegistry
) -> KafkaSite:
    return new_site(tmp_path / "site", kafka_bootstrap, servers, registry)


def assert_ehr_holds_exactly(site: KafkaSite, traffic: MllpTraffic) -> dict[str, Any]:
    """Drain, then compare the EHR's Observations with those the AA'd messages call for."""
    site.wait_drained()
    config = site.config()
    expected = expected_observations(config, traffic.accepted_in_order())
    observations = all_observations(site.fhir_base)
    problems = ehr_problems(config, observations, expected)
    assert problems == [], f"{problems}\n{traffic.summary()}\n{site.diagnostics()}"
    return {"expected": expected, "observations": observations}


def dlq_listing(site: KafkaSite) -> str:
    listing = site.cli("dlq", "list")
    assert listing.returncode == 0, listing.stderr
    return listing.stdout


# ---------------------------------------------------------------- worker crash --


def test_kill_9_of_each_role_mid_stream_loses_and_duplicates_nothing(site: KafkaSite) -> None:
    site.start_all()
    histories = renal_histories(2000)  # 10,000 ORU^R01, 8,000 patient episodes
    traffic = site.traffic(connections=8, resend=True).start(histories)
    total = sum(len(h) for h in histories)

    def when_accepted(count: int) -> None:
        wait_until(
            lambda: traffic.accepted_count() >= count,
            240,
            f"{count} AA'd messages",
            lambda: traffic.summary() + "\n" + site.diagnostics(),
        )

    def kill_and_restart(name: str) -> None:
        assert traffic.accepted_count() < total, "the stream ended before the kill"
        site.kill9(name)
        site.restart(name)

    when_accepted(2500)
    wait_until(lambda: observation_total(site.fhir_base) > 0, 120, "results", site.diagnostics)
    kill_and_restart("process-0")  # its uncommitted batch is processed again
    when_accepted(5000)
    kill_and_restart("ingest")  # open connections drop; the senders resend what got no AA
    when_accepted(7000)
    kill_and_restart("writeback")
    traffic.join()

    assert traffic.accepted_count() == total, traffic.summary()
    result = assert_ehr_holds_exactly(site, traffic)
    assert len(result["expected"]) == 8000
    assert site.dead_letters() == []


# -------------------------------------------------------------- broker restart --


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_broker_restart_mid_stream_never_acks_what_it_could_not_store(
    tmp_path: Path, own_broker: OwnBroker, servers: Servers, registry: ProcessRegistry
) -> None:
    site = new_site(tmp_path / "site", own_broker.bootstrap, servers, registry)
    site.start_all()
    histories = renal_histories(200, self_contained=True)  # each message complete in itself
    traffic = site.traffic(connections=6, timeout_s=8.0, resend=True)
    traffic.start(histories)
    diagnostics = lambda: traffic.summary() + "\n" + own_broker.log_tail() + site.diagnostics()  # noqa: E731
    wait_until(lambda: traffic.accepted_count() >= 300, 120, "300 AA'd messages", diagnostics)

    own_broker.stop()
    down_since = time.monotonic()
    # Let the senders try for a while against a log that cannot store anything.
    wait_until(
        lambda: len(traffic.answers_between(down_since, time.monotonic())) >= 20,
        120,
        "20 answers while the broker was down",
        diagnostics,
    )
    up_from = time.monotonic()
    own_broker.start()
    traffic.join()

    while_down = traffic.answers_between(down_since, up_from)
    with failure_context(diagnostics):
        assert while_down, "no message was sent while the broker was down"
        acked = [a for a in while_down if a.code == "AA"]
        assert acked == [], f"AA while the broker was down: {acked[:5]}"
        assert traffic.accepted_count() == sum(len(h) for h in histories), traffic.summary()
    assert_ehr_holds_exactly(site, traffic)
    assert site.dead_letters() == []


# ------------------------------------------------------------ model server down --


def test_model_server_down_30_s_records_wait_and_complete_without_dead_letters(
    site: KafkaSite, servers: Servers
) -> None:
    site.start_all()
    histories = renal_histories(120)
    early = [h[:2] for h in histories]
    late = [h[2:] for h in histories]
    traffic = site.traffic(connections=4, resend=False)
    traffic.send(early)
    site.wait_drained()
    before = observation_total(site.fhir_base)

    servers.model.process.kill9()  # connection refused from now on
    traffic.send(late)  # ingest does not need the model: these are AA'd
    time.sleep(30)
    with failure_context(site.diagnostics):
        # Nothing could be scored meanwhile, and the waiting records were retried.
        assert observation_total(site.fhir_base) == before
        assert site.records_on(site.retry_topics()) > 0, "no record waited on a retry tier"
        assert site.dead_letters() == []
    servers.model.start()  # the same port: the site's config does not change

    assert traffic.accepted_count() == sum(len(h) for h in histories), traffic.summary()
    assert_ehr_holds_exactly(site, traffic)
    assert site.dead_letters() == []
    assert "0 dead letter(s)" in dlq_listing(site)


# -------------------------------------------------------------- poison message --


def without_umol_creatinine(config: dict[str, Any]) -> None:
    """A processing role whose mapping lacks a unit the ingest role's mapping has.

    As during a rolling mapping update: ingest (new mapping) accepts a
    creatinine in umol/L; this worker (old mapping) cannot use it, a
    permanent error for that one message.
    """
    del config["mapping"]["features"]["creatinine"]["units"]["umol/L"]


def test_a_poison_message_is_dead_lettered_with_its_reason_and_the_stream_continues(
    site: KafkaSite,
) -> None:
    site.start("process", "process-0", edit=without_umol_creatinine)
    site.start("writeback")
    site.start("ingest")
    histories = renal_histories(80)
    victim = histories[0]
    poison_id = f"{victim[0].control_id}-POISON"
    poison = renal_message(
        SyntheticEhr(seed=3),
        victim[0].patient,
        poison_id,
        at=victim[1].at + timedelta(days=20),  # an episode of its own
        birth=birth_date_of(0, HISTORY_START),
        female=True,
        creatinine_umol_l=180.0,
        egfr=31.0,
        uacr_mg_g=120.0,
    )
    # The poison sits between the patient's 2nd and 3rd message; all 80 patients share
    # the 4 partitions, so others' messages queue behind it on the same partition.
    victim.insert(2, poison)
    traffic = site.traffic(connections=4, resend=False).send(histories)
    assert traffic.accepted_count() == sum(len(h) for h in histories), traffic.summary()

    site.wait_drained()
    dead = site.dead_letters()
    with failure_context(site.diagnostics):
        assert [r.headers.get("source_id") for r in dead] == [poison_id]
        letter = dead[0]
        assert letter.value == poison.payload  # the original bytes
        assert letter.headers["error.reason"] == "mapping.unknown_unit"
        assert letter.headers["error.stage"] == "process"
        assert letter.key == victim[0].patient
    listing = dlq_listing(site)
    assert "mapping.unknown_unit" in listing and poison_id in listing, listing
    # Everything else, the poisoned patient's later messages too, completed.
    fine = [m for m in traffic.accepted_in_order() if m.control_id != poison_id]
    config = site.config()
    expected = expected_observations(config, fine)
    problems = ehr_problems(config, all_observations(site.fhir_base), expected)
    assert problems == [], problems

    # After the fix (the worker gets the new mapping), a replay completes the patient.
    site.kill9("process-0")
    site.start("process", "process-0")
    replay = site.cli("dlq", "replay", "--reason", "mapping.unknown_unit")
    assert replay.returncode == 0 and "replayed 1 record" in replay.stdout, replay
    site.wait_drained()
    # Processed last: its own episode gets its Observation; later episodes of the
    # patient were scored without it and stay as they are (no trigger for them).
    expected = expected_observations(config, [*fine, poison])
    problems = ehr_problems(config, all_observations(site.fhir_base), expected)
    assert problems == [], f"{problems}\n{site.diagnostics()}"
    assert len(site.dead_letters()) == 1  # the replayed letter stays, marked replayed


# ------------------------------------------------------------------- rebalance --


def test_a_second_worker_joining_mid_stream_gives_the_single_worker_results(
    tmp_path: Path, kafka_bootstrap: str, registry: ProcessRegistry
) -> None:
    def run(name: str, join_mid_stream: bool) -> tuple[KafkaSite, dict[str, Any]]:
        root = tmp_path / name
        root.mkdir()
        servers = Servers(
            model=ServerProcess.create(registry, root, "model"),
            fhir=ServerProcess.create(registry, root, "fhir"),
        )
        site = new_site(root / "site", kafka_bootstrap, servers, registry)
        # The same realistic stream for both runs: ADT, split panels, preliminary and
        # final results, corrections; 200 patients, 4 visits each.
        histories = stream_histories(SyntheticEhr(patients=200, seed=21), site.config())
        total = sum(len(h) for h in histories)
        site.start_all()
        traffic = site.traffic(connections=4, resend=False).start(histories)
        if join_mid_stream:
            wait_until(
                lambda: traffic.accepted_count() >= total // 3,
                120,
                f"{total // 3} AA'd messages",
                site.diagnostics,
            )
            site.start("process", "process-1")  # its own, empty, state directory
            assert traffic.accepted_count() < total, "the stream ended before the join"
        traffic.join()
        assert traffic.accepted_count() == total, traffic.summary()
        result = assert_ehr_holds_exactly(site, traffic)
        site.stop_all()  # its logs stay for the checks below
        return site, result

    _, single = run("single", join_mid_stream=False)
    scaled_site, scaled = run("scaled", join_mid_stream=True)

    assert len(single["expected"]) > 500
    assert risk_view(scaled["observations"]) == risk_view(single["observations"])
    joined = scaled_site.log_text("process-1")
    restored = re.findall(r"state restored from \S+ partitions .*?: (\d+) doc", joined)
    with failure_context(scaled_site.diagnostics):
        assert sum(map(int, restored)) > 0, "the joining worker restored no state"
        # The first worker gave partitions up: a rebalance happened mid-stream.
        revoked = re.findall(r"partitions revoked: (\S+)", scaled_site.log_text("process-0"))
        assert any(r != "none" for r in revoked), revoked


# ------------------------------------ a late retry never overwrites a newer result --


def test_a_result_retried_from_a_delayed_tier_does_not_overwrite_a_newer_one(
    site: KafkaSite, servers: Servers
) -> None:
    def slow_first_tier(config: dict[str, Any]) -> None:
        config["retry"]["delayed_s"] = [15.0]

    site.start("process", "process-0", edit=slow_first_tier)
    site.start("writeback", edit=slow_first_tier)
    site.start("ingest", edit=slow_first_tier)
    history = renal_histories(1)[0]  # messages 4 and 5 are one episode (day 120)
    traffic = site.traffic(connections=1, resend=False)
    traffic.send([history[:3]])
    site.wait_drained()
    # The EHR answers the next 3 writes 503 (the in-place retry budget): the result of
    # message 4 is parked on the 15 s tier ...
    faults = httpx.post(f"{servers.fhir.url}/_admin/faults", json={"status": 503, "count": 3})
    faults.raise_for_status()
    traffic.send([history[3:4]])
    wait_until(
        lambda: site.records_on(site.retry_topics()) > 0, 60, "a parked result", site.diagnostics
    )
    # ... while message 5 completes the episode, and its result is written at once.
    traffic.send([history[4:5]])
    # The Observation of day 120 must show message 5's UACR, not message 3's.
    assert_ehr_holds_exactly(site, traffic)
