"""The delivery process: moves queued messages from the log into their mailboxes.

Owns: reading the queue log (queue.py) as it grows, handing the copies for each
mailbox to the sink (sink.py: the mbox append, or LMTP) in one go per round,
deferring a mailbox the sink cannot take now without holding up the others, and
letting a copy leave the queue only once it is durable where it went: the mbox
sink's appends are not fsync'ed one by one; delivery asks the log for a syncfs
(FULL_REQ), which the next group-commit flush of the workers performs anyway --
so delivery's durability costs no flush of its own while mail arrives, and never
queues in front of an acknowledgement -- or performs it itself after
FULL_SYNC_WAIT_S when the log is quiet; it asks at most every SYNC_BATCH_S. Only
then are the copies written to the segment's done file, data files of large
messages removed, and segments whose every copy is delivered handed back for reuse.

A sink with deliver_messages (LMTP) gets every due copy of one message at once (one
transaction for all its recipients, a few messages at a time); its copies are durable at the server's 250, so
they leave the queue right after each message. A destination that cannot be reached
defers everything for it until the sink's delay is up (1 s doubling to 30 s for
LMTP): the workers keep accepting, the queue is the buffer, and the log says so
every few seconds (queue depth, oldest age) instead of once per copy per retry. A
copy the destination refuses for good is kept in SPOOL/.ccsmtp/failed/ (failed.py)
before it leaves the queue; nothing is sent back to anyone.

For the tools (delivery_state.py): SPOOL/.ccsmtp/delivery.state, rewritten at most
once a second, says how deep the queue is, how old its oldest message, whether the
destination is reachable and the last error of each deferred copy; the flag file
SPOOL/.ccsmtp/flush (ccsmtp-queue --flush, --requeue) makes every deferred copy due
at once.
Must not: speak SMTP or write outside SPOOL (mbox.py enforces safe names).
Runs as the unprivileged user, one at a time (an OFD lock on
SPOOL/.ccsmtp/delivery.lock). On TERM it delivers what it can within
graceful_timeout and exits (at once if the destination is unreachable); what is left
stays queued for the next start. While a sink waits on a server it calls back at
least once a second: the heartbeat goes on, and a stop is noticed.
"""

from __future__ import annotations

import collections
import dataclasses
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
from ..layout import DELIVERY_LOCK, state_path
from . import delivery_state, failed, queue
from .envelope import Recipient
from .fsutil import lock_ofd, unlink_quietly
from .sink import (DELIVERED, ERROR_RETRY_S, FAILED, Abandoned, Copy, Outcome, Sink, deferred,
                   sink_for)

log = logging.getLogger("ccsmtp.local")

ROUND_BYTES = 8 * 1024 * 1024      # at most this much message content in memory a round
RESCAN_S = 1.0                     # look at the queue at least this often
SYNC_BATCH_S = 0.1                 # ask for a flush of the mailboxes at most this often
FULL_SYNC_WAIT_S = 0.05            # then flush them ourselves: the log is quiet
POLL_S = 0.005                     # while waiting for a flush to cover our appends
ROUND_INTERVAL_S = 0.02            # rounds start at most this often
DONE_RESCAN_S = 1.0                # done files: the queue tool's removals, looked for this often
MESSAGE_ROUND_S = 1.0              # per-message sinks: hand over for at most this long a round
STATE_INTERVAL_S = 1.0             # delivery.state: rewritten at most this often
BEAT_INTERVAL_S = 0.5              # heartbeats while a sink waits on a server
# While the destination is unreachable, the log says how the queue grows this often:
# every QUEUE_REPORT_S for the first QUEUE_REPORT_SLOW_AFTER_S, then every QUEUE_REPORT_SLOW_S.
QUEUE_REPORT_S = 5.0
QUEUE_REPORT_SLOW_AFTER_S = 60.0
QUEUE_REPORT_SLOW_S = 60.0


@dataclasses.dataclass
class CopyError:
    """The last deferral of one queued copy, for the log and ccsmtp-queue."""
    error: str
    since: float                      # time.time() of the first deferral
    attempts: int
    next_attempt: float               # time.time()


