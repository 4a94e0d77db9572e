"""One SMTP connection on the event loop: bytes between the socket and the protocol.

Owns: feeding received bytes to protocol.SMTPConnection and carrying out its events
in order (write a reply, keep a large message's pieces, store a message, start TLS,
close), the deadline of each command or message block, the error tarpit, and
back-pressure (stop reading while a message is stored or the client is not reading
our replies). The connection itself (TLS handshakes, the per-client limit, closing,
deadlines) is net.session.StreamSession's.
Must not: parse SMTP itself or touch mailboxes. An unexpected exception becomes
451 4.3.0 to the client and a traceback in the log, never exception text on the wire.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from ..config import ListenAddress
from ..net.session import StreamSession
from ..service import WorkerContext
from ..store.committer import GroupCommitter
from ..store.mailboxes import Router
from ..store.queue import QueueError, SpillFile
from . import replies as R
from .protocol import (CloseConnection, Event, MessageAborted, MessageChunk, SendReply,
                       SMTPConnection, StartTLS, StoreMessage)

# Messages larger than this go to a file as they arrive instead of staying in memory.
SPILL_BYTES = 1 << 20
# Pipelined commands handled before other sessions get a turn (a client pipelining
# megabytes of NOOP must not hold the worker's loop).
COMMANDS_PER_TURN = 100

log = logging.getLogger("ccsmtp.smtpd")


class SMTPSession(StreamSession):
    family = "smtp"
    log = log

    def __init__(self, context: WorkerContext, listener: ListenAddress, router: Router,
                 committer: GroupCommitter):
        super().__init__(context, listener)
        self.router = router
        self.committer = committer
        self.conn: SMTPConnection | None = None
        self._pending: collections.deque[Event] = collections.deque()
        self._busy = False            # a store or a tarpit delay is in progress
        self._commands_seen = 0
        self._spill: SpillFile | None = None
        self._more_scheduled = False
        # Counts of the protocol objects a STARTTLS left behind, for the last log line.
        self._commands_before_tls = 0
        self._messages_before_tls = 0

    # --- StreamSession ------------------------------------------------------------------

    def refusal(self, why: str) -> bytes:
        return bytes(R.TOO_MANY_CONNECTIONS if why == "too many connections"
                     else R.SHUTTING_DOWN)

    def begin(self) -> None:
        self.conn = self._new_protocol()
        self._arm_deadline()
        self._run(self.conn.greeting())

    def _new_protocol(self) -> SMTPConnection:
        return SMTPConnection(self.config, self.router, self.client_ip, chunk_bytes=SPILL_BYTES,
                              max_commands_per_feed=COMMANDS_PER_TURN,
                              tls=str(self.tls) if self.tls else None,
                              tls_available=self.tls_available)

    def received(self, data: bytes) -> None:
        if self.conn is not None:
            self._run(self.conn.feed(data))

    def ended(self, exc: Exception | None) -> None:
        self._discard_spill()
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        log.info("disconnect from [%s] commands=%d messages=%d%s%s", self.client_ip,
                 self._commands_before_tls + conn.commands_done,
                 self._messages_before_tls + conn.messages_accepted,
                 f" tls={self.tls.version}" if self.tls else "",
                 " (in DATA)" if conn.reading_data else "")

    def busy(self) -> bool:
        return self._busy

    def wants_pause(self) -> bool:
        return self._busy or (self.conn is not None and self.conn.has_unread_commands)

    def on_deadline(self) -> None:
        if self.conn is None:
            return
        log.info("timeout after %s from [%s]", "DATA" if self.conn.reading_data else "command",
                 self.client_ip)
        self._run(self.conn.timed_out())

    def shutdown(self) -> None:
        """Graceful stop: idle sessions are closed now, open transactions later."""
        super().shutdown()
        if self.conn is not None:
            self._run(self.conn.shutdown())

    def fail(self) -> None:
        if self.is_open:
            self.write(bytes(R.LOCAL_ERROR))
        self.close_now()

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
        while self._pending and not self._busy and self.is_open:
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
            elif isinstance(event, StartTLS):
                self._start_tls()
            elif isinstance(event, CloseConnection):
                self._pending.clear()
                self.close_after_reply()
        self._flush(out)
        self.update_reading()

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self.write(b"".join(out) if len(out) > 1 else out[0])
        out.clear()

    def _delay_then(self, reply: SendReply) -> None:
        self._busy = True
        self.update_reading()

        def resume() -> None:
            self._busy = False
            if self.is_open:
                self.write(reply.data)
                self._run([])

        asyncio.get_running_loop().call_later(self.config.error_delay_s, resume)

    # --- STARTTLS (RFC 3207, SPEC §8) -------------------------------------------------

    def _start_tls(self) -> None:
        assert self.conn is not None
        injected = self.conn.unprocessed
        if injected:
            # CVE-2011-0411: whatever came with the STARTTLS line is dropped unread.
            log.warning("discarded %d byte(s) sent after STARTTLS by [%s] before the TLS "
                        "handshake", len(injected), self.client_ip)
        self._pending.clear()
        self.start_tls(self._tls_started)

    def _tls_started(self) -> None:
        # RFC 3207 §4.2: forget everything the client said before; it starts with EHLO.
        old = self.conn
        if old is not None:
            self._commands_before_tls += old.commands_done
            self._messages_before_tls += old.messages_accepted
        self.conn = self._new_protocol()
        self._commands_seen = 0
        self._arm_deadline()

    # --- storing messages ---------------------------------------------------------

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
            log.info("%s: client=[%s], helo=%s, from=<%s>, nrcpt=%d, size=%d%s", queue_id,
                     self.client_ip, env.helo, env.mail_from, len(env.recipients), size,
                     f", tls={self.tls.version}" if self.tls else "")
            events = self.conn.stored(queue_id)
        else:
            disk_full = isinstance(error, QueueError) and error.disk_full
            reply = R.INSUFFICIENT_STORAGE if disk_full else R.LOCAL_ERROR
            log.warning("reject: queue file write error from [%s]: %s", self.client_ip, error)
            events = self.conn.store_failed(reply)
        self._arm_deadline()
        self._run(events)

    # --- deadlines ----------------------------------------------------------------------

    def _rearm_if_progress(self) -> None:
        if self.conn is not None and self.conn.commands_done != self._commands_seen:
            self._commands_seen = self.conn.commands_done
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        # A deadline per command (or DATA block, or BDAT chunk): trickling bytes does
        # not extend it, and a shorter one (timeout_data) takes effect at once.
        conn = self.conn
        self.set_deadline(self.config.timeout_data_s if conn is not None and conn.reading_data
                          else self.config.timeout_command_s)
