"""FHIR Subscription notifications: R4 Backport IG and R4B/R5 topic-based.

A notification is a Bundle whose first entry is the subscription's status
(https://hl7.org/fhir/uv/subscriptions-backport/notifications.html):

* R4 Backport: ``Bundle.type = history``, the status a ``Parameters``
  resource (profile backport-subscription-status-r4) with parameters
  ``subscription``, ``topic``, ``status``, ``type``,
  ``events-since-subscription-start`` and one ``notification-event`` per
  event (``event-number``, ``timestamp``, ``focus``, ``additional-context``);
* R4B/R5: ``Bundle.type = subscription-notification``, the status a
  ``SubscriptionStatus`` resource with the same content as elements.

The notification ``type`` is ``handshake``, ``heartbeat``,
``event-notification`` (or ``query-status`` / ``query-event`` when a client
asked for them). Event notifications come in three payload shapes, told
apart by what the Bundle carries:

* **empty**: only the status; nothing to read (the subscriber would query);
* **id-only**: entries with a ``fullUrl`` and no resource (and/or
  ``focus`` references): the subscriber fetches each resource;
* **full-resource**: entries with the resources themselves.

:func:`parse_notification` refuses non-conformant bodies (400): a history
Bundle whose entries lack ``request``/``response`` (bdl-3/bdl-4), a first
entry that is not a subscription status, a status without ``subscription``,
``status`` or a known ``type``, event numbers that are not integers.

:class:`SubscriptionLedger` remembers, per subscription, the highest event
number seen and every gap: events the server numbered that never reached
us. A gap is logged (WARNING, naming the subscription and event numbers --
never PHI) when it is found, and listed by ``GET /api/fhir`` until the
missing events arrive. Events an *empty* notification announced are kept
the same way, as ``unread``, while their content is fetched
(``ehrbridge/subscription_backfill.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ehrbridge.pipelines.fhir_ingest import FhirRejected, Issue
from ehrbridge.pipelines.jsonshape import items, obj

log = logging.getLogger(__name__)

NOTIFICATION_TYPES = frozenset(
    {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}
)
EVENT_TYPES = frozenset({"event-notification", "query-event"})


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    number: int
    timestamp: str | None = None
    focus: str | None = None  # a reference, relative or absolute
    additional_context: tuple[str, ...] = ()


@dataclass
class Notification:
    bundle_id: str
    subscription: str  # the Subscription's reference, the ledger key
    topic: str | None
    status: str
    type: str
    events_since_start: int | None
    events: list[NotificationEvent] = field(default_factory=list)
    resources: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (fullUrl, res)
    references: list[str] = field(default_factory=list)  # fullUrls of entries without resource

    @property
    def content(self) -> str:
        """empty, id-only or full-resource (meaningful for event notifications)."""
        if self.resources:
            return "full-resource"
        if self.references or any(e.focus for e in self.events):
            return "id-only"
        return "empty"

    def focus_references(self) -> list[str]:
        """What an id-only notification points at: focus and entry fullUrls, in order."""
        seen: dict[str, None] = {}
        for event in self.events:
            if event.focus:
                seen.setdefault(event.focus, None)
        for reference in self.references:
            seen.setdefault(reference, None)
        return list(seen)


def _bad(diagnostics: str, expression: str) -> FhirRejected:
    return FhirRejected(
        [Issue("invalid", diagnostics, expression, reason="subscription.non_conformant")],
        reason="subscription.non_conformant",
    )


def parse_notification(doc: dict[str, Any]) -> Notification:
    """The notification in a Bundle, or :class:`FhirRejected` naming what does not conform."""
    if doc.get("resourceType") != "Bundle":
        raise _bad("a subscription notification is a Bundle", "resourceType")
    bundle_type = doc.get("type")
    if bundle_type not in ("history", "subscription-notification"):
        raise _bad(
            f"Bundle.type {bundle_type!r}: a notification is a history Bundle (R4 Backport) "
            "or a subscription-notification Bundle (R4B/R5)",
            "Bundle.type",
        )
    entries = doc.get("entry")
    if not isinstance(entries, list) or not entries:
        raise _bad(
            "a notification Bundle starts with the subscription status entry", "Bundle.entry"
        )
    if bundle_type == "history":
        _check_history_entries(entries)
    first = entries[0].get("resource") if isinstance(entries[0], dict) else None
    if not isinstance(first, dict):
        raise _bad("the first entry carries no resource", "Bundle.entry[0].resource")
    if first.get("resourceType") == "Parameters":
        notification = _from_parameters(first)
    elif first.get("resourceType") == "SubscriptionStatus":
        notification = _from_subscription_status(first)
    else:
        raise _bad(
            "the first entry must be the subscription status (Parameters or SubscriptionStatus)",
            "Bundle.entry[0].resource",
        )
    notification.bundle_id = str(doc.get("id") or "")
    _collect_entries(notification, entries[1:])
    return notification


def _check_history_entries(entries: list[Any]) -> None:
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _bad("an entry is not an object", f"Bundle.entry[{index}]")
        for element, rule in (("request", "bdl-3"), ("response", "bdl-4")):
            if not isinstance(entry.get(element), dict):
                raise _bad(
                    f"entries of a history Bundle need {element} ({rule}); this one has none",
                    f"Bundle.entry[{index}].{element}",
                )


def _collect_entries(notification: Notification, entries: list[Any]) -> None:
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        url = str(entry["fullUrl"]) if isinstance(entry.get("fullUrl"), str) else ""
        if isinstance(resource, dict):
            notification.resources.append((url, resource))
        elif url:
            notification.references.append(url)


# -- R4 Backport: Parameters ----------------------------------------------------------


def _from_parameters(parameters: dict[str, Any]) -> Notification:
    params = [p for p in items(parameters.get("parameter")) if isinstance(p, dict)]
    where = "Bundle.entry[0].resource.parameter"

    def value(name: str, *keys: str) -> Any:
        for param in params:
            if param.get("name") == name:
                for key in keys:
                    if key in param:
                        return param[key]
        return None

    subscription = obj(value("subscription", "valueReference")).get("reference")
    events = [
        _event_from_parts(items(p.get("part")), f"{where}.part")
        for p in params
        if p.get("name") == "notification-event"
    ]
    return _notification(
        subscription=subscription,
        topic=value("topic", "valueCanonical", "valueUri"),
        status=value("status", "valueCode"),
        kind=value("type", "valueCode"),
        since_start=value(
            "events-since-subscription-start", "valueString", "valueInteger", "valueDecimal"
        ),
        events=events,
        where=where,
    )


def _event_from_parts(parts: list[Any], where: str) -> NotificationEvent:
    number: Any = None
    timestamp = focus = None
    context: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        name = part.get("name")
        if name == "event-number":
            number = part.get("valueString", part.get("valueInteger"))
        elif name == "timestamp":
            timestamp = part.get("valueInstant")
        elif name == "focus":
            focus = obj(part.get("valueReference")).get("reference")
        elif name == "additional-context":
            reference = obj(part.get("valueReference")).get("reference")
            if reference:
                context.append(str(reference))
    return NotificationEvent(
        _integer(number, f"{where}.event-number", required=True) or 0,
        timestamp,
        str(focus) if focus else None,
        tuple(context),
    )


# -- R4B / R5: SubscriptionStatus ------------------------------------------------------


def _from_subscription_status(status: dict[str, Any]) -> Notification:
    where = "Bundle.entry[0].resource"
    events = []
    for index, raw in enumerate(items(status.get("notificationEvent"))):
        if not isinstance(raw, dict):
            continue
        focus = obj(raw.get("focus")).get("reference")
        context = tuple(
            str(c.get("reference"))
            for c in items(raw.get("additionalContext"))
            if isinstance(c, dict) and c.get("reference")
        )
        number = _integer(
            raw.get("eventNumber"), f"{where}.notificationEvent[{index}].eventNumber", required=True
        )
        events.append(
            NotificationEvent(
                number or 0, raw.get("timestamp"), str(focus) if focus else None, context
            )
        )
    return _notification(
        subscription=obj(status.get("subscription")).get("reference"),
        topic=status.get("topic"),
        status=status.get("status"),
        kind=status.get("type"),
        since_start=status.get("eventsSinceSubscriptionStart"),
        events=events,
        where=where,
    )


def _notification(
    *,
    subscription: Any,
    topic: Any,
    status: Any,
    kind: Any,
    since_start: Any,
    events: list[NotificationEvent],
    where: str,
) -> Notification:
    if not isinstance(subscription, str) or not subscription:
        raise _bad("the status names no subscription (a reference)", f"{where}.subscription")
    if not isinstance(status, str) or not status:
        raise _bad("the status has no subscription status code", f"{where}.status")
    if kind not in NOTIFICATION_TYPES:
        raise _bad(
            f"notification type {kind!r} is not one of {sorted(NOTIFICATION_TYPES)}",
            f"{where}.type",
        )
    if kind == "event-notification" and not events:  # a query may find none
        raise _bad(
            f"a {kind} carries at least one notification event", f"{where}.notificationEvent"
        )
    return Notification(
        bundle_id="",
        subscription=subscription,
        topic=str(topic) if topic else None,
        status=status,
        type=str(kind),
        events_since_start=_integer(since_start, f"{where}.eventsSinceSubscriptionStart"),
        events=events,
    )


def _integer(value: Any, where: str, *, required: bool = False) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise _bad(f"{value!r} is not an event number (a non-negative integer)", where)


MISSED = "missed"  # numbered by the server, never reached us
UNREAD = "unread"  # announced by an empty notification; the content is still to be read


@dataclass(frozen=True, slots=True)
class Gap:
    subscription: str
    first: int  # first missing event number
    last: int  # last missing event number (inclusive)
    kind: str = MISSED  # or UNREAD

    def __str__(self) -> str:
        return f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"
