"""Write-back: the stage builds the requests (pipelines/writeback_requests.py), each
target's sink is wrapped by the retry wrapper (RetryingSink, in place) and the
dead-lettering one (DeadLetteringSink), and what still fails goes on as data to
the delayed-retry tiers or the dead-letter topic (FailureRouter), keeping which
targets already have the result.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from predictions import prediction

from ehrbridge.adapters.memory import MemorySink
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.config import Hl7v2Writeback, Mode, RetryPolicy, SiteConfig, load_site_config
from ehrbridge.core.contracts import CONTROL_ID_HEADER, Envelope, Failure, Kind
from ehrbridge.core.errors import RemoteRejected, UpstreamUnavailable
from ehrbridge.pipelines import writeback
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.results import Delivery
from ehrbridge.pipelines.retry import TIER_HEADER, DeadLetteringSink, FailureRouter, RetryingSink
from ehrbridge.pipelines.transport import topic_name
from ehrbridge.pipelines.writeback import DELIVERED_HEADER, WritebackStage
from ehrbridge.pipelines.writeback_requests import ResultToSend
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file

QUICK = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
ORU_TARGET = Hl7v2Writeback(host="127.0.0.1", port=1, receiving_application="EHR")


def live_config() -> SiteConfig:
    config = load_site_config(sandbox_site_file())
    writeback = config.writeback.model_copy(update={"hl7v2": ORU_TARGET})
    return config.model_copy(update={"mode": Mode.LIVE, "writeback": writeback})


def record_for(result: Prediction, config: SiteConfig) -> Envelope:
    return Envelope(config.site, result.source_id, result.to_json(), Kind.PREDICTION, "p")


def down(times: int) -> list[UpstreamUnavailable]:
    return [UpstreamUnavailable("EHR down (test)") for _ in range(times)]


def test_a_target_down_for_less_than_the_budget_is_ridden_out_in_place(tmp_path: Path) -> None:
    config = live_config()
    ehr = MemorySink("fhir")
    ehr.fail_next(down(QUICK.attempts - 1))
    results = SqliteResultStore(tmp_path / "results.sqlite")
    stage = WritebackStage(config, results, {"fhir": RetryingSink(ehr, QUICK)})
    assert stage.process([record_for(prediction(config), config)]) == []
    assert len(ehr.written) == 1 and ehr.calls == QUICK.attempts
    assert results.count(Delivery.DELIVERED) == 1


def test_a_longer_outage_is_parked_on_a_delayed_tier_keeping_the_targets_that_have_it(
    tmp_path: Path,
) -> None:
    config = live_config()
    fhir, oru = MemorySink("fhir"), MemorySink("hl7v2")
    oru.fail_next(down(QUICK.attempts))
    targets = {"fhir": RetryingSink(fhir, QUICK), "hl7v2": RetryingSink(oru, QUICK)}
    stage = WritebackStage(config, SqliteResultStore(tmp_path / "r.sqlite"), targets)
    [failure] = stage.process([record_for(prediction(config), config)])
    assert isinstance(failure, Failure) and not failure.permanent
    assert failure.envelope.headers[DELIVERED_HEADER] == "fhir"  # not sent twice later
    assert len(fhir.written) == 1 and oru.calls == QUICK.attempts  # in place, then no more
    parked = FailureRouter(config.site, config.retry).route(failure, "predictions")
    assert parked.topic == topic_name(config.site, "retry.1") and parked.headers[TIER_HEADER] == "1"


def test_a_live_site_wraps_each_write_back_target_in_the_retry_wrapper(tmp_path: Path) -> None:
    with BackgroundSandbox(tmp_path / "run", fhir_site=False) as running:
        runtime = running.sandbox.runtime
        assert runtime is not None and runtime.writeback_targets
        assert all(isinstance(t, RetryingSink) for t in runtime.writeback_targets.values())


def test_the_dead_lettering_wrapper_turns_what_did_not_arrive_into_data() -> None:
    config = live_config()
    batch = [record_for(prediction(config, f"MRN-{n}"), config) for n in range(3)]
    refused = RemoteRejected("EHR refused the resource (test)", status=422)
    picky = MemorySink("fhir", refuse=lambda e: refused if e is batch[1] else None)
    assert DeadLetteringSink(picky).write(batch) == {1: refused}  # only the named item
    assert picky.written == [batch[0], batch[2]]
    outage = UpstreamUnavailable("EHR down (test)")
    broken = MemorySink("fhir", failures=[outage])
    assert DeadLetteringSink(broken).write(batch) == dict.fromkeys(range(3), outage)
    assert DeadLetteringSink(MemorySink("fhir")).write(batch) == {}


def test_a_refused_result_is_dead_lettered_while_the_other_target_keeps_it(
    tmp_path: Path,
) -> None:
    config = live_config()
    refused = RemoteRejected("EHR refused the Observation (test)", status=422)
    fhir, oru = MemorySink("fhir", refuse=lambda _: refused), MemorySink("hl7v2")
    targets = {"fhir": RetryingSink(fhir, QUICK), "hl7v2": RetryingSink(oru, QUICK)}
    stage = WritebackStage(config, SqliteResultStore(tmp_path / "r.sqlite"), targets)
    [failure] = stage.process([record_for(prediction(config), config)])
    assert isinstance(failure, Failure) and failure.permanent and failure.stage == "writeback"
    assert failure.envelope.headers[DELIVERED_HEADER] == "hl7v2"  # a replay skips it
    assert fhir.calls == 1  # a permanent refusal is not retried in place
    dead = FailureRouter(config.site, config.retry).route(failure, "predictions")
    assert dead.topic == topic_name(config.site, "dlq")
    assert dead.value == failure.envelope.payload  # the prediction record, to replay


def test_each_target_is_sent_the_request_its_builder_makes(tmp_path: Path) -> None:
    config = live_config()
    result = prediction(config)
    fhir, oru = MemorySink("fhir"), MemorySink("hl7v2")
    stage = WritebackStage(
        config, SqliteResultStore(tmp_path / "r.sqlite"), {"fhir": fhir, "hl7v2": oru}
    )
    assert stage.process([record_for(result, config)]) == []
    [bundle], [message] = fhir.written, oru.written
    sent = orjson.loads(bundle.payload)
    resources = {e["resource"]["resourceType"]: e["resource"] for e in sent["entry"]}
    assert sent["type"] == "transaction" and {"Observation", "Provenance"} <= set(resources)
    stored = stage.results.get(result.identifier)
    assert stored is not None  # the same Observation, its references resolved in the Bundle
    assert resources["Observation"]["identifier"] == stored.observation["identifier"]
    assert resources["Observation"]["component"] == stored.observation["component"]
    msh = message.payload.split(b"\r")[0].split(b"|")
    assert msh[8].startswith(b"ORU^R01") and msh[9].decode() == message.headers[CONTROL_ID_HEADER]
    assert bundle.kind is Kind.FHIR and message.kind is Kind.HL7V2


def test_a_request_that_cannot_be_built_is_dead_lettered_and_the_batch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(result: ResultToSend, config: SiteConfig) -> Envelope:
        raise ZeroDivisionError("a bug in the ORU builder (test)")

    monkeypatch.setitem(writeback.REQUESTS, "hl7v2", broken)
    config = live_config()
    fhir, oru = MemorySink("fhir"), MemorySink("hl7v2")
    targets = {"fhir": fhir, "hl7v2": oru}
    stage = WritebackStage(config, SqliteResultStore(tmp_path / "r.sqlite"), targets)
    records = [record_for(prediction(config, f"MRN-{n}"), config) for n in range(2)]
    failures = stage.process(records)  # no exception: the partition is not stalled
    assert len(failures) == 2 and len(fhir.written) == 2 and oru.calls == 0
    for failure in failures:
        assert isinstance(failure, Failure) and failure.permanent
        assert failure.error.reason == "internal" and "ZeroDivisionError" in failure.error.detail
        assert failure.envelope.headers[DELIVERED_HEADER] == "fhir"  # a replay sends only the ORU
