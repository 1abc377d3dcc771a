"""/metrics and /health/ready on a running site, over real MLLP and HTTP (issue 15)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from auth_tokens import headers as auth
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_message_types import message
from test_mllp import renal, send, send_raw

from ehrbridge.bench.common import free_port
from ehrbridge.config import MessagePolicy, SiteConfig
from ehrbridge.pipelines.metrics import KNOWN_REASONS, bounded_reason
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, keyed by name and label set."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def metrics_page(site: BackgroundSandbox) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{site.sandbox.api_url}/metrics", headers=auth(site))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    def configure(config: SiteConfig) -> SiteConfig:
        return config.model_copy(update={"message_types": {"ORM^O01": MessagePolicy.FILTER}})

    data_dir = tmp_path_factory.mktemp("metrics")
    with BackgroundSandbox(data_dir, configure=configure, fhir_site=False) as running:
        yield running


def renal_panel(ehr: SyntheticEhr) -> tuple[bytes, str, str]:
    return renal(ehr, age=70, female=False, egfr=25.0, uacr_mg_g=300.0)


def test_known_traffic_gives_exact_counts(site: BackgroundSandbox, ehr: SyntheticEhr) -> None:
    for _ in range(3):
        assert send(site, renal_panel(ehr)[0]).code == "AA"
    unusable, _, _ = renal_panel(ehr)
    assert send(site, unusable.replace(b"\rPID|", b"\rXXX|", 1)).code == "AE"
    assert send_raw(site, b"\x0bnot hl7 at all\x1c\x0d").find(b"MSA|AR") >= 0
    for n in range(2):
        assert send(site, message("ORM^O01", f"F{n}")).code == "AA"

    def written_back() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        page = metrics_page(site)
        ok = value(page, "ehrbridge_writeback_total", site="sandbox", target="fhir", outcome="ok")
        return page if ok == 3 else None

    page = wait_for(written_back, what="3 results written back")
    counts = {
        outcome: value(
            page, "ehrbridge_messages_total", site="sandbox", source="mllp", outcome=outcome
        )
        for outcome in ("aa", "ae", "ar", "filtered")
    }
    assert counts == {"aa": 3, "ae": 1, "ar": 1, "filtered": 2}
    assert (
        value(page, "ehrbridge_dead_letters_total", site="sandbox", reason="hl7.missing_pid") == 1
    )
    predictions = sum(
        v
        for (name, labels), v in page.items()
        if name == "ehrbridge_predictions_total" and ("mode", "live") in labels
    )
    assert predictions == 3
    model = value(
        page, "ehrbridge_model_requests_total", site="sandbox", model="kfre-4var", outcome="ok"
    )
    assert 1 <= model <= 3  # one request per batch
    assert value(page, "ehrbridge_feed_silence_seconds", site="sandbox", source="mllp") < 60
    assert value(page, "ehrbridge_mllp_connections_open", site="sandbox") == 0


def test_no_identifier_is_a_label_value(site: BackgroundSandbox, ehr: SyntheticEhr) -> None:
    message_bytes, control_id, mrn = renal_panel(ehr)
    assert send(site, message_bytes).code == "AA"
    text = httpx.get(f"{site.sandbox.api_url}/metrics", headers=auth(site)).text
    assert control_id not in text and mrn not in text


def test_ready_names_each_check(site: BackgroundSandbox) -> None:
    response = httpx.get(f"{site.sandbox.api_url}/health/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["checks"] == {"log": "ok", "model": "ok", "writeback.fhir": "ok"}
    assert httpx.get(f"{site.sandbox.api_url}/health/live").json() == {"status": "ok"}


def test_ready_is_503_naming_the_model_when_it_does_not_answer(tmp_path: Path) -> None:
    def uncached(config: SiteConfig) -> SiteConfig:
        monitoring = config.monitoring.model_copy(update={"ready_cache_s": 0})
        return config.model_copy(update={"monitoring": monitoring})

    with BackgroundSandbox(tmp_path, configure=uncached, fhir_site=False) as running:
        ready = f"{running.sandbox.api_url}/health/ready"
        assert httpx.get(ready).status_code == 200
        running.call(running.sandbox.model.stop())
        response = httpx.get(ready)
    assert response.status_code == 503
    assert response.json()["failed"] == ["model"]
    assert response.json()["checks"]["model"].startswith("not ready at")


def test_a_process_without_ingest_serves_metrics_on_monitoring_port(
    site: BackgroundSandbox, tmp_path: Path
) -> None:
    runtime = site.sandbox.runtime
    assert runtime is not None
    port = free_port()
    monitoring = runtime.config.monitoring.model_copy(update={"port": port})
    config = runtime.config.model_copy(
        update={"monitoring": monitoring, "data_dir": tmp_path, "mode": runtime.config.mode}
    )

    async def scrape() -> tuple[int, str, int]:
        worker = SiteRuntime(config, {Role.PROCESS})
        await worker.start()
        try:
            async with httpx.AsyncClient() as client:
                url = f"http://127.0.0.1:{port}/metrics"
                metrics = await client.get(url, headers=auth(site, "viewer"))
                ready = await client.get(f"http://127.0.0.1:{port}/health/ready")
        finally:
            await worker.stop()
        return metrics.status_code, metrics.text, ready.status_code

    status, text, ready = asyncio.run(scrape())
    assert (status, ready) == (200, 200)
    assert "ehrbridge_stage_duration_seconds" in text


def test_every_reason_code_in_the_source_is_a_known_label() -> None:
    """A reason not in KNOWN_REASONS would be counted as `other`: keep the list complete."""
    found = set()
    for folder in ("pipelines", "adapters", "ehrbridge", "mappings"):
        for path in (ROOT / folder).rglob("*.py"):
            for match in re.finditer(r'reason\s*=\s*"([a-z0-9_]+\.[a-z0-9_]+)"', path.read_text()):
                found.add(match.group(1))
    assert len(found) > 40
    assert found <= KNOWN_REASONS, sorted(found - KNOWN_REASONS)
    assert bounded_reason("fhir.http_418") == "other"
