"""Dropping root for good, after the listeners are bound and the spool is prepared.

Owns: resolving the user and group to become, raising the open-file limit while we
still may, and setgroups/setgid/setuid in that order, then proving that setuid(0)
fails. Fails with PrivilegeError, one line naming the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import resource

log = logging.getLogger("ccsmtp.master")

DEFAULT_USER = "ccsmtp"
FALLBACK_USER = "nobody"
WANTED_OPEN_FILES = 65536   # thousands of sessions a worker, two descriptors at most each


class PrivilegeError(Exception):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user: str
    uid: int
    gid: int


def resolve(user: str | None, group: str | None) -> Identity:
    if user is None:
        try:
            pwd.getpwnam(DEFAULT_USER)
            user = DEFAULT_USER
        except KeyError:
            log.warning("user %r does not exist; running as %r (create it: "
                        "useradd --system --no-create-home %s)", DEFAULT_USER, FALLBACK_USER,
                        DEFAULT_USER)
            user = FALLBACK_USER
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"unknown user {user!r} (create it, or choose another with -u)") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"unknown group {group!r} (create it, or choose another with -g)") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user {user!r} is root; choose an unprivileged user with -u")
    return Identity(user, entry.pw_uid, gid)


def resolve_group(name: str, setting: str) -> int:
    """The gid of group NAME, named in SETTING (e.g. spool_group)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise PrivilegeError(f"{setting}: unknown group {name!r} (create it with groupadd, "
                             f"or fix {setting})") from None


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, WANTED_OPEN_FILES)
    if os.geteuid() == 0:
        hard = max(hard, want)
    want = min(want, hard) if hard != resource.RLIM_INFINITY else want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


def drop(identity: Identity) -> None:
    # No supplementary group, not even spool_group: mailboxes get that group from the
    # spool directory's set-group-ID bit (spool.prepare), so no process facing the
    # network holds a group (say "mail") that could write elsewhere.
    os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("could regain root after dropping privileges; refusing to run")
