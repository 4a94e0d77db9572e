"""The IMAP service as a worker runs it: its sessions share the worker's login checker,
a few threads for mailbox I/O (reading mbox files and rewriting them blocks; the event
loop must not) and one watcher that tells IDLE sessions their mailbox changed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Any, Callable, TypeVar

from ..config import ListenAddress
from ..service import WorkerContext
from .session import IMAPSession
from .watcher import Watcher

# Mailbox work at once per worker: a long expunge or a first FETCH of a large mailbox
# must not hold up everyone else's commands, and more threads than this only contend
# for the GIL and the disk.
IO_THREADS = 4

T = TypeVar("T")


class IMAPService:
    def __init__(self, context: WorkerContext):
        self.context = context
        self.watcher = Watcher(context.config.spool_dir)
        self._executor = concurrent.futures.ThreadPoolExecutor(IO_THREADS, "imap-io")

    def new_session(self, listener: ListenAddress) -> IMAPSession:
        return IMAPSession(self.context, listener, self)

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    async def close(self) -> None:
        self.watcher.close()
        self._executor.shutdown(wait=True)
