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
import logging

from ..config import ListenAddress
from ..net.protocol_session import ProtocolSession
from ..service import WorkerContext
from ..store.committer import GroupCommitter
from ..store.mailboxes import Router
from ..store.queue import QueueError, SpillFile
from . import replies as R
from .protocol import (CloseConnection, Event, MessageAborted, MessageChunk, SendReply,
                       SMTPConnection, StartTLS, StoreMessage)

# Messages larger than this go to a file as they arrive instead of staying in memory.
SPILL_BYTES = 1 << 20

log = logging.getLogger("ccsmtp.smtpd")


class SMTPSession(ProtocolSession):
    family = "smtp"
    log = log

    def __init__(self, context: WorkerContext, listener: ListenAddress, router: Router,
                 committer: GroupCommitter):
        super().__init__(context, listener)
        self.router = router
        self.committer = committer
        self.conn: SMTPConnection | None = None
        self._spill: SpillFile | None = None
        # Counts of the protocol objects a STARTTLS left behind, for the last log line.
        self._commands_before_tls = 0
        self._messages_before_tls = 0

    # --- ProtocolSession ------------------------------------------------------------------

    def refusal(self, why: str) -> bytes:
        return bytes(R.TOO_MANY_CONNECTIONS if why == "too many connections"
                     else R.SHUTTING_DOWN)

    def new_protocol(self) -> SMTPConnection:
        return SMTPConnection(self.config, self.router, self.client_ip, chunk_bytes=SPILL_BYTES,
                              max_commands_per_feed=self.COMMANDS_PER_TURN,
                              tls=str(self.tls) if self.tls else None,
                              tls_available=self.tls_available)

    def deadline_s(self) -> float:
        # A deadline per command, DATA block or BDAT chunk: trickling bytes does not
        # extend it, and a shorter one (timeout_data) takes effect at once.
        reading_data = self.conn is not None and self.conn.reading_data
        return self.config.timeout_data_s if reading_data else self.config.timeout_command_s

    def output(self, event: Event) -> bytes | None:
        if isinstance(event, SendReply) and not (event.tarpit and self.config.error_delay_s > 0):
            return event.data
        return None

    def carry_out(self, event: Event) -> None:
        if isinstance(event, SendReply):        # past soft_error_limit: the tarpit
            self._delay_then(event)
        elif isinstance(event, MessageChunk):
            self._keep_chunk(event.data)
        elif isinstance(event, MessageAborted):
            self._discard_spill()
        elif isinstance(event, StoreMessage):
            self._store(event)
        elif isinstance(event, StartTLS):
            assert self.conn is not None
            self.start_tls_after("STARTTLS", len(self.conn.unprocessed))
        elif isinstance(event, CloseConnection):
            self.close_after_last_reply()

    def tls_restarted(self, old: SMTPConnection | None) -> None:
        if old is not None:
            self._commands_before_tls += old.commands_done
            self._messages_before_tls += old.messages_accepted

    def on_deadline(self) -> None:
        if self.conn is not None:
            log.info("timeout after %s from [%s]",
                     "DATA" if self.conn.reading_data else "command", self.client_ip)
            self.run(self.conn.timed_out())

    def ended(self, exc: Exception | None) -> None:
        super().ended(exc)
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

    def fail(self) -> None:
        if self.is_open:
            self.write(bytes(R.LOCAL_ERROR))
        self.close_now()

    # --- the tarpit -----------------------------------------------------------------------

    def _delay_then(self, reply: SendReply) -> None:
        self.hold()

        def resume() -> None:
            self.release()
            if self.is_open:
                self.write(reply.data)
                self.run([])

        asyncio.get_running_loop().call_later(self.config.error_delay_s, resume)

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
        spill, self._spill = self._spill, None
        future = self.committer.submit(event.envelope, event.content, spill)
        # After submit: it writes the last piece into the spill file.
        size = spill.size if spill is not None else len(event.content)
        self.hold()

        def committed(f: asyncio.Future[str]) -> None:
            # A callback, not a task: one fewer object and loop turn per message.
            self.release()
            if f.cancelled():
                return
            # QueueError (disk full, I/O) or worse: a 4xx.
            outcome = f.exception() or f.result()
            self._guarded(lambda: self._stored(outcome, event, size))

        future.add_done_callback(committed)

    def _stored(self, outcome: str | Exception, event: StoreMessage, size: int) -> None:
        if self.conn is None:   # the client went away; the message is queued all the same
            return
        if isinstance(outcome, Exception):
            disk_full = isinstance(outcome, QueueError) and outcome.disk_full
            reply = R.INSUFFICIENT_STORAGE if disk_full else R.LOCAL_ERROR
            log.warning("reject: queue file write error from [%s]: %s", self.client_ip, outcome)
            self.answer(self.conn.store_failed(reply))
            return
        self.hooks.message_queued()
        env = event.envelope
        log.info("%s: client=[%s], helo=%s, from=<%s>, nrcpt=%d, size=%d%s", outcome,
                 self.client_ip, env.helo, env.mail_from, len(env.recipients), size,
                 f", tls={self.tls.version}" if self.tls else "")
        self.answer(self.conn.stored(outcome))
