"""Mailbox access for POP3 and IMAP: messages of SPOOL/NAME with lasting UIDs, flags
and safe expunges, for several sessions in several processes at once.

Owns: the Mailbox each process shares among its sessions (open_mailbox): keeping a
mailbox's index (mailbox_index.py) in step with its mbox file while delivery, mutt,
procmail or Dovecot change it; flag changes; removing messages. The sessions' views
of it (ImapView, Pop3Maildrop) are in mailbox_views.py. Blocking, synchronous calls:
sessions call them from a worker thread, never from the event loop.
Must not: speak POP3 or IMAP, write outside SPOOL, hold an mbox lock while idle.
Fails with MailboxBusy (a lock is held, or an interrupted delivery awaits repair:
try again shortly), MessageGone (expunged meanwhile), MailboxChanged (another
program rewrote the file under a reader), or OSError.

Identity. Each message has a UID, strictly ascending in file order, never reused
(RFC 3501 §2.3.1.1); UIDVALIDITY changes only when the index is lost (deleted or
corrupt), and never takes the same value twice (mailbox_index.allocate_uidvalidity).
A message is known by a fingerprint of its content less the state headers (see
mbox_scan), so mutt's Status:/Content-Length:/Lines: rewrites and Dovecot's
X-UID:/X-IMAPbase: headers do not change it. Opening or refreshing compares the
mbox with the index: same file, not shorter, "\\nFrom " where the indexed messages
end and the From_ lines of SAMPLES records where they were: only appended to, so
only the new bytes are scanned. Otherwise the file is scanned again and reconciled:
messages keep the UID and flags of the indexed message with the same fingerprint
(identical messages in order), as long as UIDs stay ascending; the others get new
UIDs. mutt's rewrites keep flags we hold; flags that other programs write are read
only for messages seen for the first time.

Durability. Index files that replace others are fsync'ed before the rename; new
UIDs written in place are fsync'ed once the mbox lock is released. Flag changes
are not fsync'ed: a machine crash may lose the last ones (not a process crash).

Locks. Scanning new bytes takes a shared OFD lock on the mbox (non-blocking: busy
means try at the next refresh), and stops at a delivery.journal entry for the
mailbox (an append in progress or cut short by kill -9: delivery cuts it back).
Index writes are serialised by an OFD lock (mailbox_index.WriterLock). Nothing is
locked between calls. A refresh() sees other processes' changes: one stat() of the
index and of the mbox, and one pread of the index header.

Expunge (POP3 QUIT, IMAP EXPUNGE/CLOSE), under the writers' lock: take the mbox's
dot-lock and OFD write lock (as delivery and mutt do); refuse while the journal
names the mailbox; index anything appended; copy the preamble and the kept
messages, byte for byte, to SPOOL/.ccsmtp/mailstore/NAME/mbox.new; fsync; give it
the old file's mode, owner and group; write and fsync index.new; then

    rename(mbox.new, SPOOL/NAME); fsync(SPOOL)        <- the mailbox is now the new set
    rename(index.new, index); fsync(index directory)

A process killed before the first rename leaves the old mailbox and index (and
scratch files the next expunge removes). Killed between the two renames, it leaves
the new mailbox with the old index: the next open sees another file and reconciles
by fingerprint, so kept messages keep their UIDs and flags, the removed ones are
gone and uidnext does not go back. Either way the mailbox holds the old or the new
set of messages, each byte for byte; a dot-lock left behind names a dead pid and is
broken by the next taker.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import dataclasses
import errno
import logging
import os
import stat
import threading
import time
import weakref
from typing import Iterable, Iterator

from ..layout import mailbox_path
from . import mailbox_index, mbox, mbox_scan
from .fsutil import fsync_dir, is_still_at, lock_ofd, unlink_quietly
from .mailbox_index import Header, IndexCorrupt
from .mbox_scan import (DATE, DELETED, FIELDS, FLAGS, FP, KEYWORD_SHIFT, LAYOUT, LENGTH, LINES,
                        OFFSET, SIZE, UID, MailboxChanged, MailboxError)

log = logging.getLogger("ccsmtp.mailstore")

LOCK_WAIT_S = 2.0          # an open or an expunge waits this long for a busy mbox lock
LOCK_POLL_S = 0.005
SAMPLES = 16               # From_ lines checked to tell "appended to" from "rewritten"
PRESCAN_BYTES = 1 << 20    # scan bigger files without the lock first, then the rest with it

SYSTEM_FLAGS = {"\\seen": ("\\Seen", 1), "\\answered": ("\\Answered", 2),
                "\\flagged": ("\\Flagged", 4), "\\deleted": ("\\Deleted", 8),
                "\\draft": ("\\Draft", 16)}
MAX_KEYWORDS = mailbox_index.MAX_KEYWORDS
_EMPTY_KEY = (0, 0, 0, 0)

__all__ = ["Mailbox", "MessageInfo", "open_mailbox",
           "MailboxError", "MailboxBusy", "MessageGone", "MailboxChanged"]


class MailboxBusy(MailboxError):
    """A lock is held or a delivery awaits repair: a temporary failure."""


class MessageGone(MailboxError):
    """The message was expunged."""


@dataclasses.dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: int
    size: int             # octets of the visible form (CRLF line ends)
    lines: int            # lines of the visible form
    internaldate: int     # seconds since the epoch, UTC
    flags: frozenset[str]


# --- one mailbox, shared by the sessions of a process -----------------------------------

_registry: "weakref.WeakValueDictionary[tuple[str, str], Mailbox]" = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def open_mailbox(spool_dir: str, name: str) -> "Mailbox":
    """The process's Mailbox object for SPOOL/name (one per mailbox, thread-safe),
    in step with the file (waits up to LOCK_WAIT_S for a busy lock)."""
    key = (os.path.abspath(spool_dir), name)
    with _registry_lock:
        box = _registry.get(key)
        if box is None:
            box = Mailbox(spool_dir, name)
            _registry[key] = box
    box.refresh(wait=True)
    return box


class _MboxFile:
    """A read-only descriptor of one mbox inode; closed when the last user drops it
    (a stream keeps the file it started on, even if an expunge replaces it)."""

    __slots__ = ("fd", "key")

    def __init__(self, fd: int):
        self.fd = fd
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class Mailbox:
    """One mailbox's messages: an in-memory copy of its index (compact arrays, one
    record of FIELDS numbers per message), refreshed from the files on demand.
    Thread-safe; one object per mailbox per process (open_mailbox)."""

    def __init__(self, spool_dir: str, name: str):
        self.spool_dir = spool_dir
        self.name = name
        self.path = mailbox_path(spool_dir, name)
        self.paths = mailbox_index.Paths(spool_dir, name)
        self._lock = threading.RLock()
        self._header = Header(uidvalidity=0)
        self._records = array.array("Q")
        self._columns: dict[int, array.array] = {}
        self._index_fd = -1
        self._index_key: tuple[int, int] | None = None
        self._checked: tuple[int, int, int, int] | None = None
        self._suspect = False
        self._mbox: _MboxFile | None = None
        self._flag_cache: dict[int, frozenset[str]] = {}

    def __del__(self) -> None:
        if self._index_fd >= 0:
            os.close(self._index_fd)

    # --- state -----------------------------------------------------------------------

    @property
    def uidvalidity(self) -> int:
        return self._header.uidvalidity

    @property
    def uidnext(self) -> int:
        return self._header.uidnext

    @property
    def count(self) -> int:
        return len(self._records) // FIELDS

    @property
    def keywords(self) -> tuple[str, ...]:
        return self._header.keywords

    def stamp(self) -> tuple[int, int, int]:
        """(uidvalidity, generation, changes): changes when anything does;
        generation when messages may have been removed."""
        with self._lock:
            h = self._header
            return h.uidvalidity, h.generation, h.changes

    def column(self, field: int) -> array.array:
        """One field of every record, in order (e.g. mbox_scan.UID): a fresh array
        the caller may keep; cheap (a strided copy in C)."""
        with self._lock:
            return array.array("Q", self._column(field))

    def _column(self, field: int) -> array.array:
        col = self._columns.get(field)
        if col is None:
            col = self._columns[field] = self._records[field::FIELDS]
        return col

    def refresh(self, *, wait: bool = False) -> None:
        """Catch up with other processes' changes and with the mbox file. Cheap when
        nothing changed. A busy mbox lock is waited for only with wait (up to
        LOCK_WAIT_S, then MailboxBusy); otherwise the next refresh tries again."""
        with self._lock:
            have = self._load_index()
            key = self._mbox_key()
            if have and not self._suspect and (key == self._header.mbox_key() or key == self._checked):
                return
            self._sync(wait=wait, full=self._suspect)

    def listing(self) -> dict[str, array.array]:
        """Columns for every message: uid, flags (bits), size, lines, internaldate."""
        with self._lock:
            return {"uid": self.column(UID), "flags": self.column(FLAGS), "size": self.column(SIZE),
                    "lines": self.column(LINES), "internaldate": self.column(DATE)}

    def position(self, uid: int) -> int:
        """Index of the message with this UID (0-based, in file order)."""
        with self._lock:
            uids = self._column(UID)
            i = bisect.bisect_left(uids, uid)
            if i == len(uids) or uids[i] != uid:
                raise MessageGone(f"no message with UID {uid}")
            return i

    def info(self, uid: int) -> MessageInfo:
        with self._lock:
            i = self.position(uid) * FIELDS
            r = self._records
            return MessageInfo(uid, r[i + SIZE], r[i + LINES], r[i + DATE],
                               self.flag_names(r[i + FLAGS]))

    def flag_names(self, bits: int) -> frozenset[str]:
        names = self._flag_cache.get(bits)
        if names is None:
            found = [name for name, bit in SYSTEM_FLAGS.values() if bits & bit]
            found += [k for n, k in enumerate(self._header.keywords)
                      if bits & (1 << (KEYWORD_SHIFT + n))]
            names = self._flag_cache[bits] = frozenset(found)
        return names

    # --- reading messages --------------------------------------------------------------

    # Methods taking a UID also take the UIDVALIDITY the caller knows it under: if
    # the index was lost and rebuilt meanwhile, the UID may name another message,
    # and MailboxChanged is raised instead (the session must end).

    def iter_content(self, uid: int, piece_bytes: int = mbox_scan.PIECE_BYTES, *,
                     uidvalidity: int | None = None) -> Iterator[bytes]:
        """The visible form of a message in pieces of about piece_bytes. The message is
        checked before the first piece (MessageGone, MailboxChanged); a rewrite by
        another program while it is read raises MailboxChanged at the end, after
        which the caller must not present what it got as the message."""
        file, offset, length, layout, fp = self._locate(uid, uidvalidity)
        return self._stream(file, offset, length, layout, fp, piece_bytes)

    @staticmethod
    def _stream(file: _MboxFile, offset: int, length: int, layout: int, fp: int,
                piece_bytes: int) -> Iterator[bytes]:
        yield from mbox_scan.visible_pieces(file.fd, offset, length, layout, fp, piece_bytes)

    def content(self, uid: int, *, uidvalidity: int | None = None) -> bytes:
        """The whole visible form (for IMAP: bounded by max_size)."""
        for attempt in range(2):
            try:
                return b"".join(self.iter_content(uid, 1 << 20, uidvalidity=uidvalidity))
            except MailboxChanged:
                if attempt:
                    raise
                with self._lock:
                    self._suspect = True
                    self.refresh(wait=True)
        raise AssertionError("unreachable")

    def top(self, uid: int, body_lines: int, *, uidvalidity: int | None = None) -> bytes:
        """POP3 TOP: visible header, blank line, first body_lines body lines."""
        file, offset, length, layout, _ = self._locate(uid, uidvalidity)
        return mbox_scan.visible_top(file.fd, offset, length, layout, max(0, body_lines))

    def _locate(self, uid: int, uidvalidity: int | None) -> tuple[_MboxFile, int, int, int, int]:
        for attempt in range(2):
            with self._lock:
                self._check_uidvalidity(uidvalidity)
                i = self.position(uid) * FIELDS
                r = self._records
                offset, length, layout, fp = r[i + OFFSET], r[i + LENGTH], r[i + LAYOUT], r[i + FP]
                file = self._mbox_file()
            if file is not None and mbox_scan.check_from_line(file.fd, offset, layout):
                return file, offset, length, layout, fp
            if attempt == 0:
                with self._lock:
                    self._suspect = True
                    self.refresh(wait=True)
        raise MailboxChanged("the mailbox was changed by another program")

    def _check_uidvalidity(self, uidvalidity: int | None) -> None:
        if uidvalidity is not None and uidvalidity != self._header.uidvalidity:
            raise MailboxChanged("UIDVALIDITY changed: the index was lost")

    def _mbox_file(self) -> _MboxFile | None:
        """The open mbox inode the in-memory index describes."""
        want = (self._header.mbox_dev, self._header.mbox_ino)
        if self._mbox is not None and self._mbox.key == want:
            return self._mbox
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        file = _MboxFile(fd)
        if file.key != want:
            return None
        self._mbox = file
        return file

    # --- flags -------------------------------------------------------------------------

    def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str, *,
                    uidvalidity: int | None = None) -> dict[int, frozenset[str]]:
        """Add, remove or replace flags (mode "add", "remove", "replace") of the
        messages with these UIDs; returns the new flags of those still there.
        Serialised across processes; others see it at their next refresh().
        ValueError for a flag that cannot be stored (\\Recent, a bad keyword),
        MailboxError when the mailbox has MAX_KEYWORDS keywords already."""
        if mode not in ("add", "remove", "replace"):
            raise ValueError(f"bad mode {mode!r}")
        names = list(flags)
        wanted = sorted(set(uids))
        with self._writing():
            if not self._load_index(strict=True):
                raise MailboxChanged("the mailbox's index is gone")
            self._check_uidvalidity(uidvalidity)
            h, r = self._header, self._records
            keywords = h.keywords
            bits = self._flag_bits(names, create=mode != "remove")
            uid_col = self._column(UID)
            changed: list[int] = []
            out: dict[int, frozenset[str]] = {}
            for uid in wanted:
                i = bisect.bisect_left(uid_col, uid)
                if i == len(uid_col) or uid_col[i] != uid:
                    continue
                old = r[i * FIELDS + FLAGS]
                new = old | bits if mode == "add" else old & ~bits if mode == "remove" else bits
                if new != old:
                    r[i * FIELDS + FLAGS] = new
                    changed.append(i)
                out[uid] = self.flag_names(new)
            if changed or h.keywords != keywords:
                for lo, hi in _runs(changed):
                    mailbox_index.write_records(self._index_fd, r, lo, hi)
                h.changes += 1
                mailbox_index.write_header(self._index_fd, h)
                self._columns.pop(FLAGS, None)
            return out

    def _flag_bits(self, names: list[str], create: bool) -> int:
        bits = 0
        h = self._header
        for name in names:
            system = SYSTEM_FLAGS.get(name.lower())
            if system is not None:
                bits |= system[1]
                continue
            if name.startswith("\\"):
                raise ValueError(f"{name} cannot be stored")
            lowered = [k.lower() for k in h.keywords]
            if name.lower() in lowered:
                bits |= 1 << (KEYWORD_SHIFT + lowered.index(name.lower()))
            elif create:
                if len(h.keywords) >= MAX_KEYWORDS:
                    raise MailboxError("too many keywords in this mailbox")
                if not name or len(name.encode()) > mailbox_index.KEYWORD_BYTES or not name.isascii():
                    raise ValueError(f"bad keyword {name!r}")
                h.keywords = h.keywords + (name,)
                self._flag_cache.clear()
                bits |= 1 << (KEYWORD_SHIFT + len(h.keywords) - 1)
        return bits

    # --- expunge -----------------------------------------------------------------------

    def expunge(self, uids: Iterable[int], *, only_deleted: bool = True,
                uidvalidity: int | None = None) -> list[int]:
        """Remove the messages with these UIDs (with only_deleted, those of them
        flagged \\Deleted now). Returns the UIDs removed. Safe against kill -9 at any
        instant and against delivery, mutt and Dovecot (module docstring)."""
        wanted = set(uids)
        if not wanted:
            return []
        with self._writing():
            mailbox_index.remove_scratch(self.paths)
            have = self._load_index(strict=True)
            if not have and uidvalidity is not None:
                raise MailboxChanged("the mailbox's index is gone")
            self._check_uidvalidity(uidvalidity)
            dotlock = self.path + ".lock"
            _wait_for(lambda: _try_dotlock(dotlock), "dot-lock held")
            try:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = None
                try:
                    if fd is not None:
                        _wait_for(lambda: _try_lock(fd, shared=False), "fcntl lock held")
                        if not is_still_at(fd, self.path):
                            raise MailboxBusy("the mailbox was replaced while waiting for it")
                    if self._journal_limit(1 << 62) is not None:
                        raise MailboxBusy("an interrupted delivery to this mailbox awaits repair")
                    if self._update_locked(fd, have, full=False, prescan=None):
                        os.fsync(self._index_fd)
                    r = self._records
                    remove = [i for i, uid in enumerate(self._column(UID))
                              if uid in wanted and (not only_deleted or r[i * FIELDS + FLAGS] & DELETED)]
                    if not remove or fd is None:
                        return []
                    removed = [r[i * FIELDS + UID] for i in remove]
                    self._rewrite(fd, set(remove))
                    return removed
                finally:
                    if fd is not None:
                        os.close(fd)
            finally:
                unlink_quietly(dotlock)

    def _rewrite(self, fd: int, remove: set[int]) -> None:
        """Write the mailbox without the records at the positions in remove, then its
        index: the two renames of the module docstring. Locks are held."""
        h, old = self._header, self._records
        out = os.open(self.paths.new_mbox, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600)
        try:
            lock_ofd(out, wait=False)    # mutt and Dovecot see the new file locked too
            records = array.array("Q")
            runs = [(0, h.first)]          # the preamble: junk or Dovecot's placeholder
            pos = h.first
            for i in range(len(old) // FIELDS):
                if i in remove:
                    continue
                rec = old[i * FIELDS:(i + 1) * FIELDS]
                if runs[-1][0] + runs[-1][1] == rec[OFFSET]:
                    runs[-1] = (runs[-1][0], runs[-1][1] + rec[LENGTH])
                else:
                    runs.append((rec[OFFSET], rec[LENGTH]))
                rec[OFFSET] = pos
                pos += rec[LENGTH]
                records.extend(rec)
            written = 0
            for offset, length in runs:
                _copy(fd, out, offset, length, written)
                written += length
            _copy_ownership(fd, out)
            os.fsync(out)
            new_header = dataclasses.replace(h, changes=h.changes + 1, generation=h.generation + 1,
                                             end=pos)
            new_header.set_mbox_key(_key(os.fstat(out)))
            mailbox_index.write_new_index(self.paths, new_header, records)
            os.rename(self.paths.new_mbox, self.path)
            fsync_dir(self.spool_dir)
            # Killed here: the new mailbox with the old index (see the docstring).
            mailbox_index.commit_new_index(self.paths)
        except BaseException:
            unlink_quietly(self.paths.new_mbox)
            raise
        finally:
            os.close(out)
        self._load_index(strict=True)
        self._checked = new_header.mbox_key()

    # --- keeping the index in step with the mbox ------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's lock and the writers' lock, for a change to the index. A
        change that fails half-way leaves the in-memory copy to be read afresh."""
        with self._lock, mailbox_index.WriterLock(self.paths):
            try:
                yield
            except BaseException:
                self._index_key = None
                raise

    def _load_index(self, *, strict: bool = False) -> bool:
        """Bring the in-memory copy up to the index file: its records are read again
        only if the file was replaced or its `changes` moved. False if there is no
        usable index. strict, under the writers' lock: a damaged index is one (it
        is rebuilt), not one being written."""
        try:
            st = os.stat(self.paths.index)
            reopened = (st.st_dev, st.st_ino) != self._index_key
            if reopened:
                self._open_index()
            header = mailbox_index.read_header(self._index_fd)
            if reopened or (header.changes, header.count, header.uidvalidity) != \
                    (self._header.changes, self._header.count, self._header.uidvalidity):
                header, records = mailbox_index.read_index(self._index_fd)
                self._set_state(header, records)
            else:
                self._header = header
        except FileNotFoundError:
            return False
        except IndexCorrupt as e:
            self._index_key = None
            if strict:
                log.warning("mailbox %s: index unusable (%s): rebuilding it, new UIDVALIDITY",
                            self.name, e)
            return False
        return True

    def _open_index(self) -> None:
        fd = os.open(self.paths.index, os.O_RDWR | os.O_CLOEXEC)
        if self._index_fd >= 0:
            os.close(self._index_fd)
        self._index_fd = fd
        st = os.fstat(fd)
        self._index_key = (st.st_dev, st.st_ino)

    def _set_state(self, header: Header, records: array.array) -> None:
        if header.keywords != self._header.keywords:
            self._flag_cache.clear()
        self._header, self._records = header, records
        self._columns.clear()

    def _mbox_key(self) -> tuple[int, int, int, int]:
        try:
            return _key(os.stat(self.path))
        except FileNotFoundError:
            return _EMPTY_KEY

    def _sync(self, *, wait: bool, full: bool) -> None:
        with self._writing():
            mailbox_index.remove_scratch(self.paths)
            have = self._load_index(strict=True)
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None
            try:
                prescan = None
                if fd is not None and (full or not have or not self._same_file(fd)):
                    prescan = self._prescan(fd)
                if fd is not None:
                    if wait:
                        _wait_for(lambda: _try_lock(fd, shared=True), "fcntl lock held")
                    elif not _try_lock(fd, shared=True):
                        return       # delivery is appending: the next refresh tries again
                assigned = self._update_locked(fd, have, full=full, prescan=prescan)
            finally:
                if fd is not None:
                    os.close(fd)     # the mbox lock goes before the fsync below
            if assigned:
                # UIDs handed out must survive a machine crash: after one, a message
                # that went meanwhile must not leave its UID to another.
                os.fsync(self._index_fd)

    def _same_file(self, fd: int) -> bool:
        st = os.fstat(fd)
        h = self._header
        return (st.st_dev, st.st_ino) == (h.mbox_dev, h.mbox_ino) and st.st_size >= h.end

    def _update_locked(self, fd: int | None, have: bool, *, full: bool,
                       prescan: tuple[mbox_scan.ScanResult, int, tuple] | None) -> bool:
        """Bring the index up to the mbox. Needs the writers' lock and an mbox lock on
        fd (None: there is no mailbox file). True if new UIDs were written in place
        (not yet fsync'ed)."""
        st = os.fstat(fd) if fd is not None else None
        key = _key(st) if st is not None else _EMPTY_KEY
        size = st.st_size if st is not None else 0
        limit = self._journal_limit(size)
        limit = size if limit is None else limit
        assigned = False
        if have and not full and self._appended_to(fd, st, key, limit):
            assigned = self._index_tail(fd, st, key, limit)
        else:
            self._rebuild(fd, st, key, have, limit, prescan)
        self._checked = key
        self._suspect = False
        return assigned

    def _appended_to(self, fd: int | None, st: os.stat_result | None, key: tuple,
                     limit: int) -> bool:
        h = self._header
        same = st is None or (st.st_dev, st.st_ino) == (h.mbox_dev, h.mbox_ino)
        return same and self._extends(fd, self._records, h.first, h.end, limit,
                                      check=key != h.mbox_key())

    def _index_tail(self, fd: int | None, st: os.stat_result | None, key: tuple,
                    limit: int) -> bool:
        """Index the messages appended since: the next UIDs, in file order. True if
        there were any."""
        h = self._header
        new = array.array("Q")
        if limit > h.end:
            result = mbox_scan.scan(fd, h.end, limit, mtime=st.st_mtime)
            if h.end == 0:
                h.first = result.first
            new = result.records
            for i in range(0, len(new), FIELDS):
                new[i + UID] = h.uidnext
                h.uidnext += 1
            h.end = limit
        if key != h.mbox_key() or new:
            h.set_mbox_key(key)
            h.changes += 1
            mailbox_index.append_records(self._index_fd, h, new)
            self._records.extend(new)
            self._columns.clear()
        return bool(new)

    def _rebuild(self, fd: int | None, st: os.stat_result | None, key: tuple, have: bool,
                 limit: int, prescan: tuple | None) -> None:
        """Scan the whole mbox and reconcile it with the index (module docstring)."""
        result = None
        if prescan is not None:
            result = self._finish_prescan(fd, prescan, key, limit, st.st_mtime)
        if result is None:
            result = (mbox_scan.scan(fd, 0, limit, mtime=st.st_mtime) if fd is not None
                      else mbox_scan.ScanResult(0))
        old = self._header
        if have:
            header = dataclasses.replace(old, changes=old.changes + 1, generation=old.generation + 1)
            records, header.uidnext = reconcile(self._records, result.records, old.uidnext)
        else:
            header = Header(uidvalidity=mailbox_index.allocate_uidvalidity(self.paths))
            records, header.uidnext = reconcile(array.array("Q"), result.records, 1)
        header.set_mbox_key(key)
        header.end, header.first = limit, result.first
        self.paths.make()
        mailbox_index.replace_index(self.paths, header, records)
        if have:
            log.info("mailbox %s was changed by another program: %d messages reconciled",
                     self.name, len(records) // FIELDS)
        self._load_index(strict=True)

    def _prescan(self, fd: int) -> tuple[mbox_scan.ScanResult, int, tuple] | None:
        """Scan most of a big file before taking its lock, so that delivery is not
        held up for the whole scan; the lock holder checks and finishes it."""
        st = os.fstat(fd)
        if st.st_size < PRESCAN_BYTES:
            return None
        try:
            result = mbox_scan.scan(fd, 0, st.st_size, mtime=st.st_mtime)
        except MailboxChanged:
            return None
        return result, st.st_size, _key(st)

    def _finish_prescan(self, fd: int, prescan: tuple, key: tuple, limit: int,
                        mtime: float) -> mbox_scan.ScanResult | None:
        result, scanned_size, scanned_key = prescan
        records = result.records
        # The last message's end was the end of the file then, which need not be a
        # boundary now; messages past the journal's limit are not to be indexed.
        keep = len(records) // FIELDS - 1
        while keep > 0 and records[(keep - 1) * FIELDS + OFFSET] + records[(keep - 1) * FIELDS + LENGTH] > limit:
            keep -= 1
        if keep <= 0:
            return None
        end = records[keep * FIELDS + OFFSET]
        del records[keep * FIELDS:]
        if not self._extends(fd, records, result.first, end, limit, check=key != scanned_key):
            return None
        tail = mbox_scan.scan(fd, end, limit, mtime=mtime)
        records.extend(tail.records)
        return result

    def _extends(self, fd: int | None, records: array.array, first: int, end: int, limit: int,
                 *, check: bool) -> bool:
        """Whether the file is the indexed one with at most messages appended (fd is
        locked). With check, the file changed since it was last seen: test "\\nFrom "
        where the indexed messages end and SAMPLES From_ lines."""
        if end == 0:
            return True
        if fd is None or limit < end:
            return False
        if limit > end and os.pread(fd, 6, end - 1) != b"\n" + b"From ":
            return False
        if not check:
            return True
        n = len(records) // FIELDS
        if n == 0:
            return first == end
        step = max(1, n // SAMPLES)
        for i in sorted({*range(0, n, step), n - 1}):
            if not mbox_scan.check_from_line(fd, records[i * FIELDS + OFFSET], records[i * FIELDS + LAYOUT]):
                return False
        return True

    def _journal_limit(self, size: int) -> int | None:
        """Where an append the journal names for this mailbox began (None: none)."""
        sizes = [n for mailbox, n in mbox.read_journal(self.spool_dir) if mailbox == self.name]
        return min([size] + sizes) if sizes else None


def reconcile(old: array.array, new: array.array, uidnext: int) -> tuple[array.array, int]:
    """Give the freshly scanned records in new (UID 0) the UIDs and flags of the
    records in old with the same fingerprint, in order, while UIDs stay ascending;
    the others get new UIDs from uidnext. Returns new and the next uidnext."""
    heads: dict[int, int] = {}
    n_old = len(old) // FIELDS
    following = array.array("q", [-1]) * n_old
    for j in range(n_old - 1, -1, -1):
        fp = old[j * FIELDS + FP]
        following[j] = heads.get(fp, -1)
        heads[fp] = j
    last = 0
    for i in range(0, len(new), FIELDS):
        fp = new[i + FP]
        j = heads.get(fp, -1)
        while j >= 0 and old[j * FIELDS + UID] <= last:
            j = following[j]
        if j >= 0:
            heads[fp] = following[j]
            new[i + UID] = last = old[j * FIELDS + UID]
            new[i + FLAGS] = old[j * FIELDS + FLAGS]
        else:
            new[i + UID] = last = uidnext
            uidnext += 1
    return new, uidnext


# --- helpers ----------------------------------------------------------------------------

def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _try_lock(fd: int, *, shared: bool) -> bool:
    try:
        lock_ofd(fd, wait=False, shared=shared)
        return True
    except BlockingIOError:
        return False


def _try_dotlock(path: str) -> bool:
    try:
        mbox.take_dotlock(path)
        return True
    except mbox.MailboxBusy:
        return False


def _wait_for(attempt, what: str) -> None:
    deadline = time.monotonic() + LOCK_WAIT_S
    while not attempt():
        if time.monotonic() > deadline:
            raise MailboxBusy(what)
        time.sleep(LOCK_POLL_S)


def _copy(src: int, dst: int, offset: int, length: int, dst_offset: int) -> None:
    """Copy length bytes in the kernel where it can (copy_file_range)."""
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, length, offset, dst_offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(dst, os.pread(src, min(length, 1 << 20), offset), dst_offset)
        if n == 0:
            raise MailboxChanged("mailbox shorter than its index")
        offset, dst_offset, length = offset + n, dst_offset + n, length - n


def _copy_ownership(src: int, dst: int) -> None:
    st = os.fstat(src)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    for uid in (st.st_uid, -1):
        try:
            os.fchown(dst, uid, st.st_gid)
            return
        except PermissionError:
            continue


def _runs(positions: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted positions as (first, last) runs of neighbours."""
    start = prev = None
    for p in positions:
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if start is not None:
            yield start, prev
        start = prev = p
    if start is not None:
        yield start, prev
