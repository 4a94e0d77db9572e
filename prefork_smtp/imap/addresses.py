"""RFC 5322 address lists as IMAP ENVELOPE wants them (RFC 3501 §7.4.2), from raw octets.

Owns: splitting a From/To/Cc/... header value into (name, adl, mailbox, host) tuples,
with group syntax as RFC 3501 encodes it: (NIL NIL "group" NIL) ... (NIL NIL NIL NIL).
Must not: decode RFC 2047 words (ENVELOPE carries them as received) or fail: any octets
give a list, possibly with placeholders.

Lenient the way Dovecot is, whose placeholders we use so that clients see the same thing
from both servers: a missing local part is MISSING_MAILBOX, a missing domain
MISSING_DOMAIN, an address whose syntax breaks off SYNTAX_ERROR (as host). A display
name is the phrase with quoted strings unquoted and words joined by one space; without
one, a comment after the address serves as the name (`a@b (Alice)`). Empty list members
(`a, , b`) are skipped (RFC 5322 §4.4 obs-addr-list).
"""

from __future__ import annotations

import dataclasses

MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"
SYNTAX_ERROR = b"SYNTAX_ERROR"

# RFC 5322 §3.2.3 specials; everything else printable is an atom character (8-bit too:
# RFC 6532 allows UTF-8 in atoms).
_SPECIALS = frozenset(b'()<>[]:;@\\,."')
_WSP = frozenset(b" \t\r\n")


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    name: bytes | None
    adl: bytes | None
    mailbox: bytes | None
    host: bytes | None


GROUP_END = Address(None, None, None, None)


# Tokens: (kind, value). kind is "atom", "quoted", "comment", "literal" (domain literal,
# with its brackets) or the special character itself as a one-octet bytes value.
def _tokens(data: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c in _WSP:
            i += 1
        elif c == 0x22:                                   # quoted-string
            value, i = _delimited(data, i + 1, 0x22)
            out.append(("quoted", value))
        elif c == 0x28:                                   # comment (nested)
            value, i = _comment(data, i + 1)
            out.append(("comment", value))
        elif c == 0x5B:                                   # domain-literal
            end = data.find(b"]", i + 1)
            end = n if end < 0 else end + 1
            out.append(("literal", data[i:end]))
            i = end
        elif c in _SPECIALS:
            out.append((chr(c), data[i:i + 1]))
            i += 1
        else:
            start = i
            while i < n and data[i] not in _SPECIALS and data[i] not in _WSP:
                i += 1
            out.append(("atom", data[start:i]))
    return out


def _delimited(data: bytes, i: int, close: int) -> tuple[bytes, int]:
    out = bytearray()
    n = len(data)
    while i < n and data[i] != close:
        if data[i] == 0x5C and i + 1 < n:                 # quoted-pair
            i += 1
        if data[i] not in (0x0D, 0x0A):                   # unfold
            out.append(data[i])
        i += 1
    return bytes(out), i + 1


def _comment(data: bytes, i: int) -> tuple[bytes, int]:
    out = bytearray()
    depth, n = 1, len(data)
    while i < n:
        c = data[i]
        if c == 0x5C and i + 1 < n:
            out.append(data[i + 1])
            i += 2
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return bytes(out).strip(), i + 1
        if c not in (0x0D, 0x0A):
            out.append(c)
        i += 1
    return bytes(out).strip(), i


class _Cursor:
    __slots__ = ("tokens", "i", "comments")

    def __init__(self, tokens: list[tuple[str, bytes]]):
        self.tokens: list[tuple[str, bytes]] = []
        # comments[j]: the first comment that came right before token j (or at the end).
        self.comments: dict[int, bytes] = {}
        for kind, value in tokens:
            if kind == "comment":
                self.comments.setdefault(len(self.tokens), value)
            else:
                self.tokens.append((kind, value))
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, bytes]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def skip_to_comma(self) -> None:
        while self.i < len(self.tokens) and self.tokens[self.i][0] not in (",", ";"):
            self.i += 1


