"""Hostile HL7v2 over a real MLLP socket (issue 10, findings 2, 4 and 5).

Each failed on 966cba3: a formatting escape blew a 1.5 KB message up into
hundreds of MB of state and got AA; ValueErrors got AR without a dead letter
(the sender resends forever); a non-ASCII digit in MSH-12 broke the ACK after
the message was stored, so no ACK came at all; MSH-10 came back re-encoded.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from auth_tokens import headers as auth
from conftest import wait_for

from ehrbridge.adapters.mllp_client import Ack, MllpClient, frame
from ehrbridge.pipelines import ingest
from ehrbridge.pipelines.transport import Record
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("hostile"), fhir_site=False) as running:
        yield running


def renal(control_id: str, mrn: str) -> bytes:
    return SyntheticEhr(seed=5, patients=1).renal_oru_for(
        age=60,
        female=True,
        at=datetime(2026, 1, 1, tzinfo=UTC),
        egfr=30.0,
        uacr_mg_g=100.0,
        control_id=control_id,
        mrn=mrn,
    )


def fresh() -> tuple[str, str]:
    return f"C{uuid.uuid4().hex[:10]}", f"M{uuid.uuid4().hex[:10]}"


def send_raw(site: BackgroundSandbox, message: bytes) -> bytes:
    with MllpClient("127.0.0.1", site.sandbox.mllp_port, timeout_s=30) as client:
        return client.send_raw(frame(message))


def dead_letters(site: BackgroundSandbox, control_id: str) -> list[Record]:
    runtime = site.sandbox.runtime
    assert runtime is not None
    records = runtime.log.read(runtime.topic("dlq"), limit=100_000)
    return [r for r in records if r.headers.get("source_id") == control_id]


def patient_known(site: BackgroundSandbox, mrn: str) -> bool:
    return (
        httpx.get(f"{site.sandbox.api_url}/api/patients/{mrn}", headers=auth(site)).status_code
        == 200
    )


def replace_obx(message: bytes, field: int, value: bytes) -> bytes:
    """Set field ``field`` of every OBX of ``message``."""
    lines = message.split(b"\r")
    for i, line in enumerate(lines):
        if line.startswith(b"OBX|"):
            fields = line.split(b"|")
            fields += [b""] * (field + 1 - len(fields))
            fields[field] = value
            lines[i] = b"|".join(fields)
    return b"\r".join(lines)


def assert_dead_lettered(site: BackgroundSandbox, control_id: str, raw: bytes, reason: str) -> None:
    [record] = dead_letters(site, control_id)
    assert record.headers["error.reason"] == reason
    assert record.value == raw  # the bytes as received, for a replay


def test_an_escape_that_would_expand_to_200_million_spaces_is_refused(
    site: BackgroundSandbox,
) -> None:
    control_id, mrn = fresh()
    message = replace_obx(renal(control_id, mrn), 6, b"mg/g\\.sk 200000000\\")
    ack = Ack.parse(send_raw(site, message))
    assert (ack.code, ack.control_id) == ("AE", control_id)
    assert_dead_lettered(site, control_id, message, "hl7.escape_too_long")
    assert not patient_known(site, mrn)  # nothing of it reached patient state


@pytest.mark.parametrize(
    ("obx14", "reason"),
    [(b"20260101+9999", "hl7.bad_time"), ("2026010\u00b9".encode(), "hl7.bad_time")],
)
def test_value_errors_are_ae_with_a_dead_letter_not_a_silent_ar(
    site: BackgroundSandbox, obx14: bytes, reason: str
) -> None:
    control_id, mrn = fresh()
    message = replace_obx(renal(control_id, mrn), 14, obx14)
    ack = Ack.parse(send_raw(site, message))
    assert (ack.code, ack.control_id) == ("AE", control_id)
    assert_dead_lettered(site, control_id, message, reason)


def test_a_number_of_5000_digits_in_an_escape_is_ae_with_a_dead_letter(
    site: BackgroundSandbox,
) -> None:
    control_id, mrn = fresh()
    message = replace_obx(renal(control_id, mrn), 6, b"mg/g\\.sk " + b"9" * 5000 + b"\\")
    assert Ack.parse(send_raw(site, message)).code == "AE"
    assert_dead_lettered(site, control_id, message, "hl7.escape_too_long")


def test_a_non_ascii_digit_in_msh12_still_gets_its_ack(site: BackgroundSandbox) -> None:
    control_id, mrn = fresh()
    message = renal(control_id, mrn).replace(b"|2.5.1|", "|2.5.\u00b9|".encode(), 1)
    assert "|2.5.\u00b9|".encode() in message
    ack = Ack.parse(send_raw(site, message))
    assert (ack.code, ack.control_id) == ("AA", control_id)
    assert "|2.5.\u00b9\r".encode() in ack.raw  # MSH-12 echoed, in the message's UTF-8
    wait_for(lambda: patient_known(site, mrn), what="the stored message's patient")


def test_msh10_comes_back_byte_for_byte(site: BackgroundSandbox) -> None:
    control_id, mrn = fresh()
    for wire in ("-\u00e9".encode(), b"-\xe9"):  # UTF-8, and latin-1 (not valid UTF-8)
        message = renal(control_id, mrn).replace(control_id.encode(), control_id.encode() + wire)
        raw_ack = send_raw(site, message)
        assert b"MSA|AA|" + control_id.encode() + wire + b"\r" in raw_ack


def test_a_bug_while_checking_is_dead_lettered_as_internal(
    site: BackgroundSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    control_id, mrn = fresh()

    def broken(*_: object, **__: object) -> None:
        raise ZeroDivisionError("a bug that quotes PHI: Doe^Jane")

    monkeypatch.setattr(ingest, "extract", broken)  # the running site's ingest stage
    message = renal(control_id, mrn)
    ack = Ack.parse(send_raw(site, message))
    assert (ack.code, ack.control_id) == ("AE", control_id)
    assert_dead_lettered(site, control_id, message, "internal")
    [record] = dead_letters(site, control_id)
    assert "ZeroDivisionError" in record.headers["error.detail"]
    assert "Doe" not in record.headers["error.detail"]


def test_a_large_message_is_checked_off_the_event_loop(site: BackgroundSandbox) -> None:
    # Over ingest.OFF_LOOP_BYTES: same answer, from a worker thread.
    control_id, mrn = fresh()
    message = renal(control_id, mrn)
    padding = b"\rNTE|1||" + b"x" * (ingest.OFF_LOOP_BYTES + 1)
    ack = Ack.parse(send_raw(site, message + padding))
    assert (ack.code, ack.control_id) == ("AA", control_id)
    wait_for(lambda: patient_known(site, mrn), what="the large message's patient")
