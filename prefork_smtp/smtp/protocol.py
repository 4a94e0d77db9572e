"""The SMTP server state machine (RFC 5321), sans-IO.

Owns: turning the bytes a client sends into replies and events, command sequencing,
limits (line length, size, recipients, errors), DATA and BDAT (RFC 3030) framing, and
saying when TLS is to start (RFC 3207): the session does the handshake and then makes
a new SMTPConnection, so nothing said before it survives.
Must not: touch sockets, clocks, files or loggers. The session feeds bytes in with
feed() and carries out the events that come back; while a message is being stored
it buffers input unprocessed, so pipelined commands after DATA are answered in order
once the session reports stored() or store_failed().

Fails closed: any input yields replies; a protocol violation is an SMTP error reply,
never an exception.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Union

from ..config import Config
from ..store.envelope import Envelope, Recipient
from ..store.mailboxes import Rejection, Router
from . import replies as R
from .addresses import (NULL_PATH, Address, AddressError, NeedsSMTPUTF8, parse_params,
                        parse_path, split_path_and_params)
from .data_framing import ChunkReader, DataFramer

# RFC 5321 §4.5.3.1.4: 512 octets per command line including CRLF; §4.5.3.1.5 lets
# extensions add to it (SPEC §5: 1,000). SIZE, BODY and SMTPUTF8 need far less.
MAX_COMMAND_LINE = 1000
# Postfix's smtpd_junk_command_limit: past this many NOOP, VRFY and RSET without a
# delivered message, each one counts as an error (tarpit, then hard_error_limit).
JUNK_COMMAND_LIMIT = 100
# RFC 3030 §2: chunk-size = 1*DIGIT; the end marker is the word LAST.
_BDAT_SIZE_DIGITS = frozenset("0123456789")
# RFC 5321 §6.3 recommends a hop limit; Postfix's hopcount_limit is 50.
MAX_RECEIVED_HEADERS = 50


class State(enum.Enum):
    CONNECTED = "connected"      # no HELO/EHLO yet
    GREETED = "greeted"          # no transaction
    MAIL = "mail"                # MAIL accepted, no recipient given yet
    NO_RCPT = "no valid rcpt"    # recipients given, all refused
    RCPT = "rcpt"                # at least one recipient
    CHUNKING = "chunking"        # between the BDAT chunks of a message
    DATA = "data"                # reading a DATA block
    BDAT = "bdat"                # reading the octets of a BDAT chunk
    STORING = "storing"          # waiting for the session to store the message
    STARTING_TLS = "starting tls"   # 220 sent; the session takes over (RFC 3207)
    CLOSED = "closed"


# --- events the session carries out -------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class SendReply:
    data: bytes
    is_error: bool = False
    # Past soft_error_limit: the session waits error_delay_s before sending it (tarpit).
    tarpit: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MessageChunk:
    """Content of the message being received, to be kept until StoreMessage (only
    when the connection was made with chunk_bytes; cut at line boundaries)."""
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class MessageAborted:
    """Throw away the MessageChunks of this transaction: it will not be stored."""


@dataclasses.dataclass(frozen=True, slots=True)
class StoreMessage:
    envelope: Envelope
    content: bytes     # unstuffed, CRLF line ends as received; the rest after any MessageChunks


@dataclasses.dataclass(frozen=True, slots=True)
class CloseConnection:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class StartTLS:
    """The 220 for STARTTLS is out: hand the connection to TLS, then start a new
    SMTPConnection. Input already buffered after the command is in `unprocessed`
    and must never be executed."""


Event = Union[SendReply, MessageChunk, MessageAborted, StoreMessage, CloseConnection, StartTLS]


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    handler: Callable[["SMTPConnection", str], "R.Reply | bytes | None"]
    allowed: frozenset[State]
    # What to answer when the command comes in a state not allowed for it.
    out_of_order: dict[State, R.Reply]
    # NOOP, VRFY, RSET: past JUNK_COMMAND_LIMIT without a delivered message they
    # count as errors (Postfix's smtpd_junk_command_limit).
    junk: bool = False


def _seq(text: str) -> R.Reply:
    return R.fill(R.BAD_SEQUENCE, text)


# States in which the next input is a command line.
_SESSION_STATES = frozenset({State.CONNECTED, State.GREETED, State.MAIL, State.NO_RCPT,
                             State.RCPT, State.CHUNKING})
_IN_TRANSACTION = frozenset({State.MAIL, State.NO_RCPT, State.RCPT, State.CHUNKING})


class SMTPConnection:
    """One SMTP session's protocol state. Not thread-safe; one per connection."""

    def __init__(self, config: Config, router: Router, client_address: str = "unknown",
                 chunk_bytes: int | None = None, max_commands_per_feed: int | None = None,
                 tls: str | None = None, tls_available: bool = False):
        self.config = config
        # The TLS connection as Received: describes it ("TLSv1.3 with cipher ..."),
        # None in plain text; and whether STARTTLS can be offered (a certificate).
        self.tls = tls
        self.tls_available = tls_available
        self.chunk_bytes = chunk_bytes   # hand out DATA in MessageChunks past this size
        self.max_commands_per_feed = max_commands_per_feed
        self.router = router
        self.client_address = client_address
        self.state = State.CONNECTED
        self.error_count = 0
        self.junk_commands = 0       # NOOP, VRFY, RSET: past JUNK_COMMAND_LIMIT they count as errors
        self.commands_done = 0       # bumps per command line and per DATA block
        self.messages_accepted = 0
        self._buf = bytearray()
        self._discarding_long_line = False
        self._esmtp = False
        self._helo = ""
        self._shutting_down = False
        self._reset_transaction()

    # --- public interface -------------------------------------------------------

    def greeting(self) -> list[Event]:
        return [SendReply(f"220 {self.config.hostname} ESMTP ccsmtp\r\n".encode())]

    def feed(self, data: bytes) -> list[Event]:
        """Take bytes from the client; return what to do, in order."""
        if self.state is State.CLOSED:
            return []
        self._buf += data
        return self._process()

    def stored(self, queue_id: str) -> list[Event]:
        """The message from the last StoreMessage is durably queued."""
        self._expect(State.STORING)
        self.messages_accepted += 1
        self.error_count = 0    # Postfix counts errors "without delivering mail"
        self.junk_commands = 0
        reply = R.QUEUED.with_text(R.QUEUED.text.format(queue_id))
        return self._finish_message(reply)

    def store_failed(self, reply: R.Reply) -> list[Event]:
        self._expect(State.STORING)
        return self._finish_message(reply)

    def timed_out(self) -> list[Event]:
        return self._close_with(R.TIMEOUT)

    def shutdown(self) -> list[Event]:
        """The server is stopping: close now if idle, else when the transaction ends."""
        self._shutting_down = True
        if self.state in (State.CONNECTED, State.GREETED):
            return self._close_with(R.SHUTTING_DOWN)
        return []

    @property
    def in_transaction(self) -> bool:
        return self.state in (State.DATA, State.BDAT, State.STORING)

    @property
    def reading_data(self) -> bool:
        """Message content is coming in (a DATA block or a BDAT chunk)."""
        return self.state in (State.DATA, State.BDAT)

    @property
    def has_unread_commands(self) -> bool:
        """Pipelined input left over by max_commands_per_feed: call feed(b"")."""
        return self.state in _SESSION_STATES and self._buf.find(b"\n") >= 0

    @property
    def unprocessed(self) -> bytes:
        """Input received but not acted on (after STARTTLS: never to be executed)."""
        return bytes(self._buf)

    # --- input processing -------------------------------------------------------

    def _process(self) -> list[Event]:
        events: list[Event] = []
        pos = handled = 0
        while self.state not in (State.STORING, State.STARTING_TLS, State.CLOSED):
            if self.state is State.DATA:
                pos = self._take_data(pos, events)
                if self.state is State.DATA:
                    break
                continue
            if self.state is State.BDAT:
                pos = self._take_chunk(pos, events)
                if self.state is State.BDAT:
                    break
                continue
            if self._shutting_down and self.state in (State.CONNECTED, State.GREETED):
                # Idle now (RSET, a refused chunk or a stored message ended the
                # transaction): the server is stopping, so say goodbye at once.
                events.extend(self._close_with(R.SHUTTING_DOWN))
                break
            line_end = self._find_line_end(pos)
            if line_end < 0:
                if len(self._buf) - pos > MAX_COMMAND_LINE:
                    self._discarding_long_line = True
                    pos = len(self._buf)
                break
            if self.max_commands_per_feed and handled >= self.max_commands_per_feed:
                break   # the rest waits for feed(b""): other sessions get a turn
            handled += 1
            line = bytes(self._buf[pos:line_end])
            pos = line_end + 1
            self.commands_done += 1
            if self._discarding_long_line:
                self._discarding_long_line = False
                self._reply(events, R.LINE_TOO_LONG)
                continue
            self._handle_line(line, events)
        del self._buf[:pos]
        return events

    def _find_line_end(self, start: int) -> int:
        # Commands end at LF, with or without CR before it (as Postfix accepts); only
        # DATA is strict about CRLF, which is where smuggling matters.
        return self._buf.find(b"\n", start)

    def _handle_line(self, line: bytes, events: list[Event]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) + 2 > MAX_COMMAND_LINE:   # counted with its CRLF
            self._reply(events, R.LINE_TOO_LONG)
            return
        if b"\r" in line or b"\0" in line:
            self._reply(events, R.BAD_BYTES)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(events, R.UNRECOGNIZED.with_text("Error: command is not valid UTF-8"))
            return
        verb, _, arg = text.strip(" ").partition(" ")
        command = COMMANDS.get(verb.upper())
        if command is None:
            self._reply(events, R.UNRECOGNIZED)
            return
        if self.state not in command.allowed:
            self._reply(events, command.out_of_order.get(self.state, _seq("bad sequence of commands")))
            return
        result = command.handler(self, arg.strip(" "))
        if result is None:
            return       # BDAT: the reply comes after the chunk's octets
        if isinstance(result, bytes):
            events.append(SendReply(result))
        elif command.junk and self._too_much_junk():
            self._reply(events, result, counts_as_error=True)
        else:
            self._reply(events, result)
        if self.state is State.STARTING_TLS:
            events.append(StartTLS())
        if self.state is State.CLOSED and not isinstance(events[-1], CloseConnection):
            events.append(CloseConnection())   # QUIT (an error past the limit closed already)

    def _too_much_junk(self) -> bool:
        self.junk_commands += 1
        return self.junk_commands > JUNK_COMMAND_LIMIT

    def _reply(self, events: list[Event], reply: R.Reply, counts_as_error: bool = False) -> None:
        # RFC 5321 §4.2.5 style: 4xx "too many recipients" is not the client's error.
        if (counts_as_error or reply.is_error) and reply is not R.TOO_MANY_RECIPIENTS:
            self.error_count += 1
        tarpit = self.error_count > self.config.soft_error_limit and (
            counts_as_error or reply.is_error)
        events.append(SendReply(bytes(reply), reply.is_error, tarpit))
        # SPEC §5: *more than* hard_error_limit errors closes the session.
        if self.error_count > self.config.hard_error_limit:
            events.extend(self._close_with(R.TOO_MANY_ERRORS))

    def _close_with(self, reply: R.Reply) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self.state = State.CLOSED
        return [SendReply(bytes(reply), True), CloseConnection()]

    # --- DATA -------------------------------------------------------------------

    def _take_data(self, pos: int, events: list[Event]) -> int:
        framer = self._framer
        with memoryview(self._buf) as view:
            pieces, leftover = framer.feed(view[pos:])
        if leftover is None:
            if framer.oversized and self._chunks_sent:
                self._chunks_sent = False
                events.append(MessageAborted())
            for piece in pieces:
                self._chunks_sent = True
                events.append(MessageChunk(piece))
            return len(self._buf)
        self.commands_done += 1
        if framer.oversized:
            self._abort_transaction(events, R.MESSAGE_TOO_BIG)
        elif framer.received_headers > MAX_RECEIVED_HEADERS:
            self._abort_transaction(events, R.LOOP_DETECTED)
        else:
            self._end_of_data(pieces[0], events)
        return len(self._buf) - leftover

    # --- BDAT (RFC 3030) -------------------------------------------------------

    def _take_chunk(self, pos: int, events: list[Event]) -> int:
        reader = self._chunks
        with memoryview(self._buf) as view:
            pieces, used = reader.feed(view[pos:])
        for piece in pieces:
            self._chunks_sent = True
            events.append(MessageChunk(piece))
        pos += used
        if not reader.chunk_done:
            return pos
        self.commands_done += 1
        refusal, self._chunk_refusal = self._chunk_refusal, None
        if refusal is not None:
            self.state = self._state_before_chunk
            if self.state in _IN_TRANSACTION:
                # The message lacks this chunk now: later chunks get 503 until MAIL.
                self._abort_transaction(events, refusal)
            else:
                self._reply(events, refusal)
        elif not self._chunk_last:
            self.state = State.CHUNKING
            self._reply(events, R.fill(R.CHUNK_RECEIVED, self._chunk_size))
        elif reader.received_headers > MAX_RECEIVED_HEADERS:
            self._abort_transaction(events, R.LOOP_DETECTED)
        else:
            self._end_of_data(reader.rest(), events)
        return pos

    def _chunk_refused_with(self, size: int) -> R.Reply | None:
        if self.state in (State.RCPT, State.CHUNKING):
            if self._chunks.size + size > self.config.max_size_bytes:
                return R.MESSAGE_TOO_BIG
            return None
        # Refused as DATA would be: no HELO, no MAIL, no (valid) recipient.
        return COMMANDS["DATA"].out_of_order.get(self.state, _seq("bad sequence of commands"))

    # --- the end of a message ----------------------------------------------------

    def _end_of_data(self, content: bytes, events: list[Event]) -> None:
        envelope = Envelope(
            mail_from=self._mail_from.text,
            recipients=tuple(self._recipients),
            helo=self._helo,
            protocol=self._protocol_name(),
            client_address=self.client_address,
            body=self._body,
            tls=self.tls,
        )
        self.state = State.STORING
        self._chunks_sent = False   # the session now owns them, with the last piece
        events.append(StoreMessage(envelope, content))

    def _abort_transaction(self, events: list[Event], reply: R.Reply) -> None:
        if self._chunks_sent:
            events.append(MessageAborted())
        self._reset_transaction()
        self.state = State.GREETED
        self._reply(events, reply)

    def _finish_message(self, reply: R.Reply) -> list[Event]:
        events: list[Event] = []
        self._abort_transaction(events, reply)
        return events + self._process()      # (which says goodbye if shutting down)

    def _protocol_name(self) -> str:
        # RFC 3848 (ESMTPS) and RFC 6531 §3.7.3 (UTF8SMTP, UTF8SMTPS).
        name = "UTF8SMTP" if self._smtputf8 else "ESMTP" if self._esmtp else "SMTP"
        return name + "S" if self.tls else name

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"protocol is {self.state.value}, not {state.value}")

    def _reset_transaction(self) -> None:
        self._mail_from: Address = NULL_PATH
        self._recipients: list[Recipient] = []
        self._smtputf8 = False
        self._body = "7BIT"
        self._framer = DataFramer(self.config.max_size_bytes, self.chunk_bytes)
        self._chunks = ChunkReader(self.config.max_size_bytes, self.chunk_bytes)
        self._chunks_sent = False
        self._chunk_refusal: R.Reply | None = None

    # --- command handlers -----------------------------------------------------------

    def _helo_or_ehlo(self, arg: str, esmtp: bool) -> R.Reply | bytes:
        verb = "EHLO" if esmtp else "HELO"
        if not arg or not arg.isascii() or not all(c.isprintable() and c != " " for c in arg):
            return R.fill(R.BAD_HELO, verb)
        self._reset_transaction()
        self.state = State.GREETED
        self._esmtp = esmtp
        self._helo = arg
        host = self.config.hostname
        if not esmtp:
            return R.format_reply(250, [host])
        extensions = ["PIPELINING", f"SIZE {self.config.max_size_bytes}", "8BITMIME",
                      "ENHANCEDSTATUSCODES"]
        if self.config.smtputf8:
            extensions.append("SMTPUTF8")
        extensions.append("CHUNKING")
        if self.tls_available and not self.tls:
            extensions.append("STARTTLS")
        extensions.append("HELP")
        return R.format_reply(250, [host] + extensions)

    def do_helo(self, arg: str) -> R.Reply | bytes:
        return self._helo_or_ehlo(arg, esmtp=False)

    def do_ehlo(self, arg: str) -> R.Reply | bytes:
        return self._helo_or_ehlo(arg, esmtp=True)

    def do_mail(self, arg: str) -> R.Reply:
        if self.config.tls_required and not self.tls:
            return R.TLS_REQUIRED
        if not arg[:5].upper() == "FROM:":
            return R.fill(R.BAD_SYNTAX, "MAIL FROM:<address>")
        try:
            path, param_text = split_path_and_params(arg[5:])
            params = parse_params(param_text)
        except AddressError:
            return R.BAD_SENDER_SYNTAX
        if params and not self._esmtp:
            return R.fill(R.BAD_PARAMETER, next(iter(params)))   # RFC 5321 §4.1.1.11
        rejection = self._check_mail_params(params)
        if rejection:
            return rejection
        try:
            sender = parse_path(path, allow_null=True, smtputf8="SMTPUTF8" in params)
        except NeedsSMTPUTF8:
            return R.NEEDS_SMTPUTF8
        except AddressError:
            return R.BAD_SENDER_SYNTAX
        self._mail_from = sender
        self._smtputf8 = "SMTPUTF8" in params
        self._body = "8BITMIME" if (params.get("BODY") or "").upper() == "8BITMIME" else "7BIT"
        self.state = State.MAIL
        return R.SENDER_OK

    def _check_mail_params(self, params: dict[str, str | None]) -> R.Reply | None:
        for name, value in params.items():
            if name == "SIZE":
                if value is None or not value.isdigit():
                    return R.fill(R.BAD_SYNTAX, "SIZE=<number>")
                if int(value) > self.config.max_size_bytes:   # RFC 1870 §6.1
                    return R.MESSAGE_TOO_BIG
            elif name == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return R.fill(R.BAD_SYNTAX, "BODY=7BIT or BODY=8BITMIME")
            elif name == "SMTPUTF8" and self.config.smtputf8:
                if value is not None:
                    return R.fill(R.BAD_SYNTAX, "SMTPUTF8 takes no value")
            else:
                return R.fill(R.BAD_PARAMETER, name)
        return None

    def do_rcpt(self, arg: str) -> R.Reply:
        reply = self._add_recipient(arg)
        if reply.is_error and self.state is State.MAIL:
            self.state = State.NO_RCPT   # DATA is now 554, not 503 (SPEC §5)
        return reply

    def _add_recipient(self, arg: str) -> R.Reply:
        if not arg[:3].upper() == "TO:":
            return R.fill(R.BAD_SYNTAX, "RCPT TO:<address>")
        try:
            path, param_text = split_path_and_params(arg[3:])
            params = parse_params(param_text)
            address = parse_path(path, allow_null=False, smtputf8=self._smtputf8)
        except NeedsSMTPUTF8:
            return R.NEEDS_SMTPUTF8
        except AddressError:
            return R.BAD_RECIPIENT_SYNTAX
        if params:
            return R.fill(R.BAD_PARAMETER, next(iter(params)))
        if len(self._recipients) >= self.config.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        mailbox = self.router.route(address.local_part, address.domain)
        if mailbox is Rejection.NOT_LOCAL:
            return R.fill(R.RELAY_DENIED, address.text)
        if mailbox is Rejection.UNKNOWN_USER:
            return R.fill(R.UNKNOWN_USER, address.text)
        self._recipients.append(Recipient(address.text, mailbox))
        self.state = State.RCPT
        return R.RECIPIENT_OK

    def do_data(self, arg: str) -> R.Reply:
        if arg:
            return R.fill(R.BAD_SYNTAX, "DATA")
        self.state = State.DATA
        self._framer = DataFramer(self.config.max_size_bytes, self.chunk_bytes)
        return R.START_DATA

    def do_bdat(self, arg: str) -> R.Reply | None:
        """RFC 3030: the chunk's octets are read whatever the answer; the reply comes
        after them. A size that is not 1*DIGIT cannot be skipped: the connection
        is closed, as nothing after it can be told from the chunk."""
        size_text, _, marker = arg.partition(" ")
        if not size_text or not set(size_text) <= _BDAT_SIZE_DIGITS:
            self.state = State.CLOSED
            return R.fill(R.BAD_SYNTAX, "BDAT chunk-size [LAST]")
        size = int(size_text)
        refusal = self._chunk_refused_with(size)
        if marker.strip(" ").upper() not in ("", "LAST") and refusal is None:
            refusal = R.BAD_BDAT_MARKER
        self._chunk_refusal = refusal
        self._chunk_size = size
        self._chunk_last = marker.strip(" ").upper() == "LAST"
        self._state_before_chunk = self.state
        self._chunks.start_chunk(size, keep=refusal is None)
        self.state = State.BDAT
        return None

    def do_starttls(self, arg: str) -> R.Reply:
        if arg:
            return R.fill(R.BAD_SYNTAX, "STARTTLS")
        if self.tls:
            return R.TLS_ALREADY_ACTIVE
        if not self.tls_available:
            return R.TLS_NOT_AVAILABLE
        self.state = State.STARTING_TLS
        return R.READY_FOR_TLS

    def do_rset(self, arg: str) -> R.Reply:
        if arg:
            return R.fill(R.BAD_SYNTAX, "RSET")
        self._reset_transaction()
        if self.state is not State.CONNECTED:
            self.state = State.GREETED
        return R.RESET_OK

    def do_noop(self, arg: str) -> R.Reply:
        return R.NOOP_OK

    def do_vrfy(self, arg: str) -> R.Reply:
        # RFC 5321 §3.5.3: 252 without confirming; VRFY is a harvester's tool.
        return R.CANNOT_VRFY if arg else R.fill(R.BAD_SYNTAX, "VRFY address")

    def do_expn(self, arg: str) -> R.Reply:
        return R.EXPN_DENIED

    def do_help(self, arg: str) -> R.Reply:
        return HELP

    def do_quit(self, arg: str) -> R.Reply:
        if arg:
            return R.fill(R.BAD_SYNTAX, "QUIT")
        self.state = State.CLOSED
        return R.BYE


