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

import logging
from typing import TYPE_CHECKING

from ..config import ListenAddress
from ..net.protocol_session import ProtocolSession
from ..net.session import is_loopback
from ..service import WorkerContext
from . import mailbox_commands
from . import response as R
from .mailbox_commands import Outcome
from .protocol import (CheckLogin, Close, Event, IdleEnded, IdleStarted, IMAPConnection,
                       MailboxWork, Send, StartTLS)

if TYPE_CHECKING:
    from .service import IMAPService

log = logging.getLogger("ccsmtp.imapd")

BYE_TOO_MANY = R.untagged(R.BYE, "Too many connections from your address")
BYE_SHUTTING_DOWN = R.untagged(R.BYE, "Server shutting down")
BYE_INTERNAL_ERROR = R.untagged(R.BYE, "Internal server error")


class IMAPSession(ProtocolSession):
    family = "imap"
    log = log

    def __init__(self, context: WorkerContext, listener: ListenAddress, service: "IMAPService"):
        super().__init__(context, listener)
        self.service = service
        self.conn: IMAPConnection | None = None
        self._idle_mailbox: str | None = None
        self._user: str | None = None

    # --- ProtocolSession ------------------------------------------------------------------

    def refusal(self, why: str) -> bytes:
        return BYE_TOO_MANY if why == "too many connections" else BYE_SHUTTING_DOWN

    def new_protocol(self) -> IMAPConnection:
        return IMAPConnection(
            tls=self.tls is not None, starttls_available=self.tls_available,
            plaintext_allowed=self.tls is not None or is_loopback(self.client_ip),
            max_literal_after_login=self.config.max_size_bytes,
            hard_error_limit=self.config.hard_error_limit,
            max_commands_per_feed=self.COMMANDS_PER_TURN)

    def deadline_s(self) -> float:
        return self.config.imap_timeout_s      # autologout, restarted by every command

    def output(self, event: Event) -> bytes | None:
        return event.data if isinstance(event, Send) else None

    def carry_out(self, event: Event) -> None:
        if isinstance(event, CheckLogin):
            self.run_then(self._check_login(event), self._login_checked)
        elif isinstance(event, MailboxWork):
            self.run_then(self._mailbox_work(event), self._work_done)
        elif isinstance(event, IdleStarted):
            self._start_idling(event.mailbox)
        elif isinstance(event, IdleEnded):
            self._stop_idling()
        elif isinstance(event, StartTLS):
            assert self.conn is not None
            self.start_tls_after("STARTTLS", self.conn.parser.discard_buffered())
        elif isinstance(event, Close):
            self.close_after_last_reply()

    def answer(self, events: list[Event]) -> None:
        # An answer restarts the autologout clock, but IDLE's updates do not: a client
        # idling on a busy mailbox must still re-issue IDLE (RFC 2177 §3).
        if self.conn is not None and not self.conn.idling:
            self.arm_deadline()
        self.run(events)

    def on_deadline(self) -> None:
        if self.conn is not None:
            log.info("autologout of [%s] after %.0f s", self.client_ip,
                     self.config.imap_timeout_s)
            self.run(self.conn.timed_out())

    def fail(self) -> None:
        if self.is_open:
            self.write(BYE_INTERNAL_ERROR)
        self.close_now()

    def ended(self, exc: Exception | None) -> None:
        super().ended(exc)       # a FETCH waiting for the client to read wakes and stops
        self._stop_idling()
        if self.conn is not None:
            log.info("disconnect from [%s] user=%s%s", self.client_ip, self._user or "-",
                     f" tls={self.tls.version}" if self.tls else "")
            self.conn = None

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
        self.answer(self.conn.login_ok(name) if name else self.conn.login_failed())

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
                    await self.writable.wait()
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
        self.answer(self.conn.work_done(outcome))

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
        if self.conn is not None and not self.busy():
            self._guarded(lambda: self.run(self.conn.mailbox_changed()))
        elif self.conn is not None:
            # A poll (or the last batch of one) is under way: the protocol polls again
            # once it is answered.
            self.conn.mailbox_changed()
