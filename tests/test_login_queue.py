"""The login checker's hash queue and the throttle's look-up cost (auth/login.py,
auth/throttle.py): what keeps a correct login prompt while one address floods the
server with failing ones (the end-to-end test is in test_pop3_hostile.py)."""

from __future__ import annotations

import asyncio
import threading
import time

from prefork_smtp.auth.login import LoginChecker, PriorityPool
from prefork_smtp.auth.throttle import MAX_REGIONS, Throttle, ThrottleRegion


def test_priority_pool_runs_lower_priorities_first_and_in_order_within_one():
    pool = PriorityPool(1, "test")
    gate = threading.Event()
    ran: list[str] = []
    pool.submit(0, gate.wait)                      # holds the only thread
    futures = [pool.submit(p, ran.append, name) for p, name in
               [(15, "flood-1"), (15, "flood-2"), (0, "clean-1"), (2, "once-failed"),
                (0, "clean-2")]]
    gate.set()
    for f in futures:
        f.result(5)
    assert ran == ["clean-1", "clean-2", "once-failed", "flood-1", "flood-2"]
    pool.shutdown()


def test_priority_pool_skips_cancelled_calls_and_passes_exceptions_on():
    pool = PriorityPool(1, "test")
    gate = threading.Event()
    ran: list[int] = []
    pool.submit(0, gate.wait)
    cancelled = pool.submit(0, ran.append, 1)
    assert cancelled.cancel()
    failing = pool.submit(0, lambda: 1 / 0)
    kept = pool.submit(0, ran.append, 2)
    gate.set()
    kept.result(5)
    assert ran == [2]
    assert isinstance(failing.exception(5), ZeroDivisionError)
    pool.shutdown()
    later = PriorityPool(1, "test")
    later.shutdown()
    try:
        later.submit(0, print)
    except RuntimeError:
        pass
    else:
        raise AssertionError("submit after shutdown")


class _SlowUsers:
    """Users.verify stand-in: each check takes 20 ms; "right" is the password."""

    def verify(self, name: str, password: str) -> bool:
        time.sleep(0.02)
        return password == "right"


def test_a_clean_address_is_checked_before_a_queue_of_failing_ones():
    throttle = Throttle(regions=2)
    region = ThrottleRegion(throttle, 0)
    for _ in range(4):
        region.record_failure("192.0.2.66", time.monotonic())
    checker = LoginChecker(_SlowUsers(), region, frozenset({"example.org"}))

    async def run() -> float:
        flood = [asyncio.ensure_future(checker.check("alice", "wrong", "192.0.2.66", "pop3",
                                                     secure=False)) for _ in range(40)]
        await asyncio.sleep(0.05)               # the flood is queued (40 x 20 ms / 2 threads)
        started = time.monotonic()
        assert await checker.check("bob", "right", "192.0.2.7", "pop3", secure=False) == "bob"
        took = time.monotonic() - started
        for f in flood:
            f.cancel()
        return took

    try:
        took = asyncio.run(run())
    finally:
        checker.close()
    # At most the two checks already running and its own: ~60 ms; the whole queue ahead
    # of it would be ~400 ms.
    assert took < 0.2, took


def test_throttle_reads_only_the_regions_in_use():
    throttle = Throttle()
    assert throttle._used_regions() == []
    a, b = ThrottleRegion(throttle, 3), ThrottleRegion(throttle, MAX_REGIONS - 1)
    now = time.monotonic()
    a.record_failure("198.51.100.1", now)
    assert throttle._used_regions() == [3]
    assert b.record_failure("198.51.100.1", now + 1) == 4.0     # counted on from a's
    assert throttle._used_regions() == [3, MAX_REGIONS - 1]
    assert throttle.run("198.51.100.1", now + 2) == (2, now + 1)
    # A region's flag survives its rebuild (and a new owner of the slot adopts it).
    assert ThrottleRegion(throttle, 3).entries
    started = time.perf_counter()
    for _ in range(1000):
        throttle.delay_for("203.0.113.9", now)
    # Was ~120 us a look-up with all 256 regions read; a generous bound for 2 regions.
    assert (time.perf_counter() - started) / 1000 < 60e-6
