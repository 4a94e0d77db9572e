"""Tests for the LMTP client (prefork_smtp.store.lmtp), SPEC §11.

Content framing without sockets (tables fed whole and a byte at a time, checked against
ccsmtp's own DATA unstuffer, and a Hypothesis property); the conversation against a
scripted fake server (tests/fake_lmtp.py) for every edge: replies per recipient,
refusals at each step, connections dropped or stalled at each step, pipelining or not,
CHUNKING, SMTPUTF8, SIZE, oversized and malformed replies, reconnecting after an idle
close; and real Dovecot LMTP (tests/servers.py): messages arrive byte for byte.
"""

from __future__ import annotations

import dataclasses
import imaplib
import os
import re
import signal
import tempfile

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_lmtp import DROP, FREEZE, STALL, FakeLMTP
from prefork_smtp.config import DeliveryTarget
from prefork_smtp.smtp.data_framing import DataFramer
from prefork_smtp.store import lmtp as L
from servers import dovecot, dovecot_factory, free_port  # noqa: F401 (fixtures)

HOST = "mx.example.org"
SENDER = "sender@remote.test"
FAST = L.Timeouts(connect_s=5, greeting_s=5, command_s=5, data_init_s=5, data_block_s=5,
                  data_done_s=5, rset_s=5, quit_s=5)
MESSAGE = (b"From: sender@remote.test\r\nTo: alice@example.org\r\nSubject: hello\r\n"
           b"Message-ID: <m1@remote.test>\r\n\r\nHello.\r\n.leading dot\r\n.\r\n..\r\nEnd.\r\n")
D, F, DEF = L.Status.DELIVERED, L.Status.FAILED, L.Status.DEFERRED


def outcome_summary(outcomes: list[L.RecipientOutcome]) -> list[tuple[str, L.Status, int | None]]:
    return [(o.recipient, o.status, o.code) for o in outcomes]


@pytest.fixture
def fake():
    servers: list[FakeLMTP] = []

    def start(respond=None, **kwargs) -> FakeLMTP:
        server = FakeLMTP(respond, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        assert not server.errors, server.errors


def client_for(server: FakeLMTP, **kwargs) -> L.LMTPClient:
    kwargs.setdefault("timeouts", FAST)
    return L.LMTPClient(server.target, HOST, **kwargs)


def on(event_name: str, answer, when=None):
    """A script: answer `event_name` (when when(arg) is true) with answer."""
    def respond(event, session, arg):
        if event == event_name and (when is None or when(arg)):
            return answer(arg) if callable(answer) else answer
        return None
    return respond


# --- content: CRLF and dot-stuffing ----------------------------------------------------

def expected_wire(content: bytes) -> bytes:
    """What DATA must carry, computed on the whole: bare LF -> CRLF, leading dots doubled."""
    text = re.sub(rb"(?<!\r)\n", b"\r\n", content)
    return re.sub(rb"(^|\n)\.", rb"\1..", text)


CONTENT_CASES = [
    ("plain", b"Subject: x\r\n\r\nbody\r\n"),
    ("empty", b""),
    ("a lone dot line", b"a\r\n.\r\nb\r\n"),
    ("dot first", b".first line\r\n"),
    ("dots", b"..\r\n...\r\n.\r\n"),
    ("dot not at line start", b"a.b\r\n x.\r\n"),
    ("bare LF", b"a\nb\n.c\n"),
    ("mixed ends", b"a\r\nb\nc\r\n\n.\n"),
    ("bare CR stays", b"a\rb\r\n\r.\r\n"),
    ("no final line end", b"last line without end"),
    ("ends in CR", b"x\r"),
    ("ends in dot", b"line\r\n."),
    ("8-bit", "Grüße\r\n.ünïcode\r\n".encode()),
]


def unstuffed_by_ccsmtp(wire: bytes) -> bytes:
    """ccsmtp's own SMTP server side (DataFramer) reads DATA back."""
    framer = DataFramer(max_size=1 << 30)
    pieces, leftover = framer.feed(wire + (b".\r\n" if wire.endswith(b"\r\n") or not wire
                                           else b"\r\n.\r\n"))
    assert leftover == 0
    return b"".join(pieces)


@pytest.mark.parametrize("content", [c[1] for c in CONTENT_CASES], ids=[c[0] for c in CONTENT_CASES])
@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_dot_stuffing_and_line_ends(content, split):
    pieces = [content] if split == "whole" else [content[i:i + 1] for i in range(len(content))]
    wire = b"".join(L.dot_stuff(L.crlf_lines(pieces)))
    assert wire == expected_wire(content)
    assert b"\r\n.\r\n" not in b"\r\n" + wire     # never ends the message early
    normalized = b"".join(L.crlf_lines([content]))
    assert unstuffed_by_ccsmtp(wire) == normalized + (b"" if not normalized or normalized.endswith(b"\r\n")
                                                      else b"\r\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\xc3"]), max_size=60)
       .map(b"".join) | st.binary(max_size=200),
       cuts=st.lists(st.integers(0, 300), max_size=10))
