"""The MLLP listener on a real socket: every ACK code, framing faults, concurrency.

Runs against the whole sandbox (model server, FHIR stand-in, live site), so an
AA here is followed through to the Observation in the EHR stand-in.
"""

from __future__ import annotations

import socket
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import all_resources, wait_for

from ehrbridge.adapters.mllp_client import Ack, MllpClient, frame
from ehrbridge.mappings.ckd_epi import egfr_ckd_epi_2021
from ehrbridge.pipelines.er7 import Message
from ehrbridge.sandbox.kfre import Calibration, kfre_4var
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


def unique() -> str:
    return uuid.uuid4().hex[:12].upper()


def renal(ehr: SyntheticEhr, **values: Any) -> tuple[bytes, str, str]:
    """A renal ORU^R01 with a fresh control id and MRN: (bytes, control id, mrn)."""
    control_id, mrn = f"C{unique()}", f"M{unique()}"
    at = values.pop("at", datetime(2026, 1, 1, tzinfo=UTC))
    message = ehr.renal_oru_for(mrn=mrn, control_id=control_id, at=at, **values)
    return message, control_id, mrn


def send(sandbox: BackgroundSandbox, message: bytes) -> Ack:
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        return client.send(message)


def send_raw(sandbox: BackgroundSandbox, data: bytes, *, half_close: bool = False) -> bytes:
    """Send bytes exactly as given; return whatever comes back until the peer closes."""
    with socket.create_connection(("127.0.0.1", sandbox.sandbox.mllp_port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.settimeout(2)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if half_close is False and chunk.endswith(b"\x1c\x0d"):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def observations_for(sandbox: BackgroundSandbox, mrn: str) -> list[dict[str, Any]]:
    return all_resources(
        f"{sandbox.sandbox.fhir_base}/Observation",
        {"patient.identifier": f"urn:ehrbridge:sandbox:mrn|{mrn}"},
    )


def dead_letters(sandbox: BackgroundSandbox, control_id: str) -> list[Any]:
    runtime = sandbox.sandbox.runtime
    assert runtime is not None
    records = runtime.log.read(runtime.topic("dlq"), limit=100_000)
    return [r for r in records if r.headers.get("source_id") == control_id]


def component(observation: dict[str, Any], code: str) -> float:
    for part in observation["component"]:
        if part["code"]["coding"][0]["code"] == code:
            return float(part["valueQuantity"]["value"])
    raise KeyError(code)


def test_aa_is_followed_by_the_risk_observation_in_the_ehr(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    message, control_id, mrn = renal(
        ehr, age=57.28, female=True, creatinine_umol_l=265, uacr_mg_mmol=199.3
    )
    ack = send(sandbox, message)
    assert (ack.code, ack.control_id) == ("AA", control_id)
    [observation] = wait_for(lambda: observations_for(sandbox, mrn), what="the Observation")
    # Recompute from the published equations: CKD-EPI 2021 at the specimen date's age,
    # then KFRE 4-variable with the sandbox's North American calibration.
    birth = Message.parse(message).get("PID-7")
    age = (datetime(2026, 1, 1).date() - datetime.strptime(birth, "%Y%m%d").date()).days / 365.2425
    egfr = egfr_ckd_epi_2021(265 / 88.4, age, female=True)
    for horizon, code in ((2, "kfre-risk-2y"), (5, "kfre-risk-5y")):
        expected = kfre_4var(age, False, egfr, 199.3 * 8.84, horizon, Calibration.NORTH_AMERICAN)
        assert component(observation, code) / 100 == pytest.approx(expected, abs=1e-4)
    assert observation["status"] == "final"
    assert observation["effectiveDateTime"].startswith("2026-01-01")
    assert {d["identifier"]["value"] for d in observation["derivedFrom"]} == {
        f"{control_id}/OBX/1",
        f"{control_id}/OBX/2",
    }


def test_resending_the_same_message_does_not_duplicate_the_observation(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    message, _, mrn = renal(ehr, age=70, female=False, egfr=25.0, uacr_mg_g=300.0)
    assert send(sandbox, message).code == "AA"
    wait_for(lambda: observations_for(sandbox, mrn), what="the first Observation")
    assert send(sandbox, message).code == "AA"  # an engine resending after a lost ACK
    runtime = sandbox.sandbox.runtime
    assert runtime is not None
    processed = sum(w.processed for w in runtime.workers)
    wait_for(
        lambda: sum(w.processed for w in runtime.workers) >= processed + 1, what="reprocessing"
    )
    assert len(observations_for(sandbox, mrn)) == 1


@pytest.mark.parametrize(
    ("values", "reason", "err_location"),
    [
        ({"creatinine_mg_dl": "see note", "uacr_mg_g": 30.0}, "hl7.bad_number", "OBX^1^5"),
        ({"creatinine_mg_dl": "####", "uacr_mg_g": 30.0}, "hl7.bad_number", "OBX^1^5"),
    ],
)
def test_unparseable_numbers_get_ae_and_are_dead_lettered(
    sandbox: BackgroundSandbox,
    ehr: SyntheticEhr,
    values: dict[str, Any],
    reason: str,
    err_location: str,
) -> None:
    message, control_id, _ = renal(ehr, age=60, female=True, **values)
    ack = send(sandbox, message)
    assert (ack.code, ack.control_id) == ("AE", control_id)
    assert "not a number" in ack.text
    err = Message.parse(ack.raw).segment("ERR")
    assert err is not None and err.field(2) == err_location
    [record] = dead_letters(sandbox, control_id)
    assert record.value == message  # the raw bytes, exactly
    assert record.headers["error.reason"] == reason


# An unknown message type (ZZZ^Z01) gets AR by the HL7 rule: tests/pipelines/test_message_types.py.
@pytest.mark.parametrize("name", ["missing_pid", "unknown_unit"])
def test_valid_but_unusable_messages_get_ae(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr, name: str
) -> None:
    message = ehr.bad_messages()[name].replace(b"|2.5.1", b"|2.5.1", 1)
    control_id = Message.parse(message).control_id + unique()
    message = message.replace(Message.parse(message).control_id.encode(), control_id.encode(), 1)
    ack = send(sandbox, message)
    assert (ack.code, ack.control_id) == ("AE", control_id)
    assert ack.text
    [record] = dead_letters(sandbox, control_id)
    assert record.value == message


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x00\x01\x02garbage \xff\xfe bytes", "hl7.no_msh"),
        (b'{"resourceType": "Observation", "status": "final"}', "hl7.no_msh"),
        (b"MSH|", "hl7.bad_encoding"),
    ],
)
def test_unparseable_payloads_get_ar_and_are_dead_lettered(
    sandbox: BackgroundSandbox, payload: bytes, reason: str
) -> None:
    ack = send(sandbox, payload)
    assert ack.code == "AR"
    runtime = sandbox.sandbox.runtime
    assert runtime is not None
    records = runtime.log.read(runtime.topic("dlq"), limit=100_000)
    assert any(r.value == payload and r.headers["error.reason"] == reason for r in records)


def test_oversize_frame_gets_ar_and_the_listener_keeps_serving(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    limit = sandbox.sandbox.config.mllp.max_message_bytes
    huge, _, _ = renal(ehr, age=60, female=True, egfr=30.0, uacr_mg_g=30.0)
    huge += b"NTE|1||" + b"x" * (limit + 10) + b"\r"
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        ack = client.send(huge)
        assert ack.code == "AR" and "exceeds" in ack.text
        message, _, _ = renal(ehr, age=60, female=True, egfr=30.0, uacr_mg_g=30.0)
        assert client.send(message).code == "AA"  # same connection, still in step


def test_a_frame_cut_off_by_a_new_start_block_gets_ar(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    cut, _, _ = renal(ehr, age=60, female=True, egfr=30.0, uacr_mg_g=30.0)
    whole, control_id, _ = renal(ehr, age=60, female=True, egfr=30.0, uacr_mg_g=30.0)
    replies = send_raw(sandbox, b"\x0b" + cut[:80] + frame(whole), half_close=True)
    acks = [Ack.parse(part) for part in replies.split(b"\x1c\x0d") if part.strip()]
    assert [a.code for a in acks] == ["AR", "AA"]
    assert acks[1].control_id == control_id


def test_a_connection_closed_mid_frame_is_dead_lettered(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    message, control_id, _ = renal(ehr, age=60, female=True, egfr=30.0, uacr_mg_g=30.0)
    replies = send_raw(sandbox, b"\x0b" + message[:200], half_close=True)
    assert Ack.parse(replies.strip(b"\x0b\x1c\x0d")).code == "AR"
    [record] = wait_for(lambda: dead_letters(sandbox, control_id), what="the dead letter")
    assert record.headers["error.reason"] == "mllp.truncated"
    assert record.value == message[:200]


def test_bytes_without_a_start_block_get_ar(sandbox: BackgroundSandbox) -> None:
    reply = send_raw(sandbox, b"MSH|^~\\&|A|B|C|D|2026||ORU^R01|NOSTART|P|2.5\r\x1c\x0d")
    ack = Ack.parse(reply.strip(b"\x0b\x1c\x0d"))
    assert (ack.code, ack.control_id) == ("AR", "NOSTART")


@pytest.mark.parametrize("separator", [b"\r", b"\n", b"\r\n"])
def test_cr_lf_and_crlf_separators_are_accepted(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr, separator: bytes
) -> None:
    message, control_id, mrn = renal(ehr, age=66, female=False, egfr=33.0, uacr_mg_g=120.0)
    ack = send(sandbox, message.replace(b"\r", separator))
    assert (ack.code, ack.control_id) == ("AA", control_id)
    wait_for(lambda: observations_for(sandbox, mrn), what="the Observation")


def test_whitespace_between_frames_is_ignored(
    sandbox: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    first, id1, _ = renal(ehr, age=60, female=True, egfr=30.0, uacr_mg_g=30.0)
    second, id2, _ = renal(ehr, age=60, female=True, egfr=30.0, uacr_mg_g=30.0)
    replies = send_raw(sandbox, frame(first) + b"\r\n" + frame(second) + b"\n", half_close=True)
    acks = [Ack.parse(p.strip(b"\x0b")) for p in replies.split(b"\x1c\x0d") if p.strip()]
    assert [(a.code, a.control_id) for a in acks] == [("AA", id1), ("AA", id2)]


def test_many_concurrent_connections(sandbox: BackgroundSandbox, ehr: SyntheticEhr) -> None:
    messages = [
        [renal(ehr, age=61, female=True, egfr=40.0, uacr_mg_g=50.0) for _ in range(10)]
        for _ in range(20)
    ]
    results: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def sender(batch: list[tuple[bytes, str, str]]) -> None:
        with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
            for message, control_id, _ in batch:
                ack = client.send(message)
                with lock:
                    results.append((ack.code, ack.control_id, control_id))

    threads = [threading.Thread(target=sender, args=(batch,)) for batch in messages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 200
    assert all(code == "AA" and echoed == sent for code, echoed, sent in results)
