"""Unit tests for the sans-IO SMTP state machine (prefork_smtp.smtp.protocol), SPEC §5.

No sockets: a small Client feeds each script to SMTPConnection either whole or one byte
at a time (every case runs in both modes, as h11's tests do, and again with DATA streamed
in MessageChunks), collects the reply bytes, and answers each StoreMessage with
stored("QID") unless the test stores by hand.

Every reply the client sees is checked for RFC 5321 §4.2 shape and, except for the
greeting, HELO/EHLO and 354, for an RFC 3463 enhanced code of the same class on every
line (SPEC §5), so each test also guards those rules.
"""

from __future__ import annotations

import re

import pytest

from prefork_smtp import config
from prefork_smtp.smtp import protocol as P
from prefork_smtp.smtp import replies as R
from prefork_smtp.store.mailboxes import Router

HOST = "mx.example.org"
LOCAL = "example.org"
QID = "QID"
CLIENT_IP = "192.0.2.7"


# --- expected replies, named once -------------------------------------------------------

def prefix(reply: R.Reply) -> bytes:
    """The fixed start of a reply whose text names client input: b'503 5.5.1 '."""
    return f"{reply.code} {reply.enhanced} ".encode()


S220 = f"220 {HOST} ESMTP ccsmtp\r\n".encode()
S250_HELO = f"250 {HOST}\r\n".encode()
S250_EHLO = f"250-{HOST}\r\n".encode()        # first line of the multi-line EHLO reply
S250_SENDER = bytes(R.SENDER_OK)
S250_RCPT = bytes(R.RECIPIENT_OK)
S250_RSET = bytes(R.RESET_OK)
S250_NOOP = bytes(R.NOOP_OK)
S250_QUEUED = bytes(R.QUEUED.with_text(R.QUEUED.text.format(QID)))
S252 = bytes(R.CANNOT_VRFY)
S214 = bytes(P.HELP)
S221 = bytes(R.BYE)
S354 = bytes(R.START_DATA)
S421_SHUTDOWN = bytes(R.SHUTTING_DOWN)
S421_TIMEOUT = bytes(R.TIMEOUT)
S421_ERRORS = bytes(R.TOO_MANY_ERRORS)
S451_LOCAL = bytes(R.LOCAL_ERROR)
S452_STORAGE = bytes(R.INSUFFICIENT_STORAGE)
S452_RCPTS = bytes(R.TOO_MANY_RECIPIENTS)
S500 = prefix(R.UNRECOGNIZED)
S500_UNKNOWN = bytes(R.UNRECOGNIZED)
S500_TOO_LONG = bytes(R.LINE_TOO_LONG)
S500_BAD_BYTES = bytes(R.BAD_BYTES)
S501 = prefix(R.BAD_SYNTAX)
S501_SENDER = bytes(R.BAD_SENDER_SYNTAX)
S501_RCPT = bytes(R.BAD_RECIPIENT_SYNTAX)
S502_EXPN = bytes(R.EXPN_DENIED)
S503 = prefix(R.BAD_SEQUENCE)
S550_RELAY = prefix(R.RELAY_DENIED)
S550_UNKNOWN = prefix(R.UNKNOWN_USER)
S552 = bytes(R.MESSAGE_TOO_BIG)
S553_UTF8 = bytes(R.NEEDS_SMTPUTF8)
S554_LOOP = bytes(R.LOOP_DETECTED)
S554_NO_RCPT = bytes(R.NO_VALID_RECIPIENTS)
S555 = prefix(R.BAD_PARAMETER)


@pytest.mark.parametrize("reply, code, enhanced", [
    # The constants above are only as good as these pins to SPEC §5 / §6.
    (R.QUEUED, 250, "2.0.0"),
    (R.CANNOT_VRFY, 252, "2.0.0"),
    (R.UNRECOGNIZED, 500, "5.5.2"),
    (R.LINE_TOO_LONG, 500, "5.5.2"),
    (R.BAD_SYNTAX, 501, "5.5.4"),
    (R.BAD_HELO, 501, "5.5.4"),
    (R.BAD_SEQUENCE, 503, "5.5.1"),
    (R.BAD_PARAMETER, 555, "5.5.4"),
    (R.RELAY_DENIED, 550, "5.7.1"),
    (R.UNKNOWN_USER, 550, "5.1.1"),
    (R.MESSAGE_TOO_BIG, 552, "5.3.4"),
    (R.TOO_MANY_RECIPIENTS, 452, "4.5.3"),
    (R.TIMEOUT, 421, "4.4.2"),
    (R.SHUTTING_DOWN, 421, "4.3.2"),
    (R.TOO_MANY_ERRORS, 421, "4.7.0"),
    (R.LOOP_DETECTED, 554, "5.4.6"),
    (R.NEEDS_SMTPUTF8, 553, "5.6.7"),
    (R.INSUFFICIENT_STORAGE, 452, "4.3.1"),
    (R.LOCAL_ERROR, 451, "4.3.0"),
])
def test_reply_constants_match_spec(reply, code, enhanced):
    assert (reply.code, reply.enhanced) == (code, enhanced)


def test_queued_reply_text_matches_spec():
    assert S250_QUEUED == b"250 2.0.0 Ok: queued as QID\r\n"


def test_multi_line_reply_has_the_enhanced_code_on_every_line():
    # RFC 2034 §4, SPEC §5: every line of a multi-line reply carries it.
    assert R.format_reply(550, ["one", "two", "three"], "5.7.1") == (
        b"550-5.7.1 one\r\n550-5.7.1 two\r\n550 5.7.1 three\r\n")


# --- reply shape ------------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)\r\n")
_ENHANCED = re.compile(rb"([245])\.[0-9]{1,3}\.[0-9]{1,3} ")


def is_greeting_or_helo(data: bytes) -> bool:
    host = HOST.encode()
    return data.startswith((b"220 " + host, b"250 " + host, b"250-" + host))


def check_reply(data: bytes) -> None:
    """RFC 5321 §4.2.1 shape; RFC 2034 enhanced code on every line where SPEC §5 asks."""
    lines = data.split(b"\r\n")[:-1]
    assert lines and b"\r\n".join(lines) + b"\r\n" == data, data
    codes = set()
    for i, raw in enumerate(lines):
        match = _REPLY_LINE.fullmatch(raw + b"\r\n")
        assert match, f"malformed reply line {raw!r} in {data!r}"
        code, sep, text = match.groups()
        codes.add(code)
        assert sep == (b" " if i == len(lines) - 1 else b"-"), data
        if not is_greeting_or_helo(data) and code != b"354":
            enhanced = _ENHANCED.match(text)
            assert enhanced, f"no enhanced status code on {raw!r}"
            assert enhanced.group(1) == code[:1], f"enhanced class differs from code: {raw!r}"
    assert len(codes) == 1, f"mixed codes in one reply: {data!r}"


