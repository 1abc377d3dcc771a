"""Result times that cannot be true (issue 10, finding 3): refused, and never a patient's latest.

A patient with eGFR 12 and UACR 2500 had a critical card; the same labs dated
OBX-14 30000101 got AA, anchored a 0.0 % Observation in the year 3000 and hid
the critical risk for good. Now a result timed after its receipt (plus
``values.future_tolerance_s``), before ``values.earliest_date`` or before the
patient's birth date is refused with AE and dead-lettered, and nothing in the
future is used as "latest" even when it is already in state or in the store.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from auth_tokens import cds_headers
from auth_tokens import headers as auth
from conftest import wait_for
from model_double import OipDouble

from ehrbridge.adapters.inference_client import InferenceClient
from ehrbridge.adapters.memory import MemoryStateStore
from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.adapters.sqlite_results import SqliteResultStore
from ehrbridge.config import load_site_config, parse_site_config
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import MessageUnusable
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import (
    Demographics,
    Fact,
    FactRules,
    PatientExtract,
    extract,
)
from ehrbridge.pipelines.features import FeatureRecord, evaluate
from ehrbridge.pipelines.process import ProcessStage, site_prediction
from ehrbridge.pipelines.records import ModelInfo
from ehrbridge.pipelines.results import Delivery
from ehrbridge.pipelines.state import PatientState
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

SITE = Path(__file__).resolve().parents[2] / "sandbox" / "site.yaml"
CONFIG = load_site_config(SITE)
RULES = FactRules(CONFIG.mapping)
RECEIVED = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
SERVICE = "/cds-services/kfre-patient-view"

MSH = "MSH|^~\\&|LIS|LAB|EHRBRIDGE|HOSP|{msh7}||ORU^R01^ORU_R01|CTRL1|P|2.5.1"
PID = "PID|1||MRN42^^^SANDBOX^MR||Doe^Jane||{birth}|F"
OBR = "OBR|1|P1|F1|24362-6^Renal panel^LN|||{obr7}"
OBX = "OBX|1|NM|98979-8^eGFR^LN||30|mL/min/{{1.73_m2}}^^UCUM|||||F|||{obx14}"


def message(
    obx14: str = "20260110080000+0000",
    *,
    obr7: str = "20260110080000+0000",
    birth: str = "19600101",
    msh7: str = "20260110110000+0000",
) -> Message:
    segments = (MSH.format(msh7=msh7), PID.format(birth=birth), OBR.format(obr7=obr7))
    return Message.parse("\r".join((*segments, OBX.format(obx14=obx14))))


def refusal(msg: Message, received_at: datetime = RECEIVED, rules: FactRules = RULES) -> str:
    with pytest.raises(MessageUnusable) as error:
        extract(msg, rules, received_at=received_at)
    assert error.value.hl7_error_code == 102
    assert "3000" not in error.value.detail and "1960" not in error.value.detail  # no PHI
    return f"{error.value.reason} at {error.value.location}"


def rules_with(**values: object) -> FactRules:
    data = CONFIG.model_dump(mode="json")
    data["mapping"]["values"].update(values)
    return FactRules(parse_site_config(yaml.safe_dump(data)).mapping)


# --------------------------------------------------------------------------- at ingest


def test_a_result_dated_in_the_year_3000_is_unusable() -> None:
    assert refusal(message("30000101")) == "obx.future_dated at OBX-14"


def test_the_obr7_fallback_time_is_checked_too() -> None:
    assert refusal(message("", obr7="30000101")) == "obx.future_dated at OBR-7"


def test_a_few_minutes_of_clock_skew_are_tolerated_and_the_tolerance_is_the_sites() -> None:
    four_minutes = (RECEIVED + timedelta(minutes=4)).strftime("%Y%m%d%H%M%S+0000")
    six_minutes = (RECEIVED + timedelta(minutes=6)).strftime("%Y%m%d%H%M%S+0000")
    assert extract(message(four_minutes), RULES, received_at=RECEIVED).patients[0].facts
    assert refusal(message(six_minutes)) == "obx.future_dated at OBX-14"
    hour = rules_with(future_tolerance_s=3600)
    assert extract(message(six_minutes), hour, received_at=RECEIVED).patients[0].facts
    none = rules_with(future_tolerance_s=0)
    one_second = (RECEIVED + timedelta(seconds=1)).strftime("%Y%m%d%H%M%S+0000")
    assert refusal(message(one_second), rules=none) == "obx.future_dated at OBX-14"


def test_times_are_judged_against_the_receipt_not_the_clock() -> None:
    """A replay judges a record as ingest did: received_at travels with it."""
    june = message("20260601080000+0000")
    assert refusal(june, received_at=RECEIVED) == "obx.future_dated at OBX-14"
    assert extract(june, RULES, received_at=datetime(2026, 7, 1, tzinfo=UTC)).patients


def test_implausible_past_dates_are_unusable() -> None:
    assert refusal(message("18991231")) == "obx.implausible_date at OBX-14"
    assert refusal(message("19590101", birth="19600101")) == "obx.before_birth_date at OBX"


def test_a_future_msh7_does_not_freeze_demographics() -> None:
    """MSH-7 orders demographic updates; one in 3000 would make every later one 'older'."""
    [patient] = extract(message(msh7="30000101"), RULES, received_at=RECEIVED).patients
    assert patient.demographics.as_of is None and patient.demographics.birth_date


def test_explain_mode_reports_the_problem_and_walks_on() -> None:
    from ehrbridge.pipelines.facts import Trace

    trace = Trace()
    extract(message("30000101"), RULES, trace, received_at=RECEIVED)
    assert any(p.startswith("obx.future_dated") for p in trace.problems)


# --------------------------------------------------------------------------- defence in depth


def fact(value: float, when: datetime, ref: str, feature: str = "egfr") -> Fact:
    unit = "mL/min/{1.73_m2}" if feature == "egfr" else "mg/g"
    code = "98979-8" if feature == "egfr" else "9318-7"
    return Fact(feature, value, unit, when, ref, ref.split("/", maxsplit=1)[0], "LN", code)


def test_a_future_fact_already_in_state_is_never_the_latest_or_an_anchor() -> None:
    """State written before ingest refused such results (an older log) holds one."""
    state = PatientState("P1")
    future = datetime(3000, 1, 1, tzinfo=UTC)
    old_log = [fact(60.0, future, "OLD/OBX/1"), fact(1.0, future, "OLD/OBX/2", "uacr")]
    demographics = Demographics(date(1960, 1, 1), "F", None)
    assert evaluate(state, PatientExtract("P1", demographics, old_log), CONFIG.mapping) is None
    genuine = [fact(12.0, RECEIVED, "NEW/OBX/1"), fact(2500.0, RECEIVED, "NEW/OBX/2", "uacr")]
    result = evaluate(state, PatientExtract("P1", demographics, genuine), CONFIG.mapping)
    assert isinstance(result, FeatureRecord)
    assert result.anchor == RECEIVED and (result["egfr"], result["uacr"]) == (12.0, 2500.0)


def test_the_processing_stage_dead_letters_a_future_dated_record_from_an_older_log() -> None:
    raw = SyntheticEhr(patients=1).renal_oru_for(
        age=66, female=True, at=RECEIVED, egfr=12.0, uacr_mg_g=2500.0, mrn="MFUT"
    )
    raw = raw.replace(b"20260110120000+0000", b"30000101120000+0000")
    assert raw.count(b"30000101") >= 3  # OBR-7 and both OBX-14
    envelope = Envelope("sandbox", "C1", raw, Kind.HL7V2, "MFUT", received_at=RECEIVED)
    double = OipDouble()
    model = InferenceClient(
        CONFIG.model, client=httpx.Client(transport=httpx.MockTransport(double))
    )
    try:
        stage = ProcessStage(CONFIG, MemoryStateStore(), model)
        [outcome] = stage.process([envelope])
    finally:
        model.close()
    assert isinstance(outcome, Failure) and outcome.permanent
    assert outcome.error.reason == "obx.future_dated"
    assert stage.state.get("MFUT") is None  # it never reached the patient's state
    assert double.calls == 0  # nor the model


def test_the_result_store_never_calls_a_future_anchored_result_the_latest(
    tmp_path: Path,
) -> None:
    store = SqliteResultStore(tmp_path / "results.sqlite")
    model = ModelInfo("kfre-4var", "1", "north_american")
    demographics = Demographics(date(1960, 1, 1), "F", None)
    for when, ref in ((RECEIVED, "GOOD"), (datetime(3000, 1, 1, tzinfo=UTC), "BAD")):
        state = PatientState("P1")
        facts = [fact(12.0, when, f"{ref}/OBX/1"), fact(2500.0, when, f"{ref}/OBX/2", "uacr")]
        result = evaluate(state, PatientExtract("P1", demographics, facts), CONFIG.mapping, when)
        assert isinstance(result, FeatureRecord)
        prediction = site_prediction(
            CONFIG, model, "P1", result, {"risk_2y": 0.7, "risk_5y": 0.9}, source_id=ref
        )
        store.upsert([(prediction, {})], Delivery.SHADOW)
    latest = store.latest("P1", datetime(2026, 12, 1, tzinfo=UTC))
    assert latest is not None and latest.anchor == RECEIVED.isoformat()
    unguarded = store.latest("P1")
    assert unguarded is not None and unguarded.anchor.startswith("3000")
    store.close()


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("result-times")) as running:
        yield running


def renal(mrn: str, at: datetime, egfr: float, uacr: float) -> bytes:
    return SyntheticEhr(patients=1).renal_oru_for(
        age=66,
        female=True,
        at=at,
        egfr=egfr,
        uacr_mg_g=uacr,
        mrn=mrn,
        control_id=f"C{uuid.uuid4().hex[:10]}",
    )


def card(sandbox: BackgroundSandbox, api: str, mrn: str) -> dict[str, object]:
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": mrn},
    }
    [only] = httpx.post(
        f"{api}{SERVICE}", json=body, headers=cds_headers(sandbox, api), timeout=10
    ).json()["cards"]
    assert isinstance(only, dict)
    return only


def test_a_future_dated_copy_of_a_critical_result_is_refused_and_the_card_stays_critical(
    sandbox: BackgroundSandbox,
) -> None:
    """The issue's scenario on real sockets: critical, then 30000101 (AE), then genuine news."""
    api, port, mrn = sandbox.sandbox.api_url, sandbox.sandbox.mllp_port, f"M{uuid.uuid4().hex[:9]}"
    january = datetime(2026, 1, 10, tzinfo=UTC)
    with MllpClient("127.0.0.1", port) as client:
        assert client.send(renal(mrn, january, 12.0, 2500.0)).code == "AA"
    results = f"{api}/api/results"
    wait_for(
        lambda: httpx.get(results, params={"patient": mrn}, headers=auth(sandbox)).json()[
            "results"
        ],
        what="score",
    )
    critical = card(sandbox, api, mrn)
    assert critical["indicator"] == "critical"

    future = renal(mrn, january, 12.0, 2500.0).replace(
        b"20260110000000+0000", b"30000101000000+0000"
    )
    with MllpClient("127.0.0.1", port) as client:
        ack = client.send(future)
    assert ack.code == "AE"
    runtime = sandbox.sandbox.runtime
    assert runtime is not None
    [kept] = [
        r
        for r in runtime.log.read(runtime.topic("dlq"), limit=100_000)
        if r.value == future  # the raw bytes, with the reason
    ]
    assert kept.headers["error.reason"] == "obx.future_dated"
    assert card(sandbox, api, mrn) == critical
    patient = httpx.get(f"{api}/api/patients/{mrn}", headers=auth(sandbox)).json()
    assert all(f["effective"] < "2027" for facts in patient["facts"].values() for f in facts)

    february = datetime(2026, 2, 10, tzinfo=UTC)
    with MllpClient("127.0.0.1", port) as client:
        assert client.send(renal(mrn, february, 30.0, 300.0)).code == "AA"
    newer = wait_for(
        lambda: (c := card(sandbox, api, mrn))["uuid"] != critical["uuid"] and c,
        what="the card to follow the genuine later result",
    )
    assert newer["indicator"] == "warning"
    assert "2026-02-10" in str(newer["detail"])
