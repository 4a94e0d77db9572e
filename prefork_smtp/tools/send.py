"""ccsmtp-send: a small SMTP client that sends one message or drives load.

Owns: speaking the client side of SMTP over asyncio (EHLO, PIPELINING when the
server offers it, SIZE, dot-stuffing; TLS, implicit or by STARTTLS, with session
resumption on reconnects), the send mode (one message from a file or
stdin, print the server's final reply), the load mode (many messages over many
concurrent sessions, with latency and error statistics, text or JSON) and the
idle mode (hold connections open while a load runs, to see whether a fresh client
is still served).
Must not: import anything else of ours -- it is a client for any SMTP server and
runs from any checkout; nor use smtplib (one blocking session per thread cannot
drive thousands of messages a second from one process).
Fails with one line on stderr and exit status 1 (2 for usage errors, as argparse
and ccsmtp-master do), never a traceback.

Latency in load mode is measured per message: for the first message of a
connection from the start of connect() to the 250 after the final dot (so it
includes connecting, the greeting and EHLO), for later messages on the same
connection from writing MAIL FROM to that 250. Session time is connect() to the
reply to QUIT; greeting time is connect() to the 220.

TLS: --tls speaks TLS from the first byte (smtps, RFC 8314; port 465 by default),
--starttls says STARTTLS after EHLO and EHLOs again (RFC 3207), in both modes. The
server's certificate is verified against the system's CAs (--cafile: these instead;
--insecure: not at all). A server that does not offer STARTTLS, refuses it, or says
anything between its reply to STARTTLS and the handshake is an error: nothing is
ever sent in the clear instead. In load mode each sender offers the TLS session of
its previous connection, and the report says how many handshakes resumed one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextvars
import email.utils
import json
import os
import re
import resource
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from ..net.tcp import stream_transport

PROG = "ccsmtp-send"
DEFAULT_PORT = 25
DEFAULT_TLS_PORT = 465          # smtps, RFC 8314 §7.3
DEFAULT_TIMEOUT_S = 60.0
# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; be generous, but a server
# that never sends a line end must not grow our buffer without bound.
MAX_REPLY_BUFFER = 64 * 1024
# Large messages are written in pieces so that a 50 MB body never sits twice in
# the transport's buffer; asyncio's flow control pauses us between pieces.
WRITE_CHUNK = 256 * 1024
# Connect attempts in flight at once while opening idle connections: a SYN burst
# of 10,000 overflows the server's backlog and turns into 1 s retransmissions.
IDLE_CONNECT_BURST = 256
IDLE_CONNECT_TRIES = 3
FILLER_WIDTH = 76
MESSAGE_ID_DOMAIN = "ccsmtp-send.invalid"


class SMTPClientError(Exception):
    """A failure to report as one line: str() is the whole message."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind   # the error category counted in load mode


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[bytes, ...]

    @property
    def text(self) -> str:
        return " / ".join(line.decode("utf-8", "replace") for line in self.lines)


# --- the wire ------------------------------------------------------------------------

class ClientProtocol(asyncio.Protocol):
    """One connection: collects complete replies and wakes the reader once per batch."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.replies: collections.deque[Reply] = collections.deque()
        self.closed = False
        self._partial = b""
        self._lines: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._error: SMTPClientError | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport(transport)

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self._line(line.rstrip(b"\r"))
        if len(self._partial) > MAX_REPLY_BUFFER:
            self._fail(SMTPClientError("server sent a reply line without an end", "protocol"))
            return
        if self._waiter is not None and len(self.replies) >= self._want:
            if not self._waiter.done():
                self._waiter.set_result(None)

    def _line(self, line: bytes) -> None:
        # RFC 5321 §4.2.1: "250-text" continues a reply, "250 text" (or "250") ends it.
        self._lines.append(line)
        if line[3:4] == b"-":
            return
        code = int(line[:3]) if len(line) >= 3 and line[:3].isdigit() else 0
        self.replies.append(Reply(code, tuple(self._lines)))
        self._lines = []

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f": {exc.strerror or exc}" if isinstance(exc, OSError) else ""
        self._fail(SMTPClientError(f"server closed the connection{reason}", "closed"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # what the client uses
    def _fail(self, error: SMTPClientError) -> None:
        if self._error is None:
            self._error = error
        for waiter in (self._waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        if error.kind == "protocol" and self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise self._error or SMTPClientError("server closed the connection", "closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if not self._paused:
            return
        if self._error is not None:
            raise self._error
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    async def read(self, count: int, timeout_s: float, what: str) -> list[Reply]:
        """The next COUNT replies; WHAT names the step for the error message."""
        if len(self.replies) < count:
            if self._error is not None:
                raise self._error_after(what)
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            self._want = count
            timer = loop.call_later(timeout_s, self._timed_out, self._waiter, what, timeout_s)
            try:
                await self._waiter
            except SMTPClientError:
                raise self._error_after(what) from None
            finally:
                timer.cancel()
                self._waiter = None
        return [self.replies.popleft() for _ in range(count)]

    def _error_after(self, what: str) -> SMTPClientError:
        error = self._error or SMTPClientError("connection failed", "closed")
        last = f" (last reply: {self.replies[-1].text})" if self.replies else ""
        return SMTPClientError(f"{error} while waiting for the reply to {what}{last}", error.kind)

    def _timed_out(self, waiter: asyncio.Future[None], what: str, timeout_s: float) -> None:
        if not waiter.done():
            error = SMTPClientError(f"no reply to {what} within {timeout_s:g} s", "timeout")
            waiter.set_exception(error)
            self._error = error
            if self.transport is not None:
                self.transport.abort()

    def pending(self) -> bool:
        """Anything received and not read yet?"""
        return bool(self.replies or self._lines or self._partial)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass(slots=True)
class Session:
    """An open, greeted and EHLO'd connection."""
    proto: ClientProtocol
    pipelining: bool
    size_ok: bool
    eightbit_ok: bool
    greeted_at: float
    started_at: float
    tls: ssl.SSLObject | None = None    # once TLS is on


