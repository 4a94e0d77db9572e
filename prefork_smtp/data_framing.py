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
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
_HEADER_END = b"\r\n\r\n"


class DataFramer:
    """Feed it bytes; it says when the block ended and gives back unstuffed content.

    The buffer always starts at a line boundary with a CRLF in front of it (at the
    start, a sentinel), so "\\r\\n." finds every leading dot, including on the first
    line, and ".\\r\\n" as the first line is an (empty) end marker.
    """

    def __init__(self, max_size: int, chunk_bytes: int | None = None):
        self.max_size = max_size
        self.chunk_bytes = chunk_bytes
        self.oversized = False
        self.received_headers = 0
        self._buf = bytearray(b"\r\n")
        self._raw_size = -2                 # bytes of content seen, less the sentinel
        self._first_piece = True
        self._in_headers = True
        self._at_start = True

    def feed(self, data: bytes | memoryview) -> tuple[list[bytes], int | None]:
        """Returns (pieces of content, leftover): leftover is None while the block
        goes on, else how many bytes at the end of data came after the end marker."""
        search_from = max(0, len(self._buf) - _KEEP)
        self._buf += data
        end = self._buf.find(END_OF_DATA, search_from)
        if end >= 0:
            leftover = len(self._buf) - (end + len(END_OF_DATA))
            self._raw_size += end + 2
            pieces = [] if self._over_limit() else [self._piece(end + 2)]
            self._buf = bytearray()
            return pieces, leftover
        # Up to _KEEP bytes at the end may be the start of the end marker, not content.
        if self._over_limit(len(self._buf) - _KEEP):
            # Past the limit keep reading to the end marker (RFC 1870 §6.3: reply
            # after it), holding on to only the tail the marker could start in.
            self.oversized = True
            self._raw_size += len(self._buf) - _KEEP
            del self._buf[:-_KEEP]
            return [], None
        if self.chunk_bytes and len(self._buf) >= self.chunk_bytes:
            cut = self._buf.rfind(b"\r\n")
            if cut > 0:
                self._raw_size += cut
                return [self._piece(cut)], None
        return [], None

    def _over_limit(self, pending: int = 0) -> bool:
        if self._raw_size + pending > self.max_size:
            self.oversized = True
        return self.oversized

    def _piece(self, length: int) -> bytes:
        """Unstuff and hand out buffer[:length]; what follows starts with CRLF."""
        piece = bytes(self._buf[:length]).replace(b"\r\n.", b"\r\n")
        del self._buf[:length]
        if self._first_piece:
            piece = piece[2:]               # the sentinel, not content
            self._first_piece = False
        self._count_received(piece)
        return piece

    def _count_received(self, piece: bytes) -> None:
        if not self._in_headers:
            return
        if self.received_headers == 0 and piece.startswith(b"\r\n") and self._at_start:
            self._in_headers = False        # an empty first line: no header section
            return
        self._at_start = False
        header_end = piece.find(_HEADER_END)
        if header_end >= 0:
            piece = piece[:header_end + 2]
            self._in_headers = False
        self.received_headers += len(_RECEIVED.findall(piece))
