"""IMAP4rev1 response formatting (RFC 3501 §7, §9) and every protocol text the service sends.

Owns: the texts and codes of status responses, the parse-error reasons, capability names,
and the encoding of values into response syntax: atoms, quoted strings or literals,
nstrings, flag lists, INTERNALDATE, ENVELOPE, BODY/BODYSTRUCTURE, FETCH responses.
Depends on nothing of ours (the envelope and body formatters take any object with the
fields of message.Envelope / message.SinglePart / message.MultiPart).
Must not: echo client input into a status text (the tag is the only client text we send
back, and the parser has checked it is a valid tag).

Strings are bytes: header values are sent as the octets the message holds, 8-bit
included (as a literal). A NUL never goes on the wire: IMAP4rev1 literals are CHAR8
(%x01-ff), so NUL octets are sent as 0x80, as Dovecot does; the length is unchanged.
"""

from __future__ import annotations

import datetime
import functools
from typing import Iterable, Sequence

CRLF = b"\r\n"

# --- status responses and continuation requests --------------------------------------

OK, NO, BAD, BYE, PREAUTH = "OK", "NO", "BAD", "BYE", "PREAUTH"

CONTINUE_LITERAL = b"+ Ready for literal data\r\n"
CONTINUE_IDLE = b"+ idling\r\n"            # RFC 2177 §3: any text after "+"
CONTINUE_SASL_EMPTY = b"+ \r\n"            # RFC 4959 / RFC 3501 §6.2.2: empty challenge

GREETING_TEXT = "ccsmtp IMAP ready"        # SPEC §9: * OK [CAPABILITY ...] ccsmtp IMAP ready

# --- reasons the command parser gives with BAD (reply-ready: never client text) ------

LINE_TOO_LONG = "Command line too long"
# RFC 7888 §4 and RFC 4469 §5 name [TOOBIG] for a literal the server will not take.
LITERAL_TOO_BIG = "[TOOBIG] Literal too big"
NUL_IN_COMMAND = "NUL octet in command"    # CVE-2019-11500 class: never let one through
BARE_CR = "CR not followed by LF"
EIGHT_BIT_OUTSIDE_LITERAL = "8-bit octets are only allowed in literals"
EMPTY_LINE = "Empty command line"
INVALID_TAG = "Invalid tag"
MISSING_COMMAND = "Missing command"
UNKNOWN_COMMAND = "Unknown command"
UNKNOWN_UID_COMMAND = "Unknown UID command"
LITERAL_NOT_ALLOWED = "This command takes no string argument"
BAD_ARGUMENTS = "Invalid arguments"        # the parser appends ": " and what was expected
IDLE_EXPECTED_DONE = "Expected DONE"       # RFC 2177 §3
SASL_BAD_RESPONSE = "Invalid base64 in SASL response"
SASL_CANCELLED = "Authentication cancelled"  # RFC 3501 §6.2.2: client sent "*"

# --- response codes (RFC 3501 §7.1, RFC 5530, RFC 4315) ------------------------------

BADCHARSET = "BADCHARSET"
CANNOT = "CANNOT"
PRIVACYREQUIRED = "PRIVACYREQUIRED"
TOOBIG = "TOOBIG"

# --- capabilities (RFC 3501 §6.1.1 and the extensions of SPEC §9) --------------------

IMAP4REV1 = "IMAP4rev1"
BASE_CAPABILITIES = ("IMAP4rev1", "LITERAL+", "SASL-IR", "IDLE", "UIDPLUS", "NAMESPACE")
# The parser reads these commands too; advertise them once the state machine does them.
OPTIONAL_CAPABILITIES = ("UNSELECT", "ENABLE")
STARTTLS = "STARTTLS"
LOGINDISABLED = "LOGINDISABLED"
AUTH_PLAIN = "AUTH=PLAIN"

SEARCH_CHARSETS = ("US-ASCII", "UTF-8")    # what search.py can decode

# Past this length a string is sent as a literal even when it could be quoted. RFC 3501
# sets no limit; quoted strings are parsed octet by octet and some clients cap the length
# of a response line, a literal is read by count.
MAX_QUOTED_BYTES = 1024

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# RFC 3501 §9: atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards /
# quoted-specials / resp-specials
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}


