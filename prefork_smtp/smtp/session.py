"""One SMTP connection on the event loop: bytes between the socket and the protocol.

Owns: feeding received bytes to protocol.SMTPConnection and carrying out its events
in order (write a reply, store a message, close), per-command deadlines (a command
or DATA block must be complete within its timeout however slowly it trickles in),
the error tarpit, and back-pressure (stop reading while a message is stored or the
client is not reading our replies).
Must not: parse SMTP itself or touch mailboxes. An unexpected exception becomes
451 4.3.0 to the client and a traceback in the log, never exception text on the wire.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from ..config import Config
from ..net.tcp import stream_transport
from ..service import SessionHooks
from ..store.committer import GroupCommitter
from ..store.mailboxes import Router
from ..store.queue import QueueError, SpillFile
from . import replies as R
from .protocol import (CloseConnection, Event, MessageAborted, MessageChunk, SendReply,
                       SMTPConnection, StoreMessage)

# Messages larger than this go to a file as they arrive instead of staying in memory.
SPILL_BYTES = 1 << 20
# Pipelined commands handled before other sessions get a turn (a client pipelining
# megabytes of NOOP must not hold the worker's loop).
COMMANDS_PER_TURN = 100
# After our last reply, how long a client gets to close its end before we do.
CLOSE_LINGER_S = 1.0

log = logging.getLogger("ccsmtp.smtpd")


class SMTPSession(asyncio.Protocol):
    family = "smtp"

    def __init__(self, config: Config, router: Router, committer: GroupCommitter,
                 hooks: SessionHooks):
        self.config = config
        self.router = router
        self.committer = committer
        self.hooks = hooks
        # Counted from the moment asyncio accepted the socket, before connection_made:
        # a worker that stops must not forget a connection it has taken from the queue.
        hooks.opened(self)
        self.transport: asyncio.Transport | None = None
        self.conn: SMTPConnection | None = None
        self.client_ip = "unknown"
        self._pending: collections.deque[Event] = collections.deque()
        self._busy = False            # a store or a tarpit delay is in progress
        self._reading_paused = False
        self._write_blocked = False
        self._deadline = 0.0
        self._commands_seen = 0
        self._timer: asyncio.TimerHandle | None = None
        self._spill: SpillFile | None = None
        self._shutdown_requested = False
        self._closing = False
        self._more_scheduled = False

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unknown"
        log.info("connect from [%s]", self.client_ip)
        if not self.hooks.admit(self.client_ip):
            log.warning("too many connections from [%s]", self.client_ip)
            transport.write(bytes(R.TOO_MANY_CONNECTIONS))
            transport.close()
            return
        if self._shutdown_requested:   # accepted just as the worker began to stop
            transport.write(bytes(R.SHUTTING_DOWN))
            transport.close()
            return
        self.conn = SMTPConnection(self.config, self.router, self.client_ip, chunk_bytes=SPILL_BYTES,
                                   max_commands_per_feed=COMMANDS_PER_TURN)
        self._arm_deadline()
        self._run(self.conn.greeting())

    def data_received(self, data: bytes) -> None:
        if self.conn is None:
            return
        self._guarded(lambda: self._run(self.conn.feed(data)))

    def eof_received(self) -> bool | None:
        return False   # close our side too; an unfinished DATA is simply dropped

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer:
            self._timer.cancel()
        self.hooks.closed(self)
        self.hooks.release(self.client_ip)
        self._discard_spill()
        if self.conn is not None:
            log.info("disconnect from [%s] commands=%d messages=%d%s", self.client_ip,
                     self.conn.commands_done, self.conn.messages_accepted,
                     " (in DATA)" if self.conn.reading_data else "")
            self.conn = None

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()

    # --- what the worker asks ---------------------------------------------------

    def shutdown(self) -> None:
        """Graceful stop: idle sessions are closed now, open transactions later."""
        self._shutdown_requested = True
        if self.conn is not None:
            self._run(self.conn.shutdown())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- carrying out events ------------------------------------------------------

    def _run(self, events: list[Event]) -> None:
        self._pending.extend(events)
        self._drain()
        self._rearm_if_progress()
        if self.conn is not None and self.conn.has_unread_commands and not self._more_scheduled:
            self._more_scheduled = True
            asyncio.get_running_loop().call_soon(self._feed_more)

    def _feed_more(self) -> None:
        self._more_scheduled = False
        if self.conn is None or self._busy:
            return     # _stored() or the tarpit's resume comes back here through _run
        self._guarded(lambda: self._run(self.conn.feed(b"")))

    def _drain(self) -> None:
        # Replies to pipelined commands go out in one write (one syscall, one segment).
        out: list[bytes] = []
        while self._pending and not self._busy and self.transport is not None:
            event = self._pending.popleft()
            if isinstance(event, SendReply):
                if event.tarpit and self.config.error_delay_s > 0:
                    self._flush(out)
                    self._delay_then(event)
                    return
                out.append(event.data)
                continue
            self._flush(out)
            if isinstance(event, MessageChunk):
                self._keep_chunk(event.data)
            elif isinstance(event, MessageAborted):
                self._discard_spill()
            elif isinstance(event, StoreMessage):
                self._store(event)
            elif isinstance(event, CloseConnection):
                self._pending.clear()
                self._flush(out)
                self._close_after_reply()
        self._flush(out)
        self._update_reading()

    def _close_after_reply(self) -> None:
        """Send FIN after the last reply but read on until the client closes (or
        CLOSE_LINGER_S): closing with unread input would send a reset, and the
        client could lose the 221 or 421 it has not read yet."""
        transport = self.transport
        assert transport is not None
        self._closing = True
        self._update_reading()
        try:
            transport.write_eof()
        except OSError:            # the client has gone already (ENOTCONN)
            transport.close()
            return
        # abort, not close: close() waits for the output to drain, and a client that
        # never reads would hold the connection for ever.
        asyncio.get_running_loop().call_later(CLOSE_LINGER_S, transport.abort)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        out.clear()

    def _delay_then(self, reply: SendReply) -> None:
        self._busy = True
        self._update_reading()

        def resume() -> None:
            self._busy = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(reply.data)
                self._run([])

        asyncio.get_running_loop().call_later(self.config.error_delay_s, resume)

    def _keep_chunk(self, data: bytes) -> None:
        if self._spill is None:
            try:
                self._spill = self.committer.spill_file()
            except OSError as e:
                log.warning("cannot spill a large message to disk: %s", e)
                self._spill = SpillFile.failed(e)
        self._spill.write(data)

    def _discard_spill(self) -> None:
        if self._spill is not None:
            self._spill.discard()
            self._spill = None

    def _store(self, event: StoreMessage) -> None:
        self._busy = True
        spill, self._spill = self._spill, None
        future = self.committer.submit(event.envelope, event.content, spill)
        size = spill.size if spill is not None else len(event.content)
        future.add_done_callback(lambda f: self._guarded(lambda: self._stored(f, event, size)))

    def _stored(self, future: asyncio.Future[str], event: StoreMessage, size: int) -> None:
        self._busy = False
        if self.conn is None:   # the client went away; the message is queued all the same
            return
        error = future.exception()
        if error is None:
            queue_id = future.result()
            self.hooks.message_queued()
            env = event.envelope
            log.info("%s: client=[%s], helo=%s, from=<%s>, nrcpt=%d, size=%d", queue_id,
                     self.client_ip, env.helo, env.mail_from, len(env.recipients), size)
            events = self.conn.stored(queue_id)
        else:
            disk_full = isinstance(error, QueueError) and error.disk_full
            reply = R.INSUFFICIENT_STORAGE if disk_full else R.LOCAL_ERROR
            log.warning("reject: queue file write error from [%s]: %s", self.client_ip, error)
            events = self.conn.store_failed(reply)
        self._arm_deadline()
        self._run(events)

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except MemoryError:
            # Not a bug to trace: this process is out of memory; it retires.
            log.error("out of memory in session with [%s]", self.client_ip)
            self.hooks.broken("out of memory")
            self._fail()
        except Exception:
            log.exception("internal error in session with [%s]", self.client_ip)
            self._fail()

    def _fail(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes(R.LOCAL_ERROR))
            self.transport.close()

    # --- flow control and deadlines -----------------------------------------------------

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        unread = self.conn is not None and self.conn.has_unread_commands
        want_paused = (self._busy or self._write_blocked or unread) and not self._closing
        if want_paused and not self._reading_paused:
            self.transport.pause_reading()
        elif not want_paused and self._reading_paused:
            self.transport.resume_reading()
        self._reading_paused = want_paused

    def _rearm_if_progress(self) -> None:
        if self.conn is not None and self.conn.commands_done != self._commands_seen:
            self._commands_seen = self.conn.commands_done
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        # A deadline per command (or DATA block): trickling bytes does not extend it.
        conn = self.conn
        timeout = (self.config.timeout_data_s if conn is not None and conn.reading_data
                   else self.config.timeout_command_s)
        self._deadline = time.monotonic() + timeout
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self.conn is None:
            return
        remaining = self._deadline - time.monotonic()
        if self._busy or remaining > 0:
            # Not ours to time out while storing; otherwise re-check at the deadline.
            delay = remaining if remaining > 0 else 1.0
            self._timer = asyncio.get_running_loop().call_later(delay, self._check_deadline)
            return
        log.info("timeout after %s from [%s]", "DATA" if self.conn.reading_data else "command",
                 self.client_ip)
        self._run(self.conn.timed_out())