def test_fuzz_content_any_split(content, cuts):
    points = sorted({c % (len(content) + 1) for c in cuts} | {0, len(content)})
    pieces = [content[a:b] for a, b in zip(points, points[1:])]
    assert b"".join(L.dot_stuff(L.crlf_lines(pieces))) == expected_wire(content)
    assert b"".join(L.crlf_lines(pieces)) == re.sub(rb"(?<!\r)\n", b"\r\n", content)


def test_extensions_from_lhlo():
    reply = L.Reply(250, ("server.example", "PIPELINING", "size 1000", "8bitmime", "CHUNKING",
                          "ENHANCEDSTATUSCODES", ""))
    ext = L.Extensions.from_lhlo(reply)
    assert {"PIPELINING", "SIZE", "8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES"} == ext.keywords
    assert ext.size_limit == 1000
    assert L.Extensions.from_lhlo(L.Reply(250, ("x", "SIZE 0"))).size_limit is None
    assert L.Extensions.from_lhlo(L.Reply(250, ("x", "SIZE"))).size_limit is None


def test_only_lmtp_targets():
    with pytest.raises(ValueError):
        L.LMTPClient(DeliveryTarget("mbox"), HOST)


# --- the conversation, against the fake server ------------------------------------------

def test_one_message_several_recipients(fake):
    server = fake()
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, ["alice@example.org", "bob@example.org"], [MESSAGE],
                                  body="8BITMIME")
    assert outcome_summary(outcomes) == [("alice@example.org", D, 250), ("bob@example.org", D, 250)]
    assert outcomes[0].reply == "250 2.0.0 <alice@example.org> Saved"
    session = server.sessions[0]
    assert session.commands[:4] == [f"LHLO {HOST}", f"MAIL FROM:<{SENDER}> BODY=8BITMIME",
                                    "RCPT TO:<alice@example.org>", "RCPT TO:<bob@example.org>"]
    assert session.commands[-1] == "QUIT"
    message = server.messages[0]
    assert (message.via, message.complete, message.content) == ("DATA", True, MESSAGE)
    assert message.wire == expected_wire(MESSAGE)


def test_null_sender_and_7bit(fake):
    server = fake()
    with client_for(server) as client:
        assert client.deliver("", ["a@x.test"], [b"x\r\n"])[0].status is D
    assert "MAIL FROM:<>" in server.sessions[0].commands


def test_pipelining_when_offered_and_not_otherwise(fake):
    rcpts = [f"r{i}@example.org" for i in range(5)]
    piped = fake()
    with client_for(piped) as client:
        assert {o.status for o in client.deliver(SENDER, rcpts, [MESSAGE])} == {D}
    assert piped.sessions[0].pipelined[:5] == [f"MAIL FROM:<{SENDER}>"] + [
        f"RCPT TO:<{r}>" for r in rcpts[:4]]
    plain = fake(extensions=("8BITMIME",))
    with client_for(plain) as client:
        assert {o.status for o in client.deliver(SENDER, rcpts, [MESSAGE], body="8BITMIME")} == {D}
    assert plain.sessions[0].pipelined == []
    # 8BITMIME offered: BODY= goes with MAIL; not offered: it does not.
    assert plain.sessions[0].commands[1] == f"MAIL FROM:<{SENDER}> BODY=8BITMIME"


def test_many_recipients_in_pipeline_windows(fake):
    rcpts = [f"r{i}@example.org" for i in range(2 * L.PIPELINE_WINDOW + 7)]
    server = fake(on("rcpt", b"550 5.1.1 unknown\r\n", lambda a: a.startswith("r1")))
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, rcpts, [MESSAGE])
    assert [o.status for o in outcomes] == [F if r.startswith("r1") else D for r in rcpts]
    assert server.messages[0].recipients == [r for r in rcpts if not r.startswith("r1")]


def test_duplicate_recipients_get_one_reply_each(fake):
    server = fake()
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, ["a@x.test", "a@x.test"], [MESSAGE])
    assert [o.status for o in outcomes] == [D, D]