@dataclasses.dataclass
class Entry:
    """One queued message, as long as any copy of it is not yet safe elsewhere."""
    lsn: int
    queue_id: str
    received_at: float
    external: bool
    left: dict[str, str]             # mailbox -> recipient: copies still to hand over
    unsynced: set[str] = dataclasses.field(default_factory=set)   # handed over, not durable
    message: queue.QueuedMessage | None = None                    # with content, this round

    @property
    def finished(self) -> bool:
        return not self.left and not self.unsynced


@dataclasses.dataclass
class SegmentState:
    segment: queue.Segment
    cursor: int                       # next LSN to read
    read_all: bool = False
    entries: dict[int, Entry] = dataclasses.field(default_factory=dict)
    done_offset: int = 0              # how much of its done file has been read
    done: set[tuple[str, str]] = dataclasses.field(default_factory=set)   # (queue ID, mailbox)

    def restart(self) -> None:
        """Forget what was read: the next round reads the segment again."""
        self.cursor, self.read_all, self.done_offset = self.segment.base, False, 0
        self.entries.clear()
        self.done.clear()


class Delivery:
    def __init__(self, config: Config, notify: socket.socket | None,
                 heartbeat: Callable[[int], None] | None = None, master_pid: int = 0,
                 sink: Sink | None = None):
        self.config = config
        self.notify = notify
        self.heartbeat = heartbeat   # posts how many copies were delivered, once a round
        self.master_pid = master_pid
        self.delivered = 0
        self.retry_at: dict[str, float] = {}
        self.sink = sink or sink_for(config, self._progress)
        self.relay = getattr(self.sink, "relay", "local")
        self._per_message = callable(getattr(self.sink, "deliver_messages", None))
        # The destination as a whole (an LMTP server that does not answer).
        self.unreachable_until = 0.0     # monotonic: nothing goes there before
        self.unreachable_since: float | None = None    # time.time() of the first failure
        self.unreachable_error = ""
        self.unreachable_attempts = 0
        self._unreachable_next = 0.0     # time.time() of the next attempt
        self._back_at = 0.0              # monotonic: when it answered again (0: draining done)
        self._back_delivered = 0
        self._report_at = 0.0
        self._reported_messages = 0
        self.copy_errors: dict[tuple[str, str], CopyError] = {}   # (queue ID, mailbox)
        self._state_at = 0.0
        self._state_written: dict | None = None
        self._stop_by: float | None = None
        self._beat_at = 0.0
        self.log = queue.Log(config.spool_dir)
        self.segments: dict[int, SegmentState] = {}
        # Handed over, waiting for a flush: (segment base, lsn, mailbox).
        self._unsynced: list[tuple[int, int, str]] = []
        self._sync_wanted = 0            # FULL_REQ number that covers _unsynced
        self._sync_asked_at = 0.0
        self._unsynced_since = 0.0
        self._done_rescan_at = 0.0
        self._stopping = False
        self._quitting = False
        self._reopen_logs = False
        self._wakeup_r, self._wakeup_w = socket.socketpair()

    # --- process ----------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        setproctitle("ccsmtp: delivery [waiting for lock]")
        lock_fd = self._take_delivery_lock()
        logs.batch_writes()
        try:
            self.recover()
            self._loop()
        finally:
            logs.unbatch()
            os.close(lock_fd)
            # Before this object (and its wake-up socket) can be freed: a signal that
            # came after that would make the interpreter write to a closed descriptor
            # and print an "Exception ignored" report (seen when a reload signals an
            # old delivery process twice).
            signal.set_wakeup_fd(-1)
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
        while not self._quitting:
            if self._stopping and self._stop_by is None:
                self._stop_by = time.monotonic() + self.config.graceful_timeout_s
                self.unreachable_until = 0.0    # one more try before leaving it queued
                log.info("delivery stopping: delivering what is queued")
            if self._reopen_logs:
                self._reopen_logs = False
                logs.reopen()
            if delivery_state.take_flush_request(self.config.spool_dir):
                self.flush_requested()
            started = time.monotonic()
            self.deliver_round()
            stop_by = self._stop_by
            self.settle(force=stop_by is not None)
            pending = self.pending()
            self._beat()
            self.report(pending)
            logs.flush_pending()
            if stop_by is not None and (not pending or time.monotonic() > stop_by
                                        or self.unreachable_since is not None):
                if pending:
                    why = f" ({self.relay} unreachable)" if self.unreachable_since is not None else ""
                    log.warning("delivery stopping with %d message(s) still queued%s", pending, why)
                return
            if self.master_pid and os.getppid() != self.master_pid:
                self._stopping = True
            if stop_by is not None:
                time.sleep(0.05)
            elif self._unsynced:
                self._wait(POLL_S if self._sync_wanted else SYNC_BATCH_S / 2)
            else:
                self._wait(self._next_retry_in())
            # Under load, let copies gather: one lock and one write per mailbox then
            # carries many (each append costs a dozen system calls whatever its size).
            time.sleep(max(0.0, started + ROUND_INTERVAL_S - time.monotonic()))

    def _next_retry_in(self) -> float:
        due = list(self.retry_at.values())
        if self.unreachable_until:
            due.append(self.unreachable_until)
        if not due:
            return RESCAN_S
        return max(0.01, min(RESCAN_S, min(due) - time.monotonic()))

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
        self._beat_at = time.monotonic()
        setproctitle(f"ccsmtp: delivery [{self.delivered} msgs delivered]")
        if self.heartbeat is not None:
            self.heartbeat(self.delivered)

    def _progress(self) -> None:
        """Called by the sink while it waits on a server (at least once a second)."""
        now = time.monotonic()
        if now - self._beat_at >= BEAT_INTERVAL_S:
            self._beat()
        if self._quitting or (self._stop_by is not None and now > self._stop_by):
            raise Abandoned()

    def pending(self) -> int:
        """Messages still in the queue (delivered but not yet durable ones included)."""
        return sum(len(state.entries) for state in self.segments.values()) + \
            sum(1 for state in self.segments.values() if not state.read_all
                and state.cursor < min(self.log.synced, state.segment.limit))

    # --- recovery -----------------------------------------------------------------

    def recover(self) -> None:
        """Settle queued copies that are already at their destination.

        A predecessor that died between handing copies over (or making them durable)
        and recording them as done left copies that are delivered but still queued;
        delivering them again would duplicate mail whose 250 the client did get.
        Runs once at start: read the whole queue, ask the sink what it has, flush
        (what a killed predecessor appended may not be durable yet), then record.
        """
        self.sink.recover()
        present: dict[str, set[str]] = {}
        found: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
        self._refresh_segments()
        for state in self.segments.values():
            while not state.read_all:
                if not self._read_more(state, with_content=False):
                    break
            for entry in state.entries.values():
                for mailbox in list(entry.left):
                    if mailbox not in present:
                        present[mailbox] = self.sink.already_delivered(mailbox)
                    if entry.queue_id in present[mailbox]:
                        self._log_copy(entry, entry.left.pop(mailbox), "sent",
                                       f"found in mailbox {mailbox} at start-up")
                        found[state.segment.base].append((entry.queue_id, mailbox))
        if found and not self.sink.durable_on_delivery:
            self.log.full_sync_now()
        for base, copies in found.items():
            queue.mark_done(self.config.spool_dir, base, copies)
        # Read again from the start in rounds: recovery must not hold the whole queue.
        for state in self.segments.values():
            state.restart()

    # --- one round ----------------------------------------------------------------

    def deliver_round(self) -> None:
        """Hand over whatever is ready: new records, and deferred copies whose
        mailbox may be free again."""
        self._refresh_segments()
        budget = ROUND_BYTES
        rescan = time.monotonic() >= self._done_rescan_at
        if rescan:
            self._done_rescan_at = time.monotonic() + DONE_RESCAN_S
        for state in self.segments.values():
            if rescan:
                self._read_done(state)
            while budget > 0 and not state.read_all:
                got = self._read_more(state, with_content=True, max_bytes=budget)
                budget -= got
                if not got:
                    break
        due = self._copies_due(budget)
        if self._per_message:
            self._hand_over_messages(due)    # reads content as it goes, for one round's worth
        else:
            by_mailbox: dict[str, list[tuple[SegmentState, Entry, Copy]]] = collections.defaultdict(list)
            for state, entry, copies in due:
                for copy in copies:
                    by_mailbox[copy.mailbox].append((state, entry, copy))
            for mailbox, items in by_mailbox.items():
                if self._quitting:
                    break
                self._hand_over(mailbox, items)
        for state in self.segments.values():
            for entry in state.entries.values():
                entry.message = None   # content is read again if a copy is still due

    def _refresh_segments(self) -> None:
        live = {s.base: s for s in self.log.segments()}
        for base in list(self.segments):
            if base not in live:
                del self.segments[base]
        for base, segment in sorted(live.items()):
            if base not in self.segments:
                self.segments[base] = SegmentState(segment, base)
                self._read_done(self.segments[base])

    def _read_done(self, state: SegmentState) -> None:
        """Copies recorded as done (by us before a restart, or removed by the queue
        tool since): they are not handed over."""
        lines, state.done_offset = queue.read_done(self.config.spool_dir, state.segment.base,
                                                   state.done_offset)
        if not lines:
            return
        by_id = {entry.queue_id: entry for entry in state.entries.values()}
        for queue_id, mailbox, removed in lines:
            state.done.add((queue_id, mailbox))
            entry = by_id.get(queue_id)
            if entry is None:
                continue
            self.copy_errors.pop((queue_id, mailbox), None)
            if entry.left.pop(mailbox, None) is not None and removed:
                log.info("%s: copy for mailbox %s removed from the queue", queue_id, mailbox)
            if entry.finished:
                self._finish(state, entry)

    def _read_more(self, state: SegmentState, with_content: bool, max_bytes: int = ROUND_BYTES) -> int:
        """Read the next records of a segment into entries; returns the bytes read
        (0: nothing new)."""
        records, state.cursor, at_end = self.log.read(state.segment, state.cursor,
                                                      max_bytes=max(max_bytes, 1 << 16))
        size = 0
        for lsn, cancelled, payload in records:
            size += len(payload)
            if cancelled:
                continue
            try:
                message = queue.decode_payload(payload, lsn, with_content)
            except (ValueError, KeyError, TypeError) as e:
                log.error("queue record at %d is corrupt (%s): skipped", lsn, e)
                continue
            left: dict[str, str] = {}
            for rcpt in message.envelope.recipients:
                # One copy per mailbox, as Postfix's duplicate filter.
                if rcpt.mailbox not in left and (message.queue_id, rcpt.mailbox) not in state.done:
                    left[rcpt.mailbox] = rcpt.address
            entry = Entry(lsn, message.queue_id, message.received_at, message.external, left,
                          message=message if with_content else None)
            if entry.finished:
                self._finish(state, entry)
            else:
                state.entries[lsn] = entry
        # The end of its records below the synced point: a segment no longer
        # written (its unused tail) or full.
        state.read_all = at_end
        return size

    def _copies_due(self, budget: int) -> Iterator[tuple[SegmentState, Entry, list[Copy]]]:
        """Per message, oldest first, its copies that may go now, with its content
        (read when the message's turn comes: a per-message sink takes a round's worth
        of a long queue, not all of it). Entries may be finished meanwhile, and
        retry_at is read as it goes: a mailbox deferred earlier in the round is left
        out from then on (its retry time is after this round's start)."""
        now = time.monotonic()
        if now < self.unreachable_until:
            return
        for state in list(self.segments.values()):
            for entry in list(state.entries.values()):
                due = [mb for mb in entry.left if self.retry_at.get(mb, 0.0) <= now]
                if not due:
                    continue
                if entry.message is None:
                    if budget <= 0:
                        continue
                    try:
                        entry.message = self.log.read_record(state.segment, entry.lsn)
                    except (OSError, ValueError) as e:
                        log.error("%s: cannot read its queue record again: %s", entry.queue_id, e)
                        continue
                    budget -= len(entry.message.content)
                yield state, entry, [Copy(entry.message, entry.left[mailbox], mailbox)
                                     for mailbox in due]

    def _hand_over(self, mailbox: str, items: list[tuple[SegmentState, Entry, Copy]]) -> None:
        """A mailbox's copies, in one go (the mbox sink: one lock, one append)."""
        try:
            outcomes = self.sink.deliver(mailbox, [copy for _, _, copy in items])
        except Abandoned:
            return
        released: list[tuple[int, int, str]] = []
        for (state, entry, copy), outcome in zip(items, outcomes):
            self._settle_copy(state, entry, copy, outcome, released)
        if released:
            self._release(released)

    def _hand_over_messages(self, due: Iterator[tuple[SegmentState, Entry, list[Copy]]]) -> None:
        """Message by message, every due copy of each in one go (LMTP: one
        transaction; the sink runs a few at once); each message's copies leave the
        queue as soon as it is settled, to keep the window in which a crash hands a
        copy over twice as short as it can be."""
        ends = time.monotonic() + MESSAGE_ROUND_S
        Key = tuple[SegmentState, Entry, list[Copy]]

        def messages() -> Iterator[tuple[Key, list[Copy]]]:
            for state, entry, copies in due:
                now = time.monotonic()
                if self._quitting or now > ends or now < self.unreachable_until or \
                        (self._stop_by is not None and now > self._stop_by):
                    return
                # (A mailbox deferred by an earlier message of this round is left out
                # by _copies_due, which reads retry_at as it goes.)
                yield (state, entry, copies), copies

        def settle(key: Key, outcomes: list[Outcome]) -> None:
            state, entry, copies = key
            released: list[tuple[int, int, str]] = []
            for copy, outcome in zip(copies, outcomes):
                self._settle_copy(state, entry, copy, outcome, released)
            if released:
                self._release(released)
            entry.message = None

        try:
            self.sink.deliver_messages(messages(), settle)   # type: ignore[attr-defined]
        except Abandoned:
            pass

    def _settle_copy(self, state: SegmentState, entry: Entry, copy: Copy, outcome: Outcome,
                     released: list[tuple[int, int, str]]) -> None:
        """Act on what the sink said about one copy."""
        mailbox = copy.mailbox
        key = (entry.queue_id, mailbox)
        now = time.monotonic()
        if outcome.kind == FAILED:
            try:
                name = failed.save(self.config.spool_dir, copy.message,
                                   Recipient(copy.recipient, mailbox), outcome.reason, self.relay)
            except (OSError, ValueError) as e:
                outcome = deferred(f"{outcome.reason}; cannot keep it in failed/: "
                                   f"{getattr(e, 'strerror', None) or e}", ERROR_RETRY_S)
            else:
                self._answered()
                self.copy_errors.pop(key, None)
                self._log_copy(entry, entry.left.pop(mailbox), "failed",
                               f"{outcome.reason}; kept in failed/{name}, not returned to the sender")
                entry.unsynced.add(mailbox)
                released.append((state.segment.base, entry.lsn, mailbox))
                return
        if outcome.kind == DELIVERED:
            self._answered()
            self.delivered += 1
            self._back_delivered += 1
            self.copy_errors.pop(key, None)
            self._log_copy(entry, entry.left.pop(mailbox), "sent",
                           outcome.reason or f"delivered to mailbox {mailbox}")
            entry.unsynced.add(mailbox)
            durable = self.sink.durable_on_delivery
            if not durable and not self._unsynced:
                self._unsynced_since = now
            (released if durable else self._unsynced).append((state.segment.base, entry.lsn, mailbox))
            self.retry_at.pop(mailbox, None)
        elif outcome.destination:
            self._unreachable(outcome, now)
        else:
            self._answered()
            known = self.copy_errors.get(key)
            if known is None or known.error != outcome.reason:
                self._log_copy(entry, copy.recipient, "deferred", outcome.reason)
            wall = time.time()
            self.copy_errors[key] = CopyError(outcome.reason, known.since if known else wall,
                                              (known.attempts if known else 0) + 1,
                                              wall + outcome.retry_after_s)
            self.retry_at[mailbox] = now + outcome.retry_after_s

    # --- an unreachable destination, and what the tools see --------------------------

    def _unreachable(self, outcome: Outcome, now: float) -> None:
        if now < self.unreachable_until:
            return                        # another copy of the same attempt
        self.unreachable_until = now + outcome.retry_after_s
        self._unreachable_next = time.time() + outcome.retry_after_s
        self.unreachable_error = outcome.reason
        self.unreachable_attempts += 1
        if self.unreachable_since is None:
            self.unreachable_since = time.time()
            self._back_at = 0.0
            self._report_at = now + QUEUE_REPORT_S
            self._reported_messages = self.queued_messages()
            log.warning("%s unreachable: %s; mail stays queued (%d messages) and is retried "
                        "1 s, then up to 30 s apart", self.relay, outcome.reason,
                        self._reported_messages)

    def _answered(self) -> None:
        """The destination answered (whatever it said): it is reachable."""
        if self.unreachable_since is None:
            return
        down_s = time.time() - self.unreachable_since
        log.info("%s reachable again after %.1f s (%d attempts): delivering %d queued "
                 "messages", self.relay, down_s, self.unreachable_attempts,
                 self.queued_messages())
        self.unreachable_since = None
        self.unreachable_until = 0.0
        self.unreachable_error = ""
        self.unreachable_attempts = 0
        self._back_at = time.monotonic()
        self._back_delivered = 0

    def flush_requested(self) -> None:
        """ccsmtp-queue asked: every deferred copy is due now, whatever its delay."""
        waiting = len(self.retry_at) + (1 if self.unreachable_until else 0)
        log.info("flush requested: retrying %s now", "every deferred copy" if waiting
                 else "(nothing was deferred)")
        self.retry_at.clear()
        self.unreachable_until = 0.0
        self._done_rescan_at = 0.0     # and look for the queue tool's removals

    def queued_messages(self) -> int:
        return sum(len(state.entries) for state in self.segments.values())

    def report(self, pending: int) -> None:
        """The log line of a growing queue, and delivery.state, when they are due."""
        now = time.monotonic()
        if self.unreachable_since is not None and now >= self._report_at:
            down_s = time.time() - self.unreachable_since
            messages = self.queued_messages()
            oldest = self._oldest()
            log.warning("queue %s: %d messages (%d copies) waiting, the oldest for %.0f s; "
                        "%s unreachable for %.0f s (%d attempts, next in %.0f s): %s",
                        "growing" if messages > self._reported_messages else "waiting",
                        messages, self._copies_left(), time.time() - oldest if oldest else 0.0,
                        self.relay, down_s, self.unreachable_attempts,
                        max(0.0, self.unreachable_until - now), self.unreachable_error)
            self._reported_messages = messages
            slow = down_s > QUEUE_REPORT_SLOW_AFTER_S
            self._report_at = now + (QUEUE_REPORT_SLOW_S if slow else QUEUE_REPORT_S)
        if self._back_at and not pending:
            log.info("queue drained: %d copies delivered in %.1f s since %s answered again",
                     self._back_delivered, now - self._back_at, self.relay)
            self._back_at = 0.0
        if now - self._state_at >= STATE_INTERVAL_S:
            self._state_at = now
            self._write_state()

    def _oldest(self) -> float | None:
        firsts = [next(iter(state.entries.values())).received_at
                  for state in self.segments.values() if state.entries]
        return min(firsts) if firsts else None

    def _copies_left(self) -> int:
        return sum(len(entry.left) for state in self.segments.values()
                   for entry in state.entries.values())

    def _write_state(self) -> None:
        deferred_copies: dict[str, dict[str, dict]] = {}
        for (queue_id, mailbox), error in list(self.copy_errors.items())[:delivery_state.MAX_DEFERRED]:
            deferred_copies.setdefault(queue_id, {})[mailbox] = dataclasses.asdict(error)
        unreachable = None
        if self.unreachable_since is not None:
            unreachable = {"since": self.unreachable_since, "error": self.unreachable_error,
                           "attempts": self.unreachable_attempts,
                           "next_attempt": self._unreachable_next if self.unreachable_until
                           else time.time()}
        state = {"pid": os.getpid(), "destination": self.relay if self.relay != "local"
                 else str(self.config.delivery), "messages": self.queued_messages(),
                 "copies": self._copies_left(), "oldest": self._oldest(),
                 "unreachable": unreachable, "deferred": deferred_copies}
        if state == self._state_written:
            return
        try:
            delivery_state.write(self.config.spool_dir, {**state, "updated": time.time()})
        except OSError as e:
            log.warning("cannot write %s: %s", "delivery.state", e)
            return
        self._state_written = state

    # --- durability and clean-up ----------------------------------------------------

    def settle(self, force: bool = False) -> None:
        """Copies handed over leave the queue once a flush covered them: one a worker
        made (asked for through the log), or ours when the log is quiet or FORCE."""
        if self._unsynced:
            now = time.monotonic()
            if not self._sync_wanted:
                # A syncfs writes back every dirty page of the file system: on a real
                # disk it costs more than a commit's fdatasync, so one carries the
                # appends of SYNC_BATCH_S rather than every commit being one.
                if not force and now - self._unsynced_since < SYNC_BATCH_S:
                    self._free_segments()
                    return
                self._sync_wanted = self.log.request_full_sync()
                self._sync_asked_at = now
            if not self.log.full_synced(self._sync_wanted):
                if not force and now - self._sync_asked_at < FULL_SYNC_WAIT_S:
                    return
                try:
                    self.log.full_sync_now()
                except queue.QueueError as e:
                    log.error("cannot flush the mailboxes: %s; retrying", e)
                    self._sync_asked_at = now
                    return
            batch, self._unsynced, self._sync_wanted = self._unsynced, [], 0
            self._release(batch)
        self._free_segments()

    def _release(self, copies: list[tuple[int, int, str]]) -> None:
        by_segment: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
        for base, lsn, mailbox in copies:
            by_segment[base].append((lsn, mailbox))
        for base, items in by_segment.items():
            state = self.segments.get(base)
            if state is None:
                continue
            done = []
            for lsn, mailbox in items:
                entry = state.entries.get(lsn)
                if entry is None:
                    continue
                entry.unsynced.discard(mailbox)
                done.append((entry.queue_id, mailbox))
            try:
                queue.mark_done(self.config.spool_dir, base, done)
            except OSError as e:
                log.warning("cannot record delivered copies: %s", e)   # looked for again at start
            for lsn, _ in items:
                entry = state.entries.get(lsn)
                if entry is not None and entry.finished:
                    self._finish(state, entry)

    def _finish(self, state: SegmentState, entry: Entry) -> None:
        state.entries.pop(entry.lsn, None)
        if entry.external:
            unlink_quietly(queue.data_path(self.config.spool_dir, entry.queue_id))

    def _free_segments(self) -> None:
        current = self.log.current_base()
        for base, state in list(self.segments.items()):
            if state.read_all and not state.entries and base != current \
                    and self.log.synced >= state.segment.limit:
                self.log.free(state.segment)
                self.log.forget(state.segment.seg_id)
                del self.segments[base]

    def _log_copy(self, entry: Entry, recipient: str, status: str, detail: str) -> None:
        delay = max(0.0, time.time() - entry.received_at)
        log.info("%s: to=<%s>, relay=%s, delay=%.2f, status=%s (%s)",
                 entry.queue_id, recipient, self.relay, delay, status, detail)

    def close(self) -> None:
        self.sink.close()
        self.log.close()
