"""The IMAP4rev1 server state machine (RFC 3501 §3, §6; RFC 2177 IDLE; RFC 4959 SASL-IR;
RFC 7888 LITERAL+; RFC 2342 NAMESPACE; RFC 4315 UIDPLUS), sans-IO.

Owns: the states NOT AUTHENTICATED -> AUTHENTICATED -> SELECTED -> LOGOUT (TRANSITIONS),
which command each state takes (COMMANDS), the login dialogues (LOGIN, AUTHENTICATE
PLAIN with or without an initial response), the literal policy (64 KiB before login,
max_size after; APPEND's literal refused), STARTTLS, IDLE, the commands answered
without the mailbox (CAPABILITY, LIST, LSUB, NAMESPACE, the NO [CANNOT] ones), error
counting and the closing BYEs.
Must not: touch sockets, clocks, files, threads or loggers. The session feeds octets
with feed() and carries out the events that come back, in order. Where an event needs
an answer the protocol waits, keeping later input in its parser, until the session
calls the matching method: CheckLogin -> login_ok(name) / login_failed();
MailboxWork -> work_done(outcome) (mailbox_commands runs it); StartTLS ends this
object's life (the session makes a new one with tls=True, and sends no greeting:
RFC 3501 §6.2.1). While IDLE, the session calls mailbox_changed() when the watcher
says the selected mailbox changed.

Fails closed: any input gives tagged or untagged responses or BAD, never an exception.
An answer that comes when none is awaited is a bug in the caller (RuntimeError),
except after Close, when a late answer is dropped.
A password is handed out (CheckLogin) only when plaintext logins are allowed: over TLS
or from loopback (SPEC §9); otherwise LOGINDISABLED and NO [PRIVACYREQUIRED].
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import TYPE_CHECKING, Callable, Union

from . import parser as P
from . import response as R
from .commands import Authenticate, ListArgs, Login, StatusArgs

if TYPE_CHECKING:
    from .mailbox_commands import Outcome, SelectedMailbox

INBOX = "INBOX"
HIERARCHY_DELIMITER = "/"


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Trigger(enum.Enum):
    LOGGED_IN = "logged in"
    SELECTED = "selected"
    UNSELECTED = "unselected"
    LOGOUT = "logout"


_S, _T = State, Trigger
TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (_S.NOT_AUTHENTICATED, _T.LOGGED_IN): _S.AUTHENTICATED,
    (_S.AUTHENTICATED, _T.SELECTED): _S.SELECTED,
    (_S.SELECTED, _T.SELECTED): _S.SELECTED,
    (_S.SELECTED, _T.UNSELECTED): _S.AUTHENTICATED,      # CLOSE, a failed SELECT
    (_S.AUTHENTICATED, _T.UNSELECTED): _S.AUTHENTICATED,
    **{(state, _T.LOGOUT): _S.LOGOUT for state in State if state is not _S.LOGOUT},
}


class Wait(enum.Enum):
    """What the protocol waits for; while it waits, input stays in the parser."""
    LOGIN = "login"          # login_ok() / login_failed()
    WORK = "work"            # work_done()
    SASL = "sasl"            # the client's AUTHENTICATE response line
    TLS = "tls"              # the end of this object: the session starts TLS


# --- events the session carries out ------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class CheckLogin:
    """Check the password (in a thread), then call login_ok(name) or login_failed().
    user is as the client sent it (printable); the password is never in repr()."""
    user: str
    password: str = dataclasses.field(repr=False)
    method: str = "LOGIN"


@dataclasses.dataclass(frozen=True, slots=True)
class MailboxWork:
    """Run mailbox_commands.job_for(this) in a thread, writing its output as it comes,
    then call work_done(outcome). command: SELECT EXAMINE STATUS FETCH STORE SEARCH
    EXPUNGE CLOSE POLL (NOOP, CHECK, IDLE updates); mailbox: the selected one."""
    command: str
    user: str
    mailbox: "SelectedMailbox | None" = None
    args: object = None
    uid: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class StartTLS:
    """Everything before this is written; read nothing more in plain text. Octets the
    client sent after the command (parser.buffered_bytes) are never executed: the
    session discards them (parser.discard_buffered()) and logs it, then handshakes."""


@dataclasses.dataclass(frozen=True, slots=True)
class IdleStarted:
    """Tell this session (mailbox_changed()) when the mailbox changes."""
    mailbox: str


@dataclasses.dataclass(frozen=True, slots=True)
class IdleEnded:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    pass


Event = Union[Send, CheckLogin, MailboxWork, StartTLS, IdleStarted, IdleEnded, Close]


# --- texts --------------------------------------------------------------------------------

BYE_LOGOUT = "Logging out"
BYE_TIMEOUT = "Autologout; idle for too long"
BYE_SHUTDOWN = "Server shutting down"
BYE_TOO_MANY_ERRORS = "Too many errors"
BYE_CANNOT_CONTINUE = "Cannot read further input"   # after a fatal parse error
NOT_LOGGED_IN = "Not logged in"
ALREADY_LOGGED_IN = "Already logged in"
NO_MAILBOX_SELECTED = "No mailbox selected"
ONLY_INBOX = "Only INBOX exists here: there are no other mailboxes"
CANNOT_CREATE = "Mailboxes cannot be created here: there is only INBOX"
CANNOT_DELETE = "Mailboxes cannot be deleted or renamed here"
CANNOT_APPEND = "Messages cannot be added here: mail arrives by SMTP only"
CANNOT_COPY = "There is no other mailbox to copy to"
PRIVACY_TLS = "Use STARTTLS first: passwords are not accepted in plain text"
PRIVACY = "Passwords are not accepted in plain text on this connection"
AUTH_FAILED = "Authentication failed"
UNSUPPORTED_MECHANISM = "Unsupported authentication mechanism"
BAD_PLAIN = "Invalid PLAIN response"
AUTHZID_REFUSED = "Authorization identity must be the user's own"
TLS_ACTIVE = "TLS is already active"
TLS_UNAVAILABLE = "STARTTLS is not available"
BEGIN_TLS = "Begin TLS negotiation now"


# --- the state machine ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    handler: Callable[["IMAPConnection", P.Command, list[Event]], None]
    allowed: frozenset[State]


class IMAPConnection:
    """One IMAP connection's protocol state (a new one after STARTTLS)."""

    def __init__(self, *, tls: bool, starttls_available: bool, plaintext_allowed: bool,
                 max_literal_after_login: int, hard_error_limit: int = 20,
                 max_commands_per_feed: int | None = None):
        self.tls = tls
        self.starttls_available = starttls_available and not tls
        self.plaintext_allowed = plaintext_allowed
        self.max_literal_after_login = max_literal_after_login
        self.hard_error_limit = hard_error_limit
        self.max_commands_per_feed = max_commands_per_feed
        self.parser = P.CommandParser()
        self.state = State.NOT_AUTHENTICATED
        self.user: str | None = None
        self.mailbox: "SelectedMailbox | None" = None
        self.error_count = 0
        self.commands_done = 0
        self._waiting: Wait | None = None
        self._pending: P.Command | None = None     # the command waiting for its answer
        self._idle: P.Command | None = None        # the IDLE command being run
        self._poll_again = False
        self._more = False
        self._shutting_down = False

    # --- input ----------------------------------------------------------------------

    def greeting(self) -> list[Event]:
        """Only for a new connection, never after STARTTLS."""
        return [Send(R.greeting(self._capabilities()))]

    def feed(self, data: bytes) -> list[Event]:
        if self.state is State.LOGOUT:
            return []
        self.parser.receive_data(data)
        return self._process([])

    # --- answers from the session ---------------------------------------------------

    def login_ok(self, name: str) -> list[Event]:
        """The password was right; name: the user (and so the mailbox), normalised."""
        command = self._answered(Wait.LOGIN)
        if command is None:
            return []
        events: list[Event] = []
        if self._shutting_down:
            return self._close(events, BYE_SHUTDOWN)
        self.user = name
        self._transition(Trigger.LOGGED_IN)
        self.parser.max_literal_bytes = self.max_literal_after_login
        caps = " ".join(self._capabilities())
        self._tagged(events, command.tag, R.OK, "Logged in", code=f"CAPABILITY {caps}")
        return self._process(events)

    def login_failed(self) -> list[Event]:
        """The login was refused (the session has already waited out the delay)."""
        command = self._answered(Wait.LOGIN)
        if command is None:
            return []
        events: list[Event] = []
        self._tagged(events, command.tag, R.NO, AUTH_FAILED, code="AUTHENTICATIONFAILED",
                     error=True)
        return self._process(events)

    def work_done(self, outcome: "Outcome") -> list[Event]:
        """A MailboxWork finished; its output has been written."""
        command = self._answered(Wait.WORK)
        if command is None:
            return []
        events: list[Event] = []
        if outcome.fatal:
            self._transition(Trigger.LOGOUT)
            return [Close()]
        if outcome.bye is not None:
            return self._close(events, outcome.bye)
        if outcome.selected is not None:
            self.mailbox = outcome.selected
            self._transition(Trigger.SELECTED)
        elif outcome.unselect or (command.name in ("SELECT", "EXAMINE")
                                  and outcome.status != R.OK):
            self._unselect()
        if command is not self._idle:
            self._tagged(events, command.tag, outcome.status,
                         outcome.text or f"{command.name} completed", code=outcome.code,
                         error=outcome.status == R.BAD)
        if self._shutting_down:
            return self._close(events, BYE_SHUTDOWN)
        if self._idle is not None and self._poll_again:
            self._poll_again = False
            self._start_work(self._idle, "POLL", events)
            return events
        return self._process(events)

    def mailbox_changed(self) -> list[Event]:
        """While IDLE: the selected mailbox changed; report it (RFC 2177)."""
        if self._idle is None or self.state is not State.SELECTED:
            return []
        if self._waiting is Wait.WORK:
            self._poll_again = True
            return []
        events: list[Event] = []
        self._start_work(self._idle, "POLL", events)
        return events

    def timed_out(self) -> list[Event]:
        """Autologout (RFC 3501 §5.4)."""
        if self._waiting is Wait.TLS:
            return self._close_silently()
        return self._close([], BYE_TIMEOUT)

    def shutdown(self) -> list[Event]:
        """The server is stopping: BYE now, or once the answer in hand is given."""
        self._shutting_down = True
        if self._waiting is Wait.TLS:
            return self._close_silently()
        if self._waiting in (Wait.LOGIN, Wait.WORK):
            return []
        return self._close([], BYE_SHUTDOWN)

    # --- properties for the session ---------------------------------------------------

    @property
    def waiting(self) -> bool:
        """An answer from the session is due (login, mailbox work, TLS)."""
        return self._waiting in (Wait.LOGIN, Wait.WORK, Wait.TLS)

    @property
    def has_unread_commands(self) -> bool:
        """Input left over by max_commands_per_feed: call feed(b"") soon."""
        return self._more and self._waiting is None and self.state is not State.LOGOUT

    @property
    def idling(self) -> bool:
        return self._idle is not None

    # --- the command loop ---------------------------------------------------------------

    def _process(self, events: list[Event]) -> list[Event]:
        handled = 0
        self._more = False
        while self.state is not State.LOGOUT and self._waiting in (None, Wait.SASL):
            if self.max_commands_per_feed and handled >= self.max_commands_per_feed:
                self._more = True
                break
            event = self.parser.next_event()
            if event is P.Status.NEED_DATA:
                break
            if event is P.Status.PAUSED:      # after a refused AUTHENTICATE/IDLE/STARTTLS
                self.parser.resume()
                continue
            handled += 1
            self._handle(event, events)
        return events

    def _handle(self, event: P.Event, events: list[Event]) -> None:
        if isinstance(event, P.Line):
            if self._idle is not None:
                self._idle_line(event, events)
            else:
                self._sasl_line(event, events)
            return
        if isinstance(event, P.SendContinuation):
            self._continuation(event, events)
            return
        if isinstance(event, P.ParseError):
            events.append(Send(R.bad(event.tag, event.reason)))
            if event.fatal:
                self._close(events, BYE_CANNOT_CONTINUE)
                return
            self._count_error(events)
            return
        self.commands_done += 1
        spec = COMMANDS.get(event.name)
        if spec is None:
            self._tagged(events, event.tag, R.BAD, R.UNKNOWN_COMMAND, error=True)
            return
        if self.state not in spec.allowed:
            self._tagged(events, event.tag, R.BAD, self._wrong_state(spec), error=True)
            return
        spec.handler(self, event, events)

    def _wrong_state(self, spec: Command) -> str:
        if State.NOT_AUTHENTICATED in spec.allowed:
            return ALREADY_LOGGED_IN
        if self.state is State.NOT_AUTHENTICATED:
            return NOT_LOGGED_IN
        return NO_MAILBOX_SELECTED

    def _continuation(self, event: P.SendContinuation, events: list[Event]) -> None:
        """RFC 3501 §7.5: a literal is invited only for a command that can use it."""
        spec = COMMANDS.get(event.command)
        if event.command == "APPEND" and spec is not None and self.state in spec.allowed:
            self.parser.refuse_literal()
            self._tagged(events, event.tag, R.NO, CANNOT_APPEND, code=R.CANNOT)
        elif spec is None or self.state not in spec.allowed:
            self.parser.refuse_literal()
            self._tagged(events, event.tag, R.BAD,
                         R.UNKNOWN_COMMAND if spec is None else self._wrong_state(spec), error=True)
        else:
            events.append(Send(R.CONTINUE_LITERAL))

    # --- replies, errors, closing ---------------------------------------------------------

    def _capabilities(self) -> tuple[str, ...]:
        return R.capabilities(
            starttls=self.starttls_available and self.state is State.NOT_AUTHENTICATED,
            login_disabled=not self.plaintext_allowed,
            authenticated=self.state is not State.NOT_AUTHENTICATED)

    def _tagged(self, events: list[Event], tag: str, status: str, text: str,
                code: str | None = None, error: bool = False) -> None:
        events.append(Send(R.tagged(tag, status, text, code)))
        if error:
            self._count_error(events)

    def _count_error(self, events: list[Event]) -> None:
        # SPEC §5/§9: *more than* hard_error_limit errors closes the session.
        self.error_count += 1
        if self.error_count > self.hard_error_limit:
            self._close(events, BYE_TOO_MANY_ERRORS)

    def _close(self, events: list[Event], text: str) -> list[Event]:
        if self.state is State.LOGOUT:
            return events
        if self._idle is not None:
            self._idle = None
            events.append(IdleEnded())
        self._transition(Trigger.LOGOUT)
        self._waiting = None
        events.extend([Send(R.untagged(R.BYE, text)), Close()])
        return events

    def _close_silently(self) -> list[Event]:
        if self.state is State.LOGOUT:
            return []
        self._transition(Trigger.LOGOUT)
        self._waiting = None
        return [Close()]

    def _transition(self, trigger: Trigger) -> None:
        """The one place the state changes; a pair missing from TRANSITIONS is a bug."""
        try:
            self.state = TRANSITIONS[self.state, trigger]
        except KeyError:
            raise RuntimeError(f"IMAP protocol: {trigger.value} in state {self.state.value}"
                               ) from None

    def _answered(self, wait: Wait) -> P.Command | None:
        if self.state is State.LOGOUT:
            return None                      # closed meanwhile: a late answer is dropped
        if self._waiting is not wait:
            raise RuntimeError(f"IMAP protocol: answer for {wait.value} while waiting for "
                               f"{self._waiting.value if self._waiting else 'nothing'}")
        command, self._pending, self._waiting = self._pending, None, None
        assert command is not None
        return command

    def _wait(self, wait: Wait, command: P.Command) -> None:
        self._waiting = wait
        self._pending = command

    def _start_work(self, command: P.Command, work: str, events: list[Event],
                    args: object = None) -> None:
        assert self.user is not None
        self._wait(Wait.WORK, command)
        events.append(MailboxWork(work, self.user, self.mailbox, args, command.uid))

    def _unselect(self) -> None:
        if self.state is State.SELECTED:
            self._transition(Trigger.UNSELECTED)
        self.mailbox = None

    # --- any state (RFC 3501 §6.1) ----------------------------------------------------------

    def do_capability(self, command: P.Command, events: list[Event]) -> None:
        events.append(Send(R.capability_response(self._capabilities())))
        self._tagged(events, command.tag, R.OK, "Capability completed")

    def do_noop(self, command: P.Command, events: list[Event]) -> None:
        if self.state is State.SELECTED:
            return self._start_work(command, "POLL", events)
        self._tagged(events, command.tag, R.OK, "NOOP completed")

    def do_logout(self, command: P.Command, events: list[Event]) -> None:
        self._transition(Trigger.LOGOUT)
        events.extend([Send(R.untagged(R.BYE, BYE_LOGOUT)),
                       Send(R.tagged(command.tag, R.OK, "Logout completed")), Close()])

    # --- NOT AUTHENTICATED (RFC 3501 §6.2) --------------------------------------------------

    def do_starttls(self, command: P.Command, events: list[Event]) -> None:
        if not self.starttls_available:
            # SPEC §8: without a certificate (or with TLS on) STARTTLS is BAD.
            self._tagged(events, command.tag, R.BAD,
                         TLS_ACTIVE if self.tls else TLS_UNAVAILABLE, error=True)
            return
        self._wait(Wait.TLS, command)
        events.extend([Send(R.tagged(command.tag, R.OK, BEGIN_TLS)), StartTLS()])

    def _privacy_refused(self, command: P.Command, events: list[Event]) -> bool:
        if self.plaintext_allowed:
            return False
        self._tagged(events, command.tag, R.NO, PRIVACY_TLS if self.starttls_available
                     else PRIVACY, code=R.PRIVACYREQUIRED, error=True)
        return True

    def do_login(self, command: P.Command, events: list[Event]) -> None:
        if self._privacy_refused(command, events):
            return
        args: Login = command.args
        try:
            user = args.user.decode("utf-8")
            password = args.password.decode("utf-8")
        except UnicodeDecodeError:
            return self._tagged(events, command.tag, R.NO, AUTH_FAILED,
                                code="AUTHENTICATIONFAILED", error=True)
        if not _is_login_name(user):
            return self._tagged(events, command.tag, R.NO, AUTH_FAILED,
                                code="AUTHENTICATIONFAILED", error=True)
        self._wait(Wait.LOGIN, command)
        events.append(CheckLogin(user, password, "LOGIN"))

    def do_authenticate(self, command: P.Command, events: list[Event]) -> None:
        args: Authenticate = command.args
        if args.mechanism != "PLAIN":
            return self._tagged(events, command.tag, R.NO, UNSUPPORTED_MECHANISM, error=True)
        if self._privacy_refused(command, events):
            return                       # an initial response is not even looked at
        if args.initial_response is not None:
            self.parser.resume()
            return self._plain(command, args.initial_response, events)
        self._wait(Wait.SASL, command)
        self.parser.expect_line()
        events.append(Send(R.CONTINUE_SASL_EMPTY))

    def _sasl_line(self, line: P.Line, events: list[Event]) -> None:
        command, self._pending = self._pending, None
        self._waiting = None
        self.parser.resume()
        if command is None:              # cannot happen: lines come only when asked for
            return
        if line.too_long:
            return self._tagged(events, command.tag, R.BAD, R.LINE_TOO_LONG, error=True)
        response = P.decode_sasl_line(line.data)
        if response is P.SASL_CANCEL:
            return self._tagged(events, command.tag, R.BAD, R.SASL_CANCELLED, error=True)
        if response is None:
            return self._tagged(events, command.tag, R.BAD, R.SASL_BAD_RESPONSE, error=True)
        self._plain(command, response, events)

    def _plain(self, command: P.Command, response: bytes, events: list[Event]) -> None:
        """RFC 4616 §2: [authzid] NUL authcid NUL passwd, UTF-8."""
        parts = response.split(b"\0")
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except (ValueError, UnicodeDecodeError):
            return self._tagged(events, command.tag, R.NO, BAD_PLAIN, error=True)
        if not _is_login_name(authcid) or not password:
            return self._tagged(events, command.tag, R.NO, BAD_PLAIN, error=True)
        if authzid and authzid != authcid:
            return self._tagged(events, command.tag, R.NO, AUTHZID_REFUSED, error=True)
        self._wait(Wait.LOGIN, command)
        events.append(CheckLogin(authcid, password, "PLAIN"))

    # --- AUTHENTICATED (RFC 3501 §6.3) ------------------------------------------------------

    def do_select(self, command: P.Command, events: list[Event]) -> None:
        self._unselect()                 # RFC 3501 §6.3.1: the old one closes (no expunge)
        if command.args.mailbox != INBOX:
            return self._tagged(events, command.tag, R.NO, ONLY_INBOX, code=R.CANNOT)
        self._start_work(command, command.name, events)

    def do_create(self, command: P.Command, events: list[Event]) -> None:
        self._tagged(events, command.tag, R.NO, CANNOT_CREATE, code=R.CANNOT)

    def do_delete(self, command: P.Command, events: list[Event]) -> None:
        self._tagged(events, command.tag, R.NO, CANNOT_DELETE, code=R.CANNOT)

    def do_subscribe(self, command: P.Command, events: list[Event]) -> None:
        if command.args.mailbox != INBOX:
            return self._tagged(events, command.tag, R.NO, ONLY_INBOX, code=R.CANNOT)
        self._tagged(events, command.tag, R.OK, f"{command.name.capitalize()} completed")

    def do_list(self, command: P.Command, events: list[Event]) -> None:
        """RFC 3501 §6.3.8-9: only INBOX (no hierarchy), subscribed."""
        args: ListArgs = command.args
        lsub = command.name == "LSUB"
        if not args.pattern and not lsub:
            # The hierarchy delimiter and root name (RFC 3501 §6.3.8).
            events.append(Send(b'* LIST (\\Noselect) "/" ""\r\n'))
        elif _matches_inbox(args.reference, args.pattern):
            attributes = b"()" if lsub else b"(\\HasNoChildren)"
            events.append(Send(b"* %s %s \"/\" INBOX\r\n" % (command.name.encode(), attributes)))
        self._tagged(events, command.tag, R.OK, f"{command.name} completed")

    def do_status(self, command: P.Command, events: list[Event]) -> None:
        args: StatusArgs = command.args
        if args.mailbox != INBOX:
            return self._tagged(events, command.tag, R.NO, ONLY_INBOX, code=R.CANNOT)
        self._start_work(command, "STATUS", events, args.items)

    def do_append(self, command: P.Command, events: list[Event]) -> None:
        # Reached with a LITERAL+ literal, which the client sends without asking.
        self._tagged(events, command.tag, R.NO, CANNOT_APPEND, code=R.CANNOT)

    def do_namespace(self, command: P.Command, events: list[Event]) -> None:
        events.append(Send(b'* NAMESPACE (("" "/")) NIL NIL\r\n'))    # RFC 2342 §5
        self._tagged(events, command.tag, R.OK, "Namespace completed")

    def do_idle(self, command: P.Command, events: list[Event]) -> None:
        """RFC 2177: "+ idling", updates as they happen, until DONE."""
        self._idle = command
        self.parser.expect_line()
        events.append(Send(R.CONTINUE_IDLE))
        if self.state is State.SELECTED:
            events.append(IdleStarted(INBOX))
            self._start_work(command, "POLL", events)

    def _idle_line(self, line: P.Line, events: list[Event]) -> None:
        command, self._idle = self._idle, None
        self._poll_again = False
        self.parser.resume()
        events.append(IdleEnded())
        assert command is not None
        if line.too_long or not P.is_idle_done(line.data):
            return self._tagged(events, command.tag, R.BAD, R.IDLE_EXPECTED_DONE, error=True)
        self._tagged(events, command.tag, R.OK, "IDLE terminated")

    # --- SELECTED (RFC 3501 §6.4) -------------------------------------------------------------

    def do_mailbox_command(self, command: P.Command, events: list[Event]) -> None:
        """CHECK CLOSE EXPUNGE SEARCH FETCH STORE and their UID forms."""
        work = "POLL" if command.name == "CHECK" else command.name
        self._start_work(command, work, events, command.args)

    def do_copy(self, command: P.Command, events: list[Event]) -> None:
        self._tagged(events, command.tag, R.NO, CANNOT_COPY, code=R.CANNOT)


