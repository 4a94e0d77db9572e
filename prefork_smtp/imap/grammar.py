"""The IMAP command grammar (RFC 3501 §9, with LITERAL+, SASL-IR, ENABLE, UIDPLUS): one
complete command, as on the wire, to its tag, its name and its arguments (commands.py).

Owns: the character classes; a cursor over one command (_Reader) with the productions
commands share (atom, astring, literal, sequence-set, date, date-time, flag); the
arguments of each command (FETCH, SEARCH, STORE, ...); the command table: which commands
exist, whether their arguments can hold a string (so a literal), whether the octets
after them are not commands. Bounds on what a number and SEARCH's nesting may be.
Must not: frame input (line ends, waiting for literals, limits on what is buffered:
parser.py does), decide policy (what a state allows), or touch sockets, clocks, files or
loggers.
Fails: tag_and_command() gives the reason for a bad tag or command name (a response.*
text); read_arguments() raises ArgumentError naming what was expected where. Nothing
else is raised on client input.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import re
from typing import Callable, NoReturn

from . import response as T
from .commands import (Append, Authenticate, Copy, Enable, Fetch, FetchAtt, ListArgs, Login,
                       MailboxArg, Rename, Search, SearchAll, SearchAnd, SearchBody, SearchDate,
                       SearchFlag, SearchHeader, SearchKey, SearchNot, SearchOr, SearchSet,
                       SearchSize, SearchText, Section, SequenceSet, StatusArgs, Store, StoreMode,
                       UidExpunge)

# RFC 3501 §9: number and nz-number are unsigned 32-bit.
MAX_NUMBER = 2**32 - 1
# SEARCH programs nest (parentheses, NOT, OR) and are parsed and evaluated recursively.
# RFC 3501 sets no bound; this one keeps far below Python's recursion limit and matches
# SPEC §9's bound on MIME nesting.
MAX_NESTING = 100


def decode_base64(text: bytes) -> bytes | None:
    """SASL's base64 (RFC 4959 initial responses, RFC 3501 §6.2.2 response lines): the
    octets, b"" for "=", None when it is not base64."""
    if text == b"=":                    # RFC 4959: an empty initial response
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# --- character classes (RFC 3501 §9) -------------------------------------------------------

_CTL = frozenset(range(0x20)) | {0x7F}
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | _CTL | frozenset(range(0x80, 0x100))
ATOM_CHARS = frozenset(range(256)) - _ATOM_SPECIALS
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
_TAG_CHARS = ASTRING_CHARS - {ord("+")}
_LIST_CHARS = ATOM_CHARS | frozenset(b"%*]")
_DIGITS = frozenset(b"0123456789")
_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))}
# RFC 3501 §2.3.2; \Recent cannot be stored (§6.4.6) and other \-flags do not exist here.
SYSTEM_FLAGS = {f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen",
                                       "\\Draft")}
_DATE_TIME = re.compile(
    rb'"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"')
STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"})


class ArgumentError(Exception):
    """Arguments that do not parse; the text says what was expected. Raised by
    read_arguments(); parser.parse_command() turns it into a ParseError."""


class _Reader:
    """A cursor over one complete command, as on the wire without its final line end."""
    __slots__ = ("data", "pos", "depth")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.depth = 0

    def fail(self, expected: str) -> NoReturn:
        raise ArgumentError(expected)

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if not self.at_end():
            self.fail("unexpected text after the arguments")

    def char(self, c: bytes, what: str) -> None:
        if self.data[self.pos:self.pos + 1] != c:
            self.fail(what)
        self.pos += 1

    def sp(self) -> None:
        self.char(b" ", "expected a space")

    def maybe_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def run(self, chars: frozenset[int]) -> bytes:
        start, data, n = self.pos, self.data, len(self.data)
        i = start
        while i < n and data[i] in chars:
            i += 1
        self.pos = i
        return data[start:i]

    def atom(self, what: str = "expected an atom") -> bytes:
        value = self.run(ATOM_CHARS)
        if not value:
            self.fail(what)
        return value

    def keyword(self, what: str) -> str:
        return self.atom(what).decode("ascii").upper()

    def number(self, nonzero: bool = False) -> int:
        digits = self.run(_DIGITS)
        if not digits:
            self.fail("expected a number")
        if nonzero and digits[:1] == b"0":      # nz-number = digit-nz *DIGIT
            self.fail("expected a number greater than zero")
        if len(digits) > 10 or int(digits) > MAX_NUMBER:
            self.fail("number out of range")
        return int(digits)

    def quoted(self) -> bytes:
        self.char(b'"', "expected a quoted string")
        out = bytearray()
        data, i, n = self.data, self.pos, len(self.data)
        while i < n:
            c = data[i]
            if c == 0x22:
                self.pos = i + 1
                return bytes(out)
            if c == 0x5C:
                if i + 1 < n and data[i + 1] in (0x22, 0x5C):
                    out.append(data[i + 1])
                    i += 2
                    continue
                self.pos = i
                self.fail("only \\\\ and \\\" are escapes in a quoted string")
            if c in (0x0D, 0x0A) or c == 0 or c >= 0x80:
                self.pos = i
                self.fail("invalid character in a quoted string")
            out.append(c)
            i += 1
        self.pos = i
        self.fail("unterminated quoted string")

    def literal(self) -> bytes:
        self.char(b"{", "expected a literal")
        size = self.number()
        if self.peek() == ord("+"):
            self.pos += 1
        self.char(b"}", "expected } after the literal size")
        if self.data.startswith(b"\r\n", self.pos):
            self.pos += 2
        elif self.data.startswith(b"\n", self.pos):
            self.pos += 1
        else:
            self.fail("a literal must end the line")
        if self.pos + size > len(self.data):
            self.fail("literal shorter than announced")
        value = self.data[self.pos:self.pos + size]
        self.pos += size
        return value

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == ord("{"):
            return self.literal()
        self.fail("expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c == 0x22 or c == ord("{"):
            return self.string()
        value = self.run(ASTRING_CHARS)
        if not value:
            self.fail("expected a string or an atom")
        return value

    def mailbox(self) -> str:
        return _mailbox_name(self.astring(), self)

    def list_mailbox(self) -> str:
        c = self.peek()
        if c == 0x22 or c == ord("{"):
            raw = self.string()
        else:
            raw = self.run(_LIST_CHARS)
            if not raw:
                self.fail("expected a mailbox pattern")
        return _decode_utf8(raw, self)

    def flag(self) -> str:
        """A flag that can be stored: a system flag (canonical case) or a keyword."""
        if self.peek() == 0x5C:
            self.pos += 1
            name = "\\" + self.atom("expected a flag").decode("ascii")
            canonical = SYSTEM_FLAGS.get(name.upper())
            if canonical is None:       # \Recent, or a \-flag that does not exist
                self.fail("not a flag that can be stored")
            return canonical
        return self.atom("expected a flag").decode("ascii")

    def flag_list(self) -> tuple[str, ...]:
        self.char(b"(", "expected a flag list")
        flags: list[str] = []
        if self.peek() != ord(")"):
            flags.append(self.flag())
            while self.maybe_sp():
                flags.append(self.flag())
        self.char(b")", "expected ) after the flags")
        return tuple(flags)

    def sequence_set(self) -> SequenceSet:
        ranges = []
        while True:
            lo = self._seq_number()
            hi = lo
            if self.peek() == ord(":"):
                self.pos += 1
                hi = self._seq_number()
            ranges.append((lo, hi))
            if self.peek() != ord(","):
                return SequenceSet(tuple(ranges))
            self.pos += 1

    def _seq_number(self) -> int | None:
        if self.peek() == ord("*"):
            self.pos += 1
            return None
        if self.peek() not in _DIGITS:
            self.fail("expected a sequence set")
        return self.number(nonzero=True)

    def date(self) -> datetime.date:
        """date = date-text / DQUOTE date-text DQUOTE; date-text = 1*2DIGIT "-" Mon "-" 4DIGIT"""
        quoted = self.peek() == 0x22
        if quoted:
            self.pos += 1
        day = self.run(_DIGITS)
        if not 1 <= len(day) <= 2:
            self.fail("expected a date like 1-Feb-1994")
        self.char(b"-", "expected a date like 1-Feb-1994")
        value = self._month_year(int(day))
        if quoted:
            self.char(b'"', "expected \" after the date")
        return value

    def _month_year(self, day: int) -> datetime.date:
        month = _MONTHS.get(self.data[self.pos:self.pos + 3].decode("ascii", "replace").upper())
        self.pos += 3
        if month is None:
            self.fail("unknown month")
        self.char(b"-", "expected a date like 1-Feb-1994")
        year = self.run(_DIGITS)
        if len(year) != 4:
            self.fail("expected a four-digit year")
        try:
            return datetime.date(int(year), month, day)
        except ValueError:
            self.fail("no such date")

    def date_time(self) -> datetime.datetime:
        """RFC 3501 §9 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" (day padded with a space)."""
        m = _DATE_TIME.match(self.data, self.pos)
        if m is None:
            self.fail('expected a date-time like "17-Jul-1996 02:44:25 -0700"')
        self.pos = m.end()
        day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
        month = _MONTHS.get(mon.decode("ascii").upper())
        offset = datetime.timedelta(hours=int(zh), minutes=int(zm))
        try:
            if month is None:
                raise ValueError
            return datetime.datetime(
                int(year), month, int(day.strip()), int(hh), int(mm), int(ss),
                tzinfo=datetime.timezone(-offset if sign == b"-" else offset))
        except ValueError:
            self.fail("no such date-time")

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            self.fail("nested too deeply")

    def unnest(self) -> None:
        self.depth -= 1


