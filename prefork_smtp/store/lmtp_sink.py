"""Delivery to an LMTP server (SPEC §11): the sink of `delivery = "lmtp:..."`.

Owns: turning the queued copies of one message into one LMTP transaction (lmtp.py's
client, one connection kept open): RCPT TO names each copy's mailbox at the domain
the client used -- aliases are applied already, so Alice+tag@Example.ORG routed to
mailbox alice is alice@example.org, and a bare local-part (postmaster) gets the first
local domain; MAIL FROM, BODY=8BITMIME and SMTPUTF8 come from the envelope; in front
of the content goes only our Received: (the LMTP server adds Return-Path:, RFC 2033
§4.2), and the state headers of SPEC §6 are taken out of the content as for mbox.
And when to try again: a recipient's 4xx defers that mailbox, a server that cannot be
reached (no reply at all, or 421) defers everything for it, each 1 s doubling to at
most 30 s apart, and a delivery resets them.
Must not: touch the queue (delivery decides what leaves it) or open mailboxes.

One transaction carries every copy of a message, so its content cannot name each
recipient: our Received: says `for <ADDRESS>` only when there is one (as Postfix;
naming them all would show Bcc recipients to each other).

A message "needs SMTPUTF8" when its client used SMTPUTF8 and its sender or header
section (ours included) is not ASCII (Postfix's rule). With `smtputf8 = false` (an
LMTP server without it, such as Dovecot 2.3) such a copy fails here without being
sent; with `smtputf8 = true` it goes with SMTPUTF8 when the server offers it, and the
client fails a non-ASCII sender itself when it does not.

already_delivered() has no way to ask the LMTP server what it holds: delivery over
LMTP is at-least-once (a copy whose 250 came just before ccsmtp died goes again).
"""

from __future__ import annotations

import itertools
import re
from typing import Callable

from ..config import Config
from . import lmtp, mbox, queue
from .sink import ERROR_RETRY_S, Copy, Outcome, deferred, failed, unreachable

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0                  # SPEC §11: retries at most 30 s apart
_HEADER_END = re.compile(rb"\r?\n\r?\n")


class Backoff:
    """1 s, 2 s, 4 s ... at most MAX_RETRY_S after consecutive failures."""

    def __init__(self, first_s: float = FIRST_RETRY_S, max_s: float = MAX_RETRY_S):
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0

    def failed(self) -> float:
        delay = min(self.max_s, self.first_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class LMTPSink:
    durable_on_delivery = True      # the server's 250 means it has the copy

    def __init__(self, config: Config, progress: Callable[[], None] | None = None,
                 client: lmtp.LMTPClient | None = None):
        self.config = config
        self.relay = str(config.delivery)
        self.client = client or lmtp.LMTPClient(config.delivery, config.hostname,
                                                progress=progress)
        self.server_backoff = Backoff()
        self.mailbox_backoff: dict[str, Backoff] = {}

    def recover(self) -> None:
        pass

    def already_delivered(self, mailbox: str) -> set[str]:
        return set()                # cannot ask: at-least-once

    def deliver(self, mailbox: str, copies: list[Copy]) -> list[Outcome]:
        """The Sink interface's per-mailbox form: one transaction per copy."""
        out: list[Outcome] = []
        for copy in copies:
            [outcome] = self.deliver_message([copy])
            out.append(outcome)
            if outcome.destination:
                out += [outcome] * (len(copies) - len(out))
                break
        return out

    def deliver_message(self, copies: list[Copy]) -> list[Outcome]:
        """Every copy of one message (one per mailbox), in one transaction; an
        Outcome per copy, in order."""
        message = copies[0].message
        envelope = message.envelope
        received = mbox.received_header(
            envelope, queue_id=message.queue_id,
            recipient=copies[0].recipient if len(copies) == 1 else None,
            received_at=message.received_at, hostname=self.config.hostname)
        try:
            pieces = queue.content_pieces(self.config.spool_dir, message)
            first = next(pieces, b"")
            if not self.config.smtputf8 and needs_smtputf8(envelope.protocol,
                                                           envelope.mail_from,
                                                           received.encode() + first):
                return [failed("the message needs SMTPUTF8 (the client used it and the sender "
                               "or a header is not ASCII), and smtputf8 = false says the LMTP "
                               "server does not take it")] * len(copies)
            content = itertools.chain([received.encode("utf-8")],
                                      mbox.without_state_headers(itertools.chain([first], pieces)))
            results = self.client.deliver(
                envelope.mail_from, [self.rcpt_to(copy) for copy in copies], content,
                body=envelope.body, smtputf8=envelope.protocol.upper().startswith("UTF8"),
                size=len(received) + message.size)
        except OSError as e:
            # The content (a large message's data file) cannot be read.
            return [deferred(f"cannot read the queued message: {e.strerror or e}",
                             ERROR_RETRY_S)] * len(copies)
        return self._outcomes(copies, results)

    def _outcomes(self, copies: list[Copy], results: list[lmtp.RecipientOutcome]) -> list[Outcome]:
        server_delay = None
        out = []
        for copy, result in zip(copies, results):
            if result.status is lmtp.Status.DELIVERED:
                self.server_backoff.reset()
                self.mailbox_backoff.pop(copy.mailbox, None)
                out.append(Outcome("delivered", result.reply))
            elif result.status is lmtp.Status.FAILED:
                out.append(failed(result.reply))
            elif result.code is None or result.code == 421:
                # No reply from the server at all, or it is closing: nothing for any
                # mailbox goes there before the delay is up.
                if server_delay is None:
                    server_delay = self.server_backoff.failed()
                out.append(unreachable(result.reply, server_delay))
            else:
                backoff = self.mailbox_backoff.setdefault(copy.mailbox, Backoff())
                out.append(deferred(result.reply, backoff.failed()))
        return out

    def rcpt_to(self, copy: Copy) -> str:
        """The copy's mailbox at the domain the client used (SPEC §11)."""
        _, at, domain = copy.recipient.rpartition("@")
        domain = domain.lower().rstrip(".") if at else ""
        if not domain or not domain.isascii():
            domain = getattr(self.config.domains, "first", None) or min(self.config.domains)
        return f"{copy.mailbox}@{domain}"

    def close(self) -> None:
        self.client.close()


def needs_smtputf8(protocol: str, sender: str, head: bytes) -> bool:
    """Whether a message must go with SMTPUTF8 (see the module docstring); head is its
    start, our Received: included."""
    if not protocol.upper().startswith("UTF8"):
        return False
    end = _HEADER_END.search(head)
    return not sender.isascii() or not (head[:end.start()] if end else head).isascii()

