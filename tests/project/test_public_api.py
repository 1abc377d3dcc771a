"""The public facade: a small, stable ``__all__`` and the documented exception tree."""

from __future__ import annotations

import ehrbridge
from ehrbridge import (
    ConfigError,
    EhrbridgeError,
    MessageRejected,
    MessageUnusable,
    PermanentError,
    RemoteRejected,
    TransientError,
    UpstreamUnavailable,
)


def test_all_is_exactly_the_supported_api() -> None:
    assert sorted(ehrbridge.__all__) == sorted(
        [
            "BatchError",
            "ConfigError",
            "EhrbridgeError",
            "Envelope",
            "Failure",
            "Kind",
            "MessageRejected",
            "MessageUnusable",
            "Mode",
            "PermanentError",
            "RemoteRejected",
            "Role",
            "SiteConfig",
            "SiteRuntime",
            "Sink",
            "Source",
            "Stage",
            "TransientError",
            "UpstreamUnavailable",
            "__version__",
            "load_site_config",
            "parse_site_config",
        ]
    )


def test_every_exported_name_resolves() -> None:
    for name in ehrbridge.__all__:
        assert getattr(ehrbridge, name) is not None, name


def test_exception_tree_matches_the_docstring() -> None:
    parents = {
        ConfigError: EhrbridgeError,
        TransientError: EhrbridgeError,
        UpstreamUnavailable: TransientError,
        PermanentError: EhrbridgeError,
        MessageRejected: PermanentError,
        MessageUnusable: PermanentError,
        RemoteRejected: PermanentError,
    }
    for cls, parent in parents.items():
        assert cls.__bases__ == (parent,), cls
        assert cls.__name__ in (ehrbridge.__doc__ or "")
    assert not issubclass(TransientError, PermanentError)


def test_errors_carry_a_reason_code_and_detail() -> None:
    error = MessageUnusable("PID-3 is empty", reason="hl7.missing_patient_id")
    assert (error.reason, error.detail) == ("hl7.missing_patient_id", "PID-3 is empty")
    assert str(error) == "hl7.missing_patient_id: PID-3 is empty"
    assert UpstreamUnavailable("x").reason == "upstream.unavailable"  # class default
