"""Connections per client IP, counted over all workers (Postfix's anvil, without a server).

Owns: shared memory with one region per scoreboard slot.
Each worker writes only its own region (an open-addressing table of IP key -> open
connections) and reads everyone's to decide; no locks are needed, and when a worker
dies the master wipes its region, so a crash leaks no counts. A read racing a write
may be off by one for a moment, which a connection limit can live with.
Must not: block; if a region is full the worker stops counting new IPs (fails open)
rather than refuse mail.
"""

from __future__ import annotations

import hashlib
import mmap
import struct

ENTRY = struct.Struct("=Qq")          # IP key (0 = empty), open connections
ENTRIES_PER_REGION = 4096             # distinct client IPs one worker can track at once
REGION_BYTES = ENTRY.size * ENTRIES_PER_REGION
MAX_KEYS = ENTRIES_PER_REGION * 3 // 4   # keep probe chains short
MAX_REGIONS = 256                     # slots beyond this are not counted (fail open)


def client_key(ip: str) -> int:
    return int.from_bytes(hashlib.blake2b(ip.encode(), digest_size=8).digest(), "little") | 1


class Anvil:
    """Anonymous shared memory made by the master before it forks: no file, so a full
    disk cannot fault a page in (SIGBUS), and nothing is left behind."""

    def __init__(self) -> None:
        # MAP_SHARED | MAP_ANONYMOUS: inherited by every child, pages on first touch.
        self._map = mmap.mmap(-1, REGION_BYTES * MAX_REGIONS)

    def wipe(self, slot: int) -> None:
        """The owner of slot is gone: forget its connections (the master calls this)."""
        if slot < MAX_REGIONS:
            start = slot * REGION_BYTES
            self._map[start:start + REGION_BYTES] = bytes(REGION_BYTES)

    def total(self, ip: str, slots: list[int]) -> int:
        key = client_key(ip)
        return sum(self._find(slot, key)[1] for slot in slots if slot < MAX_REGIONS)

    def _find(self, slot: int, key: int) -> tuple[int, int]:
        """(entry offset or -1, count) of key in a slot's region."""
        base = slot * REGION_BYTES
        index = key % ENTRIES_PER_REGION
        for _ in range(ENTRIES_PER_REGION):
            offset = base + index * ENTRY.size
            found, count = ENTRY.unpack_from(self._map, offset)
            if found == key:
                return offset, count
            if found == 0:
                return -1, 0
            index = (index + 1) % ENTRIES_PER_REGION
        return -1, 0

    def close(self) -> None:
        self._map.close()


class AnvilRegion:
    """One worker's own counts: the truth is the local dict, mirrored to shared memory."""

    def __init__(self, anvil: Anvil, slot: int):
        self.anvil = anvil
        self.slot = slot
        self.counts: dict[str, int] = {}
        self._keys_used = 0
        anvil.wipe(slot)   # whatever a previous owner of the slot left

    def add(self, ip: str, delta: int) -> None:
        count = self.counts.get(ip, 0) + delta
        if count > 0:
            self.counts[ip] = count
        else:
            self.counts.pop(ip, None)
        if self.slot >= MAX_REGIONS:
            return
        key = client_key(ip)
        offset, _ = self.anvil._find(self.slot, key)
        if offset >= 0:
            ENTRY.pack_into(self.anvil._map, offset, key, max(count, 0))
        elif count > 0:
            self._insert(key, count)

    def _insert(self, key: int, count: int) -> None:
        # Keys are never removed (that would break probe chains); when the table
        # fills with zero counts, rebuild it from the local dict.
        if self._keys_used >= MAX_KEYS:
            self._rebuild()
            if self._keys_used >= MAX_KEYS:
                return   # thousands of distinct IPs at once: stop counting new ones
        self._put(key, count)

    def _put(self, key: int, count: int) -> None:
        base = self.slot * REGION_BYTES
        index = key % ENTRIES_PER_REGION
        while True:
            offset = base + index * ENTRY.size
            if ENTRY.unpack_from(self.anvil._map, offset)[0] == 0:
                ENTRY.pack_into(self.anvil._map, offset, key, count)
                self._keys_used += 1
                return
            index = (index + 1) % ENTRIES_PER_REGION

    def _rebuild(self) -> None:
        self.anvil.wipe(self.slot)
        self._keys_used = 0
        for ip, count in list(self.counts.items())[:MAX_KEYS]:
            self._put(client_key(ip), count)