# --- TLS -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSPlan:
    """How to speak TLS: "tls" from the first byte (RFC 8314), or "starttls" (RFC 3207)."""
    mode: str
    context: ssl.SSLContext
    server_hostname: str


# The TLS session to offer in this task's next handshake. asyncio's
# create_connection() and start_tls() take no session, but both call the context's
# wrap_bio() in the task that connects, and each load sender is a task of its own.
_RESUME: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar(
    "ccsmtp_send_resume", default=None)


class _ResumingContext(ssl.SSLContext):
    """An SSLContext that offers _RESUME's session (it must come from this context)."""

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None,
                 session=None):
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname,
                                session if session is not None else _RESUME.get())


def tls_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    """ssl.create_default_context()'s client settings (TLS 1.2 or newer, certificate
    and host name verified), on a context that can resume sessions."""
    context = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        if cafile:
            context.load_verify_locations(cafile)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else getattr(e, "reason", e)
        raise SMTPClientError(f"cannot read --cafile {cafile}: {reason}") from None
    return context


def tls_failure(where: str, error: BaseException) -> SMTPClientError:
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = (f"certificate not trusted: {error.verify_message} "
                  "(give --cafile FILE, or --insecure to skip the check)")
    elif isinstance(error, ssl.SSLError):
        detail = error.reason or str(error)
    else:   # the server closed or reset, or the handshake timed out
        detail = str(error) or type(error).__name__
    return SMTPClientError(f"TLS handshake with {where} failed: {detail}", "tls")


async def start_tls(proto: ClientProtocol, tls: TLSPlan, keywords: set[bytes],
                    timeout_s: float, where: str) -> None:
    """STARTTLS on a greeted, EHLO'd connection (RFC 3207 §4)."""
    if b"STARTTLS" not in keywords:
        raise SMTPClientError(f"{where} does not offer STARTTLS (and --starttls never falls "
                              "back to sending in the clear)", "starttls")
    proto.write(b"STARTTLS\r\n")
    (reply,) = await proto.read(1, timeout_s, "STARTTLS")
    if reply.code != 220:
        raise SMTPClientError(f"STARTTLS refused: {reply.text}", "starttls")
    if proto.pending():
        # Bytes after the 220 but before the handshake would be taken as said under
        # TLS (the client side of CVE-2011-0411): refuse them.
        raise SMTPClientError("server sent more after its reply to STARTTLS", "protocol")
    assert proto.transport is not None
    try:
        proto.transport = await asyncio.get_running_loop().start_tls(
            proto.transport, proto, tls.context, server_hostname=tls.server_hostname,
            ssl_handshake_timeout=timeout_s)
    except (OSError, asyncio.TimeoutError) as e:   # ssl.SSLError is an OSError
        raise tls_failure(where, e) from None


def parse_server(server: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, HOST or :PORT -> (host, port); no name is looked up."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]*)(?::(\d+))?", server)
    if not match:
        raise SMTPClientError(f"--server {server!r} is not HOST:PORT ([::1]:25 for IPv6)",
                              "usage")
    host = match.group(1) or match.group(3) or "127.0.0.1"
    port = int(match.group(2) or match.group(4) or default_port)
    if not 0 < port < 65536:
        raise SMTPClientError(f"--server {server!r}: port {port} is out of range 1-65535",
                              "usage")
    return host, port


