"""Property tests for the SMTP state machine: any input yields replies, never a crash.

Streams are raw bytes, or lines from a grammar of plausible SMTP mixed with junk, cut
into arbitrary chunks. Invariants: feed() never raises; every SendReply is one or more
well-formed RFC 5321 §4.2 reply lines; nothing is said after CloseConnection; no address
in a StoreMessage holds CR, LF or NUL; and the same stream gives the same transcript
however it is chunked. Bounded: a few hundred examples each, the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_smtp import config
from prefork_smtp.smtp import protocol as P
from prefork_smtp.smtp import replies as R
from prefork_smtp.store.mailboxes import Router

HOST = "mx.example.org"
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_conn(chunk_bytes: int | None = None, **overrides) -> P.SMTPConnection:
    values = {"hostname": HOST, "domains": ["example.org", "localhost"],
              "listen": ["127.0.0.1:2525"], "workers": 1, "spool": "/nonexistent"}
    values.update(overrides)
    cfg = config.build(values)
    router = Router(cfg.domains, recipients=cfg.recipients, aliases=cfg.aliases,
                    catchall=cfg.catchall)
    return P.SMTPConnection(cfg, router, client_address="192.0.2.9", chunk_bytes=chunk_bytes)


# Deep: errors never end the session, so the whole stream is exercised.
DEEP = {"hard_error_limit": 100_000}
# Small: a small size limit, so messages cross it often.
SMALL = {"hard_error_limit": 100_000, "max_size": 64}
# Tight: every limit is small, so the limit paths are exercised.
TIGHT = {"hard_error_limit": 3, "max_size": 64, "max_recipients": 2,
         "recipients": ["alice"], "aliases": {"info": "alice"}, "catchall": "rest"}


# --- streams --------------------------------------------------------------------------

PLAUSIBLE = [
    b"EHLO client.example.net", b"HELO x", b"EHLO", b"ehlo [192.0.2.1]",
    b"MAIL FROM:<a@example.net>", b"MAIL FROM:<>", b"mail from: <b@example.net> SIZE=99",
    b"MAIL FROM:<a@example.net> SIZE=100 BODY=8BITMIME SMTPUTF8",
    "MAIL FROM:<jörg@example.net> SMTPUTF8".encode(), b"MAIL FROM:<a@example.net> FOO=1",
    b"RCPT TO:<alice@example.org>", b"RCPT TO:<postmaster>", b"RCPT TO:<Info+x@localhost>",
    b"RCPT TO:<bob@elsewhere.test>", b'RCPT TO:<"a/b"@example.org>',
    "RCPT TO:<jörg@example.org>".encode(), b"RCPT TO:<@a.test:x@example.org>",
    b"RCPT TO:<x@example.org> NOTIFY=NEVER", b"RCPT TO:<a\x00b@example.org>",
    b"DATA", b"DATA", b"DATA", b"RSET", b"NOOP", b"VRFY alice", b"EXPN list", b"HELP",
    b"QUIT x", b".", b"..", b"...x", b"Received: from a by b", b"Subject: hi", b"",
    b"A" * 1100, b"B" * 70,
]
TERMINATORS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\n.\r\n", b"\n.\n",
               b"\r.\r", b"\r\n.\n"]

junk = st.binary(max_size=40)
line = st.one_of(st.sampled_from(PLAUSIBLE), st.sampled_from(PLAUSIBLE), junk)
terminator = st.sampled_from(TERMINATORS)
command = st.tuples(line, terminator).map(b"".join)
mail = st.sampled_from([p for p in PLAUSIBLE if p.upper().startswith(b"MAIL")])
rcpt = st.sampled_from([p for p in PLAUSIBLE if p.upper().startswith(b"RCPT")])
content = st.lists(st.tuples(st.one_of(st.sampled_from(PLAUSIBLE[-9:]), junk), terminator),
                   max_size=8).map(lambda parts: b"".join(text + end for text, end in parts))
# A transaction that is mostly well-formed, so DATA, storing and the limits get reached.
transaction = st.tuples(
    mail, st.lists(rcpt, min_size=1, max_size=3), content,
    st.sampled_from([b".\r\n", b".\r\n", b"\r\n.\r\n", b".\n", b""]),
).map(lambda t: t[0] + b"\r\n" + b"".join(r + b"\r\n" for r in t[1]) + b"DATA\r\n"
      + t[2] + t[3])
grammar_stream = st.tuples(
    st.sampled_from([b"EHLO c.example.net\r\n", b"HELO c\r\n", b""]),
    st.lists(st.one_of(command, transaction), max_size=25),
).map(lambda t: t[0] + b"".join(t[1]))
binary_stream = st.binary(max_size=3000)
any_stream = st.one_of(grammar_stream, binary_stream)


def chunked(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=30))))
    bounds = [0] + cuts + [len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


# --- driving a session ----------------------------------------------------------------

_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\r\n")
_UNSAFE = re.compile(r"[\r\n\x00]")


def check_reply(reply: bytes) -> None:
    lines = re.findall(rb"[^\n]*\n", reply)
    assert lines and b"".join(lines) == reply, reply
    for i, text in enumerate(lines):
        assert _REPLY_LINE.fullmatch(text), f"malformed reply line {text!r}"
        assert text[3:4] == (b" " if i == len(lines) - 1 else b"-"), reply
        assert text[:3] == lines[0][:3], reply


@dataclasses.dataclass
class Transcript:
    replies: list[bytes] = dataclasses.field(default_factory=list)
    messages: list[tuple[P.Envelope, bytes]] = dataclasses.field(default_factory=list)
    closed: bool = False


def run(chunks: list[bytes], failures: list[bool] = (), chunk_bytes: int | None = None,
        **overrides) -> Transcript:
    """Feed the chunks; store each message, or fail it where failures says so. With
    chunk_bytes the connection streams DATA in MessageChunks; messages hold it joined."""
    conn = make_conn(chunk_bytes, **overrides)
    out = Transcript()
    pieces: list[bytes] = []

    def take(events: list[P.Event]) -> None:
        for i, event in enumerate(events):
            assert not out.closed or isinstance(event, P.CloseConnection), \
                f"{event!r} after CloseConnection"
            if isinstance(event, P.SendReply):
                check_reply(event.data)
                out.replies.append(event.data)
            elif isinstance(event, P.StoreMessage):
                assert i == len(events) - 1
                envelope = event.envelope
                for address in [envelope.mail_from] + [r.address for r in envelope.recipients]:
                    assert not _UNSAFE.search(address), envelope
                assert envelope.recipients
                out.messages.append((envelope, b"".join(pieces) + event.content))
                pieces.clear()
                n = len(out.messages)
                fail = n <= len(failures) and failures[n - 1]
                take(conn.store_failed(R.LOCAL_ERROR) if fail else conn.stored("QID"))
            elif isinstance(event, P.MessageChunk):
                assert chunk_bytes and conn.reading_data
                pieces.append(event.data)
            elif isinstance(event, P.MessageAborted):
                pieces.clear()
            elif isinstance(event, P.CloseConnection):
                out.closed = True
            else:
                raise AssertionError(event)

    take(conn.greeting())
    for chunk in chunks:
        take(conn.feed(chunk))
    if out.closed:
        assert conn.feed(b"NOOP\r\n") == []
    return out


# --- properties -----------------------------------------------------------------------

chunk_bytes = st.sampled_from([None, 1, 8, 64])


@FUZZ
@given(stream=any_stream, data=st.data(), chunk_bytes=chunk_bytes)
def test_any_stream_any_chunking_gives_well_formed_replies(stream, data, chunk_bytes):
    failures = data.draw(st.lists(st.booleans(), max_size=5))
    run(chunked(data, stream), failures, chunk_bytes, **DEEP)
    run(chunked(data, stream), failures, chunk_bytes, **TIGHT)


@FUZZ
@given(stream=any_stream, data=st.data(), chunk_bytes=chunk_bytes,
       limits=st.sampled_from([DEEP, SMALL]))
def test_chunking_does_not_change_the_transcript(stream, data, chunk_bytes, limits):
    # However the input is cut, and whether DATA is streamed in MessageChunks or not.
    whole = run([stream], **limits)
    assert run(chunked(data, stream), (), chunk_bytes, **limits) == whole


@FUZZ
@given(stream=grammar_stream)
def test_byte_at_a_time_equals_whole(stream):
    whole = run([stream], **DEEP)
    assert run([stream[i:i + 1] for i in range(len(stream))], **DEEP) == whole


@FUZZ
@given(stream=grammar_stream)
def test_each_command_line_gets_exactly_one_reply(stream):
    # Outside DATA, every line a client sends is answered once (RFC 5321 §4.2; pipelining
    # depends on it). Check it on the prefix of the stream before the first DATA.
    head = re.split(rb"(?i)data|quit", stream, maxsplit=1)[0]
    head = head[:head.rfind(b"\n") + 1]
    lines = head.count(b"\n")
    out = run([head], **DEEP)
    assert len(out.replies) - 1 == lines
