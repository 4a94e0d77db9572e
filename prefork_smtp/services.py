"""The table of services a listener can carry (SPEC §2: -l [SERVICE://]ADDR:PORT).

Adding a protocol touches its own package and this table; the worker and the
master know none of them. A service whose name ends in "s" has implicit TLS (the
session handshakes before greeting: RFC 8314); the others offer STARTTLS/STLS.
"""

from __future__ import annotations

from .imap.service import IMAPService
from .pop3.service import POP3Service
from .service import Service
from .smtp.service import SMTPService

SERVICES: dict[str, Service] = {
    "smtp": Service("smtp", "smtp", SMTPService),
    "smtps": Service("smtps", "smtp", SMTPService),
    "pop3": Service("pop3", "pop3", POP3Service),
    "pop3s": Service("pop3s", "pop3", POP3Service),
    "imap": Service("imap", "imap", IMAPService),
    "imaps": Service("imaps", "imap", IMAPService),
}