# --- the client harness -----------------------------------------------------------------

def make_config(**overrides) -> config.Config:
    values = {"hostname": HOST, "domains": [LOCAL, "localhost"], "listen": ["127.0.0.1:2525"],
              "workers": 1, "spool": "/nonexistent/ccsmtp-test-spool"}
    values.update(overrides)
    return config.build(values)


def make_conn(chunk_bytes: int | None = None, max_commands_per_feed: int | None = None,
              tls: str | None = None, tls_available: bool = False,
              **overrides) -> P.SMTPConnection:
    cfg = make_config(**overrides)
    router = Router(cfg.domains, recipients=cfg.recipients, aliases=cfg.aliases,
                    catchall=cfg.catchall)
    return P.SMTPConnection(cfg, router, client_address=CLIENT_IP, chunk_bytes=chunk_bytes,
                            max_commands_per_feed=max_commands_per_feed, tls=tls,
                            tls_available=tls_available)


# Feeding modes: the script whole or one byte at a time; "+chunks" also has the
# connection hand out DATA in MessageChunks (as the session does past 1 MB) from a
# tiny size on, so that the streaming path sees every case too.
MODES = ["whole", "bytewise", "whole+chunks", "bytewise+chunks"]
CHUNK_BYTES = 16


class Client:
    """Feeds scripts to one SMTPConnection and records what comes back.

    messages holds each StoreMessage with its whole content (MessageChunks joined)."""

    def __init__(self, conn: P.SMTPConnection, mode: str, auto_store: bool = True):
        self.conn = conn
        self.mode = mode
        self.auto_store = auto_store
        self.replies: list[bytes] = []
        self.messages: list[P.StoreMessage] = []
        self.events: list[P.Event] = []
        self.closed = False
        self.tls_started = False
        self.after_feed = None        # optional callable run after every feed() call
        self._chunks: list[bytes] = []
        self.stray_aborts = 0
        self.take(conn.greeting())

    def send(self, data: bytes) -> list[bytes]:
        """Feed data (whole or byte by byte); return the replies it produced."""
        start = len(self.replies)
        whole = self.mode.startswith("whole")
        chunks = [data] if whole else [data[i:i + 1] for i in range(len(data))]
        for chunk in chunks:
            self.take(self.conn.feed(chunk))
            if self.after_feed:
                self.after_feed(self.conn)
        return self.replies[start:]

    def store(self) -> list[bytes]:
        start = len(self.replies)
        self.take(self.conn.stored(QID))
        return self.replies[start:]

    def store_failed(self, reply: R.Reply) -> list[bytes]:
        start = len(self.replies)
        self.take(self.conn.store_failed(reply))
        return self.replies[start:]

    def take(self, events: list[P.Event]) -> None:
        for i, event in enumerate(events):
            self.events.append(event)
            if isinstance(event, P.SendReply):
                assert not self.closed, f"reply after CloseConnection: {event.data!r}"
                check_reply(event.data)
                assert event.is_error == (int(event.data[:3]) >= 400), event
                self.replies.append(event.data)
            elif isinstance(event, P.StoreMessage):
                # The session must store before anything else happens.
                assert i == len(events) - 1, "StoreMessage is not the last event"
                content = b"".join(self._chunks) + event.content
                self._chunks = []
                self.messages.append(P.StoreMessage(event.envelope, content))
                if self.auto_store:
                    self.take(self.conn.stored(QID))
            elif isinstance(event, P.MessageChunk):
                assert self.conn.chunk_bytes and event.data, event
                assert not self.closed
                self._chunks.append(event.data)
            elif isinstance(event, P.MessageAborted):
                # Without chunks to throw away it should not come: see
                # test_no_message_aborted_after_a_message_is_stored.
                self.stray_aborts += 0 if self._chunks else 1
                self._chunks = []
            elif isinstance(event, P.CloseConnection):
                self.closed = True
            elif isinstance(event, P.StartTLS):
                assert i == len(events) - 1, "StartTLS is not the last event"
                self.tls_started = True
            else:
                raise AssertionError(f"unknown event {event!r}")


def held_bytes(obj: object, depth: int = 3) -> int:
    """Octets held in buffers by obj and by the prefork_smtp objects it owns, whatever
    their names: how much of the client's input the connection keeps in memory."""
    total = 0
    for value in vars(obj).values():
        if isinstance(value, (bytes, bytearray)):
            total += len(value)
        elif isinstance(value, memoryview):
            total += value.nbytes
        elif isinstance(value, (list, tuple)):
            total += sum(len(v) for v in value if isinstance(v, (bytes, bytearray)))
        elif depth and type(value).__module__.startswith("prefork_smtp") \
                and hasattr(value, "__dict__"):
            total += held_bytes(value, depth - 1)
    return total


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


def connect(mode: str, auto_store: bool = True, **overrides) -> Client:
    chunk_bytes = CHUNK_BYTES if mode.endswith("+chunks") else None
    return Client(make_conn(chunk_bytes, **overrides), mode, auto_store)


def bdat(content: bytes, last: bool = True) -> bytes:
    return b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"") + content


def expect(replies: list[bytes], patterns: list[bytes]) -> None:
    """Each pattern ending in CRLF must equal its reply; any other is a prefix."""
    assert len(replies) == len(patterns), replies
    for reply, pattern in zip(replies, patterns):
        if pattern.endswith(b"\r\n"):
            assert reply == pattern
        else:
            assert reply.startswith(pattern), (reply, pattern)


EHLO = b"EHLO client.example.net\r\n"
HELO = b"HELO client.example.net\r\n"
MAIL = b"MAIL FROM:<sender@example.net>\r\n"
RCPT = b"RCPT TO:<alice@example.org>\r\n"


def rcpt(address: str) -> bytes:
    return f"RCPT TO:<{address}>\r\n".encode()


def data_block(content: bytes) -> bytes:
    """DATA plus already-stuffed content and the end marker."""
    return b"DATA\r\n" + content + b".\r\n"


def in_transaction(mode: str, **overrides) -> Client:
    """A client whose EHLO and MAIL were accepted."""
    client = connect(mode, **overrides)
    assert client.send(EHLO + MAIL)[1:] == [S250_SENDER]
    return client


def deliver(client: Client, content: bytes, recipients=("alice@example.org",)) -> list[bytes]:
    """MAIL, RCPTs and DATA in one pipelined send; the replies to all of it."""
    script = MAIL + b"".join(rcpt(r) for r in recipients) + data_block(content)
    return client.send(script)


