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

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..config import ListenAddress
from ..net.session import StreamSession, is_loopback
from ..service import WorkerContext
from . import replies as R
from .dot_stuffing import DotStuffer
from .maildrop import READ_AHEAD_BYTES, Maildrop, MaildropInUse
from .protocol import (CheckLogin, CloseConnection, Commit, Event, OpenMaildrop,
                       POP3Connection, SendMessage, SendReply, StartTLS)

if TYPE_CHECKING:
    from .service import POP3Service

# Pipelined commands handled before other sessions get a turn.
COMMANDS_PER_TURN = 100

log = logging.getLogger("ccsmtp.pop3d")


class POP3Session(StreamSession):
    family = "pop3"
    log = log

    def __init__(self, context: WorkerContext, listener: ListenAddress, service: "POP3Service"):
        super().__init__(context, listener)
        self.service = service
        self.conn: POP3Connection | None = None
        self.maildrop: Maildrop | None = None
        self._pending: collections.deque[Event] = collections.deque()
        self._busy = False           # an answer for the protocol is being worked out
        self._more_scheduled = False
        self._commands_seen = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._retrieved = 0
        # Messages read with an earlier RETR, not yet asked for (READ_AHEAD_BYTES).
        self._read_ahead: dict[int, bytes] = {}
        self._last_retrieved = 0

    # --- StreamSession ------------------------------------------------------------------

    def refusal(self, why: str) -> bytes:
        return bytes(R.TOO_MANY_CONNECTIONS if why == "too many connections"
                     else R.SHUTTING_DOWN)

    def begin(self) -> None:
        self.conn = self._new_protocol()
        self._arm_deadline()
        self._run(self.conn.greeting())

    def _new_protocol(self) -> POP3Connection:
        return POP3Connection(tls=self.tls is not None, stls_available=self.tls_available,
                              plaintext_allowed=self.tls is not None or is_loopback(self.client_ip),
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
            log.info("autologout of [%s] after %.0f s", self.client_ip, self.config.pop3_timeout_s)
            self._run(self.conn.timed_out())

    def shutdown(self) -> None:
        super().shutdown()
        if self.conn is not None:
            self._run(self.conn.shutdown())

    def fail(self) -> None:
        if self.is_open:
            self.write(bytes(R.INTERNAL_ERROR))
        self.close_now()

    def ended(self, exc: Exception | None) -> None:
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

    def pause_writing(self) -> None:
        super().pause_writing()
        self._writable.clear()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writable.set()

    # --- carrying out events ------------------------------------------------------

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
            if isinstance(event, SendReply):
                out.append(event.data)
                continue
            if isinstance(event, SendMessage) and self._send_read_ahead(event, out):
                continue
            if isinstance(event, CloseConnection):
                self._pending.clear()
                # Free the mailbox before the last reply goes out, not when the client
                # gets round to closing (up to CLOSE_LINGER_S later): a client that
                # QUITs and logs in again at once must not find its own session there.
                self._release_maildrop()
                self._flush(out)
                self.close_after_reply()
                continue
            self._flush(out)
            if isinstance(event, CheckLogin):
                self._work(self._check_login(event), self._login_checked)
            elif isinstance(event, OpenMaildrop):
                self._work(self._open_maildrop(event.user), self._maildrop_opened)
            elif isinstance(event, SendMessage):
                self._work(self._send(event), lambda sent: self._answer(
                    self.conn.message_sent() if sent else self.conn.message_failed()))
            elif isinstance(event, Commit):
                self._work(self._commit(event.deleted), lambda ok: self._answer(
                    self.conn.committed() if ok else self.conn.commit_failed()))
            elif isinstance(event, StartTLS):
                self._start_tls()
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
        self._arm_deadline()
        self._run(events)

    # --- login and the maildrop -----------------------------------------------------

    async def _check_login(self, event: CheckLogin) -> str | None:
        login = self.context.login
        if login is None:
            return None
        return await login.check(event.user, event.password, self.client_ip, "pop3",
                                 secure=self.tls is not None)

    def _login_checked(self, name: str | None) -> None:
        assert self.conn is not None
        self._answer(self.conn.login_ok(name) if name else self.conn.login_failed())

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
            self._answer(self.conn.maildrop_failed(in_use))
            return
        if self.conn is None or not self.is_open:
            result.close()
            return
        self.maildrop = result
        log.info("maildrop of %s for [%s]: %d message(s)", self.conn.user, self.client_ip,
                 len(result.messages))
        self._answer(self.conn.maildrop_opened(result.messages))

    def _send_read_ahead(self, event: SendMessage, out: list[bytes]) -> bool:
        """RETR of a message read ahead, while the client keeps up: sent with its +OK
        in one write, on the loop (no task, no thread); False if it is not at hand."""
        if event.body_lines is not None or self._write_blocked:
            return False
        content = self._read_ahead.pop(event.number, None)
        if content is None:
            return False
        out.append(_stuffed(content))
        self._retrieved += 1
        self._last_retrieved = event.number
        assert self.conn is not None
        self._pending.extend(self.conn.message_sent())
        return True

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
            await self._writable.wait()
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
                await self._writable.wait()      # the client reads what we sent so far
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

    # --- STLS (RFC 2595) ----------------------------------------------------------------

    def _start_tls(self) -> None:
        assert self.conn is not None
        injected = self.conn.unprocessed
        if injected:
            log.warning("discarded %d byte(s) sent after STLS by [%s] before the TLS "
                        "handshake", len(injected), self.client_ip)
        self._pending.clear()
        self.start_tls(self._tls_started)

    def _tls_started(self) -> None:
        self.conn = self._new_protocol()      # RFC 2595 §4: no new greeting
        self._commands_seen = 0
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        self.set_deadline(self.config.pop3_timeout_s)


def _stuffed(content: bytes) -> bytes:
    """A whole message as RETR sends it: dot-stuffed, then the terminating line."""
    stuffer = DotStuffer()
    return stuffer.stuff(content) + stuffer.finish()
