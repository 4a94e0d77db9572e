"""A persistent per-mailbox cache of the ENVELOPE, BODY and BODYSTRUCTURE strings that
FETCH sends, so that a client's second full header sync costs no message reads.

Owns: the file SPOOL/.ccsmtp/imap-cache/NAME and its in-memory copy (one per mailbox
per process, shared by that process's sessions, thread-safe).
Must not: decide what a message is. An entry is keyed by UID *and* the mail store's
fingerprint of the message (mbox_scan FP); it is used only when both match the message
the session is fetching, so a stale, foreign or rebuilt-mailbox entry is only a miss.
Fails soft: any error reading or writing the file makes the cache empty or read-only
for the moment (logged once); FETCH then computes the strings from the message.

File format, little-endian: MAGIC, then records appended with O_APPEND in one write()
per batch (so records of several processes never interleave):
    uid Q, fp Q, then for ENVELOPE, BODY, BODYSTRUCTURE a length I (ABSENT: none),
    a CRC-32 I of everything before it in the record, then the strings' octets.
A later record for a UID adds to (or replaces) what earlier ones said. A reader stops
at an incomplete record (a write under way) and continues from there next time; a
record whose CRC fails ends the file's usable part until the next compaction.
Compaction writes the live entries to a new file and renames it over the old one
(readers see a new inode and load it again); it runs when dead records outnumber live
ones. Entries another process appended between our read and our rename are lost:
they are misses, computed again at the next fetch.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import weakref
import zlib
from typing import Iterable

from ..layout import state_path

log = logging.getLogger("ccsmtp.imap")

MAGIC = b"ccIMAPc1"
CACHE_DIR = "imap-cache"
ABSENT = 0xFFFFFFFF
_RECORD = struct.Struct("<QQIIII")    # uid, fp, three lengths, CRC of the fields before it
_FIELDS = struct.Struct("<QQIII")
# Strings are parts of FETCH responses: a string this long is surely not one of ours.
MAX_STRING_BYTES = 16 * 1024 * 1024
# Compact when the file holds more than this many records beyond the live ones.
SLACK_RECORDS = 1000

ENVELOPE, BODY, BODYSTRUCTURE = 0, 1, 2
Entry = tuple  # (fp, envelope | None, body | None, bodystructure | None)

_registry: "weakref.WeakValueDictionary[tuple[str, str], EnvelopeCache]" = \
    weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def cache_for(spool_dir: str, name: str) -> "EnvelopeCache":
    """The process's cache object for mailbox `name` (shared by its sessions)."""
    key = (os.path.abspath(spool_dir), name)
    with _registry_lock:
        cache = _registry.get(key)
        if cache is None:
            cache = _registry[key] = EnvelopeCache(spool_dir, name)
        return cache


