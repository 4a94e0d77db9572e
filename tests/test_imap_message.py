"""Unit tests for the IMAP message model (prefork_smtp.imap.message): MIME structure,
ENVELOPE, BODY/BODYSTRUCTURE and BODY[section], RFC 3501 §6.4.5 and §7.4.2.

Expected values are written out by hand; the ones marked (Dovecot) are also what Dovecot
2.3 answers for the same octets (test_imap_dovecot.py checks that live when it can).
Section tests check the concatenation rules RFC 3501 implies: HEADER + TEXT is the whole
message (or the whole encapsulated message), and MIME + the part's body is the part.
Bounds (SPEC §9): 100 levels of nesting, 10,000 parts, and a linear number of steps,
counted, never timed.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_smtp.imap import message as M
from prefork_smtp.imap import response as R
from prefork_smtp.imap.addresses import Address


def structure(data: bytes, extensible: bool = True) -> bytes:
    return R.body(M.Message(data).body_structure(), extensible)


def envelope(data: bytes) -> bytes:
    return R.envelope(M.Message(data).envelope())


def all_parts(part: M.Part, path=()):
    yield path, part
    if part.kind is M.Kind.MULTIPART:
        for i, child in enumerate(part.children, 1):
            yield from all_parts(child, path + (i,))
    elif part.kind is M.Kind.MESSAGE:
        inner = part.children[0]
        if inner.kind is M.Kind.MULTIPART:
            for i, child in enumerate(inner.children, 1):
                yield from all_parts(child, path + (i,))


SIMPLE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
          b"Date: Tue, 1 Feb 1994 10:00:00 +0100\r\nMessage-ID: <1@example.org>\r\n\r\n"
          b"line one\r\nline two\r\n")

INNER = (b"From: Inner <in@x.y>\r\nTo: t@x.y\r\nSubject: inner\r\n"
         b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nMessage-ID: <inner@x>\r\n"
         b"Content-Type: multipart/mixed; boundary=inner\r\n\r\npre\r\n--inner\r\n\r\nin1\r\n"
         b"--inner\r\nContent-Type: text/html\r\n\r\n<b>in2</b>\r\n--inner--\r\n")
RICH = (b"From: \"Alice A.\" <alice@example.org>\r\nTo: bob@example.net, \"Carol\" <carol@example.net>\r\n"
        b"Cc: group: d@e.f, g@h.i;, j@k.l\r\nSubject: =?utf-8?q?hi?=\r\nDate: Tue, 1 Feb 1994 10:00:00 +0100\r\n"
        b"Message-ID: <m1@x>\r\nIn-Reply-To: <m0@x>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\nThis is the preamble\r\n"
        b"--outer\r\nContent-Type: multipart/alternative; boundary=alt\r\n\r\n"
        b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain\r\ntext\r\n"
        b"--alt\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--alt--\r\n"
        b"--outer\r\nContent-Type: application/pdf; name=a.pdf\r\n"
        b"Content-Disposition: attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"JVBERi0=\r\n--outer\r\nContent-Type: message/rfc822\r\n\r\n" + INNER +
        b"\r\n--outer--\r\nepilogue\r\n")

RICH_INNER_ENVELOPE = (
    b'("Mon, 7 Feb 1994 21:52:25 -0800" "inner" (("Inner" NIL "in" "x.y")) (("Inner" NIL "in" "x.y")) '
    b'(("Inner" NIL "in" "x.y")) ((NIL NIL "t" "x.y")) NIL NIL NIL "<inner@x>")')
# (Dovecot) byte for byte
RICH_BODYSTRUCTURE = (
    b'((("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 11 1 NIL NIL NIL NIL)'
    b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 0 NIL NIL NIL NIL) "alternative" '
    b'("boundary" "alt") NIL NIL NIL)("application" "pdf" ("name" "a.pdf") NIL NIL "base64" 8 NIL '
    b'("attachment" ("filename" "a.pdf")) NIL NIL)("message" "rfc822" NIL NIL NIL "7bit" 239 '
    + RICH_INNER_ENVELOPE +
    b' (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 0 NIL NIL NIL NIL)'
    b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 10 0 NIL NIL NIL NIL) "mixed" '
    b'("boundary" "inner") NIL NIL NIL) 16 NIL NIL NIL NIL) "mixed" ("boundary" "outer") NIL NIL NIL)')
RICH_BODY = (
    b'((("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 11 1)("text" "html" ("charset" "us-ascii") '
    b'NIL NIL "7bit" 11 0) "alternative")("application" "pdf" ("name" "a.pdf") NIL NIL "base64" 8)'
    b'("message" "rfc822" NIL NIL NIL "7bit" 239 ' + RICH_INNER_ENVELOPE +
    b' (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 0)("text" "html" ("charset" "us-ascii") '
    b'NIL NIL "7bit" 10 0) "mixed") 16) "mixed")')


# --- structure, BODY, BODYSTRUCTURE -------------------------------------------------------

def test_simple_message() -> None:
    m = M.Message(SIMPLE)
    assert m.size == len(SIMPLE)
    assert structure(SIMPLE) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2 NIL NIL NIL NIL)'
    assert structure(SIMPLE, extensible=False) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2)'
    assert envelope(SIMPLE) == (
        b'("Tue, 1 Feb 1994 10:00:00 +0100" "hi" (("Alice" NIL "alice" "example.org")) '
        b'(("Alice" NIL "alice" "example.org")) (("Alice" NIL "alice" "example.org")) '
        b'((NIL NIL "bob" "example.net")) NIL NIL NIL "<1@example.org>")')


def test_multipart_alternative_with_attachment_and_message() -> None:
    assert structure(RICH) == RICH_BODYSTRUCTURE
    assert structure(RICH, extensible=False) == RICH_BODY
    assert envelope(RICH) == (
        b'("Tue, 1 Feb 1994 10:00:00 +0100" "=?utf-8?q?hi?=" (("Alice A." NIL "alice" "example.org")) '
        b'(("Alice A." NIL "alice" "example.org")) (("Alice A." NIL "alice" "example.org")) '
        b'((NIL NIL "bob" "example.net")("Carol" NIL "carol" "example.net")) '
        b'((NIL NIL "group" NIL)(NIL NIL "d" "e.f")(NIL NIL "g" "h.i")(NIL NIL NIL NIL)(NIL NIL "j" "k.l")) '
        b'NIL "<m0@x>" "<m1@x>")')


SECTIONS = {   # (Dovecot) every one
    ((), None): RICH,
    # the CRLF that ends a close delimiter stays with its multipart
    ((1,), None): (b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain\r\ntext\r\n"
                   b"--alt\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--alt--\r\n"),
    ((1, 1), None): b"plain\r\ntext",
    ((1, 1), "MIME"): b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
    ((1, 2), None): b"<p>html</p>",
    ((2,), "MIME"): (b"Content-Type: application/pdf; name=a.pdf\r\nContent-Disposition: attachment; "
                     b"filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"),
    ((2,), None): b"JVBERi0=",
    ((2, 1), None): b"JVBERi0=",           # a non-multipart part's part 1 is its body
    ((2, 2), None): b"",
    ((3,), None): INNER,
    ((3,), "MIME"): b"Content-Type: message/rfc822\r\n\r\n",
    ((3,), "HEADER"): INNER[:INNER.index(b"\r\n\r\n") + 4],
    ((3,), "TEXT"): INNER[INNER.index(b"\r\n\r\n") + 4:],
    ((3, 1), None): b"in1",
    ((3, 1), "MIME"): b"\r\n",
    ((3, 2), None): b"<b>in2</b>",
    ((3, 3), None): b"",
    ((4,), None): b"",
    ((1,), "HEADER"): b"",                 # HEADER/TEXT need a message/rfc822 part
    ((1,), "TEXT"): b"",
    ((), "TEXT"): RICH[RICH.index(b"\r\n\r\n") + 4:],
}


@pytest.mark.parametrize("spec", list(SECTIONS), ids=lambda s: ".".join(map(str, s[0])) + f".{s[1]}")
def test_sections(spec) -> None:
    part, text = spec
    assert M.Message(RICH).section(part, text) == SECTIONS[spec]


def test_header_fields_sections() -> None:
    m = M.Message(RICH)
    # message order, continuation lines kept, the blank line added (Dovecot)
    assert m.section((), "HEADER.FIELDS", ("SUBJECT", "FROM", "X-NONE")) == (
        b'From: "Alice A." <alice@example.org>\r\nSubject: =?utf-8?q?hi?=\r\n\r\n')
    assert m.section((), "HEADER.FIELDS.NOT", (
        "SUBJECT", "FROM", "TO", "CC", "DATE", "MESSAGE-ID", "IN-REPLY-TO")) == (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="outer"\r\n\r\n')
    assert m.section((3,), "HEADER.FIELDS", ("subject",)) == b"Subject: inner\r\n\r\n"
    folded = M.Message(b"Subject: a\r\n b\r\nsubject : c\r\nX: y\r\n\r\nbody")
    assert folded.section((), "HEADER.FIELDS", ("SUBJECT",)) == b"Subject: a\r\n b\r\nsubject : c\r\n\r\n"
    assert folded.values("subject") == [b"a b", b"c"]


def test_partials() -> None:
    m = M.Message(RICH)
    assert m.section((), "TEXT", partial=(0, 20)) == b"This is the preamble"
    assert m.section((), None, partial=(5, 3)) == RICH[5:8]
    assert m.section((), None, partial=(len(RICH) - 2, 100)) == b"\r\n"
    assert m.section((), None, partial=(5000, 10)) == b""


def test_concatenations() -> None:
    """RFC 3501 §6.4.5: HEADER + TEXT is the message; MIME + BODY[n] is part n; for a
    message/rfc822 part, n.HEADER + n.TEXT is BODY[n]."""
    for data in (SIMPLE, RICH, INNER, b"Subject: x", b"Subject: x\r\n", b"\r\nbody only"):
        m = M.Message(data)
        assert m.section((), "HEADER") + m.section((), "TEXT") == data
        for path, part in all_parts(m.root):
            if not path:
                continue
            assert m.section(path, "MIME") + m.section(path) == data[part.start:part.end]
            if part.kind is M.Kind.MESSAGE:
                assert m.section(path, "HEADER") + m.section(path, "TEXT") == m.section(path)


def test_messages_without_body() -> None:
    for data, header, text in [
        (b"Subject: no body", b"Subject: no body", b""),
        (b"Subject: no body\r\n", b"Subject: no body\r\n", b""),
        (b"Subject: empty body\r\n\r\n", b"Subject: empty body\r\n\r\n", b""),
        (b"", b"", b""),
    ]:
        m = M.Message(data)
        assert (m.section((), "HEADER"), m.section((), "TEXT")) == (header, text)
        assert m.section((1,)) == b""
        assert structure(data) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'
    # RFC 3501 §6.4.5: no blank line when the message has none
    assert M.Message(b"Subject: x\r\n").section((), "HEADER.FIELDS", ("SUBJECT",)) == b"Subject: x\r\n"
    assert M.Message(b"Subject: x\r\n\r\n").section((), "HEADER.FIELDS", ("X",)) == b"\r\n"


def test_single_part_sections() -> None:
    """(Dovecot) BODY[1] of a non-multipart message is its body, BODY[1.MIME] its header."""
    m = M.Message(SIMPLE)
    header, body = SIMPLE.split(b"\r\n\r\n", 1)
    assert m.section((1,)) == body
    assert m.section((1,), "MIME") == header + b"\r\n\r\n"
    assert m.section((1,), "HEADER") == b"" and m.section((2,)) == b"" and m.section((1, 1)) == b""


BOUNDARY_CASES = {   # (Dovecot) every one
    "no boundary parameter: one empty part": (
        b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhi\r\n",
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" NIL NIL NIL NIL)'),
    "no parts at all": (
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno parts at all\r\n",
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" ("boundary" "x") NIL NIL NIL)'),
    "part header without blank line": (
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n--x\r\n\r\nsecond\r\n--x--\r\n",
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 0 NIL NIL NIL NIL) "mixed" ("boundary" "x") NIL NIL NIL)'),
    "digest parts default to message/rfc822": (
        b"Content-Type: multipart/digest; boundary=x\r\n\r\n--x\r\n\r\nSubject: digested\r\n\r\nbody\r\n--x--\r\n",
        b'(("message" "rfc822" NIL NIL NIL "7bit" 25 (NIL "digested" NIL NIL NIL NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 4 0 NIL NIL NIL NIL) 2 NIL NIL NIL NIL) "digest" ("boundary" "x") NIL NIL NIL)'),
    "boundary matches as a prefix (RFC 2046 5.1.1)": (
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--xyz\r\n\r\nprefix match\r\n--x--\r\n",
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 12 0 NIL NIL NIL NIL) "mixed" ("boundary" "x") NIL NIL NIL)'),
    "transport padding and text after the close delimiter": (
        b"Content-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x  \r\n\r\npadded\r\n--x-- trailing\r\nepi\r\n",
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 0 NIL NIL NIL NIL) "mixed" ("boundary" "x") NIL NIL NIL)'),
    "empty message/rfc822": (
        b"Content-Type: message/rfc822\r\n\r\n",
        b'("message" "rfc822" NIL NIL NIL "7bit" 0 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) 0 NIL NIL NIL NIL)'),
    "an outer boundary closes the inner multipart": (
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\ninner\r\n--a\r\n\r\nouter2\r\n--a--\r\n",
        b'((("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 0 NIL NIL NIL NIL) "mixed" ("boundary" "b") NIL NIL NIL)("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 0 NIL NIL NIL NIL) "mixed" ("boundary" "a") NIL NIL NIL)'),
    "the longest matching boundary wins": (
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\nx\r\n--ab--\r\n--a--\r\n",
        b'((("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL) "mixed" ("boundary" "ab") NIL NIL NIL) "mixed" ("boundary" "a") NIL NIL NIL)'),
}


@pytest.mark.parametrize("name", sorted(BOUNDARY_CASES))
def test_boundary_cases(name: str) -> None:
    data, expected = BOUNDARY_CASES[name]
    assert structure(data) == expected


def test_crlf_before_boundary_belongs_to_it() -> None:
    """(Dovecot) "--x\\r\\n\\r\\n--x--": the blank line is the boundary's CRLF, so part 1
    has an empty header and no body."""
    m = M.Message(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\n--x--")
    assert m.section((1,), "MIME") == b"" and m.section((1,)) == b""
    m = M.Message(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n--x--")
    assert m.section((1,), "MIME") == b"Content-Type: text/plain"


# --- header values and BODYSTRUCTURE fields --------------------------------------------------

BODY_FIELD_CASES = {   # (Dovecot) unless noted
    "every field": (
        b"Content-Type: TEXT/Plain; CharSet=\"UTF-8\"; format=flowed\r\nContent-Transfer-Encoding: "
        b"Quoted-Printable\r\nContent-ID: <id1@x>\r\nContent-Description: a desc\r\nContent-Language: "
        b"en, de\r\nContent-Location: http://x/y\r\nContent-MD5: abc==\r\nContent-Disposition: inline; "
        b"filename=\"a b.txt\"\r\n\r\nx\r\n",
        b'("TEXT" "Plain" ("CharSet" "UTF-8" "format" "flowed") "<id1@x>" "a desc" "Quoted-Printable" 3 1 '
        b'"abc==" ("inline" ("filename" "a b.txt")) ("en" "de") "http://x/y")'),
    "charset appended": (
        b"Content-Type: text/plain; format=flowed\r\n\r\nx\r\n",
        b'("text" "plain" ("format" "flowed" "charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'),
    "RFC 2231 continuations joined": (
        b"Content-Type: application/octet-stream; name*0=\"long\"; name*1=\"name.txt\"\r\n\r\nx\r\n",
        b'("application" "octet-stream" ("name" "longname.txt") NIL NIL "7bit" 3 NIL NIL NIL NIL)'),
    "RFC 2231 encoded continuations left encoded": (
        b"Content-Type: text/plain; name*0*=utf-8''%E2%82%AC; name*1*=%20rates.txt\r\n\r\nx\r\n",
        b'("text" "plain" ("name*" "utf-8\'\'%E2%82%AC%20rates.txt" "charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'),
    "folded parameters, disposition parameters, language comment": (
        b"Content-Type: text/plain;\r\n\tcharset=utf-8;\r\n\tformat=flowed\r\nContent-Disposition: attachment;\r\n"
        b" filename=\"x y.txt\"; size=12\r\nContent-Language: en-US (English)\r\n\r\nx\r\n",
        b'("text" "plain" ("charset" "utf-8" "format" "flowed") NIL NIL "7bit" 3 1 NIL ("attachment" ("filename" "x y.txt" "size" "12")) ("en-US") NIL)'),
    "comments and quoted-pairs in parameters": (
        b"Content-Type: text/html;\r\n charset=iso-8859-1 (comment); x=\"a\\\"b\"\r\n\r\nx\r\n",
        b'("text" "html" ("charset" "iso-8859-1" "x" "a\\"b") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'),
    "first Content-Type counts": (
        b"Content-Type: text/plain\r\nContent-Type: text/html\r\n\r\nx\r\n",
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'),
    "empty fields are NIL": (
        b"Content-Disposition: \r\nContent-ID:\r\nContent-Transfer-Encoding: \r\n\r\nx\r\n",
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'),
    "stray semicolons": (
        b"Content-Type: text/plain;;;a=b;\r\n\r\nx\r\n",
        b'("text" "plain" ("a" "b" "charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'),
    "multipart extension data": (
        b"Content-Type: multipart/mixed; boundary=x; foo=bar\r\nContent-Disposition: inline\r\n"
        b"Content-Language: fr\r\nContent-Location: loc\r\n\r\n--x\r\n\r\na\r\n--x--\r\n",
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL) "mixed" ("boundary" "x" "foo" "bar") ("inline" NIL) ("fr") "loc")'),
    # not Dovecot's answers: RFC 2045 §5.2 says an invalid Content-Type means text/plain,
    # and a comment after the transfer encoding is just a comment
    "invalid Content-Type is text/plain": (
        b"Content-Type: garbage\r\n\r\nx\r\n",
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'),
    "encoding with a comment": (
        b"Content-Transfer-Encoding: base64 (c)\r\n\r\nx\r\n",
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "base64" 3 1 NIL NIL NIL NIL)'),
}


@pytest.mark.parametrize("name", sorted(BODY_FIELD_CASES))
def test_body_fields(name: str) -> None:
    data, expected = BODY_FIELD_CASES[name]
    assert structure(data) == expected


def test_8bit_and_nul_go_out_as_literals() -> None:
    data = b"Subject: caf\xc3\xa9\r\nContent-Description: a\x00b\r\n\r\nx"
    assert envelope(data) == b"(NIL {5}\r\ncaf\xc3\xa9 NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert b'NIL {3}\r\na\x80b "7bit"' in structure(data)


ENVELOPE_CASES = {
    # RFC 3501 §7.4.2: Sender and Reply-To default to From when absent or empty
    "defaults": (b"From: A <a@b.c>\r\nSender: \r\nReply-To:   \r\n\r\n",
                 b'(NIL NIL (("A" NIL "a" "b.c")) (("A" NIL "a" "b.c")) (("A" NIL "a" "b.c")) NIL NIL NIL NIL NIL)'),
    "own sender and reply-to": (
        b"From: a@b.c\r\nSender: s@b.c\r\nReply-To: r@b.c\r\nBcc: x@y.z\r\n\r\n",
        b'(NIL NIL ((NIL NIL "a" "b.c")) ((NIL NIL "s" "b.c")) ((NIL NIL "r" "b.c")) NIL NIL ((NIL NIL "x" "y.z")) NIL NIL)'),
    "no fields": (b"X: y\r\n\r\n", b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"),
    "empty From": (b"From:\r\n\r\n", b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"),
    "unfolded, RFC 2047 left encoded": (
        b"Subject: =?utf-8?b?w6k=?=\r\n\tfolded\r\n\r\n", b'(NIL "=?utf-8?b?w6k=?=\tfolded" NIL NIL NIL NIL NIL NIL NIL NIL)'),
    "first Subject counts": (b"Subject: x\r\nSubject: second\r\n\r\n",
                             b'(NIL "x" NIL NIL NIL NIL NIL NIL NIL NIL)'),
    "quotes and backslashes quoted": (b'Subject: "q" and \\b\r\n\r\n',
                                      b'(NIL "\\"q\\" and \\\\b" NIL NIL NIL NIL NIL NIL NIL NIL)'),
    "undisclosed recipients": (b"To: undisclosed-recipients:;\r\n\r\n",
                               b'(NIL NIL NIL NIL NIL ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL NIL NIL NIL)'),
}


@pytest.mark.parametrize("name", sorted(ENVELOPE_CASES))
def test_envelope(name: str) -> None:
    data, expected = ENVELOPE_CASES[name]
    assert envelope(data) == expected


@pytest.mark.parametrize("value, expected", [   # (Dovecot) unless noted
    (b"alice", [(None, None, b"alice", b"MISSING_DOMAIN")]),
    (b"alice@", [(None, None, b"alice", b"MISSING_DOMAIN")]),
    (b"<alice@example.org>", [(None, None, b"alice", b"example.org")]),
    (b"alice@example.org (Alice Comment)", [(b"Alice Comment", None, b"alice", b"example.org")]),
    (b'"Quoted \\"Name\\"" <a@b.c>', [(b'Quoted "Name"', None, b"a", b"b.c")]),
    (b"=?utf-8?b?w6k=?= <a@b.c>", [(b"=?utf-8?b?w6k=?=", None, b"a", b"b.c")]),
    (b"<@route1,@route2:a@b.c>", [(None, b"@route1,@route2", b"a", b"b.c")]),
    (b'"a b"@example.org', [(None, None, b"a b", b"example.org")]),
    (b"a@[127.0.0.1]", [(None, None, b"a", b"[127.0.0.1]")]),
    (b"garbage <<<", [(b"garbage", None, b"MISSING_MAILBOX", b"SYNTAX_ERROR")]),
    (b"Name <a@b.c> (comment)", [(b"Name", None, b"a", b"b.c")]),
    (b'"" <a@b.c>', [(None, None, b"a", b"b.c")]),
    (b"a@b.c, bad entry, c@d.e", [(None, None, b"a", b"b.c"),
                                   (b"bad entry", None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"),
                                   (None, None, b"c", b"d.e")]),
    (b"Alice <alice@example.org", [(b"Alice", None, b"alice", b"SYNTAX_ERROR")]),
    (b"Alice A. <a@b>", [(b"Alice A.", None, b"a", b"b")]),
    # not Dovecot (it inserts a MISSING_MAILBOX entry): RFC 5322 §4.4 empty members
    (b"Plain Name <a@b.c>, , b@c.d", [(b"Plain Name", None, b"a", b"b.c"), (None, None, b"b", b"c.d")]),
    (b";;;>>:<", [(None, None, b"MISSING_MAILBOX", b"SYNTAX_ERROR")]),
])
def test_addresses(value: bytes, expected) -> None:
    from prefork_smtp.imap.addresses import parse_address_list
    assert parse_address_list(value) == tuple(Address(*a) for a in expected)


def test_header_fields_odd_lines() -> None:
    data = b" leading continuation\r\nno colon here\r\nA: 1\r\n\tcont\r\nB:2\r\n\r\nbody"
    m = M.Message(data)
    # a leading continuation and a line without a colon are fields named by the whole line
    assert [f.name for f in m.fields()] == [b" leading continuation", b"no colon here", b"A", b"B"]
    assert m.values("a") == [b"1\tcont"] and m.values("B") == [b"2"]
    assert m.section((), "HEADER.FIELDS.NOT", ("A",)) == (
        b" leading continuation\r\nno colon here\r\nB:2\r\n\r\n")


# --- decoded text for SEARCH -------------------------------------------------------------------

def test_decoded_text_parts() -> None:
    data = (b"Subject: =?iso-8859-1?q?caf=E9?= ok\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"na=EFve\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"w7xiZXI=\r\n--b\r\nContent-Type: image/png\r\n\r\nnot text\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
            b"Subject: inside\r\n\r\ninner body\r\n--b--\r\n")
    m = M.Message(data)
    assert dict(m.decoded_headers())[b"Subject"] == "café ok"
    texts = list(m.text_parts())
    assert texts[:2] == ["naïve", "über"]
    assert "Subject: inside" in texts[2] and texts[3] == "inner body"
    assert not any("not text" in t for t in texts)


def test_sent_date() -> None:
    import datetime
    assert M.sent_date(M.Message(b"Date: Mon, 7 Feb 1994 23:52:25 -0800\r\n\r\n")) == datetime.date(1994, 2, 7)
    assert M.sent_date(M.Message(b"Date: yesterday\r\n\r\n")) is None
    assert M.sent_date(M.Message(b"\r\n")) is None


# --- bounds (SPEC §9, CVE-2020-12100 class) ---------------------------------------------------

def nested_multipart(levels: int) -> bytes:
    # Fixed-width boundaries: boundaries match as prefixes (RFC 2046 §5.1.1), so "b9"
    # would end a part at a "--b99" line.
    data = b"".join(b"Content-Type: multipart/mixed; boundary=b%03d\r\n\r\n--b%03d\r\n" % (i, i)
                    for i in range(levels))
    return data + b"Content-Type: text/plain\r\n\r\nleaf\r\n"


def nested_messages(levels: int) -> bytes:
    return b"Content-Type: message/rfc822\r\n\r\n" * levels + b"Content-Type: text/plain\r\n\r\nleaf\r\n"


def depth(part: M.Part) -> int:
    d = 1
    while part.children:
        part = part.children[0]
        d += 1
    return d


def innermost(part: M.Part) -> M.Part:
    while part.children:
        part = part.children[0]
    return part


def test_nesting_up_to_the_limit_is_shown() -> None:
    """(Dovecot) 99 nested multiparts and their leaf: 100 levels, all shown."""
    m = M.Message(nested_multipart(M.MAX_MIME_DEPTH - 1))
    assert depth(m.root) == M.MAX_MIME_DEPTH
    assert innermost(m.root).content_type.mime == "text/plain"
    assert m.section((1,) * (M.MAX_MIME_DEPTH - 1)) == b"leaf\r\n"
    assert structure(nested_multipart(M.MAX_MIME_DEPTH - 1)).count(b'"mixed"') == M.MAX_MIME_DEPTH - 1


def test_deeper_nesting_is_opaque() -> None:
    """(Dovecot) the 100th nested multipart is application/octet-stream, not opened."""
    for levels in (M.MAX_MIME_DEPTH, M.MAX_MIME_DEPTH + 1, 500):
        data = nested_multipart(levels)
        m = M.Message(data)
        assert depth(m.root) == M.MAX_MIME_DEPTH
        leaf = innermost(m.root)
        assert leaf.kind is M.Kind.OPAQUE
        text = structure(data)
        assert text.count(b'"application" "octet-stream" ("boundary" "b099")') == 1
        assert b'"text" "plain"' not in text
        assert m.section((1,) * M.MAX_MIME_DEPTH) == data[leaf.body_start:leaf.end]


def test_deep_message_rfc822_chain() -> None:
    """(Dovecot) message/rfc822 in message/rfc822 ...: level 100 is opaque."""
    shown = M.Message(nested_messages(M.MAX_MIME_DEPTH - 1))
    assert innermost(shown.root).content_type.mime == "text/plain"
    data = nested_messages(M.MAX_MIME_DEPTH)
    text = structure(data)
    assert text.count(b'"message" "rfc822"') == M.MAX_MIME_DEPTH - 1
    assert text.count(b'("application" "octet-stream" NIL NIL NIL "7bit" 34 NIL NIL NIL NIL)') == 1


def many_parts(n: int) -> bytes:
    return (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * n + b"--b--\r\n")


def count_steps(monkeypatch, data: bytes) -> tuple[M.Message, int]:
    steps = []
    original = M._StructureParser._event_at

    def counted(self, at, in_header):
        steps.append(at)
        return original(self, at, in_header)
    monkeypatch.setattr(M._StructureParser, "_event_at", counted)
    try:
        return M.Message(data), len(steps)
    finally:
        monkeypatch.setattr(M._StructureParser, "_event_at", original)


def test_ten_thousand_parts(monkeypatch) -> None:
    """10,000 parts: the first 9,999 are parts of the multipart (with the top level that
    makes MAX_MIME_PARTS), the last holds the rest; the parser looks at each candidate
    line once."""
    data = many_parts(10_000)
    m, steps = count_steps(monkeypatch, data)
    assert len(m.root.children) == M.MAX_MIME_PARTS - 1
    assert all(c.content_type.mime == "text/plain" for c in m.root.children)
    last = m.root.children[-1]
    assert m.section((M.MAX_MIME_PARTS - 1,)) == data[last.body_start:last.end]
    assert data[last.body_start:].startswith(b"x\r\n--b\r\n")
    assert steps <= data.count(b"\n") + 2
    assert structure(data).count(b'"text" "plain"') == M.MAX_MIME_PARTS - 1


def test_cost_is_linear_with_many_boundary_like_lines(monkeypatch) -> None:
    """100 active boundaries and 20,000 lines that start with "--" but match none: each
    line is examined once (and against at most MAX_MIME_DEPTH boundaries)."""
    junk = b"--not-a-boundary\r\n" * 20_000
    data = nested_multipart(M.MAX_MIME_DEPTH - 1) + junk
    _, steps = count_steps(monkeypatch, data)
    assert steps <= data.count(b"\n") + 2
    data2 = nested_multipart(M.MAX_MIME_DEPTH - 1) + junk * 2
    _, steps2 = count_steps(monkeypatch, data2)
    assert steps2 <= 2 * steps + 10


def test_headers_without_blank_lines_do_not_rescan(monkeypatch) -> None:
    """Parts whose headers never end (no blank line) must not make each header search
    run to the end of the message."""
    data = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            + b"--b\r\nX-A: 1\r\nX-B: 2\r\n" * 3000 + b"--b--\r\n")
    m, steps = count_steps(monkeypatch, data)
    assert len(m.root.children) == 3000
    assert steps <= data.count(b"\n") + 2


# --- fuzz: any octets give a consistent structure ----------------------------------------------

MIME_BITS = [b"Content-Type: multipart/mixed; boundary=a\r\n", b"Content-Type: multipart/digest; boundary=b\r\n",
             b"Content-Type: message/rfc822\r\n", b"Content-Type: text/plain; charset=utf-8\r\n",
             b"--a\r\n", b"--a--\r\n", b"--b\r\n", b"--b--\r\n", b"--ab\r\n", b"\r\n", b"\n", b"text\r\n",
             b"Subject: x\r\n", b" folded\r\n", b"From: a@b\r\n", b"--", b"\r", b"\x00"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(MIME_BITS), st.binary(max_size=8)), max_size=40))
def test_any_octets_give_a_consistent_structure(bits: list[bytes]) -> None:
    data = b"".join(bits)
    m = M.Message(data)
    assert m.section((), "HEADER") + m.section((), "TEXT") == data
    for path, part in all_parts(m.root):
        assert 0 <= part.start <= part.body_start <= part.end <= len(data)
        assert part.lines == data.count(b"\n", part.body_start, part.end)
        for child in part.children:
            assert part.body_start <= child.start and child.end <= part.end
        if path:
            assert m.section(path, "MIME") + m.section(path) == data[part.start:part.end]
    R.body(m.body_structure(), True)
    R.envelope(m.envelope())
    list(m.text_parts())


def test_an_empty_part_of_a_digest_stays_inside_its_parent() -> None:
    # Found by the Hypothesis test above: the part's blank line is the next boundary's
    # CRLF, and its message/rfc822 child began after the part's own end.
    data = b"Content-Type: multipart/digest; boundary=b\r\n\r\n--b\r\n\r\n--b\r\n"
    m = M.Message(data)
    for _, part in all_parts(m.root):
        assert 0 <= part.start <= part.body_start <= part.end <= len(data)
        for child in part.children:
            assert part.body_start <= child.start and child.end <= part.end


def test_mime_field_values_are_interpreted_up_to_a_bound() -> None:
    """MAX_MIME_FIELD_BYTES: parameters past it are not read (a 25 MB Content-Type
    would otherwise be parsed octet by octet)."""
    pad = b" x=" + b"y" * M.MAX_MIME_FIELD_BYTES
    data = b"Content-Type: text/plain; a=1;" + pad + b"; charset=utf-8\r\n\r\nbody"
    ct = M.Message(data).root.content_type
    assert ct.param("a") == b"1" and ct.param("charset") is None


@pytest.mark.parametrize("charset", [b"idna", b"undefined", b"punycode", b"rot13", b"base64",
                                     b"no-such", b"\xff", b"utf-16", b"unicode_escape"])
def test_odd_charsets_never_raise(charset: bytes) -> None:
    data = (b"Subject: =?" + charset + b"?q?x=FFy?=\r\nContent-Type: text/plain; charset=\""
            + charset + b"\"\r\n\r\n\xff\x00body\\x\r\n")
    m = M.Message(data)
    list(m.text_parts())
    list(m.decoded_headers())
