"""mboxrd mailboxes: formatting a delivered copy and appending it under lock.

Owns: the From_ line, Return-Path and Received headers, '>From ' quoting, removing
the state headers of mail readers from incoming mail (SPEC §6), and the locking protocol mutt and Dovecot expect (a dot-lock SPOOL/NAME.lock plus an fcntl
write lock on the file; we use an open-file-description lock, which conflicts with
their POSIX locks but not with our own other threads or processes).
Must not: write anywhere but SPOOL/NAME and SPOOL/NAME.lock for a safe NAME.

Fails with MailboxBusy (someone holds a lock: try again later) or OSError; an append
that fails is truncated back to the old length, so no half message is ever left.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import threading
import time
from typing import Iterable, Iterator

from ..layout import DELIVERY_JOURNAL, STATE_DIR, mailbox_path, state_path
from .envelope import Envelope
from .fsutil import fsync_dir, is_still_at, lock_ofd, unlink_quietly, write_all

# Postfix's stale_lock_time: a dot-lock older than this is left over from a crash.
STALE_DOTLOCK_S = 500.0
# Readers (POP3, IMAP indexing the tail) hold the fcntl lock for well under a
# millisecond; retry that long before deferring the whole mailbox for a second.
LOCK_RETRIES = 10
LOCK_RETRY_S = 0.002
# "\n" first, not "^" with MULTILINE: a literal prefix lets re skip ahead in C
# (6x faster on a 100 KB body); the first line is checked on its own.
_FROM_LINE = re.compile(rb"\n(>*From )")
_FIRST_FROM_LINE = re.compile(rb">*From ")


class MailboxBusy(Exception):
    """Another process holds the mailbox's dot-lock or fcntl lock."""


def asctime(when: float) -> str:
    # The From_ line date is asctime() format in UTC (mboxrd, as Postfix writes it).
    return time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(when))


def rfc2822_date(when: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(when))


def format_copy(envelope: Envelope, content: Iterable[bytes], *, queue_id: str,
                recipient: str, received_at: float, hostname: str) -> Iterator[bytes]:
    """One message as it is appended to a mailbox, in pieces: From_ line, trace
    headers, the content with LF line ends and mboxrd quoting, and a blank line."""
    sender = envelope.mail_from
    # A quoted local-part may hold spaces, which would split the From_ line.
    from_line = f"From {sender.replace(' ', '_') or 'MAILER-DAEMON'} {asctime(received_at)}\n"
    trace = f"Return-Path: <{sender}>\n" + received_header(
        envelope, queue_id=queue_id, recipient=recipient, received_at=received_at,
        hostname=hostname)
    yield (from_line + trace).encode("utf-8")
    yield from mboxrd_body(without_state_headers(content))
    yield b"\n"


def received_header(envelope: Envelope, *, queue_id: str, recipient: str | None,
                    received_at: float, hostname: str) -> str:
    """Our Received: field (SPEC §5), with LF line ends: client IP, HELO, protocol,
    queue ID, recipient (no "for" clause when None), date. The mbox copy and the
    LMTP copy carry the same one."""
    client = envelope.client_address
    literal = f"IPv6:{client}" if ":" in client else client
    # As Postfix: the TLS comment (RFC 3848) between "from" and "by".
    using = f"\t(using {envelope.tls})\n" if envelope.tls else ""
    by = f"\tby {hostname} (ccsmtp) with {envelope.protocol} id {queue_id}"
    # RFC 5322 §3.6.7: the tokens, then "; date-time".
    tail = f"\n\tfor <{recipient}>; " if recipient is not None else ";\n\t"
    return (f"Received: from {envelope.helo or 'unknown'} (unknown [{literal}])\n{using}"
            f"{by}{tail}{rfc2822_date(received_at)}\n")


# SPEC §6: fields in which mail readers and stores keep their own state (mutt and
# Dovecot read Status, X-Status, X-Keywords, X-UID, X-IMAP, X-IMAPbase and
# Content-Length from an mbox), and the per-copy header we add ourselves,
# Return-Path (RFC 5321 §4.4: a server making final delivery MAY remove incoming
# ones before adding its own; Postfix's cleanup does). Received is trace, not
# per-copy state: incoming ones stay (they are what the hop count counts).
STATE_HEADERS = frozenset({b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imap",
                           b"x-imapbase", b"content-length", b"return-path"})
