"""The POP3 server state machine (RFC 1939, 2449, 2595, 3206, 5034), sans-IO.

Owns: turning the bytes a client sends into replies and events: command parsing and
sequencing, the USER/PASS and SASL PLAIN login dialogues, the message-number view of
the maildrop snapshot (sizes, UIDLs, deletion marks), line limits and error counting.
Must not: touch sockets, clocks, files, threads or loggers. The session feeds bytes in
with feed() and carries out the events that come back, in order; where an event needs
an answer (CheckLogin, OpenMaildrop, SendMessage, Commit) the protocol waits, keeping
later input unprocessed, until the session calls the matching method (login_ok(),
maildrop_opened(), message_sent(), committed(), ...). STLS ends this object's life:
the session does the handshake and makes a new one with tls=True.

Fails closed: any input yields replies, never an exception; calling a session method
when the protocol is not waiting for it is a bug in the caller and raises RuntimeError
(except after CloseConnection: a late answer, say from a password check that outlived
a timeout, is dropped).
A password is handed out (CheckLogin) only when plaintext logins are allowed.
"""

from __future__ import annotations

import binascii
import dataclasses
import enum
from typing import Callable, Sequence, Union

from . import replies as R

# --- limits ----------------------------------------------------------------------------

# RFC 2449 §4: a command line is at most 255 octets including the CRLF.
MAX_COMMAND_LINE = 255
# RFC 4616 §2: a PLAIN server MUST accept authzid, authcid and passwd of up to 255 octets
# each: 767 octets with the two NULs, 1,024 in base64. RFC 5034 §4 keeps the AUTH line
# under RFC 2449's 255 octets and makes clients send longer responses on a continuation
# line, which "can be much longer than normal POP3 responses"; we accept the longest
# PLAIN response in either place: "AUTH PLAIN " + 1,024 + CRLF.
MAX_PLAIN_BASE64 = 4 * -(-(3 * 255 + 2) // 3)
MAX_AUTH_LINE = len("AUTH PLAIN ") + MAX_PLAIN_BASE64 + 2
# RFC 4616's 255-octet password, sent with PASS (RFC 1939 §7) instead: "PASS " + 255 + CRLF.
MAX_PASS_LINE = len("PASS ") + 255 + 2
# RFC 1939 §7: TOP's line count is a non-negative number; beyond this it means "all".
MAX_TOP_LINES = 2**31 - 1
# RFC 1939 §7 / SPEC §9: a unique-id is 1 to 70 characters from 0x21 to 0x7E.
MAX_UIDL_LENGTH = 70
# The longest command verb we know; a line's limit is looked up from its first word.
_VERB_LENGTH = 4


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    SASL_RESPONSE = "sasl-response"          # AUTH PLAIN sent '+ ', reading the response
    CHECKING_LOGIN = "checking-login"        # waiting: login_ok() / login_failed()
    OPENING_MAILDROP = "opening-maildrop"    # waiting: maildrop_opened() / maildrop_failed()
    TRANSACTION = "transaction"
    SENDING = "sending"                      # waiting: message_sent() / message_failed()
    UPDATE = "update"                        # waiting: committed() / commit_failed()
    STARTING_TLS = "starting-tls"            # done: the session hands over to a new object
    CLOSED = "closed"


# States in which input lines are read; in every other state input waits in the buffer.
READING = frozenset({State.AUTHORIZATION, State.SASL_RESPONSE, State.TRANSACTION})
WAITING = frozenset({State.CHECKING_LOGIN, State.OPENING_MAILDROP, State.SENDING, State.UPDATE})


class Trigger(enum.Enum):
    SASL_CHALLENGE = "sasl-challenge"
    SASL_ANSWERED = "sasl-answered"
    LOGIN_STARTED = "login-started"
    LOGIN_OK = "login-ok"
    LOGIN_FAILED = "login-failed"
    MAILDROP_OPENED = "maildrop-opened"
    MAILDROP_FAILED = "maildrop-failed"
    SEND_MESSAGE = "send-message"
    MESSAGE_SENT = "message-sent"
    MESSAGE_FAILED = "message-failed"
    COMMIT = "commit"
    COMMITTED = "committed"
    COMMIT_FAILED = "commit-failed"
    STLS = "stls"
    CLOSE = "close"


_S, _T = State, Trigger
TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (_S.AUTHORIZATION, _T.SASL_CHALLENGE): _S.SASL_RESPONSE,
    (_S.SASL_RESPONSE, _T.SASL_ANSWERED): _S.AUTHORIZATION,
    (_S.AUTHORIZATION, _T.LOGIN_STARTED): _S.CHECKING_LOGIN,
    (_S.CHECKING_LOGIN, _T.LOGIN_OK): _S.OPENING_MAILDROP,
    (_S.CHECKING_LOGIN, _T.LOGIN_FAILED): _S.AUTHORIZATION,
    (_S.OPENING_MAILDROP, _T.MAILDROP_OPENED): _S.TRANSACTION,
    (_S.OPENING_MAILDROP, _T.MAILDROP_FAILED): _S.AUTHORIZATION,
    (_S.TRANSACTION, _T.SEND_MESSAGE): _S.SENDING,
    (_S.SENDING, _T.MESSAGE_SENT): _S.TRANSACTION,
    (_S.SENDING, _T.MESSAGE_FAILED): _S.CLOSED,       # nothing can be said mid-response
    (_S.TRANSACTION, _T.COMMIT): _S.UPDATE,           # RFC 1939 §6: only QUIT gets here
    (_S.UPDATE, _T.COMMITTED): _S.CLOSED,
    (_S.UPDATE, _T.COMMIT_FAILED): _S.CLOSED,
    (_S.AUTHORIZATION, _T.STLS): _S.STARTING_TLS,     # RFC 2595 §4: AUTHORIZATION only
    # Any live state may close: QUIT, too many errors, timeout, shutdown, a failed send.
    **{(state, _T.CLOSE): _S.CLOSED for state in State if state is not _S.CLOSED},
}


