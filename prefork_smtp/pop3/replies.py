"""Every POP3 reply ccsmtp sends, as a named constant.

Owns: reply texts, their RFC 2449 §8 / RFC 3206 response codes (`-ERR [IN-USE] ...`),
and formatting of single-line, multi-line (RFC 1939 §3) and SASL continuation replies.
Depends on nothing of ours. Replies never echo client input: the only values filled
in are numbers, UIDLs from the mail store and usage texts from the command table.

Wording follows Dovecot where it has one, so that clients and admins see familiar text.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

# RFC 2449 §4: the first line of a response is at most 512 octets with its CRLF.
MAX_REPLY_LINE = 512


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    text: str
    # RFC 2449 §8 extended response code, sent in brackets after the status indicator.
    code: str | None = None

    def __bytes__(self) -> bytes:
        parts = ["+OK" if self.ok else "-ERR"]
        if self.code:
            parts.append(f"[{self.code}]")
        if self.text:
            parts.append(self.text)
        return (" ".join(parts) + "\r\n").encode("ascii")

    @property
    def is_error(self) -> bool:
        return not self.ok

    def fill(self, *values: int | str) -> "Reply":
        """The reply with its '{}' placeholders filled: numbers, UIDLs and usage texts
        the server made itself, never client text (printable ASCII is enforced)."""
        texts = [str(v) for v in values]
        for text in texts:
            if not all(" " <= c <= "~" for c in text):
                raise ValueError(f"not printable ASCII: {text!r}")
        return dataclasses.replace(self, text=self.text.format(*texts))


def multiline(first: Reply, lines: Iterable[str]) -> bytes:
    """RFC 1939 §3: status line, the lines (a leading '.' doubled), then '.' alone."""
    out = [bytes(first)]
    for line in lines:
        data = line.encode("ascii")
        out.append(b"." + data + b"\r\n" if data.startswith(b".") else data + b"\r\n")
    out.append(b".\r\n")
    return b"".join(out)


# RFC 5034 §4: "a server challenge that contains no data is defined as a line with only
# a '+' followed by a single space"; PLAIN's challenge is empty.
SASL_CONTINUE = b"+ \r\n"

# --- positive ------------------------------------------------------------------------

GREETING = Reply(True, "ccsmtp POP3 ready")
CAPABILITIES = Reply(True, "Capability list follows")
MECHANISMS = Reply(True, "")           # bare AUTH (RFC 1734 style): the SASL list follows
USER_OK = Reply(True, "")              # the same for every name: no user enumeration
LOGGED_IN = Reply(True, "Logged in.")
BEGIN_TLS = Reply(True, "Begin TLS negotiation")
STAT = Reply(True, "{} {}")                        # count, octets (RFC 1939 §5: exactly so)
LIST_ALL = Reply(True, "{} messages ({} octets)")
SCAN_LISTING = Reply(True, "{} {}")                # LIST n: number, octets
UIDL_ALL = Reply(True, "")
UIDL_ONE = Reply(True, "{} {}")                    # UIDL n: number, unique-id
RETR_OK = Reply(True, "{} octets")
TOP_OK = Reply(True, "")
DELETED = Reply(True, "Message {} deleted.")
NOOP_OK = Reply(True, "")
RSET_OK = Reply(True, "")
BYE = Reply(True, "Bye")

# --- negative: the client's doing (each counts toward hard_error_limit) ----------------

UNKNOWN_COMMAND = Reply(False, "Unknown command.")
NOT_LOGGED_IN = Reply(False, "Not logged in.")            # TRANSACTION command too early
ALREADY_LOGGED_IN = Reply(False, "Already logged in.")    # AUTHORIZATION command too late
LINE_TOO_LONG = Reply(False, "Line too long.")
BAD_BYTES = Reply(False, "NUL or bare CR in command.")
NOT_UTF8 = Reply(False, "Command is not valid UTF-8.")
NO_SUCH_MESSAGE = Reply(False, "No such message.")
ALREADY_DELETED = Reply(False, "Message {} already deleted.")
NO_USERNAME = Reply(False, "No username given.")
BAD_SYNTAX = Reply(False, "Syntax: {}")               # filled with the usage from COMMANDS
TLS_ACTIVE = Reply(False, "TLS is already active.")
TLS_UNAVAILABLE = Reply(False, "TLS support isn't enabled.")
UNSUPPORTED_MECHANISM = Reply(False, "Unsupported authentication mechanism.")
AUTH_CANCELLED = Reply(False, "Authentication cancelled.")            # RFC 5034 §4 '*'
BAD_BASE64 = Reply(False, "Invalid base64 data in SASL response.")    # RFC 5034 §4
BAD_PLAIN = Reply(False, "Invalid PLAIN response.")                   # RFC 4616 §2 syntax
# RFC 3206 §4: [AUTH] when the credentials (or the policy about them) are the reason.
PLAINTEXT_DISALLOWED = Reply(
    False, "Plaintext authentication disallowed on non-secure connections.", "AUTH")
PLAINTEXT_DISALLOWED_STLS = Reply(
    False, "Plaintext authentication disallowed on non-secure connections (use STLS).", "AUTH")
AUTHZID_REFUSED = Reply(False, "Proxy authorization (authzid) is not supported.", "AUTH")
AUTH_FAILED = Reply(False, "Authentication failed.", "AUTH")   # unknown user and bad password alike

# --- negative: the server's doing (these do not count as client errors) ----------------

AUTH_TEMP_FAILED = Reply(False, "Temporary authentication failure.", "SYS/TEMP")
IN_USE = Reply(False, "Mailbox is locked by another POP3 session.", "IN-USE")   # RFC 2449 §8.1.1
MAILDROP_FAILED = Reply(False, "Cannot open the mailbox, try again later.", "SYS/TEMP")
COMMIT_FAILED = Reply(False, "Some deleted messages not removed.", "SYS/TEMP")   # RFC 1939 §6
TOO_MANY_ERRORS = Reply(False, "Too many errors, closing connection.")
# RFC 1939 §3 lets the server close silently at autologout; Dovecot says why, and so do we.
TIMEOUT = Reply(False, "Disconnected for inactivity.")
SHUTTING_DOWN = Reply(False, "Server shutting down.", "SYS/TEMP")
TOO_MANY_CONNECTIONS = Reply(False, "Too many connections from your address.", "SYS/TEMP")
INTERNAL_ERROR = Reply(False, "Internal error, try again later.", "SYS/TEMP")
