"""What is known about a message besides its content: sender, recipients, origin.

Plain data shared by the SMTP side (which fills it in) and the delivery side (which
writes it into headers); depends on nothing of ours.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    mailbox: str


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str                   # '' for the null reverse-path
    recipients: tuple[Recipient, ...]
    helo: str
    protocol: str                    # for Received: "ESMTP", "ESMTPS" (RFC 3848), "UTF8SMTP"...
    client_address: str
    body: str                        # "7BIT" or "8BITMIME"
    tls: str | None = None           # "TLSv1.3 with cipher ...", for Received:; None: plain