# --- events the session carries out ----------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class SendReply:
    data: bytes
    is_error: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class CheckLogin:
    """Check the password (in a thread), then call login_ok() or login_failed().

    user is as the client typed it (printable, no CR/LF/NUL); the session normalises
    it. The password is never in repr(), so logging the event cannot leak it."""
    user: str
    password: str = dataclasses.field(repr=False)
    method: str = "USER"          # "USER" (USER/PASS) or "PLAIN" (AUTH PLAIN), for the log


@dataclasses.dataclass(frozen=True, slots=True)
class OpenMaildrop:
    """Lock and snapshot the user's mailbox, then call maildrop_opened() or
    maildrop_failed()."""
    user: str


@dataclasses.dataclass(frozen=True, slots=True)
class SendMessage:
    """Stream message `number` (1-based, in the snapshot's order), dot-stuffed with its
    terminating '.' line (dot_stuffing.DotStuffer), then call message_sent(). body_lines
    None is RETR: the whole message; a number is TOP: the headers, the blank line and at
    most that many body lines."""
    number: int
    body_lines: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """QUIT: remove these messages (1-based numbers, ascending), then call committed()
    or commit_failed(). Not sent when nothing was deleted."""
    deleted: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class StartTLS:
    """Write everything before this, stop reading plaintext, then start the TLS
    handshake. Bytes the client sent after STLS (POP3Connection.unprocessed, which
    feed() keeps adding to) must never be executed: discard them, or close, and log it. After the handshake make a new POP3Connection with tls=True
    and do not greet again (RFC 2595 §4)."""


@dataclasses.dataclass(frozen=True, slots=True)
class CloseConnection:
    pass


Event = Union[SendReply, CheckLogin, OpenMaildrop, SendMessage, Commit, StartTLS,
              CloseConnection]


class LoginFailure(enum.Enum):
    BAD_CREDENTIALS = "bad-credentials"   # unknown user or wrong password: one reply for both
    TEMPORARY = "temporary"               # the user database could not be read


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    handler: Callable[["POP3Connection", str, list[Event]], None]
    allowed: frozenset[State]
    usage: str                          # for "-ERR Syntax: ..."
    max_line: int = MAX_COMMAND_LINE    # with its CRLF


# What a known command gets in a state where it is not allowed.
_WRONG_STATE = {
    State.AUTHORIZATION: R.NOT_LOGGED_IN,
    State.TRANSACTION: R.ALREADY_LOGGED_IN,
}