# --- greeting, EHLO ---------------------------------------------------------------------

def test_greeting(mode):
    client = connect(mode)
    assert client.replies == [S220]
    assert not client.closed


def test_ehlo_advertises_extensions_without_enhanced_codes(mode):
    client = connect(mode, max_size=123456)
    [reply] = client.send(EHLO)
    lines = reply.split(b"\r\n")[:-1]
    assert lines[0] == S250_EHLO.rstrip(b"\r\n")
    keywords = {line[4:].decode() for line in lines[1:]}
    assert {"PIPELINING", "SIZE 123456", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
            "HELP"} <= keywords
    assert not any(re.match(rb"\d{3}[ -][245]\.\d", line) for line in lines)
    # ... while the very next reply does carry one.
    assert client.send(b"NOOP\r\n") == [S250_NOOP]


def test_helo_reply_is_one_line_without_enhanced_code(mode):
    client = connect(mode)
    assert client.send(HELO) == [S250_HELO]


# --- every command in every state -------------------------------------------------------

REACH = {
    P.State.CONNECTED: b"",
    P.State.GREETED: EHLO,
    P.State.MAIL: EHLO + MAIL,
    P.State.RCPT: EHLO + MAIL + RCPT,
}
C, G, M, RC = P.State.CONNECTED, P.State.GREETED, P.State.MAIL, P.State.RCPT
SAME = None   # the command leaves the state as it was

# command -> {state: (expected reply, state afterwards)}
COMMAND_TABLE = {
    HELO: {s: (S250_HELO, G) for s in REACH},
    EHLO: {s: (S250_EHLO[:-2], G) for s in REACH},
    b"MAIL FROM:<s@example.net>\r\n": {
        C: (S503, SAME), G: (S250_SENDER, M), M: (S503, SAME), RC: (S503, SAME)},
    b"RCPT TO:<bob@example.org>\r\n": {
        C: (S503, SAME), G: (S503, SAME), M: (S250_RCPT, RC), RC: (S250_RCPT, RC)},
    b"DATA\r\n": {
        C: (S503, SAME), G: (S503, SAME), M: (S503, SAME), RC: (S354, P.State.DATA)},
    b"RSET\r\n": {C: (S250_RSET, C), G: (S250_RSET, G), M: (S250_RSET, G), RC: (S250_RSET, G)},
    b"NOOP\r\n": {s: (S250_NOOP, SAME) for s in REACH},
    b"VRFY alice\r\n": {s: (S252, SAME) for s in REACH},
    b"EXPN staff\r\n": {s: (S502_EXPN, SAME) for s in REACH},
    b"HELP\r\n": {s: (S214, SAME) for s in REACH},
    b"QUIT\r\n": {s: (S221, P.State.CLOSED) for s in REACH},
    b"TURN\r\n": {s: (S500_UNKNOWN, SAME) for s in REACH},
    b"BDAT 0\r\n": {C: (S503, SAME), G: (S503, SAME), M: (S503, G),
                     RC: (bytes(R.fill(R.CHUNK_RECEIVED, 0)), P.State.CHUNKING)},
    b"\r\n": {s: (S500_UNKNOWN, SAME) for s in REACH},
}
STATE_CASES = [
    pytest.param(state, command, *COMMAND_TABLE[command][state],
                 id=f"{state.value}-{command.split()[0].decode() if command.split() else 'empty'}")
    for command in COMMAND_TABLE for state in REACH
]


@pytest.mark.parametrize("state, command, reply, after", STATE_CASES)
def test_command_in_state(mode, state, command, reply, after):
    client = connect(mode)
    client.send(REACH[state])
    assert client.conn.state is state
    expect(client.send(command), [reply])
    assert client.conn.state is (state if after is SAME else after)
    assert client.closed == (after is P.State.CLOSED)


@pytest.mark.parametrize("command", [b"noop\r\n", b"NoOp\r\n", b"  NOOP  \r\n", b"NOOP\n"])
def test_verbs_are_case_insensitive_and_bare_lf_ends_a_command(mode, command):
    assert connect(mode).send(command) == [S250_NOOP]


def test_rset_before_helo_does_not_greet(mode):
    client = connect(mode)
    expect(client.send(b"RSET\r\n" + MAIL), [S250_RSET, S503])


def test_rset_ends_the_transaction(mode):
    client = in_transaction(mode)
    expect(client.send(RCPT + b"RSET\r\n" + b"DATA\r\n" + RCPT),
           [S250_RCPT, S250_RSET, S503, S503])


@pytest.mark.parametrize("greeting", [EHLO, HELO])
def test_second_helo_or_ehlo_resets_the_transaction(mode, greeting):
    client = in_transaction(mode)
    replies = client.send(RCPT + greeting + b"DATA\r\n" + RCPT)
    assert replies[0] == S250_RCPT
    assert replies[1].startswith(b"250")
    expect(replies[2:], [S503, S503])
    assert client.messages == []


def test_quit_closes_and_later_input_is_ignored(mode):
    client = connect(mode)
    assert client.send(b"QUIT\r\nNOOP\r\n") == [S221]
    assert client.closed
    assert client.conn.feed(b"NOOP\r\n") == []


# --- bad arguments, unknown parameters -----------------------------------------------

BAD_ARGUMENTS = [
    (C, b"HELO\r\n", S501), (C, b"EHLO\r\n", S501), (C, b"EHLO two words\r\n", S501),
    (C, b"EHLO bad\x01host\r\n", S501),
    (G, b"MAIL\r\n", S501), (G, b"MAIL TO:<a@example.net>\r\n", S501),
    (G, b"MAIL FROM:<a@example.net> SIZE=big\r\n", S501),
    (G, b"MAIL FROM:<a@example.net> SIZE\r\n", S501),
    (G, b"MAIL FROM:<a@example.net> BODY=BINARYMIME\r\n", S501),
    (G, b"MAIL FROM:<a@example.net> SMTPUTF8=yes\r\n", S501),
    (G, b"MAIL FROM:<a@@example.net>\r\n", S501_SENDER),
    (G, b"MAIL FROM:<a@example.net\r\n", S501_SENDER),
    (M, b"RCPT\r\n", S501), (M, b"RCPT FROM:<alice@example.org>\r\n", S501),
    (M, b"RCPT TO:<alice@@example.org>\r\n", S501_RCPT),
    (M, b"RCPT TO:<>\r\n", S501_RCPT),
    (RC, b"DATA now\r\n", S501), (G, b"RSET please\r\n", S501),
    (G, b"QUIT now\r\n", S501), (C, b"VRFY\r\n", S501),
]


@pytest.mark.parametrize("state, command, reply", BAD_ARGUMENTS,
                         ids=[c.split(b"\r\n")[0].decode("ascii", "replace")
                              for _, c, _ in BAD_ARGUMENTS])
