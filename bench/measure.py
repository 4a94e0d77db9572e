"""What the benchmark measures on the server side: CPU, memory, delivered messages.

Owns: the process tree of a server (CPU time including reaped children, peak RSS
per process through the kernel's VmHWM, a sampled peak of the tree's total PSS)
and counting messages in mbox files as they grow.
Must not: start or stop anything, or talk SMTP.
"""

from __future__ import annotations

import re
import threading
import time

import psutil

SAMPLE_S = 0.1          # tree PSS sampling period
REFRESH_TREE_S = 0.5    # how often the sampler looks for new processes


class ProcessTree:
    """A server's processes: ROOT and everything below it (several roots: several
    instances taken as one server)."""

    def __init__(self, root_pid: int, *more_roots: int):
        self.root_pid = root_pid
        self.roots = (root_pid,) + more_roots

    def pids(self) -> list[int]:
        pids = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                pids += [root.pid] + [p.pid for p in root.children(recursive=True)]
            except psutil.Error:
                continue
        return pids

    def cpu_s(self) -> float:
        """User+system CPU of every live process plus what their reaped children used.

        A child that exits moves its time into its parent's children_* counters, so
        the sum does not drop when a Postfix smtpd or a ccsmtp worker goes away.
        """
        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def reset_peaks(self) -> None:
        """Make each process's VmHWM its current RSS (Linux clear_refs "5")."""
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_rss(self) -> tuple[int, int]:
        """(largest VmHWM of one process, sum of the VmHWMs) in bytes since reset_peaks()."""
        peaks = []
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status", "rb") as f:
                    match = re.search(rb"VmHWM:\s+(\d+) kB", f.read())
            except OSError:
                continue
            if match:
                peaks.append(int(match.group(1)) * 1024)
        return (max(peaks, default=0), sum(peaks))

    def pss(self) -> int:
        return sum(_pss(pid) for pid in self.pids())


def _pss(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them,
    so that 100 Postfix smtpd processes are not counted as 100 copies of libc."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            match = re.search(rb"^Pss:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


class PssSampler:
    """Samples the total PSS of a tree in a thread; .peak is the largest total seen."""

    def __init__(self, tree: ProcessTree, enabled: bool = True):
        self.tree = tree
        self.enabled = enabled
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PssSampler":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    def _run(self) -> None:
        pids: list[int] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed > REFRESH_TREE_S:
                pids, refreshed = self.tree.pids(), now
            self.peak = max(self.peak, sum(_pss(pid) for pid in pids))
            self._stop.wait(SAMPLE_S)


class MboxCounter:
    """Counts messages ("From " at the start of a line, mboxrd) in one mbox file.

    Reads only what was appended since the last call, so polling a growing 200 MB
    file costs one pass over it in total.
    """

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._offset = 0      # always at the start of a line

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        # Count whole lines only; a line still being written is read again next time.
        complete = data[:data.rfind(b"\n") + 1]
        if complete.startswith(b"From "):
            self.count += 1
        self.count += complete.count(b"\nFrom ")
        self._offset += len(complete)
        return self.count


def message_ids(path: str, run_id: str) -> list[bytes]:
    """Message-IDs of one ccsmtp-send run found in an mbox (duplicates kept)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return re.findall(rb"(?im)^Message-ID: <(" + re.escape(run_id.encode()) + rb"\.\d+)@", data)
