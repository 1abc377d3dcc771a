"""``ehrbridge audit list|verify``: the site's audit trail, on the host that keeps it.

``list`` prints who read which patient's data, when, from where and with what
outcome (``--json``: one JSON object a line, for export to a SIEM), filtered
by ``--patient``, ``--who``, ``--since`` and ``--until``. Listing the trail is
itself a read of patient identifiers and gets its own entry. ``verify``
checks the hash chain (``ehrbridge/audit.py``) and exits 1 if it is broken.

Only the account that runs ehrbridge can read the data directory; that is
who may run these (the HTTP API's ``GET /api/audit`` needs the admin role).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from ehrbridge.audit import AuditEvent, AuditTrail, cli_caller, matching
from ehrbridge.core.errors import ConfigError

_ROW = "{:>6}  {:<27} {:<24} {:<40} {:<7} {:<15} {}"


def add_audit_commands(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit trail: who read which patient's data")
    actions = audit.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list audit entries (oldest first)")
    listing.add_argument("--config", required=True)
    listing.add_argument("--patient", help="only entries about this patient identifier")
    listing.add_argument("--who", help="only entries of this caller (token name, JWT sub)")
    listing.add_argument("--since", type=_when, help="ISO time: at or after")
    listing.add_argument("--until", type=_when, help="ISO time: before")
    listing.add_argument("--json", action="store_true", help="one JSON entry a line (export)")
    listing.set_defaults(func=_list)
    verify = actions.add_parser("verify", help="check the hash chain; exit 1 if broken")
    verify.add_argument("--config", required=True)
    verify.set_defaults(func=_verify)


def _when(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _trail(path: str) -> AuditTrail:
    """The site's trail; an error naming where it looked when the site has no data there."""
    from ehrbridge.config import load_site_config
    from ehrbridge.stores import audit_dir

    config = load_site_config(path)
    if not config.data_dir.is_dir():
        raise ConfigError(
            f"found no data for site '{config.site}': no data_dir {config.data_dir} "
            f"(data_dir of {path}, or EHRBRIDGE_DATA_DIR). Has the site run?"
        )
    return AuditTrail(audit_dir(config))


def _list(args: argparse.Namespace) -> int:
    trail = _trail(args.config)
    chosen = matching(
        trail.entries(), patient=args.patient, who=args.who, since=args.since, until=args.until
    )
    found = list(chosen)
    trail.record(
        AuditEvent(
            who=cli_caller(),
            via="cli",
            action="cli audit list",
            outcome="ok",
            patients=(args.patient,) if args.patient else (),
            source="cli",
            detail={"entries": len(found)},
        )
    )
    if args.json:
        for entry in found:
            print(json.dumps(entry, sort_keys=True))
        return 0
    print(_ROW.format("seq", "at", "who", "action", "outcome", "source", "patients"))
    for e in found:
        patients = ",".join(e.get("patients", []))
        row = (e.get("seq"), e.get("at"), e.get("who"), e.get("action"), e.get("outcome"))
        print(_ROW.format(*map(str, row), str(e.get("source")), patients))
    print(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = _trail(args.config).verify()
    for problem in report.problems:
        print(f"broken: {problem}")
    state = "intact" if report.intact else f"BROKEN ({len(report.problems)} problem(s))"
    print(f"{report.entries} entries from seq {report.first_seq}: {state}")
    return 0 if report.intact else 1
