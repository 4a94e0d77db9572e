"""FETCH responses (RFC 3501 §6.4.5, §7.4.2): one message's items rendered from the parsed
FETCH attributes, the message model and response formatting.

Owns: which octets and values each FETCH item sends and under which name.
Must not: change flags. Fetching BODY[...] (not .PEEK), RFC822 or RFC822.TEXT sets
\\Seen in a read-write mailbox (RFC 3501 §6.4.5): the state machine does that first
(sets_seen()), then passes the new flags and adds FLAGS to the items if they changed
(with_flags()), as Dovecot does.
Loads the message only when an item needs its content (FLAGS, UID, INTERNALDATE and
RFC822.SIZE never do).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from . import response as R
from .commands import FetchAtt
from .message import MailItem, Message

# The order flags are listed in: RFC 3501 §2.3.2's system flags, then keywords.
_FLAG_ORDER = {f: i for i, f in enumerate(
    ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent"))}


def sorted_flags(flags: Iterable[str]) -> list[str]:
    return sorted(flags, key=lambda f: (_FLAG_ORDER.get(f, len(_FLAG_ORDER)), f))


def with_uid(atts: Sequence[FetchAtt]) -> tuple[FetchAtt, ...]:
    """UID FETCH: RFC 3501 §6.4.8 says the response always carries UID."""
    if any(a.name == "UID" for a in atts):
        return tuple(atts)
    return (*atts, FetchAtt("UID"))


def with_flags(atts: Sequence[FetchAtt]) -> tuple[FetchAtt, ...]:
    """Add FLAGS when fetching set \\Seen and FLAGS was not asked for."""
    if any(a.name == "FLAGS" for a in atts):
        return tuple(atts)
    return (*atts, FetchAtt("FLAGS"))


def sets_seen(atts: Sequence[FetchAtt]) -> bool:
    return any(a.sets_seen for a in atts)


def needs_content(atts: Sequence[FetchAtt]) -> bool:
    return any(a.needs_content for a in atts)


def item_name(att: FetchAtt) -> bytes:
    """The name an item has in the response: BODY.PEEK[...] answers as BODY[...], and a
    partial shows only its origin (RFC 3501 §7.4.2: BODY[]<0>)."""
    if att.section is None:
        return att.name.encode("ascii")
    name = b"BODY[" + str(att.section).encode("ascii") + b"]"
    if att.partial is not None:
        name += b"<%d>" % att.partial[0]
    return name


def fetch_items(atts: Sequence[FetchAtt], item: MailItem) -> list[tuple[bytes, bytes]]:
    """(name, encoded value) for each attribute, in the order asked."""
    message: list[Message] = []

    def msg() -> Message:
        if not message:
            message.append(item.load())
        return message[0]

    return [(item_name(att), _value(att, item, msg)) for att in atts]


def fetch_response(seq: int, atts: Sequence[FetchAtt], item: MailItem) -> bytes:
    """`* seq FETCH (...)` for one message."""
    return R.fetch_response(seq, fetch_items(atts, item))


def _value(att: FetchAtt, item: MailItem, msg) -> bytes:
    if att.section is not None:
        s = att.section
        return R.literal(msg().section(s.part, s.text, s.fields, att.partial))
    return _SIMPLE[att.name](item, msg)


_SIMPLE = {
    "FLAGS": lambda item, msg: R.flag_list(sorted_flags(item.flags)),
    "UID": lambda item, msg: R.number(item.uid),
    "INTERNALDATE": lambda item, msg: R.internaldate(item.internaldate),
    "RFC822.SIZE": lambda item, msg: R.number(item.size),
    "ENVELOPE": lambda item, msg: R.envelope(msg().envelope()),
    "BODY": lambda item, msg: R.body(msg().body_structure(), extensible=False),
    "BODYSTRUCTURE": lambda item, msg: R.body(msg().body_structure(), extensible=True),
    "RFC822": lambda item, msg: R.literal(msg().data),
    "RFC822.HEADER": lambda item, msg: R.literal(msg().section((), "HEADER")),
    "RFC822.TEXT": lambda item, msg: R.literal(msg().section((), "TEXT")),
}
