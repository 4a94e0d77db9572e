"""What every session shares, whatever its protocol: one connection on the event loop.

Owns: the transport and its life (the client's address, from a PROXY header when the
connection comes from `proxy_from`; the per-client connection limit; the TLS
handshake for implicit TLS and for STARTTLS/STLS; closing after a last reply), deadlines (a command must be complete within its timeout however
slowly it trickles in; a shorter deadline takes effect at once), reading
back-pressure, and turning unexpected exceptions into one log line and a closed
connection instead of a dead worker.
A protocol's session (SMTP, POP3, IMAP) subclasses StreamSession and fills in
begin(), received(), on_deadline() and the replies it sends when refusing a
connection; its sans-IO state machine never sees a socket.
Must not: parse any protocol.

TLS (SPEC §8): the handshake runs with the command timeout. Before it starts, the
subclass has decided what to do with bytes it already read past the STARTTLS line
(they are never executed); from the moment start_tls() is called nothing more is
read in plain text, whatever the Python version does with its own buffers, because
reading is paused in the same turn and asyncio's TLS layer takes over the socket.
What the TLS layer decrypts before start_tls() has returned (a client's first command
in the segment that ends its handshake) is kept and given to the new session after it
has begun. A failed handshake is one log line and a closed connection.

PROXY (SPEC §11): a connection from a `proxy_from` network must start with a PROXY
header, which is read before anything else and never again. On plain listeners it
comes through data_received like any input, and what follows it in the same read is
the session's first input. On implicit-TLS listeners what follows it is the TLS
handshake's, which asyncio must read itself: there the header is peeked at with
MSG_PEEK and only its own octets are taken. Missing, malformed, or incomplete after 5 s: one log line and
the connection is closed without a greeting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
from typing import Callable

from ..config import Config, ListenAddress
from ..service import SessionHooks, WorkerContext
from .proxy import (HEADER_TIMEOUT_S, NEED_MORE, V2_FIXED_LENGTH, V2_MAX_HEADER, NeedMore,
                    ProxyError, ProxyHeaderParser, Result, from_proxy)
from .tcp import stream_transport
from .tls import TLSInfo, describe

# After our last reply, how long a client gets to close its end before we do.
CLOSE_LINGER_S = 1.0

log = logging.getLogger("ccsmtp.session")


class StreamSession(asyncio.Protocol):
    family = "?"                      # the service family, for counting (config.SERVICE_FAMILIES)
    log = log

    def __init__(self, context: WorkerContext, listener: ListenAddress):
        self.context = context
        self.config: Config = context.config
        self.hooks: SessionHooks = context.hooks
        self.listener = listener
        # Counted from the moment asyncio accepted the socket, before connection_made:
        # a worker that stops must not forget a connection it has taken from the queue.
        self.hooks.opened(self)
        self.transport: asyncio.Transport | None = None
        self.client_ip = "unknown"
        self.tls: TLSInfo | None = None
        self.handshaking = False
        self._early_input = bytearray()   # decrypted before the handshake's end was seen
        self._admitted = False
        self._ended = False
        self._closing = False
        self._shutdown_requested = False
        self._reading_paused = False
        self._write_blocked = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        # A PROXY header that came in pieces, read through data_received (plain listeners).
        self._proxy_parser: ProxyHeaderParser | None = None
        self._proxy_timer: asyncio.TimerHandle | None = None

    # --- what a protocol's session fills in ---------------------------------------------

    def begin(self) -> None:
        """The connection is ready (and encrypted, on an implicit-TLS listener): greet."""
        raise NotImplementedError

    def received(self, data: bytes) -> None:
        """Bytes from the client (decrypted when TLS is on)."""
        raise NotImplementedError

    def on_deadline(self) -> None:
        """The deadline passed: say goodbye (and close)."""
        self.close_now()

    def ended(self, exc: Exception | None) -> None:
        """The connection is gone; release what the session holds."""

    def busy(self) -> bool:
        """Work for the client is under way (a message being stored): deadlines wait."""
        return False

    def wants_pause(self) -> bool:
        """Input should wait (work under way, replies not yet read, input not yet used)."""
        return False

    def refusal(self, why: str) -> bytes:
        """The one reply sent to a connection refused at once: why is "too many
        connections" or "shutting down"."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Graceful stop of the server: idle sessions close now (override to say so)."""
        self._shutdown_requested = True

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unknown"
        if from_proxy(self.client_ip, self.config.proxy_from):
            self._guarded(self._read_proxy_header)
        else:
            self._guarded(self._open)

    def _open(self) -> None:
        self.log.info("connect from [%s]%s", self.client_ip,
                      f" to {self.listener.service}" if self.family != "smtp" or
                      self.listener.implicit_tls else "")
        if not self.hooks.admit(self.client_ip):
            self._admitted = True      # counted by admit(): released when it ends
            self.log.warning("too many connections from [%s]", self.client_ip)
            self._refuse("too many connections")
            return
        self._admitted = True
        if self._shutdown_requested:   # accepted just as the worker began to stop
            self._refuse("shutting down")
            return
        if self.listener.implicit_tls:
            self.start_tls(self.begin)
        else:
            self.begin()

    # --- PROXY protocol (SPEC §11) -----------------------------------------------------

    def _read_proxy_header(self) -> None:
        assert self.transport is not None
        parser = ProxyHeaderParser()
        loop = asyncio.get_running_loop()
        if not self.listener.implicit_tls:
            # The transport reads as usual and data_received feeds the parser; what
            # follows the header in the same read is the session's first input.
            self._proxy_parser = parser
            self._proxy_timer = loop.call_later(HEADER_TIMEOUT_S, self._proxy_header_late)
            return
        # Implicit TLS: the octets after the header are the handshake's, which asyncio
        # must read itself, so the header is peeked at and only its octets taken.
        # connection_made runs before the transport starts reading, and HAProxy sends
        # the header with its first segment: it is usually there already. The borrowed
        # socket object is detached before anything else runs, so it never closes the
        # transport's descriptor.
        sock = self.transport.get_extra_info("socket")
        borrowed = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        try:
            result = self._peek_proxy_header(borrowed, parser)
        finally:
            borrowed.detach()
        if not self._proxy_result(result):
            self._wait_for_proxy_header(parser)

    def _peek_proxy_header(self, raw: socket.socket, parser: ProxyHeaderParser) -> Result:
        """Feed the parser what the kernel holds, taking only the header's octets."""
        try:
            data = raw.recv(V2_FIXED_LENGTH + V2_MAX_HEADER, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return NEED_MORE
        except OSError as e:
            return ProxyError(f"connection error: {e.strerror}")
        if not data:
            return ProxyError("connection closed before the header")
        result = parser.feed(data)
        if isinstance(result, NeedMore):
            raw.recv(len(data))          # all of it is header: take it, wait for more
        elif not isinstance(result, ProxyError):
            raw.recv(len(data) - len(result.leftover))   # the header, not one byte more
        return result

    def _wait_for_proxy_header(self, parser: ProxyHeaderParser) -> None:
        """An implicit-TLS listener's header is not all there yet: peek at it on a
        descriptor of our own while the transport is paused, at most HEADER_TIMEOUT_S."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = self.transport
        transport.pause_reading()
        self._reading_paused = True
        raw = transport.get_extra_info("socket").dup()
        raw.setblocking(False)
        if sys.version_info < (3, 11, 4):
            # gh-103607: asyncio starts reading after connection_made whatever it was
            # told; resume_reading() then pause_reading() in the next turn removes the
            # reader again (before any read it may have queued runs).
            loop.call_soon(lambda: self._ended or raw.fileno() < 0 or
                           (transport.resume_reading(), transport.pause_reading()))

        def finish() -> None:
            loop.remove_reader(raw.fileno())
            self._proxy_timer = None
            timer.cancel()
            raw.close()

        def readable() -> None:
            result = self._peek_proxy_header(raw, parser)
            if not isinstance(result, NeedMore):
                finish()
                self._proxy_result(result)

        def late() -> None:
            finish()
            self._proxy_header_late()

        timer = loop.call_later(HEADER_TIMEOUT_S, late)
        loop.add_reader(raw.fileno(), readable)

    def _feed_proxy_header(self, data: bytes) -> None:
        """Input on a plain listener while its header is incomplete."""
        assert self._proxy_parser is not None
        result = self._proxy_parser.feed(data)
        if self._proxy_result(result) and not isinstance(result, ProxyError) \
                and result.leftover and not self._ended:
            self.data_received(bytes(result.leftover))

    def _proxy_result(self, result: Result) -> bool:
        """Act on what the parser said: False while more must come."""
        if isinstance(result, NeedMore):
            return False
        if isinstance(result, ProxyError):
            self._proxy_header_done(result.reason)
        else:
            self._proxy_header_done(None, result.source.host if result.source else None)
        return True

    def _proxy_header_late(self) -> None:
        self._proxy_header_done(f"incomplete after {HEADER_TIMEOUT_S:.0f} s")

    def _proxy_header_done(self, problem: str | None, client: str | None = None) -> None:
        """The header is read (client: the address in it, None for LOCAL and the like)
        or cannot be (problem): log, then open the session or close."""
        self._proxy_parser = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        if self._ended:
            return
        proxy = self.client_ip
        if problem is not None:
            self.log.warning("no valid PROXY header from proxy [%s]: %s", proxy, problem)
            self.abort()
            self._end(None)
            return
        if client is not None:
            self.client_ip = client
        self.log.debug("PROXY header from [%s]: client [%s]", proxy, self.client_ip)
        self._guarded(self._open)

    def _refuse(self, why: str) -> None:
        assert self.transport is not None
        if not self.listener.implicit_tls:   # no TLS yet: nothing can be said in clear
            self.transport.write(self.refusal(why))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        if self._proxy_parser is not None:
            self._guarded(lambda: self._feed_proxy_header(data))
            return
        if self.handshaking:
            # The plain transport was paused in the turn the handshake began, so only
            # the TLS layer can call us now: with the client's first decrypted input,
            # when it came with (or right after) its Finished, before start_tls()
            # has returned. It is the new session's, and it goes there.
            self._early_input += data
            return
        self._guarded(lambda: self.received(data))

    def eof_received(self) -> bool | None:
        if self._proxy_parser is not None:
            self._proxy_header_done("connection closed before the header")
        return False   # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def pause_writing(self) -> None:
        self._write_blocked = True
        self.update_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self.update_reading()

    def _end(self, exc: Exception | None) -> None:
        """Once per connection: connection_lost does not come after a handshake that
        the client abandoned, so the handshake's failure path comes here too."""
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        if self._linger is not None:
            # The client closed within the linger: the timer must not keep the transport
            # (a TLS one holds a 256 KiB read buffer) alive for the rest of it.
            self._linger.cancel()
            self._linger = None
        self.hooks.closed(self)
        if self._admitted:
            self.hooks.release(self.client_ip)
        self.ended(exc)

    # --- writing and closing ----------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return (self.transport is not None and not self._ended
                and not self.transport.is_closing())

    def write(self, data: bytes) -> None:
        if self.is_open:
            assert self.transport is not None
            self.transport.write(data)

    def close_after_reply(self) -> None:
        """Close after the last reply, but give the client CLOSE_LINGER_S to read it:
        closing with its input unread would send a reset, and it could lose the reply.
        A plain connection half-closes and reads on until the client closes; TLS has
        no half-close, so its close_notify goes out with the reply."""
        transport = self.transport
        if transport is None or self._ended:
            return
        self._closing = True
        self.update_reading()
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:            # the client has gone already (ENOTCONN)
                transport.close()
                return
        else:
            transport.close()
        # abort, not close: close() waits for the output to drain, and a client that
        # never reads would hold the connection for ever. _end() cancels it.
        self._linger = asyncio.get_running_loop().call_later(CLOSE_LINGER_S, transport.abort)

    def close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- TLS ----------------------------------------------------------------------------

    @property
    def tls_available(self) -> bool:
        """A certificate is configured (so STARTTLS/STLS can be offered)."""
        return self.context.tls is not None

    def start_tls(self, then: Callable[[], None]) -> None:
        """Hand the connection to TLS now; call then() once it is encrypted. The
        caller has already dealt with input read past the command that asked for it."""
        assert self.context.tls is not None and self.transport is not None
        self.handshaking = True
        self.update_reading()          # this turn: not one more byte in plain text
        asyncio.get_running_loop().create_task(self._handshake(then))

    async def _handshake(self, then: Callable[[], None]) -> None:
        assert self.context.tls is not None and self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, self.context.tls, server_side=True,
                ssl_handshake_timeout=self.config.timeout_command_s)
        except (OSError, asyncio.TimeoutError, EOFError) as e:
            self.log.info("TLS handshake failed with [%s]: %s", self.client_ip, _reason(e))
            self._end(e)
            return
        if transport is None or self._ended:   # the client left as it finished
            self._end(None)
            return
        self.transport = transport
        self._reading_paused = False   # the TLS transport starts out reading
        self.handshaking = False
        self.tls = describe(transport.get_extra_info("ssl_object"))
        self.log.debug("TLS with [%s]: %s", self.client_ip, self.tls)
        self._guarded(then)
        early, self._early_input = bytes(self._early_input), bytearray()
        if early and not self._ended:
            self._guarded(lambda: self.received(early))

    # --- flow control and deadlines ---------------------------------------------------

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_paused = (self.handshaking or (
            (self._write_blocked or self.wants_pause()) and not self._closing))
        if want_paused and not self._reading_paused:
            transport.pause_reading()
        elif not want_paused and self._reading_paused:
            transport.resume_reading()
        self._reading_paused = want_paused

    def set_deadline(self, seconds: float) -> None:
        """The client has `seconds` from now for what it is doing. A deadline, not an
        idle timer: bytes trickling in do not move it; only the next set_deadline does."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        if self._timer is not None and self._timer.when() <= self._deadline:
            return    # it fires first and finds the deadline moved: it sleeps on
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._ended:
            return
        loop = asyncio.get_running_loop()
        remaining = self._deadline - loop.time()
        if remaining > 0 or self.busy() or self.handshaking:
            # Not ours to time out while working (or while TLS has its own timeout).
            self._timer = loop.call_later(remaining if remaining > 0 else 1.0,
                                          self._check_deadline)
            return
        self._guarded(self.on_deadline)

    # --- failures -----------------------------------------------------------------------

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except MemoryError:
            # Not a bug to trace: this process is out of memory; it retires.
            self.log.error("out of memory in session with [%s]", self.client_ip)
            self.hooks.broken("out of memory")
            self.fail()
        except Exception:
            self.log.exception("internal error in session with [%s]", self.client_ip)
            self.fail()

    def fail(self) -> None:
        """After an internal error: tell the client (the protocol's temporary-failure
        reply) and close."""
        self.close_now()


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1 (also as ::ffff:127.x): where a password may come in plain
    text (SPEC §9). Behind PROXY, ip is the proxied client's."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError) or "taking longer" in str(error):
        return "timed out"
    if isinstance(error, ConnectionResetError) or not str(error):
        return "connection closed by client"
    reason = getattr(error, "reason", None)
    return str(reason or error).splitlines()[0][:200]
