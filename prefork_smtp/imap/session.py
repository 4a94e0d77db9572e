"""One IMAP connection on the event loop: octets between the socket and the protocol.

Owns: feeding received octets to protocol.IMAPConnection and carrying out its events
in order: responses; a login checked by the worker's LoginChecker (password check in
a thread, failures delayed); mailbox work (mailbox_commands, in the service's I/O
threads, never on the loop) whose output is written batch by batch, each batch only
once the client has read the one before (back-pressure: a 25 MB FETCH is never held
whole); STARTTLS (what the client sent after the command is discarded and logged);
IDLE (subscribed to the worker's watcher while idling); the autologout timer
(imap_timeout, restarted by every command, IDLE included: RFC 2177 §3 has clients
re-issue IDLE well within 30 minutes).
Must not: parse IMAP or touch mailbox files itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..config import ListenAddress
from ..net.session import StreamSession, is_loopback
from ..service import WorkerContext
from . import mailbox_commands
from . import response as R
from .mailbox_commands import Outcome
from .protocol import (CheckLogin, Close, Event, IdleEnded, IdleStarted, IMAPConnection,
                       MailboxWork, Send, StartTLS)

if TYPE_CHECKING:
    from .service import IMAPService

# Pipelined commands handled before other sessions get a turn.
COMMANDS_PER_TURN = 100

log = logging.getLogger("ccsmtp.imapd")

BYE_TOO_MANY = R.untagged(R.BYE, "Too many connections from your address")
BYE_SHUTTING_DOWN = R.untagged(R.BYE, "Server shutting down")
BYE_INTERNAL_ERROR = R.untagged(R.BYE, "Internal server error")


class IMAPSession(StreamSession):
    family = "imap"
    log = log

    def __init__(self, context: WorkerContext, listener: ListenAddress, service: "IMAPService"):
        super().__init__(context, listener)
        self.service = service
        self.conn: IMAPConnection | None = None
        self._pending: collections.deque[Event] = collections.deque()
        self._busy = False
        self._more_scheduled = False
        self._commands_seen = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._idle_mailbox: str | None = None
        self._user: str | None = None

    # --- StreamSession ------------------------------------------------------------------

    def refusal(self, why: str) -> bytes:
        return BYE_TOO_MANY if why == "too many connections" else BYE_SHUTTING_DOWN

    def begin(self) -> None:
        self.conn = self._new_protocol()
        self._arm_deadline()
        self._run(self.conn.greeting())

    def _new_protocol(self) -> IMAPConnection:
        return IMAPConnection(
            tls=self.tls is not None, starttls_available=self.tls_available,
            plaintext_allowed=self.tls is not None or is_loopback(self.client_ip),
            max_literal_after_login=self.config.max_size_bytes,
            hard_error_limit=self.config.hard_error_limit,
            max_commands_per_feed=COMMANDS_PER_TURN)

    def received(self, data: bytes) -> None:
        if self.conn is not None:
            self._run(self.conn.feed(data))

    def busy(self) -> bool:
        return self._busy

    def wants_pause(self) -> bool:
        return self._busy or (self.conn is not None and
                              (self.conn.waiting or self.conn.has_unread_commands))

    def on_deadline(self) -> None:
        if self.conn is not None:
            log.info("autologout of [%s] after %.0f s", self.client_ip,
                     self.config.imap_timeout_s)
            self._run(self.conn.timed_out())

    def shutdown(self) -> None:
        super().shutdown()
        if self.conn is not None:
            self._run(self.conn.shutdown())

    def fail(self) -> None:
        if self.is_open:
            self.write(BYE_INTERNAL_ERROR)
        self.close_now()

    def ended(self, exc: Exception | None) -> None:
        self._stop_idling()
        self._writable.set()     # a FETCH waiting for the client to read wakes and stops
        if self.conn is not None:
            log.info("disconnect from [%s] user=%s%s", self.client_ip, self._user or "-",
                     f" tls={self.tls.version}" if self.tls else "")
            self.conn = None

    def pause_writing(self) -> None:
        super().pause_writing()
        self._writable.clear()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writable.set()

    # --- carrying out events ------------------------------------------------------------

    def _run(self, events: list[Event]) -> None:
        self._pending.extend(events)
        self._drain()
        if self.conn is not None and self.conn.commands_done != self._commands_seen:
            self._commands_seen = self.conn.commands_done
            self._arm_deadline()
        if self.conn is not None and self.conn.has_unread_commands and not self._more_scheduled:
            self._more_scheduled = True
            asyncio.get_running_loop().call_soon(self._feed_more)

    def _feed_more(self) -> None:
        self._more_scheduled = False
        if self.conn is not None and not self._busy:
            self._guarded(lambda: self._run(self.conn.feed(b"")))

    def _drain(self) -> None:
        out: list[bytes] = []
        while self._pending and not self._busy and self.is_open:
            event = self._pending.popleft()
            if isinstance(event, Send):
                out.append(event.data)
                continue
            self._flush(out)
            if isinstance(event, CheckLogin):
                self._work(self._check_login(event), self._login_checked)
            elif isinstance(event, MailboxWork):
                self._work(self._mailbox_work(event), self._work_done)
            elif isinstance(event, IdleStarted):
                self._start_idling(event.mailbox)
            elif isinstance(event, IdleEnded):
                self._stop_idling()
            elif isinstance(event, StartTLS):
                self._start_tls()
            elif isinstance(event, Close):
                self._pending.clear()
                self.close_after_reply()
        self._flush(out)
        self.update_reading()

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self.write(b"".join(out))
        out.clear()

    def _work(self, job: Awaitable[Any], then: Callable[[Any], None]) -> None:
        """Run job (it may wait for threads); meanwhile read nothing; then answer."""
        self._busy = True
        self.update_reading()

        def done(task: asyncio.Task[Any]) -> None:
            self._busy = False
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

    def _answer(self, events: list[Event]) -> None:
        # An answer restarts the autologout clock, but IDLE's updates do not: a client
        # idling on a busy mailbox must still re-issue IDLE (RFC 2177 §3).
        if self.conn is not None and not self.conn.idling:
            self._arm_deadline()
        self._run(events)

    # --- login --------------------------------------------------------------------------

    async def _check_login(self, event: CheckLogin) -> str | None:
        login = self.context.login
        if login is None:
            return None
        return await login.check(event.user, event.password, self.client_ip, "imap",
                                 secure=self.tls is not None)

    def _login_checked(self, name: str | None) -> None:
        assert self.conn is not None
        if name:
            self._user = name
        self._answer(self.conn.login_ok(name) if name else self.conn.login_failed())

    # --- mailbox work ---------------------------------------------------------------------

    async def _mailbox_work(self, work: MailboxWork) -> Outcome:
        """Run the command in I/O threads a batch at a time, writing each batch and
        waiting until the client has read it before asking for the next (a batch
        without output is a time slice: the command then queues for its next turn)."""
        job = mailbox_commands.job_for(work, self.config.spool_dir)
        try:
            while True:
                chunk = await self.service.in_thread(job.next_batch)
                if chunk:
                    self.write(chunk)
                    await self._writable.wait()
                if not self.is_open:
                    return Outcome(R.NO, "gone", fatal=True)
                if job.outcome is not None:
                    return job.outcome
        finally:
            if job.outcome is None:
                await self.service.in_thread(job.close)

    def _work_done(self, outcome: Outcome) -> None:
        assert self.conn is not None
        if outcome.error is not None:
            level = logging.ERROR if outcome.code == "SERVERBUG" else logging.WARNING
            self.log.log(level, "mailbox %s for [%s]: %s", self._user, self.client_ip,
                         outcome.error, exc_info=outcome.error if outcome.code == "SERVERBUG"
                         else None)
        if outcome.bye is not None or outcome.fatal:
            self._stop_idling()
        self._answer(self.conn.work_done(outcome))

    # --- IDLE (RFC 2177) --------------------------------------------------------------------

    def _start_idling(self, mailbox: str) -> None:
        # The protocol's INBOX is the user's mailbox file.
        if self._user is not None and self._idle_mailbox is None:
            self._idle_mailbox = self._user
            self.service.watcher.subscribe(self._user, self._mailbox_changed)

    def _stop_idling(self) -> None:
        if self._idle_mailbox is not None:
            self.service.watcher.unsubscribe(self._idle_mailbox, self._mailbox_changed)
            self._idle_mailbox = None

    def _mailbox_changed(self) -> None:
        if self.conn is not None and not self._busy:
            self._guarded(lambda: self._run(self.conn.mailbox_changed()))
        elif self.conn is not None:
            # A poll (or the last batch of one) is under way: the protocol polls again
            # once it is answered.
            self.conn.mailbox_changed()

    # --- STARTTLS (RFC 3501 §6.2.1) -----------------------------------------------------------

    def _start_tls(self) -> None:
        assert self.conn is not None
        injected = self.conn.parser.discard_buffered()
        if injected:
            log.warning("discarded %d byte(s) sent after STARTTLS by [%s] before the TLS "
                        "handshake", injected, self.client_ip)
        self._pending.clear()
        self.start_tls(self._tls_started)

    def _tls_started(self) -> None:
        self.conn = self._new_protocol()       # no greeting after STARTTLS
        self._commands_seen = 0
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        self.set_deadline(self.config.imap_timeout_s)
