"""Message types a site does not use, over real MLLP: reject by the HL7 rule, or filter.

Issue 10, finding 8: every type but ORU^R01 and ADT got AE and a dead letter.
HL7 v2 original mode answers an unsupported type with AR and ERR code 200,
an unsupported trigger with AR and 201; a site may instead filter a feed's
types it does not need (AA, counted, stored nowhere).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from test_mllp import dead_letters, renal, send

from ehrbridge.config import MessagePolicy, SiteConfig, parse_site_config
from ehrbridge.core.errors import ConfigError
from ehrbridge.pipelines.er7 import Message
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

POLICY = {"ORM^O01": MessagePolicy.FILTER, "ADT^A08": MessagePolicy.REJECT}


def with_policy(config: SiteConfig) -> SiteConfig:
    return config.model_copy(update={"message_types": POLICY})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    data_dir = tmp_path_factory.mktemp("message-types")
    with BackgroundSandbox(data_dir, configure=with_policy, fhir_site=False) as running:
        yield running


def message(kind: str, control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|LAB|HOSP|EHB|SITE|20260101120000||{kind}|{control_id}|P|2.5.1\r"
        "PID|1||M1^^^SANDBOX^MR||DOE^JANE||19500101|F\r"
        "ORC|NW|O1\r"
    ).encode()


def error_code(raw: bytes) -> str:
    return Message.parse(raw.strip(b"\x0b\x1c\r")).get("ERR-3.1")


def raw_records(site: BackgroundSandbox, control_id: str) -> list[object]:
    runtime = site.sandbox.runtime
    assert runtime is not None
    records = runtime.log.read(runtime.topic("raw"), limit=100_000)
    return [r for r in records if r.headers.get("source_id") == control_id]


@pytest.mark.parametrize(
    ("kind", "code", "reason"),
    [
        ("SIU^S12", "200", "hl7.unsupported_type"),  # a type nobody listed
        ("ORU^R30", "201", "hl7.unsupported_event"),  # a known type, unlisted trigger
        ("ADT^A08", "201", "hl7.unsupported_event"),  # a trigger the site rejects
    ],
)
def test_unused_types_get_ar_with_the_hl7_code_and_a_dead_letter(
    site: BackgroundSandbox, kind: str, code: str, reason: str
) -> None:
    control_id = f"T-{kind.replace('^', '-')}"
    ack = send(site, message(kind, control_id))
    assert (ack.code, ack.control_id) == ("AR", control_id)
    assert error_code(ack.raw) == code
    [kept] = dead_letters(site, control_id)
    assert kept.headers["error.reason"] == reason
    assert kept.value == message(kind, control_id)
    assert raw_records(site, control_id) == []


def test_filtered_types_get_aa_are_counted_and_stored_nowhere(site: BackgroundSandbox) -> None:
    health = f"{site.sandbox.api_url}/health"
    before = httpx.get(health).json()["filtered"].get("ORM^O01", 0)
    for n in range(3):
        ack = send(site, message("ORM^O01", f"F-{n}"))
        assert (ack.code, ack.control_id) == ("AA", f"F-{n}")
    assert httpx.get(health).json()["filtered"]["ORM^O01"] == before + 3
    for n in range(3):
        assert dead_letters(site, f"F-{n}") == []
        assert raw_records(site, f"F-{n}") == []


def test_the_types_ehrbridge_reads_are_still_accepted(
    site: BackgroundSandbox, ehr: SyntheticEhr
) -> None:
    oru, control_id, _ = renal(ehr, egfr=25.0, uacr_mg_g=300.0, age=70, female=False)
    assert send(site, oru).code == "AA"
    assert raw_records(site, control_id) != []
    admit = message("ADT^A01", "ADMIT-1").replace(b"ORC|NW|O1\r", b"")
    assert send(site, admit).code == "AA"


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("ORM^O01: accept", "reads only ORU^R01 and ADT"),
        ("ORM-O01: filter", "write TYPE^TRIGGER"),
        ("ORM^O01: drop", "'accept', 'filter' or 'reject'"),
    ],
)
def test_a_bad_message_types_entry_names_its_line(entry: str, complaint: str) -> None:
    text = sandbox_site_file().read_text() + f"message_types:\n  {entry}\n"
    with pytest.raises(ConfigError) as caught:
        parse_site_config(text, "site.yaml")
    lines = len(text.splitlines())
    assert caught.value.line in (lines - 1, lines)  # the entry, or message_types: above it
    assert (caught.value.field or "").startswith("message_types")
    assert complaint in str(caught.value)
