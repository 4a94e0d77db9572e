"""Which mailbox a local recipient lands in, and which names are safe as mailbox files.

Owns: the routing of a recipient address to a
mailbox (local domains, aliases, allow-list, catch-all, postmaster). Pure functions of
their arguments: no files, no config object. A refusal is a Rejection naming why; the
SMTP layer turns it into a reply.
"""

from __future__ import annotations

import enum
from typing import Mapping

from ..layout import is_safe_mailbox

def _fold(text: str) -> str:
    lowered = text.lower()
    return lowered if text.isascii() or not lowered.isascii() else text


class Rejection(enum.Enum):
    NOT_LOCAL = "not a local domain"          # would make us a relay
    UNKNOWN_USER = "no such mailbox"          # not allowed, unsafe or non-ASCII


POSTMASTER = "postmaster"


class Router:
    """Maps (local-part, domain) to a mailbox name or a Rejection."""

    def __init__(self, domains: frozenset[str], *, recipients: frozenset[str] = frozenset(),
                 aliases: Mapping[str, str] | None = None, catchall: str | None = None):
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self.recipients = recipients
        self.aliases = aliases or {}
        self.catchall = catchall

    def is_local(self, domain: str | None) -> bool:
        # A bare local-part is local, as Postfix appends $myorigin to it.
        return domain is None or domain.lower().rstrip(".") in self.domains

    def route(self, local_part: str, domain: str | None) -> str | Rejection:
        if not self.is_local(domain):
            return Rejection.NOT_LOCAL
        # Lower-casing is for ASCII: str.lower() maps some non-ASCII letters to ASCII
        # ones (KELVIN SIGN to 'k'), which would route them to another user's mailbox.
        local = _fold(local_part)
        # RFC 5233 sub-addressing: alice+tag is delivered to alice.
        base = local.split("+", 1)[0] or local
        for key in self._alias_keys(local, base, domain):
            if key in self.aliases:
                return self.aliases[key]
        if base == POSTMASTER:   # RFC 5321 §4.5.1: postmaster is always accepted
            return POSTMASTER
        if base in self.recipients:
            return base
        if self.catchall:
            return self.catchall
        if not self.recipients and is_safe_mailbox(base):
            return base
        return Rejection.UNKNOWN_USER

    @staticmethod
    def _alias_keys(local: str, base: str, domain: str | None) -> list[str]:
        keys = []
        if domain:
            domain = domain.lower().rstrip(".")
            keys += [f"{local}@{domain}", f"{base}@{domain}"]
        return keys + [local, base]
