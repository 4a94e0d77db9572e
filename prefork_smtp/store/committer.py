"""Group commit of accepted messages into the durable queue, inside one worker.

Owns: batching every message that arrives while the previous batch is being
fsync'ed into the next batch, so N concurrent sessions share one fsync, and
waking the delivery process once a batch is safe. A session's future resolves to
its queue ID only after write_batch() returned, i.e. after data and directory are
fsync'ed: "250 only after fsync" holds for every message of the batch.
Must not: block the event loop (the write runs in one helper thread).
Fails by setting QueueError on the futures of the batch that could not be written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from typing import Callable

from . import queue
from .envelope import Envelope

log = logging.getLogger("ccsmtp.queue")

WAKE_INTERVAL_S = 0.005


class GroupCommitter:
    def __init__(self, spool_dir: str, notify: socket.socket | None = None,
                 on_breakdown: Callable[[Exception], None] | None = None):
        self.spool_dir = spool_dir
        self.notify = notify
        # Called when committing fails for a reason of this process's own (it cannot
        # start its thread, it is out of memory), not of the disk: the worker retires.
        self.on_breakdown = on_breakdown
        self.ids = queue.QueueIds()
        self._pending: list[tuple[queue.QueuedMessage, queue.SpillFile | None,
                                  asyncio.Future[str]]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake_handle: asyncio.TimerHandle | None = None
        self._last_wake = 0.0
        # One thread: while it syncs one batch the next one fills up.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "commit")

    def spill_file(self) -> queue.SpillFile:
        """Somewhere to put a large message's content while it arrives."""
        return queue.SpillFile(self.spool_dir, f"spill.{self.ids.next()}")

    def submit(self, envelope: Envelope, content: bytes,
               spill: queue.SpillFile | None = None) -> asyncio.Future[str]:
        """Queue a message: content, or (for a large one) spill plus its last piece."""
        loop = asyncio.get_running_loop()
        if spill is not None:
            spill.write(content)
            message = queue.QueuedMessage(self.ids.next(), envelope, time.time(),
                                          external=True, size=spill.size)
        else:
            message = queue.QueuedMessage(self.ids.next(), envelope, time.time(), content,
                                          size=len(content))
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((message, spill, future))
        if self._task is None:
            self._task = loop.create_task(self._commit_all())
        return future

    async def _commit_all(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                messages = [message for message, _, _ in batch]
                spills = {m.queue_id: spill for m, spill, _ in batch if spill is not None}
                try:
                    await self._write(messages, spills)
                except Exception as e:
                    # QueueError (disk full, I/O error) or worse: these sessions get a
                    # 4xx, never silence.
                    log.error("queue write failed for %d message(s): %s", len(batch), e)
                    for spill in spills.values():
                        spill.discard()
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for message, _, future in batch:
                    if not future.done():
                        future.set_result(message.queue_id)
                self._schedule_wake()
        finally:
            self._task = None

    async def _write(self, messages: list[queue.QueuedMessage],
                     spills: dict[str, queue.SpillFile]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, queue.write_batch, self.spool_dir,
                                       messages, spills)
        except RuntimeError as e:
            # The helper thread cannot start (thread or address-space limit): write
            # here, blocking the loop, rather than fail the message; and retire.
            if self.on_breakdown:
                self.on_breakdown(e)
            queue.write_batch(self.spool_dir, messages, spills)

    def _schedule_wake(self) -> None:
        """Wake delivery after the sessions' callbacks have sent their 250s (on a small
        machine it competes with them for the CPU), and at most every WAKE_INTERVAL_S:
        under load one wake-up then serves many batches, with fewer mailbox fsyncs."""
        if self._wake_handle is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_wake + WAKE_INTERVAL_S - loop.time())
        self._wake_handle = loop.call_later(delay, self._wake_delivery)

    def _wake_delivery(self) -> None:
        self._wake_handle = None
        self._last_wake = asyncio.get_running_loop().time()
        if self.notify is None:
            return
        try:
            self.notify.send(b".")
        except OSError:
            pass   # a full socket means delivery is awake already; it also rescans

    async def drain(self) -> None:
        """Wait until every submitted message is committed or failed."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
