"""Property tests for the IMAP command parser: any octets, in any chunking, give events,
never an exception (h11's fuzz invariant).

Streams are raw bytes, or lines drawn from plausible IMAP (every command, literal markers
of every form and size, NUL, 8-bit, over-long lines) mixed with junk, cut into arbitrary
chunks. Invariants: next_event() never raises; events are Command / SendContinuation /
ParseError / Line with reply-ready reasons; nothing comes after a fatal error; the same
stream gives the same events however it is chunked; the parser never holds more than its
limits plus the chunk just fed (so literal sizes are checked before any allocation).
Also: every string response.string() writes reads back through the parser's grammar.
Bounded: a few hundred examples each; the file runs in seconds.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_smtp.imap import grammar as G
from prefork_smtp.imap import parser as P
from prefork_smtp.imap import response as T

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = {"max_line_bytes": 200, "max_literal_bytes": 100}
FIXED_REASONS = {T.LINE_TOO_LONG, T.LITERAL_TOO_BIG, T.NUL_IN_COMMAND, T.BARE_CR,
                 T.EIGHT_BIT_OUTSIDE_LITERAL, T.EMPTY_LINE, T.INVALID_TAG, T.MISSING_COMMAND,
                 T.UNKNOWN_COMMAND, T.UNKNOWN_UID_COMMAND, T.LITERAL_NOT_ALLOWED}


def transcript(chunks: list[bytes]) -> list:
    """Feed the chunks, acting at pauses like a state machine would (STARTTLS resumes
    without discarding: what is buffered then depends on the chunking), checking the
    memory bound after every chunk."""
    parser = P.CommandParser(**LIMITS)
    events: list = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while True:
            event = parser.next_event()
            if event is P.Status.NEED_DATA:
                break
            if event is P.Status.PAUSED:
                last = events[-1]
                if isinstance(last, P.Command) and last.name in ("IDLE", "AUTHENTICATE"):
                    parser.expect_line()
                else:
                    parser.resume()
                continue
            events.append(event)
        assert parser.held_bytes <= LIMITS["max_line_bytes"] + LIMITS["max_literal_bytes"] + len(chunk)
    return events


def check(events: list) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, (P.Command, P.SendContinuation, P.ParseError, P.Line)), event
        if isinstance(event, P.ParseError):
            assert event.reason in FIXED_REASONS or event.reason.startswith(T.BAD_ARGUMENTS + ": ")
            assert event.reason.isprintable() and event.reason.isascii()
            if event.tag is not None:
                assert event.tag and all(c in G.ASTRING_CHARS and c != ord("+")
                                         for c in event.tag.encode("ascii"))
            if event.fatal:
                assert i == len(events) - 1, "events after a fatal error"
            T.bad(event.tag, event.reason)          # formats without error
        elif isinstance(event, P.Command):
            table = G.UID_COMMANDS if event.uid else G.COMMANDS
            assert event.name in table
        elif isinstance(event, P.SendContinuation):
            assert 0 <= event.size <= LIMITS["max_literal_bytes"]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    pieces, start = [], 0
    for p in points + [len(data)]:
        pieces.append(data[start:p])
        start = p
    return [p for p in pieces if p]


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=20))
def test_random_bytes(data: bytes, points: list[int]) -> None:
    whole = transcript([data])
    check(whole)
    assert transcript(cut(data, points)) == whole


PLAUSIBLE = [
    b"a1 NOOP", b"a2 CAPABILITY", b"a3 LOGIN alice secret", b'a4 LOGIN "a\\"b" {3}', b"abc",
    b"a5 SELECT INBOX", b"a6 FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (From To)]<0.10>)",
    b"a7 UID SEARCH CHARSET UTF-8 OR FROM {2+}", b"xy", b"a8 STORE 1 +FLAGS (\\Seen)",
    b"a9 IDLE", b"DONE", b"b1 AUTHENTICATE PLAIN", b"AGFsaWNlAHNlY3JldA==", b"*",
    b"b2 APPEND INBOX {20}", b"b3 APPEND INBOX {5+}", b"hello", b"b4 STARTTLS",
    b"b5 SEARCH " + b"(" * 120, b")" * 50, b"b6 SEARCH NOT NOT NOT ALL", b"b7 UID EXPUNGE 1:*",
    b"b8 STATUS INBOX (MESSAGES)", b"b9 LIST \"\" *", b"c1 LOGIN {0}", b"{1}", b"{100}", b"{101}",
    b"{4294967295}", b"{99+}", b"{101+}", b"c2 LOGIN a\x00b c", b"c3 NOOP \xff", b"c4 NOOP\rx",
    b"x" * 250, b"c5 LOGIN " + b"y" * 210 + b" {5}", b"c6 LOGIN " + b"y" * 210 + b" {5+}",
    b"", b" ", b"+", b"c7 UID", b"c8 FETCH 1 BODY[1.2.MIME]", b"c9 ENABLE X", b"d1 FROB {2+}",
]


@st.composite
def plausible_streams(draw) -> bytes:
    lines = draw(st.lists(st.one_of(st.sampled_from(PLAUSIBLE), st.binary(max_size=30)),
                          max_size=25))
    ends = draw(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r\n", b""]),
                         min_size=len(lines), max_size=len(lines)))
    return b"".join(line + end for line, end in zip(lines, ends))


@FUZZ
@given(plausible_streams(), st.lists(st.integers(min_value=0), max_size=30))
def test_plausible_streams(data: bytes, points: list[int]) -> None:
    whole = transcript([data])
    check(whole)
    assert transcript(cut(data, points)) == whole
    assert transcript([data[i:i + 1] for i in range(len(data))]) == whole


@FUZZ
@given(st.binary(max_size=300).filter(lambda b: b"\0" not in b))
def test_strings_read_back(value: bytes) -> None:
    """What response.string()/astring() write is what the grammar reads (RFC 3501 §9)."""
    for encoded in (T.string(value), T.astring(value)):
        r = G._Reader(encoded)
        assert r.astring() == value
        assert r.at_end()
