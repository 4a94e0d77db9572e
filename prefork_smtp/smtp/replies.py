"""Every SMTP reply ccsmtp sends, as a named constant with its RFC 3463 enhanced code.

Owns: reply texts and codes, and formatting of single and multi-line replies.
Depends on nothing of ours. Replies never carry exception text or client input
other than what a test of the protocol would expect to see echoed (none today).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    text: str

    def __bytes__(self) -> bytes:
        return format_reply(self.code, [self.text], self.enhanced)

    def with_text(self, text: str) -> "Reply":
        return dataclasses.replace(self, text=text)

    @property
    def is_error(self) -> bool:
        return self.code >= 400


def format_reply(code: int, lines: list[str], enhanced: str | None = None) -> bytes:
    """RFC 5321 §4.2.1: every line but the last has '-' after the code; with
    enhanced codes (RFC 2034 §4) every line carries the code too."""
    prefix = f"{enhanced} " if enhanced else ""
    out = []
    for i, line in enumerate(lines):
        sep = "-" if i < len(lines) - 1 else " "
        out.append(f"{code}{sep}{prefix}{line}\r\n")
    return "".join(out).encode("utf-8", "replace")


# Greeting, HELO/EHLO replies are built by the protocol (they name the host) and carry
# no enhanced code (RFC 2034 §3).

SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
RESET_OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {}")
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
HELP = Reply(214, "2.0.0", "Commands: {}")
CHUNK_RECEIVED = Reply(250, "2.0.0", "{} octets received")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections from your address")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")

UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_SYNTAX = Reply(501, "5.5.4", "Syntax: {}")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_HELO = Reply(501, "5.5.4", "Syntax: {} hostname")
BAD_BYTES = Reply(500, "5.5.2", "Error: bare CR, LF or NUL in command")
EXPN_DENIED = Reply(502, "5.5.1", "Error: EXPN is not supported")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "Error: command not implemented")
BAD_BDAT_MARKER = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: {}")
UNKNOWN_USER = Reply(550, "5.1.1", "<{}>: Recipient address rejected: User unknown")
RELAY_DENIED = Reply(550, "5.7.1", "<{}>: Relay access denied")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
LOOP_DETECTED = Reply(554, "5.4.6", "Error: too many hops (mail forwarding loop)")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported option: {}")


def fill(reply: Reply, *args: object) -> Reply:
    """A reply whose text has '{}' placeholders, filled with printable, CR/LF-free text."""
    safe = [_printable(str(a)) for a in args]
    return reply.with_text(reply.text.format(*safe))


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned[:limit]