def test_bad_arguments(mode, state, command, reply):
    client = connect(mode)
    client.send(REACH[state])
    expect(client.send(command), [reply])
    assert client.conn.state is after_refusal(state, command)
    assert not client.closed


def after_refusal(state: P.State, command: bytes) -> P.State:
    """A refused RCPT means a recipient was given: DATA is then 554, not 503 (SPEC §5)."""
    return P.State.NO_RCPT if state is M and command.startswith(b"RCPT") else state


@pytest.mark.parametrize("state, command", [
    (G, b"MAIL FROM:<a@example.net> FOO=bar\r\n"),
    (G, b"MAIL FROM:<a@example.net> RET=HDRS\r\n"),
    (G, b"MAIL FROM:<a@example.net> SIZE=10 XYZZY\r\n"),
    (M, b"RCPT TO:<alice@example.org> NOTIFY=NEVER\r\n"),
    (M, b"RCPT TO:<alice@example.org> SIZE=10\r\n"),
])
def test_unknown_mail_or_rcpt_parameter(mode, state, command):
    client = connect(mode)
    client.send(REACH[state])
    expect(client.send(command), [S555])
    assert client.conn.state is after_refusal(state, command)


def test_mail_parameters_need_ehlo(mode):
    client = connect(mode)
    client.send(HELO)
    expect(client.send(b"MAIL FROM:<a@example.net> SIZE=10\r\n"), [S555])
    assert client.send(b"MAIL FROM:<a@example.net>\r\n") == [S250_SENDER]


def test_mail_parameters_are_accepted_after_ehlo(mode):
    client = connect(mode)
    client.send(EHLO)
    assert client.send(b"MAIL FROM:<a@example.net> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n") \
        == [S250_SENDER]


# --- pipelining -------------------------------------------------------------------------

def test_whole_session_pipelined(mode):
    client = connect(mode)
    script = (EHLO + MAIL + RCPT + rcpt("bob@example.org")
              + data_block(b"Subject: hi\r\n\r\nbody\r\n") + b"QUIT\r\n")
    replies = client.send(script)
    assert replies[0].startswith(S250_EHLO)
    assert replies[1:] == [S250_SENDER, S250_RCPT, S250_RCPT, S354, S250_QUEUED, S221]
    assert client.closed
    [message] = client.messages
    assert message.content == b"Subject: hi\r\n\r\nbody\r\n"
    assert [r.mailbox for r in message.envelope.recipients] == ["alice", "bob"]


def test_commands_after_data_wait_for_the_store_and_none_are_lost(mode):
    client = connect(mode, auto_store=False)
    client.send(EHLO)
    first = MAIL + RCPT + data_block(b"first\r\n")
    after = b"NOOP\r\n" + MAIL + rcpt("bob@example.org") + b"DATA\r\nsecond\r\n"
    assert client.send(first + after) == [S250_SENDER, S250_RCPT, S354]
    assert [m.content for m in client.messages] == [b"first\r\n"]
    # Input that arrives while the message is being stored is held too.
    assert client.send(b".\r\nVRFY x\r\nQUIT\r\n") == []
    assert client.store() == [S250_QUEUED, S250_NOOP, S250_SENDER, S250_RCPT, S354]
    assert [m.content for m in client.messages] == [b"first\r\n", b"second\r\n"]
    assert client.messages[1].envelope.recipients[0].mailbox == "bob"
    assert not client.closed
    assert client.store() == [S250_QUEUED, S252, S221]
    assert client.closed


def test_stored_outside_storing_is_a_programming_error():
    conn = make_conn()
    with pytest.raises(RuntimeError):
        conn.stored(QID)


def test_store_failure_replies_and_session_goes_on(mode):
    client = connect(mode, auto_store=False)
    client.send(EHLO)
    assert deliver(client, b"x\r\n")[-1] == S354
    assert client.store_failed(R.LOCAL_ERROR) == [S451_LOCAL]
    assert deliver(client, b"y\r\n")[-1] == S354
    assert client.store_failed(R.INSUFFICIENT_STORAGE) == [S452_STORAGE]
    # The failed transactions are gone: DATA now is out of sequence, a new MAIL works.
    expect(client.send(b"DATA\r\n"), [S503])
    assert deliver(client, b"z\r\n")[-1] == S354
    assert client.store() == [S250_QUEUED]
    assert [m.content for m in client.messages] == [b"x\r\n", b"y\r\n", b"z\r\n"]


# --- envelope ---------------------------------------------------------------------------

def test_envelope_fields(mode):
    client = connect(mode)
    client.send(EHLO)
    assert client.send(b"MAIL FROM:<Sender@Example.NET> BODY=8BITMIME\r\n" + RCPT
                       + data_block(b"hi\r\n")) == [S250_SENDER, S250_RCPT, S354, S250_QUEUED]
    envelope = client.messages[0].envelope
    assert envelope.mail_from == "Sender@Example.NET"
    assert envelope.recipients == (P.Recipient("alice@example.org", "alice"),)
    assert envelope.helo == "client.example.net"
    assert envelope.protocol == "ESMTP"
    assert envelope.client_address == CLIENT_IP
    assert envelope.body == "8BITMIME"


@pytest.mark.parametrize("greeting, mail, protocol", [
    (HELO, MAIL, "SMTP"),
    (EHLO, MAIL, "ESMTP"),
    (EHLO, b"MAIL FROM:<s@example.net> SMTPUTF8\r\n", "UTF8SMTP"),
])
def test_envelope_protocol(mode, greeting, mail, protocol):
    client = connect(mode)
    client.send(greeting + mail + RCPT + data_block(b"hi\r\n"))
    assert client.messages[0].envelope.protocol == protocol
    assert client.messages[0].envelope.body == "7BIT"


@pytest.mark.parametrize("mail", [b"MAIL FROM:<>\r\n", b"MAIL FROM: <>\r\n", b"mail from:<>\r\n"])
def test_null_reverse_path_is_accepted(mode, mail):
    client = connect(mode)
    assert client.send(EHLO + mail + RCPT + data_block(b"bounce\r\n"))[1:] \
        == [S250_SENDER, S250_RCPT, S354, S250_QUEUED]
    assert client.messages[0].envelope.mail_from == ""


# --- DATA framing -----------------------------------------------------------------------

