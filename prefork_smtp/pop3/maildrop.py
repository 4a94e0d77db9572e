"""A POP3 session's maildrop, as the session needs it from the mail store.

Owns: adapting store.mailbox_views.Pop3Maildrop (the messages there at login, their sizes
and UIDLs, deletion at commit, one POP3 session per mailbox across all processes) to
what the POP3 protocol and session ask: the listing, small messages read whole (with
the ones after them, for a client retrieving in order: one thread hop then serves
several RETRs), a large message read in batches of pieces (streamed, each thread hop
carrying a fair amount), TOP, commit, close.
Blocking calls: the session runs them in its service's I/O threads.
Fails with MaildropInUse (another POP3 session has the mailbox) or OSError (anything
else: the session answers with a temporary error).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..store import mailbox_views, mailstore

# One thread hop carries up to this much of a message.
BATCH_BYTES = 256 * 1024
# Messages up to this size are read whole, and a client that retrieves in order gets
# the following ones read with them, up to this much in all: what a session may hold
# read ahead (a thread hop costs more than the read itself: ~0.2 ms on an idle
# machine, milliseconds on a loaded one).
READ_AHEAD_BYTES = 128 * 1024


class MaildropInUse(Exception):
    """RFC 2449 [IN-USE]: another POP3 session holds this mailbox."""


class MaildropError(OSError):
    """The mailbox could not be read or changed now (busy, changed, gone)."""


class MessageReader:
    """The visible form of one message (CRLF line ends), batch by batch."""

    def __init__(self, pieces: Iterator[bytes]):
        self._pieces = pieces

    def next_pieces(self) -> tuple[list[bytes], bool]:
        """The next pieces, up to about BATCH_BYTES, and whether they are the last."""
        batch: list[bytes] = []
        size = 0
        try:
            for piece in self._pieces:
                batch.append(piece)
                size += len(piece)
                if size >= BATCH_BYTES:
                    return batch, False
        except mailstore.MailboxError as e:
            raise MaildropError(str(e)) from None
        return batch, True

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


class Maildrop:
    def __init__(self, drop: mailbox_views.Pop3Maildrop, name: str):
        self._drop = drop
        self.name = name
        self.messages = [(drop.size(n), drop.uidl(n)) for n in range(1, drop.count + 1)]

    def size(self, number: int) -> int:
        return self.messages[number - 1][0]

    def read_whole(self, first: int, budget: int) -> dict[int, bytes]:
        """The visible forms of message `first` and the ones after it, whole, as many
        as fit in `budget` octets together ({} if `first` alone does not). A message
        after the first that cannot be read just ends the run."""
        out: dict[int, bytes] = {}
        used = 0
        for number in range(first, len(self.messages) + 1):
            used += self.size(number)
            if used > budget:
                break
            try:
                out[number] = b"".join(self._drop.iter_content(number))
            except mailstore.MailboxError as e:
                if number == first:
                    raise MaildropError(str(e)) from None
                break
        return out

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
        return Maildrop(mailbox_views.Pop3Maildrop(spool_dir, name), name)
    except mailbox_views.MailboxInUse:
        raise MaildropInUse(name) from None
    except mailstore.MailboxError as e:
        raise MaildropError(str(e)) from None