RCPT_REPLIES = {"ok@x.test": None, "busy@x.test": b"450 4.2.1 mailbox busy\r\n",
                "gone@x.test": b"550 5.1.1 <gone@x.test> User doesn't exist\r\n"}


def test_rcpt_replies_per_recipient(fake):
    server = fake(on("rcpt", lambda a: RCPT_REPLIES[a]))
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, list(RCPT_REPLIES), [MESSAGE])
    assert outcome_summary(outcomes) == [("ok@x.test", D, 250), ("busy@x.test", DEF, 450),
                                         ("gone@x.test", F, 550)]
    assert outcomes[2].reply == "RCPT TO: 550 5.1.1 <gone@x.test> User doesn't exist"
    assert server.messages[0].recipients == ["ok@x.test"]


FINAL_REPLIES = {"ok@x.test": None, "quota@x.test": b"452 4.2.2 Mailbox full\r\n",
                 "sieve@x.test": b"552-5.2.0 Refused\r\n552 5.2.0 by sieve\r\n"}


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_final_replies_per_recipient(fake, chunking):
    extensions = ("PIPELINING", "CHUNKING") if chunking else ("PIPELINING",)
    server = fake(on("final", lambda a: FINAL_REPLIES[a]), extensions=extensions)
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, list(FINAL_REPLIES), [MESSAGE])
    assert outcome_summary(outcomes) == [("ok@x.test", D, 250), ("quota@x.test", DEF, 452),
                                         ("sieve@x.test", F, 552)]
    assert outcomes[2].reply == "552 5.2.0 Refused / 5.2.0 by sieve"
    assert server.messages[0].via == ("BDAT" if chunking else "DATA")


@pytest.mark.parametrize("reply, status", [(b"451 4.3.0 try later\r\n", DEF),
                                           (b"550 5.7.1 sender refused\r\n", F),
                                           (b"421 4.3.2 shutting down\r\n", DEF)])
@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_refused_answers_for_everyone(fake, reply, status, pipelining):
    extensions = ("PIPELINING",) if pipelining else ()
    server = fake(on("mail", reply), extensions=extensions)
    client = client_for(server)
    outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], [MESSAGE])
    assert [(o.status, o.reply) for o in outcomes] == [
        (status, "MAIL FROM: " + reply.decode().strip())] * 2
    assert server.messages == []
    if not pipelining:
        assert not any(c.startswith("RCPT") for c in server.sessions[0].commands)
    # The connection stays usable (after 421 it is replaced).
    server.respond = lambda *a: None
    assert [o.status for o in client.deliver(SENDER, ["a@x.test"], [MESSAGE])] == [D]
    assert client.connections_made == (2 if reply.startswith(b"421") else 1)
    client.close()


@pytest.mark.parametrize("reply, status", [(b"451 4.3.0 no\r\n", DEF), (b"554 5.5.1 no\r\n", F)])
def test_data_refused(fake, reply, status):
    server = fake(on("data", reply))
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], [MESSAGE])
    assert [(o.status, o.code) for o in outcomes] == [(status, int(reply[:3]))] * 2