@pytest.mark.parametrize("wire, stored", [
    (b"..leading dot\r\n", b".leading dot\r\n"),
    (b"...two dots\r\n", b"..two dots\r\n"),
    (b"..\r\n", b".\r\n"),
    (b"a line\r\n..\r\nafter\r\n", b"a line\r\n.\r\nafter\r\n"),
    (b"mid.line. dots.\r\n", b"mid.line. dots.\r\n"),
    (b" .space first\r\n", b" .space first\r\n"),
    (b"", b""),                              # '.' at the very start: an empty message
    (b"\r\n", b"\r\n"),
])
def test_dot_unstuffing(mode, wire, stored):
    client = connect(mode)
    client.send(EHLO)
    assert deliver(client, wire)[-2:] == [S354, S250_QUEUED]
    assert client.messages[0].content == stored


SMUGGLING = {
    # None of these ends DATA (SMTP smuggling, CVE-2023-51764 and kin).
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CR.CRLF": b"\r.\r\n",
    "CR.LF": b"\r.\n",
}


@pytest.mark.parametrize("sequence", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_smuggling_sequences_do_not_end_data(mode, sequence):
    client = connect(mode)
    client.send(EHLO)
    smuggled = (b"Subject: one\r\n\r\nfirst" + sequence
                + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                + b"smuggled\r\n")
    assert client.send(MAIL + RCPT + b"DATA\r\n" + smuggled) == [S250_SENDER, S250_RCPT, S354]
    assert client.messages == []
    assert client.send(b".\r\n") == [S250_QUEUED]
    [message] = client.messages
    assert message.content == smuggled
    assert [r.mailbox for r in message.envelope.recipients] == ["alice"]


def test_crlf_dot_lf_does_not_end_data(mode):
    # CRLF . LF is a line (by CRLF) that starts with '.' and has more on it, so RFC 5321
    # §4.5.2 removes the dot; what matters is that DATA goes on and nothing is smuggled.
    client = connect(mode)
    client.send(EHLO)
    wire = b"first\r\n.\nMAIL FROM:<evil@example.net>\r\nsecond\r\n"
    assert deliver(client, wire)[-2:] == [S354, S250_QUEUED]
    [message] = client.messages
    assert message.content == b"first\r\n\nMAIL FROM:<evil@example.net>\r\nsecond\r\n"


def test_only_crlf_dot_crlf_ends_data_and_the_rest_is_commands(mode):
    client = connect(mode)
    client.send(EHLO)
    assert client.send(MAIL + RCPT + b"DATA\r\nbody\r\n.\r\nNOOP\r\n") \
        == [S250_SENDER, S250_RCPT, S354, S250_QUEUED, S250_NOOP]
    assert client.messages[0].content == b"body\r\n"


def test_binary_content_and_long_lines_are_stored_unchanged(mode):
    client = connect(mode)
    client.send(EHLO)
    content = (b"x" * 100_000 + b"\r\n" + bytes(range(256)).replace(b"\r\n", b"")
               + b"\r\n\x00nul\r\n\xff\xfe 8-bit\r\n")
    assert deliver(client, content)[-1] == S250_QUEUED
    assert client.messages[0].content == content


def test_unterminated_data_stores_nothing(mode):
    client = connect(mode)
    client.send(EHLO)
    assert client.send(MAIL + RCPT + b"DATA\r\nhalf a message\r\n.") == [S250_SENDER, S250_RCPT, S354]
    assert client.messages == []
    assert client.conn.reading_data and client.conn.in_transaction


# --- size limit -------------------------------------------------------------------------

MAX = 1000


def test_message_at_the_size_limit_is_accepted(mode):
    client = connect(mode, max_size=MAX)
    client.send(EHLO)
    content = b"x" * (MAX - 2) + b"\r\n"
    assert deliver(client, content)[-1] == S250_QUEUED
    assert client.messages[0].content == content


def test_oversized_message_is_refused_after_the_end_marker(mode):
    client = connect(mode, max_size=MAX)
    client.send(EHLO)
    content = (b"y" * 98 + b"\r\n") * 30          # 3000 bytes
    assert client.send(MAIL + RCPT + b"DATA\r\n" + content) == [S250_SENDER, S250_RCPT, S354]
    assert client.send(b".\r\n") == [S552]
    assert client.messages == []
    # The session keeps working, and the refused transaction is gone.
    expect(client.send(b"DATA\r\n"), [S503])
    assert deliver(client, b"small\r\n")[-1] == S250_QUEUED
    assert client.messages[0].content == b"small\r\n"


def test_oversized_message_holds_little_memory(mode):
    client = connect(mode, max_size=MAX)
    client.send(EHLO + MAIL + RCPT + b"DATA\r\n")
    peak = []
    client.after_feed = lambda conn: peak.append(held_bytes(conn))
    line = b"z" * 98 + b"\r\n"
    client.send(line * 600)                       # 60 KB: 60 times the limit
    assert max(peak) <= MAX + 64
    assert client.send(b".\r\n") == [S552]
    assert client.send(b"NOOP\r\n") == [S250_NOOP]


@pytest.mark.parametrize("size, reply", [(MAX, S250_SENDER), (MAX + 1, S552), (10**30, S552)])
def test_size_parameter(mode, size, reply):
    client = connect(mode, max_size=MAX)
    client.send(EHLO)
    assert client.send(f"MAIL FROM:<a@example.net> SIZE={size}\r\n".encode()) == [reply]


def test_size_verdict_does_not_depend_on_how_the_input_is_split():
    def verdict(n: int, mode: str) -> bytes:
        client = connect(mode, max_size=MAX)
        client.send(EHLO)
        return deliver(client, b"x" * n + b"\r\n")[-1]

    verdicts = {n: {verdict(n, mode) for mode in MODES} for n in range(MAX - 3, MAX + 4)}
    assert all(len(v) == 1 for v in verdicts.values()), verdicts


def test_size_limit_ignores_stuffing_dots(mode):
    client = connect(mode, max_size=100)
    client.send(EHLO)
    content = b".abcd\r\n" * 14                   # 98 bytes; 112 on the wire once stuffed
    wire = content.replace(b".", b"..")
    assert client.send(f"MAIL FROM:<a@example.net> SIZE={len(content)}\r\n".encode()
                       + RCPT + data_block(wire))[-1] == S250_QUEUED


# --- streaming (MessageChunk) -----------------------------------------------------------

def chunked_client(**overrides) -> Client:
    client = connect("whole+chunks", **overrides)
    client.send(EHLO + MAIL + RCPT + b"DATA\r\n")
    return client


def test_large_message_comes_in_line_aligned_chunks():
    client = chunked_client()
    lines = [b"line %03d of the message\r\n" % i for i in range(40)]
    for line in lines:
        client.send(line)
    chunks = [e.data for e in client.events if isinstance(e, P.MessageChunk)]
    assert len(chunks) >= 10
    assert client.messages == []
    assert client.send(b".\r\n") == [S250_QUEUED]
    assert client.messages[0].content == b"".join(lines)
    # Each chunk but the first starts a line (the CRLF before it is its first bytes).
    assert all(chunk.startswith(b"\r\n") for chunk in chunks[1:])


def test_oversized_message_throws_its_chunks_away():
    client = chunked_client(max_size=100)
    client.send(b"x" * 20 + b"\r\n")
    client.send(b"y" * 20 + b"\r\n")
    assert any(isinstance(e, P.MessageChunk) for e in client.events)
    client.send(b"z" * 200 + b"\r\n")
    assert client.send(b".\r\n") == [S552]
    kinds = [type(e) for e in client.events]
    last_chunk = max(i for i, k in enumerate(kinds) if k is P.MessageChunk)
    assert P.MessageAborted in kinds[last_chunk:]
    assert client.messages == []


def test_long_line_is_streamed_too():
    client = chunked_client()
    held = []
    client.after_feed = lambda conn: held.append(held_bytes(conn))
    piece = b"q" * 1024
    for _ in range(200):
        client.send(piece)
    assert max(held) <= CHUNK_BYTES + 2 * len(piece)
    assert client.send(b"\r\n.\r\n") == [S250_QUEUED]
    assert client.messages[0].content == piece * 200 + b"\r\n"


@pytest.mark.parametrize("outcome", ["stored", "store_failed"])
def test_no_message_aborted_after_a_message_is_stored(outcome):
    client = chunked_client()
    client.auto_store = False
    client.send(b"a" * 40 + b"\r\n" + b"b" * 40 + b"\r\n")
    client.send(b".\r\n")
    assert len(client.messages) == 1
    start = len(client.events)
    client.store() if outcome == "stored" else client.store_failed(R.LOCAL_ERROR)
    assert not any(isinstance(e, P.MessageAborted) for e in client.events[start:])


# --- recipients -------------------------------------------------------------------------

def test_recipient_limit(mode):
    client = in_transaction(mode, max_recipients=3)
    names = ["alice", "bob", "carol", "dave"]
    assert client.send(b"".join(rcpt(f"{n}@example.org") for n in names)) \
        == [S250_RCPT] * 3 + [S452_RCPTS]
    assert client.send(data_block(b"hi\r\n")) == [S354, S250_QUEUED]
    assert [r.mailbox for r in client.messages[0].envelope.recipients] == names[:3]
    # The limit is per transaction.
    assert deliver(client, b"again\r\n", [f"{n}@example.org" for n in names[1:]])[1:4] \
        == [S250_RCPT] * 3


@pytest.mark.parametrize("address, mailbox", [
    ("postmaster", "postmaster"),
    ("Postmaster@example.org", "postmaster"),
    ("POSTMASTER@localhost", "postmaster"),
    ("postmaster@Example.Org.", "postmaster"),
    ("alice@example.org", "alice"),
    ("Alice+lists@EXAMPLE.org", "alice"),
])
def test_postmaster_accepted_despite_allow_list(mode, address, mailbox):
    client = connect(mode, recipients=["alice"])
    client.send(EHLO)
    assert deliver(client, b"hi\r\n", [address])[1:] == [S250_RCPT, S354, S250_QUEUED]
    assert client.messages[0].envelope.recipients[0].mailbox == mailbox


@pytest.mark.parametrize("address", [
    "bob@elsewhere.test",
    "postmaster@elsewhere.test",
    "alice@example.org.elsewhere.test",
    "alice@sub.example.org",
    "alice@[192.0.2.1]",
    "@example.org:alice@elsewhere.test",      # source route: the last hop counts
])
def test_relaying_is_denied(mode, address):
    client = in_transaction(mode, catchall="catchall")
    expect(client.send(rcpt(address)), [S550_RELAY])
    assert client.conn.state is P.State.NO_RCPT


@pytest.mark.parametrize("address", [
    "bob%elsewhere.test@example.org",
    "elsewhere.test!bob@example.org",
    '"a/b"@example.org',
    '"../etc/passwd"@example.org',
    '".."@example.org',
    '".hidden"@example.org',
    "inbox.lock@example.org",
    "Inbox.LOCK@example.org",
    "a" * 251 + "@example.org",
    '"a b"@example.org',
])
def test_unsafe_local_parts_are_unknown_users(mode, address):
    client = in_transaction(mode)
    expect(client.send(rcpt(address)), [S550_UNKNOWN])
    assert client.conn.state is P.State.NO_RCPT


def test_longest_safe_local_part_is_accepted(mode):
    client = in_transaction(mode)
    assert client.send(rcpt("a" * 250 + "@example.org")) == [S250_RCPT]


def test_non_ascii_local_part(mode):
    client = connect(mode)
    client.send(EHLO)
    jorg = "RCPT TO:<jörg@example.org>\r\n".encode()
    assert client.send(MAIL + jorg) == [S250_SENDER, S553_UTF8]
    client.send(b"RSET\r\n")
    replies = client.send(b"MAIL FROM:<s@example.net> SMTPUTF8\r\n" + jorg)
    assert replies[0] == S250_SENDER
    expect(replies[1:], [S550_UNKNOWN])


def test_non_ascii_sender_needs_smtputf8(mode):
    client = connect(mode)
    client.send(EHLO)
    assert client.send("MAIL FROM:<jörg@example.net>\r\n".encode()) == [S553_UTF8]
    assert client.send("MAIL FROM:<jörg@example.net> SMTPUTF8\r\n".encode()) == [S250_SENDER]


def test_echoed_addresses_are_printable(mode):
    # The reply names the address; nothing unprintable the client sent may go back.
    client = connect(mode)
    client.send(EHLO + b"MAIL FROM:<s@example.net> SMTPUTF8\r\n")
    [reply] = client.send("RCPT TO:<a\u0085b\u2028c@elsewhere.test>\r\n".encode())
    assert reply[:1] == b"5"          # refused: a syntax error since C1 controls are out
    assert reply.decode()[:-2].isprintable(), reply


def test_allow_list_refuses_others(mode):
    client = in_transaction(mode, recipients=["alice"])
    expect(client.send(rcpt("bob@example.org")), [S550_UNKNOWN])


@pytest.mark.parametrize("overrides, address, mailbox", [
    ({"aliases": {"info": "alice"}}, "info@example.org", "alice"),
    ({"aliases": {"info": "alice"}}, "INFO+x@localhost", "alice"),
    ({"aliases": {"sales@example.org": "bob"}}, "sales@example.org", "bob"),
    ({"aliases": {"jörg": "joerg"}, "recipients": ["alice"]}, "Jörg@example.org", "joerg"),
    ({"catchall": "everyone"}, "nobody-here@example.org", "everyone"),
    ({"catchall": "everyone"}, '"a/b"@example.org', "everyone"),
    ({"catchall": "everyone", "recipients": ["alice"]}, "alice@example.org", "alice"),
    ({"catchall": "everyone", "recipients": ["alice"]}, "carol@example.org", "everyone"),
    ({"recipients": ["alice"]}, "alice+tag+more@example.org", "alice"),
    ({}, "Carol@Example.ORG", "carol"),
])
def test_routing(mode, overrides, address, mailbox):
    client = connect(mode, **overrides)
    client.send(EHLO)
    mail = b"MAIL FROM:<s@example.net> SMTPUTF8\r\n"
    replies = client.send(mail + rcpt(address) + data_block(b"hi\r\n"))
    assert replies == [S250_SENDER, S250_RCPT, S354, S250_QUEUED]
    assert client.messages[0].envelope.recipients == (P.Recipient(address, mailbox),)


def test_alias_for_one_domain_does_not_apply_to_another(mode):
    client = in_transaction(mode, aliases={"sales@example.org": "bob"}, recipients=["bob"])
    expect(client.send(rcpt("sales@localhost")), [S550_UNKNOWN])


# --- control characters never reach an address ---------------------------------------

@pytest.mark.parametrize("line", [
    b"RCPT TO:<al\rice@example.org>\r\n",
    b"RCPT TO:<alice\x00@example.org>\r\n",
    b"RCPT TO:<alice@example.org\x00>\r\n",
    b'RCPT TO:<"al\rice"@example.org>\r\n',
    b"RCPT TO:<alice@example.org>\r\r\n",
    b"RCPT TO:<alice@exam\rple.org>\r\n",
    b"RCPT TO:<ali\nce@example.org>\r\n",
    b'RCPT TO:<"ali\nce"@example.org>\r\n',
    b"RCPT TO:<alice@example.org>\rRCPT TO:<bob@example.org>\r\n",
])
def test_control_characters_in_rcpt(mode, line):
    # The catch-all would take any well-formed address: only syntax can refuse these.
    client = in_transaction(mode, recipients=["alice"], catchall="catchall")
    replies = client.send(line)
    assert replies and all(r[:1] in b"45" for r in replies), replies
    assert client.send(RCPT + data_block(b"hi\r\n")) == [S250_RCPT, S354, S250_QUEUED]
    assert client.messages[0].envelope.recipients == (P.Recipient("alice@example.org", "alice"),)


@pytest.mark.parametrize("line, reply", [
    (b"RCPT TO:<al\rice@example.org>\r\n", S500_BAD_BYTES),
    (b"RCPT TO:<alice\x00@example.org>\r\n", S500_BAD_BYTES),
    (b"NOOP\x00\r\n", S500_BAD_BYTES),
    (b"NO\rOP\r\n", S500_BAD_BYTES),
    (b"NOOP \xff\xfe\r\n", S500),
])
def test_bad_bytes_in_a_command(mode, line, reply):
    client = in_transaction(mode)
    expect(client.send(line), [reply])


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<s\r@example.net>\r\n",
    b"MAIL FROM:<s@example.net\x00>\r\n",
    b"MAIL FROM:<s\n@example.net>\r\n",
    b'MAIL FROM:<"s\r"@example.net>\r\n',
])
def test_control_characters_in_mail_from(mode, line):
    client = connect(mode)
    client.send(EHLO)
    replies = client.send(line)
    assert replies and all(r[:1] in b"45" for r in replies), replies
    assert client.conn.state is G
    client.send(MAIL + RCPT + data_block(b"hi\r\n"))
    assert client.messages[0].envelope.mail_from == "sender@example.net"


