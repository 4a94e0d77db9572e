"""Property test for the IMAP state machine with the mailbox commands over a real mail
store: any octets, in any chunking, before or after login, give responses (tagged,
untagged, continuation requests) and never an exception; nothing is written after
Close; a password is never handed out when plaintext is not allowed.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_smtp.imap import protocol as IP

from test_imap_protocol import Driver, make_spool

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
# A response line: tagged or untagged status/data, or a continuation request; literal
# octets inside FETCH responses are skipped by their announced size.
# A tag is any run of ASTRING-CHARs but "+" (RFC 3501 §9), as the parser checked it.
_LINE = re.compile(rb'(\* |\+ |[^ \x00-\x1f\x7f-\xff(){%*"\\+]+ (OK|NO|BAD) )')

COMMANDS = [
    b"a CAPABILITY", b"b NOOP", b"c LOGIN alice secret", b"c2 LOGIN alice wrong",
    b"d SELECT INBOX", b"d2 EXAMINE INBOX", b"e FETCH 1:* (FLAGS ENVELOPE BODYSTRUCTURE)",
    b"f UID FETCH 1:* (BODY[] BODY.PEEK[HEADER] RFC822.SIZE INTERNALDATE)",
    b"g STORE 1 +FLAGS (\\Deleted)", b"h EXPUNGE", b"i UID EXPUNGE 1:2", b"j SEARCH ALL",
    b"k UID SEARCH SUBJECT message", b"l IDLE", b"DONE", b"m CLOSE", b"n STATUS INBOX (MESSAGES)",
    b"o LIST \"\" *", b"p APPEND INBOX {3}", b"q APPEND INBOX {3+}", b"abc", b"r LOGOUT",
    b"s AUTHENTICATE PLAIN", b"AGFsaWNlAHNlY3JldA==", b"*", b"t STARTTLS", b"u LOGIN {5}",
    b"alice", b"v FETCH 99 FLAGS", b"w COPY 1 INBOX", b"x NAMESPACE", b"y CHECK",
]

streams = st.lists(st.one_of(
    st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"),
    st.binary(max_size=40),
    st.sampled_from([b"\r\n", b"{5}\r\n", b"\0", b"\xff", b" (", b")"]),
), max_size=25)


def check_output(out: bytes) -> None:
    pos = 0
    while pos < len(out):
        assert _LINE.match(out, pos), out[pos:pos + 80]
        end = out.index(b"\r\n", pos)
        literal = re.search(rb"\{(\d+)\}$", out[pos:end])
        pos = end + 2
        while literal:                      # octets of a literal, then the rest of the line
            pos += int(literal.group(1))
            end = out.index(b"\r\n", pos)
            literal = re.search(rb"\{(\d+)\}$", out[pos:end])
            pos = end + 2


@FUZZ
@given(chunks=streams, cut=st.integers(min_value=1, max_value=7),
       plaintext=st.booleans(), tls_cert=st.booleans())
def test_any_input_gives_responses_never_an_exception(chunks, cut, plaintext, tls_cert):
    with tempfile.TemporaryDirectory() as tmp:
        spool = make_spool(Path(tmp) / "spool", count=2)
        d = Driver(spool, plaintext=plaintext, starttls=tls_cert, error_limit=50)
        data = b"".join(chunks)
        for i in range(0, len(data), cut):
            if d.closed or d.types(IP.StartTLS):
                break
            d.carry(d.conn.feed(data[i:i + cut]))
        check_output(bytes(d.out))
        if not plaintext:
            assert d.logins == []
