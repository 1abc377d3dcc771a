"""The alert rules under promtool, and a real Prometheus scraping a running site.

Prometheus is Debian's package, run by ``scripts/prometheus`` (installed with
apt-get when missing). In CI a Prometheus that cannot be had fails the run;
elsewhere these tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_for
from kafka_fixture import running_in_ci
from test_message_types import message
from test_metrics import renal_panel
from test_mllp import send, send_raw

from ehrbridge.config import FeedExpectation, MessagePolicy, SiteConfig
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "prometheus"
MONITORING = ROOT / "monitoring"


def _unavailable(why: str) -> None:
    if running_in_ci():
        pytest.fail(f"Prometheus is needed in CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A Prometheus of its own for this test session: its URL and its data dir."""
    data = tmp_path_factory.mktemp("prometheus")
    env = {**os.environ, "EHRBRIDGE_PROMETHEUS_DATA": str(data)}
    started = subprocess.run(
        [str(SCRIPT), "start"], check=False, capture_output=True, text=True, timeout=600, env=env
    )
    if started.returncode != 0:
        _unavailable(started.stderr.strip()[-500:])
    try:
        yield started.stdout.strip().splitlines()[-1], data
    finally:
        subprocess.run([str(SCRIPT), "stop"], check=False, capture_output=True, timeout=60, env=env)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=MONITORING,
    )


def test_alert_rules_pass_promtool_check(prometheus: tuple[str, Path]) -> None:
    assert shutil.which("promtool"), "promtool comes with the prometheus package"
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout


def test_alert_rules_pass_their_unit_tests(prometheus: tuple[str, Path]) -> None:
    """Feed silence, the UACR unit switch, dead letters, write-back, lag, missingness, flags."""
    tested = promtool("test", "rules", "alerts_test.yml", "alerts_weeks_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def query(url: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def test_prometheus_scrapes_a_site_and_finds_the_exact_counts(
    prometheus: tuple[str, Path], tmp_path: Path, ehr: SyntheticEhr
) -> None:
    url, data = prometheus

    def configure(config: SiteConfig) -> SiteConfig:
        return config.model_copy(update={"message_types": {"ORM^O01": MessagePolicy.FILTER}})

    with BackgroundSandbox(tmp_path, configure=configure, fhir_site=False) as site:
        target = site.sandbox.api_url.removeprefix("http://")
        viewer = site.sandbox.headers("viewer")["Authorization"].removeprefix("Bearer ")
        (data / "token").write_text(viewer + "\n")  # Prometheus' bearer token file
        (data / "targets" / "site.json").write_text(json.dumps([{"targets": [target]}]))
        wait_for(
            lambda: query(url, f'up{{instance="{target}"}} == 1') or None,
            what="Prometheus scraping the site",
        )
        for _ in range(3):
            assert send(site, renal_panel(ehr)[0]).code == "AA"
        unusable = renal_panel(ehr)[0].replace(b"\rPID|", b"\rXXX|", 1)
        assert send(site, unusable).code == "AE"
        assert b"MSA|AR" in send_raw(site, b"\x0bnot hl7 at all\x1c\x0d")
        for n in range(2):
            assert send(site, message("ORM^O01", f"P{n}")).code == "AA"
        expected = {"aa": 3.0, "ae": 1.0, "ar": 1.0, "filtered": 2.0}

        def counts() -> dict[str, float] | None:
            found = query(url, f'ehrbridge_messages_total{{instance="{target}"}}')
            got = {r["metric"]["outcome"]: float(r["value"][1]) for r in found}
            return got if got == expected else None

        assert wait_for(counts, what="the exact counts in Prometheus") == expected
        written = f'sum(ehrbridge_writeback_total{{instance="{target}",outcome="ok"}})'
        wait_for(lambda: query(url, f"{written} == 3") or None, what="3 write-backs")
        dead = query(url, f'ehrbridge_dead_letters_total{{instance="{target}"}}')
        by_reason = {r["metric"]["reason"]: r["value"][1] for r in dead}
        assert by_reason == {"hl7.missing_pid": "1", "hl7.no_msh": "1"}
        rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert sum(len(group["rules"]) for group in rules) == 11


def test_a_feed_that_stops_raises_the_feed_silent_alert_in_prometheus(
    prometheus: tuple[str, Path], tmp_path: Path, ehr: SyntheticEhr
) -> None:
    """A feed sends, then stops: Prometheus sees the silence grow and the shipped rule trip.

    The site declares 60 messages an hour, so the rule's threshold is its floor, 10
    minutes. The test does not wait 10 minutes: once the feed has stopped, the
    site's metrics clock is moved 20 minutes on, as if the time had passed (the
    silence is computed at scrape time from that clock). Prometheus then holds the
    alert pending (its ``for: 5m`` is Prometheus' own; monitoring/alerts_test.yml
    covers the firing). When the feed resumes, the alert goes away.
    """
    url, data = prometheus

    def configure(config: SiteConfig) -> SiteConfig:
        feeds = {"mllp": FeedExpectation(expected_per_hour=60)}
        return config.model_copy(
            update={"monitoring": config.monitoring.model_copy(update={"feeds": feeds})}
        )

    with BackgroundSandbox(tmp_path, configure=configure, fhir_site=False) as site:
        target = site.sandbox.api_url.removeprefix("http://")
        viewer = site.sandbox.headers("viewer")["Authorization"].removeprefix("Bearer ")
        (data / "token").write_text(viewer + "\n")
        (data / "targets" / "feed.json").write_text(json.dumps([{"targets": [target]}]))
        silence = f'ehrbridge_feed_silence_seconds{{instance="{target}",source="mllp"}}'
        alert = f'ALERTS{{alertname="EhrbridgeFeedSilent",instance="{target}",source="mllp"}}'
        for _ in range(3):
            assert send(site, renal_panel(ehr)[0]).code == "AA"
        first = wait_for(lambda: query(url, silence), what="the silence metric in Prometheus")
        expected = query(url, f'ehrbridge_feed_expected_messages{{instance="{target}"}}')
        assert [float(r["value"][1]) for r in expected] == [60.0]

        # The feed has stopped. Real time first: Prometheus sees the silence grow.
        at_first = float(first[0]["value"][1])
        grown = wait_for(
            lambda: [r for r in query(url, silence) if float(r["value"][1]) >= at_first + 2.0],
            what="the silence growing",
        )
        assert float(grown[0]["value"][1]) > float(first[0]["value"][1])
        assert query(url, alert) == []  # seconds of quiet are not an outage

        assert site.sandbox.runtime is not None
        metrics = site.sandbox.runtime.monitoring.metrics
        metrics.clock = lambda: datetime.now(UTC) + timedelta(minutes=20)
        pending = wait_for(lambda: query(url, alert), what="EhrbridgeFeedSilent pending")
        assert pending[0]["metric"]["alertstate"] == "pending"
        assert pending[0]["metric"]["site"] == site.sandbox.config.site
        assert query(url, f"{silence} > 1200")

        assert send(site, renal_panel(ehr)[0]).code == "AA"  # the feed resumes
        wait_for(lambda: not query(url, alert), what="the alert cleared when the feed resumed")