def test_no_recipient_accepted_sends_no_content_then_rset(fake):
    server = fake(on("rcpt", b"550 5.1.1 no\r\n", lambda a: a.startswith("no")))
    client = client_for(server)
    assert [o.status for o in client.deliver(SENDER, ["no1@x.test", "no2@x.test"], [MESSAGE])] == [F, F]
    assert [o.status for o in client.deliver(SENDER, ["yes@x.test"], [MESSAGE])] == [D]
    client.close()
    commands = [c.split()[0] for c in server.sessions[0].commands]
    assert commands == ["LHLO", "MAIL", "RCPT", "RCPT", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(server.messages) == 1


def test_connection_kept_between_messages_with_rset(fake):
    server = fake()
    with client_for(server) as client:
        for i in range(3):
            assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
        assert client.connections_made == 1
    assert [c.split()[0] for c in server.sessions[0].commands].count("RSET") == 2


@pytest.mark.parametrize("farewell", [DROP, b"421 4.4.2 fake.test Disconnected for inactivity\r\n"],
                         ids=["closed", "421 and stays open"])
def test_reconnects_when_server_gave_up_on_idle_connection(fake, farewell):
    """Dovecot closes an idle LMTP connection (with a 421 first): the next message goes
    over a new connection and no recipient hears of it."""
    def respond(event, session, arg):
        if event == "idle" and len(server.sessions) == 1:
            return farewell
        return None
    server = fake(respond)
    with client_for(server) as client:
        assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
        assert client.deliver(SENDER, ["b@x.test"], [MESSAGE])[0].status is D
        assert client.connections_made == 2
    assert [m.recipients for m in server.messages] == [["a@x.test"], ["b@x.test"]]


def test_reconnects_when_rset_meets_a_closed_connection(fake):
    server = fake(on("rset", DROP))
    client = client_for(server)
    assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
    assert client.deliver(SENDER, ["b@x.test"], [MESSAGE])[0].status is D
    assert client.connections_made == 2
    client.close()


def test_server_gone_for_good_defers(fake):
    server = fake()
    client = client_for(server)
    assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
    server.close()
    outcome = client.deliver(SENDER, ["a@x.test", "b@x.test"], [MESSAGE])
    assert [o.status for o in outcome] == [DEF, DEF]
    assert "cannot connect" in outcome[0].reply or "connection" in outcome[0].reply
    client.close()


def test_connection_refused_defers():
    target = DeliveryTarget("lmtp", host="127.0.0.1", port=free_port())
    outcomes = L.LMTPClient(target, HOST, timeouts=FAST).deliver(SENDER, ["a@x.test"], [MESSAGE])
    assert (outcomes[0].status, outcomes[0].code) == (DEF, None)
    assert outcomes[0].reply.startswith(f"cannot connect to 127.0.0.1:{target.port}: ")


def test_unix_socket(fake):
    with tempfile.TemporaryDirectory() as tmp:
        server = fake(unix_path=os.path.join(tmp, "lmtp"))
        with client_for(server) as client:
            assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
        assert server.messages[0].content == MESSAGE
    missing = DeliveryTarget("lmtp", path="/nonexistent/lmtp")
    outcome = L.LMTPClient(missing, HOST, timeouts=FAST).deliver(SENDER, ["a@x.test"], [MESSAGE])[0]
    assert outcome.status is DEF and outcome.reply.startswith("cannot connect to unix:/nonexistent")


# Where the server drops the connection, and what every recipient hears. (a: first
# recipient, b: second.)
DROPS = [
    ("at the greeting", on("greeting", DROP), [DEF, DEF]),
    ("after LHLO", on("lhlo", DROP), [DEF, DEF]),
    ("after MAIL", on("mail", DROP), [DEF, DEF]),
    ("after the first RCPT", on("rcpt", DROP, lambda a: a == "b@x.test"), [DEF, DEF]),
    ("after DATA", on("data", DROP), [DEF, DEF]),
    ("mid-content", on("content", DROP, lambda so_far: len(so_far) > 100_000), [DEF, DEF]),
    ("after the first final reply", on("final", DROP, lambda a: a == "b@x.test"), [D, DEF]),
]


def with_modes(cases: list[tuple]) -> list:
    """Each case over DATA and over BDAT (except those about the DATA command)."""
    return [pytest.param(chunking, *case[1:], id=f"{'BDAT' if chunking else 'DATA'}-{case[0]}")
            for chunking in (False, True) for case in cases
            if not (chunking and case[0].endswith("DATA"))]


@pytest.mark.parametrize("chunking, respond, statuses", with_modes(DROPS))
def test_connection_dropped(fake, chunking, respond, statuses):
    extensions = ("PIPELINING", "CHUNKING") if chunking else ("PIPELINING",)
    server = fake(respond, extensions=extensions)
    big = [b"x" * 999 + b"\r\n"] * 2000            # 2 MB: still being sent when dropped
    client = client_for(server, chunk_bytes=64 * 1024)
    outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], big)
    assert [o.status for o in outcomes] == statuses, outcomes
    assert all(o.code is None for o in outcomes if o.status is DEF)
    assert not client.connected
    assert not any(m.complete for m in server.messages) or statuses[0] is D
    server.respond = lambda *a: None
    assert [o.status for o in client.deliver(SENDER, ["c@x.test"], [MESSAGE])] == [D]
    client.close()


# Where the server stops answering, and the one timeout (of FAST's) made short for it:
# the server never answers at all, so nothing depends on how fast this machine is.
STALLS = [
    ("greeting", on("greeting", STALL), {"greeting_s": 0.3}, [DEF, DEF], "waiting for the greeting"),
    ("LHLO", on("lhlo", STALL), {"command_s": 0.3}, [DEF, DEF], "waiting for LHLO"),
    ("RCPT", on("rcpt", STALL, lambda a: a == "b@x.test"), {"command_s": 0.3}, [DEF, DEF],
     "waiting for RCPT"),
    ("after DATA", on("data", STALL), {"data_init_s": 0.3}, [DEF, DEF], "waiting for DATA"),
    ("not reading the content", on("content", FREEZE), {"data_block_s": 0.3}, [DEF, DEF],
     "sending the message"),
    ("second final reply", on("final", STALL, lambda a: a == "b@x.test"), {"data_done_s": 1.0},
     [D, DEF], "waiting for the reply after the message"),
    ("RSET", on("rset", STALL), {"rset_s": 0.3}, None, None),
]


