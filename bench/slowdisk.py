"""Slow disks for the benchmark: the slowsync.so shim and one modelled device per server.

Owns: building bench/slowsync.c with gcc into the bench's temp directory, the state
file each server's processes share (the shim maps it: flush time, time the latest
flush ends, counters), setting a device's flush time between phases of a run, and
reading its counters (sync calls made, flushes started) for the flush accounting.
Must not: start servers (servers.py does, with env() in their environment).
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "slowsync.c"
# struct device in slowsync.c: flush_ns, last_end_ns, flushes, calls (u64 each)
_LAYOUT = struct.Struct("=QQQQ")


class ShimError(Exception):
    pass


def build(directory: Path) -> Path:
    """Compile the shim into DIRECTORY (world-readable: Postfix's daemons load it)."""
    if shutil.which("gcc") is None:
        raise ShimError("gcc not found (apt-get install gcc): slow-disk phases need it")
    target = directory / "slowsync.so"
    result = subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(target),
                             str(SOURCE), "-ldl"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ShimError(f"building slowsync.so failed: {result.stderr.strip()[-500:]}")
    os.chmod(target, 0o755)
    return target


class Device:
    """One server's modelled disk: a state file its processes share through the shim."""

    def __init__(self, path: Path, shim: Path | None):
        self.path = path
        self.shim = shim
        with open(path, "wb") as f:
            f.write(bytes(4096))
        os.chmod(path, 0o666)   # the servers' unprivileged users update it
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 4096)
        finally:
            os.close(fd)

    def env(self) -> dict[str, str]:
        """What a server's environment needs for its syncs to go through this device."""
        if self.shim is None:
            return {}
        return {"LD_PRELOAD": str(self.shim), "SLOWSYNC_STATE": str(self.path)}

    def set_flush_ms(self, ms: float) -> None:
        struct.pack_into("=Q", self._map, 0, int(ms * 1e6))

    def counters(self) -> tuple[int, int]:
        """(sync calls made, flushes started) since the device was created."""
        _, _, flushes, calls = _LAYOUT.unpack_from(self._map, 0)
        return calls, flushes
