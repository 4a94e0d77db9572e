"""Unit tests for the sans-IO IMAP command parser (prefork_smtp.imap.parser), RFC 3501 §9.

Every case of the table runs twice, as h11's tests do: the input fed whole, then one octet
at a time; both must give the same events. The harness plays the state machine's part at
pauses (IDLE and AUTHENTICATE without an initial response read one raw line, everything
else resumes) and accepts every synchronising literal, so SendContinuation events show
where a "+" would be written. Tests after the table cover what the harness cannot:
refusing a literal, changing limits between events, STARTTLS discarding, what the parser
holds in memory, and the helpers for SASL and IDLE lines.
"""

from __future__ import annotations

import datetime

import pytest

from prefork_smtp.imap import commands as C
from prefork_smtp.imap import grammar as G
from prefork_smtp.imap import parser as P
from prefork_smtp.imap import response as T
from prefork_smtp.imap.commands import SequenceSet
from prefork_smtp.imap.parser import Command, Line, ParseError, SendContinuation, Status

UTC = datetime.timezone.utc


def run(data: bytes, one_at_a_time: bool, **limits) -> list:
    parser = P.CommandParser(**limits)
    events: list = []
    chunks = [data[i:i + 1] for i in range(len(data))] if one_at_a_time else [data]
    for chunk in chunks:
        parser.receive_data(chunk)
        drain(parser, events)
    return events


def drain(parser: P.CommandParser, events: list) -> None:
    while True:
        event = parser.next_event()
        if event is Status.NEED_DATA:
            return
        if event is Status.PAUSED:
            last = events[-1]
            wants_line = isinstance(last, Command) and (
                last.name == "IDLE"
                or (last.name == "AUTHENTICATE" and last.args.initial_response is None))
            parser.expect_line() if wants_line else parser.resume()
            continue
        events.append(event)


def cmd(tag: str, name: str, args=None, uid: bool = False) -> Command:
    return Command(tag, name, args, uid)


def seqs(*ranges) -> SequenceSet:
    return SequenceSet(tuple(r if isinstance(r, tuple) else (r, r) for r in ranges))


STAR = None
ALL_ONE = seqs((1, STAR))


def att(name: str, **kw) -> C.FetchAtt:
    return C.FetchAtt(name, **kw)


def body(part=(), text=None, fields=(), partial=None, peek=False) -> C.FetchAtt:
    return C.FetchAtt("BODY", C.Section(part, text, fields), partial, peek)


def search(*keys, charset=None) -> C.Search:
    return C.Search(charset, C.SearchAnd(keys))


def bad(tag, reason, fatal=False) -> ParseError:
    return ParseError(tag, reason, fatal)


class Args:
    """Matches a ParseError whose reason is BAD_ARGUMENTS plus any detail."""

    def __init__(self, tag: str):
        self.tag = tag

    def __eq__(self, other) -> bool:
        return (isinstance(other, ParseError) and other.tag == self.tag and not other.fatal
                and other.reason.startswith(T.BAD_ARGUMENTS + ": "))

    def __repr__(self) -> str:
        return f"Args({self.tag!r})"


# --- the table: (input, expected events) -----------------------------------------------