@pytest.mark.parametrize("chunking, respond, timeouts, statuses, step", with_modes(STALLS))
def test_slow_server_times_out(fake, chunking, respond, timeouts, statuses, step):
    server = fake(respond, extensions=("PIPELINING", "CHUNKING") if chunking else ("PIPELINING",))
    # BDAT chunks of 32 MiB: one is more than the loopback socket buffers hold.
    client = client_for(server, timeouts=dataclasses.replace(FAST, **timeouts),
                        chunk_bytes=32 << 20)
    if statuses is None:
        # RSET only comes with a second message: the stalled connection is replaced.
        assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
        assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
        assert client.connections_made == 2
        return
    # The big message (64 MB, one piece repeated) is more than any socket buffers.
    content = [b"y" * 1000 + b"\r\n"] * 64_000 if "sending" in step else [MESSAGE]
    outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], content)
    assert [o.status for o in outcomes] == statuses
    assert f"timed out {step}" == outcomes[1].reply, outcomes[1].reply
    assert not client.connected


def test_progress_is_called_while_waiting(fake):
    calls = []
    server = fake(on("greeting", STALL))
    timeouts = L.Timeouts(greeting_s=1.5)
    client = L.LMTPClient(server.target, HOST, timeouts=timeouts, progress=lambda: calls.append(1))
    assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is DEF
    assert calls      # at least once per PROGRESS_INTERVAL_S of waiting


def test_exception_from_progress_propagates_and_drops(fake):
    """The delivery process may stop a transfer from its progress callback (a signal)."""
    server = fake()
    armed = []

    def progress():
        if armed:
            raise KeyboardInterrupt

    def content():
        yield b"Subject: x\r\n\r\n"
        armed.append(True)
        yield b"more\r\n"
    client = client_for(server, progress=progress)
    with pytest.raises(KeyboardInterrupt):
        client.deliver(SENDER, ["a@x.test"], content())
    assert not client.connected
    armed.clear()
    assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
    assert [m.complete for m in server.messages] == [False, True]


def test_content_error_aborts_without_ending_the_message(fake):
    """A queue file that cannot be read half way: the exception is the caller's, and the
    server must not take what was sent so far as the message."""
    for chunking in (False, True):
        server = fake(extensions=("PIPELINING", "CHUNKING") if chunking else ("PIPELINING",))

        def pieces():
            yield b"Subject: half\r\n\r\n" + b"z" * 100_000 + b"\r\n"
            yield b"z" * 100_000 + b"\r\n"
            raise OSError(5, "Input/output error")
        client = client_for(server, chunk_bytes=1000)
        with pytest.raises(OSError):
            client.deliver(SENDER, ["a@x.test"], pieces())
        assert not client.connected
        assert [o.status for o in client.deliver(SENDER, ["a@x.test"], [MESSAGE])] == [D]
        client.close()
        assert [m.complete for m in server.messages] == [False, True]


def test_bdat_when_chunking_is_offered(fake):
    server = fake(extensions=("PIPELINING", "CHUNKING", "8BITMIME"))
    content = [b"Subject: x\r\n", b"\r\n", b".dot\nbare LF\r\n" * 100, b"no end"]
    with client_for(server, chunk_bytes=500) as client:
        outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], content)
        assert [o.status for o in outcomes] == [D, D]
        assert client.deliver(SENDER, ["a@x.test"], [])[0].status is D
    first, empty = server.messages
    assert first.via == "BDAT" and first.complete
    expected = b"".join(L.crlf_lines(content))
    assert first.content == expected           # no stuffing, no added line end
    assert len(first.chunks) > 1
    bdats = [c for c in server.sessions[0].commands if c.startswith("BDAT")]
    assert bdats[-2].endswith(" LAST") and not any(c.endswith("LAST") for c in bdats[:-2])
    assert bdats[-1] == "BDAT 0 LAST" and empty.content == b""


def test_no_chunking_when_turned_off(fake):
    server = fake(extensions=("PIPELINING", "CHUNKING"))
    with client_for(server, use_chunking=False) as client:
        assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
    assert server.messages[0].via == "DATA"


