"""Unit tests for the sans-IO POP3 state machine (prefork_smtp.pop3.protocol), SPEC §9.

No sockets: a small Client plays the session. It feeds each script to POP3Connection
whole or one byte at a time (every case runs in both modes, as h11's tests do), records
the replies and events in one transcript, and answers each event that waits for the
session (CheckLogin, OpenMaildrop, SendMessage, Commit) from a fixed user table and
mailbox, unless the test answers by hand to look at the waits.

Every reply is checked for RFC 1939 §3 / RFC 2449 shape, so each test also guards it.
The file ends with the dot-stuffing helper's tests and a Hypothesis fuzz.
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefork_smtp.pop3 import protocol as P
from prefork_smtp.pop3 import replies as R
from prefork_smtp.pop3.dot_stuffing import DotStuffer, dot_stuffed

USERS = {"alice": "secret", "bob": "pass word ", "busy": "x", "broken": "x"}
# (octets, uidl) per message, as the mail store hands them to maildrop_opened().
MAILBOX = [(120, "uid-1"), (250, "uid-2"), (75, "uid-3")]
TOTAL = 120 + 250 + 75
LOGIN = b"USER alice\r\nPASS secret\r\n"


# --- expected replies, named once -------------------------------------------------------

S_GREETING = bytes(R.GREETING)
S_OK = b"+OK\r\n"
S_LOGGED_IN = bytes(R.LOGGED_IN)
S_BYE = bytes(R.BYE)
S_BEGIN_TLS = bytes(R.BEGIN_TLS)
S_CONTINUE = R.SASL_CONTINUE
S_UNKNOWN = bytes(R.UNKNOWN_COMMAND)
S_NOT_LOGGED_IN = bytes(R.NOT_LOGGED_IN)
S_ALREADY = bytes(R.ALREADY_LOGGED_IN)
S_NO_SUCH = bytes(R.NO_SUCH_MESSAGE)
S_TOO_LONG = bytes(R.LINE_TOO_LONG)
S_BAD_BYTES = bytes(R.BAD_BYTES)
S_NOT_UTF8 = bytes(R.NOT_UTF8)
S_NO_USER = bytes(R.NO_USERNAME)
S_AUTH_FAILED = bytes(R.AUTH_FAILED)
S_AUTH_TEMP = bytes(R.AUTH_TEMP_FAILED)
S_PLAINTEXT = bytes(R.PLAINTEXT_DISALLOWED)
S_PLAINTEXT_STLS = bytes(R.PLAINTEXT_DISALLOWED_STLS)
S_IN_USE = bytes(R.IN_USE)
S_MAILDROP_FAILED = bytes(R.MAILDROP_FAILED)
S_COMMIT_FAILED = bytes(R.COMMIT_FAILED)
S_TOO_MANY = bytes(R.TOO_MANY_ERRORS)
S_TIMEOUT = bytes(R.TIMEOUT)
S_SHUTDOWN = bytes(R.SHUTTING_DOWN)
S_CANCELLED = bytes(R.AUTH_CANCELLED)
S_BAD_BASE64 = bytes(R.BAD_BASE64)
S_BAD_PLAIN = bytes(R.BAD_PLAIN)
S_AUTHZID = bytes(R.AUTHZID_REFUSED)
S_MECHANISM = bytes(R.UNSUPPORTED_MECHANISM)
S_TLS_ACTIVE = bytes(R.TLS_ACTIVE)
S_TLS_UNAVAILABLE = bytes(R.TLS_UNAVAILABLE)
S_STAT = f"+OK 3 {TOTAL}\r\n".encode()
S_LIST = f"+OK 3 messages ({TOTAL} octets)\r\n1 120\r\n2 250\r\n3 75\r\n.\r\n".encode()
S_UIDL = b"+OK\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
S_MECHANISMS = b"+OK\r\nPLAIN\r\n.\r\n"


def syntax(verb: str) -> bytes:
    return bytes(R.BAD_SYNTAX.fill(P.COMMANDS[verb].usage))


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


@pytest.mark.parametrize("reply, wire", [
    # Pins to the brief and SPEC §9: the texts a client (or a test of it) relies on.
    (R.GREETING, b"+OK ccsmtp POP3 ready\r\n"),
    (R.BYE, b"+OK Bye\r\n"),
    (R.LOGGED_IN, b"+OK Logged in.\r\n"),
    (R.BEGIN_TLS, b"+OK Begin TLS negotiation\r\n"),
    (R.AUTH_FAILED, b"-ERR [AUTH] Authentication failed.\r\n"),
    (R.COMMIT_FAILED, b"-ERR [SYS/TEMP] Some deleted messages not removed.\r\n"),
    (R.TIMEOUT, b"-ERR Disconnected for inactivity.\r\n"),
])
def test_reply_texts(reply, wire):
    assert bytes(reply) == wire


@pytest.mark.parametrize("reply, code", [
    # RFC 2449 §8.1.1 IN-USE; RFC 3206 §4 AUTH, §5 SYS/TEMP.
    (R.PLAINTEXT_DISALLOWED, "AUTH"), (R.PLAINTEXT_DISALLOWED_STLS, "AUTH"),
    (R.AUTH_FAILED, "AUTH"), (R.AUTHZID_REFUSED, "AUTH"), (R.IN_USE, "IN-USE"),
    (R.AUTH_TEMP_FAILED, "SYS/TEMP"), (R.MAILDROP_FAILED, "SYS/TEMP"),
    (R.COMMIT_FAILED, "SYS/TEMP"), (R.SHUTTING_DOWN, "SYS/TEMP"),
])
def test_response_codes(reply, code):
    assert reply.code == code and not reply.ok
    assert bytes(reply).startswith(f"-ERR [{code}] ".encode())


def test_every_reply_constant_is_one_short_line():
    for name, reply in vars(R).items():
        if isinstance(reply, R.Reply):
            data = bytes(reply)
            assert data.endswith(b"\r\n") and data.count(b"\n") == 1, name
            assert len(data) <= R.MAX_REPLY_LINE, name


def test_fill_refuses_text_that_is_not_printable_ascii():
    assert bytes(R.UIDL_ONE.fill(2, "a!~")) == b"+OK 2 a!~\r\n"
    with pytest.raises(ValueError):
        R.UIDL_ONE.fill(2, "a\r\n+OK")


# --- reply shape ------------------------------------------------------------------------

_STATUS_LINE = re.compile(rb"(\+OK|-ERR)( \[[A-Z/-]+\])?( [\x20-\x7e]+)?")


def check_reply(data: bytes) -> None:
    """RFC 1939 §3: one status line, or +OK, lines, '.'; RFC 5034 §4: '+ '."""
    if data == R.SASL_CONTINUE:
        return
    assert data.endswith(b"\r\n"), data
    lines = data[:-2].split(b"\r\n")
    assert _STATUS_LINE.fullmatch(lines[0]), f"malformed status line {lines[0]!r}"
    assert len(lines[0]) + 2 <= R.MAX_REPLY_LINE
    if len(lines) > 1:
        assert lines[0].startswith(b"+OK") and lines[-1] == b".", data
        for line in lines[1:-1]:
            assert b"\r" not in line and b"\n" not in line and b"\0" not in line, data
            assert not line.startswith(b".") or line.startswith(b".."), data


# --- the client harness -----------------------------------------------------------------

class Client:
    """Plays the session for one POP3Connection; `log` is the transcript: reply bytes
    and the other events, in order. With auto=True it answers every waiting event."""

    def __init__(self, mode: str = "whole", auto: bool = True, commit_ok: bool = True,
                 greet: bool = True, mailbox=MAILBOX, **params):
        settings_ = {"tls": False, "stls_available": True, "plaintext_allowed": True}
        settings_.update(params)
        self.conn = P.POP3Connection(**settings_)
        self.mode = mode
        self.auto = auto
        self.commit_ok = commit_ok
        self.mailbox = mailbox
        self.log: list = []
        self.closed = False
        self.tls_started = False
        if greet:
            self.take(self.conn.greeting())

    def send(self, data: bytes) -> list:
        """Feed data (whole or byte by byte); return what it produced."""
        start = len(self.log)
        chunks = [data] if self.mode == "whole" else [data[i:i + 1] for i in range(len(data))]
        for chunk in chunks:
            self.take(self.conn.feed(chunk))
            while self.conn.has_unread_commands:
                self.take(self.conn.feed(b""))
        return self.log[start:]

    def answer(self, method: str, *args) -> list:
        """Call a session method by hand; return what it produced."""
        start = len(self.log)
        self.take(getattr(self.conn, method)(*args))
        return self.log[start:]

    def take(self, events: list) -> None:
        for i, event in enumerate(events):
            assert not self.closed and not self.tls_started, f"{event!r} after the end"
            if isinstance(event, P.SendReply):
                check_reply(event.data)
                assert event.is_error == event.data.startswith(b"-ERR"), event
                self.log.append(event.data)
                continue
            self.log.append(event)
            # Events that hand over to the session come last: nothing happens until then.
            assert i == len(events) - 1, f"{event!r} is not the last event"
            if isinstance(event, P.CloseConnection):
                self.closed = True
                assert self.conn.state is P.State.CLOSED
            elif isinstance(event, P.StartTLS):
                self.tls_started = True
                assert self.conn.state is P.State.STARTING_TLS
            else:
                assert self.conn.waiting, event
                if isinstance(event, P.CheckLogin):
                    assert self.conn.plaintext_allowed, "a password was handed out"
                if self.auto:
                    self.take(self._auto_answer(event))

    def _auto_answer(self, event) -> list:
        conn = self.conn
        if isinstance(event, P.CheckLogin):
            if event.user == "tempfail":
                return conn.login_failed(P.LoginFailure.TEMPORARY)
            if USERS.get(event.user) == event.password:
                return conn.login_ok()
            return conn.login_failed()
        if isinstance(event, P.OpenMaildrop):
            if event.user == "busy":
                return conn.maildrop_failed(in_use=True)
            if event.user == "broken":
                return conn.maildrop_failed(in_use=False)
            return conn.maildrop_opened(self.mailbox)
        if isinstance(event, P.SendMessage):
            return conn.message_sent()
        if isinstance(event, P.Commit):
            return conn.committed() if self.commit_ok else conn.commit_failed()
        raise AssertionError(f"unknown event {event!r}")


MODES = ["whole", "bytewise"]


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


def logged_in(mode: str, **kw) -> Client:
    client = Client(mode, **kw)
    client.send(LOGIN)
    if not client.auto:
        client.answer("login_ok")
        client.answer("maildrop_opened", client.mailbox)
    assert client.log[-1] == S_LOGGED_IN
    return client


def held_bytes(conn: P.POP3Connection) -> int:
    """Octets of client input the connection keeps in memory, whatever the names."""
    return sum(len(v) for v in vars(conn).values() if isinstance(v, (bytes, bytearray)))


# --- greeting and CAPA ------------------------------------------------------------------

def test_greeting(mode):
    client = Client(mode)
    assert client.log == [S_GREETING]
    assert client.conn.state is P.State.AUTHORIZATION and not client.closed


BASE_CAPS = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
LOGIN_CAPS = ["USER", "SASL PLAIN"]


@pytest.mark.parametrize("tls, certificate, plaintext_allowed, extra", [
    # Plain TCP from afar: no password may come, so only STLS is offered (SPEC §9).
    (False, True, False, ["STLS"]),
    (False, False, False, []),
    # Plain TCP from loopback: passwords are allowed, STLS too when there is a certificate.
    (False, True, True, ["STLS"] + LOGIN_CAPS),
    (False, False, True, LOGIN_CAPS),
    # After STLS or on pop3s: never STLS again (RFC 2595 §4), even if the session says so.
    (True, True, True, LOGIN_CAPS),
    (True, False, True, LOGIN_CAPS),
])
def test_capa_in_authorization(mode, tls, certificate, plaintext_allowed, extra):
    client = Client(mode, tls=tls, stls_available=certificate and not tls,
                    plaintext_allowed=plaintext_allowed)
    expected = R.multiline(R.CAPABILITIES, BASE_CAPS + extra + ["IMPLEMENTATION ccsmtp"])
    assert client.send(b"CAPA\r\n") == [expected]


def test_capa_ignores_stls_available_when_tls_is_active(mode):
    client = Client(mode, tls=True, stls_available=True)
    [reply] = client.send(b"CAPA\r\n")
    assert b"\r\nSTLS\r\n" not in reply


@pytest.mark.parametrize("plaintext_allowed", [True, False])
def test_capa_in_transaction_offers_no_login_and_no_stls(mode, plaintext_allowed):
    client = logged_in(mode) if plaintext_allowed else None
    if client is None:   # a login over TLS from afar: a fresh object with tls=True
        client = logged_in(mode, tls=True, stls_available=False)
    expected = R.multiline(R.CAPABILITIES, BASE_CAPS + ["IMPLEMENTATION ccsmtp"])
    assert client.send(b"CAPA\r\n") == [expected]


def test_capa_exact_bytes(mode):
    # RFC 2449 §5: "+OK" line, one capability per line, "." line.
    client = Client(mode)
    assert client.send(b"capa\r\n") == [
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\nIMPLEMENTATION ccsmtp\r\n.\r\n"]


# --- every command in every state -------------------------------------------------------

EVERY_COMMAND = {
    # line: (reply in AUTHORIZATION, reply in TRANSACTION); None: tested elsewhere
    b"CAPA": (None, None),
    b"STLS": (None, S_ALREADY),
    b"USER alice": (S_OK, S_ALREADY),
    b"PASS secret": (S_NO_USER, S_ALREADY),
    b"AUTH": (S_MECHANISMS, S_ALREADY),
    b"AUTH PLAIN": (S_CONTINUE, S_ALREADY),
    b"QUIT": (S_BYE, S_BYE),
    b"STAT": (S_NOT_LOGGED_IN, S_STAT),
    b"LIST": (S_NOT_LOGGED_IN, S_LIST),
    b"LIST 2": (S_NOT_LOGGED_IN, b"+OK 2 250\r\n"),
    b"RETR 2": (S_NOT_LOGGED_IN, b"+OK 250 octets\r\n"),
    b"DELE 2": (S_NOT_LOGGED_IN, b"+OK Message 2 deleted.\r\n"),
    b"NOOP": (S_NOT_LOGGED_IN, S_OK),
    b"RSET": (S_NOT_LOGGED_IN, S_OK),
    b"TOP 2 5": (S_NOT_LOGGED_IN, S_OK),
    b"UIDL": (S_NOT_LOGGED_IN, S_UIDL),
    b"UIDL 3": (S_NOT_LOGGED_IN, b"+OK 3 uid-3\r\n"),
    b"APOP alice 0123456789abcdef0123456789abcdef": (S_UNKNOWN, S_UNKNOWN),   # no APOP
    b"XTND XMIT": (S_UNKNOWN, S_UNKNOWN),
    b"": (S_UNKNOWN, S_UNKNOWN),
}
AFTER_REPLY = {   # events that follow the reply in TRANSACTION
    b"RETR 2": [P.SendMessage(2, None)],
    b"TOP 2 5": [P.SendMessage(2, 5)],
    b"QUIT": [P.CloseConnection()],
}


@pytest.mark.parametrize("line", [k for k, v in EVERY_COMMAND.items() if v[0]])
def test_every_command_in_authorization(mode, line):
    client = Client(mode)
    expected = [EVERY_COMMAND[line][0]] + ([P.CloseConnection()] if line == b"QUIT" else [])
    assert client.send(line + b"\r\n") == expected


@pytest.mark.parametrize("line", [k for k, v in EVERY_COMMAND.items() if v[1]])
def test_every_command_in_transaction(mode, line):
    client = logged_in(mode)
    expected = [EVERY_COMMAND[line][1]] + AFTER_REPLY.get(line, [])
    assert client.send(line + b"\r\n") == expected


@pytest.mark.parametrize("line", [b"stat", b"Stat", b"sTaT"])
def test_commands_are_case_insensitive(mode, line):
    assert logged_in(mode).send(line + b"\r\n") == [S_STAT]


def test_bare_lf_ends_a_command_too(mode):
    assert logged_in(mode).send(b"STAT\nNOOP\r\n") == [S_STAT, S_OK]


@pytest.mark.parametrize("line, expected", [
    # Message numbers: RFC 1939 §3/§5, decided in the module docstring of _is_number.
    (b"LIST 0", [S_NO_SUCH]),
    (b"LIST 4", [S_NO_SUCH]),
    (b"RETR 99999999999999999999", [S_NO_SUCH]),
    (b"RETR " + b"9" * 240, [S_NO_SUCH]),
    (b"RETR 01", [b"+OK 120 octets\r\n", P.SendMessage(1, None)]),   # leading zeros: fine
    (b"RETR 0003", [b"+OK 75 octets\r\n", P.SendMessage(3, None)]),
    (b"RETR -1", [syntax("RETR")]),
    (b"RETR +1", [syntax("RETR")]),
    (b"RETR 1.0", [syntax("RETR")]),
    (b"RETR x", [syntax("RETR")]),
    ("RETR \u00b2".encode(), [syntax("RETR")]),          # '²'.isdigit() is True
    ("RETR \u0661".encode(), [syntax("RETR")]),          # ARABIC-INDIC DIGIT ONE
    (b"RETR", [syntax("RETR")]),
    (b"RETR 1 2", [syntax("RETR")]),
    (b"RETR  1", [b"+OK 120 octets\r\n", P.SendMessage(1, None)]),  # extra spaces tolerated
    (b"RETR 1 ", [b"+OK 120 octets\r\n", P.SendMessage(1, None)]),
    (b"RETR\t1", [S_UNKNOWN]),
    (b"TOP 1", [syntax("TOP")]),
    (b"TOP 1 -1", [syntax("TOP")]),
    (b"TOP 1 x", [syntax("TOP")]),
    (b"TOP 0 1", [S_NO_SUCH]),
    (b"TOP 1 0", [S_OK, P.SendMessage(1, 0)]),
    (b"TOP 1 99999999999999999999", [S_OK, P.SendMessage(1, P.MAX_TOP_LINES)]),
    (b"DELE", [syntax("DELE")]),
    (b"DELE 0", [S_NO_SUCH]),
    (b"DELE 4", [S_NO_SUCH]),
    (b"LIST 1 2", [syntax("LIST")]),
    (b"LIST x", [syntax("LIST")]),
    (b"UIDL 0", [S_NO_SUCH]),
    (b"UIDL -3", [syntax("UIDL")]),
    (b"STAT 1", [syntax("STAT")]),
    (b"NOOP x", [syntax("NOOP")]),
    (b"RSET x", [syntax("RSET")]),
    (b"CAPA x", [syntax("CAPA")]),
    (b"QUIT now", [syntax("QUIT")]),
])
def test_arguments_in_transaction(mode, line, expected):
    assert logged_in(mode).send(line + b"\r\n") == expected


@pytest.mark.parametrize("line, expected", [
    (b"USER", syntax("USER")),
    (b"USER a b", syntax("USER")),
    ("USER al\u0007ice".encode(), syntax("USER")),     # no control characters in a name
    (b"PASS", S_NO_USER),
    (b"AUTH PLAIN a b", syntax("AUTH")),
    (b"AUTH CRAM-MD5", S_MECHANISM),
    (b"AUTH LOGIN", S_MECHANISM),
    (b"STLS now", syntax("STLS")),
])
def test_arguments_in_authorization(mode, line, expected):
    assert Client(mode).send(line + b"\r\n") == [expected]


# --- USER / PASS ------------------------------------------------------------------------

def test_user_pass_happy_path(mode):
    client = Client(mode)
    assert client.send(LOGIN) == [
        S_OK, P.CheckLogin("alice", "secret", "USER"), P.OpenMaildrop("alice"), S_LOGGED_IN]
    assert client.conn.state is P.State.TRANSACTION and client.conn.user == "alice"


def test_pass_keeps_spaces_in_the_password(mode):
    # RFC 1939 §7: "a POP3 server may treat spaces in the argument as part of the password".
    client = Client(mode)
    assert client.send(b"USER bob\r\nPASS pass word \r\n")[:2] == [
        S_OK, P.CheckLogin("bob", "pass word ", "USER")]
    assert client.log[-1] == S_LOGGED_IN


def test_pass_must_follow_user_immediately(mode):
    # RFC 1939 §7: PASS "may only be given ... immediately after a successful USER".
    client = Client(mode)
    assert client.send(b"USER alice\r\nCAPA\r\nPASS secret\r\n")[-1] == S_NO_USER
    assert client.send(b"USER alice\r\nXYZZY\r\nPASS secret\r\n")[-1] == S_NO_USER
    assert client.send(b"USER alice\r\n" + b"x" * 300 + b"\r\nPASS secret\r\n")[-1] == S_NO_USER
    assert client.send(b"USER bob\r\nUSER alice\r\nPASS secret\r\n")[-1] == S_LOGGED_IN


@pytest.mark.parametrize("script", [
    b"USER alice\r\nPASS wrong\r\n",
    b"USER nobody\r\nPASS secret\r\n",
    b"AUTH PLAIN " + plain("", "alice", "wrong").encode() + b"\r\n",
])
def test_failed_login_has_one_wording_and_stays_in_authorization(mode, script):
    client = Client(mode)
    out = client.send(script)
    assert out[-1] == S_AUTH_FAILED and isinstance(out[-2], P.CheckLogin)
    assert client.conn.state is P.State.AUTHORIZATION and client.conn.error_count == 1
    # The name is forgotten: PASS alone does not try again.
    assert client.send(b"PASS secret\r\n") == [S_NO_USER]
    assert client.send(LOGIN)[-1] == S_LOGGED_IN


def test_login_ok_may_name_the_normalised_user(mode):
    client = Client(mode, auto=False)
    assert client.send(b"USER Alice@Example.ORG\r\nPASS secret\r\n") == [
        S_OK, P.CheckLogin("Alice@Example.ORG", "secret", "USER")]
    assert client.answer("login_ok", "alice") == [P.OpenMaildrop("alice")]
    assert client.answer("maildrop_opened", MAILBOX) == [S_LOGGED_IN]
    assert client.conn.user == "alice"


def test_plus_ok_only_once_the_maildrop_is_open(mode):
    # RFC 1939 §4: the +OK to PASS means the maildrop is locked and open.
    client = Client(mode, auto=False)
    client.send(LOGIN)
    assert client.conn.state is P.State.CHECKING_LOGIN and client.log[-1] == P.CheckLogin(
        "alice", "secret", "USER")
    assert client.answer("login_ok") == [P.OpenMaildrop("alice")]
    assert client.conn.state is P.State.OPENING_MAILDROP
    assert S_LOGGED_IN not in client.log
    assert client.answer("maildrop_opened", MAILBOX) == [S_LOGGED_IN]


def test_temporary_login_failure_does_not_count(mode):
    client = Client(mode)
    assert client.send(b"USER tempfail\r\nPASS x\r\n")[-1] == S_AUTH_TEMP
    assert client.conn.error_count == 0 and client.conn.state is P.State.AUTHORIZATION


def test_mailbox_in_use(mode):
    # SPEC §9: one POP3 session per mailbox, -ERR [IN-USE] at once; stay in AUTHORIZATION.
    client = Client(mode)
    assert client.send(b"USER busy\r\nPASS x\r\n") == [
        S_OK, P.CheckLogin("busy", "x", "USER"), P.OpenMaildrop("busy"), S_IN_USE]
    assert client.conn.state is P.State.AUTHORIZATION and client.conn.user is None
    assert client.conn.error_count == 0          # not the client's fault
    assert client.send(b"STAT\r\n") == [S_NOT_LOGGED_IN]
    assert client.send(LOGIN)[-1] == S_LOGGED_IN


def test_mailbox_cannot_be_opened(mode):
    client = Client(mode)
    assert client.send(b"USER broken\r\nPASS x\r\n")[-1] == S_MAILDROP_FAILED
    assert client.conn.state is P.State.AUTHORIZATION and client.conn.error_count == 0


def test_password_is_not_in_the_repr():
    event = P.CheckLogin("alice", "hunter2", "USER")
    assert "hunter2" not in repr(event) and "alice" in repr(event)


# --- plaintext logins refused ---------------------------------------------------------

@pytest.mark.parametrize("stls_available, refusal", [(True, S_PLAINTEXT_STLS),
                                                       (False, S_PLAINTEXT)])
@pytest.mark.parametrize("script, replies", [
    (b"USER alice\r\n", 1),
    (b"USER alice\r\nPASS secret\r\n", 2),
    (b"PASS secret\r\n", 1),
    (b"AUTH PLAIN " + plain("", "alice", "secret").encode() + b"\r\n", 1),
    (b"auth plain " + plain("alice", "alice", "secret").encode() + b"\r\n", 1),
    (b"AUTH PLAIN =\r\n", 1),
    (b"AUTH PLAIN !!!\r\n", 1),
])
def test_plaintext_login_refused_without_handing_out_the_password(
        mode, stls_available, refusal, script, replies):
    # SPEC §9: no TLS and not loopback: -ERR [AUTH], the password never checked.
    client = Client(mode, plaintext_allowed=False, stls_available=stls_available)
    out = client.send(script)
    assert out == [refusal] * replies
    assert client.conn.error_count == replies          # each counts as an error
    assert client.conn.state is P.State.AUTHORIZATION


def test_plaintext_refused_auth_sends_no_continuation(mode):
    # Without '+ ' the next line is a command, not a response to decode.
    client = Client(mode, plaintext_allowed=False)
    response = plain("", "alice", "secret").encode()
    assert client.send(b"AUTH PLAIN\r\n" + response + b"\r\n") == [S_PLAINTEXT_STLS, S_UNKNOWN]
    assert client.send(b"AUTH\r\n") == [b"+OK\r\n.\r\n"]     # no mechanism on offer


# --- AUTH PLAIN (RFC 5034, RFC 4616) -----------------------------------------------------

def test_auth_plain_with_initial_response(mode):
    client = Client(mode)
    assert client.send(b"AUTH PLAIN " + plain("", "alice", "secret").encode() + b"\r\n") == [
        P.CheckLogin("alice", "secret", "PLAIN"), P.OpenMaildrop("alice"), S_LOGGED_IN]


def test_auth_plain_with_continuation(mode):
    client = Client(mode)
    assert client.send(b"AUTH PLAIN\r\n") == [S_CONTINUE]
    assert client.conn.state is P.State.SASL_RESPONSE
    assert client.send(plain("", "alice", "secret").encode() + b"\r\n") == [
        P.CheckLogin("alice", "secret", "PLAIN"), P.OpenMaildrop("alice"), S_LOGGED_IN]


def test_auth_plain_mechanism_name_is_case_insensitive(mode):
    client = Client(mode)
    out = client.send(b"auth plain " + plain("", "alice", "secret").encode() + b"\r\n")
    assert out[-1] == S_LOGGED_IN


def test_auth_plain_pipelined_with_its_response_and_more(mode):
    client = Client(mode)
    script = b"AUTH PLAIN\r\n" + plain("", "alice", "secret").encode() + b"\r\nSTAT\r\n"
    assert client.send(script) == [
        S_CONTINUE, P.CheckLogin("alice", "secret", "PLAIN"), P.OpenMaildrop("alice"),
        S_LOGGED_IN, S_STAT]


@pytest.mark.parametrize("authzid, ok", [("", True), ("alice", True), ("bob", False),
                                          ("Alice", False)])
def test_auth_plain_authzid(mode, authzid, ok):
    # RFC 4616 §2: acting for another identity is refused; the same one is fine.
    client = Client(mode)
    out = client.send(b"AUTH PLAIN " + plain(authzid, "alice", "secret").encode() + b"\r\n")
    assert out == ([P.CheckLogin("alice", "secret", "PLAIN"), P.OpenMaildrop("alice"),
                    S_LOGGED_IN] if ok else [S_AUTHZID])


@pytest.mark.parametrize("response, reply", [
    (b"*", S_CANCELLED),                                    # RFC 5034 §4: cancel
    (b"=", S_BAD_PLAIN),                                    # present but empty
    (b"", S_BAD_PLAIN),
    (b"!!!!", S_BAD_BASE64),
    (b"YWxpY2U", S_BAD_BASE64),                             # missing padding
    (b"YWxp Y2U=", S_BAD_BASE64),
    (b"YWxpY2U=YQ==", S_BAD_BASE64),                        # data after padding
    (b"AGFsaWNlAHNlY3JldA==\0", S_BAD_BASE64),
    (base64.b64encode(b"alice"), S_BAD_PLAIN),              # no NULs
    (base64.b64encode(b"\0alice"), S_BAD_PLAIN),
    (base64.b64encode(b"\0alice\0"), S_BAD_PLAIN),          # empty password
    (base64.b64encode(b"\0\0secret"), S_BAD_PLAIN),         # empty user
    (base64.b64encode(b"a\0alice\0secret\0x"), S_BAD_PLAIN),
    (base64.b64encode(b"\0al\xffice\0secret"), S_BAD_PLAIN),  # not UTF-8
    (base64.b64encode(b"\0al\nice\0secret"), S_BAD_PLAIN),    # no control characters
    (base64.b64encode(b"\0al ice\0secret"), S_BAD_PLAIN),
])
def test_bad_sasl_responses(mode, response, reply):
    scripts = [(b"AUTH PLAIN\r\n" + response + b"\r\n", reply)]
    if response not in (b"", b"*"):       # as an initial response too
        scripts.append((b"AUTH PLAIN " + response + b"\r\n",
                        syntax("AUTH") if b" " in response
                        else S_BAD_BYTES if b"\0" in response else reply))
    for script, expected in scripts:
        client = Client(mode)
        out = client.send(script)
        assert out[-1] == expected and not any(isinstance(e, P.CheckLogin) for e in out)
        assert client.conn.state is P.State.AUTHORIZATION and client.conn.error_count == 1
        assert client.send(b"CAPA\r\n")[0].startswith(b"+OK Capability")


def test_utf8_name_and_password(mode):
    client = Client(mode, auto=False)
    response = plain("", "jörg", "pässwörd €").encode()
    assert client.send(b"AUTH PLAIN " + response + b"\r\n") == [
        P.CheckLogin("jörg", "pässwörd €", "PLAIN")]


def test_longest_plain_response_fits_on_the_auth_line_and_the_continuation(mode):
    # RFC 4616 §2: 255 octets each for authzid, authcid and passwd.
    name, password = "a" * 255, "p" * 255
    response = plain(name, name, password).encode()
    assert len(response) == P.MAX_PLAIN_BASE64 == 1024
    line = b"AUTH PLAIN " + response + b"\r\n"
    assert len(line) == P.MAX_AUTH_LINE
    client = Client(mode, auto=False)
    assert client.send(line) == [P.CheckLogin(name, password, "PLAIN")]
    client = Client(mode, auto=False)
    assert client.send(b"AUTH PLAIN\r\n" + response + b"\r\n") == [
        S_CONTINUE, P.CheckLogin(name, password, "PLAIN")]


def test_auth_lines_past_the_limit(mode):
    client = Client(mode, auto=False)
    too_long = b"AUTH PLAIN " + b"A" * (P.MAX_PLAIN_BASE64 + 4) + b"\r\n"
    assert client.send(too_long) == [S_TOO_LONG]
    assert client.send(b"AUTH PLAIN\r\n" + b"A" * (P.MAX_AUTH_LINE + 1) + b"\r\n") == [
        S_CONTINUE, S_TOO_LONG]
    assert client.conn.state is P.State.AUTHORIZATION
    assert client.send(b"CAPA\r\n")[0].startswith(b"+OK Capability")


# --- failed logins and the hard error limit --------------------------------------------

def test_failed_logins_up_to_the_hard_limit(mode):
    # SPEC §9: failed logins count toward hard_error_limit; *more than* it closes.
    client = Client(mode, hard_error_limit=2)
    bad = b"USER alice\r\nPASS wrong\r\n"
    assert client.send(bad)[-1] == S_AUTH_FAILED
    assert client.send(bad)[-1] == S_AUTH_FAILED
    assert client.send(bad)[-3:] == [S_AUTH_FAILED, S_TOO_MANY, P.CloseConnection()]
    assert client.conn.feed(LOGIN) == []


def test_error_limit_on_pipelined_bad_commands_stops_at_once(mode):
    client = Client(mode, hard_error_limit=3)
    out = client.send(b"FOO\r\n" * 4 + LOGIN)
    assert out == [S_UNKNOWN] * 4 + [S_TOO_MANY, P.CloseConnection()]


def test_login_resets_the_error_count(mode):
    client = Client(mode, hard_error_limit=3)
    client.send(b"FOO\r\nFOO\r\nUSER alice\r\nPASS wrong\r\n")
    assert client.conn.error_count == 3
    client.send(LOGIN)
    assert client.conn.error_count == 0
    assert client.send(b"LIST 9\r\n" * 3) == [S_NO_SUCH] * 3 and not client.closed


def test_server_side_failures_do_not_count(mode):
    client = Client(mode, hard_error_limit=1)
    for _ in range(3):
        assert client.send(b"USER busy\r\nPASS x\r\n")[-1] == S_IN_USE
        assert client.send(b"USER tempfail\r\nPASS x\r\n")[-1] == S_AUTH_TEMP
    assert not client.closed and client.conn.error_count == 0


# --- pipelining and the waits -----------------------------------------------------------

def test_pipelined_session_waits_for_each_answer_in_order(mode):
    # RFC 2449 §6.6: pipelined commands are answered in order; each wait holds the rest.
    client = Client(mode, auto=False)
    script = LOGIN + b"STAT\r\nRETR 1\r\nDELE 1\r\nTOP 2 3\r\nLIST\r\nQUIT\r\nNOOP\r\n"
    assert client.send(script) == [S_OK, P.CheckLogin("alice", "secret", "USER")]
    assert client.conn.waiting and not client.conn.has_unread_commands
    assert client.answer("login_ok") == [P.OpenMaildrop("alice")]
    assert client.answer("maildrop_opened", MAILBOX) == [
        S_LOGGED_IN, S_STAT, b"+OK 120 octets\r\n", P.SendMessage(1, None)]
    assert client.conn.state is P.State.SENDING
    assert client.answer("message_sent") == [
        b"+OK Message 1 deleted.\r\n", S_OK, P.SendMessage(2, 3)]
    assert client.answer("message_sent") == [
        f"+OK 2 messages ({TOTAL - 120} octets)\r\n2 250\r\n3 75\r\n.\r\n".encode(),
        P.Commit((1,))]
    assert client.conn.state is P.State.UPDATE
    assert client.answer("committed") == [S_BYE, P.CloseConnection()]
    # NOOP after QUIT was never executed.


def test_input_arriving_during_a_wait_is_kept_for_later(mode):
    client = logged_in(mode, auto=False)
    assert client.send(b"RETR 2\r\nST") == [b"+OK 250 octets\r\n", P.SendMessage(2, None)]
    assert client.send(b"AT\r\nNOOP\r\n") == []       # held while the message is sent
    assert client.conn.unprocessed == b"STAT\r\nNOOP\r\n"
    assert client.answer("message_sent") == [S_STAT, S_OK]


def test_max_commands_per_feed(mode):
    client = logged_in(mode, max_commands_per_feed=2)
    conn = client.conn
    events = conn.feed(b"NOOP\r\n" * 5)
    assert [e.data for e in events] == [S_OK] * 2 and conn.has_unread_commands
    assert len(conn.feed(b"")) == 2 and conn.has_unread_commands
    assert len(conn.feed(b"")) == 1 and not conn.has_unread_commands
    assert conn.commands_done == 2 + 5


def test_waiting_property():
    client = Client(auto=False)
    assert not client.conn.waiting
    client.send(LOGIN)
    assert client.conn.waiting
    client.answer("login_ok")
    assert client.conn.waiting
    client.answer("maildrop_opened", MAILBOX)
    assert not client.conn.waiting


# --- STLS (RFC 2595; SPEC §8) ---------------------------------------------------------

def test_stls_stops_reading_and_exposes_what_came_after(mode):
    client = Client(mode, plaintext_allowed=False)
    injected = b"USER alice\r\nPASS secret\r\nCAPA\r\n"
    assert client.send(b"STLS\r\n" + injected) == [S_BEGIN_TLS, P.StartTLS()]
    # CVE-2011-0411 class: never executed, handed to the session to discard and log.
    assert client.conn.unprocessed == injected
    assert client.conn.feed(b"NOOP\r\n") == []
    assert client.conn.unprocessed == injected + b"NOOP\r\n"
    assert not client.conn.has_unread_commands and not client.conn.waiting


def test_stls_alone_leaves_nothing_unprocessed(mode):
    client = Client(mode)
    assert client.send(b"stls\r\n") == [S_BEGIN_TLS, P.StartTLS()]
    assert client.conn.unprocessed == b""


def test_after_stls_a_new_object_with_tls(mode):
    # RFC 2595 §4: no new greeting; STLS is not offered again; everything is forgotten.
    client = Client(mode, greet=False, tls=True, stls_available=False)
    assert client.log == []
    assert client.send(b"STLS\r\n") == [S_TLS_ACTIVE]
    assert client.send(LOGIN)[-1] == S_LOGGED_IN


@pytest.mark.parametrize("params, script, reply", [
    ({"stls_available": False}, b"STLS\r\n", S_TLS_UNAVAILABLE),       # no certificate
    ({"tls": True, "stls_available": True}, b"STLS\r\n", S_TLS_ACTIVE),
    ({}, LOGIN + b"STLS\r\n", S_ALREADY),                              # RFC 2595 §4
])
def test_stls_refused(mode, params, script, reply):
    client = Client(mode, **params)
    assert client.send(script)[-1] == reply
    assert not client.tls_started


def test_stls_after_user_forgets_the_user(mode):
    client = Client(mode)
    assert client.send(b"USER alice\r\nSTLS\r\nPASS secret\r\n") == [
        S_OK, S_BEGIN_TLS, P.StartTLS()]
    assert client.conn.unprocessed == b"PASS secret\r\n"


# --- TRANSACTION: sizes, deletions, RSET ------------------------------------------------

def test_deleted_messages_are_invisible(mode):
    client = logged_in(mode)
    assert client.send(b"DELE 2\r\n") == [b"+OK Message 2 deleted.\r\n"]
    for line in (b"LIST 2", b"RETR 2", b"TOP 2 0", b"UIDL 2"):
        assert client.send(line + b"\r\n") == [S_NO_SUCH], line
    assert client.send(b"DELE 2\r\n") == [bytes(R.ALREADY_DELETED.fill(2))]
    assert client.send(b"STAT\r\n") == [f"+OK 2 {120 + 75}\r\n".encode()]
    assert client.send(b"LIST\r\n") == [
        f"+OK 2 messages ({120 + 75} octets)\r\n1 120\r\n3 75\r\n.\r\n".encode()]
    assert client.send(b"UIDL\r\n") == [b"+OK\r\n1 uid-1\r\n3 uid-3\r\n.\r\n"]
    # Numbers do not shift: message 3 is still 3.
    assert client.send(b"RETR 3\r\n") == [b"+OK 75 octets\r\n", P.SendMessage(3, None)]


def test_rset_undeletes(mode):
    client = logged_in(mode)
    client.send(b"DELE 1\r\nDELE 3\r\n")
    assert client.send(b"RSET\r\nSTAT\r\nLIST\r\n") == [S_OK, S_STAT, S_LIST]
    assert client.send(b"QUIT\r\n") == [S_BYE, P.CloseConnection()]   # nothing to commit


def test_empty_maildrop(mode):
    client = logged_in(mode, mailbox=[])
    assert client.send(b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nLIST 1\r\n") == [
        b"+OK 0 0\r\n", b"+OK 0 messages (0 octets)\r\n.\r\n", b"+OK\r\n.\r\n",
        S_NO_SUCH, S_NO_SUCH]


@pytest.mark.parametrize("bad", [
    [(-1, "a")], [(1, "")], [(1, "a" * 71)], [(1, "a b")], [(1, "a\r\n")],
    [(1, "ä")], [(1, "a"), (2, "a")], [(True, "a")], [(1.5, "a")],
])
def test_a_bad_snapshot_is_refused(bad):
    client = Client(auto=False)
    client.send(LOGIN)
    client.answer("login_ok")
    with pytest.raises(ValueError):
        client.conn.maildrop_opened(bad)


def test_uidl_at_the_limits(mode):
    uidls = ["!" * 70, "~", "0"]
    client = logged_in(mode, mailbox=[(1, u) for u in uidls])
    assert client.send(b"UIDL\r\n") == [R.multiline(R.UIDL_ALL, [
        f"{n} {u}" for n, u in enumerate(uidls, 1)])]


# --- QUIT and UPDATE (RFC 1939 §6) --------------------------------------------------------

def test_quit_with_deletions_commits(mode):
    client = logged_in(mode, auto=False)
    assert client.send(b"DELE 3\r\nDELE 1\r\nQUIT\r\nSTAT\r\n")[-1] == P.Commit((1, 3))
    assert client.answer("committed") == [S_BYE, P.CloseConnection()]


def test_quit_when_the_commit_fails(mode):
    client = logged_in(mode, commit_ok=False)
    assert client.send(b"DELE 2\r\nQUIT\r\n")[-3:] == [
        P.Commit((2,)), S_COMMIT_FAILED, P.CloseConnection()]


def test_quit_without_deletions_skips_the_commit(mode):
    client = logged_in(mode)
    assert client.send(b"QUIT\r\n") == [S_BYE, P.CloseConnection()]


def test_quit_in_authorization(mode):
    client = Client(mode)
    assert client.send(b"USER alice\r\nQUIT\r\nPASS secret\r\n") == [
        S_OK, S_BYE, P.CloseConnection()]


@pytest.mark.parametrize("end", ["timed_out", "shutdown"])
def test_no_commit_without_quit(mode, end):
    # RFC 1939 §3/§6: a session that ends any other way deletes nothing.
    client = logged_in(mode)
    client.send(b"DELE 1\r\nDELE 2\r\n")
    out = client.answer(end)
    assert out == [S_TIMEOUT if end == "timed_out" else S_SHUTDOWN, P.CloseConnection()]
    assert not any(isinstance(e, P.Commit) for e in client.log)


# --- line limits and bad bytes --------------------------------------------------------

@pytest.mark.parametrize("make, limit, reply", [
    # Each verb's limit holds in any state; TRANSACTION answers PASS and AUTH by state.
    (lambda n: b"NOOP" + b" " * (n - 6) + b"\r\n", P.MAX_COMMAND_LINE, S_OK),
    (lambda n: b"PASS " + b"x" * (n - 7) + b"\r\n", P.MAX_PASS_LINE, S_ALREADY),
    (lambda n: b"AUTH " + b"x" * (n - 7) + b"\r\n", P.MAX_AUTH_LINE, S_ALREADY),
])
def test_line_limits_count_the_crlf(mode, make, limit, reply):
    client = logged_in(mode)
    assert len(make(limit)) == limit
    assert client.send(make(limit)) == [reply]
    assert client.send(make(limit + 1)) == [S_TOO_LONG]
    # A bare LF ending counts as if it were CRLF.
    assert client.send(make(limit)[:-2] + b"\n") == [reply]
    assert client.send(make(limit + 1)[:-2] + b"\n") == [S_TOO_LONG]
    assert client.conn.error_count == 2 + 2 * (reply is not S_OK)


def test_pass_with_a_255_octet_password(mode):
    client = Client(mode, auto=False)
    assert client.send(b"USER alice\r\nPASS " + b"p" * 255 + b"\r\n") == [
        S_OK, P.CheckLogin("alice", "p" * 255, "USER")]


@pytest.mark.parametrize("prefix, limit", [(b"", P.MAX_COMMAND_LINE),
                                           (b"AUTH PLAIN ", P.MAX_AUTH_LINE),
                                           (b"PASS ", P.MAX_PASS_LINE)])
def test_memory_stays_bounded_on_an_endless_line(prefix, limit):
    client = logged_in("whole") if not prefix else Client()
    conn = client.conn
    conn.feed(prefix)
    for _ in range(200):
        assert conn.feed(b"A" * 997) == []
        assert held_bytes(conn) <= limit
    assert [e.data for e in conn.feed(b"\r\n")] == [S_TOO_LONG]
    assert [e.data for e in conn.feed(b"CAPA\r\n")][0].startswith(b"+OK Capability")


@pytest.mark.parametrize("line, reply", [
    (b"NO\0OP", S_BAD_BYTES),
    (b"NOOP\0", S_BAD_BYTES),
    (b"NOOP\rx", S_BAD_BYTES),
    (b"NOOP\r\r", S_BAD_BYTES),
    (b"\xff\xfe", S_NOT_UTF8),
    (b"NOOP \xc3", S_NOT_UTF8),
    (b"N\xc3\xb6OP", S_UNKNOWN),
    (b" NOOP", S_UNKNOWN),
])
def test_bad_bytes_in_commands(mode, line, reply):
    client = logged_in(mode)
    assert client.send(line + b"\r\nNOOP\r\n") == [reply, S_OK]
    assert client.conn.error_count == 1


def test_pass_with_nul_is_refused_without_an_event(mode):
    client = Client(mode)
    assert client.send(b"USER alice\r\nPASS sec\0ret\r\n") == [S_OK, S_BAD_BYTES]


# --- timeout, shutdown, late and misplaced answers -----------------------------------

@pytest.mark.parametrize("logged", [False, True])
def test_timed_out(mode, logged):
    client = logged_in(mode) if logged else Client(mode)
    assert client.answer("timed_out") == [S_TIMEOUT, P.CloseConnection()]
    assert client.conn.feed(b"NOOP\r\n") == [] and client.conn.timed_out() == []


def test_timed_out_while_sending_says_nothing(mode):
    # A line now would land inside the multi-line response.
    client = logged_in(mode, auto=False)
    client.send(b"RETR 1\r\n")
    assert client.answer("timed_out") == [P.CloseConnection()]
    assert client.answer("message_sent") == []          # a late answer is dropped


@pytest.mark.parametrize("answer", ["login_ok", "login_failed"])
def test_a_password_check_that_outlives_a_timeout_is_dropped(mode, answer):
    client = Client(mode, auto=False)
    client.send(LOGIN)
    assert client.answer("timed_out") == [S_TIMEOUT, P.CloseConnection()]
    assert client.answer(answer) == []
    assert not any(isinstance(e, P.OpenMaildrop) for e in client.log)


def test_message_failed_closes_without_a_reply(mode):
    client = logged_in(mode, auto=False)
    client.send(b"DELE 2\r\nRETR 1\r\nQUIT\r\n")
    assert client.answer("message_failed") == [P.CloseConnection()]
    assert not any(isinstance(e, P.Commit) for e in client.log)


def test_shutdown_when_idle(mode):
    client = Client(mode)
    assert client.answer("shutdown") == [S_SHUTDOWN, P.CloseConnection()]


def test_shutdown_during_a_login(mode):
    # The pending answer completes; then the session closes instead of going on.
    client = Client(mode, auto=False)
    client.send(LOGIN + b"STAT\r\n")
    assert client.answer("shutdown") == []
    assert client.answer("login_ok") == [S_SHUTDOWN, P.CloseConnection()]   # no OpenMaildrop

    client = Client(mode, auto=False)
    client.send(LOGIN + b"STAT\r\n")
    assert client.answer("shutdown") == []
    assert client.answer("login_failed") == [S_AUTH_FAILED, S_SHUTDOWN, P.CloseConnection()]

    client = Client(mode, auto=False)
    client.send(LOGIN + b"STAT\r\n")
    assert client.answer("login_ok") == [P.OpenMaildrop("alice")]
    assert client.answer("shutdown") == []
    assert client.answer("maildrop_opened", MAILBOX) == [
        S_LOGGED_IN, S_SHUTDOWN, P.CloseConnection()]                       # no STAT


def test_shutdown_while_sending_and_committing(mode):
    client = logged_in(mode, auto=False)
    client.send(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    assert client.answer("shutdown") == []
    assert client.answer("message_sent") == [S_SHUTDOWN, P.CloseConnection()]
    client = logged_in(mode, auto=False)
    client.send(b"DELE 1\r\nQUIT\r\n")
    assert client.answer("shutdown") == []
    assert client.answer("committed") == [S_BYE, P.CloseConnection()]


def test_shutdown_during_stls_closes_silently(mode):
    client = Client(mode)
    client.send(b"STLS\r\n")
    assert client.conn.shutdown() == [P.CloseConnection()]


@pytest.mark.parametrize("reach, method, args", [
    (b"", "login_ok", ()),
    (b"", "login_failed", ()),
    (b"", "maildrop_opened", (MAILBOX,)),
    (b"", "maildrop_failed", (True,)),
    (b"", "message_sent", ()),
    (b"", "message_failed", ()),
    (b"", "committed", ()),
    (b"", "commit_failed", ()),
    (LOGIN, "maildrop_opened", (MAILBOX,)),     # still checking the password
    (LOGIN, "message_sent", ()),
    (b"AUTH PLAIN\r\n", "login_ok", ()),
    (b"STLS\r\n", "login_ok", ()),
])
def test_answers_out_of_turn_are_a_bug_in_the_caller(reach, method, args):
    client = Client(auto=False)
    client.send(reach)
    with pytest.raises(RuntimeError):
        getattr(client.conn, method)(*args)


def test_closed_connection_ignores_input():
    client = Client()
    client.send(b"QUIT\r\n")
    assert client.conn.feed(b"USER alice\r\n") == []
    assert client.conn.shutdown() == [] and client.conn.timed_out() == []


# --- whole and byte-at-a-time agree ---------------------------------------------------------

SCRIPTS = [
    LOGIN + b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\nDELE 3\r\nRSET\r\nDELE 2\r\nQUIT\r\n",
    b"CAPA\r\nAUTH PLAIN\r\n" + plain("", "alice", "secret").encode() + b"\r\nLIST 2\r\nQUIT\r\n",
    b"USER busy\r\nPASS x\r\nUSER alice\r\nPASS no\r\nUSER alice\r\nPASS secret\r\nNOOP\r\n",
    b"X" * 2000 + b"\r\nNOOP\nUSER\r\n\r\n\0\r\nAUTH PLAIN\r\n*\r\nSTLS\r\nNOOP\r\n",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_whole_and_bytewise_give_the_same_transcript(script):
    whole, bytewise = Client("whole"), Client("bytewise")
    assert whole.send(script) == bytewise.send(script)
    assert whole.conn.unprocessed == bytewise.conn.unprocessed
    assert whole.conn.state is bytewise.conn.state


# --- dot-stuffing (RFC 1939 §3) --------------------------------------------------------------

@pytest.mark.parametrize("pieces, wire", [
    ([b"a\r\n"], b"a\r\n.\r\n"),
    ([b".a\r\n"], b"..a\r\n.\r\n"),
    ([b"a\r\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),
    ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),           # a dot at a piece's start
    ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),           # CRLF split across pieces
    ([b"a\r\n.", b"\r\n"], b"a\r\n..\r\n.\r\n"),
    ([b".", b".", b"\r\n"], b"...\r\n.\r\n"),                # only the first is stuffed
    ([b"a"], b"a\r\n.\r\n"),                                 # CRLF added before the end
    ([b"a\r"], b"a\r\r\n.\r\n"),
    ([b"x\n.\n"], b"x\n..\n\r\n.\r\n"),                      # bare LF: still a line start
    ([b"\r\n"], b"\r\n.\r\n"),
    ([], b".\r\n"),                                          # empty message
    ([b"", b""], b".\r\n"),
])
def test_dot_stuffing_examples(pieces, wire):
    assert b"".join(dot_stuffed(pieces)) == wire


def test_dot_stuffer_misuse():
    stuffer = DotStuffer()
    stuffer.finish()
    with pytest.raises(RuntimeError):
        stuffer.stuff(b"x")
    with pytest.raises(RuntimeError):
        stuffer.finish()


def unstuff(wire: bytes) -> bytes:
    """A client's reading: drop the final '.' line, then one leading dot per line."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(b"\n")
    return b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def chunked(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=30))))
    bounds = [0] + cuts + [len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
content = st.one_of(
    st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"From x", b"\r\n.\r\n"]),
             max_size=40).map(b"".join),
    st.binary(max_size=300))