def capabilities(*, starttls: bool = False, login_disabled: bool = False,
                 authenticated: bool = False, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The capability list for the current state (RFC 3501 §6.1.1, §6.2.3).

    STARTTLS is offered only before login on a plain connection that has a certificate;
    LOGINDISABLED when passwords may not be sent yet (SPEC §9); AUTH=PLAIN otherwise.
    After login only the extensions are listed. `extra`: e.g. OPTIONAL_CAPABILITIES.
    """
    caps = list(BASE_CAPABILITIES) + list(extra)
    if not authenticated:
        if starttls:
            caps.append(STARTTLS)
        caps.append(LOGINDISABLED if login_disabled else AUTH_PLAIN)
    return tuple(caps)


def capability_response(caps: Sequence[str]) -> bytes:
    return b"* CAPABILITY " + " ".join(caps).encode("ascii") + CRLF


def greeting(caps: Sequence[str]) -> bytes:
    return untagged(OK, GREETING_TEXT, code="CAPABILITY " + " ".join(caps))


# --- status lines ----------------------------------------------------------------------

def tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """`tag OK [CODE] text`. The tag must come from the parser (it checked its syntax)."""
    return _status(tag, status, text, code)


def untagged(status: str, text: str, code: str | None = None) -> bytes:
    return _status("*", status, text, code)


def _status(prefix: str, status: str, text: str, code: str | None) -> bytes:
    code_part = f"[{code}] " if code else ""
    return f"{prefix} {status} {code_part}{text}\r\n".encode("ascii", "replace")


def bad(tag: str | None, reason: str) -> bytes:
    """The BAD for a parser error: tagged when the tag is known, else untagged."""
    return _status(tag if tag is not None else "*", BAD, reason, None)


# --- values ----------------------------------------------------------------------------

def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def is_quotable(value: bytes) -> bool:
    # RFC 3501 §9: QUOTED-CHAR is 7-bit TEXT-CHAR (no CR, LF or NUL).
    return (len(value) <= MAX_QUOTED_BYTES and value.isascii()
            and b"\r" not in value and b"\n" not in value and b"\0" not in value)


def quoted(value: bytes | str) -> bytes:
    data = _as_bytes(value)
    if not is_quotable(data):
        raise ValueError("not quotable; use string()")
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(value: bytes | str) -> bytes:
    data = _as_bytes(value).replace(b"\0", b"\x80")
    return b"{%d}\r\n" % len(data) + data


def string(value: bytes | str) -> bytes:
    """A quoted string when RFC 3501 allows one, else a literal (8-bit, CR, LF, long)."""
    data = _as_bytes(value)
    return quoted(data) if is_quotable(data) else literal(data)


def nstring(value: bytes | str | None) -> bytes:
    return b"NIL" if value is None else string(value)


def astring(value: bytes | str) -> bytes:
    """An atom when the value is one (e.g. INBOX in LIST responses), else a string."""
    data = _as_bytes(value)
    if data and data.upper() != b"NIL" and all(c < 0x80 and c not in _ATOM_SPECIALS
                                                 for c in data):
        return data
    return string(data)


def number(value: int) -> bytes:
    return b"%d" % value


def flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(flags).encode("ascii") + b")"


def internaldate(when: datetime.datetime) -> bytes:
    """RFC 3501 §9 date-time: "17-Jul-1996 02:44:25 -0700" (day padded with a space)."""
    if when.tzinfo is None:
        raise ValueError("INTERNALDATE needs an aware datetime")
    offset = when.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    text = (f'"{when.day:2d}-{_MONTHS[when.month - 1]}-{when.year:04d} '
            f'{when.hour:02d}:{when.minute:02d}:{when.second:02d} '
            f'{sign}{minutes // 60:02d}{minutes % 60:02d}"')
    return text.encode("ascii")


def _plist(items: Sequence[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


def params(pairs: Sequence[tuple[bytes, bytes]] | None) -> bytes:
    """body-fld-param: ("name" "value" ...) or NIL."""
    if not pairs:
        return b"NIL"
    return _plist([string(x) for pair in pairs for x in pair])


# --- ENVELOPE and BODYSTRUCTURE (RFC 3501 §7.4.2) ---------------------------------------

@functools.lru_cache(maxsize=4096)
def address_list(addresses) -> bytes:
    """A tuple of addresses.Address (hashable: the same lists recur across messages)."""
    if not addresses:
        return b"NIL"
    return b"(" + b"".join(
        _plist([nstring(a.name), nstring(a.adl), nstring(a.mailbox), nstring(a.host)])
        for a in addresses) + b")"


def envelope(env) -> bytes:
    """envelope = "(" date subject from sender reply-to to cc bcc in-reply-to message-id ")"."""
    return _plist([
        nstring(env.date), nstring(env.subject),
        address_list(env.from_), address_list(env.sender), address_list(env.reply_to),
        address_list(env.to), address_list(env.cc), address_list(env.bcc),
        nstring(env.in_reply_to), nstring(env.message_id),
    ])


def body(b, extensible: bool) -> bytes:
    """BODY (extensible=False) or BODYSTRUCTURE (True) of a message.SinglePart/MultiPart."""
    if hasattr(b, "parts"):
        out = b"(" + b"".join(body(p, extensible) for p in b.parts) + b" " + string(b.subtype)
        if extensible:
            out += b" " + b" ".join([params(b.params), _disposition(b.disposition),
                                     _language(b.language), nstring(b.location)])
        return out + b")"
    fields = [string(b.type), string(b.subtype), params(b.params), nstring(b.id),
              nstring(b.description), string(b.encoding), number(b.size)]
    if b.envelope is not None:            # message/rfc822: envelope, body, lines
        fields += [envelope(b.envelope), body(b.body, extensible), number(b.lines)]
    elif b.lines is not None:             # text/*: lines
        fields.append(number(b.lines))
    if extensible:
        fields += [nstring(b.md5), _disposition(b.disposition), _language(b.language),
                   nstring(b.location)]
    return _plist(fields)


def _disposition(disposition) -> bytes:
    if disposition is None:
        return b"NIL"
    kind, pairs = disposition
    return _plist([string(kind), params(pairs)])


def _language(language: Sequence[bytes] | None) -> bytes:
    if not language:
        return b"NIL"
    return _plist([string(x) for x in language])


# --- FETCH ----------------------------------------------------------------------------

def fetch_response(seq: int, items: Sequence[tuple[bytes, bytes]]) -> bytes:
    """`* seq FETCH (NAME value NAME value ...)` from (name, encoded value) pairs."""
    inner = b" ".join(name + b" " + value for name, value in items)
    return b"* %d FETCH (" % seq + inner + b")\r\n"


def search_response(numbers: Iterable[int]) -> bytes:
    return b"* SEARCH" + b"".join(b" %d" % n for n in numbers) + CRLF