# --- command line length ------------------------------------------------------------

def padded_noop(total: int) -> bytes:
    """A NOOP command line of exactly total octets including CRLF."""
    return b"NOOP " + b"x" * (total - 7) + b"\r\n"


def test_rfc_minimum_command_line_is_accepted(mode):
    assert connect(mode).send(padded_noop(512)) == [S250_NOOP]


def test_command_line_limit_boundary(mode):
    client = connect(mode)
    assert client.send(padded_noop(P.MAX_COMMAND_LINE)) == [S250_NOOP]
    assert client.send(padded_noop(P.MAX_COMMAND_LINE + 1) + b"NOOP\r\n") \
        == [S500_TOO_LONG, S250_NOOP]


def test_2000_byte_command_line(mode):
    client = connect(mode)
    client.send(EHLO)
    line = b"RCPT TO:<" + b"a" * 1980 + b"@example.org>\r\n"
    assert len(line) >= 2000
    assert client.send(MAIL + line + RCPT) == [S250_SENDER, S500_TOO_LONG, S250_RCPT]


def test_100kb_line_without_newline_gives_one_error(mode):
    client = connect(mode)
    client.send(EHLO)
    sizes = []
    client.after_feed = lambda conn: sizes.append(held_bytes(conn))
    # It looks like commands, but none of it may be obeyed.
    assert client.send((b"QUIT RSET " * 10_000)[:100_000]) == []
    assert max(sizes) <= P.MAX_COMMAND_LINE + 64
    assert client.send(b"\r\nNOOP\r\n") == [S500_TOO_LONG, S250_NOOP]
    assert not client.closed


