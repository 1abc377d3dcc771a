"""The Prometheus implementation of :class:`~ehrbridge.pipelines.metrics.Metrics`.

One :class:`PrometheusMetrics` per site runtime, with a registry of its own
(several sites can run in one process, as the sandbox and the tests do).
``GET /metrics`` renders it (``ehrbridge/monitoring_api.py``). Names follow
the Prometheus conventions (``ehrbridge_`` prefix, ``_total`` counters, base
units: seconds, records); where OpenTelemetry's messaging semantic
conventions have a name for the same thing, the help text gives it.

Counts that other parts already keep are read from them when Prometheus
scrapes, not counted twice: the messages filtered by type
(``Ingest.message_types.filtered``, also in ``GET /health``), the MLLP
listener's connection counts (``MllpStats``) and Kafka consumer lag.

Feed clocks and the drift statistics are saved to the site's data dir
(``monitoring-feeds.json``, ``monitoring-drift.json``) every
``monitoring.save_interval_s`` and at stop, so a restart keeps what was
learned and the reference window.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ehrbridge.config import Mode, SiteConfig
from ehrbridge.pipelines.drift import INPUTS, SCORE, DriftMonitor
from ehrbridge.pipelines.feeds import FeedClock
from ehrbridge.pipelines.metrics import NOT_SCORED_REASONS, bounded_reason

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SOURCES = ("mllp", "fhir")
ACK_OUTCOMES = ("aa", "ae", "ar")
# Seconds: a batch of the processing stage holds up to 256 records and a model call.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MODEL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)

LagSource = Callable[[], Mapping[tuple[str, int], int]]
CountSource = Callable[[], Mapping[str, int]]


def now_utc() -> datetime:
    return datetime.now(UTC)


class PrometheusMetrics:
    """Counters, histograms and scrape-time gauges of one site."""

    def __init__(self, config: SiteConfig, clock: Callable[[], datetime] = now_utc) -> None:
        self.config = config
        self.site = config.site
        self.clock = clock
        # The mode in force; SiteMonitoring points it at the promote/demote switch.
        self.mode: Callable[[], Mode] = lambda: config.mode
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._messages: dict[tuple[str, str], int] = {}
        self.filtered: CountSource | None = None  # Ingest.message_types.filtered
        self.mllp_stats: CountSource | None = None  # MllpStats.snapshot
        self.lag_sources: list[LagSource] = []
        self.feeds = self._feed_clocks()
        self.drift: dict[str, DriftMonitor] = {}
        # A process without the processing role (the ingest process of a site whose roles
        # run as processes) counts no drift: it answers from what processing last saved.
        self.drift_from_file = False
        self._counters()
        self.registry.register(_ScrapeTime(self))

    # ------------------------------------------------------------------ families

    def _counters(self) -> None:
        r, site = self.registry, ["site"]
        self.dead_letters = Counter(
            "ehrbridge_dead_letters",
            "Records put in the dead-letter store, by reason code.",
            [*site, "reason"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "ehrbridge_stage_duration_seconds",
            "Time a stage spent on one batch (ingest: one message). "
            "OpenTelemetry: messaging.process.duration.",
            [*site, "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.model_requests = Counter(
            "ehrbridge_model_requests",
            "Inference requests to the model server (Open Inference Protocol v2), by outcome.",
            [*site, "model", "outcome"],
            registry=r,
        )
        self.model_duration = Histogram(
            "ehrbridge_model_request_duration_seconds",
            "Duration of one inference request, a batch of feature records. "
            "OpenTelemetry: http.client.request.duration.",
            [*site, "model"],
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "ehrbridge_predictions",
            "Predictions made, by interpretation band (N: below every threshold).",
            [*site, "model", "mode", "band"],
            registry=r,
        )
        self.not_scored_ = Counter(
            "ehrbridge_not_scored",
            "Feature records that got no score, by reason (not_enough_data, out_of_domain).",
            [*site, "model", "reason"],
            registry=r,
        )
        self.feature_records = Counter(
            "ehrbridge_feature_records",
            "Feature records evaluated (scored or not): the denominator of missingness.",
            [*site, "model"],
            registry=r,
        )
        self.feature_missing = Counter(
            "ehrbridge_feature_missing",
            "Feature records without a usable value of this input.",
            [*site, "model", "feature"],
            registry=r,
        )
        self.lab_results_ = Counter(
            "ehrbridge_lab_results",
            "Results received (OBX, Observation): mapped to a feature, or with a code the "
            "site mapping does not know (mapping drift: a new local code).",
            [*site, "mapping"],
            registry=r,
        )
        for mapping in ("mapped", "unmapped"):  # at 0: the unmapped share's baseline
            self.lab_results_.labels(self.site, mapping)
        self.writeback_ = Counter(
            "ehrbridge_writeback",
            "Results written to an EHR target (fhir, hl7v2), by outcome.",
            [*site, "target", "outcome"],
            registry=r,
        )

    # ------------------------------------------------------------------ Metrics protocol

    def message(self, source: str, outcome: str) -> None:
        key, clock = (source, outcome), self.feeds.get(source)
        with self._lock:
            if clock is not None:
                clock.arrived(self.clock())
            if outcome != "filtered":  # that count is message_types', read at scrape time
                self._messages[key] = self._messages.get(key, 0) + 1

    def dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(self.site, bounded_reason(reason)).inc()

    def stage_seconds(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(self.site, stage).observe(seconds)

    def model_request(self, model: str, outcome: str, seconds: float) -> None:
        self.model_requests.labels(self.site, model, outcome).inc()
        self.model_duration.labels(self.site, model).observe(seconds)

    def prediction(self, model: str, band: str, risk: float) -> None:
        self.predictions.labels(self.site, model, self.mode().value, band).inc()
        with self._lock:
            self._drift(model).add_score(self.clock().date(), band, risk)

    def not_scored(self, model: str, reason: str) -> None:
        label = bounded_reason(reason, NOT_SCORED_REASONS)
        self.not_scored_.labels(self.site, model, label).inc()

    def features(self, model: str, values: dict[str, float | None]) -> None:
        self.feature_records.labels(self.site, model).inc()
        for name, value in values.items():
            if value is None:
                self.feature_missing.labels(self.site, model, name).inc()
        with self._lock:
            self._drift(model).add_features(self.clock().date(), values)

    def lab_results(self, mapped: int, unmapped: int) -> None:
        if mapped:
            self.lab_results_.labels(self.site, "mapped").inc(mapped)
        if unmapped:
            self.lab_results_.labels(self.site, "unmapped").inc(unmapped)
        if mapped or unmapped:
            today = self.clock().date()
            with self._lock:
                day = self._drift(self.config.model.name).day(today)
                day.results_mapped += mapped
                day.results_unmapped += unmapped

    def writeback(self, target: str, outcome: str, count: int = 1) -> None:
        self.writeback_.labels(self.site, target, outcome).inc(count)

    # ------------------------------------------------------------------ state

    def _drift(self, model: str) -> DriftMonitor:
        monitor = self.drift.get(model)
        if monitor is None:
            settings = self.config.monitoring.drift
            monitor = DriftMonitor(settings.reference_days, settings.min_count)
            self.drift[model] = monitor
            for name in INPUTS:  # at 0, so last week's missingness exists to compare with
                self.feature_missing.labels(self.site, model, name)
        return monitor

    def _feed_clocks(self) -> dict[str, FeedClock]:
        declared = self.config.monitoring.feeds
        return {
            source: FeedClock(
                declared=declared[source].expected_per_hour if source in declared else None
            )
            for source in SOURCES
        }

    @property
    def feeds_file(self) -> Path:
        return self.config.data_dir / "monitoring-feeds.json"

    @property
    def drift_file(self) -> Path:
        return self.config.data_dir / "monitoring-drift.json"

    def load(self) -> None:
        """What a previous run learned, and a reference file if the config names one."""
        feeds = _read_json(self.feeds_file)
        declared = self.config.monitoring.feeds
        for source, data in feeds.items():
            if source in self.feeds:
                expected = declared[source].expected_per_hour if source in declared else None
                self.feeds[source] = FeedClock.from_json(data, expected)
        for model, data in _read_json(self.drift_file).items():
            self._drift(model).restore(data)
        reference = self.config.monitoring.drift.reference_file
        if reference is not None:
            self._drift(self.config.model.name).load_reference(_read_json(reference))

    def _reload_drift(self) -> None:
        """The drift counts as the processing process last saved them (every save interval)."""
        saved = _read_json(self.drift_file)
        with self._lock:
            for model, data in saved.items():
                self.drift.pop(model, None)
                self._drift(model).restore(data)

    def save(self, feeds: bool = True, drift: bool = True) -> None:
        with self._lock:
            feed_data = {s: c.to_json() for s, c in self.feeds.items()}
            drift_data = {m: d.to_json() for m, d in self.drift.items()}
        if feeds:
            _write_json(self.feeds_file, feed_data)
        if drift and drift_data:
            _write_json(self.drift_file, drift_data)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ /api/monitoring

    def feeds_json(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            for clock in self.feeds.values():
                clock.roll(now)
            return {
                source: {
                    "silence_s": _finite(clock.silence_s(now)),
                    "expected_this_hour": _finite(clock.expected(now)),
                    "declared": clock.declared is not None,
                    "expected_by_hour_of_week": [_finite(x) for x in clock.learned],
                }
                for source, clock in self.feeds.items()
            }

    def drift_json(self) -> dict[str, Any]:
        if self.drift_from_file:
            self._reload_drift()
        with self._lock:
            return {model: _series(monitor) for model, monitor in self.drift.items()}


def _series(monitor: DriftMonitor) -> dict[str, Any]:
    """Per day: counts, missingness, unmapped rate, bands, and each feature's PSI and JS."""
    days = []
    for day, stats in sorted(monitor.days.items()):
        drift = {}
        for name in (*INPUTS, SCORE):
            found = monitor.compare(day, name)
            if found is not None:
                drift[name] = {
                    "psi": round(found.psi, 6),
                    "js_distance": round(found.js_distance, 6),
                    "level": found.level,
                    "count": found.count,
                }
        results = stats.results_mapped + stats.results_unmapped
        scored = sum(stats.bands.values())
        days.append(
            {
                "date": day.isoformat(),
                **stats.to_json(),
                "missing_rate": {k: round(v / stats.records, 6) for k, v in stats.missing.items()}
                if stats.records
                else {},
                "unmapped_rate": round(stats.results_unmapped / results, 6) if results else None,
                "band_rate": {b: round(n / scored, 6) for b, n in stats.bands.items()}
                if scored
                else {},
                "drift": drift,
            }
        )
    return {
        "reference": monitor.reference_json(),
        "reference_from": monitor.reference_from.isoformat() if monitor.reference_from else None,
        "reference_days": monitor.reference_days,
        "reference_frozen": monitor.reference_frozen,
        "days": days,
    }


