"""Reading mboxrd mailboxes as POP3 and IMAP show them.

Owns: where messages start and end in an mbox file, each message's visible form
(what readers see) and the facts about it that the index keeps (visible size and
lines, a fingerprint, INTERNALDATE, flags other programs wrote into its headers).
Must not: write, lock or keep anything; it reads the byte ranges it is given with
pread(), never mmap (a file cut short under a mapping kills the process with SIGBUS).
Fails with OSError, or MailboxChanged when the bytes read are not those that were
indexed (another program rewrote the file in place): the caller refreshes.

A message starts at a line beginning with "From " (at the start of the file or after
an LF, as Python's mailbox and mutt read it) and ends where the next one starts. Its
visible form (SPEC §6, §9):
- without the From_ line, and without the blank line mboxrd puts after each message
  (one LF, when the message ends with two);
- without the state headers other programs write into stored messages (Status,
  X-Status, X-Keywords, X-UID, X-IMAP, X-IMAPbase, Content-Length; any case, with
  their continuation lines), looked for in the header block within the first
  HEADER_LIMIT octets;
- with '^>+From ' lines unquoted one level, and every LF as CRLF.
Dovecot's placeholder (the first message, with X-IMAP: and the subject
PLACEHOLDER_SUBJECT) is no message at all: it belongs to the file's preamble.

The fingerprint (64 bits of BLAKE2b) covers the stored content less the state
headers and mutt's Lines: header (mutt rewrites Content-Length: and Lines: when it
syncs a mailbox, moving them to the end of the header): header edits by mutt or
Dovecot do not change it, anything else does.
"""

from __future__ import annotations

import array
import calendar
import hashlib
import os
import re
import zlib
from typing import Iterator

READ_BYTES = 1 << 20          # one read when scanning; bigger messages are streamed
PIECE_BYTES = 64 * 1024       # visible form handed out in pieces of about this size
HEADER_LIMIT = 256 * 1024     # state headers are looked for this far into a message
PLACEHOLDER_SUBJECT = b"DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA"

# Flag bits (IMAP system flags; RFC 3501 §2.3.2). Keywords take the bits from
# KEYWORD_SHIFT up.
SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = 1, 2, 4, 8, 16
KEYWORD_SHIFT = 8

# A message's record: the index stores these nine unsigned 64-bit fields per message.
UID, FLAGS, OFFSET, LENGTH, SIZE, LINES, FP, DATE, LAYOUT = range(9)
FIELDS = 9
# LAYOUT packs: From_ line length (bits 0-30, with its LF), whether the message ends
# with the blank separator line (bit 31), CRC-32 of the From_ line (bits 32-63).
_FROM_LEN_MASK = 0x7FFFFFFF
_SEP_BIT = 1 << 31


class MailboxError(Exception):
    """Base of the errors of reading mailboxes (mailstore's too)."""


class MailboxChanged(MailboxError):
    """The bytes at a message's offset are no longer the indexed message."""


_HEADER = re.compile(rb"\n(status|x-status|x-keywords|x-uid|x-imapbase|x-imap|content-length"
                     rb"|lines)[ \t]*:", re.IGNORECASE)
