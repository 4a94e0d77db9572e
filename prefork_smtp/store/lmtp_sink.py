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

import concurrent.futures
import itertools
import re
import threading
import time
from typing import Callable, Iterator, TypeVar

from ..config import Config
from . import lmtp, mbox, queue
from .sink import (DELIVERED, ERROR_RETRY_S, Abandoned, Copy, Outcome, deferred, failed,
                   unreachable)

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0                  # SPEC §11: retries at most 30 s apart
# Transactions at once, each on its own connection. Dovecot's LMTP serves each
# connection in one process, waiting on its disk: on the 2-core test machine one
# connection took ~430 messages/s, four ~770/s (Postfix's lmtp client would open up
# to 20). Each is a message a crash can hand over twice (SPEC §11's window).
CONNECTIONS = 4
WAIT_S = 0.5                        # progress() at least this often while transactions run
_HEADER_END = re.compile(rb"\r?\n\r?\n")

K = TypeVar("K")


class Backoff:
    """1 s, 2 s, 4 s ... at most MAX_RETRY_S after consecutive failures. Failures
    that come in while a delay runs (other transactions of the same attempt) share
    it rather than doubling it again."""

    def __init__(self, first_s: float = FIRST_RETRY_S, max_s: float = MAX_RETRY_S):
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0
        self.until = 0.0

    def failed(self, now: float) -> float:
        if now < self.until:
            return self.until - now
        delay = min(self.max_s, self.first_s * 2 ** min(self.failures, 30))
        self.failures += 1
        self.until = now + delay
        return delay

    def reset(self) -> None:
        self.failures, self.until = 0, 0.0


