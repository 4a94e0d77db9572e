"""Where delivery hands queued copies: the destination side of the delivery process.

Owns: the Sink interface -- deliver(mailbox, copies) gives one Outcome per copy:
delivered, deferred (reason, retry after; for the whole destination when it cannot
be reached) or failed (reason) -- and its first implementation, MboxSink: all copies
for one mailbox in one locked mboxrd append (mbox.py), recovery of appends cut short
by a crash, and finding copies a crashed predecessor had already appended. A sink
that hands over a message rather than a mailbox's copies (LMTP: one transaction with
every recipient, lmtp_sink.py) also has deliver_messages(messages, settle), which
delivery then uses instead.
Must not: touch the queue; delivery decides what leaves it and when.

A sink whose deliveries are durable when deliver() returns (LMTP: the server said
250) sets durable_on_delivery; the mbox sink does not fsync its appends: delivery
makes them durable together, with one flush for many mailboxes, before any copy
leaves the queue.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
from typing import Callable, Iterator, Protocol

from ..config import Config
from ..layout import DELIVERY_JOURNAL, state_path
from . import mbox, queue

log = logging.getLogger("ccsmtp.local")

BUSY_RETRY_S = 1.0                 # a reader holds the mailbox lock
ERROR_RETRY_S = 10.0               # disk full, permissions: someone has to act


@dataclasses.dataclass(frozen=True, slots=True)
class Copy:
    """One message for one mailbox."""
    message: queue.QueuedMessage
    recipient: str                 # the address the client gave
    mailbox: str


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    kind: str                      # DELIVERED, DEFERRED or FAILED
    reason: str = ""               # why (deferred, failed), or the server's reply
    retry_after_s: float = 0.0
    destination: bool = False      # deferred: the destination itself is unreachable


DELIVERED, DEFERRED, FAILED = "delivered", "deferred", "failed"
SENT = Outcome(DELIVERED)


def deferred(reason: str, retry_after_s: float) -> Outcome:
    return Outcome(DEFERRED, reason, retry_after_s)


def failed(reason: str) -> Outcome:
    return Outcome(FAILED, reason)


class Abandoned(Exception):
    """Raised by a progress callback to make a sink stop waiting on its destination
    (a fast stop, or a graceful stop's time is up). The copies it had in hand get
    no outcome and stay queued."""


def unreachable(reason: str, retry_after_s: float) -> Outcome:
    """Deferred, and so is everything else for this destination until retry_after_s."""
    return Outcome(DEFERRED, reason, retry_after_s, destination=True)


class Sink(Protocol):
    durable_on_delivery: bool
    relay: str                     # for the log: "local", "lmtp:HOST:PORT"

    def recover(self) -> None:
        """At start, before anything is delivered: repair what a crash left."""

    def already_delivered(self, mailbox: str) -> set[str]:
        """Queue IDs of copies the destination already has (a crash came between
        handing them over and the queue's update)."""

    def deliver(self, mailbox: str, copies: list[Copy]) -> list[Outcome]:
        """Hand COPIES (all for MAILBOX) over; one Outcome per copy, in order."""

    def close(self) -> None:
        ...


class MboxSink:
    """Appends to SPOOL/MAILBOX (mboxrd, mutt's and Dovecot's locks); not fsync'ed."""

    durable_on_delivery = False
    relay = "local"

    def __init__(self, config: Config):
        self.config = config
        self.journal = mbox.AppendJournal(state_path(config.spool_dir, DELIVERY_JOURNAL))
        self._needs_repair: set[str] = set()

    def recover(self) -> None:
        self._needs_repair = mbox.undo_interrupted_appends(self.config.spool_dir, self.journal)
        for mailbox in self._needs_repair:
            # It ends in half a copy that must not count as delivered; nothing more
            # goes into it until it is cut back (see deliver).
            log.warning("mailbox %s is locked; it will be repaired after a crash once it is free",
                        mailbox)

    def already_delivered(self, mailbox: str) -> set[str]:
        if mailbox in self._needs_repair:
            return set()
        return mbox.delivered_ids(self.config.spool_dir, mailbox)

    def deliver(self, mailbox: str, copies: list[Copy]) -> list[Outcome]:
        spool = self.config.spool_dir
        data = itertools.chain.from_iterable(self._format(copy) for copy in copies)
        try:
            if mailbox in self._needs_repair:
                self._needs_repair = mbox.undo_interrupted_appends(spool, self.journal)
                if mailbox in self._needs_repair:
                    raise mbox.MailboxBusy("locked since a crash")
            mbox.append(spool, mailbox, data, self.config.spool_mode, self.journal, sync=False)
        except mbox.MailboxBusy as e:
            return [deferred(f"mailbox {mailbox} is locked ({e})", BUSY_RETRY_S)] * len(copies)
        except OSError as e:
            status = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            return [deferred(f"cannot append to mailbox {mailbox}: {status}",
                             ERROR_RETRY_S)] * len(copies)
        return [SENT] * len(copies)

    def _format(self, copy: Copy) -> Iterator[bytes]:
        message = copy.message
        content = queue.content_pieces(self.config.spool_dir, message)
        return mbox.format_copy(message.envelope, content, queue_id=message.queue_id,
                                recipient=copy.recipient, received_at=message.received_at,
                                hostname=self.config.hostname)

    def close(self) -> None:
        self.journal.close()


def sink_for(config: Config, progress: Callable[[], None] | None = None) -> Sink:
    """The sink the configuration names (SPEC §11: "mbox" or "lmtp:..."). progress is
    called at least once a second while a sink waits on a server (the heartbeat)."""
    if config.delivery.kind == "lmtp":
        from .lmtp_sink import LMTPSink   # here: lmtp_sink imports this module
        return LMTPSink(config, progress)
    if config.delivery.kind != "mbox":
        raise NotImplementedError(f"delivery kind {config.delivery.kind!r}")
    return MboxSink(config)