class POP3Connection:
    """One POP3 session's protocol state. Not thread-safe; one per connection (and a
    new one after STLS)."""

    def __init__(self, *, tls: bool, stls_available: bool, plaintext_allowed: bool,
                 hard_error_limit: int = 20, max_commands_per_feed: int | None = None):
        self.tls = tls
        self.stls_available = stls_available and not tls
        self.plaintext_allowed = plaintext_allowed
        self.hard_error_limit = hard_error_limit
        self.max_commands_per_feed = max_commands_per_feed
        self.state = State.AUTHORIZATION
        self.error_count = 0
        self.commands_done = 0         # bumps per line read (the session's autologout clock)
        self.user: str | None = None   # as passed to OpenMaildrop, once a login succeeded
        self._buf = bytearray()
        self._discarding_long_line = False
        # USER's argument and the number of its line: PASS must be the next line.
        self._user_given: tuple[int, str] | None = None
        self._login_user: str | None = None     # the name in the pending CheckLogin
        self._sizes: tuple[int, ...] = ()
        self._uidls: tuple[str, ...] = ()
        self._deleted: set[int] = set()
        self._shutting_down = False

    # --- public interface: input ---------------------------------------------------

    def greeting(self) -> list[Event]:
        """Only for a new connection; never after STLS (RFC 2595 §4)."""
        return [SendReply(bytes(R.GREETING))]

    def feed(self, data: bytes) -> list[Event]:
        """Take bytes from the client; return what to do, in order."""
        if self.state is State.CLOSED:
            return []
        self._buf += data
        if self.state not in READING:
            return []
        return self._process()

    # --- public interface: answers from the session ----------------------------------

    def login_ok(self, user: str | None = None) -> list[Event]:
        """The password was right. user: the normalised name to open (default: the name
        as the client typed it)."""
        if not self._answered(Trigger.LOGIN_OK):
            return []
        if self._shutting_down:
            return self._close_with(R.SHUTTING_DOWN)
        self.user = user if user is not None else self._login_user
        return [OpenMaildrop(self.user)]

    def login_failed(self, reason: LoginFailure = LoginFailure.BAD_CREDENTIALS) -> list[Event]:
        """The login was refused; the session has already applied its delay."""
        if not self._answered(Trigger.LOGIN_FAILED):
            return []
        self._login_user = None
        events: list[Event] = []
        if reason is LoginFailure.TEMPORARY:
            self._reply(events, R.AUTH_TEMP_FAILED, counts=False)
        else:
            self._reply(events, R.AUTH_FAILED)    # RFC 3206 §4; counts toward the limit
        return self._resume(events)

    def maildrop_opened(self, messages: Sequence[tuple[int, str]]) -> list[Event]:
        """The mailbox is locked for us; messages: (octets, uidl) of each message at
        login, in order. Octets count line ends as CRLF and exclude dot-stuffing."""
        sizes, uidls = _check_snapshot(messages)
        if not self._answered(Trigger.MAILDROP_OPENED):
            return []
        self._sizes, self._uidls = sizes, uidls
        self._deleted = set()
        self.error_count = 0       # a fresh start after login, as in Dovecot's pop3 process
        events: list[Event] = []
        self._reply(events, R.LOGGED_IN)     # RFC 1939 §4: +OK only once the maildrop is locked
        return self._resume(events)

    def maildrop_failed(self, in_use: bool) -> list[Event]:
        """The mailbox could not be opened: in use by another POP3 session, or an error."""
        if not self._answered(Trigger.MAILDROP_FAILED):
            return []
        self.user = self._login_user = None
        events: list[Event] = []
        self._reply(events, R.IN_USE if in_use else R.MAILDROP_FAILED, counts=False)
        return self._resume(events)

    def message_sent(self) -> list[Event]:
        """The SendMessage content and its '.' line are written."""
        if not self._answered(Trigger.MESSAGE_SENT):
            return []
        return self._resume([])

    def message_failed(self) -> list[Event]:
        """The message could not be read part way through: nothing can be said inside a
        multi-line response, so the connection is closed (and nothing is deleted)."""
        if not self._answered(Trigger.MESSAGE_FAILED):
            return []
        return [CloseConnection()]

    def committed(self) -> list[Event]:
        """The Commit's messages are removed: +OK and close (RFC 1939 §6)."""
        if not self._answered(Trigger.COMMITTED):
            return []
        return [SendReply(bytes(R.BYE)), CloseConnection()]

    def commit_failed(self) -> list[Event]:
        """Some or all of the Commit's messages are still there: -ERR and close."""
        if not self._answered(Trigger.COMMIT_FAILED):
            return []
        return [SendReply(bytes(R.COMMIT_FAILED), True), CloseConnection()]

    def timed_out(self) -> list[Event]:
        """Autologout (RFC 1939 §3): close without entering UPDATE."""
        if self.state in (State.SENDING, State.STARTING_TLS):
            return self._close_silently()   # a line now would land inside a response or TLS
        return self._close_with(R.TIMEOUT)

    def shutdown(self) -> list[Event]:
        """The server is stopping: close now, or as soon as the session's pending answer
        (login check, maildrop, message, commit) comes back."""
        self._shutting_down = True
        if self.state is State.STARTING_TLS:
            return self._close_silently()
        if self.state in READING:
            return self._close_with(R.SHUTTING_DOWN)
        return []

    # --- public interface: properties -------------------------------------------------

    @property
    def waiting(self) -> bool:
        """An answer from the session is due; the session should not read meanwhile."""
        return self.state in WAITING

    @property
    def has_unread_commands(self) -> bool:
        """Pipelined input left over by max_commands_per_feed: call feed(b"")."""
        return self.state in READING and self._buf.find(b"\n") >= 0

    @property
    def unprocessed(self) -> bytes:
        """Input received but not handled. After StartTLS: what the client sent after
        STLS, which must never be executed."""
        return bytes(self._buf)

    # --- input processing ---------------------------------------------------------------

    def _process(self) -> list[Event]:
        events: list[Event] = []
        pos = handled = 0
        while self.state in READING:
            line_end = self._buf.find(b"\n", pos)
            if line_end < 0:
                if len(self._buf) - pos > self._line_limit(pos):
                    # Memory stays bounded: drop the line now, answer at its end.
                    self._discarding_long_line = True
                    pos = len(self._buf)
                break
            if self.max_commands_per_feed and handled >= self.max_commands_per_feed:
                break   # the rest waits for feed(b""): other sessions get a turn
            handled += 1
            limit = self._line_limit(pos)
            line = bytes(self._buf[pos:line_end])
            pos = line_end + 1
            self.commands_done += 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._discarding_long_line or len(line) + 2 > limit:
                self._discarding_long_line = False
                self._line_too_long(events)
                continue
            self._handle_line(line, events)
        del self._buf[:pos]
        return events

    def _line_limit(self, start: int) -> int:
        if self.state is State.SASL_RESPONSE:
            return MAX_AUTH_LINE
        verb = bytes(self._buf[start:start + _VERB_LENGTH + 1]).partition(b" ")[0]
        command = COMMANDS.get(verb.decode("ascii", "replace").upper())
        return command.max_line if command else MAX_COMMAND_LINE

    def _line_too_long(self, events: list[Event]) -> None:
        if self.state is State.SASL_RESPONSE:   # the AUTH command fails with its response
            self._transition(Trigger.SASL_ANSWERED)
        self._reply(events, R.LINE_TOO_LONG)

    def _handle_line(self, line: bytes, events: list[Event]) -> None:
        if self.state is State.SASL_RESPONSE:
            self._transition(Trigger.SASL_ANSWERED)
            self._sasl_response(line, events)
            return
        if b"\r" in line or b"\0" in line:
            self._reply(events, R.BAD_BYTES)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(events, R.NOT_UTF8)
            return
        verb, _, arg = text.partition(" ")
        command = COMMANDS.get(verb.upper())
        if command is None:
            self._reply(events, R.UNKNOWN_COMMAND)
            return
        if self.state not in command.allowed:
            self._reply(events, _WRONG_STATE[self.state])
            return
        command.handler(self, arg, events)

    def _resume(self, events: list[Event]) -> list[Event]:
        """After a wait: go on with the input that arrived meanwhile."""
        if self.state is State.CLOSED:
            return events
        if self._shutting_down:
            return events + self._close_with(R.SHUTTING_DOWN)
        return events + self._process()

    # --- replies, transitions, closing ------------------------------------------------

    def _reply(self, events: list[Event], reply: R.Reply, counts: bool | None = None) -> None:
        """Send a reply; an -ERR counts toward hard_error_limit unless the server, not
        the client, is at fault (counts=False)."""
        events.append(SendReply(bytes(reply), reply.is_error))
        if reply.is_error if counts is None else counts:
            self.error_count += 1
            # SPEC §5/§9: *more than* hard_error_limit errors closes the session.
            if self.error_count > self.hard_error_limit:
                events.extend(self._close_with(R.TOO_MANY_ERRORS))

    def _send(self, events: list[Event], data: bytes) -> None:
        events.append(SendReply(data))

    def _answered(self, trigger: Trigger) -> bool:
        """Take the session's answer; False if the connection was closed meanwhile
        (timed_out(), shutdown()), when a late answer is simply dropped."""
        if self.state is State.CLOSED:
            return False
        self._transition(trigger)
        return True

    def _transition(self, trigger: Trigger) -> None:
        """The one place the state changes. A pair missing from TRANSITIONS is a call
        out of turn (a bug in the caller, or in this module)."""
        try:
            self.state = TRANSITIONS[self.state, trigger]
        except KeyError:
            raise RuntimeError(
                f"POP3 protocol: {trigger.value} in state {self.state.value}") from None

    def _close_with(self, reply: R.Reply) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self._transition(Trigger.CLOSE)
        return [SendReply(bytes(reply), reply.is_error), CloseConnection()]

    def _close_silently(self) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self._transition(Trigger.CLOSE)
        return [CloseConnection()]

    # --- arguments --------------------------------------------------------------------

    def _syntax_error(self, events: list[Event], verb: str) -> None:
        self._reply(events, R.BAD_SYNTAX.fill(COMMANDS[verb].usage))

    def _message(self, events: list[Event], arg: str) -> int | None:
        """The number of a visible message (arg: digits, see _is_number), or None after
        replying -ERR: 0, past the end and deleted messages do not exist (RFC 1939 §5)."""
        number = int(arg)
        if not 1 <= number <= len(self._sizes) or number in self._deleted:
            self._reply(events, R.NO_SUCH_MESSAGE)
            return None
        return number

    def _visible(self) -> list[int]:
        return [n for n in range(1, len(self._sizes) + 1) if n not in self._deleted]

    # --- command handlers: any state ----------------------------------------------------

    def do_capa(self, arg: str, events: list[Event]) -> None:
        if _args(arg):
            return self._syntax_error(events, "CAPA")
        # RFC 2449 §6; RFC 3206 §6 (AUTH-RESP-CODE).
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self.stls_available:
                caps.append("STLS")                 # RFC 2595 §4
            if self.plaintext_allowed:              # SPEC §9: only where passwords may come
                caps += ["USER", "SASL PLAIN"]      # RFC 2449 §6.3, §6.5 (RFC 5034 §3)
        caps.append("IMPLEMENTATION ccsmtp")
        self._send(events, R.multiline(R.CAPABILITIES, caps))

    def do_quit(self, arg: str, events: list[Event]) -> None:
        if _args(arg):
            return self._syntax_error(events, "QUIT")
        if self.state is State.TRANSACTION and self._deleted:
            self._transition(Trigger.COMMIT)        # RFC 1939 §6: UPDATE at QUIT only
            events.append(Commit(tuple(sorted(self._deleted))))
            return
        self._transition(Trigger.CLOSE)
        events.extend([SendReply(bytes(R.BYE)), CloseConnection()])

    # --- command handlers: AUTHORIZATION ------------------------------------------------

    def do_stls(self, arg: str, events: list[Event]) -> None:
        if _args(arg):
            return self._syntax_error(events, "STLS")
        if not self.stls_available:
            return self._reply(events, R.TLS_ACTIVE if self.tls else R.TLS_UNAVAILABLE)
        self._transition(Trigger.STLS)
        events.extend([SendReply(bytes(R.BEGIN_TLS)), StartTLS()])

    def _plaintext_refused(self, events: list[Event]) -> bool:
        if self.plaintext_allowed:
            return False
        # SPEC §9: refused, and the password is never handed out; counts as an error.
        self._reply(events, R.PLAINTEXT_DISALLOWED_STLS if self.stls_available
                    else R.PLAINTEXT_DISALLOWED)
        return True

    def do_user(self, arg: str, events: list[Event]) -> None:
        if self._plaintext_refused(events):
            return
        args = _args(arg)
        if len(args) != 1 or not _is_login_name(args[0]):
            return self._syntax_error(events, "USER")
        self._user_given = (self.commands_done, args[0])
        self._reply(events, R.USER_OK)

    def do_pass(self, arg: str, events: list[Event]) -> None:
        # RFC 1939 §7: the argument is the rest of the line, spaces and all, and PASS
        # comes "immediately after a successful USER command".
        given, self._user_given = self._user_given, None
        if self._plaintext_refused(events):
            return
        if given is None or given[0] != self.commands_done - 1:
            return self._reply(events, R.NO_USERNAME)
        user = given[1]
        if not arg:
            return self._syntax_error(events, "PASS")
        self._start_login(user, arg, "USER", events)

    def do_auth(self, arg: str, events: list[Event]) -> None:
        args = _args(arg)
        if not args:
            # RFC 1734's bare AUTH, still sent by some clients: the mechanism list.
            mechanisms = ["PLAIN"] if self.plaintext_allowed else []
            return self._send(events, R.multiline(R.MECHANISMS, mechanisms))
        if len(args) > 2:
            return self._syntax_error(events, "AUTH")
        if args[0].upper() != "PLAIN":
            return self._reply(events, R.UNSUPPORTED_MECHANISM)
        if self._plaintext_refused(events):
            return          # the initial response, if any, is not even decoded
        if len(args) == 1:
            self._transition(Trigger.SASL_CHALLENGE)   # RFC 5034 §4: empty challenge
            return self._send(events, R.SASL_CONTINUE)
        self._plain(args[1].encode("ascii", "replace"), events)

    def _sasl_response(self, line: bytes, events: list[Event]) -> None:
        if line == b"*":
            return self._reply(events, R.AUTH_CANCELLED)   # RFC 5034 §4
        self._plain(line, events)

    def _plain(self, response: bytes, events: list[Event]) -> None:
        """RFC 4616 §2: base64 of [authzid] NUL authcid NUL passwd."""
        # RFC 5034 §4: '=' is a present but empty response (which PLAIN cannot use).
        encoded = b"" if response == b"=" else response
        try:
            message = binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError):
            return self._reply(events, R.BAD_BASE64)
        parts = message.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return self._reply(events, R.BAD_PLAIN)
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:          # RFC 4616 §2: UTF-8 throughout
            return self._reply(events, R.BAD_PLAIN)
        if not _is_login_name(authcid):
            return self._reply(events, R.BAD_PLAIN)
        if authzid and authzid != authcid:
            return self._reply(events, R.AUTHZID_REFUSED)   # we act for no one else
        self._start_login(authcid, password, "PLAIN", events)

    def _start_login(self, user: str, password: str, method: str, events: list[Event]) -> None:
        self._transition(Trigger.LOGIN_STARTED)
        self._login_user = user
        events.append(CheckLogin(user, password, method))

    # --- command handlers: TRANSACTION --------------------------------------------------

    def do_stat(self, arg: str, events: list[Event]) -> None:
        if _args(arg):
            return self._syntax_error(events, "STAT")
        visible = self._visible()
        self._reply(events, R.STAT.fill(len(visible), sum(self._sizes[n - 1] for n in visible)))

    def do_list(self, arg: str, events: list[Event]) -> None:
        args = _args(arg)
        if len(args) > 1 or (args and not _is_number(args[0])):
            return self._syntax_error(events, "LIST")
        if args:
            number = self._message(events, args[0])
            if number is not None:
                self._reply(events, R.SCAN_LISTING.fill(number, self._sizes[number - 1]))
            return
        visible = self._visible()
        total = sum(self._sizes[n - 1] for n in visible)
        lines = [f"{n} {self._sizes[n - 1]}" for n in visible]
        self._send(events, R.multiline(R.LIST_ALL.fill(len(visible), total), lines))

    def do_uidl(self, arg: str, events: list[Event]) -> None:
        args = _args(arg)
        if len(args) > 1 or (args and not _is_number(args[0])):
            return self._syntax_error(events, "UIDL")
        if args:
            number = self._message(events, args[0])
            if number is not None:
                self._reply(events, R.UIDL_ONE.fill(number, self._uidls[number - 1]))
            return
        lines = [f"{n} {self._uidls[n - 1]}" for n in self._visible()]
        self._send(events, R.multiline(R.UIDL_ALL, lines))

    def do_retr(self, arg: str, events: list[Event]) -> None:
        args = _args(arg)
        if len(args) != 1 or not _is_number(args[0]):
            return self._syntax_error(events, "RETR")
        number = self._message(events, args[0])
        if number is None:
            return
        self._transition(Trigger.SEND_MESSAGE)
        self._reply(events, R.RETR_OK.fill(self._sizes[number - 1]))
        events.append(SendMessage(number, None))

    def do_top(self, arg: str, events: list[Event]) -> None:
        args = _args(arg)
        if len(args) != 2 or not all(_is_number(a) for a in args):
            return self._syntax_error(events, "TOP")
        number = self._message(events, args[0])
        if number is None:
            return
        self._transition(Trigger.SEND_MESSAGE)
        self._reply(events, R.TOP_OK)
        events.append(SendMessage(number, min(int(args[1]), MAX_TOP_LINES)))

    def do_dele(self, arg: str, events: list[Event]) -> None:
        args = _args(arg)
        if len(args) != 1 or not _is_number(args[0]):
            return self._syntax_error(events, "DELE")
        number = int(args[0])
        if number in self._deleted:
            return self._reply(events, R.ALREADY_DELETED.fill(number))   # RFC 1939 §5
        number = self._message(events, args[0])
        if number is not None:
            self._deleted.add(number)
            self._reply(events, R.DELETED.fill(number))

    def do_noop(self, arg: str, events: list[Event]) -> None:
        if _args(arg):
            return self._syntax_error(events, "NOOP")
        self._reply(events, R.NOOP_OK)

    def do_rset(self, arg: str, events: list[Event]) -> None:
        if _args(arg):
            return self._syntax_error(events, "RSET")
        self._deleted.clear()
        self._reply(events, R.RSET_OK)