@FUZZ
@given(message=content, data=st.data())
def test_dot_stuffing_round_trips_in_any_chunking(message, data):
    wire = b"".join(dot_stuffed(chunked(data, message)))
    assert wire == b"".join(dot_stuffed([message]))
    ends_clean = message == b"" or message.endswith(b"\r\n")
    assert unstuff(wire) == (message if ends_clean else message + b"\r\n")
    # No early end marker, however the client splits lines (CRLF, or lenient LF).
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    for line in wire[:-3].split(b"\n"):
        assert line not in (b".", b".\r")


# --- fuzz: any input, any chunking, any answers -----------------------------------------------

PLAUSIBLE = [
    b"CAPA", b"STLS", b"USER alice", b"USER nobody", b"user busy", b"USER broken",
    b"PASS secret", b"PASS x", b"PASS pass word ", b"AUTH", b"AUTH PLAIN", b"auth plain",
    b"AUTH PLAIN " + plain("", "alice", "secret").encode(), plain("", "alice", "secret").encode(),
    b"AUTH PLAIN =", b"*", b"=", b"AUTH CRAM-MD5", b"STAT", b"LIST", b"LIST 1", b"LIST 0",
    b"RETR 1", b"RETR 2", b"RETR 99999999999999999999", b"DELE 1", b"DELE 2", b"DELE 3",
    b"NOOP", b"RSET", b"TOP 1 0", b"TOP 2 10", b"TOP 1", b"UIDL", b"UIDL 3", b"QUIT",
    b"APOP a b", b"", b"RETR -1", b"A" * 300, b"AUTH PLAIN " + b"A" * 1100,
]
TERMINATORS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]
junk = st.binary(max_size=30)
command = st.tuples(st.one_of(st.sampled_from(PLAUSIBLE), st.sampled_from(PLAUSIBLE), junk),
                    st.sampled_from(TERMINATORS)).map(b"".join)