class _ScrapeTime(Collector):
    """Families read from their owners when Prometheus scrapes."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        yield self._messages()
        yield from self._feeds()
        yield from self._drift()
        if m.lag_sources:
            yield self._lag()
        if m.mllp_stats is not None:
            yield from _mllp_families(m.site, m.mllp_stats())

    def _messages(self) -> Metric:
        m = self.metrics
        family = CounterMetricFamily(
            "ehrbridge_messages",
            "Messages received, by source and answer: aa, ae, ar (HL7 MSA-1; FHIR: stored, "
            "unusable, refused) or filtered by type. OpenTelemetry: messaging.client.consumed"
            ".messages.",
            labels=["site", "source", "outcome"],
        )
        with m._lock:
            counts = dict(m._messages)
        for (source, outcome), value in sorted(counts.items()):
            family.add_metric([m.site, source, outcome], value)
        if m.filtered is not None:
            family.add_metric([m.site, "mllp", "filtered"], sum(m.filtered().values()))
        return family

    def _feeds(self) -> Iterable[Metric]:
        m, now = self.metrics, self.metrics.clock()
        last = GaugeMetricFamily(
            "ehrbridge_last_message_timestamp_seconds",
            "Unix time of the last message received from the source.",
            labels=["site", "source"],
        )
        silence = GaugeMetricFamily(
            "ehrbridge_feed_silence_seconds",
            "Seconds since the source's last message.",
            labels=["site", "source"],
        )
        expected = GaugeMetricFamily(
            "ehrbridge_feed_expected_messages",
            "Messages the source is expected to send in the current hour of the week "
            "(declared, or learned: an hour-of-week moving average). Absent while unknown.",
            labels=["site", "source"],
        )
        with m._lock:
            for source, clock in m.feeds.items():
                clock.roll(now)
                if clock.last_message is not None:
                    last.add_metric([m.site, source], clock.last_message)
                    silence.add_metric([m.site, source], clock.silence_s(now))
                rate = clock.expected(now)
                if not math.isnan(rate):
                    expected.add_metric([m.site, source], rate)
        yield from (last, silence, expected)

    def _drift(self) -> Iterable[Metric]:
        m = self.metrics
        psi = GaugeMetricFamily(
            "ehrbridge_feature_psi",
            "Population Stability Index of today's distribution against the reference "
            'window (0.1 warn, 0.2 drift). "score" is the model\'s score output.',
            labels=["site", "model", "feature"],
        )
        js = GaugeMetricFamily(
            "ehrbridge_feature_js_distance",
            "Jensen-Shannon distance (natural log) of today's distribution from the reference.",
            labels=["site", "model", "feature"],
        )
        today = m.clock().date()
        with m._lock:
            for model, monitor in m.drift.items():
                for name in (*INPUTS, SCORE):
                    found = monitor.compare(today, name)
                    if found is not None:
                        psi.add_metric([m.site, model, name], found.psi)
                        js.add_metric([m.site, model, name], found.js_distance)
        yield from (psi, js)

    def _lag(self) -> Metric:
        m = self.metrics
        family = GaugeMetricFamily(
            "ehrbridge_consumer_lag_records",
            "Records in the partition not yet consumed by this process's group member "
            "(high watermark - position). OpenTelemetry: messaging.kafka.consumer.lag.",
            labels=["site", "topic", "partition"],
        )
        for source in m.lag_sources:
            for (topic, partition), lag in sorted(source().items()):
                family.add_metric([m.site, topic, str(partition)], lag)
        return family


def _mllp_families(site: str, stats: Mapping[str, int]) -> Iterable[Metric]:
    open_now = GaugeMetricFamily(
        "ehrbridge_mllp_connections_open", "MLLP connections open now.", labels=["site"]
    )
    open_now.add_metric([site], stats.get("open", 0))
    yield open_now
    family = CounterMetricFamily(
        "ehrbridge_mllp_connections_closed",
        "MLLP connections refused or closed by a limit: refused (max_connections), "
        "frame_timeouts, write_timeouts, tls_refused.",
        labels=["site", "reason"],
    )
    for reason, value in sorted(stats.items()):
        if reason != "open":
            family.add_metric([site, reason], value)
    yield family


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("monitoring state %s unreadable (%s); starting afresh", path.name, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write whole or not at all: a crash mid-write leaves the previous file."""
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)
