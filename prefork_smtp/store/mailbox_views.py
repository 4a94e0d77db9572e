"""The sessions' views of a mailbox: what one IMAP session or one POP3 session sees of a
mailstore.Mailbox, which the sessions of a process share.

Owns: ImapView, an IMAP session's sequence numbers (a list of UIDs) and the flags it has
told its client, and what changed since (Changes: expunges, new messages, flags set by
others, a lost UIDVALIDITY); Pop3Maildrop, a POP3 session's maildrop (RFC 1939): the
messages there at login, numbered 1..n, with sizes and UIDLs, deletions applied at
commit, one POP3 session per mailbox across all processes (an OFD lock, released if its
holder dies). Blocking, synchronous calls: sessions call them from a worker thread, never
from the event loop. Each view is used by one session (thread) at a time.
Must not: change the mailbox or its index except through Mailbox (flags, expunge); speak
POP3 or IMAP. The views read the Mailbox's columns and records under its lock
(Mailbox._lock, _column, _records), for one consistent picture without copying them.
Fails with MailboxInUse (another POP3 session has the mailbox) and what Mailbox raises:
MailboxBusy, MessageGone, MailboxChanged (for a view, its UIDVALIDITY is gone: the
session must end), MailboxError, OSError.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import os
from typing import Iterable, Iterator

from ..layout import mailbox_path
from . import mailbox_index, mbox_scan
from .mailstore import MessageInfo, open_mailbox
from .mbox_scan import DATE, FIELDS, FLAGS, LINES, SIZE, UID, MailboxError

__all__ = ["ImapView", "Pop3Maildrop", "Changes", "MailboxInUse"]


class MailboxInUse(MailboxError):
    """Another POP3 session has this mailbox (RFC 2449 [IN-USE])."""


@dataclasses.dataclass(slots=True)
class Changes:
    """What an IMAP session must tell its client after ImapView.refresh()."""
    expunged: list[int]                 # sequence numbers, in the order to send EXPUNGE
    exists: int                         # messages in the view now
    new_uids: list[int]                 # appended to the view
    flags: list[tuple[int, int, frozenset[str]]]   # (seq, uid, flags) changed by others
    lost: bool = False                  # UIDVALIDITY changed: the session must end

    def __bool__(self) -> bool:
        return bool(self.expunged or self.new_uids or self.flags or self.lost)


class ImapView:
    """One IMAP session's view of a mailbox: its sequence numbers (a list of UIDs)
    and the flags it has told its client. refresh() says what changed since.
    Used by one session (thread) at a time; the Mailbox under it is shared."""

    def __init__(self, spool_dir: str, name: str):
        self.mailbox = open_mailbox(spool_dir, name)
        with self.mailbox._lock:
            self.uidvalidity, self._generation, self._changes = self.mailbox.stamp()
            self.uids = self.mailbox.column(UID)
            self._flags = self.mailbox.column(FLAGS)
        self._gone: set[int] = set()

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def uidnext(self) -> int:
        return self.mailbox.uidnext

    def uid(self, seq: int) -> int:
        return self.uids[seq - 1]

    def seq(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def flags(self, seq: int) -> frozenset[str]:
        """The flags as this session last saw them."""
        return self.mailbox.flag_names(self._flags[seq - 1])

    def messages(self) -> list[MessageInfo]:
        """Every message of the view, with the flags the session knows; messages
        expunged by others but not yet reported come with size 0."""
        box = self.mailbox
        with box._lock:
            uid_col = box._column(UID)
            r = box._records
            out = []
            aligned = uid_col == self.uids
            for k, uid in enumerate(self.uids):
                i = k if aligned else bisect.bisect_left(uid_col, uid)
                names = box.flag_names(self._flags[k])
                if i < len(uid_col) and uid_col[i] == uid:
                    b = i * FIELDS
                    out.append(MessageInfo(uid, r[b + SIZE], r[b + LINES], r[b + DATE], names))
                else:
                    out.append(MessageInfo(uid, 0, 0, 0, names))
            return out

    def refresh(self, *, allow_expunge: bool = True) -> Changes:
        """Catch up. Without allow_expunge (during FETCH, STORE, SEARCH; RFC 3501
        §7.4.1) expunged messages stay in the view until a later refresh."""
        box = self.mailbox
        box.refresh()
        with box._lock:
            uidvalidity, generation, changes = box.stamp()
            if uidvalidity != self.uidvalidity:
                return Changes([], self.exists, [], [], lost=True)
            if (generation, changes) == (self._generation, self._changes) and \
                    not (self._gone and allow_expunge):
                return Changes([], self.exists, [], [])
            uid_col, flag_col = box._column(UID), box._column(FLAGS)
            if generation != self._generation:
                present = set(uid_col)
                self._gone.update(u for u in self.uids if u not in present)
            expunged = self._drop_gone() if allow_expunge and self._gone else []
            top = self.uids[-1] if self.uids else 0
            k = bisect.bisect_right(uid_col, top)
            new_uids = uid_col[k:].tolist()
            self.uids.extend(uid_col[k:])
            self._flags.extend(flag_col[k:])
            changed = self._changed_flags(uid_col, flag_col, len(self.uids) - len(new_uids))
            self._generation, self._changes = generation, changes
            return Changes(expunged, self.exists, new_uids, changed)

    def _drop_gone(self) -> list[int]:
        gone = self._gone
        seqs = [k + 1 for k, uid in enumerate(self.uids) if uid in gone]
        keep = [k for k, uid in enumerate(self.uids) if uid not in gone]
        self.uids = array.array("Q", [self.uids[k] for k in keep])
        self._flags = array.array("Q", [self._flags[k] for k in keep])
        self._gone = set()
        return seqs[::-1]      # highest first: each EXPUNGE leaves the others' numbers alone

    def _changed_flags(self, uid_col: array.array, flag_col: array.array,
                       known: int) -> list[tuple[int, int, frozenset[str]]]:
        """(seq, uid, flags) whose flags differ from what the session saw, among its
        first `known` messages; updates what it saw."""
        box = self.mailbox
        if not self._gone and uid_col[:known] == self.uids[:known]:
            positions = _differences(self._flags, flag_col, known)
            pairs = [(k, k) for k in positions]
        else:
            pairs = []
            for k in range(known):
                i = bisect.bisect_left(uid_col, self.uids[k])
                if i < len(uid_col) and uid_col[i] == self.uids[k] and flag_col[i] != self._flags[k]:
                    pairs.append((k, i))
        out = []
        for k, i in pairs:
            self._flags[k] = flag_col[i]
            out.append((k + 1, self.uids[k], box.flag_names(flag_col[i])))
        return out

    def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str) -> dict[int, frozenset[str]]:
        """Mailbox.store_flags; the session's own changes are not reported back to it
        by refresh()."""
        result = self.mailbox.store_flags(uids, flags, mode, uidvalidity=self.uidvalidity)
        with self.mailbox._lock:
            uid_col, flag_col = self.mailbox._column(UID), self.mailbox._column(FLAGS)
            for uid in result:
                seq = self.seq(uid)
                i = bisect.bisect_left(uid_col, uid)
                if seq is not None and i < len(uid_col) and uid_col[i] == uid:
                    self._flags[seq - 1] = flag_col[i]
        return result

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Remove those of these messages that are flagged \\Deleted; their EXPUNGE
        responses come from the next refresh()."""
        return self.mailbox.expunge(uids, only_deleted=True, uidvalidity=self.uidvalidity)

    def iter_content(self, uid: int, piece_bytes: int = mbox_scan.PIECE_BYTES) -> Iterator[bytes]:
        return self.mailbox.iter_content(uid, piece_bytes, uidvalidity=self.uidvalidity)

    def content(self, uid: int) -> bytes:
        return self.mailbox.content(uid, uidvalidity=self.uidvalidity)


