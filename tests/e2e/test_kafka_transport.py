"""A site on the Kafka transport, in process, against the real broker.

The same sandbox as the embedded tests, with ``transport: {kind: kafka}``:
MLLP in, Observation out; per-patient state restored from the compacted
changelog after the local store is lost; dead letters readable from Kafka.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_tokens import headers as auth
from conftest import all_resources, wait_for

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.config import KafkaTransport, SiteConfig
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

pytestmark = pytest.mark.kafka


def on_kafka(bootstrap: str, site: str, state_dir: Path) -> Callable[[SiteConfig], SiteConfig]:
    transport = KafkaTransport(kind="kafka", bootstrap=bootstrap, partitions=3, state_dir=state_dir)

    def configure(config: SiteConfig) -> SiteConfig:
        return config.model_copy(update={"site": site, "transport": transport})

    return configure


def send(sandbox: BackgroundSandbox, message: bytes) -> str:
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        return client.send(message).code


def results_for(sandbox: BackgroundSandbox, mrn: str) -> list[dict[str, Any]]:
    api = sandbox.sandbox.api_url
    found: list[dict[str, Any]] = httpx.get(
        f"{api}/api/results", params={"patient": mrn}, headers=auth(sandbox, "viewer")
    ).json()["results"]
    return found


def patient_outcome(sandbox: BackgroundSandbox, mrn: str) -> dict[str, Any] | None:
    response = httpx.get(
        f"{sandbox.sandbox.api_url}/api/patients/{mrn}", headers=auth(sandbox, "viewer")
    )
    if response.status_code != 200:
        return None
    outcome: dict[str, Any] | None = response.json()["last_outcome"]
    return outcome


@pytest.fixture
def site() -> str:
    return f"kafka{uuid.uuid4().hex[:8]}"


def test_an_oru_over_mllp_becomes_an_observation_through_kafka(
    tmp_path: Path, kafka_bootstrap: str, site: str
) -> None:
    ehr = SyntheticEhr(patients=1)
    mrn, control_id = f"M{uuid.uuid4().hex[:10]}", f"C{uuid.uuid4().hex[:10]}"
    message = ehr.renal_oru_for(
        age=61,
        female=True,
        at=datetime(2026, 3, 1, tzinfo=UTC),
        egfr=24.0,
        uacr_mg_g=380.0,
        mrn=mrn,
        control_id=control_id,
    )
    configure = on_kafka(kafka_bootstrap, site, tmp_path / "state")
    with BackgroundSandbox(tmp_path / "run", configure=configure, fhir_site=False) as sandbox:
        assert send(sandbox, message) == "AA"
        observations = wait_for(
            lambda: all_resources(
                f"{sandbox.sandbox.fhir_base}/Observation",
                {"patient.identifier": f"urn:ehrbridge:sandbox:mrn|{mrn}"},
            ),
            60,
            "the risk Observation via Kafka",
        )
    assert len(observations) == 1
    assert observations[0]["derivedFrom"][0]["identifier"]["value"].startswith(control_id)


def test_patient_state_comes_back_from_the_changelog_when_the_local_store_is_lost(
    tmp_path: Path, kafka_bootstrap: str, site: str
) -> None:
    ehr = SyntheticEhr(patients=1)
    mrn = f"M{uuid.uuid4().hex[:10]}"
    kidney_blood = ehr.renal_oru_for(  # eGFR only: not enough for KFRE yet
        age=70, female=False, at=datetime(2026, 1, 5, tzinfo=UTC), egfr=19.0, mrn=mrn
    )
    urine_later = ehr.renal_oru_for(  # UACR only, a month later
        age=70, female=False, at=datetime(2026, 2, 5, tzinfo=UTC), uacr_mg_g=900.0, mrn=mrn
    )
    state_dir = tmp_path / "state"
    configure = on_kafka(kafka_bootstrap, site, state_dir)

    with BackgroundSandbox(tmp_path / "first", configure=configure, fhir_site=False) as first:
        assert send(first, kidney_blood) == "AA"
        outcome = wait_for(lambda: patient_outcome(first, mrn), 60, "the first message")
        assert "uacr" in str(outcome), outcome  # the reason names what is missing
        assert results_for(first, mrn) == []

    shutil.rmtree(state_dir)  # the worker's disk is gone: a new machine

    with BackgroundSandbox(tmp_path / "second", configure=configure, fhir_site=False) as second:
        runtime = second.sandbox.runtime
        assert runtime is not None and runtime.changelog_state is not None
        assert send(second, urine_later) == "AA"
        results = wait_for(lambda: results_for(second, mrn), 60, "a result from both visits")
        assert runtime.changelog_state.restored_records >= 1
    assert len(results) == 1  # raw was not re-read: only the new message was processed


def test_dead_letters_are_kept_on_kafka_with_their_reason_and_bytes(
    tmp_path: Path, kafka_bootstrap: str, site: str
) -> None:
    ehr = SyntheticEhr(patients=1)
    control_id = f"C{uuid.uuid4().hex[:10]}"
    unusable = ehr.renal_oru_for(
        age=50,
        female=True,
        at=datetime(2026, 1, 1, tzinfo=UTC),
        egfr="see note",
        control_id=control_id,
    )
    configure = on_kafka(kafka_bootstrap, site, tmp_path / "state")
    with BackgroundSandbox(tmp_path / "run", configure=configure, fhir_site=False) as sandbox:
        assert send(sandbox, unusable) == "AE"
        runtime = sandbox.sandbox.runtime
        assert runtime is not None
        dead = runtime.log.read(runtime.topic("dlq"))
    assert len(dead) == 1
    assert dead[0].headers["source_id"] == control_id
    assert dead[0].headers["error.reason"]
    assert dead[0].value == unusable.replace(b"\n", b"\r") or control_id.encode() in dead[0].value


def two_patient_oru(first: bytes, second: bytes) -> bytes:
    """One ORU^R01 with two PATIENT_RESULT groups: ``first``'s MSH, then both patients."""
    segments = second.replace(b"\r\n", b"\r").split(b"\r")
    from_pid = next(i for i, s in enumerate(segments) if s.startswith(b"PID|"))
    return first.rstrip(b"\r") + b"\r" + b"\r".join(segments[from_pid:])


