"""The IMAP message model: MIME structure, ENVELOPE, BODY/BODYSTRUCTURE and BODY[section]
over the stored octets of one message (RFC 3501 §6.4.5, §7.4.2; RFC 2045, 2046, 2231).

Owns: finding every part's header and body in the message octets (one forward pass, its
cost linear in the message size), the header fields of a part, the values RFC 3501 builds
from them, section extraction that is byte-exact against the stored octets, and decoded
text for SEARCH.
Must not: read files or know about mailboxes: the store hands over the visible message
octets (CRLF line ends, none of another program's state headers).

Bounded (SPEC §9, the CVE-2020-12100 class): a part more than MAX_MIME_DEPTH levels down
is never opened (a multipart or message/rfc822 there is shown as an opaque
application/octet-stream), and after MAX_MIME_PARTS parts the last one holds the rest of
the message. Boundaries are found with bytes.find and a regular expression, and each
line that starts with "--" is compared with at most MAX_MIME_DEPTH active boundaries.

Where RFC 3501 is silent we do what Dovecot does (and tests compare with it): BODY[n] of
a part that does not exist is empty, a non-multipart part's part 1 is its body, the
CRLF before a boundary belongs to the boundary (RFC 2046 §5.1.1) even when it is the
blank line after a part's header, but not when it ends a boundary line, boundaries match as prefixes of a line (RFC 2046
§5.1.1) with the longest active one winning, types keep the case they were written in,
a text part without a charset gets ("charset" "us-ascii") appended, and a multipart
without parts shows one empty text/plain part (RFC 3501 §9 needs at least one).
Deliberately unlike Dovecot: an invalid Content-Type means text/plain (RFC 2045 §5.2),
ENVELOPE strings are unfolded as RFC 5322 §2.2.3 says (only the CRLFs go), and the first
of repeated Subject/Date/... fields counts.
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime
import email.errors
import email.header
import email.utils
import enum
import functools
import quopri
import re
from typing import Callable, Iterator

from .addresses import Address, parse_address_list

# The same From:/To: values come back message after message (a correspondent, the
# user's own address): parse each once. Values are immutable tuples of frozen Addresses.
_address_list = functools.lru_cache(maxsize=4096)(parse_address_list)

# SPEC §9 ("parts nested deeper than 100 levels are shown as opaque"); also Dovecot's
# MESSAGE_PARSER_DEFAULT_MAX_NESTED_MIME_PARTS. The top-level message is level 1.
MAX_MIME_DEPTH = 100
# Dovecot's MESSAGE_PARSER_DEFAULT_MAX_TOTAL_MIME_PARTS (its fix for CVE-2020-12100):
# parts counted with the top-level one; the last holds the rest of the message.
MAX_MIME_PARTS = 10_000
# How much of a Content-Type/-Disposition/-Language value is interpreted (they are read
# octet by octet). RFC 2045 and RFC 2231 set no limit; real ones are well under 1 KiB,
# and a folded field can be as long as the message.
MAX_MIME_FIELD_BYTES = 64 * 1024



class Kind(enum.Enum):
    LEAF = "leaf"
    MULTIPART = "multipart"
    MESSAGE = "message/rfc822"
    OPAQUE = "opaque"            # a multipart or message/rfc822 that was not opened


@dataclasses.dataclass(frozen=True, slots=True)
class ContentType:
    type: bytes                  # as written ("TEXT", "text"), or the default's
    subtype: bytes
    params: tuple[tuple[bytes, bytes], ...]   # RFC 2231 continuations joined

    @property
    def mime(self) -> str:
        return (self.type + b"/" + self.subtype).decode("ascii", "replace").lower()

    def param(self, name: str) -> bytes | None:
        key = name.encode("ascii").lower()
        for attr, value in self.params:
            if attr.lower() == key:
                return value
        return None


TEXT_PLAIN = ContentType(b"text", b"plain", ((b"charset", b"us-ascii"),))
MESSAGE_RFC822 = ContentType(b"message", b"rfc822", ())


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """One MIME entity: the header is data[start:body_start] (with its blank line when
    there is one), the body data[body_start:end]. For a multipart, children are its
    parts; for message/rfc822, the one encapsulated message."""
    start: int
    body_start: int
    end: int
    lines: int                   # LF octets in the body
    kind: Kind
    content_type: ContentType
    children: tuple["Part", ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class HeaderField:
    name: bytes                  # as written, without trailing whitespace
    start: int                   # the field's octets, continuation lines and line end
    end: int                     # included: data[start:end]
    value_start: int             # first octet after the colon (== end without a colon)


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    date: bytes | None
    subject: bytes | None
    from_: tuple[Address, ...] | None
    sender: tuple[Address, ...] | None
    reply_to: tuple[Address, ...] | None
    to: tuple[Address, ...] | None
    cc: tuple[Address, ...] | None
    bcc: tuple[Address, ...] | None
    in_reply_to: bytes | None
    message_id: bytes | None


@dataclasses.dataclass(frozen=True, slots=True)
class SinglePart:
    """body-type-1part of RFC 3501 §9. lines is set for text/* and message/rfc822;
    envelope and body for message/rfc822. md5 ... location are the extension data."""
    type: bytes
    subtype: bytes
    params: tuple[tuple[bytes, bytes], ...]
    id: bytes | None
    description: bytes | None
    encoding: bytes
    size: int
    lines: int | None = None
    envelope: Envelope | None = None
    body: "SinglePart | MultiPart | None" = None
    md5: bytes | None = None
    disposition: tuple[bytes, tuple[tuple[bytes, bytes], ...]] | None = None
    language: tuple[bytes, ...] | None = None
    location: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MultiPart:
    """body-type-mpart of RFC 3501 §9, with its extension data."""
    parts: tuple["SinglePart | MultiPart", ...]
    subtype: bytes
    params: tuple[tuple[bytes, bytes], ...]
    disposition: tuple[bytes, tuple[tuple[bytes, bytes], ...]] | None = None
    language: tuple[bytes, ...] | None = None
    location: bytes | None = None


Body = SinglePart | MultiPart


@dataclasses.dataclass(frozen=True, slots=True)
class MailItem:
    """What SEARCH and FETCH need of one message. `load` gives the parsed message and is
    only called when content is needed (use lazy_message() so it parses once)."""
    seq: int
    uid: int
    flags: frozenset[str]        # include "\\Recent" when the session has it as recent
    internaldate: datetime.datetime   # aware
    size: int
    load: Callable[[], "Message"]


def lazy_message(read: Callable[[], bytes],
                 make: "Callable[[bytes], Message] | None" = None) -> Callable[[], "Message"]:
    """A MailItem.load that reads and parses on first use and keeps the result
    (make: Message.from_header when read() gives only the header)."""
    cache: list[Message] = []

    def load() -> Message:
        if not cache:
            cache.append((make or Message)(read()))
        return cache[0]
    return load


# --- the message ------------------------------------------------------------------------

class Message:
    """One message's octets and structure. Parsing happens in the constructor (linear);
    header fields and values are computed when asked for."""
    __slots__ = ("data", "root")

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.root = _StructureParser(self.data).parse()

    @classmethod
    def from_header(cls, header: bytes) -> "Message":
        """A message of which only the header (with its blank line, if any) was read:
        ENVELOPE, header fields and BODY[HEADER...] sections are those of the whole
        message; the body and the structure are not known (an empty text/plain)."""
        self = cls.__new__(cls)
        self.data = bytes(header)
        self.root = Part(0, len(self.data), len(self.data), 0, Kind.LEAF, TEXT_PLAIN)
        return self

    @property
    def size(self) -> int:
        return len(self.data)            # RFC822.SIZE (the store gives CRLF octets)

    # --- header fields ----------------------------------------------------------------

    def fields(self, part: Part | None = None,
               names: "re.Pattern[bytes] | None" = None) -> list[HeaderField]:
        part = part or self.root
        return header_fields(self.data, part.start, part.body_start, names)

    def field_value(self, field: HeaderField) -> bytes:
        """The value after the colon, unfolded (RFC 5322 §2.2.3: the CRLFs go) and
        stripped of surrounding whitespace."""
        return _unfold(self.data[field.value_start:field.end]).strip(b" \t")

    def values(self, name: str, part: Part | None = None) -> list[bytes]:
        """The unfolded values of every field with this name, in order."""
        pattern = _names_pattern(name.encode("ascii"))
        return [self.field_value(f) for f in self.fields(part, pattern)]

    def first(self, name: str, part: Part | None = None) -> bytes | None:
        values = self.values(name, part)
        return values[0] if values else None

    # --- ENVELOPE ----------------------------------------------------------------------

    def envelope(self, part: Part | None = None) -> Envelope:
        """RFC 3501 §7.4.2, for the top-level message or an encapsulated one (the Part
        that message/rfc822 contains)."""
        part = part or self.root
        found: dict[bytes, bytes] = {}
        for f in self.fields(part, _ENVELOPE_FIELDS):
            found.setdefault(f.name.lower(), self.field_value(f))

        def text(name: bytes) -> bytes | None:
            return found.get(name) or None

        def addresses(name: bytes) -> tuple[Address, ...] | None:
            value = found.get(name)
            return (_address_list(value) or None) if value is not None else None

        from_ = addresses(b"from")
        return Envelope(
            date=text(b"date"), subject=text(b"subject"), from_=from_,
            # RFC 3501 §7.4.2: absent or empty Sender and Reply-To take From's value.
            sender=addresses(b"sender") or from_, reply_to=addresses(b"reply-to") or from_,
            to=addresses(b"to"), cc=addresses(b"cc"), bcc=addresses(b"bcc"),
            in_reply_to=text(b"in-reply-to"), message_id=text(b"message-id"))

    # --- BODY and BODYSTRUCTURE ------------------------------------------------------

    def body_structure(self, part: Part | None = None) -> Body:
        """The body structure of the message (or of one part); format it with
        response.body(b, extensible=True) for BODYSTRUCTURE, False for BODY."""
        part = part or self.root
        if part.kind is Kind.MULTIPART:
            return self._multipart(part)
        return self._single(part)

    def _multipart(self, part: Part) -> MultiPart:
        values = self._mime_fields(part)
        parts = tuple(self.body_structure(c) for c in part.children)
        if not parts:                    # RFC 3501 §9: body-type-mpart = 1*body ...
            parts = (SinglePart(TEXT_PLAIN.type, TEXT_PLAIN.subtype, TEXT_PLAIN.params,
                                None, None, b"7bit", 0, lines=0),)
        return MultiPart(parts, part.content_type.subtype, part.content_type.params or None,
                         *_extension(values))

    def _single(self, part: Part) -> SinglePart:
        values = self._mime_fields(part)
        ct = part.content_type
        mime = ct.mime
        kind_type, kind_subtype = ct.type, ct.subtype
        params = ct.params
        if part.kind is Kind.OPAQUE:
            kind_type, kind_subtype = b"application", b"octet-stream"
        elif mime.startswith("text/") and ct.param("charset") is None:
            params = params + ((b"charset", b"us-ascii"),)
        fields = dict(
            type=kind_type, subtype=kind_subtype, params=params or None,
            id=values.get(b"content-id"), description=values.get(b"content-description"),
            encoding=_token(values.get(b"content-transfer-encoding")) or b"7bit",
            size=part.end - part.body_start)
        if part.kind is Kind.MESSAGE:
            inner = part.children[0]
            fields.update(envelope=self.envelope(inner), body=self.body_structure(inner),
                          lines=part.lines)
        elif part.kind is Kind.LEAF and ct.type.lower() == b"text":
            fields["lines"] = part.lines
        md5 = values.get(b"content-md5")
        return SinglePart(**fields, md5=md5, **dict(zip(
            ("disposition", "language", "location"), _extension(values))))

    def _mime_fields(self, part: Part) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        for f in self.fields(part, _CONTENT_FIELDS):
            found.setdefault(f.name.lower(), self.field_value(f))
        return {k: v for k, v in found.items() if v}

    # --- BODY[section] ---------------------------------------------------------------

    def find_part(self, path: tuple[int, ...]) -> Part | None:
        """The part a section's numbers name (RFC 3501 §6.4.5), or None.

        A multipart's n is its n-th part; a non-multipart part has only part 1, itself,
        and only at the end of the path unless it is message/rfc822; numbers after a
        message/rfc822 part address the message it encapsulates."""
        part: Part | None = self.root
        for i, n in enumerate(path):
            more = i + 1 < len(path)
            if part.kind is Kind.MULTIPART:
                part = part.children[n - 1] if n <= len(part.children) else None
            elif n != 1 or (more and part.kind is not Kind.MESSAGE):
                part = None
            if part is None:
                return None
            if more and part.kind is Kind.MESSAGE:
                part = part.children[0]
        return part

    def section(self, part: tuple[int, ...] = (), text: str | None = None,
                fields: tuple[str, ...] = (),
                partial: tuple[int, int] | None = None) -> bytes:
        """BODY[section]<partial> octets, byte-exact. A part that does not exist, or
        HEADER/TEXT of a part that is no message/rfc822, is empty (as Dovecot)."""
        data = self._section(part, text, fields)
        if partial is not None:
            start, count = partial
            data = data[start:start + count]
        return data

    def _section(self, path: tuple[int, ...], text: str | None,
                 fields: tuple[str, ...]) -> bytes:
        target = self.find_part(path)
        if target is None:
            return b""
        if text is None:
            if not path:
                return self.data
            return self.data[target.body_start:target.end]
        if text == "MIME":
            return self.data[target.start:target.body_start]
        if path:                         # HEADER/TEXT of an encapsulated message
            if target.kind is not Kind.MESSAGE:
                return b""
            target = target.children[0]
        if text == "TEXT":
            return self.data[target.body_start:target.end]
        if text == "HEADER":
            return self.data[target.start:target.body_start]
        return self._header_subset(target, fields, keep=text == "HEADER.FIELDS")

    def _header_subset(self, part: Part, names: tuple[str, ...], keep: bool) -> bytes:
        wanted = {n.encode("ascii").lower() for n in names}
        chosen = [self.data[f.start:f.end] for f in self.fields(part)
                  if (f.name.lower() in wanted) == keep]
        # RFC 3501 §6.4.5: the blank line is included in all header fetches, except
        # for a message that has no body and no blank line.
        if _has_blank_line(self.data, part):
            chosen.append(b"\r\n")
        return b"".join(chosen)

    # --- decoded text for SEARCH -----------------------------------------------------

    def decoded_headers(self, part: Part | None = None) -> Iterator[tuple[bytes, str]]:
        """(name as written, value with RFC 2047 words decoded) for each field."""
        for f in self.fields(part):
            yield f.name, decode_header_value(self.field_value(f))

    def text_parts(self) -> Iterator[str]:
        """The decoded text of every text/* part and the headers of encapsulated
        messages, for SEARCH BODY/TEXT (transfer encoding and charset undone)."""
        stack = [self.root]
        while stack:
            part = stack.pop()
            if part.kind is Kind.MULTIPART:
                stack.extend(reversed(part.children))
            elif part.kind is Kind.MESSAGE:
                inner = part.children[0]
                yield "\n".join(f"{k.decode('latin-1')}: {v}"
                                for k, v in self.decoded_headers(inner))
                stack.append(inner)
            elif part.kind is Kind.LEAF and part.content_type.type.lower() == b"text":
                yield self._decoded_body(part)

    def _decoded_body(self, part: Part) -> str:
        raw = self.data[part.body_start:part.end]
        encoding = (_token(self.first("Content-Transfer-Encoding", part)) or b"").lower()
        if encoding == b"base64":
            try:
                raw = binascii.a2b_base64(raw)
            except binascii.Error:
                pass
        elif encoding == b"quoted-printable":
            raw = quopri.decodestring(raw)
        charset = (part.content_type.param("charset") or b"us-ascii").decode("ascii", "replace")
        return _decode_charset(raw, charset)


def _decode_charset(raw: bytes, charset: str) -> str:
    """Octets in the charset a message names, or as UTF-8 when Python has no such text
    codec or the codec fails (a message may name "idna" or "undefined")."""
    try:
        return raw.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError):
        return raw.decode("utf-8", "replace")


def decode_header_value(value: bytes) -> str:
    """RFC 2047 encoded words decoded; raw 8-bit taken as UTF-8 (RFC 6532)."""
    text = value.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        pieces = email.header.decode_header(text)
    except (email.errors.HeaderParseError, ValueError, LookupError):
        return text
    out = []
    for chunk, charset in pieces:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            # decode_header() gives the words outside encoded-words as raw-unicode-escape
            out.append(_decode_charset(chunk, charset or "raw-unicode-escape"))
    return "".join(out)


def sent_date(message: Message) -> datetime.date | None:
    """The date of the Date: field as written, its timezone ignored (RFC 3501 §6.4.4
    SENTBEFORE/SENTON/SENTSINCE); None when absent or unreadable."""
    value = message.first("Date")
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(value.decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError):
        return None
    if not parsed:
        return None
    try:
        return datetime.date(parsed[0], parsed[1], parsed[2])
    except ValueError:
        return None


# --- header fields ----------------------------------------------------------------------

def header_fields(data: bytes, start: int, end: int,
                  names: "re.Pattern[bytes] | None" = None) -> list[HeaderField]:
    """The fields of the header data[start:end], in order. A line that starts with
    space or tab continues the field before it; a line without a colon is a field whose
    name is the whole line (it never matches a name, as in Dovecot).

    With `names` (from _names_pattern()), only the fields so named, found by a regular
    expression anchored at line starts: a header of a million lines costs no Python
    step per line when only a few fields are wanted."""
    if names is not None:
        return [_field_at(data, m.start(), end, m.group(1), m.end())
                for m in names.finditer(data, start, end)]
    fields: list[HeaderField] = []
    pos = start
    while pos < end:
        line_end = data.find(b"\n", pos, end)
        line_end = end if line_end < 0 else line_end + 1
        if data[pos] in (0x20, 0x09) and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.start, line_end, last.value_start)
        else:
            line = data[pos:line_end]
            if line in (b"\r\n", b"\n"):         # the blank line ending the header
                break
            colon = line.find(b":")
            if colon < 0:
                name, value_start = line.rstrip(b"\r\n"), line_end
            else:
                name, value_start = line[:colon].rstrip(b" \t"), pos + colon + 1
            fields.append(HeaderField(name, pos, line_end, value_start))
        pos = line_end
    return fields


_FIELD_END = re.compile(rb"\n(?![ \t])")     # a line end not followed by a continuation


def _field_at(data: bytes, start: int, end: int, name: bytes, value_start: int) -> HeaderField:
    """The field that starts at `start`, with its continuation lines."""
    m = _FIELD_END.search(data, value_start, end)
    return HeaderField(name, start, m.end() if m else end, value_start)


def _names_pattern(*names: bytes) -> "re.Pattern[bytes]":
    """Fields with these names (a name may end in "*": any name with that prefix)."""
    alternatives = [re.escape(n[:-1]) + rb"[^:\s]*" if n.endswith(b"*") else re.escape(n)
                    for n in names]
    return re.compile(rb"(?im)^(" + b"|".join(alternatives) + rb")[ \t]*:")


_CONTENT_TYPE = _names_pattern(b"content-type")
_CONTENT_FIELDS = _names_pattern(b"content-*")
_ENVELOPE_FIELDS = _names_pattern(b"date", b"subject", b"from", b"sender", b"reply-to", b"to",
                                  b"cc", b"bcc", b"in-reply-to", b"message-id")


def _unfold(value: bytes) -> bytes:
    return value.replace(b"\r\n", b"").replace(b"\n", b"")


def _has_blank_line(data: bytes, part: Part) -> bool:
    header = data[part.start:part.body_start]
    return header in (b"\r\n", b"\n") or header.endswith(b"\n\r\n") or header.endswith(b"\n\n")


# --- MIME field values (RFC 2045 §5.1, RFC 2183, RFC 2231) --------------------------------

_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?= \t\r\n')


class _Mime:
    """A cursor over a Content-Type / Content-Disposition value."""
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data[:MAX_MIME_FIELD_BYTES]
        self.pos = 0

    def cfws(self) -> None:
        data, n = self.data, len(self.data)
        while self.pos < n:
            c = data[self.pos]
            if c in b" \t\r\n":
                self.pos += 1
            elif c == 0x28:                                   # comment, nested
                depth = 0
                while self.pos < n:
                    c = data[self.pos]
                    if c == 0x5C:
                        self.pos += 1
                    elif c == 0x28:
                        depth += 1
                    elif c == 0x29:
                        depth -= 1
                        if depth == 0:
                            self.pos += 1
                            break
                    self.pos += 1
            else:
                return

    def token(self) -> bytes:
        self.cfws()
        start, data, n = self.pos, self.data, len(self.data)
        while self.pos < n and data[self.pos] not in _TSPECIALS and data[self.pos] >= 0x20:
            self.pos += 1
        return data[start:self.pos]

    def char(self, c: int) -> bool:
        self.cfws()
        if self.pos < len(self.data) and self.data[self.pos] == c:
            self.pos += 1
            return True
        return False

    def value(self) -> bytes:
        self.cfws()
        if self.pos < len(self.data) and self.data[self.pos] == 0x22:
            out = bytearray()
            self.pos += 1
            data, n = self.data, len(self.data)
            while self.pos < n and data[self.pos] != 0x22:
                if data[self.pos] == 0x5C and self.pos + 1 < n:
                    self.pos += 1
                out.append(data[self.pos])
                self.pos += 1
            self.pos += 1
            return bytes(out)
        return self.token()

    def params(self) -> tuple[tuple[bytes, bytes], ...]:
        raw: list[tuple[bytes, bytes]] = []
        while True:
            if not self.char(0x3B):                           # ";"
                if self.pos >= len(self.data):
                    break
                self.pos += 1                                 # junk: skip an octet
                continue
            attr = self.token()
            if not attr or not self.char(0x3D):               # "="
                continue
            raw.append((attr, self.value()))
        return _join_continuations(raw)


_CONTINUATION = re.compile(rb"(.+?)\*(\d{1,3})(\*?)")


def _join_continuations(raw: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """RFC 2231 §3: name*0, name*1 ... joined into name (name* when the first piece is
    charset-encoded, left encoded for the client), where the first piece was."""
    out: list[list] = []
    groups: dict[bytes, tuple[int, dict[int, tuple[bytes, bool]]]] = {}
    for attr, value in raw:
        m = _CONTINUATION.fullmatch(attr)
        if m is None:
            out.append([attr, value])
            continue
        base = m.group(1)
        key = base.lower()
        if key not in groups:
            groups[key] = (len(out), {})
            out.append([base, None])
        groups[key][1].setdefault(int(m.group(2)), (value, bool(m.group(3))))
    for index, pieces in groups.values():
        order = sorted(pieces)
        out[index][1] = b"".join(pieces[i][0] for i in order)
        if pieces[order[0]][1]:
            out[index][0] += b"*"
    return tuple((a, v) for a, v in out)


def parse_content_type(value: bytes | None) -> ContentType | None:
    """type/subtype and parameters, or None when there is none or it is invalid."""
    if value is None:
        return None
    m = _Mime(value)
    maintype = m.token()
    if not maintype or not m.char(0x2F):                      # "/"
        return None
    subtype = m.token()
    if not subtype:
        return None
    return ContentType(maintype, subtype, m.params())


def _disposition(value: bytes | None):
    if not value:
        return None
    m = _Mime(value)
    kind = m.token()
    if not kind:
        return None
    return kind, m.params() or None


def _language(value: bytes | None) -> tuple[bytes, ...] | None:
    if not value:
        return None
    m = _Mime(value)
    tags = []
    while True:
        tag = m.token()
        if tag:
            tags.append(tag)
        if not m.char(0x2C):                                  # ","
            break
    return tuple(tags) or None


def _extension(values: dict[bytes, bytes]):
    """body-fld-dsp, body-fld-lang, body-fld-loc."""
    return (_disposition(values.get(b"content-disposition")),
            _language(values.get(b"content-language")),
            values.get(b"content-location"))


def _token(value: bytes | None) -> bytes | None:
    return _Mime(value).token() or None if value else None


# --- the structure parser ------------------------------------------------------------------

class _Open:
    """A part being parsed."""
    __slots__ = ("start", "body_start", "body_line", "level", "default", "kind",
                 "content_type", "children", "in_header", "boundary")

    def __init__(self, start: int, level: int, default: ContentType):
        self.start = start
        self.body_start = start
        self.body_line = 0
        self.level = level
        self.default = default
        self.kind = Kind.LEAF
        self.content_type = default
        self.children: list[Part] = []
        self.in_header = True
        self.boundary: bytes | None = None


class _StructureParser:
    """One forward pass over the message. The cursor `pos` is always at a line start and
    never moves back; `line` counts the LFs before it."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.line = 0
        self.stack: list[_Open] = []
        self.boundaries: list[tuple[bytes, _Open]] = []   # active, innermost last
        self.parts = 0
        self._finder_key: tuple | None = None
        self.after_boundary = -1         # where the last boundary line ended
        self._finder_re: "re.Pattern[bytes] | None" = None

    def parse(self) -> Part:
        root = self._open(0, 1, TEXT_PLAIN)
        while self.stack:
            top = self.stack[-1]
            found = self._next_event(top.in_header)
            if found is None:                                 # end of the message
                break
            at, blank, boundary, close, line_end = found
            if blank:
                self._advance(line_end)
                self._end_header(top, line_end)
            else:
                self._at_boundary(at, boundary, close, line_end)
        n = len(self.data)
        self._advance(n)
        while len(self.stack) > 1:
            self._close(self.stack[-1], n, self.line)
        return self._close(root, n, self.line)

    def _open(self, start: int, level: int, default: ContentType) -> _Open:
        self.parts += 1
        entity = _Open(start, level, default)
        if self.parts >= MAX_MIME_PARTS:
            self.boundaries.clear()      # the last part: nothing after it is a boundary
        self.stack.append(entity)
        return entity

    def _advance(self, pos: int) -> None:
        self.line += self.data.count(b"\n", self.pos, pos)
        self.pos = pos

    # --- finding the next event ----------------------------------------------------------

    def _next_event(self, in_header: bool):
        """The next blank line (only while in a header) or boundary line at or after pos:
        (line start, is blank, boundary owner, is close delimiter, line end), or None.
        The regular expression finds only lines that are events, so lines that merely
        start with "--" cost no Python step."""
        event = self._event_at(self.pos, in_header)
        if event is not None:
            return event
        finder = self._finder(in_header)
        if finder is None:
            return None
        m = finder.search(self.data, self.pos)
        return None if m is None else self._event_at(m.start() + 1, in_header)

    def _finder(self, in_header: bool) -> "re.Pattern[bytes] | None":
        key = (in_header, tuple(b for b, _ in self.boundaries))
        if self._finder_key != key:
            # Longest first: at one position the longest matching boundary wins.
            names = sorted({b for b, _ in self.boundaries}, key=len, reverse=True)
            alternatives = [b"--(?:" + b"|".join(map(re.escape, names)) + b")"] if names else []
            if in_header:
                alternatives.insert(0, rb"\r?\n")
            self._finder_key = key
            self._finder_re = (re.compile(rb"\n(?:" + b"|".join(alternatives) + b")")
                               if alternatives else None)
        return self._finder_re

    def _event_at(self, at: int, in_header: bool):
        data = self.data
        if at >= len(data):
            return None
        if in_header and (data.startswith(b"\r\n", at) or data.startswith(b"\n", at)):
            return at, True, None, False, at + (2 if data[at] == 0x0D else 1)
        if not data.startswith(b"--", at) or not self.boundaries:
            return None
        best = None
        for boundary, owner in self.boundaries:
            if data.startswith(boundary, at + 2) and (best is None or len(boundary) > len(best[0])):
                best = (boundary, owner)
        if best is None:
            return None
        after = at + 2 + len(best[0])
        close = data.startswith(b"--", after)
        line_end = data.find(b"\n", after)
        line_end = len(data) if line_end < 0 else line_end + 1
        return at, False, best[1], close, line_end

    # --- handling events --------------------------------------------------------------------

    def _end_header(self, entity: _Open, body_start: int) -> None:
        entity.in_header = False
        entity.body_start = body_start
        entity.body_line = self.line
        self._classify(entity, body_start)
        if entity.kind is Kind.MULTIPART:
            boundary = entity.content_type.param("boundary")
            if boundary:
                entity.boundary = boundary
                self.boundaries.append((boundary, entity))
        elif entity.kind is Kind.MESSAGE:
            self._open(body_start, entity.level + 1, TEXT_PLAIN)

    def _classify(self, entity: _Open, header_end: int) -> None:
        raw = _content_type(self.data, entity.start, header_end)
        entity.content_type = parse_content_type(raw) or entity.default
        mime = entity.content_type.mime
        if mime.startswith("multipart/"):
            kind = Kind.MULTIPART
        elif mime == "message/rfc822":
            kind = Kind.MESSAGE
        else:
            kind = Kind.LEAF
        if kind is not Kind.LEAF and (entity.level >= MAX_MIME_DEPTH
                                      or self.parts >= MAX_MIME_PARTS):
            kind = Kind.OPAQUE
        entity.kind = kind

    def _at_boundary(self, at: int, owner: _Open, close: bool, line_end: int) -> None:
        self._advance(at)
        # RFC 2046 §5.1.1: the line end before the boundary belongs to the boundary,
        # unless it ends a boundary line itself (as in Dovecot: "--inner--\r\n--outer"
        # leaves the CRLF to the inner multipart).
        if at == self.after_boundary:
            crlf = 0
        else:
            crlf = 2 if self.data[at - 2:at] == b"\r\n" else (1 if at and self.data[at - 1] == 0x0A else 0)
        self.after_boundary = line_end
        end_line = self.line - (1 if crlf else 0)
        while self.stack[-1] is not owner:
            self._close(self.stack[-1], at - crlf, end_line)
        self._advance(line_end)
        if close:
            self.boundaries = [(b, o) for b, o in self.boundaries if o is not owner]
        else:
            digest = owner.content_type.mime == "multipart/digest"   # RFC 2046 §5.1.5
            self._open(line_end, owner.level + 1, MESSAGE_RFC822 if digest else TEXT_PLAIN)

    def _close(self, entity: _Open, end: int, end_line: int) -> Part:
        self.stack.pop()
        if entity.boundary is not None:
            self.boundaries = [(b, o) for b, o in self.boundaries if o is not entity]
        # An entity opened after its parent's blank line that turned out to be the
        # boundary's CRLF (an empty message/rfc822 part of a digest) starts past its
        # end: it is empty, where it ends.
        entity.start = min(entity.start, end)
        if entity.in_header:                 # the part ended inside its header
            body_start, lines = max(entity.start, end), 0
            self._classify(entity, body_start)
        elif entity.body_start > end:        # its blank line was the boundary's CRLF
            body_start, lines = max(entity.start, end), 0
        else:
            body_start, lines = entity.body_start, end_line - entity.body_line
        end = max(end, body_start)
        children = tuple(entity.children)
        if entity.kind is Kind.MESSAGE and not children:
            children = (Part(body_start, body_start, body_start, 0, Kind.LEAF, TEXT_PLAIN),)
        part = Part(entity.start, body_start, end, lines, entity.kind, entity.content_type,
                    children)
        if self.stack:
            self.stack[-1].children.append(part)
        return part


def _content_type(data: bytes, start: int, end: int) -> bytes | None:
    """The first Content-Type value of the header data[start:end] (as Dovecot: the
    first one counts)."""
    m = _CONTENT_TYPE.search(data, start, end)
    if m is None:
        return None
    field = _field_at(data, m.start(), end, m.group(1), m.end())
    return _unfold(data[field.value_start:field.end]).strip(b" \t")
