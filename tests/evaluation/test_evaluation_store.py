"""The evaluation store keeps events and links between evaluations; each step computed by hand.

Two predictions made on day 0 (2020-01-01): the 2-year window ends on day
730, the 5-year one on day 1826. p0 is seen on day 800; p1 is seen on day
800 and dies on day 1000, a death already in the export the first time but
dated after that evaluation's as-of time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import yaml

from ehrbridge.adapters.sqlite_evaluation import SqliteLinkStore
from ehrbridge.evaluate import relink
from ehrbridge.evaluation.linkage import PredictionRef, Status
from ehrbridge.evaluation.outcomes import Event, EventKind, OutcomeSpec, builtin_outcome

T0 = datetime(2020, 1, 1, tzinfo=UTC)
SPEC = OutcomeSpec.model_validate(yaml.safe_load(builtin_outcome("kfre-4var").read_text()))
PREDICTIONS = [
    PredictionRef(f"id{i}", f"p{i}", T0, {"risk_2y": 0.1, "risk_5y": 0.2}) for i in range(2)
]
EXPORT = [
    Event(T0 + timedelta(days=800), "p0", EventKind.CONTACT),
    Event(T0 + timedelta(days=800), "p1", EventKind.CONTACT),
    Event(T0 + timedelta(days=1000), "p1", EventKind.DEATH),
    Event(T0 + timedelta(days=1000), "p1", EventKind.CONTACT),
    Event(T0 + timedelta(days=300), "p1", EventKind.LAB, 42.0),
]


def day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def evaluate(path: Path, as_of: datetime, events: list[Event]) -> tuple[dict, int]:
    """One evaluation as `ehrbridge evaluate` runs it: a store opened afresh, the export fed."""
    store = SqliteLinkStore(path)
    try:
        store.reset_unless(SPEC.model_dump_json())
        book = relink(store, SPEC, PREDICTIONS, store.add(events), as_of=as_of)
    finally:
        store.close()
    return {k: (v.status, v.at) for k, v in book.links.items()}, book.relinked


def test_links_persist_and_only_what_can_change_is_relinked(tmp_path: Path) -> None:
    path = tmp_path / "links.sqlite"
    # As of day 900: both followed past day 730 (no event at 2 y); 5 y not ended (pending).
    links, relinked = evaluate(path, day(900), EXPORT)
    assert relinked == 4
    assert links == {
        ("id0", "2y"): (Status.NO_EVENT, day(730)),
        ("id1", "2y"): (Status.NO_EVENT, day(730)),
        ("id0", "5y"): (Status.PENDING, day(1826)),
        ("id1", "5y"): (Status.PENDING, day(1826)),
    }
    # As of day 1100, the same export again: nothing new, but p1's death (day 1000) fell
    # due, so p1 is relinked at both horizons, and p0's pending 5 y link is redone: 3.
    links, relinked = evaluate(path, day(1100), EXPORT)
    assert relinked == 3
    assert links[("id1", "5y")] == (Status.CENSORED, day(1000))  # died inside the window
    assert links[("id1", "2y")] == (Status.NO_EVENT, day(730))  # death after 2 y: no change
    assert links[("id0", "5y")] == (Status.PENDING, day(1826))
    # As of day 2000, the 5 y window has ended: p0 was last seen on day 800, before its
    # end, so censored there; only that pending link is redone.
    links, relinked = evaluate(path, day(2000), EXPORT)
    assert relinked == 1
    assert links[("id0", "5y")] == (Status.CENSORED, day(800))
    # A dialysis code for p0 on day 1500 arrives late: p0 relinked at both horizons.
    late = [Event(day(1500), "p0", EventKind.OUTCOME, code="ICD-10|N18.6")]
    links, relinked = evaluate(path, day(2000), [*EXPORT, *late])
    assert relinked == 2
    assert links[("id0", "5y")] == (Status.EVENT, day(1500))
    assert links[("id0", "2y")] == (Status.NO_EVENT, day(730))


def test_an_earlier_as_of_relinks_everything_from_what_was_known_then(tmp_path: Path) -> None:
    path = tmp_path / "links.sqlite"
    evaluate(path, day(2000), EXPORT)
    links, relinked = evaluate(path, day(900), EXPORT)
    assert relinked == 4
    assert links[("id1", "5y")] == (Status.PENDING, day(1826))  # the death is not known yet


def test_events_are_stored_once_and_read_back_as_fed(tmp_path: Path) -> None:
    store = SqliteLinkStore(tmp_path / "links.sqlite")
    try:
        assert store.add(EXPORT) == {"p0", "p1"}
        assert store.add(EXPORT) == set()  # the same export again names no patient
        assert sorted(store.events()) == sorted(EXPORT)  # value None and 42.0 both survive
        assert store.falling_due(day(900), day(1000)) == {"p1"}
        assert store.falling_due(day(1000), day(5000)) == set()
        store.reset_unless("another outcome definition")
        assert store.events() == [] and store.links() == {} and store.last_as_of() is None
    finally:
        store.close()


def adt(control: str, when: str, *segments: str, death: str = "") -> bytes:
    pid = ["PID", "1", "", "MRN7^^^SANDBOX^MR", "", "Doe^Jo", "", "19600101", "F"]
    pid += [""] * (29 - len(pid)) + [death]  # PID-29 patient death date and time
    msh = f"MSH|^~\\&|ADT|H|EB|H|{when}||ADT^A08|{control}|P|2.5.1"
    return "\r".join([msh, "|".join(pid), *segments]).encode()


def test_live_traffic_in_the_sites_log_feeds_the_store_once(tmp_path: Path) -> None:
    from ehrbridge.adapters.sqlite_log import SqliteLog
    from ehrbridge.config import load_site_config
    from ehrbridge.core.contracts import Envelope, Kind
    from ehrbridge.evaluate import feed_live
    from ehrbridge.pipelines.transport import to_record, topic_name

    repo = Path(__file__).resolve().parents[2]
    site = load_site_config(repo / "sandbox" / "site.yaml")
    config = site.model_copy(update={"data_dir": tmp_path})
    log = SqliteLog(tmp_path / "log.sqlite")
    raw = topic_name(config.site, "raw")

    def receive(payload: bytes, kind: Kind = Kind.HL7V2) -> None:
        log.append([to_record(Envelope(config.site, "x", payload, kind, "MRN7"), raw)])

    dialysis = "DG1|1||N18.6^End stage renal disease^I10||20240103"
    receive(adt("A", "20240105120000+0000", dialysis))
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/p7"},
                 "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                      "code": "Z99.2"}]},
                 "onsetDateTime": "2024-02-01T00:00:00Z"}  # fmt: skip
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": condition}]}
    receive(orjson.dumps(bundle), Kind.FHIR)
    store = SqliteLinkStore(tmp_path / "links.sqlite")
    try:
        assert feed_live(store, SPEC, config) == {"MRN7"}
        outcomes = sorted(e.code for e in store.events() if e.kind is EventKind.OUTCOME)
        assert outcomes == ["ICD-10|N18.6", "ICD-10|Z99.2"]
        assert feed_live(store, SPEC, config) == set()  # read up to its offset: nothing new
        receive(adt("B", "20240501", death="20240430"))
        assert feed_live(store, SPEC, config) == {"MRN7"}
        assert [e.at.date().isoformat() for e in store.events() if e.kind is EventKind.DEATH] == [
            "2024-04-30"
        ]
    finally:
        store.close()
        log.close()