def test_bdat_chunk_refused(fake):
    server = fake(on("bdat", b"552 5.3.4 too big\r\n"), extensions=("PIPELINING", "CHUNKING"))
    client = client_for(server, chunk_bytes=100)
    outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], [b"x" * 99 + b"\n"] * 5)
    assert [(o.status, o.reply) for o in outcomes] == [(F, "BDAT: 552 5.3.4 too big")] * 2
    server.respond = lambda *a: None
    assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
    assert client.connections_made == 1
    client.close()


def test_421_to_a_recipient_defers_the_rest_and_reconnects(fake):
    """RFC 5321 §3.8: after a 421 the server is going away; nothing more is sent."""
    server = fake(on("rcpt", b"421 4.3.2 shutting down\r\n", lambda a: a == "b@x.test"))
    client = client_for(server)
    outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], [MESSAGE])
    assert [(o.status, o.code) for o in outcomes] == [(DEF, None), (DEF, 421)]
    assert "closing" in outcomes[0].reply
    assert server.messages == []
    server.respond = lambda *a: None
    assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D
    assert client.connections_made == 2
    client.close()


# Replies the client cannot make sense of: the connection is given up, copies deferred.
BAD_REPLIES = [
    ("huge greeting line", on("greeting", b"220 " + b"x" * 10_000 + b"\r\n"), "longer than 2048"),
    ("endless LHLO", on("lhlo", b"250-x\r\n" * 200 + b"250 y\r\n"), "more than 100 lines"),
    ("no code", on("mail", b"OK\r\n"), "malformed reply"),
    ("two digits", on("mail", b"25 OK\r\n"), "malformed reply"),
    ("no separator", on("mail", b"250OK\r\n"), "malformed reply"),
    ("code 1xx", on("mail", b"150 go on\r\n"), "malformed reply"),
    ("code 6xx", on("mail", b"650 what\r\n"), "malformed reply"),
    ("codes differ", on("mail", b"250-OK\r\n251 OK\r\n"), "malformed reply"),
    ("354 to MAIL", on("mail", b"354 go ahead\r\n"), "unexpected reply to MAIL"),
    ("354 to RCPT", on("rcpt", b"354 go ahead\r\n"), "unexpected reply to RCPT"),
    ("250 to DATA", on("data", b"250 fine\r\n"), "unexpected reply to DATA"),
    ("greeting 554", on("greeting", b"554 5.3.2 not now\r\n"), "server greeting: 554"),
    ("greeting 421", on("greeting", b"421 4.3.2 busy\r\n"), "server greeting: 421"),
    ("LHLO refused", on("lhlo", b"500 5.5.1 what is LHLO\r\n"), "LHLO: 500"),
]


@pytest.mark.parametrize("respond, words", [c[1:] for c in BAD_REPLIES], ids=[c[0] for c in BAD_REPLIES])
def test_unintelligible_or_refusing_server_defers(fake, respond, words):
    server = fake(respond)
    client = client_for(server)
    outcomes = client.deliver(SENDER, ["a@x.test", "b@x.test"], [MESSAGE])
    assert [o.status for o in outcomes] == [DEF, DEF]
    assert words in outcomes[0].reply, outcomes[0].reply
    assert not client.connected
    assert server.messages == [] or not server.messages[0].complete


def test_tolerated_reply_forms(fake):
    """Bare LF line ends and a code alone on the last line are read fine."""
    server = fake(on("mail", b"250-first\n250\n"))
    with client_for(server) as client:
        assert client.deliver(SENDER, ["a@x.test"], [MESSAGE])[0].status is D


def test_smtputf8_needed_but_not_offered(fake):
    server = fake()
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, ["ålice@example.org", "bob@example.org"], [MESSAGE],
                                  smtputf8=True)
        assert [(o.status, o.code) for o in outcomes] == [(F, None), (D, 250)]
        assert "needs SMTPUTF8" in outcomes[0].reply
        all_failed = client.deliver("sénder@remote.test", ["bob@example.org"], [MESSAGE])
        assert [o.status for o in all_failed] == [F]
    assert [m.recipients for m in server.messages] == [["bob@example.org"]]
    assert not any("sénder" in c for c in server.sessions[0].commands)
    assert f"MAIL FROM:<{SENDER}>" in server.sessions[0].commands     # no SMTPUTF8 parameter


def test_smtputf8_offered(fake):
    server = fake(extensions=("PIPELINING", "SMTPUTF8", "8BITMIME"))
    with client_for(server) as client:
        outcomes = client.deliver("sénder@remote.test", ["ålice@example.org"], [MESSAGE])
        assert outcomes[0].status is D
        assert client.deliver(SENDER, ["bob@example.org"], [MESSAGE], smtputf8=True)[0].status is D
        assert client.deliver(SENDER, ["bob@example.org"], [MESSAGE])[0].status is D
    commands = server.sessions[0].commands
    assert "MAIL FROM:<sénder@remote.test> SMTPUTF8" in commands
    assert "RCPT TO:<ålice@example.org>" in commands
    assert f"MAIL FROM:<{SENDER}> SMTPUTF8" in commands       # the message came with SMTPUTF8
    assert f"MAIL FROM:<{SENDER}>" in commands                # this one did not


