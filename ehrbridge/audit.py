"""The audit trail: who read which patient's data, when, how, from where, and what came of it.

HIPAA's audit-control standard (45 CFR 164.312(b)) asks for a record of
activity in systems that hold PHI. ehrbridge writes one entry per read of
patient-level data: the HTTP API's results, patients, dead letters and
message search (``ehrbridge/audit_http.py`` wraps those routes), every CDS
Hooks call, and the CLI's ``dlq show``/``dlq replay`` and ``audit list``.
An entry names

* **who**: the static token's name, the JWT's subject, the CDS client's
  issuer and subject, or ``cli:<os user>``; ``via`` says how it was proved,
  ``roles`` what it held; ``-`` when no valid credential came (a 401);
* **when** (``at``, UTC) and **from where** (``source``: the client address);
* **what**: ``action`` (method and route template, or the CLI command) and
  ``patients``: the patient identifiers whose data the answer held. Patient
  identifiers may stand here, in a private file -- never in the logs;
* **outcome**: the HTTP status (200 read, 403 refused, 404 ...), or ``ok``.

Where it lives: ``<data_dir>/audit/audit-YYYY-MM.jsonl``, one JSON object a
line, the directory ``0700`` and the files ``0600``. It is append-only: this
module has no way to change or delete an entry; only the retention purge
(``retention.audit_days``, default: kept) removes whole months, oldest first.

Tamper evidence: every entry carries ``seq`` (one more than the entry before)
and ``hash`` = SHA-256 of the previous entry's hash and this entry's other
fields (a hash chain; the first entry's ``prev`` is 64 zeros). Editing,
deleting or reordering an entry breaks the chain at that entry, which
``ehrbridge audit verify`` reports. Removing entries from the very end is
not detectable from the file alone: ship the trail to the hospital's SIEM
or write-once storage (``ehrbridge audit list --json``) for that.

Several processes (the site, a CLI command) may write at once: each append
takes an exclusive ``flock`` on ``audit/.lock`` and reads the chain's last
hash from the file under that lock. A write that fails raises
:class:`AuditUnavailable`; the HTTP layer then answers 503 instead of the
data -- no read without its entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENESIS = "0" * 64
SCOPE_KEY = "ehrbridge.audit"  # where an HTTP request's AuditNote is kept in its ASGI scope
_FILE = re.compile(r"^audit-(\d{4})-(\d{2})\.jsonl$")
_TAIL_BYTES = 65_536  # holds the last entry but for a page of thousands of patients

__all__ = [
    "AuditEvent",
    "AuditNote",
    "AuditTrail",
    "AuditUnavailable",
    "ChainReport",
    "audit_note",
    "cli_caller",
]


class AuditUnavailable(Exception):
    """The entry could not be written (disk full, permissions): the read must not happen."""


@dataclass(frozen=True)
class AuditEvent:
    """One read of patient data, before it is numbered and chained."""

    who: str
    action: str
    outcome: int | str
    via: str = ""
    roles: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    source: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {
            "who": self.who,
            "via": self.via,
            "roles": sorted(self.roles),
            "action": self.action,
            "patients": list(dict.fromkeys(self.patients)),  # each once, in order
            "source": self.source,
            "outcome": self.outcome,
            "detail": self.detail,
        }


@dataclass
class AuditNote:
    """What the route's handler learns for its entry (the caller is ``auth.PRINCIPAL_KEY``)."""

    patients: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


def audit_note(scope: MutableMapping[str, Any]) -> AuditNote:
    """The request's note (an ASGI scope); a throwaway one for a route not audited."""
    note = scope.get(SCOPE_KEY)
    return note if isinstance(note, AuditNote) else AuditNote()