# --- error limit --------------------------------------------------------------------

ERRORS = {
    "unknown": b"XYZZY\r\n",
    "sequence": b"RCPT TO:<alice@example.org>\r\n",
    "too-long": b"NOOP " + b"x" * 1100 + b"\r\n",
    "bad-bytes": b"NO\x00OP\r\n",
    "syntax": b"MAIL FROM:<<bad>>\r\n",
    "relay": None,      # set up in the test: needs a transaction
}


def error_script(kind: str) -> tuple[bytes, bytes]:
    """(setup, one error) for each kind of error."""
    if kind == "relay":
        return MAIL, rcpt("bob@elsewhere.test")
    return b"", ERRORS[kind]


@pytest.mark.parametrize("kind", ERRORS)
def test_hard_error_limit(mode, kind):
    setup, error = error_script(kind)
    client = connect(mode, hard_error_limit=5)
    client.send(EHLO + setup)
    for _ in range(5):
        [reply] = client.send(error)
        assert reply[:1] == b"5"
    assert client.send(b"NOOP\r\n") == [S250_NOOP]
    assert not client.closed
    replies = client.send(error + b"NOOP\r\n")
    assert replies[0][:1] == b"5" and replies[1:] == [S421_ERRORS]
    assert client.closed
    assert client.conn.feed(b"NOOP\r\n") == []


