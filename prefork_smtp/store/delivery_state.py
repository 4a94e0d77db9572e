"""What the delivery process tells the tools, and what the tools ask of it.

Owns: SPOOL/.ccsmtp/delivery.state, a small JSON file that delivery rewrites (a
temporary file renamed over it, not fsync'ed: it is a report, not a record) at most
once a second and only when something in it changed; and SPOOL/.ccsmtp/flush, the
flag file ccsmtp-queue creates (--flush, --requeue) and delivery removes when it acts
on it (it looks every turn of its loop, at least once a second).
Must not: hold anything delivery needs to be correct: losing either file loses no mail.

The state (every time a wall-clock time.time()):
    pid          the delivery process that wrote it
    updated      when
    destination  "mbox", "lmtp:HOST:PORT" or "lmtp:unix:/PATH"
    messages     queued messages delivery has read and not finished
    copies       their copies still to hand over
    oldest       arrival time of the oldest of them (null: none)
    unreachable  null, or {"since", "error", "attempts", "next_attempt"}: the
                 destination could not be reached; nothing goes before next_attempt
    deferred     {"QUEUEID": {"MAILBOX": {"error", "since", "attempts",
                 "next_attempt"}}}: copies the destination deferred (4xx, a locked
                 mailbox), at most MAX_DEFERRED of them
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..layout import DELIVERY_STATE, FLUSH_REQUEST, state_path

MAX_DEFERRED = 1000


def write(spool_dir: str, state: dict[str, Any]) -> None:
    path = state_path(spool_dir, DELIVERY_STATE)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(state, f, separators=(",", ":"))
    os.rename(tmp, path)


def read(spool_dir: str) -> dict[str, Any] | None:
    """The last state delivery wrote; None if there is none (or it is unreadable as
    JSON). PermissionError propagates: the caller says who may read it."""
    try:
        with open(state_path(spool_dir, DELIVERY_STATE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def request_flush(spool_dir: str) -> None:
    """Ask delivery to try every deferred copy now, backoff or not."""
    fd = os.open(state_path(spool_dir, FLUSH_REQUEST), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    os.close(fd)


def take_flush_request(spool_dir: str) -> bool:
    """Whether a flush was asked for since the last call (the request is consumed)."""
    try:
        os.unlink(state_path(spool_dir, FLUSH_REQUEST))
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True
