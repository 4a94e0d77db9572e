"""One POP3 connection on the event loop: bytes between the socket and the protocol.

Owns: feeding received bytes to protocol.POP3Connection and carrying out its events
in order: replies; a login checked by the worker's LoginChecker (in a thread, its
failures delayed); the user's maildrop opened, read and committed through the mail
store (blocking file work, in the service's I/O threads, never on the loop); messages
sent dot-stuffed with back-pressure: up to READ_AHEAD_BYTES read whole (with the next
ones, for a client retrieving in order), larger ones streamed, never held whole; STLS;
the autologout timer (pop3_timeout, restarted by every command).
Must not: parse POP3 or touch mailbox files itself. A dropped connection deletes
nothing: deletions happen only when the protocol asks for a Commit at QUIT.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..config import ListenAddress
from ..net.protocol_session import ProtocolSession
from ..net.session import is_loopback
from ..service import WorkerContext
from . import replies as R
from .dot_stuffing import DotStuffer
from .maildrop import READ_AHEAD_BYTES, Maildrop, MaildropInUse
from .protocol import (CheckLogin, CloseConnection, Commit, Event, OpenMaildrop,
                       POP3Connection, SendMessage, SendReply, StartTLS)

if TYPE_CHECKING:
    from .service import POP3Service

log = logging.getLogger("ccsmtp.pop3d")


class POP3Session(ProtocolSession):
    family = "pop3"
    log = log

    def __init__(self, context: WorkerContext, listener: ListenAddress, service: "POP3Service"):
        super().__init__(context, listener)
        self.service = service
        self.conn: POP3Connection | None = None
        self.maildrop: Maildrop | None = None
        self._retrieved = 0
        # Messages read with an earlier RETR, not yet asked for (READ_AHEAD_BYTES).
        self._read_ahead: dict[int, bytes] = {}
        self._last_retrieved = 0

    # --- ProtocolSession ------------------------------------------------------------------

    def refusal(self, why: str) -> bytes:
        return bytes(R.TOO_MANY_CONNECTIONS if why == "too many connections"
                     else R.SHUTTING_DOWN)

    def new_protocol(self) -> POP3Connection:
        return POP3Connection(tls=self.tls is not None, stls_available=self.tls_available,
                              plaintext_allowed=self.tls is not None or is_loopback(self.client_ip),
                              hard_error_limit=self.config.hard_error_limit,
                              max_commands_per_feed=self.COMMANDS_PER_TURN)

    def deadline_s(self) -> float:
        return self.config.pop3_timeout_s      # autologout, restarted by every command

    def output(self, event: Event) -> bytes | None:
        if isinstance(event, SendReply):
            return event.data
        if isinstance(event, SendMessage):
            return self._read_ahead_message(event)
        return None

    def carry_out(self, event: Event) -> None:
        if isinstance(event, CheckLogin):
            self.run_then(self._check_login(event), self._login_checked)
        elif isinstance(event, OpenMaildrop):
            self.run_then(self._open_maildrop(event.user), self._maildrop_opened)
        elif isinstance(event, SendMessage):
            self.run_then(self._send(event), lambda sent: self.answer(
                self.conn.message_sent() if sent else self.conn.message_failed()))
        elif isinstance(event, Commit):
            self.run_then(self._commit(event.deleted), lambda ok: self.answer(
                self.conn.committed() if ok else self.conn.commit_failed()))
        elif isinstance(event, StartTLS):
            assert self.conn is not None
            self.start_tls_after("STLS", len(self.conn.unprocessed))
        elif isinstance(event, CloseConnection):
            self.close_after_last_reply()

    def run(self, events: list[Event]) -> None:
        if any(isinstance(event, CloseConnection) for event in events):
            # Free the mailbox before the last reply goes out, not when the client gets
            # round to closing (up to CLOSE_LINGER_S later): a client that QUITs and
            # logs in again at once must not find its own session there.
            self._release_maildrop()
        super().run(events)

    def on_deadline(self) -> None:
        if self.conn is not None:
            log.info("autologout of [%s] after %.0f s", self.client_ip, self.config.pop3_timeout_s)
            self.run(self.conn.timed_out())

    def fail(self) -> None:
        if self.is_open:
            self.write(bytes(R.INTERNAL_ERROR))
        self.close_now()

    def ended(self, exc: Exception | None) -> None:
        super().ended(exc)
        self._release_maildrop()
        if self.conn is not None:
            log.info("disconnect from [%s] user=%s retrieved=%d%s", self.client_ip,
                     self.conn.user or "-", self._retrieved,
                     f" tls={self.tls.version}" if self.tls else "")
            self.conn = None

    def _release_maildrop(self) -> None:
        self._read_ahead = {}
        if self.maildrop is not None:
            self.maildrop.close()    # releases the mailbox's POP3 lock; deletes nothing
            self.maildrop = None

    # --- login and the maildrop -----------------------------------------------------

    async def _check_login(self, event: CheckLogin) -> str | None:
        login = self.context.login
        if login is None:
            return None
        return await login.check(event.user, event.password, self.client_ip, "pop3",
                                 secure=self.tls is not None)

    def _login_checked(self, name: str | None) -> None:
        assert self.conn is not None
        self.answer(self.conn.login_ok(name) if name else self.conn.login_failed())

    async def _open_maildrop(self, user: str) -> Maildrop | Exception:
        try:
            return await self.service.in_thread(self.service.open_maildrop, user)
        except (MaildropInUse, OSError) as e:
            return e

    def _maildrop_opened(self, result: Maildrop | Exception) -> None:
        assert self.conn is not None
        if isinstance(result, Exception):
            in_use = isinstance(result, MaildropInUse)
            if not in_use:
                log.error("cannot open the mailbox of %s for [%s]: %s", self.conn.user,
                          self.client_ip, result)
            self.answer(self.conn.maildrop_failed(in_use))
            return
        if self.conn is None or not self.is_open:
            result.close()
            return
        self.maildrop = result
        log.info("maildrop of %s for [%s]: %d message(s)", self.conn.user, self.client_ip,
                 len(result.messages))
        self.answer(self.conn.maildrop_opened(result.messages))

    def _read_ahead_message(self, event: SendMessage) -> bytes | None:
        """RETR of a message read ahead, while the client keeps up: sent with its +OK
        in one write, on the loop (no task, no thread); None if it is not at hand."""
        if event.body_lines is not None or self._write_blocked:
            return None
        content = self._read_ahead.pop(event.number, None)
        if content is None:
            return None
        self._retrieved += 1
        self._last_retrieved = event.number
        assert self.conn is not None
        self._pending.extend(self.conn.message_sent())
        return _stuffed(content)

    async def _send(self, event: SendMessage) -> bool:
        """Send one message, dot-stuffed: read whole (with those after it when the
        client retrieves in order), or streamed if large; False if it could not be
        read (the protocol then closes: nothing can be said inside a multi-line
        response)."""
        assert self.maildrop is not None
        number = event.number
        if event.body_lines is None and self.maildrop.size(number) <= READ_AHEAD_BYTES:
            content = self._read_ahead.pop(number, None)
            if content is None:
                in_order = number == self._last_retrieved + 1
                budget = READ_AHEAD_BYTES if in_order else self.maildrop.size(number)
                try:
                    run = await self.service.in_thread(self.maildrop.read_whole, number, budget)
                except OSError as e:
                    log.error("cannot read message %d of %s for [%s]: %s", number,
                              self.maildrop.name, self.client_ip, e)
                    return False
                content = run.pop(number)
                self._read_ahead = run
            self.write(_stuffed(content))
            await self.writable.wait()
            self._retrieved += 1
            self._last_retrieved = number
            return self.is_open
        return await self._stream(event)

    async def _stream(self, event: SendMessage) -> bool:
        """A large message (or TOP) in batches: a thread hop per BATCH_BYTES, the next
        one only once the client has read what was sent (back-pressure)."""
        assert self.maildrop is not None
        stuffer = DotStuffer()
        reader = self.maildrop.reader(event.number, event.body_lines)
        try:
            done = False
            while not done:
                pieces, done = await self.service.in_thread(reader.next_pieces)
                self.write(b"".join(stuffer.stuff(piece) for piece in pieces))
                await self.writable.wait()      # the client reads what we sent so far
                if not self.is_open:
                    return False
        except OSError as e:
            log.error("cannot read message %d of %s for [%s]: %s", event.number,
                      self.maildrop.name, self.client_ip, e)
            return False
        finally:
            reader.close()
        self.write(stuffer.finish())
        if event.body_lines is None:
            self._retrieved += 1
            self._last_retrieved = event.number
        return True

    async def _commit(self, deleted: tuple[int, ...]) -> bool:
        assert self.maildrop is not None
        try:
            await self.service.in_thread(self.maildrop.commit, deleted)
        except OSError as e:
            log.error("cannot delete %d message(s) of %s for [%s]: %s", len(deleted),
                      self.maildrop.name, self.client_ip, e)
            return False
        log.info("deleted %d message(s) of %s for [%s]", len(deleted), self.maildrop.name,
                 self.client_ip)
        return True


def _stuffed(content: bytes) -> bytes:
    """A whole message as RETR sends it: dot-stuffed, then the terminating line."""
    stuffer = DotStuffer()
    return stuffer.stuff(content) + stuffer.finish()
