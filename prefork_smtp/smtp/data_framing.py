"""Framing one DATA block (RFC 5321 §4.1.1.4, §4.5.2), sans-IO.

Owns: finding the end marker, dot-unstuffing, the size limit, counting Received:
headers, and handing out the content in pieces cut at line boundaries, so that a
large message never has to be held in memory whole.
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
        self.received_headers = 0
        self._buf = bytearray(b"\r\n")
        self._size = 0                      # unstuffed content handed out so far
        self._first_piece = True
        self._in_headers = True
        self._header_tail = b"\r\n"       # so an empty first line ends the headers

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
        if self._in_headers:
            self._count_received(piece)
        return piece

    def _count_received(self, piece: bytes) -> None:
        # The blank line ending the headers may straddle two pieces, and a line may
        # start in the previous one: look at that piece's last two bytes too.
        text = self._header_tail + piece
        header_end = text.find(_HEADER_END)
        if header_end >= 0:
            text = text[:header_end + 2]
            self._in_headers = False
        self.received_headers += len(_RECEIVED.findall(text))
        self._header_tail = piece[-2:] if len(piece) >= 2 else self._header_tail[len(piece):] + piece
