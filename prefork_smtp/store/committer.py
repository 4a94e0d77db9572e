"""Group commit of accepted messages into the shared queue log, inside one worker.

Owns: turning each accepted message into a log record, writing all the records of one
turn of the event loop with one append (in place, into the page cache: no flush on
the loop), and a sync thread that waits until they are durable -- leading the flush
for every worker when no other process is flushing, or finding its records covered by
the flush another process led. While one flush runs, the next turn's records are
already written: every record written during flush N rides on flush N+1, whichever
worker wrote it. A session's future resolves to its queue ID only when its record
lies before the log's published synced point: "250 only after fsync" holds for every
message. Afterwards the delivery process is woken (at most every WAKE_INTERVAL_S).
Must not: block the event loop on the disk (the flush runs in the sync thread).
Fails by setting QueueError on the futures of the records that could not be stored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import threading
import time
from typing import Callable

from . import queue
from .envelope import Envelope

log = logging.getLogger("ccsmtp.queue")

WAKE_INTERVAL_S = 0.005
# Flushes faster than this are made on the loop itself: handing them to the sync
# thread and back (two thread switches, a wake-up of the loop) cost more CPU than
# the flush blocks it. Slower devices always get the thread.
INLINE_FLUSH_S = 0.0003


class _Syncer:
    """The worker's sync thread: waits until the log is durable up to the highest LSN
    asked for, through its own handle on the log (so that its lock excludes the
    loop's appends), and reports back to the loop."""

    def __init__(self, spool_dir: str, loop: asyncio.AbstractEventLoop,
                 report: Callable[[int, Exception | None], None]):
        self.log = queue.Log(spool_dir)
        self.loop = loop
        self.report = report
        self._cond = threading.Condition()
        self._wanted = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="commit", daemon=True)
        self._thread.start()   # RuntimeError if no thread can start

    def want(self, lsn: int) -> None:
        with self._cond:
            if lsn > self._wanted:
                self._wanted = lsn
                self._cond.notify()

    def _run(self) -> None:
        done = 0
        while True:
            with self._cond:
                while self._wanted <= done and not self._stopping:
                    self._cond.wait()
                if self._wanted <= done:
                    return
                upto = self._wanted
            error: Exception | None = None
            try:
                self.log.sync(upto)
            except Exception as e:   # QueueError, or worse: those sessions get a 4xx
                error = e
            done = upto
            try:
                self.loop.call_soon_threadsafe(self.report, upto, error)
            except RuntimeError:
                return   # the loop is closed: the worker is gone

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self.log.close()


class GroupCommitter:
    def __init__(self, spool_dir: str, notify: socket.socket | None = None,
                 on_breakdown: Callable[[Exception], None] | None = None):
        self.spool_dir = spool_dir
        self.notify = notify
        # Called when committing fails for a reason of this process's own (it cannot
        # start its thread, it is out of memory), not of the disk: the worker retires.
        self.on_breakdown = on_breakdown
        self.ids = queue.QueueIds()
        self.log = queue.Log(spool_dir)
        self._pending: list[tuple[queue.QueuedMessage, queue.SpillFile | None,
                                  asyncio.Future[str]]] = []
        self._write_scheduled = False
        # Appended, waiting for the flush: (LSN past the record, queue ID, future).
        self._waiting: collections.deque[tuple[int, str, asyncio.Future[str]]] = collections.deque()
        self._syncer: _Syncer | None = None
        self._inline = False            # no sync thread could be started
        self._spare: threading.Thread | None = None
        self._wake_handle: asyncio.TimerHandle | None = None
        self._last_wake = 0.0

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
        if not self._write_scheduled:
            # Everything submitted in this turn of the loop goes into one append.
            self._write_scheduled = True
            loop.call_soon(self._write)
        return future

    def _write(self) -> None:
        self._write_scheduled = False
        batch, self._pending = self._pending, []
        payloads, waiting = [], []
        full = False
        for message, spill, future in batch:
            if spill is not None:
                try:
                    spill.move_to(queue.data_path(self.spool_dir, message.queue_id))
                except queue.QueueError as e:
                    self._fail([future], e)
                    continue
                full = True     # its data file and directory entry ride on a syncfs
            payloads.append(queue.encode_payload(message))
            waiting.append((message, spill, future))
        if not payloads:
            return
        try:
            end = self.log.append(payloads, full)
        except Exception as e:
            for message, spill, _ in waiting:
                if spill is not None:
                    spill.discard()
            self._fail([f for _, _, f in waiting], e)
            return
        for message, _, future in waiting:
            self._waiting.append((end, message.queue_id, future))
        self._sync(end)
        if self.log.want_spare:
            self._prepare_spare()

    def _sync(self, end: int) -> None:
        if self.log.flush_s < INLINE_FLUSH_S and not self._syncer_busy():
            self._sync_here(end)
            return
        if self._syncer is None and not self._inline:
            try:
                self._syncer = _Syncer(self.spool_dir, asyncio.get_running_loop(), self._synced)
            except RuntimeError as e:
                # The thread cannot start (thread or address-space limit): flush here,
                # blocking the loop, rather than fail the message; and retire.
                self._inline = True
                if self.on_breakdown:
                    self.on_breakdown(e)
        if self._syncer is not None:
            self._syncer.want(end)
            return
        self._sync_here(end)

    def _syncer_busy(self) -> bool:
        # Records handed to the thread are resolved by it, in order.
        return bool(self._waiting) and self._waiting[0][0] < self._waiting[-1][0]

    def _sync_here(self, end: int) -> None:
        error: Exception | None = None
        try:
            self.log.sync(end)
        except Exception as e:
            error = e
        self._synced(end, error)

    def _synced(self, upto: int, error: Exception | None) -> None:
        """On the loop: the log is durable up to UPTO (or that flush failed)."""
        done = False
        while self._waiting and self._waiting[0][0] <= upto:
            _, queue_id, future = self._waiting.popleft()
            if future.done():
                continue
            if error is None:
                future.set_result(queue_id)
                done = True
            else:
                future.set_exception(error)
        if error is not None:
            log.error("queue flush failed: %s", error)
        if done:
            self._schedule_wake()

    @staticmethod
    def _fail(futures: list[asyncio.Future[str]], error: Exception) -> None:
        # QueueError (disk full, I/O error) or worse: these sessions get a 4xx, never silence.
        log.error("queue write failed for %d message(s): %s", len(futures), error)
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def _prepare_spare(self) -> None:
        """Create a free segment in the background, so that the next switch does not
        create one on the loop (it zero-fills and flushes twice)."""
        self.log.want_spare = False
        if self._spare is not None and self._spare.is_alive():
            return

        def create() -> None:
            try:
                queue.create_segment(self.spool_dir, spare=True)
            except Exception as e:
                log.warning("cannot prepare a spare queue segment: %s", e)

        self._spare = threading.Thread(target=create, name="spare", daemon=True)
        try:
            self._spare.start()
        except RuntimeError:
            self._spare = None

    def _schedule_wake(self) -> None:
        """Wake delivery after the sessions' callbacks have sent their 250s (on a small
        machine it competes with them for the CPU), and at most every WAKE_INTERVAL_S:
        under load one wake-up then serves many commits."""
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
        while self._pending or self._write_scheduled or any(not f.done() for _, _, f in self._waiting):
            await asyncio.sleep(0.005)

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        if self._spare is not None:
            self._spare.join()
        self.log.close()