def test_size(fake):
    server = fake(extensions=("PIPELINING", "SIZE 1000"))
    with client_for(server) as client:
        too_big = client.deliver(SENDER, ["a@x.test", "b@x.test"], [MESSAGE], size=1001)
        assert [o.status for o in too_big] == [F, F]
        assert "size limit of 1000" in too_big[0].reply
        assert client.deliver(SENDER, ["a@x.test"], [MESSAGE], size=len(MESSAGE))[0].status is D
    assert f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}" in server.sessions[0].commands
    assert len(server.messages) == 1


@pytest.mark.parametrize("bad", ["a\r\nRSET@x.test", "a\x00@x.test", "a\udc80@x.test"],
                         ids=["CRLF", "NUL", "lone surrogate"])
def test_unsendable_addresses_fail_without_reaching_the_wire(fake, bad):
    server = fake()
    with client_for(server) as client:
        outcomes = client.deliver(SENDER, [bad, "ok@x.test"], [MESSAGE])
        assert [o.status for o in outcomes] == [F, D]
        assert [o.status for o in client.deliver(bad, ["ok@x.test"], [MESSAGE])] == [F]
    assert server.messages[0].recipients == ["ok@x.test"]
    assert len(server.messages) == 1


def test_no_recipients_no_connection(fake):
    server = fake()
    assert client_for(server).deliver(SENDER, [], [MESSAGE]) == []
    assert server.sessions == []


def test_close_is_idempotent_and_quits(fake):
    server = fake()
    client = client_for(server)
    client.close()                       # never connected
    client.deliver(SENDER, ["a@x.test"], [MESSAGE])
    client.close()
    client.close()
    assert server.sessions[0].commands[-1] == "QUIT"


# --- real Dovecot ---------------------------------------------------------------------

# What Dovecot's LMTP puts in front of a message it stores: Return-Path (RFC 2033 §4.2
# leaves that to the server), Delivered-To (when the transaction had one recipient), and
# its own Received (with continuation lines).
DOVECOT_ADDED = re.compile(rb"Return-Path: <[^\r\n]*>\r\n(?:Delivered-To: [^\r\n]*\r\n)?"
                           rb"Received: from [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def made(message_id: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (b"Received: from client.test (unknown [192.0.2.9])\r\n\tby mx.example.org (ccsmtp) "
            b"with ESMTP id QID; Sun, 29 Nov 2026 18:00:00 +0000\r\n"
            b"From: sender@remote.test\r\nTo: alice@example.org\r\n"
            + f"Subject: test\r\nMessage-ID: <{message_id}>\r\n\r\n".encode() + body)


def stored(dovecot_instance, user: str, message_id: str) -> bytes:
    """The one stored message with this Message-ID, minus the headers Dovecot adds in
    front (Return-Path, Delivered-To, Received: nothing else may differ)."""
    marker = f"Message-ID: <{message_id}>".encode()
    found = [m for m in dovecot_instance.messages(user) if marker in m]
    assert len(found) == 1, (user, message_id, len(found), dovecot_instance.log()[-2000:])
    added = DOVECOT_ADDED.match(found[0])
    assert added and b"with LMTP" in added.group(), found[0][:500]
    return found[0][added.end():]


def dovecot_client(instance, **kwargs) -> L.LMTPClient:
    target = DeliveryTarget("lmtp", host="127.0.0.1", port=instance.lmtp_port)
    return L.LMTPClient(target, HOST, timeouts=FAST, **kwargs)


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
def test_dovecot_byte_exact_for_two_users(dovecot, chunking):
    body = (b"Line one.\r\n.starts with a dot\r\n.\r\n..\r\n" + "Grüße 8-bit\r\n".encode()
            + b"x" * 5000 + b"\r\nend\r\n")
    message = made(f"exact-{chunking}@test", body)
    pieces = [message[i:i + 777] for i in range(0, len(message), 777)]
    with dovecot_client(dovecot, use_chunking=chunking) as client:
        outcomes = client.deliver(SENDER, ["alice@example.org", "bob@example.org"], pieces,
                                  body="8BITMIME")
        assert "CHUNKING" in client.extensions and "PIPELINING" in client.extensions
    assert [o.status for o in outcomes] == [D, D], outcomes
    assert all(o.reply.startswith("250 2.0.0 <") for o in outcomes)
    for user in ("alice", "bob"):
        assert stored(dovecot, user, f"exact-{chunking}@test") == message


