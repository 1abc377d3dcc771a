"""``ehrbridge mappings unmapped``: what a running site sends that its mapping ignores.

It reads the site's own durable log -- ``<site>.raw`` (every accepted message,
as received) and ``<site>.dlq`` (refused ones) -- and runs each message through
the *current* mapping in explain mode. So after adding a code to the mapping,
the code disappears from the list at once, without replaying anything.

Two tables:

* local codes that no rule maps, with how often they came, their display
  text, and one example value and unit (the candidates for a code map line);
* mapped results whose unit the mapping does not convert (those messages
  were refused with ``mapping.unknown_unit`` and wait in the dead-letter
  store for the mapping fix and ``ehrbridge dlq replay``).

The example values are lab values, printed to the engineer's terminal only;
nothing here is logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ehrbridge.core.contracts import Kind
from ehrbridge.core.errors import MessageRejected, MessageUnusable
from ehrbridge.pipelines.facts import FactRules, ObservationTrace, Trace
from ehrbridge.pipelines.transport import Log, Record, topic_name
from ehrbridge.workbench.messages import Input, extract_input, kind_of

_PAGE = 1000


@dataclass
class CodeStats:
    system: str
    code: str
    display: str = ""
    count: int = 0
    example: str = ""
    reason: str = ""

    def add(self, note: ObservationTrace) -> None:
        self.count += 1
        if not self.display and note.display:
            self.display = note.display
        if not self.example and note.raw_value:
            self.example = f"{note.raw_value} {note.raw_unit}".strip()


@dataclass
class UnmappedReport:
    messages: Counter[str] = field(default_factory=Counter)  # by topic
    unreadable: int = 0
    codes: dict[tuple[str, str], CodeStats] = field(default_factory=dict)
    units: dict[tuple[str, str], CodeStats] = field(default_factory=dict)  # (feature, unit)

    def add_trace(self, trace: Trace) -> None:
        for note in trace.observations:
            if note.outcome == "unused" and note.reason.startswith("code "):
                key = (note.system, note.code)
                stats = self.codes.setdefault(key, CodeStats(*key, reason=note.reason))
                stats.add(note)
            elif note.outcome == "error" and note.reason.startswith("mapping.unknown_unit"):
                key = (note.feature, note.raw_unit)
                stats = self.units.setdefault(key, CodeStats(note.system, note.code))
                stats.add(note)


def records(log: Log, topic: str, limit: int) -> Iterator[Record]:
    """Up to ``limit`` records of a topic, oldest first (the log reads forward)."""
    after, seen = -1, 0
    while seen < limit:
        page = log.read(topic, after=after, limit=min(_PAGE, limit - seen))
        if not page:
            return
        yield from page
        seen += len(page)
        after = page[-1].offset


def collect(log: Log, site: str, rules: FactRules, limit: int) -> UnmappedReport:
    report = UnmappedReport()
    for name in ("raw", "dlq"):
        topic = topic_name(site, name)
        report_topic(report, topic, records(log, topic, limit), rules)
    return report


def report_topic(
    report: UnmappedReport, topic: str, found: Iterable[Record], rules: FactRules
) -> None:
    for record in found:
        kind_header = record.headers.get("kind", "")
        if kind_header and kind_header not in (Kind.HL7V2.value, Kind.FHIR.value):
            continue
        kind = Kind(kind_header) if kind_header else kind_of(record.value)
        trace = Trace()
        try:
            extract_input(Input(kind, record.value, f"offset {record.offset}"), rules, trace)
        except (MessageRejected, MessageUnusable):
            report.unreadable += 1
        report.messages[topic] += 1
        report.add_trace(trace)


def render(report: UnmappedReport, site: str) -> str:
    read = ", ".join(f"{n} from {t}" for t, n in report.messages.items()) or "no messages"
    lines = [f"site '{site}': read {read}"]
    if report.unreadable:
        lines.append(f"({report.unreadable} could not be read past their header; see dlq list)")
    lines.append("")
    unmapped = [s for s in report.codes.values() if not s.reason.startswith("code maps to")]
    dead_ends = [s for s in report.codes.values() if s.reason.startswith("code maps to")]
    if not report.codes:
        lines.append("every result code the site sent is mapped (or there was no traffic)")
    if unmapped:
        lines.append("codes the site sent that no rule maps, most frequent first:")
        lines.extend(_code_table(unmapped))
    if dead_ends:
        lines.append("")
        lines.append("codes the code map translates to a concept no feature takes:")
        lines.extend(_code_table(dead_ends, with_reason=True))
    if report.units:
        lines.append("")
        lines.append("mapped results refused for a unit the mapping does not convert:")
        for (feature, unit), stats in sorted(report.units.items(), key=lambda i: -i[1].count):
            lines.append(
                f"  {stats.count:>7}  {feature:<10} unit {unit or '(none)'!r:<16} "
                f"code {stats.system}|{stats.code}  e.g. {stats.example}"
            )
        lines.append(
            "  fix the mapping, then: "
            "ehrbridge dlq replay --config SITE.yaml --reason mapping.unknown_unit"
        )
    return "\n".join(lines) + "\n"


def _code_table(found: list[CodeStats], *, with_reason: bool = False) -> list[str]:
    rows = [f"  {'count':>7}  {'system':<12} {'code':<14} {'display':<36} example"]
    for stats in sorted(found, key=lambda s: (-s.count, s.system, s.code)):
        rows.append(
            f"  {stats.count:>7}  {stats.system[:12]:<12} {stats.code[:14]:<14} "
            f"{stats.display[:36]:<36} {stats.example}"
        )
        if with_reason:
            rows.append(f"  {'':>7}  {stats.reason}")
    return rows