def resolve(server: str, default_port: int = DEFAULT_PORT) -> tuple[int, tuple]:
    """--server -> (family, sockaddr), resolved once up front."""
    host, port = parse_server(server, default_port)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SMTPClientError(f"cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, sockaddr = info[0]
    return family, sockaddr


def server_name(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def connect(family: int, sockaddr: tuple, timeout_s: float,
                  tls: TLSPlan | None = None, source: str | None = None) -> ClientProtocol:
    """A TCP connection (from `source`, if given); with tls.mode "tls", its handshake
    done too."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if source:
            sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout_s)
        if tls is not None and tls.mode == "tls":
            return await _connect_tls(loop, sock, sockaddr, tls, timeout_s)
        _, proto = await loop.create_connection(ClientProtocol, sock=sock)
    except asyncio.TimeoutError:
        sock.close()
        raise SMTPClientError(f"cannot connect to {server_name(sockaddr)}: "
                              f"no answer within {timeout_s:g} s", "connect") from None
    except OSError as e:
        sock.close()
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise SMTPClientError(f"cannot connect to {server_name(sockaddr)}: {reason}",
                              "connect") from None
    return proto


async def _connect_tls(loop: asyncio.AbstractEventLoop, sock: socket.socket, sockaddr: tuple,
                       tls: TLSPlan, timeout_s: float) -> ClientProtocol:
    try:
        _, proto = await loop.create_connection(
            ClientProtocol, sock=sock, ssl=tls.context, server_hostname=tls.server_hostname,
            ssl_handshake_timeout=timeout_s)
    except (OSError, asyncio.TimeoutError) as e:   # ssl.SSLError is an OSError
        sock.close()
        raise tls_failure(server_name(sockaddr), e) from None
    return proto


async def open_session(family: int, sockaddr: tuple, helo: str, timeout_s: float,
                       tls: TLSPlan | None = None) -> Session:
    started = time.perf_counter()
    proto = await connect(family, sockaddr, timeout_s, tls)
    try:
        (greeting,) = await proto.read(1, timeout_s, "the connection (greeting)")
        greeted = time.perf_counter()
        if greeting.code != 220:
            raise SMTPClientError(f"server refused the session: {greeting.text}", "greeting")
        keywords = await hello(proto, helo, timeout_s)
        if tls is not None and tls.mode == "starttls":
            await start_tls(proto, tls, keywords, timeout_s, server_name(sockaddr))
            # RFC 3207 §4.2: what was said before TLS is forgotten; ask again.
            keywords = await hello(proto, helo, timeout_s)
    except BaseException:
        proto.abort()
        raise
    assert proto.transport is not None
    return Session(proto, b"PIPELINING" in keywords, b"SIZE" in keywords,
                   b"8BITMIME" in keywords, greeted, started,
                   proto.transport.get_extra_info("ssl_object"))


async def hello(proto: ClientProtocol, helo: str, timeout_s: float) -> set[bytes]:
    """EHLO (HELO if the server does not know it); the extensions offered."""
    proto.write(b"EHLO %s\r\n" % helo.encode())
    (ehlo,) = await proto.read(1, timeout_s, "EHLO")
    if ehlo.code == 250:
        return {line[4:].split(b" ", 1)[0].upper() for line in ehlo.lines[1:]}
    # RFC 5321 §3.2: a server that does not know EHLO gets HELO.
    proto.write(b"HELO %s\r\n" % helo.encode())
    (reply,) = await proto.read(1, timeout_s, "HELO")
    if reply.code != 250:
        raise SMTPClientError(f"HELO refused: {reply.text}", "ehlo")
    return set()


@dataclass(slots=True)
class Outcome:
    final: Reply
    rejected: list[tuple[str, Reply]] = field(default_factory=list)


async def send_message(session: Session, mail_from: str, recipients: Sequence[str],
                       wire: bytes, timeout_s: float, slow_s: float = 0.0,
                       quit_after: bool = False) -> Outcome:
    """One transaction. WIRE is the dot-stuffed message ending in CRLF.CRLF.

    With PIPELINING, MAIL, every RCPT and DATA go out in one write (RFC 2920 §3.1),
    then the content; with QUIT_AFTER, QUIT rides along with the content's end.
    Raises SMTPClientError for a refusal; the session stays usable after a refusal
    that the server answered (the caller may RSET).
    """
    proto = session.proto
    params = b""
    if session.size_ok:
        params += b" SIZE=%d" % (len(wire) - 3)
    if session.eightbit_ok and not wire.isascii():
        params += b" BODY=8BITMIME"
    mail = b"MAIL FROM:<%s>%s\r\n" % (mail_from.encode(), params)
    rcpts = [b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients]
    if session.pipelining:
        proto.write(mail + b"".join(rcpts) + b"DATA\r\n")
        mail_reply, *rcpt_replies, data_reply = await proto.read(
            len(rcpts) + 2, timeout_s, "MAIL, RCPT and DATA")
    else:
        proto.write(mail)
        (mail_reply,) = await proto.read(1, timeout_s, "MAIL FROM")
        rcpt_replies = []
        for rcpt in rcpts:
            if mail_reply.code != 250:
                break
            proto.write(rcpt)
            rcpt_replies.extend(await proto.read(1, timeout_s, "RCPT TO"))
        data_reply = None
        if mail_reply.code == 250 and any(r.code in (250, 251) for r in rcpt_replies):
            proto.write(b"DATA\r\n")
            (data_reply,) = await proto.read(1, timeout_s, "DATA")
    if mail_reply.code != 250:
        raise SMTPClientError(f"sender <{mail_from}> refused: {mail_reply.text}", "mail")
    rejected = [(r, reply) for r, reply in zip(recipients, rcpt_replies)
                if reply.code not in (250, 251)]
    if len(rejected) == len(recipients):
        if data_reply is not None and data_reply.code == 354:
            # RFC 2920 §3.1: a server that says 354 anyway gets an empty message ended.
            proto.write(b".\r\n")
            await proto.read(1, timeout_s, "the end of an empty message")
        first, reply = rejected[0]
        more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
        raise SMTPClientError(f"recipient <{first}> refused{more}: {reply.text}", "rcpt")
    assert data_reply is not None
    if data_reply.code != 354:
        raise SMTPClientError(f"DATA refused: {data_reply.text}", "data")
    await write_content(proto, wire, slow_s, b"QUIT\r\n" if quit_after else b"")
    (final,) = await proto.read(1, timeout_s, "the end of the message")
    if final.code != 250:
        raise SMTPClientError(f"message refused: {final.text}", "message")
    return Outcome(final, rejected)


async def write_content(proto: ClientProtocol, wire: bytes, slow_s: float, tail: bytes) -> None:
    if slow_s > 0:
        # --slow: one line at a time, SLOW_S apart, as a slow client would.
        for line in wire.splitlines(keepends=True):
            await asyncio.sleep(slow_s)
            proto.write(line)
        if tail:
            proto.write(tail)
        return
    if len(wire) <= WRITE_CHUNK:
        proto.write(wire + tail)
        return
    view = memoryview(wire)
    for start in range(0, len(wire), WRITE_CHUNK):
        proto.write(view[start:start + WRITE_CHUNK])
        await proto.drain()
    if tail:
        proto.write(tail)


async def quit_session(session: Session, timeout_s: float, sent: bool = False) -> None:
    """Say QUIT (unless it was SENT with the last message) and close; errors are ignored."""
    try:
        if not sent:
            session.proto.write(b"QUIT\r\n")
        await session.proto.read(1, timeout_s, "QUIT")
    except SMTPClientError:
        pass
    finally:
        session.proto.close()


async def reset(session: Session, timeout_s: float) -> None:
    session.proto.write(b"RSET\r\n")
    (reply,) = await session.proto.read(1, timeout_s, "RSET")
    if reply.code != 250:
        raise SMTPClientError(f"RSET refused: {reply.text}", "rset")


# --- messages ------------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r\n\r\n")


def to_wire(message: bytes) -> bytes:
    """CRLF line ends, leading dots doubled (RFC 5321 §4.5.2), ended by CRLF.CRLF."""
    text = _LINE_END.sub(b"\r\n", message)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def split_headers(message: bytes) -> tuple[bytes, bytes]:
    """(header block with its CRLF, rest starting at the blank line) of a CRLF message."""
    match = _HEADER_END.search(message)
    if match is None:
        return message, b""
    return message[:match.start() + 2], message[match.start() + 2:]


def has_header(headers: bytes, name: bytes) -> bool:
    return re.search(rb"(?im)^" + re.escape(name) + rb"[ \t]*:", headers) is not None


def drop_header(headers: bytes, name: bytes) -> bytes:
    """Remove every NAME: field, with its folded continuation lines."""
    return re.sub(rb"(?im)^" + re.escape(name) + rb"[ \t]*:.*\r\n(?:[ \t].*\r\n)*", b"", headers)


def new_message_id(tag: str) -> bytes:
    return f"<{tag}@{MESSAGE_ID_DOMAIN}>".encode()


_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")


def prepare_single(raw: bytes) -> bytes:
    """A message from the user, with Message-ID and Date added when it has none.

    Input that does not start with a header field is taken as a body alone.
    """
    text = _LINE_END.sub(b"\r\n", raw)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    if _HEADER_LINE.match(text):
        headers, rest = split_headers(text)
    else:
        headers, rest = b"", b"\r\n" + text
    if not rest:
        rest = b"\r\n"
    if not has_header(headers, b"Message-ID"):
        headers += b"Message-ID: " + new_message_id(f"{time.time_ns()}.{os.getpid()}") + b"\r\n"
    if not has_header(headers, b"Date"):
        headers += b"Date: " + email.utils.formatdate(localtime=True).encode() + b"\r\n"
    return to_wire(headers + rest)


class MessageFactory:
    """Wire-ready load messages that differ only in their Message-ID.

    The parts before and after the Message-ID are dot-stuffed once; each message
    costs one join. The sequence number is zero-padded so every message has the
    same size.
    """

    def __init__(self, run_id: str, mail_from: str, recipients: Sequence[str],
                 size: int | None, template: bytes | None, rotate: bool = False):
        self.run_id = run_id
        if template is not None:
            text = _LINE_END.sub(b"\r\n", template)
            if text and not text.endswith(b"\r\n"):
                text += b"\r\n"
            headers, rest = split_headers(text)
            headers = drop_header(headers, b"Message-ID")
            if not rest:
                rest = b"\r\n"
        else:
            # With --rotate each message has one of the recipients: the To: field
            # stays the same for all, so that every message has the same size.
            to = "undisclosed-recipients:;" if rotate else ", ".join(f"<{r}>" for r in recipients)
            headers = (f"From: <{mail_from}>\r\n"
                       f"To: {to}\r\n"
                       f"Subject: ccsmtp-send load test {run_id}\r\n"
                       f"Date: {email.utils.formatdate(localtime=True)}\r\n").encode()
            rest = b"\r\n"
        probe = b"Message-ID: " + self._id(0) + b"\r\n"
        if template is None:
            rest += filler(max(0, (size or 0) - len(headers) - len(probe) - len(rest)))
        wire = to_wire(headers + probe + rest)
        self._head = wire[:len(headers)]
        self._tail = wire[len(headers) + len(probe):]
        self.message_size = len(wire) - 3           # without the final ".\r\n"

    def _id(self, seq: int) -> bytes:
        return new_message_id(f"{self.run_id}.{seq:010d}")

    def make(self, seq: int) -> bytes:
        return b"".join((self._head, b"Message-ID: ", self._id(seq), b"\r\n", self._tail))


def filler(size: int) -> bytes:
    """SIZE bytes of body in CRLF-ended lines (nothing for SIZE < 2: no room for CRLF)."""
    if size < 2:
        return b""
    line = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 3)[:FILLER_WIDTH - 2] + b"\r\n"
    lines, remainder = divmod(size, len(line))
    if remainder == 1 and lines:
        return line * (lines - 1) + b"x" + line      # one line one octet longer
    tail = b"x" * (remainder - 2) + b"\r\n" if remainder >= 2 else b""
    return line * lines + tail


# --- load mode -------------------------------------------------------------------------

@dataclass
class LoadStats:
    requested: int = 0
    accepted: int = 0
    failed: int = 0
    bytes_accepted: int = 0
    connections: int = 0
    latencies_s: list[float] = field(default_factory=list)
    sessions_s: list[float] = field(default_factory=list)
    greetings_s: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    first_errors: dict[str, str] = field(default_factory=dict)
    idle_requested: int = 0
    idle_held: int = 0
    idle_errors: collections.Counter = field(default_factory=collections.Counter)
    elapsed_s: float = 0.0
    tls_handshakes: int = 0
    tls_resumed: int = 0
    tls_versions: collections.Counter = field(default_factory=collections.Counter)

    def handshake(self, tls: ssl.SSLObject) -> None:
        self.tls_handshakes += 1
        self.tls_resumed += tls.session_reused
        self.tls_versions[tls.version() or "?"] += 1

    def error(self, error: SMTPClientError, messages: int = 1) -> None:
        self.failed += messages
        self.errors[error.kind] += messages
        self.first_errors.setdefault(error.kind, str(error))


@dataclass(frozen=True)
class LoadPlan:
    family: int
    sockaddr: tuple
    helo: str
    mail_from: str
    recipients: tuple[str, ...]
    count: int
    concurrency: int
    per_connection: int
    slow_s: float
    timeout_s: float
    idle: int
    hold_s: float
    rotate: bool = False
    tls: TLSPlan | None = None
    # Idle connections rotate over these local addresses: one address has ~28,000
    # ephemeral ports towards one server port (127.0.0.0/8 offers many addresses).
    sources: tuple[str, ...] = ()

    def recipients_of(self, seq: int) -> tuple[str, ...]:
        if self.rotate:
            return (self.recipients[seq % len(self.recipients)],)
        return self.recipients


class Load:
    """COUNT messages over CONCURRENCY sessions, PER_CONNECTION messages each."""

    def __init__(self, plan: LoadPlan, factory: MessageFactory):
        self.plan = plan
        self.factory = factory
        self.stats = LoadStats(requested=plan.count, idle_requested=plan.idle)
        self._next_seq = 0

    def _claim(self) -> range:
        take = min(self.plan.per_connection, self.plan.count - self._next_seq)
        claimed = range(self._next_seq, self._next_seq + take)
        self._next_seq += take
        return claimed

    async def run(self) -> LoadStats:
        idle: list[ClientProtocol] = []
        try:
            if self.plan.idle:
                idle = await self._open_idle()
            start = time.perf_counter()
            await asyncio.gather(*(self._sender() for _ in range(self.plan.concurrency)))
            self.stats.elapsed_s = time.perf_counter() - start
            if idle and self.plan.hold_s > 0:
                await asyncio.sleep(self.plan.hold_s)
        finally:
            for proto in idle:
                proto.abort()
        return self.stats

    async def _open_idle(self) -> list[ClientProtocol]:
        gate = asyncio.Semaphore(IDLE_CONNECT_BURST)
        last_greeting = time.monotonic()

        def stalled() -> bool:
            # A server that stopped greeting (Postfix at its process limit) would cost
            # a full timeout per IDLE_CONNECT_BURST connections still to try.
            return time.monotonic() - last_greeting > self.plan.timeout_s

        async def one(n: int) -> ClientProtocol | None:
            nonlocal last_greeting
            sources = self.plan.sources
            async with gate:
                if stalled():
                    self.stats.idle_errors["stalled"] += 1
                    return None
                for attempt in range(IDLE_CONNECT_TRIES):
                    try:
                        proto = await connect(self.plan.family, self.plan.sockaddr,
                                              self.plan.timeout_s, self.plan.tls,
                                              sources[n % len(sources)] if sources else None)
                        break
                    except SMTPClientError as e:
                        # A SYN dropped by a full accept queue: retry, as a real client.
                        if attempt + 1 == IDLE_CONNECT_TRIES or e.kind != "connect" or stalled():
                            self.stats.idle_errors[e.kind] += 1
                            return None
            try:
                (greeting,) = await proto.read(1, self.plan.timeout_s, "the connection (greeting)")
            except SMTPClientError as e:
                self.stats.idle_errors[e.kind] += 1
                proto.abort()
                return None
            if greeting.code != 220:
                self.stats.idle_errors["greeting"] += 1
                proto.abort()
                return None
            last_greeting = time.monotonic()
            return proto

        opened = await asyncio.gather(*(one(n) for n in range(self.plan.idle)))
        held = [proto for proto in opened if proto is not None and not proto.closed]
        self.stats.idle_held = len(held)
        return held

    async def _sender(self) -> None:
        while True:
            batch = self._claim()
            if not batch:
                return
            await self._connection(batch)

    async def _connection(self, batch: range) -> None:
        """One connection for BATCH. With TLS, the handshake offers the session of this
        sender's previous connection (_RESUME is per task), and this one's is kept."""
        plan, stats = self.plan, self.stats
        stats.connections += 1
        try:
            session = await open_session(plan.family, plan.sockaddr, plan.helo, plan.timeout_s,
                                         plan.tls)
        except SMTPClientError as e:
            stats.error(e, len(batch))
            return
        if session.tls is not None:
            stats.handshake(session.tls)
            _RESUME.set(session.tls.session)
        stats.greetings_s.append(session.greeted_at - session.started_at)
        quit_sent = False
        for i, seq in enumerate(batch):
            last = i == len(batch) - 1
            began = session.started_at if i == 0 else time.perf_counter()
            try:
                await send_message(session, plan.mail_from, plan.recipients_of(seq),
                                   self.factory.make(seq), plan.timeout_s, plan.slow_s,
                                   quit_after=last and session.pipelining)
            except SMTPClientError as e:
                stats.error(e)
                quit_sent = last and session.pipelining and e.kind == "message"
                if session.proto.closed or e.kind in ("timeout", "closed", "protocol"):
                    if not last:
                        stats.error(e, len(batch) - i - 1)
                    session.proto.abort()
                    return
                if not last:
                    try:
                        await reset(session, plan.timeout_s)
                    except SMTPClientError as reset_error:
                        stats.error(reset_error, len(batch) - i - 1)
                        session.proto.abort()
                        return
                continue
            quit_sent = last and session.pipelining
            stats.latencies_s.append(time.perf_counter() - began)
            stats.accepted += 1
            stats.bytes_accepted += self.factory.message_size
        await quit_session(session, plan.timeout_s, sent=quit_sent)
        stats.sessions_s.append(time.perf_counter() - session.started_at)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds (nearest-rank percentiles)."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: int) -> float:
        index = max(0, -(-p * len(ordered) // 100) - 1)   # ceil(p% of n), 1-based
        return ordered[index] * 1000.0

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1] * 1000.0,
            "mean": sum(ordered) / len(ordered) * 1000.0}


def report(stats: LoadStats, plan: LoadPlan, message_size: int) -> dict:
    elapsed = stats.elapsed_s or 1e-9
    return {
        "server": server_name(plan.sockaddr),
        "requested": stats.requested,
        "accepted": stats.accepted,
        "failed": stats.failed,
        "elapsed_s": round(stats.elapsed_s, 6),
        "msgs_per_s": stats.accepted / elapsed,
        "message_size": message_size,
        "mb_per_s": stats.bytes_accepted / elapsed / 1e6,
        "concurrency": plan.concurrency,
        "per_connection": plan.per_connection,
        "connections": stats.connections,
        "latency_ms": percentiles(stats.latencies_s),
        "session_ms": percentiles(stats.sessions_s),
        "greeting_ms": percentiles(stats.greetings_s),
        "errors": dict(stats.errors),
        "first_errors": stats.first_errors,
        "idle": {"requested": stats.idle_requested, "held": stats.idle_held,
                 "errors": dict(stats.idle_errors)} if stats.idle_requested else None,
        "tls": {"mode": plan.tls.mode, "handshakes": stats.tls_handshakes,
                "resumed": stats.tls_resumed,
                "resumed_fraction": stats.tls_resumed / stats.tls_handshakes
                if stats.tls_handshakes else 0.0,
                "versions": dict(stats.tls_versions)} if plan.tls else None,
    }


def format_report(r: dict) -> str:
    def ms(d: dict) -> str:
        return (f"p50 {d['p50']:.2f} ms, p99 {d['p99']:.2f} ms, max {d['max']:.2f} ms"
                if d else "n/a")

    lines = [
        f"{r['accepted']} of {r['requested']} messages accepted by {r['server']} in "
        f"{r['elapsed_s']:.3f} s: {r['msgs_per_s']:.1f} msgs/s, {r['mb_per_s']:.2f} MB/s "
        f"({r['message_size']} bytes each)",
        f"latency per message (connect..250 for a connection's first message, "
        f"MAIL..250 after): {ms(r['latency_ms'])}",
        f"session (connect..221): {ms(r['session_ms'])}; greeting (connect..220): "
        f"{ms(r['greeting_ms'])}",
        f"connections {r['connections']}, concurrency {r['concurrency']}, "
        f"{r['per_connection']} per connection",
    ]
    if r["tls"]:
        tls = r["tls"]
        versions = ", ".join(f"{v} {n}" for v, n in sorted(tls["versions"].items())) or "none"
        lines.append(f"TLS ({tls['mode']}): {tls['handshakes']} handshakes, {tls['resumed']} "
                     f"resumed a session ({tls['resumed_fraction']:.1%}); {versions}")
    if r["idle"]:
        idle = r["idle"]
        failed = ", ".join(f"{k} {v}" for k, v in sorted(idle["errors"].items())) or "none"
        lines.append(f"idle connections held {idle['held']} of {idle['requested']} "
                     f"(failed: {failed})")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
    lines.append(f"errors: {errors}")
    for kind, text in sorted(r["first_errors"].items()):
        lines.append(f"  first {kind} error: {text}")
    return "\n".join(lines)


def raise_fd_limit(needed: int) -> None:
    """Lift our own RLIMIT_NOFILE soft limit up to the hard one if NEEDED needs it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
        if target != resource.RLIM_INFINITY and target < needed:
            raise SMTPClientError(f"need {needed} file descriptors but the limit is {target} "
                                  f"(raise it with: ulimit -n {needed})")


# --- command line --------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # one line, exit 2, like ccsmtp-master
        self.exit(2, f"{self.prog}: usage error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=(
        "Send one message (from MESSAGE or stdin) and print the server's final reply, or, "
        "with --count, drive load and print messages/s, latency and errors."))
    p.add_argument("message", nargs="?", metavar="MESSAGE",
                   help="file with the message (headers, blank line, body); '-' or none: stdin. "
                        "In load mode, a template whose Message-ID is replaced per message")
    p.add_argument("--from", dest="mail_from", default=None, metavar="ADDR",
                   help="envelope sender (default: ccsmtp-send@HELO); '' for <>")
    p.add_argument("--to", action="append", default=[], metavar="ADDR",
                   help="envelope recipient, repeatable (required)")
    p.add_argument("--server", default="", metavar="HOST:PORT",
                   help=f"server to talk to (default: 127.0.0.1:{DEFAULT_PORT}, "
                        f"with --tls 127.0.0.1:{DEFAULT_TLS_PORT}; [::1]:25 for IPv6)")
    p.add_argument("--helo", default=None, metavar="NAME",
                   help="name to give in EHLO (default: this host's name)")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="wait at most this long for a connection or a reply (default: %(default)g)")
    p.add_argument("--slow", type=_nonnegative_float, default=0.0, metavar="SECONDS-PER-LINE",
                   help="sleep this long before each line of the message content")
    tls = p.add_argument_group("TLS")
    how = tls.add_mutually_exclusive_group()
    how.add_argument("--tls", action="store_true",
                     help=f"TLS from the first byte (smtps, RFC 8314; port {DEFAULT_TLS_PORT} "
                          "unless --server names one)")
    how.add_argument("--starttls", action="store_true",
                     help="STARTTLS after EHLO, then EHLO again (RFC 3207); a server that "
                          "does not offer it or refuses it is an error, never a plain send")
    tls.add_argument("--cafile", metavar="FILE",
                     help="trust the CA certificates in FILE (PEM) instead of the system's")
    tls.add_argument("--insecure", action="store_true",
                     help="do not verify the server's certificate (tests, benchmarks)")
    load = p.add_argument_group("load mode")
    load.add_argument("--count", type=_nonnegative_int, default=None, metavar="N",
                      help="send N messages (turns on load mode)")
    load.add_argument("--concurrency", type=_positive_int, default=1, metavar="C",
                      help="sessions at once (default: %(default)s)")
    load.add_argument("--size", type=_nonnegative_int, default=None, metavar="BYTES",
                      help="size of each generated message, headers included (default: 1024)")
    load.add_argument("--per-connection", type=_positive_int, default=1, metavar="K",
                      help="messages per connection (default: %(default)s: a new one each)")
    load.add_argument("--rotate", action="store_true",
                      help="with several --to, send each message to one of them in turn "
                           "(default: every message to all)")
    load.add_argument("--idle", type=_nonnegative_int, default=0, metavar="N",
                      help="first open N connections that only wait (after the greeting) "
                           "and hold them while the load runs; once no greeting has come "
                           "for --timeout seconds the rest are not tried ('stalled')")
    load.add_argument("--hold", type=_nonnegative_float, default=0.0, metavar="SECONDS",
                      help="with --idle: keep the idle connections this long after the load")
    load.add_argument("--source", action="append", default=[], metavar="ADDR",
                      help="with --idle: local address for the idle connections, repeatable "
                           "(they rotate over them; one address has ~28,000 ports to a server)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _number(kind: type, check, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive whole number")
