"""``ehrbridge dlq list|show|replay``: look at dead letters and send them back.

Dead letters are records on ``<site>.dlq``: the original bytes plus
``error.*`` headers (reason code, detail, stage, time). Replay is for after a
fix -- a mapping that now knows the unit, a model endpoint that is back --
and selects by reason, by time and by offset. A replayed record goes back
to the topic its stage reads (``raw`` for ingest/process, ``predictions``
for write-back) and a marker on ``<site>.dlq.replayed`` remembers it, so
``list`` shows what was already replayed and a second replay skips it
unless ``--again`` is given.

The same selection and replay serve the HTTP API (``GET /api/dlq/{offset}``,
``POST /api/dlq/replay``, operator role). ``show`` and ``replay`` are reads
of PHI: each writes an entry to the site's audit trail (``ehrbridge/audit.py``)
naming the OS account, the offsets and the patients' keys.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ehrbridge.audit import AuditEvent, AuditTrail, cli_caller
from ehrbridge.config import SiteConfig
from ehrbridge.pipelines.transport import Log, Record, topic_name

_ROW = "{:>8}  {:<25} {:<10} {:<26} {:<22} {}"
_REPLAY_TARGET = {"ingest": "raw", "process": "raw", "writeback": "predictions"}


def add_dlq_commands(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="inspect and replay dead-lettered records")
    actions = dlq.add_subparsers(required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list dead letters")
    _selection(listing)
    listing.set_defaults(func=_list)

    show = actions.add_parser("show", help="show one dead letter, with its raw bytes")
    show.add_argument("--config", required=True)
    show.add_argument("offset", type=int)
    show.set_defaults(func=_show)

    replay = actions.add_parser("replay", help="send selected dead letters back for processing")
    _selection(replay)
    replay.add_argument("--again", action="store_true", help="include already replayed records")
    replay.add_argument("--dry-run", action="store_true")
    replay.set_defaults(func=_replay)


def _selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--reason", help="reason code, or a prefix ending in '*' (hl7.*)")
    parser.add_argument("--since", type=_when, help="ISO time: dead-lettered at or after")
    parser.add_argument("--until", type=_when, help="ISO time: dead-lettered before")
    parser.add_argument("--offset", type=int, action="append", help="only these offsets")


def _when(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _open(path: str) -> tuple[Log, str]:
    log, config = _open_site(path)
    return log, config.site


def _open_site(path: str) -> tuple[Log, SiteConfig]:
    from ehrbridge.config import load_site_config
    from ehrbridge.stores import open_existing_log

    config = load_site_config(path)
    return open_existing_log(config, path), config


def _audit(config: SiteConfig, action: str, records: list[Record], outcome: str) -> None:
    """An audit entry for a CLI read of dead letters (the raw bytes are PHI)."""
    from ehrbridge.datadir import secure_data_dir
    from ehrbridge.stores import audit_dir

    # On Kafka the log is on the broker: this host may have no data dir yet. Made private.
    secure_data_dir(config.data_dir)
    AuditTrail(audit_dir(config)).record(
        AuditEvent(
            who=cli_caller(),
            via="cli",
            action=action,
            outcome=outcome,
            patients=tuple(r.key for r in records if r.key),
            source="cli",
            detail={"offsets": [r.offset for r in records]},
        )
    )


def iter_dead_letters(log: Log, site: str) -> Iterator[Record]:
    after = -1
    while True:
        batch = log.read(topic_name(site, "dlq"), after=after, limit=500)
        if not batch:
            return
        yield from batch
        after = batch[-1].offset


def replayed_offsets(log: Log, site: str) -> set[int]:
    marks = topic_name(site, "dlq.replayed")
    done: set[int] = set()
    after = -1
    while batch := log.read(marks, after=after, limit=1000):
        done.update(int(r.key) for r in batch)
        after = batch[-1].offset
    return done


@dataclass(frozen=True)
class Selection:
    """Which dead letters: by offset, reason code (or ``prefix*``), and time dead-lettered."""

    offsets: frozenset[int] = frozenset()
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> Selection:
        return cls(frozenset(args.offset or ()), args.reason, args.since, args.until)

    def takes(self, record: Record) -> bool:
        if self.offsets and record.offset not in self.offsets:
            return False
        if self.reason and not _reason_matches(self.reason, record.headers.get("error.reason", "")):
            return False
        at = dead_at(record)
        return not ((self.since and at < self.since) or (self.until and at >= self.until))


def selected(selection: Selection, log: Log, site: str) -> Iterator[Record]:
    return (r for r in iter_dead_letters(log, site) if selection.takes(r))


def dead_letter(log: Log, site: str, offset: int) -> Record | None:
    return next((r for r in iter_dead_letters(log, site) if r.offset == offset), None)


def replay(log: Log, site: str, selection: Selection, *, again: bool = False) -> list[Record]:
    """Send the selected dead letters back to their stage's topic; the ones sent.

    Already replayed ones are skipped unless ``again``.
    """
    done = set() if again else replayed_offsets(log, site)
    chosen = [r for r in selected(selection, log, site) if r.offset not in done]
    now = datetime.now(UTC).isoformat()
    out: list[Record] = []
    for record in chosen:
        out.append(_replayed(record, site, now))
        out.append(
            Record(topic=topic_name(site, "dlq.replayed"), key=str(record.offset), value=b"")
        )
    if out:
        log.append(out)
    return chosen


def _reason_matches(pattern: str, reason: str) -> bool:
    return reason.startswith(pattern[:-1]) if pattern.endswith("*") else reason == pattern


def dead_at(record: Record) -> datetime:
    text = record.headers.get("error.at")
    return datetime.fromisoformat(text) if text else datetime.fromtimestamp(record.timestamp, UTC)


def _list(args: argparse.Namespace) -> int:
    log, site = _open(args.config)
    done = replayed_offsets(log, site)
    print(_ROW.format("offset", "dead-lettered at", "stage", "reason", "message", "replayed"))
    count = 0
    for record in selected(Selection.of(args), log, site):
        h = record.headers
        print(
            _ROW.format(
                record.offset,
                dead_at(record).isoformat(timespec="seconds"),
                h.get("error.stage", ""),
                h.get("error.reason", ""),
                h.get("source_id", ""),
                "yes" if record.offset in done else "",
            )
        )
        count += 1
    print(f"{count} dead letter(s)")
    return 0


def _show(args: argparse.Namespace) -> int:
    log, config = _open_site(args.config)
    record = dead_letter(log, config.site, args.offset)
    if record is None:
        print(f"no dead letter at offset {args.offset}", file=sys.stderr)
        return 1
    _audit(config, "cli dlq show", [record], "ok")  # before the bytes are shown
    for key, value in sorted(record.headers.items()):
        print(f"{key}: {value}")
    print(f"bytes: {len(record.value)}\n")
    text = record.value.decode("utf-8", errors="backslashreplace")
    print(text.replace("\r\n", "\n").replace("\r", "\n"))
    return 0


def _replay(args: argparse.Namespace) -> int:
    log, config = _open_site(args.config)
    selection = Selection.of(args)
    if args.dry_run:
        done = set() if args.again else replayed_offsets(log, config.site)
        count = sum(1 for r in selected(selection, log, config.site) if r.offset not in done)
        print(f"would replay {count} record(s)")
        return 0
    chosen = replay(log, config.site, selection, again=args.again)
    _audit(config, "cli dlq replay", chosen, "ok")
    print(f"replayed {len(chosen)} record(s)")
    return 0


def _replayed(record: Record, site: str, now: str) -> Record:
    stage = record.headers.get("error.stage", "process")
    headers = {
        k: v for k, v in record.headers.items() if not k.startswith(("error.", "retry.", "ingest."))
    }
    headers["attempt"] = str(int(headers.get("attempt", "0")) + 1)
    headers["replayed_from"] = str(record.offset)
    headers["replayed_at"] = now
    target = topic_name(site, _REPLAY_TARGET.get(stage, "raw"))
    return Record(topic=target, key=record.key, value=record.value, headers=headers)
