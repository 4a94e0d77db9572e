"""The delivery process: moves queued messages into their mailboxes.

Owns: reading ready batches from the queue, appending every copy to its mailbox
(all copies for one mailbox in a round share one lock and one fsync), deferring a
mailbox whose lock a reader holds without holding up the others, recording
partly delivered batches, and removing a batch once every copy is safe.
Must not: speak SMTP or write outside SPOOL (mbox.py enforces safe names).
Runs as the unprivileged user, one at a time (an OFD lock on
SPOOL/.ccsmtp/delivery.lock). On TERM it delivers what it can within
graceful_timeout and exits; what is left stays queued for the next start.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
import logging
import os
import select
import signal
import socket
import time
from typing import Callable, Iterator

from setproctitle import setproctitle

from .. import logs
from ..config import Config
from ..layout import DELIVERY_JOURNAL, DELIVERY_LOCK, state_path
from . import mbox, queue
from .fsutil import lock_ofd

log = logging.getLogger("ccsmtp.local")

ROUND_BYTES = 8 * 1024 * 1024      # at most this much message content in memory a round
RESCAN_S = 1.0                     # look at the queue at least this often
BUSY_RETRY_S = 1.0                 # a reader holds the mailbox lock
ERROR_RETRY_S = 10.0               # disk full, permissions: someone has to act


@dataclasses.dataclass
class Copy:
    batch: str
    message: queue.QueuedMessage
    recipient: str
    mailbox: str


@dataclasses.dataclass
class Batch:
    name: str
    messages: list[queue.QueuedMessage]
    done: set[tuple[str, str]]

    def copies(self) -> list[Copy]:
        out, seen = [], set(self.done)
        for message in self.messages:
            for rcpt in message.envelope.recipients:
                key = (message.queue_id, rcpt.mailbox)
                if key not in seen:   # one copy per mailbox, as Postfix's duplicate filter
                    seen.add(key)
                    out.append(Copy(self.name, message, rcpt.address, rcpt.mailbox))
        return out


class Delivery:
    def __init__(self, config: Config, notify: socket.socket | None,
                 heartbeat: Callable[[int], None] | None = None, master_pid: int = 0):
        self.config = config
        self.notify = notify
        self.heartbeat = heartbeat   # posts how many copies were delivered, once a round
        self.master_pid = master_pid
        self.delivered = 0
        self.retry_at: dict[str, float] = {}
        self._stopping = False
        self._quitting = False
        self._reopen_logs = False
        self._needs_repair: set[str] = set()
        self.journal = mbox.AppendJournal(
            state_path(config.spool_dir, DELIVERY_JOURNAL))
        self._wakeup_r, self._wakeup_w = socket.socketpair()

    # --- process ----------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        setproctitle("ccsmtp: delivery [waiting for lock]")
        lock_fd = self._take_delivery_lock()
        try:
            self.recover()
            self._loop()
        finally:
            os.close(lock_fd)
        return 0

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_reopen_logs)
        signal.signal(signal.SIGQUIT, self._on_quit)

    def _on_stop(self, signum: int, frame: object) -> None:
        self._stopping = True   # only record it; the loop does the work

    def _on_quit(self, signum: int, frame: object) -> None:
        # Fast stop, but never in the middle of an append: the queue keeps the rest.
        self._quitting = True

    def _on_reopen_logs(self, signum: int, frame: object) -> None:
        self._reopen_logs = True

    def _take_delivery_lock(self) -> int:
        path = state_path(self.config.spool_dir, DELIVERY_LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        lock_ofd(fd, wait=True)   # a delivery from before a reload may still be finishing
        return fd

    def _loop(self) -> None:
        stop_by = None
        while not self._quitting:
            if self._stopping and stop_by is None:
                stop_by = time.monotonic() + self.config.graceful_timeout_s
                log.info("delivery stopping: delivering what is queued")
            if self._reopen_logs:
                self._reopen_logs = False
                logs.reopen()
            pending = self.deliver_round()
            self._beat()
            if stop_by is not None and (not pending or time.monotonic() > stop_by):
                if pending:
                    log.warning("delivery stopping with %d batch(es) still queued", pending)
                return
            if self.master_pid and os.getppid() != self.master_pid:
                self._stopping = True
            if stop_by is None:
                self._wait(RESCAN_S)
            elif pending:
                time.sleep(0.05)

    def _wait(self, timeout: float) -> None:
        waiting = [self._wakeup_r] + ([self.notify] if self.notify else [])
        try:
            ready, _, _ = select.select(waiting, [], [], timeout)
        except InterruptedError:
            return
        for sock in ready:
            self._drain_socket(sock)

    @staticmethod
    def _drain_socket(sock: socket.socket) -> None:
        try:
            while sock.recv(4096, socket.MSG_DONTWAIT):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _beat(self) -> None:
        setproctitle(f"ccsmtp: delivery [{self.delivered} msgs delivered]")
        if self.heartbeat is not None:
            self.heartbeat(self.delivered)

    # --- recovery -----------------------------------------------------------------

    def recover(self) -> None:
        """Settle queued copies that are already in their mailbox.

        A predecessor that died between a mailbox's fsync and removing the batch
        left copies that are delivered but still queued; delivering them again
        would duplicate mail whose 250 the client did get. Runs once at start.
        """
        spool = self.config.spool_dir
        present: dict[str, set[str]] = {}
        self._needs_repair = mbox.undo_interrupted_appends(spool, self.journal)
        for mailbox in self._needs_repair:
            # It ends in half a copy that must not count as delivered; nothing more
            # goes into it until it is cut back (see _append).
            log.warning("mailbox %s is locked; it will be repaired after a crash once it is free",
                        mailbox)
            present[mailbox] = set()
        names = queue.ready_batches(spool)
        while names:
            batches, consumed = self._load_batches(names)
            names = names[consumed:]
            found: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
            for batch in batches:
                for copy in batch.copies():
                    if copy.mailbox not in present:
                        present[copy.mailbox] = mbox.delivered_ids(spool, copy.mailbox)
                    if copy.message.queue_id in present[copy.mailbox]:
                        self._log_copy(copy, "sent", f"found in mailbox {copy.mailbox} at start-up")
                        found[batch.name].append((copy.message.queue_id, copy.mailbox))
            for batch in batches:
                if found.get(batch.name):
                    self._settle(batch, found[batch.name])

    # --- one round ----------------------------------------------------------------

    def deliver_round(self) -> int:
        """Deliver what is ready; returns how many batches are left in the queue."""
        spool = self.config.spool_dir
        names = queue.ready_batches(spool)
        batches, _ = self._load_batches(names)
        by_mailbox: dict[str, list[Copy]] = collections.defaultdict(list)
        for batch in batches:
            for copy in batch.copies():
                by_mailbox[copy.mailbox].append(copy)
        delivered: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        for mailbox, copies in by_mailbox.items():
            if self._quitting:
                break
            if self._append(mailbox, copies):
                for copy in copies:
                    delivered[copy.batch].append((copy.message.queue_id, mailbox))
        finished = sum(self._settle(batch, delivered.get(batch.name, [])) for batch in batches)
        return len(names) - finished

    def _load_batches(self, names: list[str]) -> tuple[list[Batch], int]:
        """Batches from the front of names, up to ROUND_BYTES of content; and how
        many names that used up."""
        batches, total, consumed = [], 0, 0
        for name in names:
            consumed += 1
            try:
                messages = queue.read_batch(self.config.spool_dir, name)
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as e:
                self._quarantine(name, e)
                continue
            batches.append(Batch(name, messages, queue.read_done(self.config.spool_dir, name)))
            total += sum(len(m.content) for m in messages)
            if total >= ROUND_BYTES:
                break
        return batches, consumed

    def _append(self, mailbox: str, copies: list[Copy]) -> bool:
        now = time.monotonic()
        if self.retry_at.get(mailbox, 0.0) > now:
            return False
        data = itertools.chain.from_iterable(self._format(copy) for copy in copies)
        try:
            if mailbox in self._needs_repair:
                self._needs_repair = mbox.undo_interrupted_appends(self.config.spool_dir,
                                                                   self.journal)
                if mailbox in self._needs_repair:
                    raise mbox.MailboxBusy("locked since a crash")
            mbox.append(self.config.spool_dir, mailbox, data, self.config.spool_mode, self.journal)
        except mbox.MailboxBusy as e:
            if mailbox not in self.retry_at:
                log.info("mailbox %s is locked (%s): %d message(s) deferred", mailbox, e, len(copies))
            self.retry_at[mailbox] = now + BUSY_RETRY_S
            return False
        except OSError as e:
            status = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            for copy in copies:
                self._log_copy(copy, "deferred", f"cannot append to mailbox {mailbox}: {status}")
            self.retry_at[mailbox] = now + ERROR_RETRY_S
            return False
        self.retry_at.pop(mailbox, None)
        self.delivered += len(copies)
        for copy in copies:
            self._log_copy(copy, "sent", f"delivered to mailbox {mailbox}")
        return True

    def _format(self, copy: Copy) -> Iterator[bytes]:
        message = copy.message
        content = queue.content_pieces(self.config.spool_dir, message)
        return mbox.format_copy(message.envelope, content, queue_id=message.queue_id,
                                recipient=copy.recipient, received_at=message.received_at,
                                hostname=self.config.hostname)

    @staticmethod
    def _log_copy(copy: Copy, status: str, detail: str) -> None:
        delay = max(0.0, time.time() - copy.message.received_at)
        log.info("%s: to=<%s>, relay=local, delay=%.2f, status=%s (%s)",
                 copy.message.queue_id, copy.recipient, delay, status, detail)

    def _settle(self, batch: Batch, delivered_now: list[tuple[str, str]]) -> bool:
        """Remove a finished batch, or record progress on an unfinished one."""
        spool = self.config.spool_dir
        needed = {(m.queue_id, r.mailbox) for m in batch.messages for r in m.envelope.recipients}
        if needed <= batch.done | set(delivered_now):
            queue.remove_batch(spool, batch.name, batch.messages)
            return True
        if delivered_now:
            queue.mark_done(spool, batch.name, delivered_now)
        return False

    def _quarantine(self, name: str, error: Exception) -> None:
        paths = queue.queue_paths(self.config.spool_dir)
        corrupt = state_path(self.config.spool_dir, "corrupt")
        os.makedirs(corrupt, mode=0o700, exist_ok=True)
        os.rename(os.path.join(paths["queue"], name), os.path.join(corrupt, name))
        log.error("queue file %s is corrupt (%s): moved to %s", name, error, corrupt)
