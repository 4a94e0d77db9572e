"""A POP3 session's maildrop, as the session needs it from the mail store.

Owns: adapting store.mailstore.Pop3Maildrop (the messages there at login, their sizes
and UIDLs, deletion at commit, one POP3 session per mailbox across all processes) to
what the POP3 protocol and session ask: the listing, a message read in batches of
pieces (so a large one is streamed and each thread hop carries a fair amount), TOP,
commit, close.
Blocking calls: the session runs them in its service's I/O threads.
Fails with MaildropInUse (another POP3 session has the mailbox) or OSError (anything
else: the session answers with a temporary error).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..store import mailstore

# One thread hop carries up to this much of a message.
BATCH_BYTES = 256 * 1024


class MaildropInUse(Exception):
    """RFC 2449 [IN-USE]: another POP3 session holds this mailbox."""


class MaildropError(OSError):
    """The mailbox could not be read or changed now (busy, changed, gone)."""


class MessageReader:
    """The visible form of one message (CRLF line ends), batch by batch."""

    def __init__(self, pieces: Iterator[bytes]):
        self._pieces = pieces

    def next_pieces(self) -> list[bytes]:
        """The next pieces, up to about BATCH_BYTES; [] at the end."""
        batch: list[bytes] = []
        size = 0
        try:
            for piece in self._pieces:
                batch.append(piece)
                size += len(piece)
                if size >= BATCH_BYTES:
                    break
        except mailstore.MailboxError as e:
            raise MaildropError(str(e)) from None
        return batch

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


class Maildrop:
    def __init__(self, drop: mailstore.Pop3Maildrop, name: str):
        self._drop = drop
        self.name = name
        self.messages = [(drop.size(n), drop.uidl(n)) for n in range(1, drop.count + 1)]

    def reader(self, number: int, body_lines: int | None) -> MessageReader:
        if body_lines is None:
            return MessageReader(self._drop.iter_content(number))
        return MessageReader(iter([self._drop.top(number, body_lines)]))

    def commit(self, deleted: Iterable[int]) -> None:
        try:
            self._drop.commit(list(deleted))
        except mailstore.MailboxError as e:
            raise MaildropError(str(e)) from None

    def close(self) -> None:
        self._drop.close()


def open_maildrop(spool_dir: str, name: str) -> Maildrop:
    """Lock and snapshot SPOOL/name for a POP3 session (a user's mailbox is named as
    the user: SPEC §9)."""
    try:
        return Maildrop(mailstore.Pop3Maildrop(spool_dir, name), name)
    except mailstore.MailboxInUse:
        raise MaildropInUse(name) from None
    except mailstore.MailboxError as e:
        raise MaildropError(str(e)) from None