@pytest.mark.parametrize("kind", [
    "unknown", "sequence", "too-long", "bad-bytes",
    "syntax", "relay",
])
def test_error_limit_closes_exactly_once(mode, kind):
    setup, error = error_script(kind)
    client = connect(mode, hard_error_limit=1)
    client.send(EHLO + setup + error + error)
    assert client.closed
    closes = [i for i, e in enumerate(client.events) if isinstance(e, P.CloseConnection)]
    assert closes == [len(client.events) - 1]


def test_too_many_recipients_is_not_counted_as_an_error(mode):
    # 452 4.5.3 tells a well-behaved client to send the rest later (RFC 5321
    # §4.5.3.1.10); it must not be thrown out for a long recipient list.
    client = in_transaction(mode, max_recipients=1, hard_error_limit=2)
    names = [f"user{i}@example.org" for i in range(6)]
    assert client.send(b"".join(rcpt(n) for n in names)) == [S250_RCPT] + [S452_RCPTS] * 5
    assert not client.closed
    assert client.send(data_block(b"hi\r\n")) == [S354, S250_QUEUED]


@pytest.mark.parametrize("kind", ["unknown", "relay"])
def test_an_accepted_message_resets_the_error_count(mode, kind):
    # Postfix smtpd_hard_error_limit counts errors "without delivering mail".
    setup, error = error_script(kind)
    client = connect(mode, hard_error_limit=3)
    client.send(EHLO + setup + error * 3 + b"RSET\r\n")
    assert deliver(client, b"hi\r\n")[-1] == S250_QUEUED
    client.send(setup + error * 3)
    assert not client.closed


# --- loops ------------------------------------------------------------------------------

def received(n: int, name: bytes = b"Received") -> bytes:
    return b"".join(name + b": from hop%d by mx%d; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i)
                    for i in range(n))


@pytest.mark.parametrize("headers, reply", [
    (received(50), S250_QUEUED),
    (received(51), S554_LOOP),
    (received(30) + received(21, b"RECEIVED"), S554_LOOP),
    (received(30) + received(30, b"X-Received"), S250_QUEUED),
], ids=["50", "51", "51-any-case", "X-Received-not-counted"])
def test_received_header_limit(mode, headers, reply):
    client = connect(mode)
    client.send(EHLO)
    assert deliver(client, headers + b"Subject: loop\r\n\r\nbody\r\n")[-1] == reply
    assert len(client.messages) == (reply == S250_QUEUED)
    assert deliver(client, b"Subject: next\r\n\r\nbody\r\n")[-1] == S250_QUEUED


def test_received_lines_in_the_body_do_not_count(mode):
    client = connect(mode)
    client.send(EHLO)
    assert deliver(client, b"Subject: quoted\r\n\r\n" + received(60))[-1] == S250_QUEUED


# --- timeouts and shutdown ----------------------------------------------------------

@pytest.mark.parametrize("state", [C, G, M, RC])
def test_timed_out(mode, state):
    client = connect(mode)
    client.send(REACH[state])
    client.take(client.conn.timed_out())
    assert client.replies[-1] == S421_TIMEOUT
    assert client.closed
    assert client.conn.feed(b"NOOP\r\n") == []


def test_timed_out_during_data_stores_nothing(mode):
    client = connect(mode)
    client.send(EHLO + MAIL + RCPT + b"DATA\r\npart of it\r\n")
    client.take(client.conn.timed_out())
    assert client.replies[-1] == S421_TIMEOUT and client.closed
    assert client.send(b".\r\n") == []
    assert client.messages == []


@pytest.mark.parametrize("state", [C, G])
def test_shutdown_when_idle(mode, state):
    client = connect(mode)
    client.send(REACH[state])
    client.take(client.conn.shutdown())
    assert client.replies[-1] == S421_SHUTDOWN
    assert client.closed


def test_shutdown_during_data_waits_for_the_message(mode):
    client = connect(mode, auto_store=False)
    client.send(EHLO + MAIL + RCPT + b"DATA\r\nfirst half\r\n")
    assert client.conn.shutdown() == []
    assert client.send(b"second half\r\n.\r\nNOOP\r\n") == []
    assert [m.content for m in client.messages] == [b"first half\r\nsecond half\r\n"]
    assert not client.closed
    assert client.store() == [S250_QUEUED, S421_SHUTDOWN]
    assert client.closed


def test_shutdown_during_a_transaction_lets_it_finish(mode):
    client = connect(mode)
    client.send(EHLO + MAIL)
    assert client.conn.shutdown() == []
    assert client.send(RCPT + data_block(b"hi\r\n")) \
        == [S250_RCPT, S354, S250_QUEUED, S421_SHUTDOWN]
    assert client.closed
    assert len(client.messages) == 1


# --- junk commands, tarpit marks and fairness ------------------------------------------

def test_junk_commands_past_the_limit_count_as_errors(mode):
    # Postfix smtpd_junk_command_limit: NOOP, VRFY and RSET without end are an attack.
    client = connect(mode, hard_error_limit=3)
    client.send(EHLO)
    replies = client.send(b"NOOP\r\n" * P.JUNK_COMMAND_LIMIT)
    assert replies == [S250_NOOP] * P.JUNK_COMMAND_LIMIT and not client.closed
    replies = client.send(b"NOOP\r\n" * 5)
    assert replies[:4] == [S250_NOOP] * 4 and replies[4] == S421_ERRORS
    assert client.closed


def test_an_accepted_message_resets_the_junk_count(mode):
    client = connect(mode, hard_error_limit=1)
    client.send(EHLO + b"NOOP\r\n" * P.JUNK_COMMAND_LIMIT)
    assert deliver(client, b"hi\r\n")[-1] == S250_QUEUED
    client.send(b"NOOP\r\n" * P.JUNK_COMMAND_LIMIT)
    assert not client.closed


def test_replies_past_the_soft_error_limit_are_marked_for_the_tarpit():
    conn = make_conn(None, soft_error_limit=2, hard_error_limit=10)
    conn.greeting()
    marks = [e.tarpit for e in conn.feed(b"BOGUS\r\n" * 4) if isinstance(e, P.SendReply)]
    assert marks == [False, False, True, True]


def test_pipelined_commands_are_handled_a_turn_at_a_time():
    conn = make_conn(None, max_commands_per_feed=100)
    conn.greeting()
    replies = [e for e in conn.feed(b"EHLO x\r\n" + b"HELP\r\n" * 249) if isinstance(e, P.SendReply)]
    assert len(replies) == 100 and conn.has_unread_commands
    replies += [e for e in conn.feed(b"") if isinstance(e, P.SendReply)]
    replies += [e for e in conn.feed(b"") if isinstance(e, P.SendReply)]
    assert len(replies) == 250 and not conn.has_unread_commands
    assert conn.feed(b"HEL") == [] and not conn.has_unread_commands   # half a line is not a command
