"""The durable queue between the SMTP workers and delivery.

Owns: the on-disk format of queued messages under SPOOL/.ccsmtp/, writing them with
group commit (many messages, one fsync), and reading them back for delivery.
Must not: open mailboxes or speak SMTP.

Layout:
    SPOOL/.ccsmtp/tmp/BATCH     being written; never read; removed at start-up
    SPOOL/.ccsmtp/queue/BATCH   complete and fsync'ed, data and directory entry
    SPOOL/.ccsmtp/done/BATCH    copies of BATCH already delivered (one line each)

A batch file holds one or more messages, each a record:
    b"%d %d\\n" % (len(envelope_json), len(content)) + envelope_json + content
A batch is renamed into queue/ only after its data is fsync'ed and the directory is
fsync'ed after the rename, so a message in queue/ survives kill -9 and power loss.
Fails with QueueError carrying the errno; the caller maps it to an SMTP reply.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import threading
import time
from typing import Iterator

from ..layout import state_path
from .envelope import Envelope, Recipient
from .fsutil import fsync_dir, unlink_quietly, write_all


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
    external: bool = False   # content is in data/ID, not in the batch
    size: int = 0            # of the content, wherever it is


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

    def commit_to(self, path: str) -> None:
        """fsync and move into place (blocking; in the committer's thread)."""
        if self.error is not None:
            raise self.error
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self.path, path)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path:
            unlink_quietly(self.path)


def queue_paths(spool_dir: str) -> dict[str, str]:
    return {name: state_path(spool_dir, name) for name in ("tmp", "queue", "data", "done")}


def make_dirs(spool_dir: str) -> None:
    """Create the queue directories (mode 0700: message content is private)."""
    os.makedirs(state_path(spool_dir), mode=0o700, exist_ok=True)
    for path in queue_paths(spool_dir).values():
        os.makedirs(path, mode=0o700, exist_ok=True)


def clean_tmp(spool_dir: str) -> int:
    """Remove half-written batches left by a crash: none of them was acknowledged."""
    tmp = queue_paths(spool_dir)["tmp"]
    removed = 0
    for name in os.listdir(tmp):
        try:
            os.unlink(os.path.join(tmp, name))
            removed += 1
        except FileNotFoundError:
            pass
    return removed


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


def encode_record(message: QueuedMessage) -> bytes:
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
    return b"%d %d\n" % (len(envelope_json), len(message.content)) + envelope_json


def decode_batch(data: bytes) -> Iterator[QueuedMessage]:
    pos = 0
    while pos < len(data):
        line_end = data.index(b"\n", pos)
        env_len, content_len = (int(n) for n in data[pos:line_end].split())
        env_start = line_end + 1
        content_start = env_start + env_len
        fields = json.loads(data[env_start:content_start])
        content = data[content_start:content_start + content_len]
        if len(content) != content_len:
            raise ValueError("truncated batch record")
        pos = content_start + content_len
        yield QueuedMessage(
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
            size=fields.get("size", len(content)),
        )


def write_batch(spool_dir: str, messages: list[QueuedMessage],
                spills: dict[str, SpillFile] | None = None) -> str:
    """Write messages durably as one batch; returns the batch name. Blocking.
    spills: queue ID -> spilled content of the external messages."""
    paths = queue_paths(spool_dir)
    name = messages[0].queue_id
    tmp_path = os.path.join(paths["tmp"], name)
    try:
        for queue_id, spill in (spills or {}).items():
            spill.commit_to(os.path.join(paths["data"], queue_id))
        if spills:
            fsync_dir(paths["data"])
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            chunks = []
            for message in messages:
                chunks.append(encode_record(message))
                chunks.append(message.content)
            write_all(fd, chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, os.path.join(paths["queue"], name))
        fsync_dir(paths["queue"])
    except OSError as e:
        unlink_quietly(tmp_path)
        for queue_id in spills or {}:
            unlink_quietly(os.path.join(paths["data"], queue_id))
        raise QueueError(e) from e
    return name


# --- the delivery side ------------------------------------------------------------

def ready_batches(spool_dir: str) -> list[str]:
    """Names of complete batches, oldest first (names start with a time stamp)."""
    return sorted(os.listdir(queue_paths(spool_dir)["queue"]))


def read_batch(spool_dir: str, name: str) -> list[QueuedMessage]:
    with open(os.path.join(queue_paths(spool_dir)["queue"], name), "rb") as f:
        return list(decode_batch(f.read()))


def read_done(spool_dir: str, name: str) -> set[tuple[str, str]]:
    """(queue_id, mailbox) pairs of BATCH already delivered."""
    try:
        with open(os.path.join(queue_paths(spool_dir)["done"], name), "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
    except FileNotFoundError:
        return set()
    return {tuple(line.split(" ", 1)) for line in lines if " " in line}  # type: ignore[misc]


def mark_done(spool_dir: str, name: str, copies: list[tuple[str, str]]) -> None:
    """Record delivered copies of a batch that is not finished yet (fsync'ed)."""
    path = os.path.join(queue_paths(spool_dir)["done"], name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, [f"{qid} {mailbox}\n".encode() for qid, mailbox in copies])
        os.fsync(fd)
    finally:
        os.close(fd)


def content_pieces(spool_dir: str, message: QueuedMessage,
                   piece_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The message's content, from the batch or in pieces from data/ID."""
    if not message.external:
        yield message.content
        return
    with open(os.path.join(queue_paths(spool_dir)["data"], message.queue_id), "rb") as f:
        while piece := f.read(piece_bytes):
            yield piece


def remove_batch(spool_dir: str, name: str, messages: list[QueuedMessage]) -> None:
    # The batch first: a crash in between leaves an orphan data file, never a batch
    # whose content is gone.
    paths = queue_paths(spool_dir)
    os.unlink(os.path.join(paths["queue"], name))
    for message in messages:
        if message.external:
            unlink_quietly(os.path.join(paths["data"], message.queue_id))
    unlink_quietly(os.path.join(paths["done"], name))
