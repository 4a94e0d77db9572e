"""Framing message content, sans-IO: one DATA block (RFC 5321 §4.1.1.4, §4.5.2) or
BDAT chunks (RFC 3030).

Owns: for DATA, finding the end marker and dot-unstuffing; for BDAT, taking exactly
the announced octets (never unstuffed); for both, the size limit, counting Received:
headers (the hop count), and handing out the content in pieces, so that a large
message never has to be held in memory whole.
Must not: know about sessions, replies or files.

Only CRLF . CRLF ends DATA: LF . LF, LF . CRLF, CR . CR and kin are content (SMTP
smuggling, CVE-2023-51764). Lines of any length are kept unchanged.
"""

from __future__ import annotations

import re

END_OF_DATA = b"\r\n.\r\n"
_KEEP = len(END_OF_DATA) - 1            # a marker may start this far back in old data
_RECEIVED = re.compile(rb"\nreceived:", re.IGNORECASE)   # at a line start
_HEADER_END = b"\r\n\r\n"


class HopCounter:
    """Counts Received: headers in the header section of content handed over in
    pieces cut anywhere, one byte at a time included (RFC 5321 §6.3 loop detection)."""

    # A header name or the blank line may straddle pieces: keep this much of the
    # previous ones (one less than the longest pattern), and count only matches that
    # end in the new piece.
    _TAIL = len(b"\nreceived:") - 1

    def __init__(self) -> None:
        self.received_headers = 0
        self._in_headers = True
        self._tail = b"\r\n"       # a line start before the first line; an empty first
                                    # line then ends the headers

    def feed(self, piece: bytes) -> None:
        if not self._in_headers:
            return
        text = self._tail + piece
        new = len(self._tail)
        header_end = text.find(_HEADER_END)
        end = len(text) if header_end < 0 else header_end + 2
        self.received_headers += sum(1 for match in _RECEIVED.finditer(text, 0, end)
                                     if match.end() > new)
        self._in_headers = header_end < 0
        self._tail = text[-self._TAIL:]


class DataFramer:
    """Feed it bytes; it says when the block ended and gives back unstuffed content.

    The buffer starts with a CRLF (at first a sentinel) whenever it starts at a line
    boundary, so "\\r\\n." finds every leading dot, including on the first line, and
    ".\\r\\n" as the first line is an (empty) end marker. Pieces are cut after the
    last CRLF; a line longer than chunk_bytes is cut in the middle, which is safe as
    long as the cut is not inside a CRLF.
    """

    def __init__(self, max_size: int, chunk_bytes: int | None = None):
        self.max_size = max_size
        self.chunk_bytes = chunk_bytes
        self.oversized = False
        self.hops = HopCounter()
        self._buf = bytearray(b"\r\n")
        self._size = 0                      # unstuffed content handed out so far
        self._first_piece = True

    def feed(self, data: bytes | memoryview) -> tuple[list[bytes], int | None]:
        """Returns (pieces of content, leftover): leftover is None while the block
        goes on, else how many bytes at the end of data came after the end marker."""
        search_from = max(0, len(self._buf) - _KEEP)
        self._buf += data
        end = self._buf.find(END_OF_DATA, search_from)
        if end >= 0:
            leftover = len(self._buf) - (end + len(END_OF_DATA))
            pieces = [] if self.oversized else [self._piece(end + 2)]
            self._buf = bytearray()
            if self._size > self.max_size:  # RFC 1870 §3: counted without stuffing
                self.oversized, pieces = True, []
            return pieces, leftover
        if self.oversized or self._over_limit():
            # Past the limit keep reading to the end marker (RFC 1870 §6.3: reply
            # after it), holding on to only the tail the marker could start in.
            self.oversized = True
            del self._buf[:-_KEEP]
            return [], None
        if self.chunk_bytes and len(self._buf) >= self.chunk_bytes:
            cut = self._cut_point()
            if cut > 0:
                return [self._piece(cut)], None
        return [], None

    def _over_limit(self) -> bool:
        # Up to _KEEP bytes at the end may be the start of the end marker, not content;
        # counting the stuffed dots is only worth it once the raw size is too big.
        pending = len(self._buf) - _KEEP
        if self._size + pending <= self.max_size:
            return False
        return self._size + pending - self._buf.count(b"\r\n.") > self.max_size

    def _cut_point(self) -> int:
        cut = self._buf.rfind(b"\r\n", max(0, len(self._buf) - self.chunk_bytes))
        if cut > 0:
            return cut
        # One long line: cut in it, keeping the tail the end marker could start in
        # (no CRLF is there, or rfind would have found it).
        return len(self._buf) - _KEEP

    def _piece(self, length: int) -> bytes:
        """Unstuff and hand out buffer[:length]."""
        piece = bytes(self._buf[:length]).replace(b"\r\n.", b"\r\n")
        del self._buf[:length]
        if self._first_piece:
            piece = piece[2:]               # the sentinel, not content
            self._first_piece = False
        self._size += len(piece)
        self.hops.feed(piece)
        return piece

    @property
    def received_headers(self) -> int:
        return self.hops.received_headers


class ChunkReader:
    """The octets of BDAT chunks (RFC 3030 §2): exactly as many as announced, taken
    as they are (no dot-unstuffing, no end marker), over as many chunks as the
    client sends. Content past the size limit, or of a refused chunk, is read and
    dropped: the octets must be consumed either way, or they would be taken for
    commands.

    Pieces are handed out once chunk_bytes have gathered (cut anywhere: readers of
    the pieces carry partial lines over), the rest at the end of the message.
    """

    def __init__(self, max_size: int, chunk_bytes: int | None = None):
        self.max_size = max_size
        self.chunk_bytes = chunk_bytes
        self.size = 0                      # octets of the message so far
        self.chunks = 0
        self.hops = HopCounter()
        self._remaining = 0                # octets of the current chunk still to come
        self._keep = True                  # this chunk's octets are content
        self._buf = bytearray()

    def start_chunk(self, size: int, keep: bool) -> None:
        self._remaining = size
        self._keep = keep
        if keep:
            self.chunks += 1
            self.size += size

    @property
    def oversized(self) -> bool:
        return self.size > self.max_size

    @property
    def received_headers(self) -> int:
        return self.hops.received_headers

    def feed(self, data: bytes | memoryview) -> tuple[list[bytes], int]:
        """Take what belongs to the current chunk; returns (pieces to keep so far,
        how many octets of data were used). The chunk is complete when
        chunk_done is true."""
        used = min(self._remaining, len(data))
        self._remaining -= used
        pieces: list[bytes] = []
        if self._keep and not self.oversized and used:
            taken = bytes(data[:used])
            self.hops.feed(taken)
            self._buf += taken
            if self.chunk_bytes and len(self._buf) >= self.chunk_bytes:
                pieces.append(bytes(self._buf))
                self._buf.clear()
        return pieces, used

    @property
    def chunk_done(self) -> bool:
        return self._remaining == 0

    def rest(self) -> bytes:
        """The content not yet handed out (at the end of the message)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