_nonnegative_int = _number(int, lambda v: v >= 0, "a whole number")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")

_SAFE_ADDRESS = re.compile(r"[^\s<>\x00-\x1f\x7f]*")


def check_address(address: str, option: str) -> str:
    if not _SAFE_ADDRESS.fullmatch(address):
        raise SMTPClientError(f"{option} {address!r}: no spaces, '<', '>' or control characters",
                              "usage")
    return address


def read_message(path: str | None) -> bytes:
    try:
        if path in (None, "-"):
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SMTPClientError(f"cannot read message {path}: {e.strerror}") from None


async def send_one(args: argparse.Namespace, family: int, sockaddr: tuple, wire: bytes,
                   tls: TLSPlan | None = None) -> dict:
    session = await open_session(family, sockaddr, args.helo, args.timeout, tls)
    tls_info = None
    if session.tls is not None:
        tls_info = {"mode": tls.mode if tls else "", "version": session.tls.version(),
                    "cipher": (session.tls.cipher() or ("",))[0]}
    try:
        outcome = await send_message(session, args.mail_from, args.to, wire, args.timeout,
                                     args.slow, quit_after=session.pipelining)
    except BaseException:
        session.proto.abort()
        raise
    await quit_session(session, args.timeout, sent=session.pipelining)
    return {"reply": "\n".join(line.decode("utf-8", "replace") for line in outcome.final.lines),
            "rejected": {rcpt: reply.text for rcpt, reply in outcome.rejected},
            "tls": tls_info}


