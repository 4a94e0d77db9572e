"""Copies refused for good (an LMTP 5xx), kept under SPOOL/.ccsmtp/failed/ (SPEC §11).

Owns: the format of a failed copy's file; writing one durably (delivery does, before
it lets the copy leave the queue); listing, reading and removing them; and putting
one back into the queue log as a worker's committer would (ccsmtp-queue --requeue).
Must not: decide what fails (delivery does) or send anything: ccsmtp sends no bounces.
Fails with OSError (and ValueError for a file that is not a failed copy).

One file per copy, failed/QUEUEID.MAILBOX (QUEUEID.h<sha256 of MAILBOX> when that
name would be too long for the file system):

    b"CCFAIL1\\n"
    one line of JSON: {"id", "mailbox", "recipient", "failed_at", "reason", "destination"}
    then a queue record's payload (queue.payload_head and the content): the envelope
    with this copy's recipient only, and the whole message content as it was queued

so that nothing but this file is needed to requeue the copy. It is written in
SPOOL/.ccsmtp/tmp/ (emptied at every start), fsync'ed, renamed into failed/ and the
directory fsync'ed. A crash before the queue recorded the copy as done delivers it
again, it fails again, and the same name is replaced: one file, never two.

Requeueing gives the copy a new queue ID (as Postfix's postsuper -r: the done files
of the log are keyed by queue ID, and the old one may still be listed there) and
keeps its arrival time; the file is removed only once the new record is durable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Iterator

from ..layout import FAILED_DIR, state_path
from . import queue
from .envelope import Recipient
from .fsutil import fsync_dir, unlink_quietly, write_all

MAGIC = b"CCFAIL1\n"
MAX_NAME = 255
HEAD_READ = 64 << 10               # the magic, meta line and envelope fit in this
SPILL_BYTES = 1 << 20              # as smtp/session.py: larger content goes to data/ID
PIECE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class FailedCopy:
    name: str                      # file name in failed/
    queue_id: str
    mailbox: str
    recipient: str
    failed_at: float
    reason: str
    destination: str
    message: queue.QueuedMessage   # envelope with this copy's recipient; content not loaded
    content_offset: int            # where the content starts in the file

    @property
    def size(self) -> int:
        return self.message.size


def failed_dir(spool_dir: str) -> str:
    return state_path(spool_dir, FAILED_DIR)


def file_name(queue_id: str, mailbox: str) -> str:
    name = f"{queue_id}.{mailbox}"
    if len(name.encode()) <= MAX_NAME:
        return name
    return f"{queue_id}.h{hashlib.sha256(mailbox.encode()).hexdigest()[:32]}"


def save(spool_dir: str, message: queue.QueuedMessage, recipient: Recipient, reason: str,
         destination: str) -> str:
    """Keep one copy of message for recipient, durably; returns the file's name."""
    directory = failed_dir(spool_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    name = file_name(message.queue_id, recipient.mailbox)
    meta = json.dumps({"id": message.queue_id, "mailbox": recipient.mailbox,
                       "recipient": recipient.address, "failed_at": time.time(),
                       "reason": reason, "destination": destination},
                      ensure_ascii=True).encode()
    single = dataclasses.replace(message, envelope=dataclasses.replace(
        message.envelope, recipients=(recipient,)), content=b"", external=False)
    tmp = os.path.join(queue.queue_paths(spool_dir)["tmp"], f"failed.{name}"[:MAX_NAME])
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            size = 0
            write_all(fd, [MAGIC, meta, b"\n", queue.payload_head(single, message.size)])
            for piece in queue.content_pieces(spool_dir, message):
                write_all(fd, [piece])
                size += len(piece)
            if size != message.size:
                raise OSError(f"content of {message.queue_id} is {size} octets, "
                              f"its record says {message.size}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(directory, name))
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(directory)
    return name


def load(spool_dir: str, name: str) -> FailedCopy:
    """The failed copy in failed/NAME, without its content."""
    if "/" in name or name.startswith("."):
        raise ValueError(f"not a failed copy: {name!r}")
    with open(os.path.join(failed_dir(spool_dir), name), "rb") as f:
        head = f.read(HEAD_READ)
    if not head.startswith(MAGIC):
        raise ValueError(f"{name}: not a failed copy (no {MAGIC[:-1].decode()} header)")
    meta_end = head.index(b"\n", len(MAGIC))
    meta = json.loads(head[len(MAGIC):meta_end])
    payload = head[meta_end + 1:]
    line_end = payload.index(b"\n")
    env_len, _ = (int(n) for n in payload[:line_end].split())
    content_offset = meta_end + 1 + line_end + 1 + env_len
    # HEAD_READ holds the envelope, not all the content: decode only the envelope.
    message = queue.decode_payload(payload, with_content=False)
    return FailedCopy(name, meta["id"], meta["mailbox"], meta["recipient"], meta["failed_at"],
                      meta["reason"], meta.get("destination", ""), message, content_offset)


def listing(spool_dir: str) -> list[FailedCopy]:
    """Every failed copy, oldest failure first; unreadable files are skipped."""
    try:
        names = os.listdir(failed_dir(spool_dir))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.startswith("."):
            continue
        try:
            out.append(load(spool_dir, name))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda c: (c.failed_at, c.name))


def count(spool_dir: str) -> int:
    """How many failed copies there are (one listdir: cheap enough for ccsmtp-status)."""
    try:
        return sum(1 for name in os.listdir(failed_dir(spool_dir)) if not name.startswith("."))
    except FileNotFoundError:
        return 0


def content(spool_dir: str, copy: FailedCopy) -> Iterator[bytes]:
    with open(os.path.join(failed_dir(spool_dir), copy.name), "rb") as f:
        f.seek(copy.content_offset)
        left = copy.size
        while left > 0:
            piece = f.read(min(PIECE_BYTES, left))
            if not piece:
                raise ValueError(f"{copy.name}: content cut short")
            left -= len(piece)
            yield piece


def remove(spool_dir: str, copy: FailedCopy) -> None:
    os.unlink(os.path.join(failed_dir(spool_dir), copy.name))
    fsync_dir(failed_dir(spool_dir))


def requeue(spool_dir: str, copy: FailedCopy) -> str:
    """Append the copy to the queue log as a new message (a new queue ID, its old
    arrival time), wait until the record is durable, then remove the file. Returns
    the new queue ID. Raises queue.QueueError or OSError; the file then stays."""
    new_id = queue.QueueIds().next()
    log = queue.Log(spool_dir)
    try:
        message = dataclasses.replace(copy.message, queue_id=new_id, lsn=0)
        spill = None
        try:
            if copy.size > SPILL_BYTES:
                spill = queue.SpillFile(spool_dir, f"spill.{new_id}")
                for piece in content(spool_dir, copy):
                    spill.write(piece)
                spill.move_to(queue.data_path(spool_dir, new_id))
                message = dataclasses.replace(message, content=b"", external=True)
            else:
                message = dataclasses.replace(message, content=b"".join(content(spool_dir, copy)),
                                              external=False)
            end = log.append([queue.encode_payload(message)], full=spill is not None)
        except BaseException:
            if spill is not None:
                spill.discard()
            raise
        log.sync(end)
    finally:
        log.close()
    remove(spool_dir, copy)
    return new_id