class EnvelopeCache:
    def __init__(self, spool_dir: str, name: str):
        self.directory = state_path(spool_dir, CACHE_DIR)
        self.path = os.path.join(self.directory, name)
        self._lock = threading.Lock()
        self._entries: dict[int, Entry] = {}
        self._file_key: tuple[int, int] | None = None
        self._offset = 0              # how far the file has been read
        self._records = 0             # records read from (or written to) the file
        self._broken = False          # a bad record: stop reading, compact at next write

    # --- reading -------------------------------------------------------------------

    def sync(self) -> None:
        """Take in what other processes appended (or their compacted file): one stat
        when nothing changed."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._reset(None)
                return
            except OSError as e:
                log.warning("IMAP cache %s unreadable: %s", self.path, e)
                return
            key = (st.st_dev, st.st_ino)
            if key != self._file_key:
                self._reset(key)
            if st.st_size > self._offset and not self._broken:
                self._read_tail()

    def get(self, uid: int, fp: int) -> Entry | None:
        entry = self._entries.get(uid)
        if entry is None or entry[0] != fp:
            return None
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def _reset(self, key: tuple[int, int] | None) -> None:
        self._entries = {}
        self._file_key = key
        self._offset = 0
        self._records = 0
        self._broken = False

    def _read_tail(self) -> None:
        try:
            with open(self.path, "rb") as f:
                if self._offset == 0:
                    if f.read(len(MAGIC)) != MAGIC:
                        self._broken = True
                        return
                    self._offset = len(MAGIC)
                f.seek(self._offset)
                data = f.read()
        except OSError as e:
            log.warning("IMAP cache %s unreadable: %s", self.path, e)
            return
        self._offset += self._parse(data)

    def _parse(self, data: bytes) -> int:
        """Take the complete records at the start of data; returns the octets used."""
        pos, entries, end = 0, self._entries, len(data)
        unpack, size = _RECORD.unpack_from, _RECORD.size
        while pos + size <= end:
            uid, fp, a, b, c, crc = unpack(data, pos)
            if zlib.crc32(data[pos:pos + _FIELDS.size]) != crc or \
                    any(n != ABSENT and n > MAX_STRING_BYTES for n in (a, b, c)):
                log.warning("IMAP cache %s: bad record at %d; ignoring the rest",
                            self.path, self._offset + pos)
                self._broken = True
                return pos
            lengths = [0 if n == ABSENT else n for n in (a, b, c)]
            stop = pos + size + sum(lengths)
            if stop > end:
                break               # a write under way: read it next time
            strings, at = [], pos + size
            for n, length in zip((a, b, c), lengths):
                strings.append(None if n == ABSENT else data[at:at + length])
                at += length
            old = entries.get(uid)
            if old is not None and old[0] == fp:
                strings = [new if new is not None else prev
                           for new, prev in zip(strings, old[1:])]
            entries[uid] = (fp, *strings)
            self._records += 1
            pos = stop
        return pos

    # --- writing -------------------------------------------------------------------

    def add(self, items: Iterable[tuple[int, int, bytes | None, bytes | None, bytes | None]],
            live_uids: "Iterable[int] | None" = None) -> None:
        """Record (uid, fp, envelope, body, bodystructure) strings (None: not known).
        live_uids: the mailbox's UIDs now, for compaction."""
        items = list(items)
        if not items:
            return
        with self._lock:
            records = []
            for uid, fp, env, body, bs in items:
                old = self._entries.get(uid)
                if old is not None and old[0] == fp:
                    env, body, bs = (new if new is not None else prev
                                     for new, prev in zip((env, body, bs), old[1:]))
                self._entries[uid] = (fp, env, body, bs)
                records.append(_encode(uid, fp, env, body, bs))
            live = set(live_uids) if live_uids is not None else None
            try:
                if self._broken or self._file_key is None or (
                        live is not None and self._records > 2 * len(live) + SLACK_RECORDS):
                    self._compact(live)
                else:
                    self._append(b"".join(records), len(records))
            except OSError as e:
                log.warning("IMAP cache %s not written: %s", self.path, e)
                self._file_key = None

    def _append(self, data: bytes, count: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._file_key:
                self._compact(None)     # replaced meanwhile: ours is as good a start
                return
            os.write(fd, data)
        finally:
            os.close(fd)
        if self._offset == st.st_size:   # nobody else wrote in between: no need to re-read
            self._offset += len(data)
        self._records += count

    def _compact(self, live_uids: "Iterable[int] | None") -> None:
        if live_uids is not None:
            live = set(live_uids)
            self._entries = {u: e for u, e in self._entries.items() if u in live}
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        data = MAGIC + b"".join(_encode(uid, *entry) for uid, entry in self._entries.items())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.write(fd, data)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)       # no fsync: a cache lost in a crash is rebuilt
        self._file_key = (st.st_dev, st.st_ino)
        self._offset = len(data)
        self._records = len(self._entries)
        self._broken = False


def _encode(uid: int, fp: int, env: bytes | None, body: bytes | None,
            bs: bytes | None) -> bytes:
    strings = (env, body, bs)
    lengths = [ABSENT if s is None else len(s) for s in strings]
    fields = _FIELDS.pack(uid, fp, *lengths)
    return fields + struct.pack("<I", zlib.crc32(fields)) + b"".join(s for s in strings if s)
