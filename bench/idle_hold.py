#!/usr/bin/env python3
"""Scenario D past what run.py's load client reaches: N idle connections held by plain
blocking clients, then fresh clients greeted and served (issue 12, part 4).

run.py's D opens its idle connections with ccsmtp-send (asyncio, 256 connects in
flight per process): on two cores shared with the server, that client stalls at
about 40,000 connections. Here holder processes (one per 17,000 connections, each
from its own 127.0.3.K source address, as a descriptor limit of 20,000 allows) connect
one at a time and read each greeting; once all are held, three fresh clients connect
one after the other, time their 220 and send a message. Prints connections held,
each fresh client's connect..220, the workers' RSS and the RSS per idle connection
(workers' RSS growth over the connections held).

    sudo python3 bench/idle_hold.py [--idle 50000] [--workers 4]

As root the server runs as nobody, as in the bench. About 1-2 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import DOMAIN, REPO, free_port  # noqa: E402

PER_HOLDER = 17000
HOLDER = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, source, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
held, failed = [], 0
for _ in range(count):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        if s.recv(512).startswith(b"220"):
            held.append(s)
            continue
    except OSError:
        pass
    failed += 1
    s.close()
print(len(held), failed, flush=True)
sys.stdin.read()          # hold until the bench closes our stdin
"""


def workers_rss(master: psutil.Process) -> list[int]:
    return [c.memory_info().rss for c in master.children()
            if "worker" in " ".join(c.cmdline())]


def fresh_client(port: int) -> tuple[float, bool]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        greeting = s.recv(512)
        greeted_ms = (time.monotonic() - started) * 1000
        s.sendall(("EHLO fresh.test\r\nMAIL FROM:<bench@bench.test>\r\n"
                   f"RCPT TO:<fresh@{DOMAIN}>\r\nDATA\r\n").encode())
        reply = b""
        while reply.count(b"\r\n") < 4 + reply.count(b"250-"):
            reply += s.recv(4096)
        s.sendall(b"Subject: fresh\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        reply = b""
        while b"221" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return greeted_ms, greeting.startswith(b"220") and b"250 2.0.0" in reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=50000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ccsmtp-idle-"))
    os.chmod(base, 0o755)
    port = free_port()
    (base / "ccsmtp.toml").write_text("max_connections_per_client = 0\n")
    cmd = [sys.executable, str(REPO / "bin" / "ccsmtp-master"), "-w", str(args.workers),
           "-l", f"127.0.0.1:{port}", "-s", str(base / "spool"), "-d", DOMAIN,
           "-c", str(base / "ccsmtp.toml"), "--log-file", str(base / "ccsmtp.log")]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    holders: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("idle_hold: the server did not start")
                time.sleep(0.1)
        time.sleep(1)
        master = psutil.Process(server.pid)
        rss_before = sum(workers_rss(master))
        started = time.monotonic()
        left = args.idle
        k = 0
        while left > 0:
            n = min(PER_HOLDER, left)
            k += 1
            holders.append(subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(port), f"127.0.3.{k}", str(n)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            left -= n
        held = failed = 0
        for h in holders:
            got, lost = map(int, h.stdout.readline().split())
            held, failed = held + got, failed + lost
        open_s = time.monotonic() - started
        time.sleep(1)
        rss = workers_rss(master)
        probes = [fresh_client(port) for _ in range(3)]
        print(f"D with plain blocking clients: ccsmtp -w {args.workers}, {args.idle} asked")
        print(f"held {held} (failed {failed}) in {open_s:.1f} s")
        print("fresh clients: connect..220 " +
              ", ".join(f"{ms:.1f} ms" for ms, _ in probes) +
              f"; messages accepted {sum(ok for _, ok in probes)}/3")
        print("workers' RSS: " + ", ".join(f"{r / 2**20:.0f} MB" for r in rss) +
              f"; per idle connection {(sum(rss) - rss_before) / max(1, held) / 1024:.1f} KB")
        return 0 if held == args.idle and all(ok for _, ok in probes) else 1
    finally:
        for h in holders:
            h.kill()
            h.wait()
        server.terminate()
        server.wait(30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