CASES = {
    # commands without arguments
    "capability": (b"a1 CAPABILITY\r\n", [cmd("a1", "CAPABILITY")]),
    "noop lower-case, LF only": (b"a1 noop\n", [cmd("a1", "NOOP")]),
    "logout": (b"a1 LOGOUT\r\n", [cmd("a1", "LOGOUT")]),
    "starttls": (b"a1 STARTTLS\r\n", [cmd("a1", "STARTTLS")]),
    "check close expunge": (b"a CHECK\r\nb CLOSE\r\nc EXPUNGE\r\n",
                            [cmd("a", "CHECK"), cmd("b", "CLOSE"), cmd("c", "EXPUNGE")]),
    "namespace unselect": (b"a NAMESPACE\r\nb UNSELECT\r\n",
                           [cmd("a", "NAMESPACE"), cmd("b", "UNSELECT")]),
    "tag with ]": (b"a]1 NOOP\r\n", [cmd("a]1", "NOOP")]),
    "noop with an argument": (b"a1 NOOP x\r\n", [Args("a1")]),
    "enable": (b"a1 ENABLE condstore UTF8=ACCEPT\r\n",
               [cmd("a1", "ENABLE", C.Enable(("CONDSTORE", "UTF8=ACCEPT")))]),
    "enable without capability": (b"a1 ENABLE\r\n", [Args("a1")]),

    # AUTHENTICATE (RFC 4959 SASL-IR) and the raw lines after it
    "authenticate with initial response": (
        b"a1 AUTHENTICATE plain AGFsaWNlAHNlY3JldA==\r\n",
        [cmd("a1", "AUTHENTICATE", C.Authenticate("PLAIN", b"\0alice\0secret"))]),
    "authenticate with empty initial response": (
        b"a1 AUTHENTICATE PLAIN =\r\n", [cmd("a1", "AUTHENTICATE", C.Authenticate("PLAIN", b""))]),
    "authenticate then a response line": (
        b"a1 AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\na2 NOOP\r\n",
        [cmd("a1", "AUTHENTICATE", C.Authenticate("PLAIN", None)),
         Line(b"AGFsaWNlAHNlY3JldA=="), cmd("a2", "NOOP")]),
    "authenticate bad initial response": (b"a1 AUTHENTICATE PLAIN a%b\r\n", [Args("a1")]),
    "authenticate no mechanism": (b"a1 AUTHENTICATE\r\n", [Args("a1")]),

    # LOGIN and every literal form
    "login atoms": (b"a1 LOGIN alice secret\r\n", [cmd("a1", "LOGIN", C.Login(b"alice", b"secret"))]),
    "login quoted with escapes": (
        b'a1 LOGIN "al ice" "s\\"e\\\\c"\r\n', [cmd("a1", "LOGIN", C.Login(b"al ice", b's"e\\c'))]),
    "login synchronising literals": (
        b"a1 LOGIN {5}\r\nalice {6}\r\nsecret\r\n",
        [SendContinuation("a1", "LOGIN", 5), SendContinuation("a1", "LOGIN", 6),
         cmd("a1", "LOGIN", C.Login(b"alice", b"secret"))]),
    "login non-synchronising literals (LITERAL+)": (
        b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n", [cmd("a1", "LOGIN", C.Login(b"alice", b"secret"))]),
    "login literal with 8-bit and CRLF inside": (
        b"a1 LOGIN {6+}\r\nj\xc3\xb6\r\n\" x\r\n", [cmd("a1", "LOGIN", C.Login(b"j\xc3\xb6\r\n\"", b"x"))]),
    "empty literal": (b"a1 LOGIN {0}\r\n {0+}\r\n\r\n",
                      [SendContinuation("a1", "LOGIN", 0), cmd("a1", "LOGIN", C.Login(b"", b""))]),
    "literal bare LF after marker": (b"a1 LOGIN {1+}\nx y\n", [cmd("a1", "LOGIN", C.Login(b"x", b"y"))]),
    "login missing password": (b"a1 LOGIN alice\r\n", [Args("a1")]),
    "login two spaces": (b"a1 LOGIN  alice secret\r\n", [Args("a1")]),
    "login trailing space": (b"a1 LOGIN alice secret \r\n", [Args("a1")]),
    "login literal then nothing": (b"a1 LOGIN {1+}\r\nx\r\n", [Args("a1")]),
    "literal in the middle of a line": (b"a1 LOGIN {1}x y\r\n", [Args("a1")]),

    # mailboxes
    "select inbox any case": (b"a1 SELECT inBoX\r\n", [cmd("a1", "SELECT", C.MailboxArg("INBOX"))]),
    "examine quoted": (b'a1 EXAMINE "INBOX"\r\n', [cmd("a1", "EXAMINE", C.MailboxArg("INBOX"))]),
    "create delete subscribe unsubscribe": (
        b"a CREATE x\r\nb DELETE \"a b\"\r\nc SUBSCRIBE y]\r\nd UNSUBSCRIBE {1+}\r\nz\r\n",
        [cmd("a", "CREATE", C.MailboxArg("x")), cmd("b", "DELETE", C.MailboxArg("a b")),
         cmd("c", "SUBSCRIBE", C.MailboxArg("y]")), cmd("d", "UNSUBSCRIBE", C.MailboxArg("z"))]),
    "mailbox literal not UTF-8": (b"a1 SELECT {1+}\r\n\xff\r\n", [Args("a1")]),
    "rename": (b"a1 RENAME old new\r\n", [cmd("a1", "RENAME", C.Rename("old", "new"))]),
    "list": (b'a1 LIST "" *\r\n', [cmd("a1", "LIST", C.ListArgs("", "*"))]),
    "list percent and wildcard mix": (b"a1 LIST ~ INB%x*]\r\n",
                                      [cmd("a1", "LIST", C.ListArgs("~", "INB%x*]"))]),
    "lsub quoted pattern": (b'a1 LSUB "" "%"\r\n', [cmd("a1", "LSUB", C.ListArgs("", "%"))]),
    "status": (b"a1 STATUS INBOX (MESSAGES unseen UIDNEXT uidvalidity RECENT)\r\n",
               [cmd("a1", "STATUS", C.StatusArgs(
                   "INBOX", ("MESSAGES", "UNSEEN", "UIDNEXT", "UIDVALIDITY", "RECENT")))]),
    "status unknown item": (b"a1 STATUS INBOX (SIZE)\r\n", [Args("a1")]),
    "status empty list": (b"a1 STATUS INBOX ()\r\n", [Args("a1")]),
    "copy": (b"a1 COPY 1:3 Trash\r\n", [cmd("a1", "COPY", C.Copy(seqs((1, 3)), "Trash"))]),

    # APPEND: refused by the service, but its literal is framed like any other
    "append literal": (b"a1 APPEND INBOX {5}\r\nhello\r\n",
                       [SendContinuation("a1", "APPEND", 5),
                        cmd("a1", "APPEND", C.Append("INBOX", (), None, b"hello"))]),
    "append flags, date-time, literal+": (
        b'a1 APPEND INBOX (\\Seen kw) " 1-Feb-1994 10:00:00 -0130" {2+}\r\nhi\r\n',
        [cmd("a1", "APPEND", C.Append(
            "INBOX", ("\\Seen", "kw"),
            datetime.datetime(1994, 2, 1, 10, 0, tzinfo=datetime.timezone(
                -datetime.timedelta(hours=1, minutes=30))), b"hi"))]),
    "append quoted message": (b'a1 APPEND INBOX "hello"\r\n', [Args("a1")]),
    "append bad date-time": (b'a1 APPEND INBOX "31-Feb-1994 10:00:00 +0000" {1+}\r\nx\r\n',
                             [Args("a1")]),

    # FETCH
    "fetch macro all": (b"a1 FETCH 1:* ALL\r\n", [cmd("a1", "FETCH", C.Fetch(ALL_ONE, (
        att("FLAGS"), att("INTERNALDATE"), att("RFC822.SIZE"), att("ENVELOPE"))))]),
    "fetch macro fast": (b"a1 FETCH 1 fast\r\n", [cmd("a1", "FETCH", C.Fetch(seqs(1), (
        att("FLAGS"), att("INTERNALDATE"), att("RFC822.SIZE"))))]),
    "fetch macro full": (b"a1 FETCH * FULL\r\n", [cmd("a1", "FETCH", C.Fetch(seqs(STAR), (
        att("FLAGS"), att("INTERNALDATE"), att("RFC822.SIZE"), att("ENVELOPE"), att("BODY"))))]),
    "fetch macro inside a list": (b"a1 FETCH 1 (ALL)\r\n", [Args("a1")]),
    "fetch every simple item": (
        b"a1 FETCH 2,4:7,9 (FLAGS UID INTERNALDATE RFC822 RFC822.HEADER RFC822.TEXT "
        b"RFC822.SIZE ENVELOPE BODY BODYSTRUCTURE)\r\n",
        [cmd("a1", "FETCH", C.Fetch(seqs(2, (4, 7), 9), tuple(att(n) for n in (
            "FLAGS", "UID", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.TEXT",
            "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE"))))]),
    "fetch sections": (
        b"a1 FETCH 1 (BODY[] BODY.PEEK[HEADER] BODY[TEXT]<0.100> BODY[1.2.3] BODY[1.MIME] "
        b"BODY[2.HEADER] BODY[2.TEXT] BODY.PEEK[header.fields (From \"To\" {2+}\r\nCc)] "
        b"BODY[3.HEADER.FIELDS.NOT (X-A)]<5.6>)\r\n",
        [cmd("a1", "FETCH", C.Fetch(seqs(1), (
            body(), body(text="HEADER", peek=True), body(text="TEXT", partial=(0, 100)),
            body((1, 2, 3)), body((1,), "MIME"), body((2,), "HEADER"), body((2,), "TEXT"),
            body(text="HEADER.FIELDS", fields=("FROM", "TO", "CC"), peek=True),
            body((3,), "HEADER.FIELDS.NOT", ("X-A",), partial=(5, 6)))))]),
    "fetch single section": (b"a1 FETCH 1 BODY.PEEK[]\r\n",
                             [cmd("a1", "FETCH", C.Fetch(seqs(1), (body(peek=True),)))]),
    "uid fetch": (b"a1 UID FETCH 1:* (UID FLAGS)\r\n",
                  [cmd("a1", "FETCH", C.Fetch(ALL_ONE, (att("UID"), att("FLAGS"))), uid=True)]),
    "fetch range backwards and star first": (b"a1 FETCH *:3,7:2 UID\r\n",
                                             [cmd("a1", "FETCH", C.Fetch(seqs((STAR, 3), (7, 2)), (att("UID"),)))]),
    "fetch seq 0": (b"a1 FETCH 0 FLAGS\r\n", [Args("a1")]),
    "fetch leading zero": (b"a1 FETCH 01 FLAGS\r\n", [Args("a1")]),
    "fetch number too big": (b"a1 FETCH 4294967296 FLAGS\r\n", [Args("a1")]),
    "fetch largest number": (b"a1 FETCH 4294967295 FLAGS\r\n",
                             [cmd("a1", "FETCH", C.Fetch(seqs(4294967295), (att("FLAGS"),)))]),
    "fetch empty set": (b"a1 FETCH , FLAGS\r\n", [Args("a1")]),
    "fetch trailing comma": (b"a1 FETCH 1, FLAGS\r\n", [Args("a1")]),
    "fetch unknown item": (b"a1 FETCH 1 (FLAGS BOGUS)\r\n", [Args("a1")]),
    "fetch body.peek without section": (b"a1 FETCH 1 BODY.PEEK\r\n", [Args("a1")]),
    "fetch MIME without part": (b"a1 FETCH 1 BODY[MIME]\r\n", [Args("a1")]),
    "fetch unknown section": (b"a1 FETCH 1 BODY[HEADERS]\r\n", [Args("a1")]),
    "fetch part 0": (b"a1 FETCH 1 BODY[0]\r\n", [Args("a1")]),
    "fetch part trailing dot": (b"a1 FETCH 1 BODY[1.]\r\n", [Args("a1")]),
    "fetch header.fields empty list": (b"a1 FETCH 1 BODY[HEADER.FIELDS ()]\r\n", [Args("a1")]),
    "fetch header.fields no list": (b"a1 FETCH 1 BODY[HEADER.FIELDS]\r\n", [Args("a1")]),
    "fetch header name with colon": (b'a1 FETCH 1 BODY[HEADER.FIELDS ("a:b")]\r\n', [Args("a1")]),
    "fetch partial count 0": (b"a1 FETCH 1 BODY[]<0.0>\r\n", [Args("a1")]),
    "fetch partial without count": (b"a1 FETCH 1 BODY[]<0>\r\n", [Args("a1")]),
    "fetch unbalanced (": (b"a1 FETCH 1 (FLAGS\r\n", [Args("a1")]),
    "fetch unbalanced )": (b"a1 FETCH 1 FLAGS)\r\n", [Args("a1")]),
    "fetch unbalanced [": (b"a1 FETCH 1 BODY[TEXT\r\n", [Args("a1")]),

    # STORE
    "store replace list": (b"a1 STORE 1 FLAGS (\\seen \\DELETED kw)\r\n",
                           [cmd("a1", "STORE", C.Store(seqs(1), C.StoreMode.REPLACE, False,
                                                        ("\\Seen", "\\Deleted", "kw")))]),
    "store add silent, flags without parens": (
        b"a1 STORE 1:2 +FLAGS.SILENT \\Answered \\Flagged\r\n",
        [cmd("a1", "STORE", C.Store(seqs((1, 2)), C.StoreMode.ADD, True, ("\\Answered", "\\Flagged")))]),
    "store remove single flag": (b"a1 STORE 3 -flags \\Draft\r\n",
                                 [cmd("a1", "STORE", C.Store(seqs(3), C.StoreMode.REMOVE, False, ("\\Draft",)))]),
    "store empty list": (b"a1 STORE 1 FLAGS ()\r\n",
                         [cmd("a1", "STORE", C.Store(seqs(1), C.StoreMode.REPLACE, False, ()))]),
    "uid store": (b"a1 UID STORE 5 +FLAGS (\\Seen)\r\n",
                  [cmd("a1", "STORE", C.Store(seqs(5), C.StoreMode.ADD, False, ("\\Seen",)), uid=True)]),
    "store \\Recent": (b"a1 STORE 1 FLAGS (\\Recent)\r\n", [Args("a1")]),
    "store unknown system flag": (b"a1 STORE 1 FLAGS \\Bogus\r\n", [Args("a1")]),
    "store bad item": (b"a1 STORE 1 LABELS (x)\r\n", [Args("a1")]),
    "store literal refused before +": (b"a1 STORE 1 FLAGS {2}\r\na2 NOOP\r\n",
                                       [bad("a1", T.LITERAL_NOT_ALLOWED), cmd("a2", "NOOP")]),

    # SEARCH (RFC 3501 §6.4.4): every key
    "search keys without arguments": (
        b"a1 SEARCH ALL ANSWERED DELETED DRAFT FLAGGED NEW OLD RECENT SEEN UNANSWERED "
        b"UNDELETED UNDRAFT UNFLAGGED UNSEEN\r\n",
        [cmd("a1", "SEARCH", search(
            C.SearchAll(), C.SearchFlag("\\Answered", True), C.SearchFlag("\\Deleted", True),
            C.SearchFlag("\\Draft", True), C.SearchFlag("\\Flagged", True),
            C.SearchAnd((C.SearchFlag("\\Recent", True), C.SearchFlag("\\Seen", False))),
            C.SearchFlag("\\Recent", False), C.SearchFlag("\\Recent", True),
            C.SearchFlag("\\Seen", True), C.SearchFlag("\\Answered", False),
            C.SearchFlag("\\Deleted", False), C.SearchFlag("\\Draft", False),
            C.SearchFlag("\\Flagged", False), C.SearchFlag("\\Seen", False)))]),
    "search string keys": (
        b'a1 SEARCH BCC a CC "b c" FROM {1+}\r\nd SUBJECT e TO f BODY g TEXT h '
        b"HEADER X-Spam yes KEYWORD $Junk UNKEYWORD $Ok\r\n",
        [cmd("a1", "SEARCH", search(
            C.SearchHeader("BCC", b"a"), C.SearchHeader("CC", b"b c"), C.SearchHeader("FROM", b"d"),
            C.SearchHeader("SUBJECT", b"e"), C.SearchHeader("TO", b"f"), C.SearchBody(b"g"),
            C.SearchText(b"h"), C.SearchHeader("X-SPAM", b"yes"), C.SearchFlag("$Junk", True),
            C.SearchFlag("$Ok", False)))]),
    "search dates and sizes": (
        b'a1 SEARCH BEFORE 1-Feb-1994 ON "15-mar-2020" SINCE 01-JAN-2000 SENTBEFORE 2-Feb-1994 '
        b"SENTON 3-Feb-1994 SENTSINCE 4-Feb-1994 LARGER 100 SMALLER 4294967295\r\n",
        [cmd("a1", "SEARCH", search(
            C.SearchDate(False, "before", datetime.date(1994, 2, 1)),
            C.SearchDate(False, "on", datetime.date(2020, 3, 15)),
            C.SearchDate(False, "since", datetime.date(2000, 1, 1)),
            C.SearchDate(True, "before", datetime.date(1994, 2, 2)),
            C.SearchDate(True, "on", datetime.date(1994, 2, 3)),
            C.SearchDate(True, "since", datetime.date(1994, 2, 4)),
            C.SearchSize(True, 100), C.SearchSize(False, 4294967295)))]),
    "search sets, NOT, OR, groups, charset": (
        b"a1 SEARCH CHARSET utf-8 1:3,* UID 5:* NOT (SEEN FLAGGED) OR DELETED OR 2 (DRAFT)\r\n",
        [cmd("a1", "SEARCH", search(
            C.SearchSet(seqs((1, 3), STAR), False), C.SearchSet(seqs((5, STAR)), True),
            C.SearchNot(C.SearchAnd((C.SearchFlag("\\Seen", True), C.SearchFlag("\\Flagged", True)))),
            C.SearchOr(C.SearchFlag("\\Deleted", True),
                       C.SearchOr(C.SearchSet(seqs(2), False), C.SearchAnd((C.SearchFlag("\\Draft", True),)))),
            charset="UTF-8"))]),
    "uid search": (b"a1 UID SEARCH ALL\r\n", [cmd("a1", "SEARCH", search(C.SearchAll()), uid=True)]),
    "search nothing": (b"a1 SEARCH\r\n", [Args("a1")]),
    "search charset without key": (b"a1 SEARCH CHARSET UTF-8\r\n", [Args("a1")]),
    "search unknown key": (b"a1 SEARCH FOO\r\n", [Args("a1")]),
    "search missing argument": (b"a1 SEARCH FROM\r\n", [Args("a1")]),
    "search OR with one key": (b"a1 SEARCH OR SEEN\r\n", [Args("a1")]),
    "search bad date": (b"a1 SEARCH SINCE 30-Feb-2000\r\n", [Args("a1")]),
    "search bad month": (b"a1 SEARCH SINCE 1-Foo-2000\r\n", [Args("a1")]),
    "search two-digit year": (b"a1 SEARCH SINCE 1-Feb-94\r\n", [Args("a1")]),
    "search unbalanced (": (b"a1 SEARCH ((ALL)\r\n", [Args("a1")]),
    "search unbalanced )": (b"a1 SEARCH (ALL))\r\n", [Args("a1")]),
    "search empty group": (b"a1 SEARCH ()\r\n", [Args("a1")]),
    "search nested at the limit": (
        b"a1 SEARCH " + b"(" * (G.MAX_NESTING - 1) + b"ALL" + b")" * (G.MAX_NESTING - 1) + b"\r\n",
        None),   # checked below: a Command
    "search nested too deep (parens)": (
        b"a1 SEARCH " + b"(" * (G.MAX_NESTING + 1) + b"ALL" + b")" * (G.MAX_NESTING + 1) + b"\r\n",
        [Args("a1")]),
    "search nested too deep (NOT)": (b"a1 SEARCH " + b"NOT " * 5000 + b"ALL\r\n", [Args("a1")]),
    "search nested too deep (OR)": (b"a1 SEARCH " + b"OR ALL " * 5000 + b"ALL\r\n", [Args("a1")]),

    # UID variants
    "uid expunge": (b"a1 UID EXPUNGE 3:5\r\n", [cmd("a1", "EXPUNGE", C.UidExpunge(seqs((3, 5))), uid=True)]),
    "uid copy": (b"a1 uid copy 1 x\r\n", [cmd("a1", "COPY", C.Copy(seqs(1), "x"), uid=True)]),
    "uid without command": (b"a1 UID\r\n", [bad("a1", T.UNKNOWN_UID_COMMAND)]),
    "uid noop": (b"a1 UID NOOP\r\n", [bad("a1", T.UNKNOWN_UID_COMMAND)]),

    # IDLE and DONE
    "idle then done then a command": (b"a1 IDLE\r\nDONE\r\na2 NOOP\r\n",
                                      [cmd("a1", "IDLE"), Line(b"DONE"), cmd("a2", "NOOP")]),

    # lines that are not commands
    "empty line": (b"\r\n", [bad(None, T.EMPTY_LINE)]),
    "untagged": (b"* NOOP\r\n", [bad(None, T.INVALID_TAG)]),
    "continuation as tag": (b"+ NOOP\r\n", [bad(None, T.INVALID_TAG)]),
    "tag only": (b"a1\r\n", [bad("a1", T.MISSING_COMMAND)]),
    "tag and space": (b"a1 \r\n", [bad("a1", T.MISSING_COMMAND)]),
    "unknown command": (b"a1 FROB\r\n", [bad("a1", T.UNKNOWN_COMMAND)]),
    "unknown command with literal is refused before +": (
        b"a1 FROB {3}\r\na2 NOOP\r\n", [bad("a1", T.UNKNOWN_COMMAND), cmd("a2", "NOOP")]),
    "unknown command with literal+ is skipped": (
        b"a1 FROB {3+}\r\nabc more\r\na2 NOOP\r\n", [bad("a1", T.UNKNOWN_COMMAND), cmd("a2", "NOOP")]),
    "bare CR": (b"a1 NOOP\rx\r\n", [bad("a1", T.BARE_CR)]),
    "8-bit in an atom": (b"a1 SELECT caf\xc3\xa9\r\n", [bad("a1", T.EIGHT_BIT_OUTSIDE_LITERAL)]),
    "8-bit in a quoted string": (b'a1 LOGIN "\xe9" x\r\n', [bad("a1", T.EIGHT_BIT_OUTSIDE_LITERAL)]),
    "bad escape in quoted": (b'a1 LOGIN "a\\nb" x\r\n', [Args("a1")]),
    "unterminated quoted": (b'a1 LOGIN "abc x\r\n', [Args("a1")]),
    "control character in quoted is allowed": (b'a1 LOGIN "a\x01b" x\r\n',
                                               [cmd("a1", "LOGIN", C.Login(b"a\x01b", b"x"))]),

    # NUL anywhere is refused (CVE-2019-11500 class), and the stream stays in step
    "NUL in quoted": (b'a1 LOGIN "a\x00b" x\r\na2 NOOP\r\n', [bad("a1", T.NUL_IN_COMMAND), cmd("a2", "NOOP")]),
    "NUL in an atom": (b"a1 NO\x00OP\r\n", [bad("a1", T.NUL_IN_COMMAND)]),
    "NUL in the tag": (b"a\x001 NOOP\r\n", [bad(None, T.NUL_IN_COMMAND)]),
    "NUL in a literal": (b"a1 LOGIN {3}\r\na\x00b x\r\na2 NOOP\r\n",
                         [SendContinuation("a1", "LOGIN", 3), bad("a1", T.NUL_IN_COMMAND), cmd("a2", "NOOP")]),
    "NUL in a literal+, more literals after": (
        b"a1 LOGIN {3+}\r\na\x00b {2+}\r\nxy\r\na2 NOOP\r\n", [bad("a1", T.NUL_IN_COMMAND), cmd("a2", "NOOP")]),
    "NUL in a literal, a sync literal after gets no +": (
        b"a1 LOGIN {3+}\r\na\x00b {2}\r\na2 NOOP\r\n", [bad("a1", T.NUL_IN_COMMAND), cmd("a2", "NOOP")]),
}


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_table(name: str, one_at_a_time: bool) -> None:
    data, expected = CASES[name]
    events = run(data, one_at_a_time)
    if expected is None:
        assert len(events) == 1 and isinstance(events[0], Command), events
    else:
        assert events == expected


# --- limits --------------------------------------------------------------------------------

LIMITS = {"max_line_bytes": 100, "max_literal_bytes": 50}

LIMIT_CASES = {
    "line at the limit": (b"a1 LOGIN " + b"x" * (100 - 15) + b" y\r\n", "command"),
    "line over the limit, next command fine": (
        b"a1 LOGIN " + b"x" * 200 + b" y\r\na2 NOOP\r\n",
        [bad("a1", T.LINE_TOO_LONG), cmd("a2", "NOOP")]),
    "over-long line without a space has no tag": (
        b"x" * 300 + b"\r\na2 NOOP\r\n", [bad(None, T.LINE_TOO_LONG), cmd("a2", "NOOP")]),
    "over-long line announcing {n}: BAD, no +": (
        b"a1 LOGIN " + b"x" * 200 + b" {5}\r\na2 NOOP\r\n",
        [bad("a1", T.LINE_TOO_LONG), cmd("a2", "NOOP")]),
    "over-long line announcing {n+}: fatal": (
        b"a1 LOGIN " + b"x" * 200 + b" {5+}\r\nhello\r\na2 NOOP\r\n",
        [bad("a1", T.LINE_TOO_LONG, fatal=True)]),
    "lines of one command add up": (
        b"a1 LOGIN {2+}\r\nab " + b"x" * 95 + b"\r\na2 NOOP\r\n",
        [bad("a1", T.LINE_TOO_LONG), cmd("a2", "NOOP")]),
    "literal at the limit": (b"a1 LOGIN {50}\r\n" + b"x" * 50 + b" y\r\n",
                             [SendContinuation("a1", "LOGIN", 50),
                              cmd("a1", "LOGIN", C.Login(b"x" * 50, b"y"))]),
    "literal over the limit: BAD [TOOBIG], no +": (
        b"a1 LOGIN {51}\r\na2 NOOP\r\n", [bad("a1", T.LITERAL_TOO_BIG), cmd("a2", "NOOP")]),
    "huge literal: no +": (b"a1 LOGIN {999999999}\r\na2 NOOP\r\n",
                           [bad("a1", T.LITERAL_TOO_BIG), cmd("a2", "NOOP")]),
    "absurd literal size": (b"a1 LOGIN {" + b"9" * 40 + b"}\r\na2 NOOP\r\n",
                            [bad("a1", T.LITERAL_TOO_BIG), cmd("a2", "NOOP")]),
    "literal+ over the limit: fatal, the rest ignored": (
        b"a1 LOGIN {51+}\r\n" + b"x" * 51 + b" y\r\na2 NOOP\r\n", [bad("a1", T.LITERAL_TOO_BIG, fatal=True)]),
    "huge literal+: fatal": (b"a1 APPEND INBOX {4294967295+}\r\nFrom: x\r\n",
                             [bad("a1", T.LITERAL_TOO_BIG, fatal=True)]),
    "literals of a command add up": (
        b"a1 LOGIN {30}\r\n" + b"x" * 30 + b" {21}\r\na2 NOOP\r\n",
        [SendContinuation("a1", "LOGIN", 30), bad("a1", T.LITERAL_TOO_BIG), cmd("a2", "NOOP")]),
    "raw line over the limit": (b"a1 IDLE\r\n" + b"D" * 300 + b"\r\nDONE\r\n",
                                [cmd("a1", "IDLE"), Line(b"", too_long=True), bad("DONE", T.MISSING_COMMAND)]),
}


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", sorted(LIMIT_CASES))
def test_limits(name: str, one_at_a_time: bool) -> None:
    data, expected = LIMIT_CASES[name]
    events = run(data, one_at_a_time, **LIMITS)
    if expected == "command":
        assert [type(e) for e in events] == [Command]
    else:
        assert events == expected


def test_nothing_over_the_limits_is_held() -> None:
    """A 10 MB line or literal announcement never makes the parser hold more than its
    limits plus the chunk being fed (SPEC §9; "literal sizes bounded before allocation")."""
    parser = P.CommandParser(max_line_bytes=1000, max_literal_bytes=1000)
    chunk = b"y" * 4096
    parser.receive_data(b"a1 LOGIN x ")
    for _ in range(2500):
        parser.receive_data(chunk)
        assert parser.next_event() is Status.NEED_DATA
        assert parser.held_bytes <= 2000 + len(chunk)
    parser.receive_data(b"\r\na2 LOGIN {2000}\r\n")
    assert parser.next_event() == bad("a1", T.LINE_TOO_LONG)
    assert parser.next_event() == bad("a2", T.LITERAL_TOO_BIG)
    assert parser.held_bytes == 0


def test_limits_can_change_between_events() -> None:
    """SPEC §9: 64 KiB before login, max_size after. The caller raises the limit after
    LOGIN; the next command's literal is judged by the new one."""
    parser = P.CommandParser(max_literal_bytes=10)
    parser.receive_data(b"a1 LOGIN a b\r\na2 APPEND INBOX {20}\r\n")
    assert parser.next_event() == cmd("a1", "LOGIN", C.Login(b"a", b"b"))
    parser.max_literal_bytes = 100
    assert parser.next_event() == SendContinuation("a2", "APPEND", 20)


# --- what the caller does between events --------------------------------------------------

def test_refuse_literal() -> None:
    """RFC 3501 §7.5: instead of "+", the service may answer (APPEND: NO [CANNOT]); the
    client then does not send the literal and the next octets are a new command."""
    parser = P.CommandParser()
    parser.receive_data(b"a1 APPEND INBOX {10}\r\n")
    assert parser.next_event() == SendContinuation("a1", "APPEND", 10)
    parser.refuse_literal()
    assert parser.next_event() is Status.NEED_DATA
    assert parser.feed(b"a2 NOOP\r\n") == [cmd("a2", "NOOP")]
    with pytest.raises(RuntimeError):
        parser.refuse_literal()


def test_starttls_pauses_and_discards_what_followed() -> None:
    """SPEC §8 (CVE-2021-33515 class): octets after STARTTLS are never executed."""
    parser = P.CommandParser()
    assert parser.feed(b"a1 STARTTLS\r\na2 LOGIN evil evil\r\n") == [cmd("a1", "STARTTLS")]
    assert parser.paused and parser.next_event() is Status.PAUSED
    assert parser.buffered_bytes == len(b"a2 LOGIN evil evil\r\n")
    assert parser.discard_buffered() == len(b"a2 LOGIN evil evil\r\n")
    parser.resume()
    assert parser.feed(b"a3 CAPABILITY\r\n") == [cmd("a3", "CAPABILITY")]


def test_authenticate_exchange() -> None:
    parser = P.CommandParser()
    assert parser.feed(b"a1 AUTHENTICATE PLAIN\r\n") == [
        cmd("a1", "AUTHENTICATE", C.Authenticate("PLAIN", None))]
    parser.expect_line()
    [line] = parser.feed(b"AGFsaWNlAHNlY3JldA==\r\n")
    assert P.decode_sasl_line(line.data) == b"\0alice\0secret"
    assert parser.paused
    parser.expect_line()                 # a second round (another challenge)
    [line] = parser.feed(b"*\r\n")
    assert P.decode_sasl_line(line.data) is P.SASL_CANCEL
    parser.resume()
    assert parser.feed(b"a2 NOOP\r\n") == [cmd("a2", "NOOP")]


@pytest.mark.parametrize("line, expected", [
    (b"=", b""), (b"", b""), (b"AA==", b"\0"), (b"A", None), (b"!!!!", None), (b"AA==AA==", None),
])
def test_decode_sasl_line(line: bytes, expected) -> None:
    assert P.decode_sasl_line(line) == expected


@pytest.mark.parametrize("line, done", [(b"DONE", True), (b"done", True), (b"DONE ", False),
                                        (b"a1 NOOP", False)])
def test_is_idle_done(line: bytes, done: bool) -> None:
    assert P.is_idle_done(line) is done


def test_expect_line_mid_command_is_a_caller_bug() -> None:
    parser = P.CommandParser()
    parser.receive_data(b"a1 LOGIN {3}\r\n")
    assert isinstance(parser.next_event(), SendContinuation)
    with pytest.raises(RuntimeError):
        parser.expect_line()


def test_fatal_error_ignores_everything_after() -> None:
    parser = P.CommandParser(max_literal_bytes=10)
    assert parser.feed(b"a1 LOGIN {11+}\r\n") == [bad("a1", T.LITERAL_TOO_BIG, fatal=True)]
    assert parser.feed(b"a2 NOOP\r\n") == []
    assert parser.held_bytes == 0


def test_pipelined_commands_come_one_at_a_time() -> None:
    """next_event() hands out one command per call, so the caller can act between them."""
    parser = P.CommandParser()
    parser.receive_data(b"a1 NOOP\r\na2 NOOP\r\na3 NOOP\r\n")
    assert parser.next_event() == cmd("a1", "NOOP")
    assert parser.buffered_bytes == 2 * len(b"a2 NOOP\r\n")
    assert parser.next_event() == cmd("a2", "NOOP")
    assert parser.next_event() == cmd("a3", "NOOP")
    assert parser.next_event() is Status.NEED_DATA


# --- argument helpers ---------------------------------------------------------------------

def test_sequence_set_helpers() -> None:
    s = seqs((1, 3), (STAR, 8), 20)
    assert s.resolve(10) == [(1, 3), (8, 10), (20, 20)]
    assert s.contains(9, 10) and not s.contains(5, 10)
    assert s.select(range(1, 11), 10) == [1, 2, 3, 8, 9, 10]
    assert s.select([2, 9, 30, 40], 40) == [2, 9, 30, 40]
    assert s.exceeds(10) and not s.exceeds(20)
    # RFC 3501 §6.4.8: a UID range 559:* includes the last UID even when it is lower.
    assert seqs((559, STAR)).select([3, 7, 12], 12) == [12]
    huge = seqs((1, 4294967295))
    assert huge.select([5, 6], 6) == [5, 6]


def test_fetch_att_properties() -> None:
    assert body().sets_seen and not body(peek=True).sets_seen
    assert att("RFC822").sets_seen and att("RFC822.TEXT").sets_seen
    assert not att("RFC822.HEADER").sets_seen and not att("FLAGS").sets_seen
    assert not att("FLAGS").needs_content and att("ENVELOPE").needs_content
    assert str(C.Section((1, 2), "HEADER.FIELDS", ("FROM", "TO"))) == "1.2.HEADER.FIELDS (FROM TO)"
    assert str(C.Section()) == "" and str(C.Section((3,))) == "3"


def test_parse_command_directly() -> None:
    assert P.parse_command(b"a1 NOOP") == cmd("a1", "NOOP")
    assert P.parse_command(b"a1 LOGIN {1}\r\nx y") == cmd("a1", "LOGIN", C.Login(b"x", b"y"))
    assert P.parse_command(b"a1 LOGIN {5}\r\nx y") == Args("a1")
