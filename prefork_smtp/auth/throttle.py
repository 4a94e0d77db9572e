"""Failed-login delays per client address, shared by every worker (SPEC §9).

The reply to a failed login waits 2 s, doubling with each further failure from the same
address (4, 8, ...), at most 15 s; an address is forgotten after 5 minutes without a
failure. A correct login is not delayed, and it does not wipe the count: otherwise one
account an attacker owns would reset its address between guesses at the others.

Owns: anonymous shared memory made by the master before it forks (as process/anvil.py),
one region per scoreboard slot. Each worker writes only its own region, an open-addressing
table of address key -> (failures in the current run, time of the last one), and reads
every region: the entry with the latest failure carries the run's count, because a writer
counts on from what all regions say. No locks, so nothing can deadlock and a worker
killed at any moment leaves nothing held; its entries stay and keep counting (a slot's
next owner adopts them). Two workers failing the same address in the same instant may
count one failure instead of two, and a read racing a write may see the old entry:
a delay off by one step, once.
Addresses: an IPv4-mapped IPv6 address counts as its IPv4 address; IPv6 counts per /48,
as Dovecot's auth penalty (PENALTY_IPV6_MASK_BITS), so one host cannot walk its /64.
Keys are a keyed hash (a secret drawn by the master), so clients cannot choose addresses
that pile up on one probe chain.
Time: the caller passes `now`, from time.monotonic() (one clock for every process on
Linux), so tests need no sleeping.
Must not: block, allocate per client beyond its fixed table, or log.
Fails open: a worker whose region is full first drops entries older than 5 minutes,
then the addresses whose last failure is oldest; a slot past MAX_REGIONS records
nothing. Either way some address is delayed less than it should be, never a client
delayed (or refused) for failures it did not make, and the worker never stalls.
"""

from __future__ import annotations

import hashlib
import ipaddress
import mmap
import os
import struct

FIRST_DELAY_S = 2.0
MAX_DELAY_S = 15.0
FORGET_S = 300.0                      # 5 minutes without a failure
IPV6_PREFIX_BITS = 48                 # Dovecot auth-penalty.c

ENTRY = struct.Struct("=QdI4x")       # address key (0 = empty), last failure (monotonic s), failures
ENTRIES_PER_REGION = 1024             # addresses one worker can hold within 5 minutes
MAX_KEYS = ENTRIES_PER_REGION * 3 // 4   # keep probe chains short
REBUILD_KEEP = ENTRIES_PER_REGION // 2   # a full region is rebuilt down to this many...
REBUILD_ABOVE = (MAX_KEYS + REBUILD_KEEP) // 2   # ...if more than this are still live
MAX_REGIONS = 256                     # slots beyond this record nothing (fail open)
REGION_BYTES = ENTRY.size * ENTRIES_PER_REGION
MAX_COUNT = 64                        # the delay stopped growing long before


def delay_after(failures: int) -> float:
    """The delay owed to the `failures`-th failure of a run (0: none)."""
    if failures <= 0:
        return 0.0
    return min(FIRST_DELAY_S * 2.0 ** (min(failures, MAX_COUNT) - 1), MAX_DELAY_S)


def client_ident(ip: str) -> str:
    """What is counted for a client address: IPv4 as is, IPv6 by its /48."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip   # not an address (e.g. a UNIX socket): counted under its own text
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX_BITS), strict=False))
    return str(address)


class Throttle:
    """The shared table: made by the master before forking (no file, so no SIGBUS on a
    full disk and nothing left behind), read by every worker. At most
    MAX_REGIONS * REGION_BYTES (6 MiB), paged in as touched. After the regions, one
    byte per region says whether its slot ever wrote there: a look-up reads only
    those (a few) instead of all MAX_REGIONS, so it stays cheap on the event loop
    (a flood of failing logins makes two look-ups per attempt)."""

    def __init__(self, regions: int = MAX_REGIONS):
        self.regions = regions
        self._used_at = REGION_BYTES * regions
        self._map = mmap.mmap(-1, self._used_at + regions)  # MAP_SHARED | MAP_ANONYMOUS
        self._secret = os.urandom(16)                        # inherited by fork

    def key(self, ip: str) -> int:
        digest = hashlib.blake2b(client_ident(ip).encode(), digest_size=8, key=self._secret)
        return int.from_bytes(digest.digest(), "little") | 1   # never 0 (empty)

    def run(self, ip: str, now: float) -> tuple[int, float]:
        """(failures, time of the last) of this address's current run over all workers;
        (0, 0.0) if it had none in the last FORGET_S."""
        return self._run(self.key(ip), now)

    def delay_for(self, ip: str, now: float) -> float:
        """The delay owed to this address's latest failure (0 if none within 5 minutes):
        after record_failure, how long to hold the reply to it."""
        return delay_after(self.run(ip, now)[0])

    def retry_after(self, ip: str, now: float) -> float:
        """Seconds until this address's latest delay has run out (0: none running). A
        session may wait this long before checking another password from the address, so
        that dropping the connection does not skip the delay."""
        failures, last = self.run(ip, now)
        return max(0.0, last + delay_after(failures) - now) if failures else 0.0

    def _run(self, key: int, now: float) -> tuple[int, float]:
        failures, last = 0, 0.0
        for region in self._used_regions():
            found = self._find(region, key)[1:]
            if found[0] and found[1] > last:
                failures, last = found
        if not failures or now - last >= FORGET_S:
            return 0, 0.0
        return failures, last

    def _used_regions(self) -> list[int]:
        flags = self._map[self._used_at:self._used_at + self.regions]
        out, region = [], flags.find(1)
        while region >= 0:
            out.append(region)
            region = flags.find(1, region + 1)
        return out

    def _mark_used(self, region: int) -> None:
        """Set once, by the region's own writer, before its first entry."""
        self._map[self._used_at + region] = 1

    def _find(self, region: int, key: int) -> tuple[int, int, float]:
        """(entry offset or -1, failures, last) of key in a region."""
        base = region * REGION_BYTES
        index = key % ENTRIES_PER_REGION
        for _ in range(ENTRIES_PER_REGION):
            offset = base + index * ENTRY.size
            found, last, failures = ENTRY.unpack_from(self._map, offset)
            if found == key:
                return offset, failures, last
            if found == 0:
                break
            index = (index + 1) % ENTRIES_PER_REGION
        return -1, 0, 0.0

    def close(self) -> None:
        self._map.close()


