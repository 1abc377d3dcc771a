"""A site's durable stores, opened from its config, for the runtime and the commands
that read what a running site stored (``ehrbridge dlq``, ``audit``, ``mappings unmapped``).

Below the runtime, so those commands and the operator routes need not import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from ehrbridge.adapters import load
from ehrbridge.adapters._sqlite import EncryptionUnavailable, encrypt_under
from ehrbridge.adapters.smart_auth import read_secret
from ehrbridge.config import KafkaTransport, SiteConfig
from ehrbridge.core.errors import ConfigError
from ehrbridge.pipelines.transport import Log


def unlock_stores(config: SiteConfig) -> None:
    """Register the site's storage key, so its SQLite files open encrypted.

    Every path to a site's stores passes here first: the runtime, the commands
    that read a site's data, backfill and evaluate.
    """
    encryption = config.encryption
    if encryption is None:
        return
    where = "encryption.key_env" if encryption.key_env else "encryption.key_file"
    secret = read_secret(encryption.key_env, encryption.key_file, "the storage key", where)
    try:
        encrypt_under(config.data_dir, secret)
        if isinstance(config.transport, KafkaTransport) and config.transport.state_dir:
            encrypt_under(config.transport.state_dir, secret)
    except EncryptionUnavailable as exc:
        raise ConfigError(str(exc), field=where) from exc


def open_log(config: SiteConfig) -> Log:
    """The durable log the site config names (``transport.kind``)."""
    transport = config.transport
    log_class = load("log", transport.kind)
    if isinstance(transport, KafkaTransport):
        client_id = f"ehrbridge-{config.site}"
        return cast(Log, log_class(transport, client_id=client_id, retention=config.retention))
    return cast(Log, log_class(config.data_dir / "log.sqlite"))


def open_existing_log(config: SiteConfig, source: Path | str) -> Log:
    """The site's log for a command that reads what a running site stored.

    It never creates one: an empty new store would answer "0 dead letters"
    for a site whose data is elsewhere. The error says where it looked.
    """
    unlock_stores(config)
    if config.transport.kind == "embedded":
        log_file = config.data_dir / "log.sqlite"
        if not log_file.is_file():
            raise ConfigError(
                f"found no data for site '{config.site}': no log at {log_file} "
                f"(data_dir of {source}, or EHRBRIDGE_DATA_DIR). Has the site run with this "
                "data_dir? The sandbox keeps its data in its --data-dir "
                "(default .ehrbridge-sandbox, next to sandbox/site.yaml's folder)."
            )
    return open_log(config)


def audit_dir(config: SiteConfig) -> Path:
    """Where the site's audit trail is kept: private, beside its other stores."""
    return config.data_dir / "audit"
