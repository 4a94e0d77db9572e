"""Dot-stuffing a message for RETR and TOP (RFC 1939 §3), sans-IO.

Owns: doubling a '.' at the start of every line of a stream of pieces, whatever the
piece boundaries, and the terminating '.' line.
Must not: know about sessions, mailboxes or sockets; it never holds more than the two
last octets it saw, so a large message is streamed, never held whole.

The content is expected with CRLF line ends (the session converts the stored LF). A
line is taken to start after every LF, bare or not, so that a stray LF in the content
can never make a line that a lenient client reads as the end marker ('.' then LF).
"""

from __future__ import annotations

from typing import Iterable, Iterator

TERMINATOR = b".\r\n"


class DotStuffer:
    """stuff(piece) for each piece, then finish() once; send what they return."""

    __slots__ = ("_at_line_start", "_tail", "_finished")

    def __init__(self) -> None:
        self._at_line_start = True
        self._tail = b""          # the last (up to) two octets of the content so far
        self._finished = False

    def stuff(self, piece: bytes) -> bytes:
        if self._finished:
            raise RuntimeError("stuff() after finish()")
        if not piece:
            return b""
        out = piece.replace(b"\n.", b"\n..")
        if self._at_line_start and piece[:1] == b".":
            out = b"." + out
        self._at_line_start = piece[-1:] == b"\n"
        self._tail = (self._tail + piece)[-2:]
        return out

    def finish(self) -> bytes:
        """The end of the response: a CRLF first unless the content ended with one (or
        was empty), then '.' CRLF."""
        if self._finished:
            raise RuntimeError("finish() twice")
        self._finished = True
        if self._tail and self._tail != b"\r\n":
            return b"\r\n" + TERMINATOR
        return TERMINATOR


def dot_stuffed(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The pieces stuffed, then the end of the response (empty pieces are skipped)."""
    stuffer = DotStuffer()
    for piece in pieces:
        out = stuffer.stuff(piece)
        if out:
            yield out
    yield stuffer.finish()
