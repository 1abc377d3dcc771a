"""Group commit: many concurrent ingest calls share one durable append.

An fsync costs milliseconds; a durable append per message would cap ingest at
a few hundred messages per second. Callers from any event loop hand their
record to :meth:`GroupCommitter.append` and wait; one thread drains
everything queued, appends it in one write, and then wakes every caller.
Nobody is answered before the write that holds their record has returned,
so the ACK-after-durable-write rule holds for each message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import Future

from ehrbridge.core.errors import EhrbridgeError, UpstreamUnavailable
from ehrbridge.pipelines.transport import Log, Record

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(self, log_: Log, *, max_batch: int = 2000) -> None:
        self.log = log_
        self.max_batch = max_batch
        self._queue: deque[tuple[Record, Future[None]]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.appends = 0  # durable appends made: records per append = records / appends
        self._thread = threading.Thread(target=self._drain, name="group-commit", daemon=True)
        self._thread.start()

    async def append(self, record: Record) -> None:
        """Return once ``record`` is durable; raise TransientError if it cannot be."""
        future: Future[None] = Future()
        with self._ready:
            if self._closed:
                raise UpstreamUnavailable("ingest is shutting down")
            self._queue.append((record, future))
            self._ready.notify()
        await asyncio.wrap_future(future)

    def append_sync(self, record: Record) -> None:
        """The same, for callers outside an event loop."""
        future: Future[None] = Future()
        with self._ready:
            self._queue.append((record, future))
            self._ready.notify()
        future.result()

    def _drain(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue and self._closed:
                    return
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))
                ]
            self._write(batch)

    def _write(self, batch: list[tuple[Record, Future[None]]]) -> None:
        try:
            self.appends += 1
            self.log.append([record for record, _ in batch])
        except EhrbridgeError as error:
            for _, future in batch:
                future.set_exception(error)
            return
        except Exception as exc:  # never leave a caller waiting forever
            log.exception("durable append failed")
            for _, future in batch:
                future.set_exception(UpstreamUnavailable(f"durable append failed: {exc!r}"))
            return
        for _, future in batch:
            future.set_result(None)

    def close(self) -> None:
        """Finish what is queued, then stop."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=30)
