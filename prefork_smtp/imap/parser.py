"""IMAP4rev1 command parser (RFC 3501 §9 with LITERAL+, SASL-IR, IDLE, UIDPLUS), sans-IO.

Owns: turning the octets a client sends into events: complete commands with typed
arguments, requests to send a literal continuation, BAD reasons, and raw lines when the
caller asks for one (AUTHENTICATE responses, IDLE's DONE). Also the limits on what is
buffered: command text and literal octets.
Must not: touch sockets, clocks, files or loggers; decide policy (what a state allows,
whether APPEND is refused): the caller does, between events.

Use (h11 style, one event at a time so that the caller can act between them):

    parser.receive_data(data)
    while True:
        event = parser.next_event()
        if event is Status.NEED_DATA: break            # read more from the client
        if event is Status.PAUSED: ...                 # see below
        ...                                            # Command, SendContinuation, ParseError, Line

`feed(data)` does both and returns the events up to NEED_DATA or PAUSED (for tests and
simple callers; it cannot refuse a literal, see SendContinuation).

Framing. A command is lines and literals: a line ending in `{n}` (synchronising) or
`{n+}` (RFC 7888 non-synchronising) is followed by n octets and then more of the command.
For `{n}` the parser first returns SendContinuation: the caller writes
response.CONTINUE_LITERAL, or refuses the command with a tagged NO/BAD and calls
refuse_literal() (RFC 3501 §7.5). Before that, the parser has already checked the tag,
the command name, that the command takes strings at all, the octets of the line, and the
size; the rest of the grammar is checked when the command is complete (so a command that
is wrong after a literal costs the client the literal's octets, never more than the
limit).

Limits (set by the caller, changeable between events: SPEC §9 wants 64 KiB before login
and max_size after): `max_line_bytes` bounds the text of one command (all its lines,
literal octets excluded) and of a raw line; `max_literal_bytes` bounds the literal
octets of one command together. A synchronising literal over the limit is refused
without a continuation request (BAD [TOOBIG]; the client will not send it). A
non-synchronising one is already on its way: RFC 7888 leaves the server the choice of
reading and dropping it or closing; we close (ParseError.fatal), because a
{4294967295+} would otherwise have us read 4 GB. Nothing larger than the limits is ever
buffered: an over-long line is dropped as it arrives and answered when its end comes.

Pauses. After AUTHENTICATE, IDLE and STARTTLS commands and after every raw Line, the
parser stops (next_event returns Status.PAUSED) because the octets that follow are not
commands, or must not be read yet. The caller then calls:
  - expect_line(): the next event is a Line (a SASL response line, or IDLE's DONE);
  - discard_buffered(): STARTTLS; drop what the client sent before the handshake
    (SPEC §8, CVE-2021-33515 class);
  - resume(): parse commands again.

Fails closed: any octets give events; nothing in here raises on client input. After a
fatal ParseError the parser ignores all further input.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import datetime
import enum
import re
from typing import Callable, NoReturn, Union

from . import response as T

# SPEC §9: 64 KiB before login (the service raises max_literal_bytes to max_size after
# login); 64 KiB is also Dovecot's imap_max_line_length.
DEFAULT_MAX_LINE_BYTES = 64 * 1024
DEFAULT_MAX_LITERAL_BYTES = 64 * 1024
# RFC 3501 §9: number and nz-number are unsigned 32-bit.
MAX_NUMBER = 2**32 - 1
# SEARCH programs nest (parentheses, NOT, OR) and are parsed and evaluated recursively.
# RFC 3501 sets no bound; this one keeps far below Python's recursion limit and matches
# SPEC §9's bound on MIME nesting.
MAX_NESTING = 100
# Enough of an over-long line's end to see whether it announced a literal: "{n}" / "{n+}".
_TAIL_BYTES = 16


# --- events ------------------------------------------------------------------------------

class Status(enum.Enum):
    NEED_DATA = "need data"   # give the parser more octets
    PAUSED = "paused"         # call expect_line(), discard_buffered() or resume()


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A complete command. `name` is upper-case; for `UID FETCH ...` it is "FETCH" with
    uid=True. `args` is the command's argument object (None for commands without)."""
    tag: str
    name: str
    args: object = None
    uid: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class SendContinuation:
    """The command so far ends in an acceptable synchronising literal of `size` octets:
    write response.CONTINUE_LITERAL now, or refuse the command and call refuse_literal()."""
    tag: str
    command: str
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class ParseError:
    """Answer `tag BAD reason` (`* BAD reason` when tag is None: response.bad()).
    fatal: the input cannot be resynchronised (non-synchronising literal over the limit);
    send the BAD, then close the connection."""
    tag: str | None
    reason: str
    fatal: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """A raw line asked for with expect_line(), without its CRLF. too_long: the line was
    over max_line_bytes and was dropped (data is empty)."""
    data: bytes
    too_long: bool = False


