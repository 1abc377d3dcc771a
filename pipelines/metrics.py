"""What the stages report for monitoring, through one narrow interface.

Stages and the ingest path call a :class:`Metrics` object; they never import
a metrics library. The Prometheus implementation lives in
``adapters/prometheus_metrics.py`` and is what ``SiteRuntime`` passes in;
:data:`NO_METRICS` is the default, so a stage built in a test or a notebook
needs none.

Labels are bounded by construction: sources, stages, outcomes and targets
are a few fixed words, a model is named by the site config, and an error's
``reason`` goes through :func:`bounded_reason`, which maps anything outside
:data:`KNOWN_REASONS` to ``other``. No label ever carries a patient or
message identifier.
"""

from __future__ import annotations

from typing import Protocol

from ehrbridge.core.errors import (
    EhrbridgeError,
    MessageRejected,
    PermanentError,
)

OTHER = "other"

# Every reason code the code base raises (tests/facade/test_metrics.py finds each
# `reason="..."` literal in the source and checks it is here). A reason made
# at run time (fhir.http_503, a remote system's own code) is counted as `other`.
KNOWN_REASONS: frozenset[str] = frozenset(
    {
        "auth.discovery",
        "auth.token_refused",
        "auth.token_unavailable",
        "auth.unauthorized",
        "batch.partial",
        "config.invalid",
        "error",
        "fhir.bad_birth_date",
        "fhir.before_birth_date",
        "fhir.conflict",
        "fhir.bad_number",
        "fhir.bad_response",
        "fhir.bad_time",
        "fhir.bad_record",
        "fhir.broken_reference",
        "fhir.missing_patient_id",
        "fhir.missing_status",
        "fhir.missing_subject",
        "fhir.missing_time",
        "fhir.missing_unit",
        "fhir.not_a_resource",
        "fhir.nothing_to_read",
        "fhir.unparseable",
        "fhir.unsupported_method",
        "fhir.unsupported_type",
        "hl7.bad_batch",
        "hl7.bad_birth_date",
        "hl7.bad_encoding",
        "hl7.bad_number",
        "hl7.bad_record",
        "hl7.bad_segment",
        "hl7.bad_time",
        "hl7.batch",
        "hl7.escape_too_long",
        "hl7.field_too_long",
        "hl7.missing_patient_id",
        "hl7.missing_pid",
        "hl7.missing_status",
        "hl7.missing_time",
        "hl7.missing_type",
        "hl7.no_msh",
        "hl7.unparseable",
        "hl7.unsupported_event",
        "hl7.unsupported_type",
        "hl7.unusable",
        "internal",
        "kind.unsupported",
        "mapping.unknown_unit",
        "mllp.frame_timeout",
        "mllp.no_ack",
        "mllp.no_start_block",
        "mllp.tls_handshake",
        "mllp.too_large",
        "mllp.truncated",
        "mllp.unframed",
        "obx.before_birth_date",
        "model.bad_response",
        "model.failed",  # UbiOps: the deployment request failed
        "model.out_of_range",  # an answer outside a model file's declared output range
        "model.rejected",
        "model.unauthorized",
        "permanent",
        "record.headers",
        "record.invalid",
        "remote.rejected",
        "subscription.bad_reference",
        "subscription.events_empty",
        "subscription.events_missing",
        "subscription.foreign_reference",
        "subscription.non_conformant",
        "transient",
        "upstream.unavailable",
    }
)

# Why a feature record got no score (ehrbridge_not_scored_total's reason).
NOT_SCORED_REASONS: frozenset[str] = frozenset({"not_enough_data", "out_of_domain"})


def bounded_reason(reason: str, known: frozenset[str] = KNOWN_REASONS) -> str:
    """``reason`` if it is one of ``known``, else ``other``: label values stay a closed set."""
    return reason if reason in known else OTHER


def ack_outcome(error: EhrbridgeError | None) -> str:
    """The HL7 acknowledgment code (MSA-1) a message got, lower-case: aa, ae or ar.

    AR for bytes that are not a usable message and for a transient failure
    (nothing stored, the sender resends); AE for a well-formed message that
    cannot be used (contracts.py, Source).
    """
    if error is None:
        return "aa"
    if isinstance(error, PermanentError) and not isinstance(error, MessageRejected):
        return "ae"
    return "ar"


def error_outcome(error: EhrbridgeError | None) -> str:
    """A remote call's outcome label: ok, transient (retried) or permanent (dead-lettered)."""
    if error is None:
        return "ok"
    return "permanent" if isinstance(error, PermanentError) else "transient"


class Metrics(Protocol):
    """What a site's components report; one object per site (the site is not a parameter)."""

    def message(self, source: str, outcome: str) -> None:
        """A message from ``source`` (mllp, fhir) was answered ``outcome``: aa, ae, ar, filtered.

        Called once per message: it is also the feed's sign of life (feed silence).
        """

    def dead_letter(self, reason: str) -> None:
        """A record went to the dead-letter store for ``reason``."""

    def stage_seconds(self, stage: str, seconds: float) -> None:
        """One batch (one message at ingest) took ``seconds`` in ``stage``."""

    def model_request(self, model: str, outcome: str, seconds: float) -> None:
        """One inference request to ``model``: its outcome (error_outcome) and duration."""

    def prediction(self, model: str, band: str, risk: float) -> None:
        """A prediction in interpretation ``band``, 5-year ``risk`` (a fraction)."""

    def not_scored(self, model: str, reason: str) -> None:
        """A feature record that got no score, and why (NOT_SCORED_REASONS)."""

    def features(self, model: str, values: dict[str, float | None]) -> None:
        """One feature record's inputs (None: missing), for data quality and drift."""

    def lab_results(self, mapped: int, unmapped: int) -> None:
        """Results (OBX / Observation) in one record: mapped to a feature, or code unmapped."""

    def writeback(self, target: str, outcome: str, count: int = 1) -> None:
        """``count`` results written to ``target`` (fhir, hl7v2) with ``outcome``."""


class NoMetrics:
    """Reports nothing: the default for a stage built without a site runtime."""

    def message(self, source: str, outcome: str) -> None:
        pass

    def dead_letter(self, reason: str) -> None:
        pass

    def stage_seconds(self, stage: str, seconds: float) -> None:
        pass

    def model_request(self, model: str, outcome: str, seconds: float) -> None:
        pass

    def prediction(self, model: str, band: str, risk: float) -> None:
        pass

    def not_scored(self, model: str, reason: str) -> None:
        pass

    def features(self, model: str, values: dict[str, float | None]) -> None:
        pass

    def lab_results(self, mapped: int, unmapped: int) -> None:
        pass

    def writeback(self, target: str, outcome: str, count: int = 1) -> None:
        pass


NO_METRICS: Metrics = NoMetrics()
