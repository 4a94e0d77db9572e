"""Preparing the spool directory before anything is forked.

Owns: creating SPOOL (and handing it to the unprivileged user when we are root),
refusing a spool we must not take over, and proving the spool is writable by the
user the server will run as. Fails with SpoolError: one line with the fix.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from typing import TYPE_CHECKING

from . import queue

if TYPE_CHECKING:   # a type only: the store does not depend on the process side
    from ..process.privileges import Identity


class SpoolError(Exception):
    pass


def prepare(spool_dir: str, identity: "Identity | None", group: int | None = None) -> None:
    """Create SPOOL if needed; as root, give it to the user; with GROUP (spool_group's
    gid), make new mailboxes that group's. Before dropping root."""
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
    if group is not None:
        _give_to_group(spool_dir, group)


def _give_to_group(spool_dir: str, gid: int) -> None:
    """SPOOL's group becomes GID, with the set-group-ID bit: every file created in it
    (mailboxes and their dot-locks) then gets that group from the kernel, atomically
    at creation, without any ccsmtp process being a member (privileges.drop keeps no
    supplementary group). The group may also enter SPOOL (g+rx) to read them;
    SPOOL/.ccsmtp stays 0700."""
    info = os.stat(spool_dir)
    mode = stat.S_IMODE(info.st_mode) | stat.S_ISGID | stat.S_IRGRP | stat.S_IXGRP
    try:
        if info.st_gid != gid:
            os.chown(spool_dir, -1, gid)
        if stat.S_IMODE(info.st_mode) != mode:
            os.chmod(spool_dir, mode)
        done = os.stat(spool_dir)
    except OSError as e:
        raise SpoolError(f"cannot give spool {spool_dir} to group {_group_name(gid)}: "
                         f"{e.strerror} (start as root, or as a member of that group)") from None
    if done.st_gid != gid or not done.st_mode & stat.S_ISGID:
        # chmod drops set-group-ID without an error for a non-member.
        raise SpoolError(f"cannot make spool {spool_dir} set-group-ID {_group_name(gid)} "
                         "(start as root, or as a member of that group)")


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


def check_queue_writable(spool_dir: str) -> None:
    """In a worker as it starts: can this process still write the queue? The master
    proved it at start-up, but the spool may have changed hands since (a careless
    chown -R, a file system remounted read-only)."""
    paths = queue.queue_paths(spool_dir)
    for path in (paths["tmp"], paths["log"], paths["data"]):
        if not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
            raise SpoolError(f"{path} is not writable by uid {os.geteuid()} "
                             "(fix the spool's owner or permissions, then restart)")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