Event = Union[Command, SendContinuation, ParseError, Line]


# --- argument types ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class SequenceSet:
    """RFC 3501 §9 sequence-set. Each range is (low, high) as written, None meaning "*"
    (the largest number in use); "2:4" and "4:2" are the same range."""
    ranges: tuple[tuple[int | None, int | None], ...]

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Ranges with "*" replaced by `largest` and low <= high."""
        out = []
        for lo, hi in self.ranges:
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            out.append((a, b) if a <= b else (b, a))
        return out

    def contains(self, n: int, largest: int) -> bool:
        return any(a <= n <= b for a, b in self.resolve(largest))

    def select(self, numbers, largest: int) -> list[int]:
        """The members of `numbers` (sorted ascending, e.g. a range or the UID list) that
        are in the set, in ascending order, without expanding ranges like 1:4294967295."""
        chosen: set[int] = set()
        for a, b in self.resolve(largest):
            lo = bisect.bisect_left(numbers, a)
            hi = bisect.bisect_right(numbers, b)
            chosen.update(numbers[lo:hi])
        return sorted(chosen)

    def exceeds(self, largest: int) -> bool:
        """True when an explicit number is above `largest` (RFC 3501 §9: message sequence
        numbers out of range are an error; UID sets may name UIDs that do not exist)."""
        return any(x is not None and x > largest for r in self.ranges for x in r)


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    """A BODY[section] specifier (RFC 3501 §6.4.5). part: (1, 2) for "1.2"; text:
    None, "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT" or "MIME"; fields: the
    header names of HEADER.FIELDS(.NOT), upper-cased as Dovecot echoes them."""
    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        pieces = [".".join(str(n) for n in self.part)] if self.part else []
        if self.text:
            pieces.append(self.text)
        spec = ".".join(pieces)
        if self.fields:
            spec += " (" + " ".join(self.fields) + ")"
        return spec


@dataclasses.dataclass(frozen=True, slots=True)
class FetchAtt:
    """One FETCH item. name: ENVELOPE FLAGS INTERNALDATE RFC822 RFC822.HEADER RFC822.SIZE
    RFC822.TEXT BODY BODYSTRUCTURE UID; BODY[...] and BODY.PEEK[...] have name "BODY" and
    a section; partial is (start, count) from <start.count>."""
    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False

    @property
    def sets_seen(self) -> bool:
        """RFC 3501 §6.4.5: BODY[...] (not .PEEK), RFC822 and RFC822.TEXT set \\Seen."""
        if self.section is not None:
            return not self.peek
        return self.name in ("RFC822", "RFC822.TEXT")

    @property
    def needs_content(self) -> bool:
        return self.name not in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE")


class StoreMode(enum.Enum):
    REPLACE = ""
    ADD = "+"
    REMOVE = "-"


@dataclasses.dataclass(frozen=True, slots=True)
class Authenticate:
    mechanism: str                      # upper-case
    initial_response: bytes | None      # RFC 4959 SASL-IR, base64-decoded; "=" is b""


@dataclasses.dataclass(frozen=True, slots=True)
class Login:
    user: bytes
    password: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class MailboxArg:
    """SELECT EXAMINE CREATE DELETE SUBSCRIBE UNSUBSCRIBE. INBOX in any case is "INBOX"."""
    mailbox: str


@dataclasses.dataclass(frozen=True, slots=True)
class Rename:
    old: str
    new: str


@dataclasses.dataclass(frozen=True, slots=True)
class ListArgs:
    """LIST and LSUB."""
    reference: str
    pattern: str


@dataclasses.dataclass(frozen=True, slots=True)
class StatusArgs:
    mailbox: str
    items: tuple[str, ...]              # MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN


@dataclasses.dataclass(frozen=True, slots=True)
class Append:
    mailbox: str
    flags: tuple[str, ...]
    date_time: datetime.datetime | None
    message: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    sequence_set: SequenceSet
    attributes: tuple[FetchAtt, ...]    # macros ALL FAST FULL are expanded


@dataclasses.dataclass(frozen=True, slots=True)
class Store:
    sequence_set: SequenceSet
    mode: StoreMode
    silent: bool
    flags: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Copy:
    sequence_set: SequenceSet
    mailbox: str


@dataclasses.dataclass(frozen=True, slots=True)
class UidExpunge:
    sequence_set: SequenceSet


@dataclasses.dataclass(frozen=True, slots=True)
class Enable:
    capabilities: tuple[str, ...]       # upper-case


# SEARCH keys (RFC 3501 §6.4.4). NEW, OLD and the UN- forms are expressed with these.

@dataclasses.dataclass(frozen=True, slots=True)
class SearchAll:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class SearchFlag:
    flag: str                           # "\\Seen" ... or a keyword
    present: bool


@dataclasses.dataclass(frozen=True, slots=True)
class SearchHeader:
    field: str                          # upper-case field name: FROM, SUBJECT, X-FOO
    value: bytes                        # in the program's charset


@dataclasses.dataclass(frozen=True, slots=True)
class SearchBody:
    value: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class SearchText:
    value: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class SearchDate:
    sent: bool                          # Date: header (SENT*) or internal date
    op: str                             # "before", "on", "since"
    date: datetime.date


@dataclasses.dataclass(frozen=True, slots=True)
class SearchSize:
    larger: bool
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class SearchSet:
    sequence_set: SequenceSet
    uid: bool


@dataclasses.dataclass(frozen=True, slots=True)
class SearchNot:
    key: "SearchKey"


@dataclasses.dataclass(frozen=True, slots=True)
class SearchOr:
    left: "SearchKey"
    right: "SearchKey"


@dataclasses.dataclass(frozen=True, slots=True)
class SearchAnd:
    keys: tuple["SearchKey", ...]


SearchKey = Union[SearchAll, SearchFlag, SearchHeader, SearchBody, SearchText, SearchDate,
                  SearchSize, SearchSet, SearchNot, SearchOr, SearchAnd]


@dataclasses.dataclass(frozen=True, slots=True)
class Search:
    charset: str | None                 # as given (upper-case); search.py checks it
    key: SearchAnd


# --- helpers for the caller ------------------------------------------------------------------

SASL_CANCEL = object()   # decode_sasl_line(): the client sent "*" (RFC 3501 §6.2.2)


def decode_sasl_line(line: bytes) -> bytes | object | None:
    """An AUTHENTICATE response line read with expect_line(): the decoded octets,
    SASL_CANCEL for "*", or None when it is not base64 (answer BAD)."""
    if line == b"*":
        return SASL_CANCEL
    return _base64(line)


def is_idle_done(line: bytes) -> bool:
    """RFC 2177 §3: IDLE ends with the line "DONE" (any case, as atoms are)."""
    return line.upper() == b"DONE"


def _base64(text: bytes) -> bytes | None:
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


class _SyntaxError(Exception):
    """Raised inside the grammar only; always turned into a ParseError."""


class _Reader:
    """A cursor over one complete command, as on the wire without its final line end."""
    __slots__ = ("data", "pos", "depth")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.depth = 0

    def fail(self, expected: str) -> NoReturn:
        raise _SyntaxError(expected)

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

    def nil_or_astring(self) -> bytes | None:
        start = self.pos
        value = self.astring()
        if value.upper() == b"NIL" and self.data[start:start + 1] not in (b'"', b"{"):
            return None
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
        initial = _base64(text) if text else None
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
class _Spec:
    parse: Callable[[_Reader], object]
    # Can a string (so a literal) appear in the arguments? If not, a literal is refused
    # before the client sends it.
    takes_strings: bool
    # The octets after this command are not commands (or must not be read yet).
    pause_after: bool = False


COMMANDS: dict[str, _Spec] = {
    "CAPABILITY": _Spec(_no_args, False),
    "NOOP": _Spec(_no_args, False),
    "LOGOUT": _Spec(_no_args, False),
    "STARTTLS": _Spec(_no_args, False, pause_after=True),
    "AUTHENTICATE": _Spec(_authenticate, False, pause_after=True),
    "LOGIN": _Spec(_login, True),
    "SELECT": _Spec(_mailbox_arg, True),
    "EXAMINE": _Spec(_mailbox_arg, True),
    "CREATE": _Spec(_mailbox_arg, True),
    "DELETE": _Spec(_mailbox_arg, True),
    "RENAME": _Spec(_rename, True),
    "SUBSCRIBE": _Spec(_mailbox_arg, True),
    "UNSUBSCRIBE": _Spec(_mailbox_arg, True),
    "LIST": _Spec(_list, True),
    "LSUB": _Spec(_list, True),
    "STATUS": _Spec(_status, True),
    "APPEND": _Spec(_append, True),
    "CHECK": _Spec(_no_args, False),
    "CLOSE": _Spec(_no_args, False),
    "EXPUNGE": _Spec(_no_args, False),
    "SEARCH": _Spec(_search, True),
    "FETCH": _Spec(_fetch, True),
    "STORE": _Spec(_store, False),
    "COPY": _Spec(_copy, True),
    "IDLE": _Spec(_no_args, False, pause_after=True),
    "NAMESPACE": _Spec(_no_args, False),
    "ENABLE": _Spec(_enable, False),
    "UNSELECT": _Spec(_no_args, False),
}
# RFC 3501 §6.4.8 and RFC 4315 §2.1 (UID EXPUNGE)
UID_COMMANDS: dict[str, _Spec] = {
    "FETCH": COMMANDS["FETCH"],
    "STORE": COMMANDS["STORE"],
    "SEARCH": COMMANDS["SEARCH"],
    "COPY": COMMANDS["COPY"],
    "EXPUNGE": _Spec(_uid_expunge, False),
}


def _tag_and_command(text: bytes) -> tuple[str | None, str | None, bool, _Spec | None, str | None]:
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


def parse_command(data: bytes) -> Command | ParseError:
    """Parse one complete command as on the wire, without its final line end (literals
    inline after their "{n}" line). The framer calls this; tests may too."""
    tag, name, uid, spec, error = _tag_and_command(data)
    if error is not None:
        return ParseError(tag, error)
    r = _Reader(data)
    r.run(_TAG_CHARS)
    r.sp()
    r.run(ATOM_CHARS)
    if uid:
        r.sp()
        r.run(ATOM_CHARS)
    try:
        args = spec.parse(r)
        r.end()
    except _SyntaxError as e:
        return ParseError(tag, f"{T.BAD_ARGUMENTS}: {e}")
    return Command(tag, name, args, uid)


# --- the framer ----------------------------------------------------------------------------------

class _Mode(enum.Enum):
    LINE = "line"           # reading command text
    LITERAL = "literal"     # reading literal octets
    RAW_LINE = "raw line"   # expect_line() was called
    PAUSED = "paused"
    DEAD = "dead"           # after a fatal error: input is ignored


def _literal_marker(body: bytes) -> tuple[int, bool] | None:
    """(size, non-synchronising) when a line (without its line end) ends in {n} or {n+}.
    A size too large for any limit comes back as MAX_NUMBER + 1."""
    if not body.endswith(b"}"):
        return None
    head = body[:-1]
    nonsync = head.endswith(b"+")
    if nonsync:
        head = head[:-1]
    stripped = head.rstrip(b"0123456789")
    digits = head[len(stripped):]
    if not digits or not stripped.endswith(b"{"):
        return None
    size = int(digits) if len(digits) <= 10 else MAX_NUMBER + 1
    return size, nonsync


def _line_body(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def _line_fault(body: bytes) -> str | None:
    if b"\0" in body:
        return T.NUL_IN_COMMAND
    if b"\r" in body:
        return T.BARE_CR
    if not body.isascii():
        return T.EIGHT_BIT_OUTSIDE_LITERAL
    return None


class CommandParser:
    """One connection's command parser. Not thread-safe."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 max_literal_bytes: int = DEFAULT_MAX_LITERAL_BYTES):
        self.max_line_bytes = max_line_bytes
        self.max_literal_bytes = max_literal_bytes
        self._buf = bytearray()
        self._pos = 0               # first unread octet of _buf
        self._scan = 0              # where the search for the line end resumes
        self._mode = _Mode.LINE
        self._discarding = False    # inside a line over the limit
        self._tail = b""            # the last octets of that line
        self._start_command()

    # --- public interface -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._mode is _Mode.DEAD:
            return
        if self._pos:
            del self._buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | Status:
        while True:
            mode = self._mode
            if mode is _Mode.PAUSED:
                return Status.PAUSED
            if mode is _Mode.DEAD:
                return Status.NEED_DATA
            if mode is _Mode.LITERAL:
                if not self._read_literal():
                    return Status.NEED_DATA
                continue
            limit = self.max_line_bytes - (self._text_bytes if mode is _Mode.LINE else 0)
            line = self._take_line(limit, command=mode is _Mode.LINE)
            if line is None:
                return Status.NEED_DATA
            event = self._raw_line(line) if mode is _Mode.RAW_LINE else self._command_line(line)
            if event is not None:
                return event

    def feed(self, data: bytes) -> list[Event]:
        """receive_data() and every event up to NEED_DATA or PAUSED. Synchronising
        literals are accepted: write response.CONTINUE_LITERAL for each SendContinuation."""
        self.receive_data(data)
        events = []
        while True:
            event = self.next_event()
            if isinstance(event, Status):
                return events
            events.append(event)

    @property
    def paused(self) -> bool:
        return self._mode is _Mode.PAUSED

    @property
    def held_bytes(self) -> int:
        """Octets the parser holds: unread input plus the command so far. Never more than
        max_line_bytes + max_literal_bytes plus what the last receive_data() brought."""
        return (len(self._buf) - self._pos + sum(map(len, self._pieces))
                + (len(self._literal) if self._literal is not None else 0))

    @property
    def buffered_bytes(self) -> int:
        """Octets received and not yet parsed (e.g. sent after STARTTLS)."""
        return len(self._buf) - self._pos

    def expect_line(self) -> None:
        """The next event is a Line: the raw next line (a SASL response, IDLE's DONE)."""
        if self._mode not in (_Mode.PAUSED, _Mode.LINE) or self._pieces:
            raise RuntimeError("expect_line() in the middle of a command")
        self._mode = _Mode.RAW_LINE

    def resume(self) -> None:
        if self._mode is _Mode.PAUSED:
            self._mode = _Mode.LINE

    def discard_buffered(self) -> int:
        """Drop the octets not parsed yet; returns how many (STARTTLS, SPEC §8)."""
        dropped = len(self._buf) - self._pos
        self._buf.clear()
        self._pos = self._scan = 0
        self._discarding = False
        return dropped

    def refuse_literal(self) -> None:
        """After SendContinuation, instead of writing the continuation: the caller has
        answered the command (NO/BAD) and the client will not send the literal."""
        if self._mode is not _Mode.LITERAL or not self._awaiting_continuation:
            raise RuntimeError("refuse_literal() without a pending SendContinuation")
        self._mode = _Mode.LINE
        self._start_command()

    # --- lines -------------------------------------------------------------------------------

    def _take_line(self, limit: int, command: bool) -> "bytes | _TooLong | None":
        """The next line with its line end; None when it is not complete yet; _TooLong
        (holding the line's last octets) when it is over `limit`. Octets past the limit
        are dropped as they arrive."""
        buf = self._buf
        end = buf.find(b"\n", max(self._scan, self._pos))
        if end < 0:
            if len(buf) - self._pos > limit or self._discarding:
                if command and not self._discarding:
                    self._note_tag(bytes(buf[self._pos:self._pos + limit]))
                self._tail = (self._tail + bytes(buf[max(self._pos, len(buf) - _TAIL_BYTES):])
                              )[-_TAIL_BYTES:]
                self._discarding = True
                del buf[self._pos:]
            self._scan = len(buf)
            return None
        line = bytes(buf[self._pos:end + 1])
        self._pos = self._scan = end + 1
        if self._discarding or len(line) > limit:
            if command and not self._discarding:
                self._note_tag(line[:limit])
            tail = (self._tail + line)[-_TAIL_BYTES:]
            self._discarding = False
            self._tail = b""
            return _TooLong(tail)
        return line

    def _note_tag(self, start: bytes) -> None:
        """Keep the tag of a first line that is too long, for its BAD."""
        if not self._pieces:
            tag = _tag_and_command(start)[0]
            # Only a tag followed by its space: a line of 64 KiB without one has none.
            if tag is not None and start[len(tag):len(tag) + 1] == b" ":
                self._tag = tag

    def _raw_line(self, line: bytes) -> Line:
        self._mode = _Mode.PAUSED
        if isinstance(line, _TooLong):
            return Line(b"", too_long=True)
        return Line(_line_body(line))

    def _command_line(self, line: bytes) -> Event | None:
        if isinstance(line, _TooLong):
            return self._too_long(_line_body(line.tail))
        first = not self._pieces
        body = _line_body(line)
        self._text_bytes += len(line)
        if first and not body:
            return self._finish(ParseError(None, T.EMPTY_LINE))
        fault = _line_fault(body)
        if first:
            self._tag, self._name, self._uid, self._spec, error = _tag_and_command(body)
            fault = fault or error
        self._failure = self._failure or fault
        marker = _literal_marker(body)
        if marker is None:
            return self._complete(body)
        self._pieces.append(line)
        return self._literal_announced(*marker)

    def _too_long(self, tail: bytes) -> Event:
        if tail.endswith(b"+}"):        # maybe {n+}: its octets are coming, cannot resync
            return self._die(ParseError(self._tag, T.LINE_TOO_LONG, fatal=True))
        # {n}: the client waits for "+"; it gets this BAD instead and drops the command.
        return self._finish(ParseError(self._tag, T.LINE_TOO_LONG))

    def _complete(self, body: bytes) -> Event:
        if self._failure:
            return self._finish(ParseError(self._tag, self._failure))
        self._pieces.append(body)
        event = parse_command(b"".join(self._pieces))
        self._finish(None)
        if isinstance(event, Command) and self._spec_pauses(event):
            self._mode = _Mode.PAUSED
        return event

    def _spec_pauses(self, command: Command) -> bool:
        table = UID_COMMANDS if command.uid else COMMANDS
        return table[command.name].pause_after

    def _literal_announced(self, size: int, nonsync: bool) -> Event | None:
        refusal = self._failure
        if refusal is None and not self._spec.takes_strings:
            refusal = T.LITERAL_NOT_ALLOWED
        if size > self.max_literal_bytes - self._literal_bytes:
            if nonsync:
                return self._die(ParseError(self._tag, T.LITERAL_TOO_BIG, fatal=True))
            return self._finish(ParseError(self._tag, T.LITERAL_TOO_BIG))
        if refusal is not None and not nonsync:
            return self._finish(ParseError(self._tag, refusal))
        # Read the octets: kept for the command, or only skipped when it has failed
        # (a non-synchronising literal of a refused command is on its way anyway).
        self._failure = refusal
        self._literal_bytes += size
        self._literal_left = size
        self._literal = bytearray() if refusal is None else None
        self._mode = _Mode.LITERAL
        self._awaiting_continuation = not nonsync
        if nonsync:
            return None
        return SendContinuation(self._tag, self._name, size)

    def _read_literal(self) -> bool:
        """Take literal octets; False when more are needed."""
        self._awaiting_continuation = False
        if self._literal_left:
            available = len(self._buf) - self._pos
            if not available:
                return False
            take = min(available, self._literal_left)
            chunk = self._buf[self._pos:self._pos + take]
            self._pos += take
            self._scan = self._pos
            self._literal_left -= take
            if self._literal is not None:
                if b"\0" in chunk:          # CVE-2019-11500 class: refuse, keep reading
                    self._failure = T.NUL_IN_COMMAND
                    self._literal = None
                else:
                    self._literal += chunk
            if self._literal_left:
                return False
        self._pieces.append(bytes(self._literal) if self._literal is not None else b"")
        self._literal = None
        self._mode = _Mode.LINE
        return True

    def _finish(self, event: Event | None) -> Event | None:
        self._mode = _Mode.LINE
        self._start_command()
        return event

    def _die(self, event: ParseError) -> ParseError:
        """A fatal error: forget everything and ignore all further input."""
        self.discard_buffered()
        self._start_command()
        self._mode = _Mode.DEAD
        return event

    def _start_command(self) -> None:
        self._pieces: list[bytes] = []
        self._text_bytes = 0
        self._literal_bytes = 0
        self._tag: str | None = None
        self._name: str | None = None
        self._uid = False
        self._spec: _Spec | None = None
        self._failure: str | None = None
        self._literal_left = 0
        self._literal: bytearray | None = None
        self._awaiting_continuation = False


@dataclasses.dataclass(frozen=True, slots=True)
class _TooLong:
    tail: bytes
