"""SEARCH evaluation (RFC 3501 §6.4.4): a parsed program applied to a mailbox's messages.

Owns: what each search key means for one message, charset handling, evaluation order.
Must not: read the store itself. The caller hands a MailItem per message (sequence
number, UID, flags, internal date, size, and `load` for the content); keys on flags,
numbers, sizes and internal dates never call `load`, and AND evaluates its cheap keys
first so that content is read only for messages still in the running.

Semantics:
- Text keys (headers, BODY, TEXT) match a case-insensitive substring (Unicode case
  folding) of the decoded text: RFC 2047 words in headers, transfer encoding and charset
  in text/* parts. HEADER with an empty string matches every message with that field.
  Charsets: none (taken as UTF-8, which US-ASCII is a subset of), US-ASCII, UTF-8;
  anything else raises BadCharset, which the caller answers with
  `NO [BADCHARSET (US-ASCII UTF-8)]` (RFC 3501 §6.4.4).
- BEFORE/ON/SINCE compare the internal date's day as INTERNALDATE shows it,
  SENTBEFORE/SENTON/SENTSINCE the Date: field's day as written; times and timezones are
  ignored (RFC 3501 §6.4.4). A message without a readable Date: matches no SENT* key.
- "*" in a sequence set is the largest sequence number, in a UID set the largest UID
  (RFC 3501 §6.4.8: a UID range n:* always includes the last message).
- Keywords and flags compare case-insensitively.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

from . import commands as C
from . import response as R
from .message import MailItem, Message, sent_date


class BadCharset(Exception):
    """The program names a charset we cannot decode: answer NO with `code`."""

    def __init__(self, charset: str):
        super().__init__(charset)
        self.charset = charset
        self.code = f"{R.BADCHARSET} ({' '.join(R.SEARCH_CHARSETS)})"


@dataclasses.dataclass(slots=True)
class _Context:
    max_seq: int
    max_uid: int
    item: MailItem | None = None
    message: Message | None = None

    def load(self, item: MailItem) -> Message:
        if self.item is not item:
            self.item, self.message = item, item.load()
        return self.message


Matcher = Callable[[MailItem, _Context], bool]


def search(program: C.Search, items: Sequence[MailItem]) -> list[MailItem]:
    """The items that match, in the order given. `items` must be the whole mailbox (in
    sequence order): "*" is its largest sequence number and UID. Raises BadCharset."""
    return [item for item, matched in evaluate(program, items) if matched]


def evaluate(program: C.Search, items: Sequence[MailItem]) -> Iterator[tuple[MailItem, bool]]:
    """search() one message at a time: (item, whether it matches), in order, so that
    the caller can pause between messages. BadCharset is raised before the first."""
    match = compile_program(program)
    if not items:
        return iter(())
    ctx = _Context(max_seq=max(i.seq for i in items), max_uid=max(i.uid for i in items))
    return ((item, match(item, ctx)) for item in items)


def compile_program(program: C.Search) -> Matcher:
    charset = _codec(program.charset)
    return _compile(program.key, charset)


def _codec(charset: str | None) -> str:
    if charset is None or charset.upper() in R.SEARCH_CHARSETS:
        return "utf-8"
    raise BadCharset(charset)


def _needle(value: bytes, codec: str) -> str:
    return value.decode(codec, "replace").casefold()


# --- compiling keys to closures (table-driven by key type) -----------------------------

def _compile(key: C.SearchKey, codec: str) -> Matcher:
    return _COMPILERS[type(key)](key, codec)


def _all(key: C.SearchAll, codec: str) -> Matcher:
    return lambda item, ctx: True


def _flag(key: C.SearchFlag, codec: str) -> Matcher:
    wanted = key.flag.lower()
    present = key.present
    return lambda item, ctx: any(f.lower() == wanted for f in item.flags) == present


def _size(key: C.SearchSize, codec: str) -> Matcher:
    n = key.size
    if key.larger:
        return lambda item, ctx: item.size > n
    return lambda item, ctx: item.size < n


def _set(key: C.SearchSet, codec: str) -> Matcher:
    seqs = key.sequence_set
    if key.uid:
        return lambda item, ctx: seqs.contains(item.uid, ctx.max_uid)
    return lambda item, ctx: seqs.contains(item.seq, ctx.max_seq)


_DATE_OPS = {
    "before": lambda day, d: day < d,
    "on": lambda day, d: day == d,
    "since": lambda day, d: day >= d,
}


def _date(key: C.SearchDate, codec: str) -> Matcher:
    op, d = _DATE_OPS[key.op], key.date
    if key.sent:
        def sent(item: MailItem, ctx: _Context) -> bool:
            day = sent_date(ctx.load(item))
            return day is not None and op(day, d)
        return sent
    return lambda item, ctx: op(item.internaldate.date(), d)


def _header(key: C.SearchHeader, codec: str) -> Matcher:
    name = key.field.lower().encode("ascii")
    needle = _needle(key.value, codec)

    def match(item: MailItem, ctx: _Context) -> bool:
        return any(n.lower() == name and needle in v.casefold()
                   for n, v in ctx.load(item).decoded_headers())
    return match


def _body(key: C.SearchBody, codec: str) -> Matcher:
    needle = _needle(key.value, codec)
    return lambda item, ctx: _in_body(needle, ctx.load(item))


def _text(key: C.SearchText, codec: str) -> Matcher:
    needle = _needle(key.value, codec)

    def match(item: MailItem, ctx: _Context) -> bool:
        msg = ctx.load(item)
        return (any(needle in f"{n.decode('latin-1')}: {v}".casefold()
                    for n, v in msg.decoded_headers())
                or _in_body(needle, msg))
    return match


def _in_body(needle: str, msg: Message) -> bool:
    return any(needle in text.casefold() for text in msg.text_parts())


def _not(key: C.SearchNot, codec: str) -> Matcher:
    inner = _compile(key.key, codec)
    return lambda item, ctx: not inner(item, ctx)


def _or(key: C.SearchOr, codec: str) -> Matcher:
    left, right = _ordered([key.left, key.right])
    a, b = _compile(left, codec), _compile(right, codec)
    return lambda item, ctx: a(item, ctx) or b(item, ctx)


def _and(key: C.SearchAnd, codec: str) -> Matcher:
    matchers = [_compile(k, codec) for k in _ordered(list(key.keys))]
    return lambda item, ctx: all(m(item, ctx) for m in matchers)


_COMPILERS: dict[type, Callable[..., Matcher]] = {
    C.SearchAll: _all, C.SearchFlag: _flag, C.SearchSize: _size, C.SearchSet: _set,
    C.SearchDate: _date, C.SearchHeader: _header, C.SearchBody: _body,
    C.SearchText: _text, C.SearchNot: _not, C.SearchOr: _or, C.SearchAnd: _and,
}


# --- evaluation order: cheap keys first ------------------------------------------------

def _cost(key: C.SearchKey) -> int:
    """0: no content; 1: headers; 2: the body."""
    if isinstance(key, (C.SearchBody, C.SearchText)):
        return 2
    if isinstance(key, C.SearchHeader) or (isinstance(key, C.SearchDate) and key.sent):
        return 1
    if isinstance(key, C.SearchNot):
        return _cost(key.key)
    if isinstance(key, C.SearchOr):
        return max(_cost(key.left), _cost(key.right))
    if isinstance(key, C.SearchAnd):
        return max((_cost(k) for k in key.keys), default=0)
    return 0


def _ordered(keys: list[C.SearchKey]) -> list[C.SearchKey]:
    return sorted(keys, key=_cost)


def needs_content(program: C.Search) -> bool:
    """Whether evaluating the program may load messages."""
    return _cost(program.key) > 0


def content_cost(program: C.Search) -> int:
    """How much of each message evaluating the program may read: 0 nothing, 1 the
    header, 2 the body too (so a caller can hand out header-only messages for 1)."""
    return _cost(program.key)