def _args(arg: str) -> list[str]:
    # RFC 1939 §3 separates arguments by a single space; runs of spaces are tolerated.
    return [a for a in arg.split(" ") if a]


def _is_number(text: str) -> bool:
    # RFC 1939 §3: a number, so no sign. Leading zeros are harmless and accepted, as
    # Dovecot does. ASCII digits only: str.isdigit() would take '²' and other scripts'
    # digits. The line limit keeps int() cheap however many digits there are.
    return bool(text) and all("0" <= c <= "9" for c in text)


def _is_login_name(name: str) -> bool:
    """Printable, so CheckLogin.user never carries a control character into a log."""
    return bool(name) and name.isprintable() and " " not in name


def _check_snapshot(messages: Sequence[tuple[int, str]]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The mail store's snapshot, checked: a bad one is a bug there, not client input,
    and must not reach the wire (ValueError)."""
    sizes = tuple(size for size, _ in messages)
    uidls = tuple(uidl for _, uidl in messages)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in sizes):
        raise ValueError("message sizes must be non-negative integers")
    for uidl in uidls:
        if not (isinstance(uidl, str) and 1 <= len(uidl) <= MAX_UIDL_LENGTH
                and all("!" <= c <= "~" for c in uidl)):
            raise ValueError(f"bad UIDL {uidl!r}: 1-70 characters from 0x21-0x7E")
    if len(set(uidls)) != len(uidls):
        raise ValueError("UIDLs must be unique within the mailbox")
    return sizes, uidls


_AUTH = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTH | _TRANS
C = POP3Connection
COMMANDS: dict[str, Command] = {
    "CAPA": Command(C.do_capa, _BOTH, "CAPA"),                     # RFC 2449 §5
    "QUIT": Command(C.do_quit, _BOTH, "QUIT"),                     # RFC 1939 §4, §6
    "STLS": Command(C.do_stls, _AUTH, "STLS"),                     # RFC 2595 §4
    "USER": Command(C.do_user, _AUTH, "USER name"),                # RFC 1939 §7
    "PASS": Command(C.do_pass, _AUTH, "PASS password", MAX_PASS_LINE),
    "AUTH": Command(C.do_auth, _AUTH, "AUTH mechanism [initial-response]", MAX_AUTH_LINE),
    "STAT": Command(C.do_stat, _TRANS, "STAT"),                    # RFC 1939 §5
    "LIST": Command(C.do_list, _TRANS, "LIST [msg]"),
    "RETR": Command(C.do_retr, _TRANS, "RETR msg"),
    "DELE": Command(C.do_dele, _TRANS, "DELE msg"),
    "NOOP": Command(C.do_noop, _TRANS, "NOOP"),
    "RSET": Command(C.do_rset, _TRANS, "RSET"),
    "TOP": Command(C.do_top, _TRANS, "TOP msg lines"),             # RFC 1939 §7
    "UIDL": Command(C.do_uidl, _TRANS, "UIDL [msg]"),
}
del C
