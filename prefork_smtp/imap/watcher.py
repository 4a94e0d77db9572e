"""Telling a worker's IDLE sessions at once that their mailbox changed (SPEC §9: new mail
within a second), without each of them polling.

Owns: one Linux inotify descriptor per worker (through ctypes), read by the event loop
(loop.add_reader), watching SPOOL (an mbox appended to, replaced by an expunge or
mutt, its NAME.lock removed when a delivery ends) and SPOOL/.ccsmtp/mailstore/NAME of
each mailbox a session watches (the index: flags stored and messages expunged by
sessions in any worker). Where inotify is not to be had, a stat() poll of those files
every POLL_S instead.
Must not: read mailboxes or decide what changed: subscribers are only told "NAME may
have changed" (the session then refreshes its view in a thread).
Fails soft: an inotify that cannot be set up (or a watch that cannot be added, e.g.
max_user_watches) falls back to polling; a queue overflow tells every subscriber.

libc is loaded when this module is imported, which the master does before dropping
root (cli.py imports the services): after that, the interpreter's own files may be
unreadable to the unprivileged user.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import struct
from typing import Callable

from ..layout import state_path

log = logging.getLogger("ccsmtp.imap")

POLL_S = 0.5

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")        # wd, mask, cookie, len; then len octets of name
SPOOL_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
STATE_MASK = IN_MODIFY | IN_MOVED_TO | IN_CREATE | IN_ONLYDIR
INDEX_FILE = "index"


def _load_libc():
    """libc's inotify functions, or None (not Linux, or a libc without them)."""
    for name in ("libc.so.6", ctypes.util.find_library("c")):
        if not name:
            continue
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            continue
        init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
        add.argtypes, add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
        return libc
    return None


_LIBC = _load_libc()

Callback = Callable[[], None]


class Watcher:
    """One per worker, shared by its IMAP sessions; lives on the event loop."""

    def __init__(self, spool_dir: str, *, use_inotify: bool = True):
        self.spool_dir = spool_dir
        self._subscribers: dict[str, set[Callback]] = {}
        self._use_inotify = use_inotify and _LIBC is not None
        self._fd = -1
        self._watches: dict[int, str | None] = {}    # wd -> mailbox (None: SPOOL)
        self._watched: set[str] = set()              # mailboxes whose state dir is watched
        self._poller: asyncio.Task | None = None
        self._stamps: dict[str, tuple] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def mode(self) -> str:
        return "inotify" if self._fd >= 0 else "poll"

    def subscribe(self, name: str, callback: Callback) -> None:
        """Call callback (on the loop) whenever mailbox `name` may have changed."""
        self._subscribers.setdefault(name, set()).add(callback)
        self._start()
        if self._fd >= 0:
            self._watch_state_dir(name)
        else:
            self._stamps.setdefault(name, self._stamp(name))

    def unsubscribe(self, name: str, callback: Callback) -> None:
        callbacks = self._subscribers.get(name)
        if callbacks is not None:
            callbacks.discard(callback)
            if not callbacks:
                del self._subscribers[name]
                self._stamps.pop(name, None)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self._fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    # --- setting up -----------------------------------------------------------------

    def _start(self) -> None:
        if self._fd >= 0 or self._poller is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._use_inotify and self._start_inotify():
            return
        self._poller = self._loop.create_task(self._poll())

    def _start_inotify(self) -> bool:
        assert _LIBC is not None and self._loop is not None
        fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning("inotify unavailable (%s): polling mailboxes every %.1f s",
                        os.strerror(ctypes.get_errno()), POLL_S)
            return False
        self._fd = fd
        if not self._add_watch(self.spool_dir, SPOOL_MASK, None):
            os.close(fd)
            self._fd = -1
            return False
        self._loop.add_reader(fd, self._readable)
        return True

    def _add_watch(self, path: str, mask: int, name: str | None) -> bool:
        wd = _LIBC.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            log.warning("cannot watch %s (%s)", path, os.strerror(ctypes.get_errno()))
            return False
        self._watches[wd] = name
        return True

    def _watch_state_dir(self, name: str) -> None:
        if name in self._watched:
            return
        # The session has opened the mailbox, so the mail store has made its directory.
        if self._add_watch(state_path(self.spool_dir, "mailstore", name), STATE_MASK, name):
            self._watched.add(name)

    # --- inotify ----------------------------------------------------------------------

    def _readable(self) -> None:
        changed: set[str] = set()
        overflow = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            overflow |= self._parse(data, changed)
        self._notify(set(self._subscribers) if overflow else changed)

    def _parse(self, data: bytes, changed: set[str]) -> bool:
        overflow = False
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, pos)
            raw = data[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            if mask & IN_IGNORED:             # the watched directory went away
                name = self._watches.pop(wd, None)
                self._watched.discard(name)
                continue
            owner = self._watches.get(wd, "")
            file = os.fsdecode(raw)
            if owner is None:                 # SPOOL: a mailbox or NAME.lock
                changed.add(file[:-5] if file.endswith(".lock") else file)
            elif owner and file == INDEX_FILE:
                changed.add(owner)
        return overflow

    def _notify(self, names: set[str]) -> None:
        for name in names:
            for callback in list(self._subscribers.get(name, ())):
                try:
                    callback()
                except Exception:
                    log.exception("mailbox change notification failed")

    # --- polling ------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            changed = set()
            for name in list(self._subscribers):
                stamp = self._stamp(name)
                if stamp != self._stamps.get(name):
                    self._stamps[name] = stamp
                    changed.add(name)
            self._notify(changed)

    def _stamp(self, name: str) -> tuple:
        """What changes when the mbox or its index does: two stat() calls."""
        out = []
        for path in (os.path.join(self.spool_dir, name),
                     state_path(self.spool_dir, "mailstore", name, INDEX_FILE)):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)