class Pop3Maildrop:
    """A POP3 session's maildrop (RFC 1939): the messages there at login, numbered
    1..n, with sizes and UIDLs; deletions are applied by commit() only. One per
    mailbox across all processes (an OFD lock, released if the holder dies).
    Used by one session (thread) at a time."""

    def __init__(self, spool_dir: str, name: str):
        mailbox_path(spool_dir, name)      # a safe name, or ValueError
        paths = mailbox_index.Paths(spool_dir, name)
        self._lock_fd = mailbox_index.try_pop3_lock(paths)
        if self._lock_fd is None:
            raise MailboxInUse("another POP3 session has this mailbox")
        try:
            self.mailbox = open_mailbox(spool_dir, name)
            with self.mailbox._lock:
                self.uidvalidity = self.mailbox.uidvalidity
                self.uids = self.mailbox.column(UID)
                self.sizes = self.mailbox.column(SIZE)
        except BaseException:
            self.close()
            raise

    @property
    def count(self) -> int:
        return len(self.uids)

    @property
    def total_size(self) -> int:
        return sum(self.sizes)

    def size(self, number: int) -> int:
        return self.sizes[self._index(number)]

    def uidl(self, number: int) -> str:
        """RFC 1939 §7: 1-70 characters of 0x21-0x7E, never reused in this mailbox."""
        return f"{self.uidvalidity}.{self.uids[self._index(number)]}"

    def iter_content(self, number: int, piece_bytes: int = mbox_scan.PIECE_BYTES) -> Iterator[bytes]:
        return self.mailbox.iter_content(self.uids[self._index(number)], piece_bytes,
                                         uidvalidity=self.uidvalidity)

    def top(self, number: int, body_lines: int) -> bytes:
        return self.mailbox.top(self.uids[self._index(number)], body_lines,
                                uidvalidity=self.uidvalidity)

    def commit(self, deleted: Iterable[int]) -> list[int]:
        """Remove the messages with these numbers (QUIT in the UPDATE state);
        returns the UIDs removed (those expunged meanwhile by IMAP are not)."""
        return self.mailbox.expunge([self.uids[self._index(n)] for n in deleted], only_deleted=False,
                                    uidvalidity=self.uidvalidity)

    def _index(self, number: int) -> int:
        if not 1 <= number <= len(self.uids):
            raise IndexError(f"no message {number}")
        return number - 1

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Pop3Maildrop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- helpers ----------------------------------------------------------------------------

def _differences(mine: array.array, theirs: array.array, n: int) -> list[int]:
    """Positions below n where the two arrays differ (compared in blocks, in C)."""
    if mine[:n] == theirs[:n]:
        return []
    out = []
    block = 256
    for s in range(0, n, block):
        e = min(n, s + block)
        if mine[s:e] != theirs[s:e]:
            out.extend(k for k in range(s, e) if mine[k] != theirs[k])
    return out