def _decode_utf8(raw: bytes, r: _Reader) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        r.fail("a mailbox name must be UTF-8")


def _mailbox_name(raw: bytes, r: _Reader) -> str:
    if raw.upper() == b"INBOX":          # RFC 3501 §5.1: INBOX is case-insensitive
        return "INBOX"
    return _decode_utf8(raw, r)


# --- arguments of each command ---------------------------------------------------------------

def _no_args(r: _Reader) -> None:
    return None


def _authenticate(r: _Reader) -> Authenticate:
    r.sp()
    mechanism = r.keyword("expected a SASL mechanism")
    initial = None
    if r.maybe_sp():                    # RFC 4959: initial-response = base64 / "="
        text = r.run(_BASE64_CHARS)
        initial = decode_base64(text) if text else None
        if initial is None:
            r.fail("the initial response must be base64 or =")
    return Authenticate(mechanism, initial)


_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def _login(r: _Reader) -> Login:
    r.sp()
    user = r.astring()
    r.sp()
    return Login(user, r.astring())


def _mailbox_arg(r: _Reader) -> MailboxArg:
    r.sp()
    return MailboxArg(r.mailbox())


def _rename(r: _Reader) -> Rename:
    r.sp()
    old = r.mailbox()
    r.sp()
    return Rename(old, r.mailbox())


