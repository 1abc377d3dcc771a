"""Writes results to an EHR as HL7v2 ORU^R01 over MLLP, and checks every ACK.

Each envelope's payload is one ORU^R01 (``pipelines/oru.py``), its
``hl7.control_id`` header the MSH-10 it carries. For each message:

* the ACK must answer **this** message: MSA-2 equal to our MSH-10. An ACK
  for another message (a late answer to an earlier send) is logged and
  skipped while we wait for ours;
* MSA-1 ``AA`` (or ``CA``): delivered;
* ``AE`` (application error) and ``AR`` (application reject) follow the
  site's policy, ``writeback.hl7v2.on_error`` / ``on_reject``: ``retry``
  (:class:`UpstreamUnavailable`, the retry tiers) or ``dead-letter``
  (:class:`RemoteRejected`, with MSA-3 and the ACK kept). Defaults: AE is
  dead-lettered (the receiver found the content wrong; a resend fails the
  same way), AR retried (HL7 uses it for "cannot process now": the
  receiving application is down or busy);
* no ACK within ``ack_timeout_s``: the connection is dropped (a late ACK
  must not be taken for the next message's) and the **same bytes** --
  same MSH-10 -- are sent again on a new connection, ``resends`` times; the
  receiver can de-duplicate on MSH-10. Then :class:`UpstreamUnavailable`:
  the retry tiers send it again later, still with the same MSH-10.

One connection is kept open across messages, as interface engines expect.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ehrbridge.adapters.mllp_client import Ack, MllpClient, frame
from ehrbridge.adapters.tls import client_context
from ehrbridge.config import Hl7v2Writeback
from ehrbridge.core.contracts import CONTROL_ID_HEADER, BatchError, Envelope
from ehrbridge.core.errors import (
    EhrbridgeError,
    PermanentError,
    RemoteRejected,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)
_ACCEPTED = frozenset({"AA", "CA"})
_ERRORS = frozenset({"AE", "CE"})
_REJECTS = frozenset({"AR", "CR"})


class MllpSink:
    name = "hl7v2"

    def __init__(self, target: Hl7v2Writeback, *, client: MllpClient | None = None) -> None:
        self.target = target
        tls = client_context(target.tls, "writeback.hl7v2.tls") if target.tls else None
        self._client = client or MllpClient(
            target.host, target.port, timeout_s=target.ack_timeout_s, tls=tls
        )
        self.sends = 0  # frames sent, resends included (tests and progress output)

    def write(self, batch: Sequence[Envelope]) -> None:
        errors: dict[int, EhrbridgeError] = {}
        for index, envelope in enumerate(batch):
            try:
                self.send(envelope.payload, _control_id(envelope))
            except EhrbridgeError as error:
                errors[index] = error
        if len(errors) == len(batch) == 1:
            raise errors[0]
        if errors:
            raise BatchError(errors)

    def send(self, message: bytes, control_id: str) -> Ack:
        """Send one message until its ACK comes; act on the ACK code."""
        last: UpstreamUnavailable | None = None
        for attempt in range(1, self.target.resends + 2):
            try:
                ack = self._exchange(message, control_id)
            except UpstreamUnavailable as error:
                last = error
                log.warning(
                    "ORU msg=%s: %s (send %d of %d)",
                    control_id,
                    error.detail,
                    attempt,
                    self.target.resends + 1,
                )
                continue
            return self._judge(ack, control_id)
        assert last is not None
        sends = self.target.resends + 1
        raise UpstreamUnavailable(
            f"no ACK for MSH-10 {control_id} after {sends} send(s): {last.detail}",
            reason="mllp.no_ack",
        )

    def _exchange(self, message: bytes, control_id: str) -> Ack:
        self.sends += 1
        ack = Ack.parse(self._client.send_raw(frame(message)))
        while ack.control_id != control_id:
            # MSA-2 names another message: not our answer. Keep waiting for ours.
            log.warning(
                "ORU msg=%s: ACK for another message (MSA-2 %r) ignored", control_id, ack.control_id
            )
            ack = Ack.parse(self._read_frame())
        return ack

    def _read_frame(self) -> bytes:
        try:
            return self._client.read_frame()
        except TimeoutError as exc:
            self._client.close()
            raise UpstreamUnavailable(f"no ACK within {self.target.ack_timeout_s}s") from exc
        except OSError as exc:
            self._client.close()
            raise UpstreamUnavailable(f"MLLP connection failed: {exc}") from exc

    def _judge(self, ack: Ack, control_id: str) -> Ack:
        if ack.code in _ACCEPTED:
            return ack
        if ack.code in _ERRORS:
            policy, what = self.target.on_error, "error (AE)"
        elif ack.code in _REJECTS:
            policy, what = self.target.on_reject, "reject (AR)"
        else:
            policy, what = "dead-letter", f"an unknown code {ack.code!r}"
        detail = f"EHR answered MSH-10 {control_id} with {what}: {ack.text or 'no MSA-3 text'}"
        reason = f"hl7.ack_{ack.code.lower() or 'missing'}"
        if policy == "retry":
            raise UpstreamUnavailable(detail, reason=reason)
        raise RemoteRejected(detail, reason=reason, body=ack.raw)

    def close(self) -> None:
        self._client.close()


def _control_id(envelope: Envelope) -> str:
    """The MSH-10 the ACK must echo; a record without one cannot be matched to its ACK."""
    control_id = envelope.headers.get(CONTROL_ID_HEADER)
    if not control_id:
        raise PermanentError(
            f"{envelope.describe()}: no {CONTROL_ID_HEADER} header to match the ACK to",
            reason="hl7.bad_record",
        )
    return control_id
