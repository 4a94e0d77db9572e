"""Logging set-up: Postfix-like, grep-able lines to stderr or a log file.

    2026-11-28 19:45:44 ccsmtp/smtpd[4242]: 19A2...: client=[127.0.0.1], from=<a@b>, ...

Owns: the format, the handler, reopening the file on SIGUSR1 (logrotate), and
batched writes in the busy processes (a worker writes three lines per session: one
write() per line was a tenth of its CPU): lines then go out together, at most
BATCH_S later, and always before the process exits (flush_pending).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

BATCH_S = 0.02

FORMAT = "%(asctime)s %(program)s[%(process)d]: %(levelprefix)s%(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _PostfixStyle(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.program = record.name.replace(".", "/")
        record.levelprefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return super().format(record)


_handler: logging.Handler | None = None
_real_flush: Callable[[], None] | None = None
_dirty = False
_on_dirty: Callable[[], None] | None = None


def setup(level: str, path: str | None) -> None:
    """Raise OSError if the log file cannot be opened."""
    global _handler
    handler: logging.Handler
    handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PostfixStyle(FORMAT, DATE_FORMAT))
    root = logging.getLogger("ccsmtp")
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # asyncio reports through its own logger; give it our handler, not Python's
    # last-resort one (which prints in another format).
    aio = logging.getLogger("asyncio")
    if _handler is not None:
        aio.removeHandler(_handler)
    aio.addHandler(handler)
    aio.setLevel(logging.WARNING)
    aio.propagate = False
    _handler = handler


def batch_writes(on_dirty: Callable[[], None] | None = None) -> None:
    """In this process, stop flushing after every line: the stream's buffer fills
    and flush_pending() writes it out. on_dirty is called (from any thread) when the
    first line after a flush is written, so that the caller can schedule one."""
    global _real_flush, _on_dirty
    handler = _handler
    if not isinstance(handler, logging.StreamHandler) or _real_flush is not None:
        return
    _real_flush, _on_dirty = handler.flush, on_dirty

    def deferred() -> None:
        global _dirty
        if not _dirty:
            _dirty = True
            if _on_dirty is not None:
                _on_dirty()

    handler.flush = deferred   # type: ignore[method-assign]


def flush_pending() -> None:
    global _dirty
    if _dirty and _real_flush is not None:
        _dirty = False
        _real_flush()


def unbatch() -> None:
    """Flush, and flush after every line again (before a process exits)."""
    global _real_flush, _on_dirty
    flush_pending()
    if _real_flush is not None and _handler is not None:
        del _handler.flush      # the class's own flush again
    _real_flush = _on_dirty = None


def set_level(level: str) -> None:
    logging.getLogger("ccsmtp").setLevel(level.upper())


def chown_log_file(path: str | None, uid: int, gid: int) -> None:
    """So that the unprivileged processes can reopen it after logrotate."""
    if path and os.geteuid() == 0:
        os.chown(path, uid, gid)


def reopen() -> None:
    """Open the log file again by name (after logrotate moved it). The new stream is
    opened before the old one is closed: if it cannot be (after dropping root the
    directory may not be ours; logrotate's 'create' directive makes the file for us),
    logging goes on into the old file."""
    if not isinstance(_handler, logging.FileHandler):
        return
    try:
        stream = open(_handler.baseFilename, "a", encoding="utf-8")
    except OSError as e:
        logging.getLogger("ccsmtp").error("cannot reopen log file %s: %s", _handler.baseFilename,
                                          e.strerror)
        return
    _handler.acquire()
    try:
        old, _handler.stream = _handler.stream, stream
    finally:
        _handler.release()
    if old is not None:
        old.close()