grammar_stream = st.lists(command, max_size=30).map(b"".join)
any_stream = st.one_of(grammar_stream, st.binary(max_size=2000))
construction = st.fixed_dictionaries({
    "tls": st.booleans(), "stls_available": st.booleans(),
    "plaintext_allowed": st.booleans(), "hard_error_limit": st.sampled_from([2, 5, 10_000]),
    "max_commands_per_feed": st.sampled_from([None, 1, 3]),
})
ANSWERS = {
    P.CheckLogin: [("login_ok",), ("login_failed",),
                   ("login_failed", P.LoginFailure.TEMPORARY)],
    P.OpenMaildrop: [("maildrop_opened", MAILBOX), ("maildrop_opened", []),
                     ("maildrop_failed", True), ("maildrop_failed", False)],
    P.SendMessage: [("message_sent",), ("message_sent",), ("message_failed",)],
    P.Commit: [("committed",), ("commit_failed",)],
}


def run(chunks: list[bytes], params: dict, choices: list[int]) -> list:
    """Feed the chunks; answer the n-th waiting event with ANSWERS[type][choices[n]]."""
    conn = P.POP3Connection(**params)
    log: list = []
    state = {"closed": False, "tls": False, "answered": 0}

    def take(events: list) -> None:
        for i, event in enumerate(events):
            assert not state["closed"] and not state["tls"], f"{event!r} after the end"
            if isinstance(event, P.SendReply):
                check_reply(event.data)
                log.append(event.data)
                continue
            log.append(event)
            assert i == len(events) - 1
            if isinstance(event, P.CloseConnection):
                state["closed"] = True
            elif isinstance(event, P.StartTLS):
                state["tls"] = True
                assert params["stls_available"] and not params["tls"]
            else:
                if isinstance(event, P.CheckLogin):
                    assert params["plaintext_allowed"], "a password was handed out"
                    assert event.user.isprintable() and " " not in event.user
                if isinstance(event, P.Commit):
                    assert event.deleted and list(event.deleted) == sorted(set(event.deleted))
                options = ANSWERS[type(event)]
                n = state["answered"]
                state["answered"] += 1
                method, *args = options[choices[n % len(choices)] % len(options)]
                take(getattr(conn, method)(*args))

    take(conn.greeting())
    for chunk in chunks:
        take(conn.feed(chunk))
        while conn.has_unread_commands:
            take(conn.feed(b""))
        if conn.state in P.READING:
            assert held_bytes(conn) <= P.MAX_AUTH_LINE, "a partial line past every limit"
    log.append(conn.unprocessed if state["tls"] else None)
    return log