def _list(r: _Reader) -> ListArgs:
    r.sp()
    reference = r.mailbox()
    r.sp()
    return ListArgs(reference, r.list_mailbox())


def _status(r: _Reader) -> StatusArgs:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    r.char(b"(", "expected ( before the status items")
    items = [r.keyword("expected a status item")]
    while r.maybe_sp():
        items.append(r.keyword("expected a status item"))
    r.char(b")", "expected ) after the status items")
    if not set(items) <= STATUS_ITEMS:
        r.fail("unknown status item")
    return StatusArgs(mailbox, tuple(items))


def _append(r: _Reader) -> Append:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    flags: tuple[str, ...] = ()
    date_time = None
    if r.peek() == ord("("):
        flags = r.flag_list()
        r.sp()
    if r.peek() == 0x22:
        date_time = r.date_time()
        r.sp()
    if r.peek() != ord("{"):            # append = ... SP literal (RFC 3501 §9)
        r.fail("the message must be a literal")
    return Append(mailbox, flags, date_time, r.literal())


def _copy(r: _Reader) -> Copy:
    r.sp()
    seqs = r.sequence_set()
    r.sp()
    return Copy(seqs, r.mailbox())


def _uid_expunge(r: _Reader) -> UidExpunge:
    r.sp()
    return UidExpunge(r.sequence_set())


def _enable(r: _Reader) -> Enable:
    caps = []
    while r.maybe_sp():
        caps.append(r.keyword("expected a capability"))
    if not caps:
        r.fail("expected a capability")
    return Enable(tuple(caps))


