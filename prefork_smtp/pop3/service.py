"""The POP3 service as a worker runs it: its sessions share the worker's login
checker and a few threads for mailbox I/O (reading and rewriting mbox files blocks;
the event loop must not)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Any, Callable, TypeVar

from ..config import ListenAddress
from ..service import WorkerContext
from .maildrop import Maildrop, open_maildrop
from .session import POP3Session

# Mailbox work at once per worker: a long expunge (a large mailbox is copied) must not
# hold up everyone else's RETR, and more threads than this only contend for the disk.
IO_THREADS = 4

T = TypeVar("T")


class POP3Service:
    def __init__(self, context: WorkerContext):
        self.context = context
        self._executor = concurrent.futures.ThreadPoolExecutor(IO_THREADS, "pop3-io")

    def new_session(self, listener: ListenAddress) -> POP3Session:
        return POP3Session(self.context, listener, self)

    def open_maildrop(self, user: str) -> Maildrop:
        return open_maildrop(self.context.config.spool_dir, user)

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