def parse_address_list(value: bytes) -> tuple[Address, ...]:
    """Every address of a header value, groups flattened as RFC 3501 §7.4.2 wants."""
    return tuple(_members(_Cursor(_tokens(value)), in_group=False))


def _members(cur: _Cursor, in_group: bool) -> list[Address]:
    stop = (None, ";") if in_group else (None,)
    out: list[Address] = []
    while cur.peek() not in stop:
        if cur.peek() == ",":
            cur.take()
            continue
        start = cur.i
        found = _address(cur, in_group)
        if cur.i == start:              # a stray special (";" ">" ...): drop it
            cur.take()
            continue
        out.extend(found)
    return out


def _address(cur: _Cursor, in_group: bool) -> list[Address]:
    start = cur.i
    phrase = _phrase(cur)
    kind = cur.peek()
    if kind == ":" and not in_group and phrase:          # group
        cur.take()
        members = _members(cur, in_group=True)
        if cur.peek() == ";":
            cur.take()
        return [Address(None, None, _join(phrase), None), *members, GROUP_END]
    if kind == "<":                                       # name-addr
        cur.take()
        return [_angle_addr(cur, _join(phrase) or None)]
    cur.i = start
    return [_addr_spec(cur)]


def _phrase(cur: _Cursor) -> list[bytes]:
    words = []
    while cur.peek() in ("atom", "quoted", "."):
        words.append(cur.take()[1])
    return words


def _join(words: list[bytes]) -> bytes:
    # obs-phrase allows "."; keep it attached like Dovecot ("Alice A.").
    out = b""
    for w in words:
        out += w if (w == b"." or not out) else b" " + w
    return out


def _angle_addr(cur: _Cursor, name: bytes | None) -> Address:
    adl = None
    if cur.peek() == "@":                                 # obs-route: @a,@b:
        route = []
        while cur.peek() in ("@", ",", "atom", ".", "literal"):
            route.append(cur.take()[1])
        if cur.peek() == ":":
            cur.take()
            adl = b"".join(route)
    local, host, ok = _local_and_domain(cur)
    if cur.peek() == ">":
        cur.take()
    else:
        ok = False
    cur.skip_to_comma()
    return Address(name, adl, local or MISSING_MAILBOX, _host(host, ok))


def _addr_spec(cur: _Cursor) -> Address:
    start = cur.i
    local, host, ok = _local_and_domain(cur)
    if cur.peek() in (None, ",", ";"):
        # Without a display name, a comment after the address names it.
        return Address(cur.comments.get(cur.i) or None, None, local or MISSING_MAILBOX,
                       _host(host, ok))
    # Words that are no address ("bad entry"): Dovecot makes them the name.
    cur.i = start
    name = _join(_phrase(cur)) or None
    ok = cur.peek() in (None, ",", ";")
    cur.skip_to_comma()
    return Address(name, None, MISSING_MAILBOX, _host(None, ok))


def _host(host: bytes | None, ok: bool) -> bytes:
    if not ok:
        return SYNTAX_ERROR
    return host or MISSING_DOMAIN


def _local_and_domain(cur: _Cursor) -> tuple[bytes | None, bytes | None, bool]:
    """local-part ["@" domain]; ok is False when the syntax breaks off."""
    local = _dotted(cur, ("atom", "quoted"))
    if cur.peek() != "@":
        return local, None, True
    cur.take()
    if cur.peek() == "literal":
        return local, cur.take()[1], True
    return local, _dotted(cur, ("atom",)), True


def _dotted(cur: _Cursor, kinds: tuple[str, ...]) -> bytes | None:
    """word *("." word), a lone trailing dot tolerated (obs-local-part)."""
    if cur.peek() not in kinds:
        return None
    parts = [cur.take()[1]]
    while cur.peek() == ".":
        parts.append(cur.take()[1])
        if cur.peek() in kinds:
            parts.append(cur.take()[1])
    return b"".join(parts)