def cli_caller() -> str:
    """Who runs a CLI command: the operating-system account (the data dir's owner)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"cli:uid {os.getuid()}"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev: str, body: dict[str, Any]) -> str:
    """The entry's hash: the previous entry's hash, then its own fields (without ``hash``)."""
    return hashlib.sha256(prev.encode() + _canonical(body)).hexdigest()


@dataclass
class ChainReport:
    """What ``verify`` found: entries read, the first seq, and each break of the chain."""

    entries: int = 0
    first_seq: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


class AuditTrail:
    """The append-only, hash-chained audit files of one data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def record(self, event: AuditEvent, now: datetime | None = None) -> dict[str, Any]:
        """Append one entry; return it. AuditUnavailable if it could not be written."""
        moment = (now or datetime.now(UTC)).astimezone(UTC)
        try:
            with self._locked():
                return self._append(event, moment)
        except OSError as exc:
            log.error("audit entry not written in %s: %s", self.directory, exc.strerror)
            raise AuditUnavailable(f"the audit trail cannot be written: {exc.strerror}") from exc

    def _append(self, event: AuditEvent, moment: datetime) -> dict[str, Any]:
        last = self._last_entry()
        body = {
            "seq": (last["seq"] + 1) if last else 1,
            "at": moment.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            **event.fields(),
            "prev": last["hash"] if last else GENESIS,
        }
        entry = {**body, "hash": chain_hash(body["prev"], body)}
        path = self.directory / f"audit-{moment:%Y-%m}.jsonl"
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, _canonical(entry) + b"\n")  # one write: one whole line
        finally:
            os.close(descriptor)
        return entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.directory.exists():
            # exist_ok: two first writers race here; the loser's FileExistsError
            # used to surface as "audit trail cannot be written" and drop its entry.
            self.directory.mkdir(mode=0o700, exist_ok=True)  # inside data_dir, which exists
            os.chmod(self.directory, 0o700)
        descriptor = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def files(self) -> list[Path]:
        """The monthly files, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _FILE.match(p.name))

    def _last_entry(self) -> dict[str, Any] | None:
        for path in reversed(self.files()):
            size = path.stat().st_size
            if size == 0:
                continue
            start = max(0, size - _TAIL_BYTES)
            with path.open("rb") as file:
                file.seek(start)
                chunk = file.read().rstrip(b"\n")
            if b"\n" not in chunk and start > 0:  # one entry longer than the tail read
                chunk = path.read_bytes().rstrip(b"\n")
            return _parsed_tail(chunk.rsplit(b"\n", 1)[-1])
        return None

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry, oldest first (unparseable lines come as ``{"unreadable": line}``)."""
        for path in self.files():
            with path.open("rb") as file:
                for line in file:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        yield {"unreadable": line.decode("utf-8", "replace").rstrip("\n")}

    def verify(self) -> ChainReport:
        """Check every entry's hash, its link to the one before, and seq continuity."""
        report = ChainReport()
        previous: dict[str, Any] | None = None
        for entry in self.entries():
            report.entries += 1
            problem = _check(entry, previous)
            if problem:
                report.problems.append(problem)
            if report.first_seq is None:
                report.first_seq = entry.get("seq")
            previous = entry
        return report

    def purge(self, cutoff: datetime) -> int:
        """Delete whole months that ended before ``cutoff``; never the newest file."""
        removed = 0
        with self._locked():
            for path in self.files()[:-1]:
                if _month_end(path) <= cutoff:
                    with path.open("rb") as file:
                        removed += sum(1 for _ in file)
                    path.unlink()
        return removed


def _parsed_tail(line: bytes) -> dict[str, Any]:
    """The last entry; a torn or edited last line still gets a successor (verify flags it)."""
    try:
        entry: dict[str, Any] = json.loads(line)
        if isinstance(entry.get("seq"), int) and isinstance(entry.get("hash"), str):
            return entry
    except ValueError:
        pass
    return {"seq": 0, "hash": hashlib.sha256(line).hexdigest()}


def _check(entry: dict[str, Any], previous: dict[str, Any] | None) -> str | None:
    """Why ``entry`` breaks the chain, or None."""
    if "unreadable" in entry:
        return f"an unreadable line after seq {previous.get('seq') if previous else '-'}"
    seq = entry.get("seq")
    body = {k: v for k, v in entry.items() if k != "hash"}
    if chain_hash(str(entry.get("prev")), body) != entry.get("hash"):
        return f"seq {seq}: its hash does not match its content (edited)"
    if previous is None:
        return None  # the oldest kept entry: older months may have been purged
    if entry.get("prev") != previous.get("hash"):
        return f"seq {seq}: does not follow seq {previous.get('seq')} (removed or reordered)"
    if seq != previous.get("seq", 0) + 1:
        return f"seq {seq}: expected seq {previous.get('seq', 0) + 1}"
    return None


def _month_end(path: Path) -> datetime:
    found = _FILE.match(path.name)
    assert found is not None
    year, month = int(found[1]), int(found[2])
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def matching(
    entries: Iterable[dict[str, Any]],
    *,
    patient: str | None = None,
    who: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """The entries about ``patient``, by ``who``, at or after ``since`` and before ``until``."""
    for entry in entries:
        if patient is not None and patient not in entry.get("patients", ()):
            continue
        if who is not None and entry.get("who") != who:
            continue
        at = _at(entry)
        if (since and (at is None or at < since)) or (until and (at is None or at >= until)):
            continue
        yield entry


def _at(entry: dict[str, Any]) -> datetime | None:
    text = entry.get("at")
    if not isinstance(text, str):
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
