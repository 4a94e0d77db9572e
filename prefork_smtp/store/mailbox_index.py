"""The on-disk index of one mailbox, under SPOOL/.ccsmtp/mailstore/NAME/.

Owns: the file format (below), reading it consistently without a lock, writing it
(in place for flags and new messages, whole and renamed for a rewrite), the
writers' lock, the POP3 session lock, and handing out UIDVALIDITY values.
Must not: read or write the mbox file itself (mailstore.py and mbox_scan.py do).
Fails with OSError, or IndexCorrupt for a file that is not a whole index (the caller
rebuilds it under a new UIDVALIDITY).

Files in SPOOL/.ccsmtp/mailstore/NAME/:
  index      the index (format below), replaced by rename() when rewritten
  lock       writers' lock: an OFD write lock serialises every change to index
             across processes and threads (held for milliseconds, for an expunge
             as long as copying the mailbox takes)
  pop3       an OFD write lock held for a whole POP3 session (one at a time)
  index.new, mbox.new   what an expunge or rebuild is writing before the rename
and SPOOL/.ccsmtp/mailstore/uidvalidity: the last UIDVALIDITY handed out (any mailbox).

Index format, little-endian: a HEADER_BYTES header (_HEAD: magic, version, fields
per record, uidvalidity, uidnext, count, changes, generation, the mbox's dev, ino,
size and mtime_ns when last found in step with it, end (where indexed messages
end), first (where the first message starts: bytes before it are a preamble, e.g.
Dovecot's placeholder), the number of keywords, MAX_KEYWORDS names of up to
KEYWORD_BYTES octets, then a CRC-32 of all that), followed by count records of
mbox_scan.FIELDS unsigned 64-bit fields (UID, FLAGS, OFFSET, ...; see mbox_scan).

`changes` goes up with every write, `generation` with every rewrite (UIDs may have
gone). In-place writes put records before the header that counts them, so a reader
that reads the header and then the records sees a consistent whole or, while a
flag write races it, some new flags under an old `changes` (it reads again at its
next refresh). A torn header fails its CRC and is read again.
"""

from __future__ import annotations

import array
import dataclasses
import os
import struct
import sys
import time
import zlib

from ..layout import state_path
from . import mbox_scan
from .fsutil import fsync_dir, lock_ofd, unlink_quietly, write_all

MAGIC = b"ccsmtpIX"
VERSION = 1
HEADER_BYTES = 1024
MAX_KEYWORDS = 16
KEYWORD_BYTES = 32
RECORD_BYTES = 8 * mbox_scan.FIELDS
_HEAD = struct.Struct("<8sIIIIQQQQQQQQQI")
_KEYWORDS = struct.Struct("<" + f"{KEYWORD_BYTES}s" * MAX_KEYWORDS)
_CRC = struct.Struct("<I")
_TORN_RETRIES = 5

assert sys.byteorder == "little"    # records are array('Q') in memory and on disk


class IndexCorrupt(Exception):
    """The index file is not a whole index of ours."""