class ThrottleRegion:
    """One worker's writing end: its slot's region (adopting what a previous owner of
    the slot left there), mirrored in a local dict so that a full region can be rebuilt."""

    def __init__(self, throttle: Throttle, slot: int):
        self.throttle = throttle
        self.slot = slot
        self.entries: dict[int, tuple[int, float]] = {}   # key -> (failures, last)
        if slot < throttle.regions:
            self._adopt()

    def record_failure(self, ip: str, now: float) -> float:
        """Count a failed login from ip; returns how long to hold the reply to it."""
        key = self.throttle.key(ip)
        failures = min(self.throttle._run(key, now)[0] + 1, MAX_COUNT)
        if self.slot < self.throttle.regions:
            self._write(key, failures, now)
        return delay_after(failures)

    def delay_for(self, ip: str, now: float) -> float:
        return self.throttle.delay_for(ip, now)

    def retry_after(self, ip: str, now: float) -> float:
        return self.throttle.retry_after(ip, now)

    def _write(self, key: int, failures: int, now: float) -> None:
        offset = self.throttle._find(self.slot, key)[0]
        if offset < 0:
            if len(self.entries) >= MAX_KEYS:
                self._rebuild(now)
            offset = self._free_offset(key)
            self.throttle._mark_used(self.slot)
        self.entries[key] = (failures, now)
        ENTRY.pack_into(self.throttle._map, offset, key, now, failures)

    def _free_offset(self, key: int) -> int:
        base = self.slot * REGION_BYTES
        index = key % ENTRIES_PER_REGION
        while True:   # MAX_KEYS < ENTRIES_PER_REGION: an empty entry exists
            offset = base + index * ENTRY.size
            if ENTRY.unpack_from(self.throttle._map, offset)[0] == 0:
                return offset
            index = (index + 1) % ENTRIES_PER_REGION

    def _rebuild(self, now: float) -> None:
        """Entries are never removed one by one (that would cut probe chains): drop the
        forgotten ones, then the stalest, and write the region anew in one copy."""
        live = {k: v for k, v in self.entries.items() if now - v[1] < FORGET_S}
        # Leave room for a good many inserts before the next rebuild, so a flood of new
        # addresses costs one 24 KiB copy per hundred-odd failures, not one per failure.
        if len(live) > REBUILD_ABOVE:
            newest = sorted(live.items(), key=lambda item: item[1][1])[-REBUILD_KEEP:]
            live = dict(newest)
        table = bytearray(REGION_BYTES)
        for key, (failures, last) in live.items():
            index = key % ENTRIES_PER_REGION
            while ENTRY.unpack_from(table, index * ENTRY.size)[0]:
                index = (index + 1) % ENTRIES_PER_REGION
            ENTRY.pack_into(table, index * ENTRY.size, key, last, failures)
        start = self.slot * REGION_BYTES
        self.throttle._map[start:start + REGION_BYTES] = table
        self.entries = live

    def _adopt(self) -> None:
        base = self.slot * REGION_BYTES
        for index in range(ENTRIES_PER_REGION):
            key, last, failures = ENTRY.unpack_from(self.throttle._map, base + index * ENTRY.size)
            if key:
                self.entries[key] = (failures, last)