_ANY = _SESSION_STATES
_NEED_HELO = _seq("send HELO/EHLO first")
_IN_MAIL = _seq("MAIL transaction in progress")
_AFTER_BDAT = _seq("BDAT transaction in progress (RSET to start over)")
COMMANDS: dict[str, Command] = {
    "HELO": Command(SMTPConnection.do_helo, _ANY, {}),
    "EHLO": Command(SMTPConnection.do_ehlo, _ANY, {}),
    "STARTTLS": Command(SMTPConnection.do_starttls, frozenset({State.CONNECTED, State.GREETED}),
                        dict.fromkeys(_IN_TRANSACTION, _IN_MAIL)),
    "MAIL": Command(SMTPConnection.do_mail, frozenset({State.GREETED}), {
        State.CONNECTED: _NEED_HELO,
        State.MAIL: _seq("nested MAIL command"),
        State.NO_RCPT: _seq("nested MAIL command"),
        State.RCPT: _seq("nested MAIL command"),
        State.CHUNKING: _AFTER_BDAT,
    }),
    "RCPT": Command(SMTPConnection.do_rcpt, frozenset({State.MAIL, State.NO_RCPT, State.RCPT}), {
        State.CONNECTED: _NEED_HELO,
        State.GREETED: _seq("need MAIL command"),
        State.CHUNKING: _AFTER_BDAT,
    }),
    "DATA": Command(SMTPConnection.do_data, frozenset({State.RCPT}), {
        State.CONNECTED: _NEED_HELO,
        State.GREETED: _seq("need MAIL command"),
        State.MAIL: _seq("need RCPT command"),          # SPEC §5: no recipient given
        State.NO_RCPT: R.NO_VALID_RECIPIENTS,           # given, and all refused
        State.CHUNKING: _seq("DATA after BDAT in one transaction"),
    }),
    # Read its octets in every state; refusals come from DATA's row above.
    "BDAT": Command(SMTPConnection.do_bdat, _ANY, {}),
    "RSET": Command(SMTPConnection.do_rset, _ANY, {}, junk=True),
    "NOOP": Command(SMTPConnection.do_noop, _ANY, {}, junk=True),
    "VRFY": Command(SMTPConnection.do_vrfy, _ANY, {}, junk=True),
    "EXPN": Command(SMTPConnection.do_expn, _ANY, {}),
    "HELP": Command(SMTPConnection.do_help, _ANY, {}),
    "QUIT": Command(SMTPConnection.do_quit, _ANY, {}),
}
HELP = R.fill(R.HELP, " ".join(COMMANDS))
