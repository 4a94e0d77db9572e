"""Small file-system helpers for durable writes. Depends on nothing of ours."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# struct flock on Linux (x86_64 and aarch64): short type, short whence, off_t start,
# off_t len, pid_t pid, padding. Open-file-description locks need l_pid == 0.
_FLOCK = "hhqqi4x"


def write_all(fd: int, chunks: list[bytes]) -> None:
    """os.write until every byte of every chunk is written (writes may be short)."""
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a create, rename or unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def lock_ofd(fd: int, *, wait: bool, shared: bool = False, start: int = 0,
             length: int = 0) -> None:
    """Lock the whole file (or length bytes from start) with an open-file-description
    lock: a write lock, or with shared a read lock (readers share it; it excludes
    writers).

    Unlike classic POSIX locks these belong to the open file, not the process, so
    threads and processes of one program exclude each other instead of failing with
    EDEADLK, and they still conflict with the POSIX locks mutt and Dovecot take.
    Without wait, raises BlockingIOError if someone else holds a conflicting lock.
    """
    kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
    request = struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise BlockingIOError(e.errno, "file is locked") from None
        raise


def unlock_ofd(fd: int, *, start: int = 0, length: int = 0) -> None:
    """Release an open-file-description lock taken with lock_ofd."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET,
                                                   start, length, 0))



def is_still_at(fd: int, path: str) -> bool:
    """Whether the file open as fd is still the one named path. After waiting for a
    mailbox's locks, a writer checks this: the file may have been replaced meanwhile
    (an expunge renames its rewrite over the mailbox, and two takers that break the
    same stale dot-lock at once can both believe they hold it)."""
    mine = os.fstat(fd)
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)