def test_dovecot_unknown_user_fails_alone(dovecot):
    message = made("unknown@test")
    with dovecot_client(dovecot) as client:
        outcomes = client.deliver(SENDER, ["alice@example.org", "nosuchuser@example.org",
                                           "bob@example.org"], [message])
    assert outcome_summary(outcomes) == [("alice@example.org", D, 250),
                                         ("nosuchuser@example.org", F, 550),
                                         ("bob@example.org", D, 250)]
    assert "5.1.1" in outcomes[1].reply
    assert stored(dovecot, "alice", "unknown@test") == message
    assert stored(dovecot, "bob", "unknown@test") == message


def test_dovecot_several_messages_one_connection_and_unix_socket(dovecot):
    target = DeliveryTarget("lmtp", path=str(dovecot.lmtp_socket))
    with L.LMTPClient(target, HOST, timeouts=FAST) as client:
        for i in range(3):
            message = made(f"socket-{i}@test")
            assert client.deliver("", ["alice@example.org"], [message])[0].status is D
        assert client.connections_made == 1
    for i in range(3):
        assert stored(dovecot, "alice", f"socket-{i}@test") == made(f"socket-{i}@test")


def test_dovecot_large_message_streamed(dovecot):
    line = b"." + b"0123456789" * 9 + b"\n"         # leading dots and bare LFs
    pieces = [made("large@test")] + [line * 1000 for _ in range(30)]   # ~2.8 MB
    for chunking in (True, False):
        with dovecot_client(dovecot, use_chunking=chunking) as client:
            assert client.deliver(SENDER, [f"{'alice' if chunking else 'bob'}@example.org"],
                                  iter(pieces))[0].status is D
    expected = made("large@test") + line.replace(b"\n", b"\r\n") * 30_000
    assert stored(dovecot, "alice", "large@test") == expected
    assert stored(dovecot, "bob", "large@test") == expected


def test_dovecot_and_smtputf8(dovecot):
    """Dovecot 2.3 offers no SMTPUTF8: the copy that needs it fails here without being
    sent, the other goes. (A Dovecot that offers it is asked, and has no such user.)"""
    message = made("utf8@test")
    with dovecot_client(dovecot) as client:
        outcomes = client.deliver(SENDER, ["ålice@example.org", "bob@example.org"], [message],
                                  smtputf8=True)
        offered = "SMTPUTF8" in client.extensions
    assert [o.status for o in outcomes] == [F, D], outcomes
    assert outcomes[0].code == (550 if offered else None)
    assert offered or "needs SMTPUTF8" in outcomes[0].reply
    assert stored(dovecot, "bob", "utf8@test") == message


def test_dovecot_restarted_lmtp_process_reconnects(dovecot):
    """The LMTP process serving our connection goes away between two messages (as on
    Dovecot's idle timeout): the next message goes over a new connection."""
    with dovecot_client(dovecot) as client:
        assert client.deliver(SENDER, ["alice@example.org"], [made("before@test")])[0].status is D
        lmtp = [p for p in psutil.Process(dovecot.proc.pid).children(recursive=True)
                if "lmtp" in " ".join(p.cmdline())]
        assert lmtp, [p.cmdline() for p in psutil.Process(dovecot.proc.pid).children()]
        for proc in lmtp:
            os.kill(proc.pid, signal.SIGTERM)
        psutil.wait_procs(lmtp, timeout=10)
        assert client.deliver(SENDER, ["alice@example.org"], [made("after@test")])[0].status is D
        assert client.connections_made == 2
    assert stored(dovecot, "alice", "after@test") == made("after@test")


def test_dovecot_imap_reads_what_lmtp_delivered(dovecot_factory):
    """The fixture's IMAP side, as the integration test behind HAProxy will use it."""
    instance = dovecot_factory(users=("carol",), imap=True)
    message = made("imap@test")
    with dovecot_client(instance) as client:
        assert client.deliver(SENDER, ["carol@example.org"], [message])[0].status is D
    imap = imaplib.IMAP4("127.0.0.1", instance.imap_port)
    try:
        imap.login("carol", instance.password)
        imap.select("INBOX")
        _, data = imap.fetch("1", "(BODY.PEEK[])")
        fetched = data[0][1]
    finally:
        imap.logout()
    added = DOVECOT_ADDED.match(fetched)
    assert added and fetched[added.end():] == message
