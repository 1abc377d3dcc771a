"""Which HL7v2 messages a site takes: accept, filter or reject, by MSH-9 type and trigger.

HL7 v2 original-mode acknowledgement (v2.5.1 ch. 2.9.2) answers a message
type the receiver does not support with AR, ERR code 200 (unsupported
message type), and a trigger event it does not support with AR, code 201
(unsupported event code); that is the default here. A site fed by a
broadcast ADT or ORM interface can instead *filter* what it does not need:
AA, counted, and kept out of the log and the dead-letter store -- nobody has
to look at thousands of orders a risk model never reads.

The site config's ``message_types`` is looked up most specific first:
``TYPE^TRIGGER``, then ``TYPE^*``, then ``*``. ORU^R01 and ADT^* are
accepted unless the site says otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ehrbridge.config import MessagePolicy
from ehrbridge.core.errors import Hl7Location, MessageRejected

DEFAULTS = {"ORU^R01": MessagePolicy.ACCEPT, "ADT^*": MessagePolicy.ACCEPT}
UNSUPPORTED_TYPE = 200  # HL7 table 0357
UNSUPPORTED_EVENT = 201


class MessageTypes:
    """The policy of one site, and how many messages it filtered, by type."""

    def __init__(self, table: Mapping[str, MessagePolicy]) -> None:
        self.table = {**DEFAULTS, **table}
        self.known_types = {key.split("^")[0] for key in self.table}
        self.filtered: Counter[str] = Counter()

    def admits(self, msg_type: str, trigger: str) -> bool:
        """True to accept, False to filter; MessageRejected (AR) to reject."""
        if msg_type == "ORU" and not trigger:
            trigger = "R01"  # v2.1/2.2 senders leave MSH-9.2 empty; R01 is the only ORU read
        key, policy = self._lookup(msg_type, trigger)
        if policy is MessagePolicy.REJECT:
            raise self._unsupported(msg_type, trigger, key)
        if policy is MessagePolicy.FILTER:
            # By the entry that matched: as many counters as entries, whatever senders send.
            self.filtered[key or "*"] += 1
            return False
        return True

    def _lookup(self, msg_type: str, trigger: str) -> tuple[str | None, MessagePolicy]:
        for key in (f"{msg_type}^{trigger}", f"{msg_type}^*", "*"):
            if key in self.table:
                return key, self.table[key]
        return None, MessagePolicy.REJECT

    def _unsupported(self, msg_type: str, trigger: str, key: str | None) -> MessageRejected:
        named = f"{msg_type}^{trigger}".rstrip("^")
        # Event code (201) only when the type itself is taken for some trigger.
        event_only = key == named or (key is None and msg_type in self.known_types)
        what = f"trigger event {trigger or '(none)'} of {msg_type}" if event_only else named
        return MessageRejected(
            f"{what} is not taken by this site (message_types)",
            reason="hl7.unsupported_event" if event_only else "hl7.unsupported_type",
            location=Hl7Location("MSH", field=9),
            hl7_error_code=UNSUPPORTED_EVENT if event_only else UNSUPPORTED_TYPE,
        )
