"""RFC 5321 §4.1.2 path syntax: splitting MAIL/RCPT arguments and parsing addresses.

Owns: the grammar of Reverse-path / Forward-path and ESMTP parameters. Pure: no
policy (which domains are local is mailboxes.py's business). Fails by raising
AddressError; nothing here ever lets CR, LF, NUL or other control characters
through, so an accepted address is safe to put in a header or a From_ line.
"""

from __future__ import annotations

import dataclasses
import re

# RFC 5321 §4.1.2 atext, plus non-ASCII characters for SMTPUTF8 (RFC 6531 §3.3) other
# than C1 controls and Unicode line breaks, which some readers take for a new line.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_UTEXT = r"[^\x00-\x9f\u2028\u2029]"
_QTEXT = r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ULABEL = (r"(?:[A-Za-z0-9]|[^\x00-\x9f\u2028\u2029])"
           r"(?:(?:[A-Za-z0-9-]|[^\x00-\x9f\u2028\u2029])*(?:[A-Za-z0-9]|[^\x00-\x9f\u2028\u2029]))?")


def _compile(atom_char: str, label: str, qtext: str) -> re.Pattern[str]:
    dot_string = rf"{atom_char}+(?:\.{atom_char}+)*"
    quoted = rf'"{qtext}*"'
    domain = rf"{label}(?:\.{label})*\.?"
    literal = r"\[[\x21-\x5a\x5e-\x7e]+\]"
    return re.compile(rf"(?P<local>{dot_string}|{quoted})(?:@(?P<domain>{domain}|{literal}))?")


_MAILBOX_ASCII = _compile(_ATEXT, _LABEL, _QTEXT)
_MAILBOX_UTF8 = _compile(f"(?:{_ATEXT}|{_UTEXT})", _ULABEL, f"(?:{_QTEXT}|{_UTEXT})")
# RFC 5321 §4.1.2 A-d-l: a source route, to be ignored (§C).
_SOURCE_ROUTE = re.compile(rf"@{_LABEL}(?:\.{_LABEL})*(?:,@{_LABEL}(?:\.{_LABEL})*)*:")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


class AddressError(ValueError):
    pass


class NeedsSMTPUTF8(AddressError):
    """A syntactically fine address that has non-ASCII characters without SMTPUTF8."""


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    local_part: str          # unquoted
    domain: str | None       # None for a bare local-part such as <postmaster>
    text: str                # as the client wrote it, minus the angle brackets

    def __str__(self) -> str:
        return self.text


NULL_PATH = Address("", None, "")


def split_path_and_params(arg: str) -> tuple[str, str]:
    """'<a@b> SIZE=10' -> ('<a@b>', 'SIZE=10'). Angle brackets may hold a quoted
    string with spaces or '>' in it; without brackets the path ends at a space."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        path, _, params = arg.partition(" ")
        return path, params.strip(" ")
    in_quotes = escaped = False
    for i, c in enumerate(arg):
        if escaped:
            escaped = False
        elif c == "\\" and in_quotes:
            escaped = True
        elif c == '"':
            in_quotes = not in_quotes
        elif c == ">" and not in_quotes:
            return arg[:i + 1], arg[i + 1:].strip(" ")
    raise AddressError("unbalanced angle brackets")


def parse_path(path: str, *, allow_null: bool, smtputf8: bool) -> Address:
    """Parse '<local@domain>' (brackets optional, as Postfix allows)."""
    if path.startswith("<"):
        if not path.endswith(">"):
            raise AddressError("unbalanced angle brackets")
        inner = path[1:-1]
    else:
        inner = path
    if inner == "":
        if allow_null:
            return NULL_PATH
        raise AddressError("empty address")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    if not smtputf8 and _NON_ASCII.search(inner):
        if _MAILBOX_UTF8.fullmatch(inner):
            raise NeedsSMTPUTF8(inner)
        raise AddressError("bad address syntax")
    match = (_MAILBOX_UTF8 if smtputf8 else _MAILBOX_ASCII).fullmatch(inner)
    if not match:
        raise AddressError("bad address syntax")
    local = match.group("local")
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    domain = match.group("domain")
    return Address(local, domain.rstrip(".") if domain else None, inner)


def parse_params(text: str) -> dict[str, str | None]:
    """'SIZE=100 BODY=8BITMIME' -> {'SIZE': '100', 'BODY': '8BITMIME'} (RFC 5321 §4.1.2)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        match = _PARAM.fullmatch(item)
        if not match:
            raise AddressError(f"bad parameter {item!r}")
        params[match.group(1).upper()] = match.group(2)
    return params
