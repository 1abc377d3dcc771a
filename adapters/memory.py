"""In-memory Source, Sink and StateStore, shipped as product code for tests and notebooks.

``MemorySource`` delivers a fixed list of envelopes and records how each was
acknowledged, exactly as a real source would answer its sender.
``MemorySink`` keeps what it is given and can be told to fail -- the whole
next writes (``fail_next``) or single items (``refuse``) -- so retry and
dead-letter wrappers can be exercised without a network. It keeps the
Sink contract (``core/contracts.py``) as the network sinks do: a batch
of one fails with its item's own error, a larger batch with a
:class:`BatchError` naming only the refused items, the rest written.
``MemoryStateStore`` keeps patient state documents in a dict, serialised as
the durable stores keep them, so a test sees exactly what a restart would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ehrbridge.core.contracts import BatchError, Deliver, Envelope
from ehrbridge.core.errors import EhrbridgeError
from ehrbridge.pipelines.state import PatientState

Refusal = Callable[[Envelope], EhrbridgeError | None]


@dataclass
class MemorySource:
    envelopes: Sequence[Envelope]
    name: str = "memory"
    acked: list[Envelope] = field(default_factory=list)
    nacked: list[tuple[Envelope, EhrbridgeError]] = field(default_factory=list)

    async def run(self, deliver: Deliver) -> None:
        for envelope in self.envelopes:
            try:
                await deliver(envelope)
            except EhrbridgeError as error:
                self.nacked.append((envelope, error))
            else:
                self.acked.append(envelope)


def _accept(_: Envelope) -> EhrbridgeError | None:
    return None


@dataclass
class MemorySink:
    name: str = "memory"
    written: list[Envelope] = field(default_factory=list)
    failures: list[EhrbridgeError] = field(default_factory=list)  # raised by the next writes
    refuse: Refusal = _accept  # an item's own error, or None to write it
    calls: int = 0

    def fail_next(self, errors: Iterable[EhrbridgeError]) -> None:
        self.failures.extend(errors)

    def write(self, batch: Sequence[Envelope]) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        errors: dict[int, EhrbridgeError] = {}
        for index, envelope in enumerate(batch):
            error = self.refuse(envelope)
            if error is None:
                self.written.append(envelope)
            else:
                errors[index] = error
        if len(errors) == len(batch) == 1:
            raise errors[0]
        if errors:
            raise BatchError(errors)

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class MemoryStateStore:
    """Patient state in a dict of ``to_json`` documents; ``fail_next`` scripts outages."""

    documents: dict[str, bytes] = field(default_factory=dict)
    failures: list[EhrbridgeError] = field(default_factory=list)  # raised by the next calls

    def get(self, patient_id: str) -> PatientState | None:
        if self.failures:
            raise self.failures.pop(0)
        document = self.documents.get(patient_id)
        return PatientState.from_json(document) if document is not None else None

    def put_many(self, states: Iterable[PatientState]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        # All or nothing, like the SQLite transaction: serialise first, then store.
        self.documents.update([(state.patient_id, state.to_json()) for state in states])

    def fail_next(self, errors: Iterable[EhrbridgeError]) -> None:
        self.failures.extend(errors)

    def patient_ids(self, limit: int = 1000) -> list[str]:
        return sorted(self.documents)[:limit]

    def close(self) -> None:
        """Nothing to release: the documents stay, as a file would."""