def _is_login_name(name: str) -> bool:
    """Printable, so that a user name never carries a control character into a log."""
    return bool(name) and name.isprintable() and len(name) <= 255


def _matches_inbox(reference: str, pattern: str) -> bool:
    """RFC 3501 §6.3.8: does reference+pattern (with * and %) name INBOX? INBOX is
    case-insensitive; nothing else exists."""
    full = reference + pattern
    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in full)
    return re.fullmatch(regex, INBOX, re.IGNORECASE) is not None


_ANY = frozenset({State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED})
_NOT_AUTH = frozenset({State.NOT_AUTHENTICATED})
_AUTH = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})
C = IMAPConnection
COMMANDS: dict[str, Command] = {
    "CAPABILITY": Command(C.do_capability, _ANY),
    "NOOP": Command(C.do_noop, _ANY),
    "LOGOUT": Command(C.do_logout, _ANY),
    "STARTTLS": Command(C.do_starttls, _NOT_AUTH),
    "LOGIN": Command(C.do_login, _NOT_AUTH),
    "AUTHENTICATE": Command(C.do_authenticate, _NOT_AUTH),
    "SELECT": Command(C.do_select, _AUTH),
    "EXAMINE": Command(C.do_select, _AUTH),
    "CREATE": Command(C.do_create, _AUTH),
    "DELETE": Command(C.do_delete, _AUTH),
    "RENAME": Command(C.do_delete, _AUTH),
    "SUBSCRIBE": Command(C.do_subscribe, _AUTH),
    "UNSUBSCRIBE": Command(C.do_subscribe, _AUTH),
    "LIST": Command(C.do_list, _AUTH),
    "LSUB": Command(C.do_list, _AUTH),
    "STATUS": Command(C.do_status, _AUTH),
    "APPEND": Command(C.do_append, _AUTH),
    "NAMESPACE": Command(C.do_namespace, _AUTH),
    "IDLE": Command(C.do_idle, _AUTH),
    "CHECK": Command(C.do_mailbox_command, _SELECTED),
    "CLOSE": Command(C.do_mailbox_command, _SELECTED),
    "EXPUNGE": Command(C.do_mailbox_command, _SELECTED),     # and UID EXPUNGE
    "SEARCH": Command(C.do_mailbox_command, _SELECTED),
    "FETCH": Command(C.do_mailbox_command, _SELECTED),
    "STORE": Command(C.do_mailbox_command, _SELECTED),
    "COPY": Command(C.do_copy, _SELECTED),
    # ENABLE and UNSELECT are parsed but not offered (response.OPTIONAL_CAPABILITIES):
    # they are unknown commands here.
}
del C