def run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    load_mode = args.count is not None or args.idle > 0
    if not load_mode:
        for option, value, default in (("--concurrency", args.concurrency, 1),
                                       ("--per-connection", args.per_connection, 1),
                                       ("--size", args.size, None), ("--hold", args.hold, 0.0),
                                       ("--rotate", args.rotate, False)):
            if value != default:
                raise SMTPClientError(f"{option} needs --count (load mode)", "usage")
    if not args.to:
        raise SMTPClientError("no recipient: give at least one --to ADDR", "usage")
    args.helo = args.helo or socket.gethostname() or "localhost"
    if args.mail_from is None:
        args.mail_from = f"{PROG}@{args.helo}"
    check_address(args.mail_from, "--from")
    for rcpt in args.to:
        check_address(rcpt, "--to")
    if any(c in args.helo for c in " \t\r\n"):
        raise SMTPClientError(f"--helo {args.helo!r}: must be one word", "usage")
    default_port = DEFAULT_TLS_PORT if args.tls else DEFAULT_PORT
    family, sockaddr = resolve(args.server, default_port)
    tls = tls_plan(args, parse_server(args.server, default_port)[0])
    if load_mode:
        return run_load(args, family, sockaddr, tls)
    wire = prepare_single(read_message(args.message))
    result = asyncio.run(send_one(args, family, sockaddr, wire, tls))
    for rcpt, text in result["rejected"].items():
        sys.stderr.write(f"{PROG}: warning: recipient <{rcpt}> refused: {text}\n")
    print(json.dumps(result) if args.json else result["reply"])
    return 1 if result["rejected"] else 0