@FUZZ
@given(stream=any_stream, data=st.data(), params=construction,
       choices=st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_any_stream_any_chunking_any_answers(stream, data, params, choices):
    # Never an exception; only well-formed replies; the same transcript however cut.
    whole = run([stream], params, choices)
    assert run(chunked(data, stream), params, choices) == whole


@FUZZ
@given(stream=grammar_stream, params=construction,
       choices=st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_byte_at_a_time_equals_whole(stream, params, choices):
    whole = run([stream], params, choices)
    assert run([stream[i:i + 1] for i in range(len(stream))], params, choices) == whole


@FUZZ
@given(lines=st.lists(st.one_of(st.sampled_from(PLAUSIBLE), junk), max_size=25))
def test_each_line_gets_exactly_one_reply(lines):
    # RFC 2449 §6.6: pipelining depends on it. Lines that end the session (QUIT, STLS)
    # or open a SASL dialogue are left out; a session that never closes on errors.
    lines = [line.replace(b"\n", b"") for line in lines]
    assume(not any(line.split(b" ")[0].upper() in (b"QUIT", b"STLS", b"AUTH")
                   for line in lines))
    params = {"tls": False, "stls_available": True, "plaintext_allowed": True,
              "hard_error_limit": 10_000, "max_commands_per_feed": None}
    log = run([b"".join(line + b"\r\n" for line in lines)], params, [0])
    replies = [item for item in log[1:-1] if isinstance(item, bytes)]
    assert len(replies) == len(lines)
