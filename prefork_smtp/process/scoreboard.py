"""The scoreboard: a small shared-memory file where each process posts how it is doing.

Owns: one fixed-size slot per process (pid, what kind of process it is, worker
number, start time, heartbeat, sessions now per service, messages so far), written
by its owner and read by the master (for the heartbeat) and by ccsmtp-status. Like Apache's scoreboard; the heartbeat replaces
gunicorn's "touch a temp file". Lives at SPOOL/.ccsmtp/scoreboard.
Must not: hold anything secret (ccsmtp-status reads it).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import time

from ..store.fsutil import write_all

MAX_SERVICES = 4                     # session counters a slot has, one per service family
SLOT = struct.Struct(f"=qiiqddqq{MAX_SERVICES}i")   # 80 bytes a slot
MAX_SLOTS = 1100                     # 1024 workers, old generations during a reload, delivery

# What a slot's process is (0: the slot is free).
WORKER, DELIVERY = 1, 2
KIND_NAMES = {WORKER: "worker", DELIVERY: "delivery"}


@dataclasses.dataclass(frozen=True, slots=True)
class SlotInfo:
    slot: int
    pid: int
    kind: int               # WORKER or DELIVERY
    worker_id: int          # the worker's number (0 for other kinds)
    generation: int
    started: float          # time.time()
    heartbeat: float        # time.monotonic(), comparable across processes on Linux
    messages: int
    served: int             # sessions accepted so far
    sessions: tuple[int, ...]   # open now, per service family (config.SERVICE_FAMILIES)

    @property
    def total_sessions(self) -> int:
        return sum(self.sessions)

    @property
    def role(self) -> str:
        name = KIND_NAMES.get(self.kind, "process")
        return f"{name} {self.worker_id}" if self.kind == WORKER else name


_NO_SESSIONS = (0,) * MAX_SERVICES


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

    def claim(self, slot: int, pid: int, kind: int, worker_id: int, generation: int) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, pid, kind, worker_id, generation, time.time(),
                       time.monotonic(), 0, 0, *_NO_SESSIONS)

    def beat(self, slot: int, messages: int, served: int = 0,
             sessions: tuple[int, ...] = ()) -> None:
        offset = slot * SLOT.size
        pid, kind, worker_id, generation, started, *_ = SLOT.unpack_from(self._map, offset)
        counts = (tuple(sessions) + _NO_SESSIONS)[:MAX_SERVICES]
        SLOT.pack_into(self._map, offset, pid, kind, worker_id, generation, started,
                       time.monotonic(), messages, served, *counts)

    def release(self, slot: int) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, 0, 0, 0, 0, 0.0, 0.0, 0, 0, *_NO_SESSIONS)

    def read(self, slot: int) -> SlotInfo:
        *fields, = SLOT.unpack_from(self._map, slot * SLOT.size)
        return SlotInfo(slot, *fields[:8], tuple(fields[8:]))

    def live(self) -> list[SlotInfo]:
        return [info for info in map(self.read, range(MAX_SLOTS)) if info.pid]

    def close(self) -> None:
        self._map.close()
