"""An LMTP client for the delivery process (RFC 2033), on blocking sockets.

Owns: one connection to the LMTP server of `delivery = "lmtp:..."` (TCP or a unix
socket), kept open between messages; handing one message with its recipients over
and saying, per recipient, what became of it.
Must not: read or change the queue, decide about retries, or write message headers
(the caller prepends its Received:; the LMTP server adds Return-Path:).

    client = LMTPClient(config.delivery, config.hostname)
    outcomes = client.deliver(sender, [rcpt, ...], content_pieces, body="8BITMIME")
    client.close()                      # QUIT; also when used as a context manager

Each outcome (one per recipient, in order) is DELIVERED only on that recipient's own
2xx after the content (RFC 2033 §4.2: one reply per accepted recipient); FAILED on a
5xx to MAIL, RCPT, DATA, a BDAT chunk or after the content (or, decided here without
asking, when the message needs SMTPUTF8 or a size the server does not take: it never
will); DEFERRED on a 4xx and whenever a recipient has no final reply: connection
refused or lost, timeout, an unintelligible reply, and also a greeting or LHLO that
refuses (even with 5xx: that says something about the server, not the message).
Network problems never raise.

An exception raised by the `content` iterator or the `progress` callback propagates,
after the connection has been dropped without ending the message, so the server
never takes half a message. progress() is called at least every PROGRESS_INTERVAL_S
while the client waits, so the delivery process can keep up its heartbeat; only the
name lookup of a TCP host (getaddrinfo) can block longer (use an address, or a name
from /etc/hosts).

The conversation: greeting, LHLO, then per message RSET (on a reused connection: it
checks the server is still there, and reconnects once, without any outcome, if it has
gone, as after Dovecot's idle timeout), MAIL and every RCPT (pipelined in windows
when PIPELINING is offered), then, only once a recipient has been accepted, BDAT
chunks when CHUNKING is offered or else DATA, and one reply per accepted recipient. Content is sent with CRLF line ends (a bare LF
becomes CRLF; a bare CR is left alone, as Postfix leaves it) and dot-stuffed for
DATA; a DATA message that does not end in CRLF gets one. Deliveries are
at-least-once: a connection lost after the content leaves the recipients whose reply
had not come yet DEFERRED, although the server may have delivered them.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import os
import re
import select
import socket
import time
from typing import Callable, Iterable, Iterator, Sequence

from ..config import DeliveryTarget

# RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; Postfix's smtp client reads
# up to line_length_limit (2048) and so do we, then gives up on the server.
MAX_REPLY_LINE = 2048
# LHLO's reply is the longest we expect (a dozen lines); this bounds what one reply
# may make us hold (MAX_REPLY_LINES * MAX_REPLY_LINE).
MAX_REPLY_LINES = 100
# RFC 2920 §3.1: a client must not fill its send buffer while the server waits for its
# replies to be read. This many short commands and their replies fit easily in the
# socket buffers, so we write a window of them, then read the window's replies.
PIPELINE_WINDOW = 100
# BDAT chunk size: large enough that a round trip per chunk costs nothing, small enough
# to bound memory (content pieces from the queue are 1 MiB).
BDAT_CHUNK_BYTES = 1 << 20
# While it waits on the server, the client calls progress() at least this often, so
# the delivery process can keep up its heartbeat (the master kills a process silent
# for worker_timeout, 30 s by default) however long the steps below allow.
PROGRESS_INTERVAL_S = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    """Per step, in seconds. The RFC 5321 §4.5.3.2 client timeouts (written for SMTP
    across the Internet, and what Postfix's lmtp_*_timeout defaults follow): a step
    given up too early on a busy server costs a retry, and after the content it may
    cost a duplicate."""
    connect_s: float = 30.0          # Postfix smtp_connect_timeout
    greeting_s: float = 300.0        # §4.5.3.2.1 initial 220
    command_s: float = 300.0         # §4.5.3.2.2-3 MAIL, RCPT (and LHLO, BDAT chunks)
    data_init_s: float = 120.0       # §4.5.3.2.4 DATA -> 354
    data_block_s: float = 180.0      # §4.5.3.2.5 sending content without progress
    data_done_s: float = 600.0       # §4.5.3.2.6 each reply after the content
    rset_s: float = 20.0             # Postfix lmtp_rset_timeout
    quit_s: float = 20.0


class Status(enum.Enum):
    DELIVERED = "delivered"          # the recipient's 2xx after the content
    DEFERRED = "deferred"            # 4xx, or no final reply: try again later
    FAILED = "failed"                # 5xx: it will never be taken


@dataclasses.dataclass(frozen=True, slots=True)
class RecipientOutcome:
    recipient: str
    status: Status
    reply: str                       # the server's reply on one line, or why there was none
    code: int | None = None          # the reply's code; None when there was no reply


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]           # text after the code, printable, one per line

    @property
    def kind(self) -> int:
        return self.code // 100

    def __str__(self) -> str:
        """On one line, for the log: '552 5.2.0 Refused / 5.2.0 by sieve'."""
        return f"{self.code} {' / '.join(line for line in self.lines if line)}".rstrip()


@dataclasses.dataclass(frozen=True, slots=True)
class Extensions:
    """What the server's LHLO reply offered (RFC 5321 §4.1.1.1 ehlo-line keywords)."""
    keywords: frozenset[str] = frozenset()
    size_limit: int | None = None    # RFC 1870 SIZE; None: not offered or no limit

    @classmethod
    def from_lhlo(cls, reply: Reply) -> "Extensions":
        keywords, size_limit = set(), None
        for line in reply.lines[1:]:           # the first line names the server
            words = line.split()
            if not words:
                continue
            keyword = words[0].upper()
            keywords.add(keyword)
            if keyword == "SIZE" and len(words) > 1 and words[1].isdigit() and int(words[1]):
                size_limit = int(words[1])     # SIZE 0 is "no fixed limit"
        return cls(frozenset(keywords), size_limit)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.keywords


class ConnectionLost(Exception):
    """The connection is unusable; the text says why. Never escapes deliver()."""


ProgressCallback = Callable[[], None]
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class LMTPClient:
    """One connection at a time to the LMTP server; not thread-safe."""

    def __init__(self, target: DeliveryTarget, hostname: str, *, timeouts: Timeouts = Timeouts(),
                 progress: ProgressCallback | None = None, use_chunking: bool = True,
                 chunk_bytes: int = BDAT_CHUNK_BYTES):
        if target.kind != "lmtp":
            raise ValueError(f"not an LMTP target: {target}")
        self.target = target
        self.hostname = hostname
        self.timeouts = timeouts
        self.use_chunking = use_chunking
        self.chunk_bytes = chunk_bytes
        self._progress = progress
        self._wire: _Wire | None = None
        self.extensions = Extensions()
        self.connections_made = 0       # for tests and the log: reconnects are invisible otherwise

    # --- public interface -------------------------------------------------------

    def deliver(self, sender: str, recipients: Sequence[str], content: Iterable[bytes], *,
                body: str = "7BIT", smtputf8: bool = False,
                size: int | None = None) -> list[RecipientOutcome]:
        """Hand one message to the server. sender '' is the null reverse-path; body is
        the envelope's "7BIT" or "8BITMIME"; smtputf8 says the message came with
        SMTPUTF8 (sent on when the server offers it; required when an address is not
        ASCII); size, when known, is checked against the server's SIZE and sent."""
        transaction = _Transaction(sender, list(recipients))
        if not recipients:
            return []
        try:
            self._ready()
            transaction.refuse_what_cannot_go(self.extensions, size)
            if transaction.pending():
                self._transfer(transaction, content, body, smtputf8, size)
        except ConnectionLost as e:
            self._drop()
            transaction.settle_pending(Status.DEFERRED, str(e))
        except BaseException:
            self._drop()   # never leave a half-sent message for the server to take
            raise
        transaction.settle_pending(Status.DEFERRED, "no final reply from the LMTP server")
        return transaction.outcomes()

    def close(self) -> None:
        """QUIT and close (politely, briefly: errors here change nothing)."""
        if self._wire is None:
            return
        try:
            self._wire.send(b"QUIT\r\n", self.timeouts.quit_s, "sending QUIT")
            self._wire.read_reply(self.timeouts.quit_s, "QUIT")
        except ConnectionLost:
            pass
        self._drop()

    @property
    def connected(self) -> bool:
        return self._wire is not None

    def __enter__(self) -> "LMTPClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the session --------------------------------------------------------------

    def _ready(self) -> None:
        """A connection with no transaction open: the one we have if the server is
        still there (RSET answers 250), else a new one."""
        if self._wire is not None:
            try:
                if not self._wire.has_unsolicited_input():   # e.g. 421 on an idle timeout
                    reply = self._command("RSET", self.timeouts.rset_s)
                    if reply.kind == 2:
                        return
            except ConnectionLost:
                pass
            self._drop()           # gone while idle: not a failure of any message
        self._connect()

    def _connect(self) -> None:
        wire = _Wire(_open_socket(self.target, self.timeouts.connect_s, self._tick), self._tick)
        self._wire = wire
        self.connections_made += 1
        greeting = wire.read_reply(self.timeouts.greeting_s, "the greeting")
        if greeting.code != 220:
            raise ConnectionLost(f"server greeting: {greeting}")
        lhlo = self._command(f"LHLO {self.hostname}", self.timeouts.command_s)
        if lhlo.kind != 2:
            raise ConnectionLost(f"LHLO: {lhlo}")
        self.extensions = Extensions.from_lhlo(lhlo)

    def _drop(self) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None

    def _command(self, line: str, timeout: float, intermediate: bool = False) -> Reply:
        assert self._wire is not None
        self._wire.send(line.encode("utf-8") + b"\r\n", timeout, f"sending {line.split()[0]}")
        return self._expect_reply(timeout, line.split()[0], intermediate)

    def _expect_reply(self, timeout: float, what: str, intermediate: bool = False) -> Reply:
        """The next reply; a 3xx only where one is expected (DATA's 354), else the
        server and we no longer agree on where the conversation is."""
        assert self._wire is not None
        reply = self._wire.read_reply(timeout, what)
        if reply.kind == 3 and not intermediate:
            raise ConnectionLost(f"unexpected reply to {what}: {reply}")
        if reply.code == 421:
            # RFC 5321 §3.8: the server is closing; take the reply, then the connection goes.
            self._wire.closing = True
        return reply

    def _tick(self) -> None:
        if self._progress is not None:
            self._progress()

    # --- one message ----------------------------------------------------------------

    def _transfer(self, transaction: _Transaction, content: Iterable[bytes], body: str,
                  smtputf8: bool, size: int | None) -> None:
        mail = f"MAIL FROM:<{transaction.sender}>"
        if body.upper() == "8BITMIME" and "8BITMIME" in self.extensions:
            mail += " BODY=8BITMIME"
        if "SMTPUTF8" in self.extensions and (smtputf8 or transaction.needs_smtputf8()):
            mail += " SMTPUTF8"
        if size is not None and "SIZE" in self.extensions:
            mail += f" SIZE={size}"
        accepted = self._envelope(transaction, mail)
        if accepted:
            if self.use_chunking and "CHUNKING" in self.extensions:
                self._send_bdat(transaction, accepted, content)
            else:
                self._send_data(transaction, accepted, content)
        if self._wire is not None and self._wire.closing:
            self._drop()

    def _envelope(self, transaction: _Transaction, mail: str) -> list[int]:
        """MAIL and the RCPTs; the indexes of the recipients the server took."""
        assert self._wire is not None
        pending = transaction.pending()
        commands = [mail] + [f"RCPT TO:<{transaction.recipients[i]}>" for i in pending]
        window = PIPELINE_WINDOW if "PIPELINING" in self.extensions else 1
        replies: list[Reply] = []
        for start in range(0, len(commands), window):
            group = commands[start:start + window]
            self._wire.send(b"".join(c.encode("utf-8") + b"\r\n" for c in group),
                            self.timeouts.command_s, "sending MAIL and RCPT")
            for command in group:
                replies.append(self._expect_reply(self.timeouts.command_s, command.split()[0]))
            mail_reply = replies[0]
            if mail_reply.kind != 2:
                break              # the RCPT replies after a refused MAIL say nothing more
        mail_reply = replies[0]
        if mail_reply.kind != 2:
            # The sender was refused: that is every recipient's answer (the RCPTs that
            # went with it in the same window got "503 need MAIL" or the like).
            transaction.settle_pending(_status(mail_reply), f"MAIL FROM: {mail_reply}",
                                       mail_reply.code)
            return []
        accepted = []
        for index, reply in zip(pending, replies[1:]):
            if reply.kind == 2:
                accepted.append(index)
            else:
                transaction.settle(index, _status(reply), f"RCPT TO: {reply}", reply.code)
        if self._wire.closing:
            raise ConnectionLost("the server is closing the connection (421)")
        return accepted

    def _send_data(self, transaction: _Transaction, accepted: list[int],
                   content: Iterable[bytes]) -> None:
        assert self._wire is not None
        reply = self._command("DATA", self.timeouts.data_init_s, intermediate=True)
        if reply.code != 354:
            if reply.kind != 4 and reply.kind != 5:
                raise ConnectionLost(f"unexpected reply to DATA: {reply}")
            transaction.settle_all(accepted, _status(reply), f"DATA: {reply}", reply.code)
            return
        tail = b""
        for piece in dot_stuff(crlf_lines(content)):
            self._wire.send(piece, self.timeouts.data_block_s, "sending the message")
            tail = piece[-2:] if len(piece) >= 2 else (tail + piece)[-2:]
        end = b".\r\n" if tail in (b"", b"\r\n") else b"\r\n.\r\n"
        self._wire.send(end, self.timeouts.data_block_s, "ending the message")
        self._final_replies(transaction, accepted)

    def _send_bdat(self, transaction: _Transaction, accepted: list[int],
                   content: Iterable[bytes]) -> None:
        assert self._wire is not None
        for chunk, last in _with_last(_chunks(crlf_lines(content), self.chunk_bytes)):
            command = f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode()
            self._wire.send(command + chunk, self.timeouts.data_block_s, "sending the message")
            if last:
                break
            reply = self._expect_reply(self.timeouts.command_s, "BDAT")
            if reply.kind != 2:
                # The transaction is over; RSET before the next one clears what is left.
                transaction.settle_all(accepted, _status(reply), f"BDAT: {reply}", reply.code)
                return
        self._final_replies(transaction, accepted)

    def _final_replies(self, transaction: _Transaction, accepted: list[int]) -> None:
        """RFC 2033 §4.2: one reply per accepted recipient, in RCPT order, after DATA's
        end, and likewise after BDAT ... LAST (as Dovecot answers it). A recipient is settled the moment its reply arrives, so a
        connection lost half way leaves only the rest deferred."""
        for index in accepted:
            reply = self._expect_reply(self.timeouts.data_done_s, "the reply after the message")
            transaction.settle(index, _status(reply), str(reply), reply.code)


# --- per-recipient bookkeeping ------------------------------------------------------

class _Transaction:
    def __init__(self, sender: str, recipients: list[str]):
        self.sender = sender
        self.recipients = recipients
        self._outcomes: list[RecipientOutcome | None] = [None] * len(recipients)

    def pending(self) -> list[int]:
        return [i for i, outcome in enumerate(self._outcomes) if outcome is None]

    def settle(self, index: int, status: Status, reply: str, code: int | None = None) -> None:
        if self._outcomes[index] is None:
            self._outcomes[index] = RecipientOutcome(self.recipients[index], status, reply, code)

    def settle_all(self, indexes: Iterable[int], status: Status, reply: str,
                   code: int | None = None) -> None:
        for index in indexes:
            self.settle(index, status, reply, code)

    def settle_pending(self, status: Status, reply: str, code: int | None = None) -> None:
        self.settle_all(self.pending(), status, reply, code)

    def outcomes(self) -> list[RecipientOutcome]:
        assert all(o is not None for o in self._outcomes)
        return list(self._outcomes)  # type: ignore[arg-type]

    def needs_smtputf8(self) -> bool:
        return not self.sender.isascii() or any(not r.isascii() for r in self.recipients)

    def refuse_what_cannot_go(self, extensions: Extensions, size: int | None) -> None:
        """Settle, before any command, the copies this server can never take."""
        if not _sendable(self.sender):
            self.settle_pending(Status.FAILED, "the sender address cannot be sent "
                                "(control characters or invalid UTF-8)")
        if size is not None and extensions.size_limit is not None and size > extensions.size_limit:
            self.settle_pending(Status.FAILED, f"message of {size} octets exceeds the LMTP "
                                f"server's size limit of {extensions.size_limit}")
        utf8 = "SMTPUTF8" in extensions
        if not utf8 and not self.sender.isascii():
            self.settle_pending(Status.FAILED, "the sender address needs SMTPUTF8, which the "
                                "LMTP server does not offer")
        for i in self.pending():
            recipient = self.recipients[i]
            if not _sendable(recipient):
                self.settle(i, Status.FAILED, "the recipient address cannot be sent "
                            "(control characters or invalid UTF-8)")
            elif not utf8 and not recipient.isascii():
                self.settle(i, Status.FAILED, "the recipient address needs SMTPUTF8, which the "
                            "LMTP server does not offer")


def _status(reply: Reply) -> Status:
    return {2: Status.DELIVERED, 4: Status.DEFERRED, 5: Status.FAILED}[reply.kind]


def _sendable(address: str) -> bool:
    """No control characters (they would end or split a command line) and valid UTF-8
    (a lone surrogate from a JSON escape cannot be sent)."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not _UNPRINTABLE.search(address)


# --- content -------------------------------------------------------------------------

def crlf_lines(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The content with every bare LF made CRLF, piece by piece (a CRLF may be split
    between two pieces). Bare CRs are content and stay."""
    after_cr = False
    for piece in pieces:
        if not piece:
            continue
        if after_cr and piece.startswith(b"\n"):
            out = b"\n" + _BARE_LF.sub(b"\r\n", piece[1:])
        else:
            out = _BARE_LF.sub(b"\r\n", piece)
        after_cr = piece.endswith(b"\r")
        yield out


def dot_stuff(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """RFC 5321 §4.5.2: a line that starts with '.' gets another one. Expects CRLF line
    ends (crlf_lines), so every LF starts a line."""
    at_line_start = True
    for piece in pieces:
        if not piece:
            continue
        out = piece.replace(b"\n.", b"\n..")
        if at_line_start and out.startswith(b"."):
            out = b"." + out
        at_line_start = out.endswith(b"\n")
        yield out


def _chunks(pieces: Iterable[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """Pieces joined up to about chunk_bytes (a larger piece goes as it is)."""
    pending: list[bytes] = []
    size = 0
    for piece in pieces:
        pending.append(piece)
        size += len(piece)
        if size >= chunk_bytes:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


def _with_last(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bool]]:
    """(chunk, is_last); an empty message is one empty last chunk (BDAT 0 LAST)."""
    previous: bytes | None = None
    for chunk in chunks:
        if previous is not None:
            yield previous, False
        previous = chunk
    yield (previous if previous is not None else b""), True


# --- the socket ------------------------------------------------------------------------

def _open_socket(target: DeliveryTarget, timeout: float, tick: Callable[[], None]) -> socket.socket:
    """Connect without blocking longer than PROGRESS_INTERVAL_S between ticks."""
    if target.path:
        candidates = [(socket.AF_UNIX, target.path)]
        where = f"unix:{target.path}"
    else:
        where = f"{target.host}:{target.port}"
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ConnectionLost(f"cannot resolve {target.host}: {e}") from None
        candidates = [(family, address) for family, _, _, _, address in infos]
    error = "no address"
    for family, address in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _connect_within(sock, address, timeout, tick)
            if family in (socket.AF_INET, socket.AF_INET6):
                # We write pipelined groups ourselves; Nagle would only add delay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            sock.close()
            error = e.strerror or str(e)
        except BaseException:
            sock.close()             # progress() may raise: no socket left behind
            raise
    raise ConnectionLost(f"cannot connect to {where}: {error}")


def _connect_within(sock: socket.socket, address: object, timeout: float,
                    tick: Callable[[], None]) -> None:
    sock.setblocking(False)
    err = sock.connect_ex(address)
    deadline = time.monotonic() + timeout
    while err in (errno.EINPROGRESS, errno.EALREADY, errno.EINTR):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "connection timed out")
        writable = _poll(sock, select.POLLOUT, min(remaining, PROGRESS_INTERVAL_S))
        tick()
        if writable:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


class _Wire:
    """A connected socket with deadlines per step, ticking while it waits."""

    def __init__(self, sock: socket.socket, tick: Callable[[], None]):
        self.sock = sock
        self.tick = tick
        self.buf = bytearray()
        self.closing = False         # the server said 421: no more commands

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes, timeout: float, what: str) -> None:
        """All of data; gives up after timeout seconds without progress."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost(f"timed out {what}")
            self.sock.settimeout(min(remaining, PROGRESS_INTERVAL_S))
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                sent = 0
            except OSError as e:
                raise ConnectionLost(f"connection lost {what}: {e.strerror or e}") from None
            if sent:
                view = view[sent:]
                deadline = time.monotonic() + timeout
            self.tick()

    def read_reply(self, timeout: float, what: str) -> Reply:
        """One whole reply (RFC 5321 §4.2), all lines within timeout seconds."""
        deadline = time.monotonic() + timeout
        code, lines = None, []
        while True:
            line = self._read_line(deadline, what)
            match = _REPLY_LINE.fullmatch(line)
            if not match or (code is not None and int(match.group(1)) != code) \
                    or (match.group(2) == b"" and match.group(3)):
                raise ConnectionLost(f"malformed reply to {what}: {line[:80]!r}")
            code = int(match.group(1))
            lines.append(_printable(match.group(3)))
            if match.group(2) != b"-":
                return Reply(code, tuple(lines))
            if len(lines) >= MAX_REPLY_LINES:
                raise ConnectionLost(f"reply to {what} has more than {MAX_REPLY_LINES} lines")

    def has_unsolicited_input(self) -> bool:
        """Whether the server said something (or closed) while nobody asked: an idle
        connection it has given up on."""
        return bool(self.buf) or _poll(self.sock, select.POLLIN, 0)

    def _read_line(self, deadline: float, what: str) -> bytes:
        while True:
            end = self.buf.find(b"\n", 0, MAX_REPLY_LINE)
            if end >= 0:
                line = bytes(self.buf[:end]).rstrip(b"\r")
                del self.buf[:end + 1]
                return line
            if len(self.buf) >= MAX_REPLY_LINE:
                raise ConnectionLost(f"reply line to {what} longer than {MAX_REPLY_LINE} octets")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost(f"timed out waiting for {what}")
            self.sock.settimeout(min(remaining, PROGRESS_INTERVAL_S))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                self.tick()
                continue
            except OSError as e:
                raise ConnectionLost(f"connection lost waiting for {what}: "
                                     f"{e.strerror or e}") from None
            if not data:
                raise ConnectionLost(f"connection closed by the server waiting for {what}")
            self.buf += data
            self.tick()


def _poll(sock: socket.socket, events: int, timeout_s: float) -> bool:
    """Whether sock is ready (or in error, or closed) within timeout_s. poll, not
    select: a process with many files may have descriptors past FD_SETSIZE."""
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(timeout_s * 1000))


def _printable(text: bytes) -> str:
    return _UNPRINTABLE.sub("?", text.decode("utf-8", "replace")).strip()
