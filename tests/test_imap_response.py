"""Unit tests for IMAP response formatting (prefork_smtp.imap.response, RFC 3501 §7, §9)
and FETCH item rendering (prefork_smtp.imap.fetch, RFC 3501 §6.4.5, §7.4.2)."""

from __future__ import annotations

import datetime

import pytest

from prefork_smtp.imap import commands as C
from prefork_smtp.imap import fetch as F
from prefork_smtp.imap import grammar as G
from prefork_smtp.imap import parser as P
from prefork_smtp.imap import response as R
from prefork_smtp.imap.message import MailItem, lazy_message


@pytest.mark.parametrize("value, expected", [
    (b"plain", b'"plain"'),
    (b"", b'""'),
    (b'say "hi" \\o/', b'"say \\"hi\\" \\\\o/"'),
    ("caf\u00e9", b"{5}\r\ncaf\xc3\xa9"),            # 8-bit: a literal (RFC 3501 §9 QUOTED-CHAR is 7-bit)
    (b"two\r\nlines", b"{10}\r\ntwo\r\nlines"),
    (b"bare\nLF", b"{7}\r\nbare\nLF"),
    (b"a\x00b", b"{3}\r\na\x80b"),                  # NUL never goes on the wire
    (b"x" * R.MAX_QUOTED_BYTES, b'"' + b"x" * R.MAX_QUOTED_BYTES + b'"'),
    (b"x" * (R.MAX_QUOTED_BYTES + 1), b"{1025}\r\n" + b"x" * (R.MAX_QUOTED_BYTES + 1)),
    (b"tab\there", b'"tab\there"'),
])
def test_string(value, expected: bytes) -> None:
    assert R.string(value) == expected


def test_nstring_astring_quoted() -> None:
    assert R.nstring(None) == b"NIL" and R.nstring(b"x") == b'"x"'
    assert R.astring(b"INBOX") == b"INBOX"
    assert R.astring(b"NIL") == b'"NIL"' and R.astring(b"") == b'""'
    assert R.astring(b"a b") == b'"a b"' and R.astring(b"a]") == b'"a]"'
    with pytest.raises(ValueError):
        R.quoted(b"a\r\n")


def test_flag_list_and_numbers() -> None:
    assert R.flag_list([]) == b"()"
    assert R.flag_list(["\\Seen", "$Work"]) == b"(\\Seen $Work)"
    assert R.number(0) == b"0"
    assert F.sorted_flags({"zz", "\\Seen", "\\Recent", "\\Answered", "$a"}) == [
        "\\Answered", "\\Seen", "\\Recent", "$a", "zz"]


