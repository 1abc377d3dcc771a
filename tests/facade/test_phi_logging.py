"""No PHI in logs at INFO or above: messages are named by control id and site only."""

from __future__ import annotations

import logging
import logging.handlers
import time
from pathlib import Path

import pytest
from conftest import all_resources, wait_for

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.logs import RepeatLimiter
from ehrbridge.pipelines.er7 import Message
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


def test_logs_above_debug_carry_no_patient_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ehr = SyntheticEhr(seed=5, patients=4)
    messages = [message for _, message in ehr.stream(visits_per_patient=2)]
    bad = ehr.bad_messages()
    secrets: set[str] = set()
    for patient in ehr.patients:
        secrets |= {patient.mrn, patient.national_id, patient.family, patient.given}
        secrets.add(patient.birth_date.strftime("%Y%m%d"))
    caplog.set_level(logging.DEBUG)
    with (
        BackgroundSandbox(tmp_path) as running,
        MllpClient("127.0.0.1", running.sandbox.mllp_port) as client,
    ):
        for message in [*messages, *bad.values()]:
            client.send(message)
        wait_for(lambda: all_resources(f"{running.sandbox.fhir_base}/Observation"), what="results")
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud, "expected some INFO/WARNING records to check"
    text = "\n".join(r.getMessage() for r in loud)
    leaked = sorted(s for s in secrets if s and s in text)
    assert leaked == [], f"PHI in logs: {leaked}"
    for marker in ("PID|", "OBX|", "MSH|"):
        assert marker not in text, f"raw message content in logs ({marker})"
    # ... while the control ids that name messages do appear
    control_ids = {Message.parse(m).control_id for m in bad.values() if m.startswith(b"MSH")}
    assert any(cid in text for cid in control_ids)


def test_a_librarys_repeated_lines_are_held_back_and_counted() -> None:
    limiter = RepeatLimiter(window_s=0.2)
    handler = logging.handlers.BufferingHandler(capacity=100)
    handler.addFilter(limiter)
    kafka = logging.getLogger("kafka.net.manager")
    ours = logging.getLogger("ehrbridge.runtime")
    for logger in (kafka, ours):
        logger.addHandler(handler)
    try:
        for backoff in (0.5, 1.1, 2.3, 4.0):
            kafka.warning("Bootstrap connection to %s failed (backoff %.2f secs)", "b-0", backoff)
            ours.warning("site %s cannot start yet", "s1")
        time.sleep(0.25)
        kafka.warning("Bootstrap connection to %s failed (backoff %.2f secs)", "b-0", 8.0)
    finally:
        for logger in (kafka, ours):
            logger.removeHandler(handler)
    lines = [r.getMessage() for r in handler.buffer]
    assert lines.count("site s1 cannot start yet") == 4, "ehrbridge's own lines are never held"
    from_kafka = [line for line in lines if line.startswith("Bootstrap")]
    assert from_kafka == [
        "Bootstrap connection to b-0 failed (backoff 0.50 secs)",
        "Bootstrap connection to b-0 failed (backoff 8.00 secs)"
        " (3 more like this in the last 0.2 s)",
    ]