class LMTPSink:
    durable_on_delivery = True      # the server's 250 means it has the copy

    def __init__(self, config: Config, progress: Callable[[], None] | None = None,
                 connections: int = CONNECTIONS):
        self.config = config
        self.relay = str(config.delivery)
        self.progress = progress
        self._abandon = threading.Event()
        self.clients = [lmtp.LMTPClient(config.delivery, config.hostname,
                                        progress=self._client_progress)
                        for _ in range(max(1, connections))]
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.server_backoff = Backoff()
        self.mailbox_backoff: dict[str, Backoff] = {}

    def recover(self) -> None:
        pass

    def already_delivered(self, mailbox: str) -> set[str]:
        return set()                # cannot ask: at-least-once

    def deliver(self, mailbox: str, copies: list[Copy]) -> list[Outcome]:
        """The Sink interface's per-mailbox form: one transaction per copy."""
        out: list[Outcome] = []
        self.deliver_messages(((i, [copy]) for i, copy in enumerate(copies)),
                              lambda i, outcomes: out.extend(outcomes))
        return out + [deferred("not handed over", 0.0)] * (len(copies) - len(out))

    def deliver_messages(self, messages: Iterator[tuple[K, list[Copy]]],
                         settle: Callable[[K, list[Outcome]], None]) -> None:
        """Hand over the messages of the iterator (key, every due copy of one message),
        up to CONNECTIONS transactions at once (one, while the server has not answered
        since it last failed to); settle(key, outcomes) is called in
        this thread as each transaction ends, an Outcome per copy. The iterator is
        asked for the next message only when a connection is free (so it can stop
        when a settle said the server is unreachable). progress() is called at least
        every WAIT_S; if it raises, the transactions still running are abandoned
        (their copies get no outcome: they stay queued) and the exception propagates."""
        idle = list(self.clients)
        running: dict[concurrent.futures.Future, tuple[lmtp.LMTPClient, K, list[Copy]]] = {}
        exhausted = False
        try:
            while True:
                while idle and not exhausted and not (running and self.server_backoff.failures):
                    # After the server failed to answer, one transaction probes it
                    # before the others follow.
                    item = next(messages, None)
                    if item is None:
                        exhausted = True
                        break
                    client = idle.pop()
                    running[self._submit(client, item[1])] = (client, item[0], item[1])
                if not running:
                    return
                done, _ = concurrent.futures.wait(running, timeout=WAIT_S,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    client, key, copies = running.pop(future)
                    idle.append(client)
                    settle(key, self._outcomes(copies, future.result()))
                if self.progress is not None:
                    self.progress()
        except BaseException:
            self._abandon.set()     # the clients notice within a second, and drop
            concurrent.futures.wait(running)
            self._abandon.clear()
            for future, (_, key, copies) in running.items():
                if future.exception() is None:     # it ended before it noticed
                    settle(key, self._outcomes(copies, future.result()))
            raise

    def _submit(self, client: lmtp.LMTPClient, copies: list[Copy]) -> concurrent.futures.Future:
        if len(self.clients) == 1:              # no thread for a single connection
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(self._transaction(client, copies))
            except BaseException as e:
                future.set_exception(e)
                if not isinstance(e, Exception):
                    raise
            return future
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(len(self.clients),
                                                               thread_name_prefix="lmtp")
        return self._pool.submit(self._transaction, client, copies)

    def _client_progress(self) -> None:
        """A client waiting on the server: in a pool thread, it only listens for
        "abandon"; alone (one connection, no thread), it is the caller's progress."""
        if self._abandon.is_set():
            raise Abandoned()
        if len(self.clients) == 1 and self.progress is not None:
            self.progress()

    def _transaction(self, client: lmtp.LMTPClient,
                     copies: list[Copy]) -> list[lmtp.RecipientOutcome] | Outcome:
        """One message over one connection (in a pool thread): the client's outcomes,
        or one Outcome for every copy when it was decided here."""
        message = copies[0].message
        envelope = message.envelope
        received = mbox.received_header(
            envelope, queue_id=message.queue_id,
            recipient=copies[0].recipient if len(copies) == 1 else None,
            received_at=message.received_at, hostname=self.config.hostname)
        head = received.encode("utf-8")     # an SMTPUTF8 recipient may be in it
        try:
            pieces = queue.content_pieces(self.config.spool_dir, message)
            first = next(pieces, b"")
            if not self.config.smtputf8 and needs_smtputf8(envelope.protocol,
                                                           envelope.mail_from,
                                                           head + first):
                return failed("the message needs SMTPUTF8 (the client used it and the sender "
                              "or a header is not ASCII), and smtputf8 = false says the LMTP "
                              "server does not take it")
            content = itertools.chain([head],
                                      mbox.without_state_headers(itertools.chain([first], pieces)))
            return client.deliver(
                envelope.mail_from, [self.rcpt_to(copy) for copy in copies], content,
                body=envelope.body, smtputf8=envelope.protocol.upper().startswith("UTF8"),
                size=len(head) + message.size)
        except OSError as e:
            # The content (a large message's data file) cannot be read.
            return deferred(f"cannot read the queued message: {e.strerror or e}", ERROR_RETRY_S)

    def _outcomes(self, copies: list[Copy],
                  results: list[lmtp.RecipientOutcome] | Outcome) -> list[Outcome]:
        if isinstance(results, Outcome):
            return [results] * len(copies)
        now = time.monotonic()
        out = []
        for copy, result in zip(copies, results):
            if result.status is lmtp.Status.DELIVERED:
                self.server_backoff.reset()
                self.mailbox_backoff.pop(copy.mailbox, None)
                out.append(Outcome(DELIVERED, result.reply))
            elif result.status is lmtp.Status.FAILED:
                out.append(failed(result.reply))
            elif result.code is None or result.code == 421:
                # No reply from the server at all, or it is closing: nothing for any
                # mailbox goes there before the delay is up.
                out.append(unreachable(result.reply, self.server_backoff.failed(now)))
            else:
                backoff = self.mailbox_backoff.setdefault(copy.mailbox, Backoff())
                out.append(deferred(result.reply, backoff.failed(now)))
        return out

    def rcpt_to(self, copy: Copy) -> str:
        """The copy's mailbox at the domain the client used (SPEC §11)."""
        _, at, domain = copy.recipient.rpartition("@")
        domain = domain.lower().rstrip(".") if at else ""
        if not domain or not domain.isascii():
            domain = getattr(self.config.domains, "first", None) or min(self.config.domains)
        return f"{copy.mailbox}@{domain}"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for client in self.clients:
            client.close()


def needs_smtputf8(protocol: str, sender: str, head: bytes) -> bool:
    """Whether a message must go with SMTPUTF8 (see the module docstring); head is its
    start, our Received: included."""
    if not protocol.upper().startswith("UTF8"):
        return False
    end = _HEADER_END.search(head)
    return not sender.isascii() or not (head[:end.start()] if end else head).isascii()

