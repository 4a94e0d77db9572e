"""Checking a login for a session of any service (POP3, IMAP): SPEC §9.

Owns: what happens between a client's user name and password and the session's answer:
the name normalised (lower-cased, name@LOCALDOMAIN is name), the password checked in a
thread (a hash costs tens of milliseconds and must never block the worker's loop), an
unknown user checked against a stand-in hash so that it takes as long, the reply to a
failure held back per client address (throttle.py, shared by every worker), and one
log line per attempt naming the service, the user and the client — never a password.
Must not: decide whether a password may be sent at all (plain text off loopback): the
protocol never hands one over then.

Checks wait their turn for the hash threads in order of the client address's current
delay, clean addresses first (FIFO within one delay): a flood of failing logins from
one address (1,000 connections queue 1,000 hashes, seconds of CPU) must not hold up
another client's correct login behind them, which then waits for at most the checks
already running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable

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
        self._pool = PriorityPool(HASH_THREADS, "auth")

    async def check(self, login: str, password: str, client_ip: str, service: str,
                    secure: bool) -> str | None:
        """The user's name if the password is right, else None once the failure's
        delay has passed. `secure`: over TLS (for the log)."""
        name = normalize_login(login, self.local_domains)
        how = "TLS" if secure else "plain"
        ok = False
        if self.users is not None:
            # Behind every check from an address with a smaller delay (clean ones: 0).
            priority = (self.throttle.delay_for(client_ip, time.monotonic())
                        if self.throttle is not None else 0.0)
            # An unusable name is checked as an unknown user: the same time either way.
            ok = await asyncio.wrap_future(self._pool.submit(
                priority, self.users.verify, name or "", password)) and name is not None
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
        self._pool.shutdown()


class PriorityPool:
    """A few threads running submitted calls lowest priority first, in submission order
    within one priority. A call cancelled before it starts is skipped."""

    def __init__(self, threads: int, name: str):
        self._heap: list[tuple[float, int, concurrent.futures.Future, Callable, tuple]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        for n in range(threads):
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True).start()

    def submit(self, priority: float, function: Callable[..., Any],
               *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            heapq.heappush(self._heap, (priority, next(self._order), future, function, args))
            self._wake.notify()
        return future

    def shutdown(self) -> None:
        """Cancel what has not started; running calls finish on their own."""
        with self._wake:
            self._closed = True
            for _, _, future, _, _ in self._heap:
                future.cancel()
            self._heap.clear()
            self._wake.notify_all()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._heap and not self._closed:
                    self._wake.wait()
                if not self._heap:
                    return
                _, _, future, function, args = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args)
            except BaseException as e:    # handed to the waiting session, as an executor does
                future.set_exception(e)
            else:
                future.set_result(result)


def _printable(text: str, limit: int = 64) -> str:
    return "".join(c if c.isprintable() and c not in "<>" else "?" for c in text[:limit])
