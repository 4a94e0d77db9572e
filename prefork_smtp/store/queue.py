"""The durable queue between the SMTP workers and delivery: one shared append-only log.

Owns: the on-disk format of queued messages under SPOOL/.ccsmtp/, appending them
(every worker into the same log, so that one flush makes everything written before
it durable), group commit across processes (one syncing leader at a time; the others
wait and find their records covered), reading the log back for delivery, recording
delivered copies, and reusing segments once everything in them is delivered.
Must not: open mailboxes or speak SMTP.
Fails with QueueError carrying the errno; the caller maps it to an SMTP reply.

Layout (SPOOL/.ccsmtp/):
    log/control        shared state of the log (mapped by every process; not durable,
                       rebuilt from the segments at start-up by recover())
    log/seg.ID         segments: zero-filled when created, reused when delivered
    tmp/               a large message's content while it arrives (removed at start-up)
    data/QUEUEID       a large (spilled) message's content, beside its record
    done/BASE          copies of segment BASE's messages already delivered or removed:
                       one line "QUEUEID MAILBOX" each (a later "QUEUEID MAILBOX -" line
                       records a copy the queue tool removed)

A segment is a 4 KiB header, then its capacity in records, back to back:
    header:  b"CCQSEG1\\n", base (u64 LE; 0 while the segment is free)
    record:  b"CCQ1" (b"CCQX" once cancelled), length u32, lsn u64, crc32 u32, then
             `length` bytes of payload: b"%d %d\\n" % (len(envelope_json),
             len(content)) + envelope_json + content
Positions are LSNs: a record at byte OFF of segment BASE has lsn BASE + OFF - 4096, and
the crc covers lsn, length and payload, so a stale record of an earlier use of the
file, or a torn one, never passes for a record. Segments get increasing bases; a new
segment starts where the capacity of the previous one ends.

Writing (a worker): under an OFD lock on the control file, records go at the log's
end, in place, into blocks written before (no create, rename or unlink, so no
directory fsync and no metadata for fdatasync to commit). Durability: under a
second lock, one process at a time fdatasyncs the current segment and publishes
"synced up to LSN"; everyone whose records lie before that point is done without a
flush of its own. When the range also needs other files durable (a spilled message's
data file and its directory entry, a segment switch, or delivery's mailbox appends,
which it asks for through FULL_REQ) the leader calls syncfs() instead: still one
flush. A record is acknowledged only when it lies before the published point.

Reading (delivery, the queue tool): records up to the synced point, in LSN order.
Delivery frees a segment (base 0) once every copy in it is delivered and durable, and
no record will be added (a later segment exists); a writer reuses free segments first.

The read side, for delivery and the ccsmtp-queue tool (safe while the server runs):
queued() lists the messages with copies still to deliver (queue ID, time, size,
sender, the recipients left, where the record is); remove_copy() takes one copy out
(a "-" line in the done file, which delivery reads on its next rescan); mark_done()
records delivered copies; Log.segments() and Log.read() walk the records.

Recovery (recover(), at start-up, before any worker or delivery runs): every segment
is scanned; its records stop at the first one that does not check (a torn write, the
zeros of a fresh segment or a stale record), which cannot hide an acknowledged
record: one is acknowledged only after a flush that began after everything before it
was written. Half-received messages in tmp/ and data files no record names are
removed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import mmap
import os
import struct
import threading
import time
import zlib
from typing import Iterable, Iterator

from ..layout import state_path
from .envelope import Envelope, Recipient
from .fsutil import fsync_dir, lock_ofd, unlink_quietly, unlock_ofd, write_all

HEADER_BYTES = 4096
SEGMENT_BYTES = 8 << 20            # capacity of a new segment; smaller ones when space is short
SMALLER_SEGMENTS = (1 << 20, 256 << 10, 64 << 10)
SPACE_PER_SEGMENT = 8              # a segment takes at most 1/8 of the free space
MIN_FREE_BYTES = 256 << 10         # below this much free space, refuse (Postfix: queue_minfree)
SEG_MAGIC = b"CCQSEG1\n"
REC_MAGIC, CANCELLED = b"CCQ1", b"CCQX"
RECORD = struct.Struct("<4sIQI")   # magic, length, lsn, crc32
_CRC_PREFIX = struct.Struct("<QI")
_ZEROS = bytes(1 << 20)

# The control file: u64 fields at these offsets, one page, mapped shared.
CTL_MAGIC = b"CCQCTL2\n"
_END, _SYNCED, _CUR_ID, _CUR_BASE, _CUR_CAP, _NEXT_BASE = 8, 16, 24, 32, 40, 48
_APPENDED, _SYNCED_RECS, _LAST_BATCH, _FLUSH_US = 56, 64, 72, 80
_FULL_REQ, _FULL_DONE, _FAIL_LO, _FAIL_HI = 88, 96, 104, 112
_PREV_BATCH = 120
_U64 = struct.Struct("<Q")
# Byte-range OFD locks on the control file.
APPEND_LOCK, SYNC_LOCK = 0, 1

# Group commit across workers: when the device is slow and the last flush carried
# several records, the leader waits a little for the sessions it just acknowledged to
# send their next message, so that one flush carries them all (PostgreSQL's
# commit_delay): for half a flush at most, and at most GATHER_MAX_S.
GATHER_MIN_FLUSH_S = 0.001
GATHER_SHARE = 0.5
GATHER_MAX_S = 0.004
GATHER_POLL_S = 0.0002


class QueueError(Exception):
    def __init__(self, err: OSError):
        super().__init__(str(err))
        self.errno = err.errno

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclasses.dataclass(frozen=True, slots=True)
class QueuedMessage:
    queue_id: str
    envelope: Envelope
    received_at: float       # time.time() when it was accepted
    content: bytes = b""
    external: bool = False   # content is in data/ID, not in the log
    size: int = 0            # of the content, wherever it is
    lsn: int = 0             # where its record is in the log (0: not written yet)


def queue_paths(spool_dir: str) -> dict[str, str]:
    return {name: state_path(spool_dir, name) for name in ("tmp", "log", "data", "done")}


def make_dirs(spool_dir: str) -> None:
    """Create the queue directories (mode 0700: message content is private)."""
    os.makedirs(state_path(spool_dir), mode=0o700, exist_ok=True)
    for path in queue_paths(spool_dir).values():
        os.makedirs(path, mode=0o700, exist_ok=True)


class QueueIds:
    """Unique, time-ordered queue IDs: microseconds, then pid and a counter."""

    def __init__(self) -> None:
        self._counter = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            self._counter = (self._counter + 1) & 0xFFF
            counter = self._counter
        return f"{time.time_ns() // 1000:013X}{os.getpid() & 0xFFFFF:05X}{counter:03X}"


# --- records ----------------------------------------------------------------------

def encode_payload(message: QueuedMessage) -> bytes:
    return payload_head(message, len(message.content)) + message.content


def payload_head(message: QueuedMessage, content_len: int) -> bytes:
    """A record payload up to its content (which is content_len octets long)."""
    env = message.envelope
    envelope_json = json.dumps({
        "id": message.queue_id,
        "from": env.mail_from,
        "to": [[r.address, r.mailbox] for r in env.recipients],
        "helo": env.helo,
        "protocol": env.protocol,
        "client": env.client_address,
        "body": env.body,
        "tls": env.tls,
        "time": message.received_at,
        "external": message.external,
        "size": message.size,
    }, ensure_ascii=True).encode()
    return b"%d %d\n%s" % (len(envelope_json), content_len, envelope_json)


def decode_payload(payload: bytes | memoryview, lsn: int = 0,
                   with_content: bool = True) -> QueuedMessage:
    # Slices of a view copy nothing: only the envelope, and the content when it is
    # wanted, are copied out (the record may hold up to 1 MiB of content).
    view = memoryview(payload)
    head = bytes(view[:48])          # "ENV_LEN CONTENT_LEN\n": a few octets
    line_end = head.index(b"\n")
    env_len, content_len = (int(n) for n in head[:line_end].split())
    env_start = line_end + 1
    content_start = env_start + env_len
    fields = json.loads(bytes(view[env_start:content_start]))
    content = bytes(view[content_start:content_start + content_len]) if with_content else b""
    if with_content and len(content) != content_len:
        raise ValueError("truncated record")
    return QueuedMessage(
        queue_id=fields["id"],
        envelope=Envelope(
            mail_from=fields["from"],
            recipients=tuple(Recipient(a, m) for a, m in fields["to"]),
            helo=fields["helo"],
            protocol=fields["protocol"],
            client_address=fields["client"],
            body=fields["body"],
            tls=fields.get("tls"),
        ),
        received_at=fields["time"],
        content=content,
        external=fields.get("external", False),
        size=fields.get("size", content_len),
        lsn=lsn,
    )


def _record(lsn: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(lsn, len(payload))))
    return RECORD.pack(REC_MAGIC, len(payload), lsn, crc) + payload


def _check(buf: memoryview, pos: int, lsn: int) -> tuple[str, int]:
    """What is at buf[pos:] for a record expected at lsn: ("ok"|"cancelled", length),
    ("short", needed bytes) or ("end", 0)."""
    if len(buf) - pos < RECORD.size:
        return "short", RECORD.size
    magic, length, rec_lsn, crc = RECORD.unpack_from(buf, pos)
    if magic not in (REC_MAGIC, CANCELLED) or rec_lsn != lsn:
        return "end", 0
    if len(buf) - pos - RECORD.size < length:
        return "short", RECORD.size + length
    payload = buf[pos + RECORD.size:pos + RECORD.size + length]
    if zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(lsn, length))) != crc:
        return "end", 0
    return ("ok" if magic == REC_MAGIC else "cancelled"), length


# --- segments ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    seg_id: int
    base: int
    capacity: int

    @property
    def limit(self) -> int:
        return self.base + self.capacity


def _segment_name(seg_id: int) -> str:
    return f"seg.{seg_id:016x}"


def _segment_header(fd: int) -> tuple[bool, int]:
    head = os.pread(fd, 16, 0)
    if len(head) < 16 or head[:8] != SEG_MAGIC:
        return False, 0
    return True, _U64.unpack_from(head, 8)[0]


def segment_size(free: int, need: int = 0, spare: bool = False) -> int:
    """How large a new segment may be with FREE bytes free: at most an eighth of it
    (mailboxes need the rest), at least NEED; 0 if there is no room for one."""
    for size in (SEGMENT_BYTES,) + SMALLER_SEGMENTS:
        if size >= need and size * SPACE_PER_SEGMENT <= free:
            return size
    if spare or need + MIN_FREE_BYTES > free:
        return 0
    return -(-max(need, SMALLER_SEGMENTS[-1]) // HEADER_BYTES) * HEADER_BYTES


def create_segment(spool_dir: str, need: int = 0, spare: bool = False) -> int:
    """A new free segment, zero-filled and durable (data and directory entry) before
    anyone can claim it. Blocking. A spare (made ahead of need) only when space is
    plentiful: returns 0 otherwise."""
    paths = queue_paths(spool_dir)
    st = os.statvfs(paths["log"])
    size = segment_size(st.f_bavail * st.f_frsize, need, spare)
    if not size:
        if spare:
            return 0
        raise QueueError(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    seg_id = int.from_bytes(os.urandom(8), "little") | 1
    tmp = os.path.join(paths["tmp"], _segment_name(seg_id))
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            left = HEADER_BYTES + size
            while left:
                left -= os.write(fd, _ZEROS[:min(left, len(_ZEROS))])
            os.fsync(fd)
            os.rename(tmp, os.path.join(paths["log"], _segment_name(seg_id)))
            fsync_dir(paths["log"])
            # Claimable only now that the file and its name are durable.
            os.pwrite(fd, SEG_MAGIC + _U64.pack(0), 0)
        finally:
            os.close(fd)
    except OSError as e:
        unlink_quietly(tmp)
        raise QueueError(e) from e
    return seg_id


def _syncfs(fd: int) -> None:
    # The global namespace (CDLL(None)), not libc's own handle: an LD_PRELOADed
    # syncfs (the bench's slow-disk model) must see this call like any other.
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc = ctypes.CDLL(None, use_errno=True)


# --- the log -------------------------------------------------------------------------

class Log:
    """One process's (or thread's) handle on the shared log.

    Two handles in one process exclude each other (each has its own open file
    description, and OFD locks belong to those), so a worker's loop appends through
    one and its sync thread syncs through another."""

    def __init__(self, spool_dir: str):
        self.spool_dir = spool_dir
        self.paths = queue_paths(spool_dir)
        self._ctl_fd = os.open(os.path.join(self.paths["log"], "control"),
                               os.O_RDWR | os.O_CLOEXEC)
        self._ctl = mmap.mmap(self._ctl_fd, HEADER_BYTES)
        self._fds: dict[int, int] = {}
        self.want_spare = False     # the last switch took the last free segment

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._ctl.close()
        os.close(self._ctl_fd)

    # control fields
    def _get(self, off: int) -> int:
        return _U64.unpack_from(self._ctl, off)[0]

    def _set(self, off: int, value: int) -> None:
        _U64.pack_into(self._ctl, off, value)

    @property
    def synced(self) -> int:
        return self._get(_SYNCED)

    @property
    def flush_s(self) -> float:
        """How long flushes have taken lately (a moving average)."""
        return self._get(_FLUSH_US) / 1e6

    def _lock(self, which: int) -> None:
        lock_ofd(self._ctl_fd, wait=True, start=which, length=1)

    def _unlock(self, which: int) -> None:
        unlock_ofd(self._ctl_fd, start=which, length=1)

    def fd(self, seg_id: int) -> int:
        fd = self._fds.get(seg_id)
        if fd is None:
            fd = os.open(os.path.join(self.paths["log"], _segment_name(seg_id)),
                         os.O_RDWR | os.O_CLOEXEC)
            self._fds[seg_id] = fd
        return fd

    def forget(self, seg_id: int) -> None:
        fd = self._fds.pop(seg_id, None)
        if fd is not None:
            os.close(fd)

    # --- writing --------------------------------------------------------------------

    def append(self, payloads: list[bytes], full: bool = False) -> int:
        """Write records at the log's end; returns the LSN just past the last one.
        full: the records need other files durable too (syncfs at the next flush).
        Non-blocking apart from the append lock, held for a few writes; a segment
        switch with no free segment creates one (blocking) -- see want_spare."""
        need = sum(RECORD.size + len(p) for p in payloads)
        try:
            st = os.statvfs(self.paths["log"])
            if st.f_bavail * st.f_frsize < MIN_FREE_BYTES + need:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._lock(APPEND_LOCK)
        except OSError as e:
            raise QueueError(e) from e
        try:
            return self._append_locked(payloads, full)
        except OSError as e:
            raise QueueError(e) from e
        finally:
            self._unlock(APPEND_LOCK)

    def _append_locked(self, payloads: list[bytes], full: bool) -> int:
        pos = self._get(_END)
        seg_id, base, cap = self._get(_CUR_ID), self._get(_CUR_BASE), self._get(_CUR_CAP)
        pieces: list[bytes] = []
        for payload in payloads:
            size = RECORD.size + len(payload)
            if not seg_id or pos + size > base + cap:
                if pieces:
                    os.pwrite(self.fd(seg_id), b"".join(pieces), HEADER_BYTES + start - base)
                    pieces = []
                if seg_id and self._get(_SYNCED) < pos:
                    full = True      # the old segment's tail and the new one: syncfs
                seg_id, base, cap = self._switch(size)
                pos = base
            if not pieces:
                start = pos
            pieces.append(_record(pos, payload))
            pos += size
        if pieces:
            os.pwrite(self.fd(seg_id), b"".join(pieces), HEADER_BYTES + start - base)
        # A writer killed between these leaves records past END (overwritten by the
        # next one) or a syncfs asked for in vain, never records a flush misses.
        if full:
            self._set(_FULL_REQ, self._get(_FULL_REQ) + 1)
        self._set(_END, pos)
        self._set(_APPENDED, self._get(_APPENDED) + len(payloads))
        return pos

    def _switch(self, size: int) -> tuple[int, int, int]:
        """Start a new segment (a free one, else a new one) for a record of SIZE."""
        free = self._free_segments()
        seg_id = next((s for s, cap in free if cap >= size), 0)
        if not seg_id:
            seg_id = create_segment(self.spool_dir, size)
            free = []
        self.want_spare = len(free) <= 1
        fd = self.fd(seg_id)
        cap = os.fstat(fd).st_size - HEADER_BYTES
        if cap < size:
            raise OSError(errno.ENOSPC, "message too large for the space left")
        base = max(self._get(_NEXT_BASE), 1)
        # A writer killed half-way through leaves a current segment with no room
        # (CUR_CAP 0, set first and last) and a base never given out twice (NEXT_BASE
        # moves before the header claims it): the next writer switches again, and
        # the claimed segment stays empty until delivery frees it.
        self._set(_CUR_CAP, 0)
        self._set(_NEXT_BASE, base + cap)
        os.pwrite(fd, SEG_MAGIC + _U64.pack(base), 0)
        self._set(_CUR_ID, seg_id)
        self._set(_CUR_BASE, base)
        self._set(_CUR_CAP, cap)
        return seg_id, base, cap

    def _segment_files(self) -> list[tuple[int, int, bool, int]]:
        """Every segment file of the log: (id, descriptor, header valid, base LSN),
        base 0 for a free one. Files removed meanwhile are left out."""
        out = []
        for name in os.listdir(self.paths["log"]):
            if not name.startswith("seg."):
                continue
            seg_id = int(name[4:], 16)
            try:
                fd = self.fd(seg_id)
                ok, base = _segment_header(fd)
            except FileNotFoundError:
                continue
            out.append((seg_id, fd, ok, base))
        return out

    def _free_segments(self) -> list[tuple[int, int]]:
        return [(seg_id, os.fstat(fd).st_size - HEADER_BYTES)
                for seg_id, fd, ok, base in self._segment_files() if ok and base == 0]

    def sync(self, upto: int) -> None:
        """Return once everything before LSN upto is durable: as the leader (one
        fdatasync or syncfs for everything written so far, by anyone), or having
        waited for one. Blocking; for a helper thread."""
        try:
            self._lock(SYNC_LOCK)
        except OSError as e:
            raise QueueError(e) from e
        try:
            if self._get(_FAIL_LO) < upto <= self._get(_FAIL_HI):
                raise QueueError(OSError(errno.EIO, "the flush of these records failed"))
            if self._get(_SYNCED) >= upto:
                return
            self._gather()
            self._flush()
        finally:
            self._unlock(SYNC_LOCK)

    def _gather(self) -> None:
        # Sessions acknowledged by one flush send their next message a few ms later,
        # while the next flush runs; a leader that flushed at once would carry only
        # those that came back during the previous flush, and the two halves would
        # take turns for ever. Expect as many records as the last two flushes carried.
        last_batch, flush_s = self._get(_LAST_BATCH), self._get(_FLUSH_US) / 1e6
        if last_batch < 2 or flush_s < GATHER_MIN_FLUSH_S:
            return
        expected = last_batch + self._get(_PREV_BATCH)
        deadline = time.monotonic() + min(flush_s * GATHER_SHARE, GATHER_MAX_S)
        while (self._get(_APPENDED) - self._get(_SYNCED_RECS) < expected
               and time.monotonic() < deadline):
            time.sleep(GATHER_POLL_S)

    def _flush(self, full: bool = False) -> None:
        """Make everything appended so far durable (SYNC_LOCK held)."""
        self._lock(APPEND_LOCK)
        try:
            end, appended = self._get(_END), self._get(_APPENDED)
            full_req, seg_id = self._get(_FULL_REQ), self._get(_CUR_ID)
        finally:
            self._unlock(APPEND_LOCK)
        synced = self._get(_SYNCED)
        full = full or full_req > self._get(_FULL_DONE)
        started = time.monotonic()
        try:
            if full:
                _syncfs(self._ctl_fd)
            elif seg_id and end > synced:
                os.fdatasync(self.fd(seg_id))
            else:
                return
        except OSError as e:
            self._failed(synced, end, seg_id)
            raise QueueError(e) from e
        took_us = int((time.monotonic() - started) * 1e6)
        self._set(_FLUSH_US, (self._get(_FLUSH_US) * 3 + took_us) // 4)
        self._set(_PREV_BATCH, self._get(_LAST_BATCH))
        self._set(_LAST_BATCH, appended - self._get(_SYNCED_RECS))
        self._set(_SYNCED_RECS, appended)
        self._set(_SYNCED, max(synced, end))
        if full:
            self._set(_FULL_DONE, max(full_req, self._get(_FULL_DONE)))

    def _failed(self, synced: int, end: int, seg_id: int) -> None:
        """A flush failed (EIO): the kernel may have dropped those pages, so none of
        these records may count as stored. Cancel them (best effort) and make the
        next append start a new segment."""
        self._set(_FAIL_LO, synced)
        self._set(_FAIL_HI, end)
        self._lock(APPEND_LOCK)
        try:
            base = self._get(_CUR_BASE)
            if seg_id and self._get(_CUR_ID) == seg_id:
                self._set(_CUR_CAP, self._get(_END) - base)   # full: the next one switches
            lsn = max(synced, base)
            fd = self.fd(seg_id)
            while lsn < end:
                head = os.pread(fd, RECORD.size, HEADER_BYTES + lsn - base)
                if len(head) < RECORD.size:
                    break
                magic, length, rec_lsn, _ = RECORD.unpack(head)
                if magic != REC_MAGIC or rec_lsn != lsn:
                    break
                os.pwrite(fd, CANCELLED, HEADER_BYTES + lsn - base)
                lsn += RECORD.size + length
        except OSError:
            pass
        finally:
            self._unlock(APPEND_LOCK)

    # --- full syncs: delivery's mailboxes ride on the next flush --------------------

    def request_full_sync(self) -> int:
        """Ask the next flush to be a syncfs (it then covers what this process wrote
        to other files before this call); returns the number to wait for."""
        self._lock(APPEND_LOCK)
        try:
            wanted = self._get(_FULL_REQ) + 1
            self._set(_FULL_REQ, wanted)
        finally:
            self._unlock(APPEND_LOCK)
        return wanted

    def full_synced(self, wanted: int) -> bool:
        return self._get(_FULL_DONE) >= wanted

    def full_sync_now(self) -> None:
        """Flush now, as a syncfs (nobody else is flushing soon). Blocking."""
        try:
            self._lock(SYNC_LOCK)
        except OSError as e:
            raise QueueError(e) from e
        try:
            self._flush(full=True)
        finally:
            self._unlock(SYNC_LOCK)

    # --- reading ---------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        """Segments in use, oldest first."""
        out = [Segment(seg_id, base, os.fstat(fd).st_size - HEADER_BYTES)
               for seg_id, fd, ok, base in self._segment_files() if ok and base]
        return sorted(out, key=lambda s: s.base)

    def current_base(self) -> int:
        return self._get(_CUR_BASE) if self._get(_CUR_ID) else 0

    def read(self, segment: Segment, start: int, limit: int | None = None,
             max_bytes: int = 8 << 20,
             max_records: int = 0) -> tuple[list[tuple[int, bool, memoryview]], int, bool]:
        """Records of SEGMENT from LSN start, up to the synced point (or limit):
        ([(lsn, cancelled, payload)], next lsn, at the end of the segment's records).
        At least one record if one is there, whatever its size; at most max_records
        (0: no limit)."""
        upto = min(self.synced if limit is None else limit, segment.limit)
        if start >= upto:
            return [], start, self._complete(segment)
        fd = self.fd(segment.seg_id)
        if _segment_header(fd) != (True, segment.base):
            return [], start, True       # freed (and perhaps reused) meanwhile
        want = min(upto - start, max_bytes)
        buf = memoryview(os.pread(fd, want, HEADER_BYTES + start - segment.base))
        out, pos, lsn = [], 0, start
        while lsn < upto:
            state, length = _check(buf, pos, lsn)
            if state == "short":
                if lsn + length > upto:
                    # A whole record never straddles the synced point: garbage.
                    return out, lsn, True
                if out:
                    break
                buf = memoryview(os.pread(fd, length, HEADER_BYTES + lsn - segment.base))
                pos = 0
                if len(buf) < length:
                    return out, lsn, True
                continue
            if state == "end":
                return out, lsn, True
            out.append((lsn, state == "cancelled", buf[pos + RECORD.size:pos + RECORD.size + length]))
            pos += RECORD.size + length
            lsn += RECORD.size + length
            if len(out) == max_records:
                break
        return out, lsn, lsn >= segment.limit

    def _complete(self, segment: Segment) -> bool:
        return self.synced >= segment.limit

    def read_record(self, segment: Segment, lsn: int) -> QueuedMessage:
        records, _, _ = self.read(segment, lsn, segment.limit, max_bytes=64 << 10, max_records=1)
        if not records or records[0][0] != lsn:
            raise ValueError(f"no record at {lsn}")
        return decode_payload(records[0][2], lsn)

    def free(self, segment: Segment) -> None:
        """Everything in SEGMENT is delivered: let a writer reuse it."""
        fd = self.fd(segment.seg_id)
        if _segment_header(fd) == (True, segment.base):
            os.pwrite(fd, _U64.pack(0), 8)
        unlink_quietly(os.path.join(self.paths["done"], f"{segment.base:x}"))


# --- done records -------------------------------------------------------------------

def read_done(spool_dir: str, segment_base: int, offset: int = 0) -> tuple[list[tuple[str, str, bool]], int]:
    """(queue_id, mailbox, removed) lines of a segment's done file from OFFSET, and
    the offset after the last whole line."""
    try:
        with open(os.path.join(queue_paths(spool_dir)["done"], f"{segment_base:x}"), "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    whole = data[:data.rfind(b"\n") + 1]
    out = []
    for line in whole.decode("ascii", "replace").splitlines():
        fields = line.split(" ")
        if len(fields) >= 2:
            out.append((fields[0], fields[1], len(fields) > 2 and fields[2] == "-"))
    return out, offset + len(whole)


def mark_done(spool_dir: str, segment_base: int, copies: Iterable[tuple[str, str]],
              removed: bool = False) -> None:
    """Record copies as delivered (or removed by hand). Not fsync'ed: delivery writes
    these only after the copies are durable in their mailboxes, and losing the
    lines in a crash only means the copies are looked for there again."""
    lines = "".join(f"{qid} {mailbox}{' -' if removed else ''}\n" for qid, mailbox in copies)
    if not lines:
        return
    path = os.path.join(queue_paths(spool_dir)["done"], f"{segment_base:x}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, [lines.encode()])   # one write: O_APPEND keeps it whole
    finally:
        os.close(fd)


# --- large messages -----------------------------------------------------------------

class SpillFile:
    """Content of a large message as it arrives, in tmp/ until it is committed."""

    def __init__(self, spool_dir: str, name: str):
        self.path = os.path.join(queue_paths(spool_dir)["tmp"], name)
        self.size = 0
        self.error: OSError | None = None
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                       | os.O_CLOEXEC, 0o600)

    @classmethod
    def failed(cls, error: OSError) -> "SpillFile":
        """A spill file that could not be created: it swallows writes and fails commit."""
        spill = cls.__new__(cls)
        spill.path, spill.size, spill.error, spill._fd = "", 0, error, None
        return spill

    def write(self, data: bytes) -> None:
        if self.error is not None or self._fd is None:
            return
        try:
            write_all(self._fd, [data])   # page cache: fast enough for the event loop
            self.size += len(data)
        except OSError as e:
            self.error = e   # reported when the message is stored: 452 / 451

    def move_to(self, path: str) -> None:
        """Into place, beside its record; made durable by the record's flush (syncfs)."""
        if self.error is not None:
            self.discard()
            raise QueueError(self.error)
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        try:
            os.rename(self.path, path)
        except OSError as e:
            unlink_quietly(self.path)
            raise QueueError(e) from e
        self.path = path

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path:
            unlink_quietly(self.path)


def data_path(spool_dir: str, queue_id: str) -> str:
    return os.path.join(queue_paths(spool_dir)["data"], queue_id)


def content_pieces(spool_dir: str, message: QueuedMessage,
                   piece_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The message's content, from its record or in pieces from data/ID."""
    if not message.external:
        yield message.content
        return
    with open(data_path(spool_dir, message.queue_id), "rb") as f:
        while piece := f.read(piece_bytes):
            yield piece


# --- start-up -----------------------------------------------------------------------

def recover(spool_dir: str) -> int:
    """Bring the log to a known state before any worker or delivery starts: rebuild
    the control file from the segments, remove half-received messages and data files
    no record names. Returns how many leftover files were removed."""
    make_dirs(spool_dir)
    paths = queue_paths(spool_dir)
    control = os.path.join(paths["log"], "control")
    fd = os.open(control, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < HEADER_BYTES:
            os.ftruncate(fd, 0)
            write_all(fd, [bytes(HEADER_BYTES)])
    finally:
        os.close(fd)
    removed = 0
    for name in os.listdir(paths["tmp"]):
        unlink_quietly(os.path.join(paths["tmp"], name))
        removed += 1
    log = Log(spool_dir)
    try:
        removed += _rebuild(log)
    finally:
        log.close()
    return removed


def _rebuild(log: Log) -> int:
    # Always SYNC_LOCK before APPEND_LOCK (as a flush takes them): no deadlock.
    log._lock(SYNC_LOCK)
    log._lock(APPEND_LOCK)
    try:
        ctl = log._ctl
        ctl[:HEADER_BYTES] = bytes(HEADER_BYTES)
        ctl[:8] = CTL_MAGIC
        segments = log.segments()
        # Every record that checks counts as stored: the control file's synced point
        # may not have survived, and nothing after it is trusted to be whole.
        log._set(_SYNCED, 1 << 62)
        live_ids: set[str] = set()
        end = 0
        for segment in segments:
            lsn, at_end = segment.base, False
            while not at_end:
                records, lsn, at_end = log.read(segment, lsn)
                for _, cancelled, payload in records:
                    if not cancelled:
                        message = decode_payload(payload, with_content=False)
                        if message.external:
                            live_ids.add(message.queue_id)
                if not records:
                    break
            end = lsn
        last = segments[-1] if segments else None
        log._set(_NEXT_BASE, max([1] + [s.limit for s in segments]))
        log._set(_END, end if last else 0)
        log._set(_SYNCED, end if last else 0)
        if last:
            log._set(_CUR_ID, last.seg_id)
            log._set(_CUR_BASE, last.base)
            log._set(_CUR_CAP, last.capacity)
        removed = 0
        bases = {f"{s.base:x}" for s in segments}
        for name in os.listdir(log.paths["done"]):
            if name not in bases:
                unlink_quietly(os.path.join(log.paths["done"], name))
        for name in os.listdir(log.paths["data"]):
            if name not in live_ids:
                unlink_quietly(os.path.join(log.paths["data"], name))
                removed += 1
        return removed
    finally:
        log._unlock(APPEND_LOCK)
        log._unlock(SYNC_LOCK)


# --- the read side, for delivery and the queue tool ---------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class QueuedCopy:
    """One message as the queue tool lists it: what is still to be delivered."""
    queue_id: str
    received_at: float
    size: int
    sender: str
    recipients: tuple[Recipient, ...]     # the copies not yet delivered
    segment: int                          # base of its segment, for mark_done


def queued(spool_dir: str) -> list[QueuedCopy]:
    """Every message with copies not yet delivered (and durable), oldest first.
    Safe while the server runs (it only reads)."""
    log = Log(spool_dir)
    try:
        out = []
        for segment in log.segments():
            done = {(qid, mb) for qid, mb, _ in read_done(spool_dir, segment.base)[0]}
            lsn, at_end = segment.base, False
            while not at_end:
                records, lsn, at_end = log.read(segment, lsn)
                for rec_lsn, cancelled, payload in records:
                    if cancelled:
                        continue
                    message = decode_payload(payload, rec_lsn, with_content=False)
                    seen: set[str] = set()
                    left = []
                    for rcpt in message.envelope.recipients:
                        if (message.queue_id, rcpt.mailbox) not in done and rcpt.mailbox not in seen:
                            left.append(rcpt)
                        seen.add(rcpt.mailbox)
                    if left:
                        out.append(QueuedCopy(message.queue_id, message.received_at, message.size,
                                              message.envelope.mail_from, tuple(left),
                                              segment.base))
                if not records:
                    break
        return out
    finally:
        log.close()


def remove_copy(spool_dir: str, queue_id: str, mailbox: str) -> bool:
    """Take one copy out of the queue (the queue tool); delivery skips it from its next
    round on. False if no such copy is queued."""
    for entry in queued(spool_dir):
        if entry.queue_id == queue_id and any(r.mailbox == mailbox for r in entry.recipients):
            mark_done(spool_dir, entry.segment, [(queue_id, mailbox)], removed=True)
            return True
    return False