# Substrings of those names, to let a header section that has none of them through
# in one piece (most mail).
_STATE_HINTS = (b"status", b"x-keywords", b"x-uid", b"x-imap", b"content-length",
                b"return-path")
_LONGEST_STATE_NAME = max(map(len, STATE_HEADERS))
# RFC 5322 §3.6.8 field name: printable US-ASCII except ':'. Dovecot also accepts
# blanks between the name and the colon (obs-optional), so we do too.
_FIELD_NAME = re.compile(rb"[!-9;-~]*")
# A line start of "Status" and blanks this long with no colon yet is dropped
# undecided (RFC 5322's line limit), so an undecided start is never held unbounded.
_UNDECIDED_MAX = 998
_HEADER_END = re.compile(rb"(?:^|\n)\r?\n")
_KEEP, _DROP, _FOLDED, _END, _UNDECIDED = range(5)


def without_state_headers(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The content with every STATE_HEADERS field (and its folded lines) removed from
    the header section, case-insensitively; the body, from the first empty line on,
    is passed through unscanned. Streaming: a line may be cut anywhere between
    pieces, and only the first bytes of a line are ever held back (to see its name)."""
    rest = iter(pieces)
    pending = b""          # the start of a line, too short yet to say what it is
    in_line = False        # inside a line already classified (its LF not seen yet)
    keep_line = True       # ... and whether that line is kept
    keep_field = True      # whether the current field is kept: its folded lines follow it
    first = True
    for piece in rest:
        if first:
            first = False
            if _no_state_header(piece):
                yield piece
                yield from rest
                return
        text = pending + piece if pending else piece
        pending = b""
        out = []
        pos, size = 0, len(text)
        while pos < size:
            if not in_line:
                kind = _classify(text[pos:pos + _UNDECIDED_MAX])
                if kind == _UNDECIDED:
                    pending = text[pos:]
                    break
                if kind == _END:
                    out.append(text[pos:])
                    yield b"".join(out)
                    yield from rest
                    return
                if kind == _FOLDED:
                    keep_line = keep_field
                else:
                    keep_line = keep_field = kind == _KEEP
            end = text.find(b"\n", pos)
            stop = size if end < 0 else end + 1
            if keep_line:
                out.append(text[pos:stop])
            in_line = end < 0
            pos = stop
        if out:
            yield b"".join(out)
    if pending:            # the message ends inside a line start without a colon
        yield pending


def _no_state_header(piece: bytes) -> bool:
    """The whole header section is in this piece and names none of STATE_HEADERS."""
    match = _HEADER_END.search(piece)
    if match is None:
        return False
    head = piece[:match.start()].lower()
    return not any(hint in head for hint in _STATE_HINTS)


def _classify(start: bytes) -> int:
    """What the header-section line beginning with START is: a field to keep or to
    drop, a folded continuation, the empty line that ends the section, or
    _UNDECIDED if START is too short to tell."""
    if not start:
        return _UNDECIDED
    if start[0] in b" \t":
        return _FOLDED
    if start[0] == 0x0A or start.startswith(b"\r\n"):
        return _END
    if start == b"\r":
        return _UNDECIDED
    name = _FIELD_NAME.match(start).group()
    after = start[len(name):]
    if not after:
        return _UNDECIDED if len(name) <= _LONGEST_STATE_NAME else _KEEP
    if name.lower() not in STATE_HEADERS:
        return _KEEP     # another field, or not a field at all (kept: it is not ours to judge)
    after = after.lstrip(b" \t")
    if not after:
        return _UNDECIDED if len(start) < _UNDECIDED_MAX else _DROP
    return _DROP if after[:1] == b":" else _KEEP


def mboxrd_body(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """CRLF to LF and '>'-quote '^>*From ' lines, piece by piece (cut after an LF so
    that no line is split), ending with a newline."""
    carry = b""
    for piece in pieces:
        text = carry + piece if carry else piece
        cut = text.rfind(b"\n") + 1
        if cut == 0:
            carry = text
            continue
        carry = text[cut:]
        yield _quote(text[:cut])
    if carry:
        yield _quote(carry if carry.endswith(b"\n") else carry + b"\n")


def _quote(lines: bytes) -> bytes:
    lines = lines.replace(b"\r\n", b"\n")
    # The regex tries every position; bytes.find skips ahead in C. Most mail has no
    # "From " anywhere, let alone at the start of a line.
    if b"From " not in lines:
        return lines
    lines = _FROM_LINE.sub(rb"\n>\1", lines)
    return b">" + lines if _FIRST_FROM_LINE.match(lines) else lines


# Our own trace headers, right after a From_ line: content cannot forge this, as
# every '^From ' line in content is quoted.
_OUR_COPY = re.compile(rb"^From [^\n]*\nReturn-Path: [^\n]*\nReceived: [^\n]*\n"
                       rb"(?:\t\(using [^\n]*\n)?"
                       rb"\tby [^\n]* \(ccsmtp\) with \w+ id ([0-9A-F]+)\n", re.MULTILINE)


def delivered_ids(spool_dir: str, mailbox: str) -> set[str]:
    """Queue IDs of the copies already in a mailbox: after a crash between the
    mailbox's fsync and the queue's clean-up, they must not be delivered again."""
    try:
        with open(mailbox_path(spool_dir, mailbox), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return set()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return {m.group(1).decode() for m in _OUR_COPY.finditer(data)}
    except FileNotFoundError:
        return set()


class AppendJournal:
    """Where appends started, so that one cut short by kill -9 can be cut back at the
    next start instead of leaving half a message.

    Slot 0 is the append in progress. An interrupted append whose mailbox was locked
    at start-up moves to one of the other slots until it is repaired, so the appends
    that go on meanwhile do not overwrite it. Not fsync'ed: it guards against a killed
    process, whose writes the kernel keeps, not against a crashed machine (where the
    unsynced append is not durable either).
    """

    SLOT = 512
    SLOTS = 8

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def begin(self, mailbox: str, size: int) -> None:
        self._put(0, mailbox, size)

    def end(self) -> None:
        self._put(0, None, 0)

    def _put(self, slot: int, mailbox: str | None, size: int) -> None:
        entry = f"{mailbox} {size}\n".encode() if mailbox else b"\n"
        os.pwrite(self._fd, entry.ljust(self.SLOT), slot * self.SLOT)

    def entries(self) -> list[tuple[str, int]]:
        """Every append not known to have finished: (mailbox, length before it)."""
        return self.parse(os.pread(self._fd, self.SLOT * self.SLOTS, 0))

    @classmethod
    def parse(cls, data: bytes) -> list[tuple[str, int]]:
        out = []
        for slot in range(cls.SLOTS):
            fields = data[slot * cls.SLOT:(slot + 1) * cls.SLOT].split()
            if len(fields) == 2 and fields[1].isdigit():
                out.append((fields[0].decode("ascii", "replace"), int(fields[1])))
        return out

    def keep_only(self, entries: list[tuple[str, int]]) -> None:
        """Record what is still to be repaired, in the deferred slots; clear slot 0."""
        for slot in range(1, self.SLOTS):
            mailbox, size = entries[slot - 1] if slot - 1 < len(entries) else (None, 0)
            self._put(slot, mailbox, size)
        self.end()

    def close(self) -> None:
        os.close(self._fd)


def read_journal(spool_dir: str) -> list[tuple[str, int]]:
    """The journal's entries, read-only, for readers of mailboxes: bytes past an
    entry's length belong to an append that is in progress or was cut short."""
    try:
        fd = os.open(state_path(spool_dir, DELIVERY_JOURNAL), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        return AppendJournal.parse(os.pread(fd, AppendJournal.SLOT * AppendJournal.SLOTS, 0))
    finally:
        os.close(fd)


def undo_interrupted_appends(spool_dir: str, journal: AppendJournal) -> set[str]:
    """Cut mailboxes back to where appends that never finished started. Returns the
    mailboxes that could not be repaired yet (their lock is held)."""
    waiting = [(mailbox, size) for mailbox, size in journal.entries()
               if not _cut_back(spool_dir, mailbox, size)]
    journal.keep_only(waiting[:AppendJournal.SLOTS - 1])
    return {mailbox for mailbox, _ in waiting}


def _cut_back(spool_dir: str, mailbox: str, size: int) -> bool:
    try:
        path = mailbox_path(spool_dir, mailbox)
    except ValueError:
        return True    # not a name we would have written: nothing to repair
    try:
        take_dotlock(path + ".lock")
    except (MailboxBusy, OSError):
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            lock_ofd(fd, wait=False)
            if not is_still_at(fd, path):
                return False          # replaced meanwhile: look again later
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
                os.fsync(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        pass
    except OSError:       # BlockingIOError: a reader holds the fcntl lock
        return False
    finally:
        unlink_quietly(path + ".lock")
    return True


def append(spool_dir: str, mailbox: str, data: Iterable[bytes], mode: int = 0o600,
           journal: AppendJournal | None = None, sync: bool = True) -> None:
    """Append the pieces of data to SPOOL/mailbox under both locks and fsync. Raises MailboxBusy
    at once rather than wait: a reader holding the lock must not stall delivery to
    everyone else. sync=False leaves the fsync (of the file, and of SPOOL for a new
    mailbox) to the caller, who batches many appends into one flush."""
    path = mailbox_path(spool_dir, mailbox)
    dotlock = path + ".lock"
    take_dotlock(dotlock)
    try:
        created = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                         | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            created = True
        try:
            if created:
                # spool_mode as configured (0o660 for spool_group), whatever the umask;
                # the group comes from the spool's set-group-ID bit (spool.prepare).
                os.fchmod(fd, mode)
            _append_locked(fd, path, data, mailbox, journal, sync)
        finally:
            os.close(fd)   # closing the description releases the OFD lock
        if created and sync:
            fsync_dir(spool_dir)
    finally:
        unlink_quietly(dotlock)


def _append_locked(fd: int, path: str, data: Iterable[bytes], mailbox: str,
                   journal: AppendJournal | None, sync: bool = True) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "mailbox is not a regular file")
    _lock_briefly(fd)
    if not is_still_at(fd, path):     # an expunge replaced it while we waited
        raise MailboxBusy("the mailbox was replaced while waiting for its lock")
    old_size = os.fstat(fd).st_size
    if journal is not None:
        journal.begin(mailbox, old_size)
    try:
        _write_coalesced(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        # Postfix mbox delivery: on any error cut the file back, no half message.
        os.ftruncate(fd, old_size)
        os.fsync(fd)
        raise
    finally:
        if journal is not None:
            journal.end()


def _lock_briefly(fd: int) -> None:
    for attempt in range(LOCK_RETRIES):
        try:
            lock_ofd(fd, wait=False)
            return
        except BlockingIOError:
            if attempt == LOCK_RETRIES - 1:
                raise MailboxBusy("fcntl lock held") from None
            time.sleep(LOCK_RETRY_S)


WRITE_BYTES = 256 << 10


def _write_coalesced(fd: int, data: Iterable[bytes]) -> None:
    """Write the pieces in few system calls: many small copies go out together."""
    batch: list[bytes] = []
    size = 0
    for piece in data:
        batch.append(piece)
        size += len(piece)
        if size >= WRITE_BYTES:
            write_all(fd, [b"".join(batch)])
            batch, size = [], 0
    if batch:
        write_all(fd, [b"".join(batch)])


def _owner_is_dead(path: str) -> bool:
    """Ours hold our pid: one whose process is gone need not wait for old age. Other
    programs' locks (often empty) only go stale with time."""
    try:
        with open(path, "rb") as f:
            pid = int(f.read(32).strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def take_dotlock(path: str) -> None:
    """Create NAME.lock holding our pid, atomically: the pid is written to a scratch
    file in SPOOL/.ccsmtp first and that is hard-linked to NAME.lock (the NFS-safe
    dot-lock of liblockfile and mutt), so a process killed at any moment leaves either
    no lock or one that names it, never an empty one that blocks for 500 s."""
    # One scratch name per thread: POP3 and IMAP workers take dot-locks from
    # several session threads at once.
    scratch = os.path.join(os.path.dirname(path), STATE_DIR,
                           f"dotlock.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        write_all(fd, [b"%d\n" % os.getpid()])
    finally:
        os.close(fd)
    try:
        for _ in range(2):
            try:
                os.link(scratch, path)
                return
            except FileExistsError:
                if not _remove_if_stale(path):
                    raise MailboxBusy("dot-lock held") from None
        raise MailboxBusy("dot-lock held")
    finally:
        unlink_quietly(scratch)


def _remove_if_stale(path: str) -> bool:
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return True
    if age < STALE_DOTLOCK_S and not _owner_is_dead(path):
        return False
    unlink_quietly(path)
    return True

