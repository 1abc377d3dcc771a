"""In-memory Source and Sink, shipped as product code for tests and notebooks.

``MemorySource`` delivers a fixed list of envelopes and records how each was
acknowledged, exactly as a real source would answer its sender.
``MemorySink`` keeps what it is given and can be told to fail, so retry and
dead-letter wrappers can be exercised without a network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ehrbridge.core.contracts import Deliver, Envelope
from ehrbridge.core.errors import EhrbridgeError


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


@dataclass
class MemorySink:
    name: str = "memory"
    written: list[Envelope] = field(default_factory=list)
    failures: list[EhrbridgeError] = field(default_factory=list)  # raised by the next writes
    calls: int = 0

    def fail_next(self, errors: Iterable[EhrbridgeError]) -> None:
        self.failures.extend(errors)

    def write(self, batch: Sequence[Envelope]) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        self.written.extend(batch)

    def close(self) -> None:
        """Nothing to release."""
