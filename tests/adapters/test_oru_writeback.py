"""HL7v2 write-back: ORU^R01 over MLLP to a peer answering AA, AE, AR, or nothing.

The peer is the sandbox's MLLP stand-in on a real socket; every message we
build is parsed and validated by hl7apy against the ORU_R01 structure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hl7apy.core import Message as Hl7apyMessage
from hl7apy.exceptions import ValidationError
from hl7apy.parser import parse_message
from oru_conformance import strict_errors
from predictions import prediction

from ehrbridge.adapters.mllp_client import END_BLOCK, START_BLOCK
from ehrbridge.adapters.mllp_sink import MllpSink
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.config import Hl7v2Writeback, SiteConfig, load_site_config
from ehrbridge.core.contracts import CONTROL_ID_HEADER, Envelope, Kind
from ehrbridge.core.errors import RemoteRejected, UpstreamUnavailable
from ehrbridge.pipelines.ack import build_ack, read_header
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import FactRules, PersonName, extract
from ehrbridge.pipelines.observation import percent
from ehrbridge.pipelines.oru import build_oru, control_id
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.state import PatientState
from ehrbridge.pipelines.writeback import WritebackStage
from ehrbridge.sandbox.mllp_peer import Answer, MllpPeer
from ehrbridge.sandbox.run import sandbox_site_file

# A lab's ORU^R01 with the patient's name in PID-5 (XPN: family^given^further given).
LAB_ORU = (
    b"MSH|^~\\&|LAB|SANDBOX|EHRBRIDGE|SANDBOX|20260101090000||ORU^R01^ORU_R01|LAB-1|P|2.5.1\r"
    b"PID|1||MRN-NAME^^^SANDBOX^MR||Quigley^Renea^J^^^^L||19600101|F\r"
    b"OBR|1||F-1|24362-6^Renal panel^LN|||20260101083000\r"
    b"OBX|1|NM|33914-3^eGFR^LN||28|mL/min/{1.73_m2}|||||F|||20260101083000\r"
)


class PeerThread:
    """An :class:`MllpPeer` on its own event loop thread (the sink is synchronous)."""

    def __init__(self, answer: Answer) -> None:
        self.peer = MllpPeer(answer=answer)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> MllpPeer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.start(), self.loop).result(10)
        return self.peer

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.peer.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def config() -> SiteConfig:
    base = load_site_config(sandbox_site_file())
    target = Hl7v2Writeback(host="127.0.0.1", port=1, receiving_application="EHR")
    return base.model_copy(
        update={"writeback": base.writeback.model_copy(update={"hl7v2": target})}
    )


def target_for(peer: MllpPeer, **changes: object) -> Hl7v2Writeback:
    return Hl7v2Writeback(host="127.0.0.1", port=peer.port, ack_timeout_s=0.5, **changes)  # type: ignore[arg-type]


def oru_envelope(config: SiteConfig, **kwargs: object) -> tuple[Envelope, str]:
    message, msh_10 = build_oru(prediction(config, **kwargs), config)  # type: ignore[arg-type]
    envelope = Envelope(
        config.site, "x", message, Kind.HL7V2, "MRN-1", headers={CONTROL_ID_HEADER: msh_10}
    )
    return envelope, msh_10


def scripted(*codes: str | None) -> Answer:
    """Answer the n-th message with the n-th code (the last one for the rest)."""
    calls = iter(codes)
    last: list[str | None] = [None]

    def answer(_: bytes) -> str | None:
        last[0] = next(calls, last[0])
        return last[0]

    return answer


def hl7apy_errors(message: Hl7apyMessage, tmp_path: Path) -> list[str]:
    """Every structure error hl7apy finds (it raises only the first)."""
    report = tmp_path / "hl7apy-report.txt"
    with contextlib.suppress(ValidationError):
        message.validate(report_file=str(report))
    lines = report.read_text().splitlines() if report.exists() else []
    return [line.removeprefix("Error: ") for line in lines if line.startswith("Error: ")]


def test_the_oru_carries_the_score_and_validates_with_hl7apy(
    config: SiteConfig, tmp_path: Path
) -> None:
    result = prediction(config, risk_2y=0.2153, risk_5y=0.5311)
    message, msh_10 = build_oru(result, config, now=datetime(2026, 2, 1, tzinfo=UTC))
    parsed: Hl7apyMessage = parse_message(
        message.decode().replace("\r", "\n").strip().replace("\n", "\r")
    )
    assert hl7apy_errors(parsed, tmp_path) == []  # PID-5, required, is the placeholder
    assert parsed.oru_r01_patient_result.oru_r01_patient.pid.pid_5.to_er7() == "UNKNOWN^^^^^^S"
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and parsed.msh.msh_10.to_er7() == msh_10
    assert parsed.msh.msh_12.to_er7() == "2.5.1"
    group = parsed.oru_r01_patient_result.oru_r01_order_observation
    assert group.obr.obr_3.to_er7() == f"{result.identifier}^EHRBRIDGE"
    observations = [o.obx for o in group.oru_r01_observation]
    values = [float(o.obx_5.to_er7()) for o in observations]
    assert values == [percent(result.outputs["risk_2y"]), percent(result.outputs["risk_5y"])]
    assert [o.obx_3.to_er7().split("^")[0] for o in observations] == ["KFRE2Y", "KFRE5Y"]
    assert [o.obx_6.to_er7() for o in observations] == ["%^percent^UCUM"] * 2
    assert [o.obx_7.to_er7() for o in observations] == ["<10", "<5"]  # the bands' thresholds
    assert [o.obx_8.to_er7() for o in observations] == ["H", "H"]  # 21.5% >= 10%, 53.1% >= 5%
    assert [o.obx_11.to_er7() for o in observations] == ["F", "F"]
    pid_3 = parsed.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7()
    assert pid_3 == "MRN-1^^^SANDBOX^MR"  # the site's assigning authority and type


def test_the_control_id_is_the_same_for_the_same_content_only(config: SiteConfig) -> None:
    first = build_oru(prediction(config), config, now=datetime(2026, 2, 1, tzinfo=UTC))
    again = build_oru(prediction(config), config, now=datetime(2026, 3, 1, tzinfo=UTC))
    assert first[1] == again[1] and len(first[1]) <= 20
    corrected = build_oru(prediction(config, risk_2y=0.3), config, corrected=True)
    assert corrected[1] != first[1]
    assert b"|C|||" in corrected[0] and control_id(prediction(config), "F") == first[1]


def test_aa_delivers_and_the_ack_answers_our_message(config: SiteConfig) -> None:
    with PeerThread(scripted("AA")) as peer:
        sink = MllpSink(target_for(peer))
        envelope, msh_10 = oru_envelope(config)
        sink.write([envelope])
        sink.close()
    assert [(r.control_id, r.answered) for r in peer.received] == [(msh_10, "AA")]
    assert peer.received[0].message == envelope.payload


def test_ae_is_dead_lettered_by_default_or_retried_by_policy(config: SiteConfig) -> None:
    with PeerThread(scripted("AE")) as peer:
        envelope, msh_10 = oru_envelope(config)
        with pytest.raises(RemoteRejected) as caught:
            MllpSink(target_for(peer)).write([envelope])
        assert caught.value.reason == "hl7.ack_ae" and msh_10 in caught.value.detail
        assert "result rejected by the EHR stand-in" in caught.value.detail  # MSA-3 kept
        with pytest.raises(UpstreamUnavailable):
            MllpSink(target_for(peer, on_error="retry")).write([envelope])
    assert len(peer.received) == 2  # AE is an answer: never resent in place


def test_ar_is_retried_by_default_or_dead_lettered_by_policy(config: SiteConfig) -> None:
    with PeerThread(scripted("AR")) as peer:
        envelope, _ = oru_envelope(config)
        with pytest.raises(UpstreamUnavailable) as caught:
            MllpSink(target_for(peer)).write([envelope])
        assert caught.value.reason == "hl7.ack_ar"
        with pytest.raises(RemoteRejected):
            MllpSink(target_for(peer, on_reject="dead-letter")).write([envelope])


def test_no_ack_resends_the_same_msh_10_then_gives_up(config: SiteConfig) -> None:
    with PeerThread(scripted(None)) as peer:
        envelope, msh_10 = oru_envelope(config)
        with pytest.raises(UpstreamUnavailable) as caught:
            MllpSink(target_for(peer, resends=2)).write([envelope])
    assert caught.value.reason == "mllp.no_ack"
    assert [r.control_id for r in peer.received] == [msh_10] * 3
    assert {r.message for r in peer.received} == {envelope.payload}  # the very same bytes


def test_a_timeout_then_an_ack_delivers_with_the_same_msh_10(config: SiteConfig) -> None:
    with PeerThread(scripted(None, "AA")) as peer:
        envelope, msh_10 = oru_envelope(config)
        sink = MllpSink(target_for(peer, resends=2))
        sink.write([envelope])
        sink.close()
    assert [(r.control_id, r.answered) for r in peer.received] == [(msh_10, None), (msh_10, "AA")]


def test_an_ack_for_another_message_is_not_taken_for_ours(config: SiteConfig) -> None:
    """A peer that first sends a stray ACK (MSA-2 of some other message), then ours."""
    envelope, msh_10 = oru_envelope(config)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while END_BLOCK not in data:
                    data += conn.recv(65536)
                message = data[data.index(START_BLOCK) + 1 : data.index(END_BLOCK)]
                header = read_header(message)
                stray = build_ack(dataclasses.replace(header, control_id="SOMEONE-ELSE"))
                conn.sendall(START_BLOCK + stray + END_BLOCK)
                conn.sendall(START_BLOCK + build_ack(header) + END_BLOCK)
                conn.recv(10)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        sink = MllpSink(Hl7v2Writeback(host="127.0.0.1", port=port, ack_timeout_s=2))
        ack = sink.send(envelope.payload, msh_10)
        sink.close()
        thread.join(5)
    assert (ack.code, ack.control_id) == ("AA", msh_10)


def test_an_unreachable_peer_is_transient(config: SiteConfig) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening
        envelope, _ = oru_envelope(config)
        with pytest.raises(UpstreamUnavailable):
            MllpSink(
                Hl7v2Writeback(host="127.0.0.1", port=port, ack_timeout_s=0.5, resends=1)
            ).write([envelope])


def test_an_updated_result_goes_out_corrected_and_a_replay_not_at_all(
    config: SiteConfig, tmp_path: Path
) -> None:
    with PeerThread(scripted("AA")) as peer:
        target = target_for(peer)
        site = config.model_copy(
            update={"writeback": config.writeback.model_copy(update={"hl7v2": target})}
        )
        sink = MllpSink(target)
        stage = WritebackStage(
            site, SqliteResultStore(tmp_path / "results.sqlite"), {"hl7v2": sink}
        )
        first, updated = prediction(site), prediction(site, risk_2y=0.4512)
        assert first.identifier == updated.identifier  # the same episode, more results
        for result in (first, updated, updated):
            record = Envelope(site.site, "m", result.to_json(), Kind.PREDICTION, result.patient_id)
            assert stage.process([record]) == []
        sink.close()
    statuses = [m.message.split(b"\r")[2].split(b"|")[25] for m in peer.received]
    assert statuses == [b"F", b"C"]  # OBR-25; the replay of the updated result sent nothing
    assert peer.received[0].control_id != peer.received[1].control_id


@pytest.mark.parametrize("version", ["2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1"])
@pytest.mark.parametrize(
    "name",
    [None, PersonName("Quigley", "Renea"), PersonName("O|Brien^Smith", "Ann&Lee", "Mary~Jo\\")],
    ids=["no name", "name", "name with delimiters"],
)
def test_the_oru_of_every_version_validates_strictly(
    config: SiteConfig, version: str, name: PersonName | None
) -> None:
    target = config.writeback.hl7v2.model_copy(update={"version": version})  # type: ignore[union-attr]
    site = config.model_copy(
        update={"writeback": config.writeback.model_copy(update={"hl7v2": target})}
    )
    message, _ = build_oru(dataclasses.replace(prediction(site), patient_name=name), site)
    assert strict_errors(message) == []
    pid = Message.parse(message).segments[1]
    if name is None:  # the site's placeholder: XPN.7 S, a pseudonym (HL7 table 0200)
        assert pid.value(5) == "UNKNOWN^^^^^^S"
    else:  # the name comes back as it was sent, delimiters and all
        parts = [pid.component(5, n) for n in (1, 2, 3)]
        assert parts == [name.family, name.given, name.middle]


def test_pid_5_is_the_name_from_the_inbound_message(config: SiteConfig, tmp_path: Path) -> None:
    """PID-5 of the lab's ORU travels through the patient state to the ORU we send."""
    extraction = extract(Message.parse(LAB_ORU), FactRules(config.mapping))
    [patient] = extraction.patients
    assert patient.demographics.name == PersonName("Quigley", "Renea", "J")
    state = PatientState(patient.patient_id)
    state.merge(patient)
    state = PatientState.from_json(state.to_json())  # as the state store keeps it
    result = dataclasses.replace(prediction(config, patient.patient_id), patient_name=state.name)
    result = Prediction.from_json(result.to_json())  # as the predictions topic carries it
    message, _ = build_oru(result, config)
    assert message.split(b"\r")[1].split(b"|")[5] == b"Quigley^Renea^J"
    assert strict_errors(message) == []
