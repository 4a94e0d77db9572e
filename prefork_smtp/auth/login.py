"""Checking a login for a session of any service (POP3, IMAP): SPEC §9.

Owns: what happens between a client's user name and password and the session's answer:
the name normalised (lower-cased, name@LOCALDOMAIN is name), the password checked in a
thread (a hash costs tens of milliseconds and must never block the worker's loop), an
unknown user checked against a stand-in hash so that it takes as long, the reply to a
failure held back per client address (throttle.py, shared by every worker), and one
log line per attempt naming the service, the user and the client — never a password.
Must not: decide whether a password may be sent at all (plain text off loopback): the
protocol never hands one over then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from .throttle import FIRST_DELAY_S, ThrottleRegion
from .users import Users, normalize_login

# argon2 holds its memory cost (32-64 MiB) per check running at once: two at a time
# per worker keeps that bounded while a slow check does not hold up the next one.
HASH_THREADS = 2

log = logging.getLogger("ccsmtp.auth")


class LoginChecker:
    """One per worker, shared by its sessions."""

    def __init__(self, users: Users | None, throttle: ThrottleRegion | None,
                 local_domains: frozenset[str]):
        self.users = users
        self.throttle = throttle
        self.local_domains = local_domains
        self._executor = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, "auth")

    async def check(self, login: str, password: str, client_ip: str, service: str,
                    secure: bool) -> str | None:
        """The user's name if the password is right, else None once the failure's
        delay has passed. `secure`: over TLS (for the log)."""
        name = normalize_login(login, self.local_domains)
        how = "TLS" if secure else "plain"
        ok = False
        if self.users is not None:
            loop = asyncio.get_running_loop()
            # An unusable name is checked as an unknown user: the same time either way.
            ok = await loop.run_in_executor(self._executor, self.users.verify, name or "",
                                            password) and name is not None
        shown = _printable(login)
        if ok:
            log.info("%s login: user=<%s>, client=[%s], %s", service, name, client_ip, how)
            return name
        delay = (self.throttle.record_failure(client_ip, time.monotonic())
                 if self.throttle is not None else FIRST_DELAY_S)
        log.warning("%s login failed: user=<%s>, client=[%s], %s%s", service, shown, client_ip,
                    how, "" if self.users is not None else " (no users_file configured)")
        await asyncio.sleep(delay)
        return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _printable(text: str, limit: int = 64) -> str:
    return "".join(c if c.isprintable() and c not in "<>" else "?" for c in text[:limit])
