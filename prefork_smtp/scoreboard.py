"""The scoreboard: a small shared-memory file where each process posts how it is doing.

Owns: one fixed-size slot per process (pid, worker number, start time, heartbeat,
sessions now, messages so far), written by its owner and read by the master (for the
heartbeat) and by ccsmtp-status. Like Apache's scoreboard; the heartbeat replaces
gunicorn's "touch a temp file". Lives at SPOOL/.ccsmtp/scoreboard.
Must not: hold anything secret (ccsmtp-status reads it).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import time

from .fsutil import write_all

SLOT = struct.Struct("=qqqddqqq")   # 64 bytes a slot
MAX_SLOTS = 1100                     # 1024 workers, old generations during a reload, delivery


@dataclasses.dataclass(frozen=True, slots=True)
class SlotInfo:
    slot: int
    pid: int
    worker_id: int          # -1: the delivery process
    generation: int
    started: float          # time.time()
    heartbeat: float        # time.monotonic(), comparable across processes on Linux
    sessions: int
    messages: int
    served: int             # sessions accepted so far


class Scoreboard:
    def __init__(self, path: str, *, create: bool = False):
        self.path = path
        size = SLOT.size * MAX_SLOTS
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC if create else os.O_RDONLY | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        try:
            if create:
                # Real zeros, not a sparse ftruncate: on a full disk the first write to
                # a page with no block behind it would kill us with SIGBUS.
                os.ftruncate(fd, 0)
                write_all(fd, [bytes(size)])
            access = mmap.ACCESS_WRITE if create else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, size, access=access)
        finally:
            os.close(fd)

    def free_slot(self, taken: set[int]) -> int:
        for slot in range(MAX_SLOTS):
            if slot not in taken:
                return slot
        raise RuntimeError("scoreboard full")

    def claim(self, slot: int, pid: int, worker_id: int, generation: int) -> None:
        now = time.monotonic()
        SLOT.pack_into(self._map, slot * SLOT.size, pid, worker_id, generation, time.time(),
                       now, 0, 0, 0)

    def beat(self, slot: int, sessions: int, messages: int, served: int = 0) -> None:
        offset = slot * SLOT.size
        pid, worker_id, generation, started, *_ = SLOT.unpack_from(self._map, offset)
        SLOT.pack_into(self._map, offset, pid, worker_id, generation, started, time.monotonic(),
                       sessions, messages, served)

    def release(self, slot: int) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, 0, 0, 0, 0.0, 0.0, 0, 0, 0)

    def read(self, slot: int) -> SlotInfo:
        return SlotInfo(slot, *SLOT.unpack_from(self._map, slot * SLOT.size))

    def live(self) -> list[SlotInfo]:
        return [info for info in map(self.read, range(MAX_SLOTS)) if info.pid]

    def close(self) -> None:
        self._map.close()