def _store(r: _Reader) -> Store:
    r.sp()
    seqs = r.sequence_set()
    r.sp()
    mode = StoreMode.REPLACE
    if r.peek() in (ord("+"), ord("-")):
        mode = StoreMode(chr(r.peek()))
        r.pos += 1
    item = r.run(_NAME_CHARS).decode("ascii").upper()
    if item not in ("FLAGS", "FLAGS.SILENT"):
        r.fail("expected FLAGS or FLAGS.SILENT")
    r.sp()
    if r.peek() == ord("("):
        flags = r.flag_list()
    else:                               # flag *(SP flag) without parentheses
        items = [r.flag()]
        while r.maybe_sp():
            items.append(r.flag())
        flags = tuple(items)
    return Store(seqs, mode, item.endswith(".SILENT"), flags)


# FETCH (RFC 3501 §6.4.5)

_FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_FETCH_NAMES = frozenset({"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER",
                          "RFC822.SIZE", "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID"})
_SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})
_SECTION_WORD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")
# RFC 5322 §3.6.8: field-name = 1*ftext, ftext = %d33-57 / %d59-126
_FIELD_NAME_CHARS = frozenset(range(33, 127)) - {ord(":")}


def _fetch(r: _Reader) -> Fetch:
    r.sp()
    seqs = r.sequence_set()
    r.sp()
    if r.peek() == ord("("):
        r.pos += 1
        atts = [_fetch_att(r)]
        while r.maybe_sp():
            atts.append(_fetch_att(r))
        r.char(b")", "expected ) after the fetch items")
        return Fetch(seqs, tuple(atts))
    start = r.pos
    word = r.run(_NAME_CHARS).decode("ascii").upper()
    if word in _FETCH_MACROS and r.peek() != ord("["):
        return Fetch(seqs, tuple(FetchAtt(n) for n in _FETCH_MACROS[word]))
    r.pos = start
    return Fetch(seqs, (_fetch_att(r),))


def _fetch_att(r: _Reader) -> FetchAtt:
    name = r.run(_NAME_CHARS).decode("ascii").upper()
    if name in ("BODY", "BODY.PEEK") and r.peek() == ord("["):
        section = _section(r)
        partial = None
        if r.peek() == ord("<"):
            r.pos += 1
            start = r.number()
            r.char(b".", "expected <start.count>")
            count = r.number(nonzero=True)
            r.char(b">", "expected > after <start.count>")
            partial = (start, count)
        return FetchAtt("BODY", section, partial, peek=name == "BODY.PEEK")
    if name not in _FETCH_NAMES:
        r.fail("unknown fetch item")
    return FetchAtt(name)


def _section(r: _Reader) -> Section:
    r.char(b"[", "expected [")
    part: list[int] = []
    text = None
    fields: tuple[str, ...] = ()
    while r.peek() in _DIGITS:
        part.append(r.number(nonzero=True))
        if r.peek() != ord("."):
            break
        r.pos += 1
        if r.peek() not in _DIGITS:
            text = _section_text(r, bool(part))
            break
    if not part and r.peek() != ord("]"):
        text = _section_text(r, False)
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        fields = _header_list(r)
    r.char(b"]", "expected ] after the section")
    return Section(tuple(part), text, fields)


def _section_text(r: _Reader, after_part: bool) -> str:
    word = r.run(_SECTION_WORD_CHARS).decode("ascii").upper()
    if word not in _SECTION_TEXTS or (word == "MIME" and not after_part):
        r.fail("unknown section")
    return word


def _header_list(r: _Reader) -> tuple[str, ...]:
    r.sp()
    r.char(b"(", "expected ( before the header names")
    names = [_header_name(r)]
    while r.maybe_sp():
        names.append(_header_name(r))
    r.char(b")", "expected ) after the header names")
    return tuple(names)


def _header_name(r: _Reader) -> str:
    raw = r.astring()
    if not raw or any(c not in _FIELD_NAME_CHARS for c in raw):
        r.fail("not a header field name")
    return raw.decode("ascii").upper()


# SEARCH (RFC 3501 §6.4.4), table-driven: keyword -> (argument kind, builder)

_NO_ARG, _ASTRING, _DATE, _NUMBER, _KEYWORD, _HEADER, _SEQSET, _KEY, _TWO_KEYS = range(9)


def _flag_key(flag: str, present: bool):
    return (_NO_ARG, lambda: SearchFlag(flag, present))