def tls_plan(args: argparse.Namespace, host: str) -> TLSPlan | None:
    if not (args.tls or args.starttls):
        for option, given in (("--cafile", args.cafile), ("--insecure", args.insecure)):
            if given:
                raise SMTPClientError(f"{option} needs --tls or --starttls", "usage")
        return None
    if args.cafile and args.insecure:
        raise SMTPClientError("give --cafile or --insecure, not both", "usage")
    return TLSPlan("tls" if args.tls else "starttls", tls_context(args.cafile, args.insecure),
                   host)


def run_load(args: argparse.Namespace, family: int, sockaddr: tuple,
             tls: TLSPlan | None = None) -> int:
    count = args.count or 0
    if args.message is not None and args.size is not None:
        raise SMTPClientError("give either a MESSAGE template or --size, not both", "usage")
    template = read_message(args.message) if args.message is not None else None
    raise_fd_limit(args.concurrency + args.idle + 64)
    run_id = f"{time.time_ns():x}.{os.getpid()}"
    factory = MessageFactory(run_id, args.mail_from, args.to,
                             1024 if args.size is None else args.size, template, args.rotate)
    plan = LoadPlan(family, sockaddr, args.helo, args.mail_from, tuple(args.to), count,
                    min(args.concurrency, max(count, 1)), args.per_connection, args.slow,
                    args.timeout, args.idle, args.hold, args.rotate, tls, tuple(args.source))
    stats = asyncio.run(Load(plan, factory).run())
    result = report(stats, plan, factory.message_size)
    result["run_id"] = run_id
    print(json.dumps(result) if args.json else format_report(result))
    if count and stats.accepted == 0:
        first = next(iter(stats.first_errors.values()), "no message was accepted")
        raise SMTPClientError(first)
    if stats.failed:
        sys.stderr.write(f"{PROG}: error: {stats.failed} of {count} messages failed\n")
        return 1
    if args.idle and stats.idle_held < args.idle:
        sys.stderr.write(f"{PROG}: error: held {stats.idle_held} of {args.idle} "
                         "idle connections\n")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except SMTPClientError as e:
        label = "usage error" if e.kind == "usage" else "error"
        sys.stderr.write(f"{PROG}: {label}: {e}\n")
        return 2 if e.kind == "usage" else 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:   # a bug of ours: still one line, with what and where
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb else ""
        sys.stderr.write(f"{PROG}: internal error: {type(e).__name__}: {e}{where}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