@pytest.mark.parametrize("when, expected", [
    (datetime.datetime(1996, 7, 17, 2, 44, 25, tzinfo=datetime.timezone(-datetime.timedelta(hours=7))),
     b'"17-Jul-1996 02:44:25 -0700"'),
    (datetime.datetime(2024, 1, 5, 23, 0, 9, tzinfo=datetime.timezone.utc), b'" 5-Jan-2024 23:00:09 +0000"'),
    (datetime.datetime(2024, 12, 31, 0, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
     b'"31-Dec-2024 00:00:00 +0530"'),
    (datetime.datetime(2024, 3, 1, 0, 0, 0, tzinfo=datetime.timezone(-datetime.timedelta(minutes=30))),
     b'" 1-Mar-2024 00:00:00 -0030"'),
])
def test_internaldate(when: datetime.datetime, expected: bytes) -> None:
    """RFC 3501 §9 date-time, day padded with a space; it reads back through the parser."""
    assert R.internaldate(when) == expected
    assert G._Reader(expected).date_time() == when


def test_internaldate_needs_a_timezone() -> None:
    with pytest.raises(ValueError):
        R.internaldate(datetime.datetime(2024, 1, 1))


def test_status_lines() -> None:
    assert R.tagged("a1", R.OK, "Done") == b"a1 OK Done\r\n"
    assert R.tagged("a1", R.NO, "Not here", code=R.CANNOT) == b"a1 NO [CANNOT] Not here\r\n"
    assert R.untagged(R.BYE, "Logging out") == b"* BYE Logging out\r\n"
    assert R.bad("a1", R.LINE_TOO_LONG) == b"a1 BAD Command line too long\r\n"
    assert R.bad(None, R.EMPTY_LINE) == b"* BAD Empty command line\r\n"
    assert R.search_response([1, 5]) == b"* SEARCH 1 5\r\n" and R.search_response([]) == b"* SEARCH\r\n"


def test_capabilities() -> None:
    """SPEC §9: IMAP4rev1, IDLE, UIDPLUS, LITERAL+, SASL-IR, NAMESPACE; STARTTLS only
    when it can be used; LOGINDISABLED until passwords may be sent; nothing about
    logging in once logged in."""
    before = R.capabilities(starttls=True, login_disabled=True)
    assert before[0] == "IMAP4rev1"
    assert {"LITERAL+", "SASL-IR", "IDLE", "UIDPLUS", "NAMESPACE", "STARTTLS", "LOGINDISABLED"} <= set(before)
    assert "AUTH=PLAIN" not in before
    after_tls = R.capabilities()
    assert "AUTH=PLAIN" in after_tls and "STARTTLS" not in after_tls and "LOGINDISABLED" not in after_tls
    logged_in = R.capabilities(authenticated=True)
    assert not {"AUTH=PLAIN", "STARTTLS", "LOGINDISABLED"} & set(logged_in)
    assert R.greeting(after_tls) == (
        b"* OK [CAPABILITY " + " ".join(after_tls).encode() + b"] ccsmtp IMAP ready\r\n")
    assert R.capability_response(("IMAP4rev1", "IDLE")) == b"* CAPABILITY IMAP4rev1 IDLE\r\n"
    assert "UNSELECT" not in after_tls
    assert set(R.OPTIONAL_CAPABILITIES) <= set(R.capabilities(extra=R.OPTIONAL_CAPABILITIES))


# --- FETCH ----------------------------------------------------------------------------------

DATA = (b"From: a@b.c\r\nSubject: hi\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
        b"--x\r\nContent-Type: text/plain\r\n\r\nnul\x00here\r\n--x--\r\n")
WHEN = datetime.datetime(2024, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)


def item(loads: list) -> MailItem:
    def read() -> bytes:
        loads.append(1)
        return DATA
    return MailItem(4, 17, frozenset({"\\Seen", "\\Answered"}), WHEN, len(DATA), lazy_message(read))


def fetch(text: bytes, loads: list | None = None) -> bytes:
    [command] = P.CommandParser().feed(b"a FETCH 4 " + text + b"\r\n")
    return F.fetch_response(4, command.args.attributes, item([] if loads is None else loads))


def test_fetch_without_content_never_loads() -> None:
    loads: list = []
    assert fetch(b"(FLAGS UID INTERNALDATE RFC822.SIZE)", loads) == (
        b'* 4 FETCH (FLAGS (\\Answered \\Seen) UID 17 INTERNALDATE " 3-Feb-2024 04:05:06 +0000" '
        b"RFC822.SIZE %d)\r\n" % len(DATA))
    assert loads == []


def test_fetch_content_items_load_once() -> None:
    loads: list = []
    out = fetch(b"(ENVELOPE BODY BODYSTRUCTURE RFC822.HEADER)", loads)
    assert loads == [1]
    assert out.startswith(b'* 4 FETCH (ENVELOPE (NIL "hi" ((NIL NIL "a" "b.c"))')
    assert b' BODY (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0) "mixed") ' in out
    assert b' BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0 NIL NIL NIL NIL) "mixed" ("boundary" "x") NIL NIL NIL) ' in out
    header = DATA[:DATA.index(b"\r\n\r\n") + 4]
    assert out.endswith(b" RFC822.HEADER {%d}\r\n%s)\r\n" % (len(header), header))


def test_fetch_section_names_and_values() -> None:
    assert fetch(b"BODY.PEEK[1]") == b"* 4 FETCH (BODY[1] {8}\r\nnul\x80here)\r\n"
    assert fetch(b"BODY[1]<2.3>") == b"* 4 FETCH (BODY[1]<2> {3}\r\nl\x80h)\r\n"
    assert fetch(b"BODY[1.MIME]") == b"* 4 FETCH (BODY[1.MIME] {28}\r\nContent-Type: text/plain\r\n\r\n)\r\n"
    assert fetch(b"BODY[9]") == b"* 4 FETCH (BODY[9] {0}\r\n)\r\n"
    assert fetch(b"BODY.PEEK[HEADER.FIELDS (subject)]") == (
        b"* 4 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {15}\r\nSubject: hi\r\n\r\n)\r\n")
    assert fetch(b"RFC822") == b"* 4 FETCH (RFC822 {%d}\r\n%s)\r\n" % (len(DATA), DATA.replace(b"\0", b"\x80"))
    text = DATA[DATA.index(b"\r\n\r\n") + 4:].replace(b"\0", b"\x80")
    assert fetch(b"RFC822.TEXT") == b"* 4 FETCH (RFC822.TEXT {%d}\r\n%s)\r\n" % (len(text), text)


def test_fetch_helpers() -> None:
    atts = (C.FetchAtt("FLAGS"),)
    assert F.with_uid(atts) == (C.FetchAtt("FLAGS"), C.FetchAtt("UID"))
    assert F.with_uid(F.with_uid(atts)) == F.with_uid(atts)
    body = C.FetchAtt("BODY", C.Section(), None, False)
    assert F.sets_seen((body,)) and not F.sets_seen(atts)
    assert F.with_flags((body,)) == (body, C.FetchAtt("FLAGS"))
    assert F.with_flags(atts) == atts
    assert F.needs_content((body,)) and not F.needs_content(atts)