SEARCH_KEYS: dict[str, tuple[int, Callable]] = {
    "ALL": (_NO_ARG, SearchAll),
    "ANSWERED": _flag_key("\\Answered", True),
    "DELETED": _flag_key("\\Deleted", True),
    "DRAFT": _flag_key("\\Draft", True),
    "FLAGGED": _flag_key("\\Flagged", True),
    "RECENT": _flag_key("\\Recent", True),
    "SEEN": _flag_key("\\Seen", True),
    "UNANSWERED": _flag_key("\\Answered", False),
    "UNDELETED": _flag_key("\\Deleted", False),
    "UNDRAFT": _flag_key("\\Draft", False),
    "UNFLAGGED": _flag_key("\\Flagged", False),
    "UNSEEN": _flag_key("\\Seen", False),
    "OLD": _flag_key("\\Recent", False),
    "NEW": (_NO_ARG, lambda: SearchAnd((SearchFlag("\\Recent", True),
                                         SearchFlag("\\Seen", False)))),
    "KEYWORD": (_KEYWORD, lambda flag: SearchFlag(flag, True)),
    "UNKEYWORD": (_KEYWORD, lambda flag: SearchFlag(flag, False)),
    "BCC": (_ASTRING, lambda v: SearchHeader("BCC", v)),
    "CC": (_ASTRING, lambda v: SearchHeader("CC", v)),
    "FROM": (_ASTRING, lambda v: SearchHeader("FROM", v)),
    "SUBJECT": (_ASTRING, lambda v: SearchHeader("SUBJECT", v)),
    "TO": (_ASTRING, lambda v: SearchHeader("TO", v)),
    "HEADER": (_HEADER, SearchHeader),
    "BODY": (_ASTRING, SearchBody),
    "TEXT": (_ASTRING, SearchText),
    "BEFORE": (_DATE, lambda d: SearchDate(False, "before", d)),
    "ON": (_DATE, lambda d: SearchDate(False, "on", d)),
    "SINCE": (_DATE, lambda d: SearchDate(False, "since", d)),
    "SENTBEFORE": (_DATE, lambda d: SearchDate(True, "before", d)),
    "SENTON": (_DATE, lambda d: SearchDate(True, "on", d)),
    "SENTSINCE": (_DATE, lambda d: SearchDate(True, "since", d)),
    "LARGER": (_NUMBER, lambda n: SearchSize(True, n)),
    "SMALLER": (_NUMBER, lambda n: SearchSize(False, n)),
    "UID": (_SEQSET, lambda s: SearchSet(s, uid=True)),
    "NOT": (_KEY, SearchNot),
    "OR": (_TWO_KEYS, SearchOr),
}


def _search(r: _Reader) -> Search:
    r.sp()
    charset = None
    start = r.pos
    if r.run(_NAME_CHARS).upper() == b"CHARSET" and r.peek() == 0x20:
        r.sp()
        charset = r.astring().decode("ascii", "replace").upper()
        r.sp()
    else:
        r.pos = start
    keys = [_search_key(r)]
    while r.maybe_sp():
        keys.append(_search_key(r))
    return Search(charset, SearchAnd(tuple(keys)))


def _search_key(r: _Reader) -> SearchKey:
    c = r.peek()
    if c in _DIGITS or c == ord("*"):
        return SearchSet(r.sequence_set(), uid=False)
    r.nest()
    try:
        if c == ord("("):
            r.pos += 1
            keys = [_search_key(r)]
            while r.maybe_sp():
                keys.append(_search_key(r))
            r.char(b")", "expected ) after the search keys")
            return SearchAnd(tuple(keys))
        kind, build = SEARCH_KEYS.get(r.keyword("expected a search key"), (None, None))
        if build is None:
            r.fail("unknown search key")
        return build(*_search_args(r, kind))
    finally:
        r.unnest()


def _search_args(r: _Reader, kind: int) -> tuple:
    if kind == _NO_ARG:
        return ()
    r.sp()
    if kind == _ASTRING:
        return (r.astring(),)
    if kind == _DATE:
        return (r.date(),)
    if kind == _NUMBER:
        return (r.number(),)
    if kind == _KEYWORD:                # flag-keyword = atom
        return (r.atom("expected a keyword").decode("ascii"),)
    if kind == _HEADER:
        name = _header_name(r)
        r.sp()
        return (name, r.astring())
    if kind == _SEQSET:
        return (r.sequence_set(),)
    if kind == _KEY:
        return (_search_key(r),)
    left = _search_key(r)               # _TWO_KEYS
    r.sp()
    return (left, _search_key(r))