def test_a_message_about_two_patients_is_stored_on_each_patients_partition(
    tmp_path: Path, kafka_bootstrap: str, site: str
) -> None:
    """Each patient's state has one owner: the worker of that patient's partition."""
    ehr = SyntheticEhr(patients=2)
    first, second = (f"M{uuid.uuid4().hex[:10]}" for _ in range(2))
    at = datetime(2026, 4, 1, tzinfo=UTC)
    message = two_patient_oru(
        ehr.renal_oru_for(age=66, female=True, at=at, egfr=21.0, uacr_mg_g=500.0, mrn=first),
        ehr.renal_oru_for(age=58, female=False, at=at, egfr=35.0, uacr_mg_g=90.0, mrn=second),
    )
    configure = on_kafka(kafka_bootstrap, site, tmp_path / "state")
    with BackgroundSandbox(tmp_path / "run", configure=configure, fhir_site=False) as sandbox:
        assert send(sandbox, message) == "AA"
        for mrn in (first, second):
            wait_for(lambda mrn=mrn: results_for(sandbox, mrn), 60, f"a result for {mrn}")
        runtime = sandbox.sandbox.runtime
        assert runtime is not None and runtime.changelog_state is not None
        raw = runtime.log.read(runtime.topic("raw"))
        store = runtime.changelog_state
    assert sorted(r.key for r in raw) == sorted([first, second]), "one copy per patient"
    assert raw[0].value == raw[1].value, "each copy keeps the whole message"
    assert {r.partition for r in raw} == {store.partition_for(first), store.partition_for(second)}
