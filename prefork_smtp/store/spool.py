"""Preparing the spool directory before anything is forked.

Owns: creating SPOOL (and handing it to the unprivileged user when we are root),
refusing a spool we must not take over, and proving the spool is writable by the
user the server will run as. Fails with SpoolError: one line with the fix.
"""

from __future__ import annotations

import os
import pwd

from typing import TYPE_CHECKING

from . import queue

if TYPE_CHECKING:   # a type only: the store does not depend on the process side
    from ..process.privileges import Identity


class SpoolError(Exception):
    pass


def prepare(spool_dir: str, identity: "Identity | None") -> None:
    """Create SPOOL if needed; as root, give it to the user. Before dropping root."""
    try:
        if not os.path.exists(spool_dir):
            os.makedirs(spool_dir, mode=0o755)
            if identity is not None:
                os.chown(spool_dir, identity.uid, identity.gid)
    except OSError as e:
        raise SpoolError(f"cannot create spool {spool_dir}: {e.strerror} "
                         "(create it, or choose another with -s)") from None
    if not os.path.isdir(spool_dir):
        raise SpoolError(f"spool {spool_dir} is not a directory (choose another with -s)")
    if identity is not None:
        owner = os.stat(spool_dir).st_uid
        if owner != identity.uid:
            raise SpoolError(f"spool {spool_dir} belongs to {_user_name(owner)}, not {identity.user} "
                             f"(if it is ccsmtp's own: chown {identity.user} {spool_dir}; "
                             "or name a new directory with -s and it is created)")


def open_queue(spool_dir: str) -> int:
    """Create SPOOL/.ccsmtp, prove we can write there and bring the queue log to a
    known state (queue.recover). After dropping root, before forking.
    Returns how many leftover files of a crash were removed."""
    try:
        queue.make_dirs(spool_dir)
        probe = os.path.join(queue.queue_paths(spool_dir)["tmp"], f"probe.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.unlink(probe)
        return queue.recover(spool_dir)
    except OSError as e:
        raise SpoolError(f"spool {spool_dir} is not writable by uid {os.geteuid()}: {e.strerror} "
                         "(fix its owner or permissions, or choose another with -s)") from None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