_QUOTED = re.compile(rb"\n>+From ")
_QUOTED_FIRST = re.compile(rb">+From ")
_UNQUOTE = re.compile(rb"\n>(>*From )")
_MONTHS = {m.encode(): i for i, m in enumerate(
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_FROM_DATE = re.compile(
    rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) +(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    rb" +(\d{1,2}) +(\d{1,2}):(\d\d)(?::(\d\d))? +(?:[A-Za-z]{3,5} +)?(\d{4})"
    rb"(?: +([+-])(\d\d)(\d\d))?")
# Status: R means seen (mutt, Dovecot); X-Status letters as Dovecot writes them.
_X_STATUS = {ord("A"): ANSWERED, ord("F"): FLAGGED, ord("D"): DELETED, ord("T"): DRAFT}


def from_len(layout: int) -> int:
    return layout & _FROM_LEN_MASK


def from_crc(layout: int) -> int:
    return layout >> 32


def content_bounds(offset: int, length: int, layout: int) -> tuple[int, int]:
    """Where a message's content (after its From_ line, without the separator) lies."""
    return offset + (layout & _FROM_LEN_MASK), offset + length - (1 if layout & _SEP_BIT else 0)


# --- scanning --------------------------------------------------------------------------

class ScanResult:
    """What a scan found: records (UID 0, flags as the headers say) and where the
    first message starts (bytes before it are the preamble: junk or Dovecot's
    placeholder)."""

    __slots__ = ("records", "first")

    def __init__(self, first: int):
        self.records = array.array("Q")
        self.first = first


def scan(fd: int, start: int, end: int, *, mtime: float) -> ScanResult:
    """Index the messages in bytes [start, end) of the open mbox file. start is the
    start of the file or where a message starts; end is where the last one ends
    (EOF, or where an unfinished append began). mtime: INTERNALDATE of messages
    whose From_ line has no date."""
    first = _first_message(fd, start, end)
    result = ScanResult(first)
    pos = first
    while pos < end:
        buf = os.pread(fd, min(READ_BYTES, end - pos), pos)
        if not buf:
            raise MailboxChanged("mailbox shorter than expected")
        at_end = pos + len(buf) >= end
        i = 0
        while i < len(buf):
            nxt = buf.find(b"\nFrom ", i)
            if nxt >= 0:
                j = nxt + 1
            elif at_end:
                j = len(buf)
            else:
                break
            _emit(result, _analyze(buf, i, j, pos, mtime), pos + i == 0)
            i = j
        if i == 0 and not at_end:
            # One message larger than a read: find its end, then stream it.
            j = _find(fd, b"\nFrom ", pos + 1, end)
            j = end if j < 0 else j + 1
            _emit(result, _analyze_stream(fd, pos, j, mtime), pos == 0)
            i = j - pos
        pos += i
    return result


def _first_message(fd: int, start: int, end: int) -> int:
    if start >= end or os.pread(fd, 5, start) == b"From ":
        return start
    found = _find(fd, b"\nFrom ", start, end)
    return end if found < 0 else found + 1


def _emit(result: ScanResult, facts: tuple, first_in_file: bool) -> None:
    offset, length, size, lines, fp, date, layout, flags, placeholder = facts
    if placeholder and first_in_file:
        result.first = offset + length
        return
    result.records.extend((0, flags, offset, length, size, lines, fp, date, layout))


def _analyze(buf: bytes, a: int, b: int, base: int, mtime: float) -> tuple:
    """The facts of the message at buf[a:b] (file offset base + a), read whole."""
    nl = buf.find(b"\n", a, b)
    if nl < 0:      # a From_ line cut short at the end of the file: no content
        return _empty_message(buf[a:b], base + a, b - a, mtime)
    sep = 1 if b - nl >= 2 and buf[b - 2:b] == b"\n\n" else 0
    cstart, cend = nl + 1, b - sep
    hend, hidden, neutral, flags, placeholder = _header_info(buf, nl, cend)
    nls = buf.count(b"\n", cstart, cend)
    quoted = len(_QUOTED.findall(buf, nl, cend)) if buf.find(b"\n>", nl, cend) >= 0 else 0
    size, lines = _visible_size(cend - cstart, nls, quoted, buf, hidden, cend)
    digest = hashlib.blake2b(digest_size=8)
    view = memoryview(buf)
    prev = cstart
    for s, e in _merged(hidden, neutral):
        digest.update(view[prev:s])
        prev = e
    digest.update(view[prev:cend])
    from_line = buf[a:cstart]
    layout = (cstart - a) | (_SEP_BIT if sep else 0) | (zlib.crc32(from_line) << 32)
    return (base + a, b - a, size, lines, int.from_bytes(digest.digest(), "little"),
            from_date(from_line, mtime), layout, flags, placeholder)


def _analyze_stream(fd: int, a: int, b: int, mtime: float) -> tuple:
    """The facts of the message at [a, b) of the file, too big to read whole."""
    nl = _find(fd, b"\n", a, b)
    if nl < 0:
        return _empty_message(os.pread(fd, 4096, a), a, b - a, mtime)
    sep = 1 if b - nl >= 2 and os.pread(fd, 2, b - 2) == b"\n\n" else 0
    cstart, cend = nl + 1, b - sep
    head = os.pread(fd, min(cend - nl, HEADER_LIMIT + 1), nl)
    hend, hidden, neutral, flags, placeholder = _header_info(head, 0, len(head))
    hidden = [(s + nl, e + nl) for s, e in hidden]
    skip = _merged(hidden, [(s + nl, e + nl) for s, e in neutral])
    digest = hashlib.blake2b(digest_size=8)
    nls = quoted = 0
    pos = cstart
    for piece, starts in _line_pieces(fd, cstart, cend, READ_BYTES):
        nls += piece.count(b"\n")
        quoted += len(_QUOTED.findall(piece))
        if starts and _QUOTED_FIRST.match(piece):
            quoted += 1
        _hash_skipping(digest, piece, pos, skip)
        pos += len(piece)
    hidden_nls = sum(head.count(b"\n", s - nl, e - nl) for s, e in hidden)
    size, lines = _visible_size_counts(cend - cstart, nls, quoted, hidden, hidden_nls,
                                       cend, os.pread(fd, 1, cend - 1) == b"\n")
    from_line = os.pread(fd, cstart - a, a)
    layout = (cstart - a) | (_SEP_BIT if sep else 0) | (zlib.crc32(from_line) << 32)
    return (a, b - a, size, lines, int.from_bytes(digest.digest(), "little"),
            from_date(from_line, mtime), layout, flags, placeholder)


def _empty_message(from_line: bytes, offset: int, length: int, mtime: float) -> tuple:
    fp = int.from_bytes(hashlib.blake2b(digest_size=8).digest(), "little")
    layout = length | (zlib.crc32(from_line[:length]) << 32)
    return (offset, length, 0, 0, fp, from_date(from_line, mtime), layout, 0, False)


def _header_info(buf: bytes, lo: int, chi: int) -> tuple:
    """Look at the header block of the content that starts at buf[lo + 1] (buf[lo]
    is the From_ line's LF) and ends at or after chi. Returns the header's end, the
    ranges of state headers (hidden), of Lines: headers (left out of the
    fingerprint only), the flags that Status/X-Status give, and whether this is
    Dovecot's placeholder."""
    limit = min(chi, lo + 1 + HEADER_LIMIT)
    blank = buf.find(b"\n\n", lo, limit)
    hend = blank + 1 if blank >= 0 else buf.rfind(b"\n", lo, limit) + 1
    hidden: list[tuple[int, int]] = []
    neutral: list[tuple[int, int]] = []
    flags = 0
    imap = False
    for m in _HEADER.finditer(buf, lo, hend):
        s = m.start() + 1
        e = buf.find(b"\n", m.end(), hend) + 1 or hend
        while e < hend and buf[e] in (32, 9):        # folded: continuation lines
            e = buf.find(b"\n", e, hend) + 1 or hend
        name = m.group(1).lower()
        if name == b"lines":
            neutral.append((s, e))
            continue
        hidden.append((s, e))
        if name == b"status":
            if b"R" in buf[m.end():e]:
                flags |= SEEN
        elif name == b"x-status":
            for letter in buf[m.end():e]:
                flags |= _X_STATUS.get(letter, 0)
        elif name == b"x-imap":
            imap = True
    placeholder = imap and buf.find(PLACEHOLDER_SUBJECT, lo, hend) >= 0
    return hend, hidden, neutral, flags, placeholder


def _visible_size(content_len: int, nls: int, quoted: int, buf: bytes,
                  hidden: list[tuple[int, int]], cend: int) -> tuple[int, int]:
    hidden_nls = sum(buf.count(b"\n", s, e) for s, e in hidden)
    return _visible_size_counts(content_len, nls, quoted, hidden, hidden_nls, cend,
                                content_len > 0 and buf[cend - 1] == 10)


def _visible_size_counts(content_len: int, nls: int, quoted: int,
                         hidden: list[tuple[int, int]], hidden_nls: int, cend: int,
                         ends_with_lf: bool) -> tuple[int, int]:
    """Visible octets (LF counted as CRLF, one '>' less per quoted line) and lines."""
    stored = content_len - sum(e - s for s, e in hidden)
    visible_nls = nls - hidden_nls
    if stored == 0:
        return 0, 0
    # Hidden ranges are whole lines: if one ends the content, what is left ends in LF.
    ends_with_lf = ends_with_lf or (bool(hidden) and hidden[-1][1] == cend)
    return stored - quoted + visible_nls, visible_nls + (0 if ends_with_lf else 1)


def from_date(from_line: bytes, default: float) -> int:
    """INTERNALDATE from the From_ line's asctime() date (UTC, as delivery writes it;
    a numeric zone after the year is honoured), else default."""
    m = _FROM_DATE.search(from_line)
    if m is None:
        return int(default)
    month, day, hour, minute, second, year, sign, zh, zm = m.groups()
    try:
        when = calendar.timegm((int(year), _MONTHS[month], int(day), int(hour), int(minute),
                                int(second or 0), 0, 0, 0))
    except (ValueError, OverflowError):
        return int(default)
    if sign:
        offset = int(zh) * 3600 + int(zm) * 60
        when += -offset if sign == b"+" else offset
    return max(0, when)


def _merged(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(a + b)


def _hash_skipping(digest, piece: bytes, pos: int, skip: list[tuple[int, int]]) -> None:
    """digest.update() with the parts of piece (at file offset pos) outside skip."""
    if not skip or skip[-1][1] <= pos or skip[0][0] >= pos + len(piece):
        digest.update(piece)
        return
    view = memoryview(piece)
    for s, e in _kept(pos, pos + len(piece), skip):
        digest.update(view[s - pos:e - pos])


def _kept(lo: int, hi: int, skip: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The parts of [lo, hi) outside the sorted, disjoint ranges in skip."""
    for s, e in skip:
        if e <= lo:
            continue
        if s >= hi:
            break
        if s > lo:
            yield lo, s
        lo = max(lo, e)
    if lo < hi:
        yield lo, hi


def _find(fd: int, needle: bytes, lo: int, hi: int) -> int:
    """File offset of needle's first occurrence starting in [lo, hi), or -1."""
    pos = lo
    while pos < hi:
        buf = os.pread(fd, min(READ_BYTES, hi - pos + len(needle) - 1), pos)
        if len(buf) < len(needle):
            return -1
        i = buf.find(needle, 0, min(len(buf), hi - pos + len(needle) - 1))
        if i >= 0:
            return pos + i if pos + i < hi else -1
        pos += len(buf) - len(needle) + 1
    return -1


def _line_pieces(fd: int, lo: int, hi: int, piece_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Bytes [lo, hi) of the file in pieces that end after an LF where a piece holds
    one, with whether each starts a line (lo does). A piece that starts a line is
    long enough to tell whether the line is a quoted '>+From ' one."""
    pos, starts = lo, True
    while pos < hi:
        want = min(piece_bytes, hi - pos)
        while True:
            data = os.pread(fd, want, pos)
            if not data:
                raise MailboxChanged("mailbox shorter than expected")
            if pos + len(data) >= hi:
                break
            cut = data.rfind(b"\n") + 1
            if cut:
                data = data[:cut]
                break
            if not (starts and _undecided(data)):
                break
            want = min(2 * want, hi - pos)      # a line of '>'s longer than a piece
        yield data, starts
        starts = data[-1] == 10
        pos += len(data)


def _undecided(line_start: bytes) -> bool:
    """Whether more of a line is needed to tell if it is a quoted '>+From ' line."""
    rest = line_start.lstrip(b">")
    return len(rest) < len(line_start) and len(rest) < 5 and b"From ".startswith(rest)


# --- the visible form ------------------------------------------------------------------

def check_from_line(fd: int, offset: int, layout: int) -> bool:
    """Cheap test that a record still describes the file: its From_ line is there."""
    n = layout & _FROM_LEN_MASK
    line = os.pread(fd, n, offset)
    return len(line) == n and line.startswith(b"From ") and zlib.crc32(line) == layout >> 32


def visible_pieces(fd: int, offset: int, length: int, layout: int, fp: int,
                   piece_bytes: int = PIECE_BYTES) -> Iterator[bytes]:
    """The visible form of a message, in pieces. Checks the fingerprint at the end:
    MailboxChanged then means the file was rewritten under the reader and what
    was handed out is not the message (the caller must drop the connection)."""
    cstart, cend = content_bounds(offset, length, layout)
    digest = hashlib.blake2b(digest_size=8)
    yield from _visible(fd, cstart, cend, cend, piece_bytes, digest)
    if int.from_bytes(digest.digest(), "little") != fp:
        raise MailboxChanged("message changed while it was read")


def visible_top(fd: int, offset: int, length: int, layout: int, body_lines: int) -> bytes:
    """POP3 TOP (RFC 1939 §7): the visible header, the blank line and the first
    body_lines lines of the body."""
    cstart, cend = content_bounds(offset, length, layout)
    if cstart >= cend:
        return b""
    head = os.pread(fd, min(cend - cstart + 1, HEADER_LIMIT + 1), cstart - 1)
    hend = _header_info(head, 0, len(head))[0] + cstart - 1
    stop = cend
    if hend < cend and os.pread(fd, 1, hend) == b"\n":
        stop = _after_lines(fd, hend + 1, cend, body_lines)
    return b"".join(_visible(fd, cstart, cend, stop, PIECE_BYTES, None))


def _after_lines(fd: int, lo: int, hi: int, count: int) -> int:
    """Offset just after the count-th LF from lo (or hi)."""
    pos = lo
    for piece, _ in _line_pieces(fd, lo, hi, READ_BYTES):
        if count <= 0:
            return pos
        n = piece.count(b"\n")
        if n >= count:
            return pos + len(piece) - len(piece.split(b"\n", count)[-1])
        count -= n
        pos += len(piece)
    return hi


def _visible(fd: int, cstart: int, cend: int, stop: int, piece_bytes: int,
             digest) -> Iterator[bytes]:
    """Visible form of content [cstart, stop) of a message whose content ends at
    cend; with digest, also hash what the fingerprint covers (stop == cend)."""
    if cstart >= cend:
        return
    head = os.pread(fd, min(cend - cstart + 1, HEADER_LIMIT + 1), cstart - 1)
    if head[:1] != b"\n":
        raise MailboxChanged("message moved")
    _, hidden, neutral, _, _ = _header_info(head, 0, len(head))
    shift = cstart - 1
    hidden = [(s + shift, e + shift) for s, e in hidden]
    skip = _merged(hidden, [(s + shift, e + shift) for s, e in neutral])
    pos = cstart
    for piece, starts in _line_pieces(fd, cstart, stop, piece_bytes):
        end = pos + len(piece)
        if digest is not None:
            _hash_skipping(digest, piece, pos, skip)
        if hidden and hidden[0][0] < end and hidden[-1][1] > pos:
            piece = b"".join(piece[s - pos:e - pos] for s, e in _kept(pos, end, hidden))
        pos = end
        if piece:
            yield _unquote(piece, starts).replace(b"\n", b"\r\n")


def _unquote(piece: bytes, starts_line: bool) -> bytes:
    """mboxrd: '^>+From ' loses one '>'."""
    if starts_line and piece[:1] == b">" and _QUOTED_FIRST.match(piece):
        piece = piece[1:]
    if b"\n>" not in piece:
        return piece
    return _UNQUOTE.sub(rb"\n\1", piece)
