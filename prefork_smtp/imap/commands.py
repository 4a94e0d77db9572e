"""The arguments of IMAP commands, as values: what a parsed Command carries in `args`.

Owns: one frozen dataclass per command's arguments (RFC 3501 §6 with RFC 4959 SASL-IR,
RFC 5161 ENABLE, RFC 4315 UID EXPUNGE), the SEARCH key tree (RFC 3501 §6.4.4), and what
a sequence set, a section and a fetch item mean (resolving "*", choosing numbers from a
sorted list, which items set \\Seen).
Must not: read octets (grammar.py builds these values from a command), know framing,
states, the mail store or the wire format of responses.
Fails: never on its own; the values are built by the grammar (or by tests) and trusted.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import enum
from typing import Union

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