# --- the command table -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class CommandSpec:
    parse: Callable[[_Reader], object]
    # Can a string (so a literal) appear in the arguments? If not, a literal is refused
    # before the client sends it.
    takes_strings: bool
    # The octets after this command are not commands (or must not be read yet).
    pause_after: bool = False


COMMANDS: dict[str, CommandSpec] = {
    "CAPABILITY": CommandSpec(_no_args, False),
    "NOOP": CommandSpec(_no_args, False),
    "LOGOUT": CommandSpec(_no_args, False),
    "STARTTLS": CommandSpec(_no_args, False, pause_after=True),
    "AUTHENTICATE": CommandSpec(_authenticate, False, pause_after=True),
    "LOGIN": CommandSpec(_login, True),
    "SELECT": CommandSpec(_mailbox_arg, True),
    "EXAMINE": CommandSpec(_mailbox_arg, True),
    "CREATE": CommandSpec(_mailbox_arg, True),
    "DELETE": CommandSpec(_mailbox_arg, True),
    "RENAME": CommandSpec(_rename, True),
    "SUBSCRIBE": CommandSpec(_mailbox_arg, True),
    "UNSUBSCRIBE": CommandSpec(_mailbox_arg, True),
    "LIST": CommandSpec(_list, True),
    "LSUB": CommandSpec(_list, True),
    "STATUS": CommandSpec(_status, True),
    "APPEND": CommandSpec(_append, True),
    "CHECK": CommandSpec(_no_args, False),
    "CLOSE": CommandSpec(_no_args, False),
    "EXPUNGE": CommandSpec(_no_args, False),
    "SEARCH": CommandSpec(_search, True),
    "FETCH": CommandSpec(_fetch, True),
    "STORE": CommandSpec(_store, False),
    "COPY": CommandSpec(_copy, True),
    "IDLE": CommandSpec(_no_args, False, pause_after=True),
    "NAMESPACE": CommandSpec(_no_args, False),
    "ENABLE": CommandSpec(_enable, False),
    "UNSELECT": CommandSpec(_no_args, False),
}
# RFC 3501 §6.4.8 and RFC 4315 §2.1 (UID EXPUNGE)
UID_COMMANDS: dict[str, CommandSpec] = {
    "FETCH": COMMANDS["FETCH"],
    "STORE": COMMANDS["STORE"],
    "SEARCH": COMMANDS["SEARCH"],
    "COPY": COMMANDS["COPY"],
    "EXPUNGE": CommandSpec(_uid_expunge, False),
}


def tag_and_command(text: bytes
                    ) -> tuple[str | None, str | None, bool, CommandSpec | None, str | None]:
    """From the start of a command: (tag, name, uid, spec, error reason)."""
    r = _Reader(text)
    raw_tag = r.run(_TAG_CHARS)
    if not raw_tag or r.peek() not in (0x20, -1):
        return None, None, False, None, T.INVALID_TAG
    tag = raw_tag.decode("ascii")
    if not r.maybe_sp():
        return tag, None, False, None, T.MISSING_COMMAND
    name = r.run(ATOM_CHARS).decode("ascii").upper()
    if not name:
        return tag, None, False, None, T.MISSING_COMMAND
    if name != "UID":
        spec = COMMANDS.get(name)
        return tag, name, False, spec, None if spec else T.UNKNOWN_COMMAND
    if not r.maybe_sp():
        return tag, name, True, None, T.UNKNOWN_UID_COMMAND
    name = r.run(ATOM_CHARS).decode("ascii").upper()
    spec = UID_COMMANDS.get(name)
    return tag, name, True, spec, None if spec else T.UNKNOWN_UID_COMMAND


def read_arguments(data: bytes, spec: CommandSpec, uid: bool) -> object:
    """The arguments of one complete command whose head tag_and_command() accepted
    (`spec` is what it gave). ArgumentError when they do not parse."""
    r = _Reader(data)
    r.run(_TAG_CHARS)
    r.sp()
    r.run(ATOM_CHARS)
    if uid:
        r.sp()
        r.run(ATOM_CHARS)
    args = spec.parse(r)
    r.end()
    return args
