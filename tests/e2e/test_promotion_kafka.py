"""Promotion on Kafka: one decision, made through the ingest process's API, switches the
write-back process (another OS process) without a restart, while MLLP traffic flows.

The site runs as three ``ehrbridge run --role`` processes (ingest, process,
write-back) on a real broker, in shadow. Mid-stream an admin promotes it over
HTTP. Afterwards every AA'd message's episode is in the result store exactly
once (none lost, none extra); the EHR (the FHIR stand-in, its own process)
holds exactly the results the store marks delivered, each once and with the
features the messages call for, and none of those left in shadow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_tokens import token_headers
from site_processes import (
    KafkaSite,
    all_observations,
    ehr_problems,
    expected_observations,
    observation_total,
    renal_histories,
    wait_until,
)
from test_kafka_faults import registry, servers, site  # noqa: F401 - fixtures

from ehrbridge.adapters.sqlite_results import SqliteResultStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def in_shadow(config: dict[str, Any]) -> None:
    config["mode"] = "shadow"


def stored(data: Path) -> dict[str, str]:
    store = SqliteResultStore(data / "results.sqlite")
    try:
        return {r.identifier: r.status for r in store.list(limit=100_000)}
    finally:
        store.close()


def test_a_promotion_reaches_the_writeback_process_mid_stream(site: KafkaSite) -> None:  # noqa: F811
    for role, name in (("process", "process-0"), ("writeback", "writeback"), ("ingest", "ingest")):
        site.start(role, name, edit=in_shadow)
    histories = renal_histories(600)  # 3,000 ORU^R01
    traffic = site.traffic(connections=2, resend=True).start(histories)
    data = site.root / "data"
    wait_until(lambda: len(stored(data)) >= 100, 240, "shadow results", site.diagnostics)
    assert observation_total(site.fhir_base) == 0  # shadow: nothing reached the EHR
    assert traffic.accepted_count() < sum(len(h) for h in histories), "stream ended too soon"

    api = f"http://127.0.0.1:{site.http_port}/api/models/kfre-4var/mode"
    body = {"mode": "live", "override": True, "reason": "Kafka switch under traffic (test)"}
    answer = httpx.post(api, json=body, headers=token_headers(data, "admin"), timeout=60)
    assert answer.status_code == 200, answer.text

    traffic.join()
    site.wait_drained()
    config = site.config()
    expected = expected_observations(config, traffic.accepted_in_order())
    statuses = stored(data)
    assert set(statuses) == set(expected), "a result lost or made up across the switch"
    delivered = {i: expected[i] for i, status in statuses.items() if status == "delivered"}
    shadow = [i for i, status in statuses.items() if status == "shadow"]
    assert delivered and shadow and len(delivered) + len(shadow) == len(statuses)
    problems = ehr_problems(config, all_observations(site.fhir_base), delivered)
    assert problems == [], f"{problems}\n{traffic.summary()}\n{site.diagnostics()}"
    assert site.roles["writeback"].alive  # switched in place, never restarted
