#!/usr/bin/env python3
"""Where the time of one session goes (scenario E, step by step), per flush time.

    python3 bench/steps.py                   # ccsmtp, fast disk and 8 ms flushes
    python3 bench/steps.py --flush-ms 0,2,8 --sessions 400

Starts ccsmtp (-w 2) with the slow-disk shim (slowdisk.py), runs SESSIONS sessions
one after the other over a raw socket, and prints the median of each step:
connect..220, EHLO..250, MAIL+RCPT+DATA (pipelined)..354, the body..250 (the
commit), QUIT..221; and from the shim's log, the sync calls and flushes per session
and how long a commit's sync waited. Needs gcc.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import slowdisk  # noqa: E402
from servers import REPO, free_port, wait_for_greeting  # noqa: E402

BODY = b"Subject: step\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n"
STEPS = ("connect..220", "EHLO..250", "MAIL/RCPT/DATA..354", "body..250", "QUIT..221")


def reply(sock: socket.socket, count: int = 1) -> None:
    data = b""
    while data.count(b"\r\n") < count or not _complete(data, count):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk


def _complete(data: bytes, count: int) -> bool:
    lines = data.split(b"\r\n")[:-1]
    return sum(1 for line in lines if line[3:4] != b"-") >= count


def session(port: int) -> list[float]:
    marks = [time.perf_counter()]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        reply(sock)
        marks.append(time.perf_counter())
        for data, count in ((b"EHLO steps.test\r\n", 1),
                            (b"MAIL FROM:<a@steps.test>\r\nRCPT TO:<steps@example.org>\r\nDATA\r\n", 3),
                            (BODY, 1), (b"QUIT\r\n", 1)):
            sock.sendall(data)
            reply(sock, count)
            marks.append(time.perf_counter())
    return [(b - a) * 1000 for a, b in zip(marks, marks[1:])]


def run(flush_ms: float, sessions: int, base: Path, shim: Path) -> None:
    device = slowdisk.Device(base / f"device-{flush_ms:g}", shim)
    device.set_flush_ms(flush_ms)
    sync_log = base / f"sync-{flush_ms:g}.log"
    port = free_port()
    spool = base / f"spool-{flush_ms:g}"
    config = base / "ccsmtp.toml"
    config.write_text("max_connections_per_client = 0\n")
    args = [sys.executable, str(REPO / "bin" / "ccsmtp-master"), "-w", "2", "-l", f"127.0.0.1:{port}",
            "-s", str(spool), "-d", "example.org", "-c", str(config),
            "--log-file", str(base / "ccsmtp.log")]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    env = dict(os.environ, **device.env(), SLOWSYNC_LOG=str(sync_log))
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_greeting(port, proc, "ccsmtp", None)
        for _ in range(20):
            session(port)            # warm-up
        sync_log.write_text("")
        os.chmod(sync_log, 0o666)
        calls_before, flushes_before = device.counters()
        started = time.monotonic_ns()
        times = [session(port) for _ in range(sessions)]
        ended = time.monotonic_ns()
        calls_after, flushes_after = device.counters()
    finally:
        proc.terminate()
        proc.wait(30)
    calls = [line.split() for line in sync_log.read_text().splitlines()]
    calls = [c for c in calls if started <= int(c[3]) <= ended]
    waits = [(int(c[4]) - int(c[3])) / 1e6 for c in calls]
    kinds: dict[str, int] = {}
    for c in calls:
        kinds[c[1]] = kinds.get(c[1], 0) + 1
    total = statistics.median(sum(t) for t in times)
    print(f"\nflush {flush_ms:g} ms: {sessions} sessions one at a time, median whole session "
          f"{total:.2f} ms")
    for i, step in enumerate(STEPS):
        print(f"  {step:22} {statistics.median(t[i] for t in times):7.2f} ms")
    print(f"  sync calls per session {(calls_after - calls_before) / sessions:.2f}"
          + (f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
             f"flushes per session {(flushes_after - flushes_before) / sessions:.2f}"
             if flush_ms else ""))
    if waits and flush_ms:
        print(f"  a sync call waited: median {statistics.median(waits):.2f} ms, "
              f"max {max(waits):.2f} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flush-ms", default="0,8")
    p.add_argument("--sessions", type=int, default=300)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ccsmtp-steps-"))
    os.chmod(base, 0o755)
    try:
        shim = slowdisk.build(base)
        for ms in args.flush_ms.split(","):
            run(float(ms), args.sessions, base, shim)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
