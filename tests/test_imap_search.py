"""Unit tests for SEARCH evaluation (prefork_smtp.imap.search), RFC 3501 §6.4.4.

A mailbox of five messages, each key tried alone (parsed from the command text, so the
parser's SEARCH grammar is exercised too), then combinations, charsets, "*", and the
promise that keys on flags, numbers, sizes and internal dates never read a message.
"""

from __future__ import annotations

import datetime

import pytest

from prefork_smtp.imap import commands as C
from prefork_smtp.imap import parser as P
from prefork_smtp.imap import search as S
from prefork_smtp.imap.message import MailItem, Message

PLUS2 = datetime.timezone(datetime.timedelta(hours=2))
MINUS8 = datetime.timezone(datetime.timedelta(hours=-8))

MESSAGES = [
    # (uid, flags, internaldate, octets)
    (3, {"\\Seen"}, datetime.datetime(2024, 1, 10, 23, 30, tzinfo=MINUS8),
     b"From: Alice Example <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Quarterly report\r\n"
     b"Date: Wed, 10 Jan 2024 23:30:00 -0800\r\nX-Spam: no\r\n\r\nNumbers are up.\r\n"),
    (7, {"\\Seen", "\\Flagged", "$Work"}, datetime.datetime(2024, 1, 11, 0, 30, tzinfo=PLUS2),
     b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.de>\r\nTo: alice@example.org\r\n"
     b"Cc: carol@example.com\r\nSubject: =?iso-8859-1?q?R=E9sum=E9?=\r\nDate: Thu, 11 Jan 2024 00:30:00 +0200\r\n"
     b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
     b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n"),
    (8, {"\\Deleted", "\\Recent"}, datetime.datetime(2024, 2, 1, 12, 0, tzinfo=datetime.timezone.utc),
     b"From: spammer@bad.example\r\nBcc: hidden@example.org\r\nSubject: WIN NOW\r\nDate: garbage\r\n"
     b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n<b>Prize</b>\r\n"
     b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
     b"SGlkZGVuIGluIGJpbmFyeQ==\r\n--b--\r\n"),
    (12, {"\\Answered", "\\Draft", "\\Recent", "\\Seen"}, datetime.datetime(2024, 2, 2, 8, 0, tzinfo=datetime.timezone.utc),
     b"From: bob@example.net\r\nTo: alice@example.org\r\nSubject: Re: Quarterly report\r\n"
     b"In-Reply-To: <q@example.org>\r\n\r\n> Numbers are up.\r\nGreat!\r\n"),
    (20, set(), datetime.datetime(2024, 3, 1, 9, 0, tzinfo=datetime.timezone.utc),
     b"Subject: no date, no from\r\n\r\n" + b"x" * 500 + b"\r\n"),
]

LOADS: list[int] = []


def mailbox() -> list[MailItem]:
    items = []
    for seq, (uid, flags, date, data) in enumerate(MESSAGES, 1):
        def load(data=data, uid=uid):
            LOADS.append(uid)
            return Message(data)
        items.append(MailItem(seq, uid, frozenset(flags), date, len(data), load))
    return items


def run(text: bytes, items=None) -> list[int]:
    """UIDs matching `SEARCH <text>` (the command parsed as a client would send it)."""
    event = P.CommandParser().feed(b"a1 SEARCH " + text + b"\r\n")
    assert len(event) == 1 and isinstance(event[0], P.Command), event
    return [i.uid for i in S.search(event[0].args, mailbox() if items is None else items)]


KEYS = {
    b"ALL": [3, 7, 8, 12, 20],
    b"ANSWERED": [12], b"UNANSWERED": [3, 7, 8, 20],
    b"DELETED": [8], b"UNDELETED": [3, 7, 12, 20],
    b"DRAFT": [12], b"UNDRAFT": [3, 7, 8, 20],
    b"FLAGGED": [7], b"UNFLAGGED": [3, 8, 12, 20],
    b"SEEN": [3, 7, 12], b"UNSEEN": [8, 20],
    b"RECENT": [8, 12], b"OLD": [3, 7, 20], b"NEW": [8],
    b"KEYWORD $work": [7], b"UNKEYWORD $Work": [3, 8, 12, 20],
    # headers: case-insensitive substrings of the decoded text
    b"FROM alice": [3], b"FROM ALICE@EXAMPLE": [3], b"FROM \"j\xc3\xb6rg\"": None,   # 8-bit: literal below
    b"TO alice@example.org": [7, 12], b"CC carol": [7], b"BCC hidden": [8],
    b"SUBJECT report": [3, 12], b"SUBJECT \"quarterly REPORT\"": [3, 12],
    b"HEADER X-Spam no": [3], b"HEADER x-spam \"\"": [3], b"HEADER In-Reply-To \"\"": [12],
    b"HEADER Subject \"\"": [3, 7, 8, 12, 20], b"HEADER X-None \"\"": [],
    # body: decoded text parts only (the base64 attachment is not text)
    b"BODY \"numbers are\"": [3, 12], b"BODY prize": [8], b"BODY hidden": [], b"BODY great": [12],
    b"TEXT hidden@example": [8], b"TEXT great": [12], b"TEXT \"Subject: WIN\"": [8],
    # internal date: its own day, time and zone ignored (3 is Jan 10 at -0800, Jan 11 UTC)
    b"ON 10-Jan-2024": [3], b"ON 11-Jan-2024": [7], b"BEFORE 11-Jan-2024": [3],
    b"SINCE 11-Jan-2024": [7, 8, 12, 20], b"SINCE 2-Feb-2024": [12, 20], b"BEFORE 1-Jan-2024": [],
    # Date: field, as written; a message without a readable one matches no SENT* key
    b"SENTON 11-Jan-2024": [7], b"SENTBEFORE 11-Jan-2024": [3], b"SENTSINCE 10-Jan-2024": [3, 7],
    b"SENTSINCE 1-Jan-1970": [3, 7],
    b"LARGER 400": [20], b"SMALLER 200": [3, 12], b"LARGER 10000": [],
    # sequence sets and UID sets; "*" is the largest
    b"1": [3], b"2:3": [7, 8], b"*": [20], b"4:*": [12, 20], b"*:4": [12, 20], b"3,1": [3, 8], b"6": [],
    b"UID 7": [7], b"UID 7:12": [7, 8, 12], b"UID *": [20], b"UID 21:*": [20], b"UID 1:4": [3],
    b"UID 9:11": [],
    # combinations
    b"SEEN FLAGGED": [7], b"OR DELETED DRAFT": [8, 12], b"NOT SEEN": [8, 20],
    b"(SEEN UNFLAGGED) OR 1 5": [3], b"NOT (OR SEEN RECENT)": [20], b"OR NOT SEEN NOT RECENT": [3, 7, 8, 20],
    b"CHARSET US-ASCII FROM bob": [12], b"CHARSET utf-8 SUBJECT r\xc3": None,
}


@pytest.mark.parametrize("text", [k for k, v in KEYS.items() if v is not None],
                         ids=lambda t: t.decode("latin-1"))
def test_key(text: bytes) -> None:
    assert run(text) == KEYS[text]


def test_8bit_strings_and_charsets() -> None:
    assert run(b"CHARSET UTF-8 FROM {5+}\r\nj\xc3\xb6rg") == [7]
    assert run(b"FROM {5+}\r\nJ\xc3\x96RG") == [7]                  # Unicode case folding
    assert run(b"CHARSET UTF-8 SUBJECT {6+}\r\nr\xc3\xa9sum") == [7]  # RFC 2047, ISO-8859-1
    assert run(b"BODY {6+}\r\nk\xc3\xb6ln") == [7]                  # quoted-printable, UTF-8
    assert run(b"BODY {6+}\r\nGR\xc3\x9c\xc3\x9f") == [7]               # ß folds to ss


def test_unknown_charset_is_refused() -> None:
    """RFC 3501 §6.4.4: NO [BADCHARSET (...)] listing what we support."""
    [event] = P.CommandParser().feed(b"a1 SEARCH CHARSET KOI8-R ALL\r\n")
    with pytest.raises(S.BadCharset) as info:
        S.search(event.args, mailbox())
    assert info.value.code == "BADCHARSET (US-ASCII UTF-8)"
    assert info.value.charset == "KOI8-R"


def test_flag_searches_never_read_messages() -> None:
    LOADS.clear()
    for text in (b"ALL", b"SEEN UNFLAGGED", b"NOT DELETED", b"UID 1:*", b"1:3", b"LARGER 10",
                 b"SINCE 1-Jan-2024", b"OR KEYWORD x NEW", b"NOT (OLD ON 1-Feb-2024)"):
        run(text)
    assert LOADS == []


def test_cheap_keys_are_evaluated_first() -> None:
    """BODY after SEEN: only the seen messages are read, whatever the written order."""
    LOADS.clear()
    assert run(b"BODY numbers SEEN") == [3, 12]
    assert sorted(LOADS) == [3, 7, 12]
    LOADS.clear()
    assert run(b"OR BODY prize DELETED") == [8]
    assert 8 not in LOADS


def test_each_message_is_loaded_once_per_search() -> None:
    LOADS.clear()
    run(b"FROM alice SUBJECT report BODY numbers TEXT up SENTSINCE 1-Jan-2024")
    assert sorted(LOADS) == [3, 7, 8, 12, 20]


def test_empty_mailbox() -> None:
    assert run(b"ALL", items=[]) == []
    assert run(b"*", items=[]) == []


def test_needs_content() -> None:
    def program(text: bytes) -> C.Search:
        return P.CommandParser().feed(b"a SEARCH " + text + b"\r\n")[0].args
    assert not S.needs_content(program(b"SEEN 1:* UID 3 LARGER 5 SINCE 1-Jan-2000"))
    assert S.needs_content(program(b"NOT SUBJECT x"))
    assert S.needs_content(program(b"OR SEEN SENTON 1-Jan-2000"))