@dataclasses.dataclass(slots=True)
class Header:
    uidvalidity: int
    uidnext: int = 1
    count: int = 0
    changes: int = 0
    generation: int = 0
    mbox_dev: int = 0
    mbox_ino: int = 0
    mbox_size: int = 0
    mbox_mtime_ns: int = 0
    end: int = 0
    first: int = 0
    keywords: tuple[str, ...] = ()

    def mbox_key(self) -> tuple[int, int, int, int]:
        return (self.mbox_dev, self.mbox_ino, self.mbox_size, self.mbox_mtime_ns)

    def set_mbox_key(self, key: tuple[int, int, int, int]) -> None:
        self.mbox_dev, self.mbox_ino, self.mbox_size, self.mbox_mtime_ns = key

    def pack(self) -> bytes:
        head = _HEAD.pack(MAGIC, VERSION, mbox_scan.FIELDS, self.uidvalidity, self.uidnext,
                          self.count, self.changes, self.generation, self.mbox_dev,
                          self.mbox_ino, self.mbox_size, self.mbox_mtime_ns, self.end,
                          self.first, len(self.keywords))
        names = [k.encode() for k in self.keywords] + [b""] * (MAX_KEYWORDS - len(self.keywords))
        body = head + _KEYWORDS.pack(*names)
        return (body + _CRC.pack(zlib.crc32(body))).ljust(HEADER_BYTES, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        size = _HEAD.size + _KEYWORDS.size
        if len(data) < size + _CRC.size:
            raise IndexCorrupt("short header")
        (crc,) = _CRC.unpack_from(data, size)
        if zlib.crc32(data[:size]) != crc:
            raise IndexCorrupt("header checksum")
        (magic, version, fields, uidvalidity, uidnext, count, changes, generation, dev, ino,
         msize, mtime_ns, end, first, nkeywords) = _HEAD.unpack_from(data)
        if magic != MAGIC or version != VERSION or fields != mbox_scan.FIELDS:
            raise IndexCorrupt("not an index of this version")
        names = _KEYWORDS.unpack_from(data, _HEAD.size)[:nkeywords]
        return cls(uidvalidity, uidnext, count, changes, generation, dev, ino, msize, mtime_ns,
                   end, first, tuple(n.rstrip(b"\0").decode() for n in names))


class Paths:
    """Where one mailbox's index files are."""

    def __init__(self, spool_dir: str, mailbox: str):
        self.dir = state_path(spool_dir, "mailstore", mailbox)
        self.index = os.path.join(self.dir, "index")
        self.lock = os.path.join(self.dir, "lock")
        self.pop3 = os.path.join(self.dir, "pop3")
        self.new_index = os.path.join(self.dir, "index.new")
        self.new_mbox = os.path.join(self.dir, "mbox.new")
        self.uidvalidity = state_path(spool_dir, "mailstore", "uidvalidity")

    def make(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)


# --- reading -------------------------------------------------------------------------

def read_header(fd: int) -> Header:
    for attempt in range(_TORN_RETRIES):
        try:
            return Header.unpack(os.pread(fd, HEADER_BYTES, 0))
        except IndexCorrupt:
            if attempt == _TORN_RETRIES - 1:
                raise
            time.sleep(0.001)     # a write of the header may be in progress
    raise AssertionError("unreachable")


def read_index(fd: int) -> tuple[Header, array.array]:
    """Header and records, consistent as the module docstring says."""
    header = read_header(fd)
    data = os.pread(fd, header.count * RECORD_BYTES, HEADER_BYTES)
    if len(data) != header.count * RECORD_BYTES:
        raise IndexCorrupt("records cut short")
    records = array.array("Q")
    records.frombytes(data)
    return header, records


# --- writing -------------------------------------------------------------------------

def write_header(fd: int, header: Header) -> None:
    os.pwrite(fd, header.pack(), 0)


def append_records(fd: int, header: Header, records: array.array) -> None:
    """Add records after the header's count, then the header (which counts them)."""
    data = records.tobytes()
    if data:
        _pwrite_all(fd, data, HEADER_BYTES + header.count * RECORD_BYTES)
    header.count += len(records) // mbox_scan.FIELDS
    write_header(fd, header)


def write_records(fd: int, records: array.array, first: int, last: int) -> None:
    """Write records first..last (indexes, inclusive) of records back in place."""
    f = mbox_scan.FIELDS
    _pwrite_all(fd, records[first * f:(last + 1) * f].tobytes(), HEADER_BYTES + first * RECORD_BYTES)


def write_new_index(paths: Paths, header: Header, records: array.array) -> None:
    """Write a whole index to index.new and fsync it (commit_new_index puts it in place)."""
    fd = os.open(paths.new_index, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        header.count = len(records) // mbox_scan.FIELDS
        write_all(fd, [header.pack(), records.tobytes()])
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_new_index(paths: Paths) -> None:
    os.rename(paths.new_index, paths.index)
    fsync_dir(paths.dir)


def replace_index(paths: Paths, header: Header, records: array.array) -> None:
    write_new_index(paths, header, records)
    commit_new_index(paths)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# --- locks ---------------------------------------------------------------------------

class WriterLock:
    """The index writers' lock (see module docstring); waits for it."""

    def __init__(self, paths: Paths):
        self._paths = paths
        self._fd = -1

    def __enter__(self) -> "WriterLock":
        self._paths.make()
        self._fd = os.open(self._paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            lock_ofd(self._fd, wait=True)
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)     # closing the description releases its lock


def try_pop3_lock(paths: Paths) -> int | None:
    """The POP3 session lock's fd (close it to release), or None if held."""
    paths.make()
    fd = os.open(paths.pop3, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_ofd(fd, wait=False)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def allocate_uidvalidity(paths: Paths) -> int:
    """A UIDVALIDITY never handed out before by this spool: the clock, or one more
    than the last one if the clock has not moved past it (RFC 3501 §2.3.1.1: it
    must change when UIDs are lost, and never go back to an old value)."""
    os.makedirs(os.path.dirname(paths.uidvalidity), mode=0o700, exist_ok=True)
    fd = os.open(paths.uidvalidity, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_ofd(fd, wait=True)
        text = os.pread(fd, 32, 0).strip()
        last = int(text) if text.isdigit() else 0
        value = max(int(time.time()), last + 1) & 0xFFFFFFFF or 1
        os.pwrite(fd, b"%010d\n" % value, 0)     # one write of fixed width: never half
        os.fsync(fd)
        return value
    finally:
        os.close(fd)


def remove_scratch(paths: Paths) -> None:
    """Files a killed expunge or rebuild left; only under the writers' lock."""
    unlink_quietly(paths.new_index)
    unlink_quietly(paths.new_mbox)
