"""Outcome linkage: each case with its expectation computed by hand from the dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml

from ehrbridge.evaluation.linkage import LinkBook, Linker, PredictionRef, Status
from ehrbridge.evaluation.outcomes import (
    Event,
    EventKind,
    OutcomeSpec,
    Recogniser,
    builtin_outcome,
    read_code_map,
)

T0 = datetime(2020, 1, 1, tzinfo=UTC)  # every prediction's anchor
TWO_YEARS_END = T0 + timedelta(days=730)  # 2021-12-31
AFTER_5Y = T0 + timedelta(days=2000)


def spec() -> OutcomeSpec:
    return OutcomeSpec.model_validate(yaml.safe_load(builtin_outcome("kfre-4var").read_text()))


def day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def ev(n: int, kind: EventKind, value: float | None = None, patient: str = "p") -> Event:
    return Event(day(n), patient, kind, value)


def link(events: list[Event], horizon: str = "2y", as_of: datetime = AFTER_5Y) -> tuple:
    linker = Linker(spec())
    linker.add(events)
    got = linker.link(
        PredictionRef("id", "p", T0, {"risk_2y": 0.1, "risk_5y": 0.2}), horizon, as_of
    )
    return got.status, got.at, got.reason


def test_dialysis_code_inside_the_window_is_an_event_dated_by_the_code() -> None:
    events = [ev(100, EventKind.OUTCOME), ev(900, EventKind.CONTACT)]
    assert link(events)[:2] == (Status.EVENT, day(100))


def test_dialysis_after_two_years_is_no_event_at_2y_but_an_event_at_5y() -> None:
    events = [ev(800, EventKind.OUTCOME)]  # 2022-03-11: after day 730, before day 1826
    assert link(events, "2y")[0] is Status.NO_EVENT  # the code itself shows follow-up past 2y
    assert link(events, "5y")[:2] == (Status.EVENT, day(800))


def test_sustained_egfr_below_15_dates_the_event_at_the_first_value() -> None:
    # day 600: 12; day 650: 13 (only 50 days later); day 700: 11 (100 days after 600).
    events = [ev(600, EventKind.LAB, 12), ev(650, EventKind.LAB, 13), ev(700, EventKind.LAB, 11)]
    assert link(events)[:2] == (Status.EVENT, day(600))


def test_confirmation_after_the_window_still_counts_for_a_low_value_inside_it() -> None:
    events = [ev(700, EventKind.LAB, 12), ev(800, EventKind.LAB, 10)]
    assert link(events)[:2] == (Status.EVENT, day(700))


def test_a_value_back_over_15_in_between_breaks_the_sustained_run() -> None:
    events = [
        ev(100, EventKind.LAB, 12),
        ev(150, EventKind.LAB, 22),
        ev(250, EventKind.LAB, 13),
        ev(900, EventKind.CONTACT),
    ]
    # day 100 is not sustained (22 at day 150); day 250 has no second low value at all.
    assert link(events)[0] is Status.NO_EVENT


def test_a_low_value_awaiting_confirmation_is_pending() -> None:
    events = [ev(700, EventKind.LAB, 12)]
    as_of = day(760)  # the 2y window ended at day 730, confirmation due by day 790
    assert link(events, as_of=as_of)[:3] == (
        Status.PENDING,
        day(700),
        "low value awaiting confirmation",
    )


def test_death_inside_the_window_censors() -> None:
    events = [ev(300, EventKind.DEATH), ev(200, EventKind.CONTACT)]
    assert link(events)[:3] == (Status.CENSORED, day(300), "death")


def test_death_after_the_window_shows_follow_up_past_it() -> None:
    assert link([ev(1000, EventKind.DEATH)], "2y")[0] is Status.NO_EVENT
    assert link([ev(1000, EventKind.DEATH)], "5y")[:2] == (Status.CENSORED, day(1000))


def test_last_contact_before_the_window_end_censors_at_that_contact() -> None:
    events = [ev(400, EventKind.CONTACT)]
    assert link(events)[:3] == (Status.CENSORED, day(400), "last contact before horizon end")


def test_window_not_ended_is_pending_until_its_end() -> None:
    events = [ev(400, EventKind.CONTACT)]
    assert link(events, as_of=day(500))[:3] == (Status.PENDING, TWO_YEARS_END, "horizon not ended")


def test_events_dated_after_as_of_are_not_known_yet() -> None:
    events = [ev(100, EventKind.OUTCOME)]
    assert link(events, as_of=day(50))[0] is Status.PENDING


def test_an_outcome_before_the_prediction_is_prevalent() -> None:
    assert link([ev(-30, EventKind.OUTCOME), ev(900, EventKind.CONTACT)])[0] is Status.PREVALENT


def test_linking_is_incremental() -> None:
    linker = Linker(spec())
    preds = [
        PredictionRef(f"id{i}", f"p{i}", T0, {"risk_2y": 0.1, "risk_5y": 0.2}) for i in range(3)
    ]
    book = LinkBook()
    changed = linker.add([Event(day(800), f"p{i}", EventKind.CONTACT) for i in range(3)])
    book.refresh(linker, preds, changed, as_of=day(900))
    assert book.counts("2y")["no_event"] == 3 and book.counts("5y")["pending"] == 3
    # A dialysis code arrives for p1 only: p1's links and the pending 5y ones are redone.
    changed = linker.add([Event(day(1000), "p1", EventKind.OUTCOME)])
    book.refresh(linker, preds, changed, as_of=day(1100))
    assert book.relinked == 2 + 2  # p1 at both horizons + p0 and p2 at 5y (pending)
    assert book.links[("id1", "5y")].status is Status.EVENT
    assert book.links[("id1", "2y")].status is Status.NO_EVENT
    assert book.counts("5y") == {
        "event": 1,
        "no_event": 0,
        "censored": 0,
        "pending": 2,
        "prevalent": 0,
    }


def test_fhir_resources_become_events() -> None:
    outcome = spec().with_codes(read_code_map("system,code,display\nurn:site:proc,HD1,hemo\n"))
    rec = Recogniser.of(outcome)
    condition = {
        "resourceType": "Condition",
        "onsetDateTime": "2021-05-01",
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "N18.6"}]},
    }
    local = {
        "resourceType": "Procedure",
        "status": "completed",
        "performedPeriod": {"start": "2021-06-01T10:00:00Z"},
        "code": {"coding": [{"system": "urn:site:proc", "code": "HD1"}]},
    }
    refuted = {**condition, "verificationStatus": {"coding": [{"code": "refuted"}]}}
    egfr = {
        "resourceType": "Observation",
        "status": "final",
        "effectiveDateTime": "2021-07-01",
        "code": {"coding": [{"system": "http://loinc.org", "code": "33914-3"}]},
        "valueQuantity": {"value": 12.5, "unit": "mL/min/{1.73_m2}"},
    }
    patient = {"resourceType": "Patient", "deceasedDateTime": "2022-01-02T00:00:00+01:00"}
    kinds = {
        r["resourceType"]: [e.kind for e in rec.events(r, "p")]
        for r in (condition, local, egfr, patient)
    }
    assert kinds == {
        "Condition": [EventKind.CONTACT, EventKind.OUTCOME],
        "Procedure": [EventKind.CONTACT, EventKind.OUTCOME],
        "Observation": [EventKind.CONTACT, EventKind.LAB],
        "Patient": [EventKind.DEATH],
    }
    assert rec.events(refuted, "p") == []
    assert rec.events(egfr, "p")[1].value == pytest.approx(12.5)
    assert rec.events(patient, "p")[0].at == datetime(2022, 1, 1, 23, tzinfo=UTC)


def test_a_code_map_without_its_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="system,code"):
        read_code_map("code_system,value\nx,y\n")
