"""A session driven by a sans-IO protocol: the event pump every service's session shares.

Owns: feeding received bytes to the protocol object and carrying out the events it
returns, in order. Writes are gathered into one write per turn (replies to pipelined
commands leave in one segment); any other event goes to the subclass (carry_out), which
may start work that takes time (run_then: a coroutine, e.g. a password check or mailbox
I/O in threads, or a message being stored), during which nothing more is read and the
deadline waits. Input the protocol left unread (it handles at most so many pipelined
commands a turn) is taken up in a later turn, so one client cannot hold the worker's
loop. The deadline is re-armed whenever the protocol finished a command. STARTTLS and
STLS: the input the protocol buffered after the command is discarded unread and
logged, and a fresh protocol object takes over after the handshake (nothing said
before it survives). Back-pressure for long outputs: `writable` is set while the
client reads what we send.
Must not: know any protocol's events beyond "these are bytes to write".

The protocol object offers greeting(), feed(bytes), shutdown(), timed_out(),
commands_done and has_unread_commands (and `waiting`, if it can wait for an answer).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable

from ..config import ListenAddress
from ..service import WorkerContext
from .session import StreamSession


class ProtocolSession(StreamSession):
    # Pipelined commands handled before other sessions get a turn (a client pipelining
    # megabytes of NOOP must not hold the worker's loop).
    COMMANDS_PER_TURN = 100

    def __init__(self, context: WorkerContext, listener: ListenAddress):
        super().__init__(context, listener)
        self.conn: Any = None
        self._pending: collections.deque[Any] = collections.deque()
        self._busy = False            # work for the protocol is under way
        self._more_scheduled = False
        self._commands_seen = 0
        self.writable = asyncio.Event()
        self.writable.set()

    # --- what a protocol's session fills in -----------------------------------------------

    def new_protocol(self) -> Any:
        """A protocol object for this connection (again after a TLS handshake)."""
        raise NotImplementedError

    def output(self, event: Any) -> bytes | None:
        """The bytes to send if event is a plain write; None for anything else."""
        raise NotImplementedError

    def carry_out(self, event: Any) -> None:
        """Any event but a plain write."""
        raise NotImplementedError

    def deadline_s(self) -> float:
        """How long the client has for what it is doing now."""
        raise NotImplementedError

    def tls_restarted(self, old: Any) -> None:
        """The handshake is done and `old` is about to be replaced (keep its counts)."""

    # --- StreamSession ------------------------------------------------------------------

    def begin(self) -> None:
        self.conn = self.new_protocol()
        self.arm_deadline()
        self.run(self.conn.greeting())

    def received(self, data: bytes) -> None:
        if self.conn is not None:
            self.run(self.conn.feed(data))

    def busy(self) -> bool:
        return self._busy

    def wants_pause(self) -> bool:
        conn = self.conn
        return self._busy or (conn is not None and (getattr(conn, "waiting", False)
                                                    or conn.has_unread_commands))

    def on_deadline(self) -> None:
        if self.conn is not None:
            self.log.info("timeout from [%s]", self.client_ip)
            self.run(self.conn.timed_out())

    def shutdown(self) -> None:
        super().shutdown()
        if self.conn is not None:
            self.run(self.conn.shutdown())

    def ended(self, exc: Exception | None) -> None:
        self.writable.set()     # a long output waiting for the client wakes and stops

    def pause_writing(self) -> None:
        super().pause_writing()
        self.writable.clear()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writable.set()

    # --- carrying out events ----------------------------------------------------------

    def run(self, events: list[Any]) -> None:
        self._pending.extend(events)
        self._drain()
        conn = self.conn
        if conn is None:
            return
        if conn.commands_done != self._commands_seen:
            self._commands_seen = conn.commands_done
            self.arm_deadline()
        if conn.has_unread_commands and not self._more_scheduled:
            self._more_scheduled = True
            asyncio.get_running_loop().call_soon(self._feed_more)

    def _feed_more(self) -> None:
        self._more_scheduled = False
        if self.conn is not None and not self._busy:   # else the answer comes back here
            self._guarded(lambda: self.run(self.conn.feed(b"")))

    def _drain(self) -> None:
        out: list[bytes] = []
        while self._pending and not self._busy and self.is_open:
            event = self._pending.popleft()
            data = self.output(event)
            if data is not None:
                out.append(data)
                continue
            self._flush(out)
            self.carry_out(event)
        self._flush(out)
        self.update_reading()

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self.write(b"".join(out) if len(out) > 1 else out[0])
        out.clear()

    def close_after_last_reply(self) -> None:
        self._pending.clear()
        self.close_after_reply()

    def hold(self) -> None:
        """Work is under way: read nothing, time nothing out (until release())."""
        self._busy = True
        self.update_reading()

    def release(self) -> None:
        self._busy = False

    def run_then(self, job: Awaitable[Any], then: Callable[[Any], None]) -> None:
        """Run job (it may wait for threads), holding input meanwhile; then give its
        result to then()."""
        self.hold()

        def done(task: asyncio.Task[Any]) -> None:
            self.release()
            if task.cancelled() or self.conn is None:
                return
            error = task.exception()
            if error is not None:
                self.log.error("internal error in session with [%s]", self.client_ip,
                               exc_info=error)
                self.fail()
                return
            self._guarded(lambda: then(task.result()))

        asyncio.get_running_loop().create_task(job).add_done_callback(done)

    def answer(self, events: list[Any]) -> None:
        """The protocol's answer to finished work: its deadline starts again."""
        self.arm_deadline()
        self.run(events)

    def arm_deadline(self) -> None:
        self.set_deadline(self.deadline_s())

    # --- STARTTLS / STLS ----------------------------------------------------------------

    def start_tls_after(self, command: str, injected: int) -> None:
        """The protocol said "start TLS now"; `injected` octets it had read after the
        command were dropped unread (CVE-2011-0411)."""
        if injected:
            self.log.warning("discarded %d byte(s) sent after %s by [%s] before the TLS "
                             "handshake", injected, command, self.client_ip)
        self._pending.clear()
        self.start_tls(self._tls_started)

    def _tls_started(self) -> None:
        self.tls_restarted(self.conn)
        self.conn = self.new_protocol()     # no new greeting (RFC 3207, 2595, 3501)
        self._commands_seen = 0
        self.arm_deadline()
