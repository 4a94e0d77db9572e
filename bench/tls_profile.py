#!/usr/bin/env python3
"""Where a ccsmtp worker's time goes under scenario T's load (issue 8): py-spy samples.

Starts ccsmtp (`-w 2`, a trustme certificate, an smtps listener) under a temp
directory, drives it with ccsmtp-send (1 KB, a new connection per message, 20
sessions) in plain text, with STARTTLS and with implicit TLS one after the other,
and meanwhile records every worker with `py-spy record --native`. For each mode it
prints the server's and the client's CPU per message and how the workers' event-loop
threads spent their busy samples, each sample counted once, by the innermost layer
it was in:

    openssl     OpenSSL, entered through the _ssl module: the handshake
                (SSLObject.do_handshake), or records and close_notify (read, write,
                shutdown)
    sslproto    asyncio's TLS layer in Python (asyncio/sslproto.py, ssl.py)
    asyncio     the rest of the event loop and its socket transports
    syscalls    send/recv/epoll_ctl/close... called from those
    ccsmtp:X    ccsmtp's own code, by package (smtp, net, store, process)
    logging     the standard library's logging
Idle samples (epoll_wait) and other threads (the commit thread, the I/O pools) are
left out: on two cores the question is what the loop does per message.

    sudo python3 bench/tls_profile.py [--count 4000] [--modes plain,starttls,smtps]

Needs py-spy (pip install py-spy) and trustme; root, to read the workers' memory
(py-spy) when they run as nobody. About 1 minute.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import ProcessTree  # noqa: E402
from servers import DOMAIN, REPO, Ccsmtp, make_tls_files  # noqa: E402

SEND = [sys.executable, str(REPO / "bin" / "ccsmtp-send")]
RATE = 200              # py-spy samples per second and thread
DURATION_S = 6          # recorded, from 1 s after the load began
LAYERS = ("openssl: handshake", "openssl: records, close", "sslproto", "asyncio", "syscalls",
          "ccsmtp:smtp", "ccsmtp:net", "ccsmtp:store", "ccsmtp:process", "logging", "other")
SYSCALLS = {"send", "recv", "sendto", "recvfrom", "epoll_ctl", "close", "accept4", "shutdown",
            "__libc_send", "__libc_recv", "getpid", "fcntl64", "fstat64", "__close"}


def layer(frame: str) -> str | None:
    """The layer one py-spy frame ("func (path:line)" or "func (lib.so)") belongs to."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    func, path = (match.group(1), match.group(2)) if match else (frame, "")
    if "libssl" in path or "libcrypto" in path or func.startswith("_ssl_") or "_ssl.c" in path:
        return "openssl"
    if path.endswith("sslproto.py") or path in ("ssl.py",) or path.endswith("/ssl.py"):
        return "sslproto"
    if "prefork_smtp/" in path:
        package = path.split("prefork_smtp/", 1)[1].split("/")[0]
        return f"ccsmtp:{package}" if f"ccsmtp:{package}" in LAYERS else "other"
    if "logging/" in path:
        return "logging"
    if path.startswith("asyncio/") or "/asyncio/" in path or "selectors.py" in path:
        return "asyncio"
    if func in SYSCALLS:
        return "syscalls"
    return None


def classify(raw: Path) -> tuple[collections.Counter, int, int]:
    """(busy event-loop samples by layer, busy samples, event-loop samples) of a py-spy
    raw file (one "frame;frame;... count" line per stack)."""
    layers: collections.Counter = collections.Counter()
    busy = loop_samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        if not any("BaseEventLoop._run_once" in f for f in frames):
            continue                      # another thread: commit, I/O pools
        loop_samples += n
        if "epoll_wait" in frames[-1] or "select_epoll_poll" in frames[-1]:
            continue                      # idle
        busy += n
        found = next((c for c in map(layer, reversed(frames)) if c), "other")
        if found == "openssl":
            handshake = any("do_handshake" in f for f in frames)
            found = "openssl: handshake" if handshake else "openssl: records, close"
        layers[found] += n
    return layers, busy, loop_samples


def workers_of(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children()
            if "worker" in " ".join(p.cmdline())]


def run_mode(mode: str, server: Ccsmtp, ca: Path, count: int, out: Path) -> dict:
    address = server.address("smtps" if mode == "smtps" else "")
    cmd = SEND + ["--server", address, "--from", "bench@bench.test", "--helo", "bench.test",
                  "--count", str(count), "--concurrency", "20", "--size", "1024", "--json",
                  "--rotate"] + [f"--to=p{i}@{DOMAIN}" for i in range(20)]
    if mode != "plain":
        cmd += ["--starttls" if mode == "starttls" else "--tls", "--cafile", str(ca)]
    tree = ProcessTree(server.root_pid())
    cpu_before = tree.cpu_s()
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)                                  # past the start and the first handshakes
    spies = []
    for pid in workers_of(server.root_pid()):
        raw = out / f"{mode}-{pid}.raw"
        spies.append((raw, subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--native", "--rate", str(RATE),
             "--duration", str(DURATION_S), "--format", "raw", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    stdout = client.stdout.read()
    _, status, usage = os.wait4(client.pid, 0)       # this child's own CPU, not py-spy's
    client.returncode = os.waitstatus_to_exitcode(status)
    server_ms = (tree.cpu_s() - cpu_before) * 1000
    for _, spy in spies:
        spy.wait(60)
    result = json.loads(stdout)
    accepted = max(1, result["accepted"])
    layers: collections.Counter = collections.Counter()
    busy = loop_samples = 0
    for raw, _ in spies:
        if raw.exists():
            counted, b, s = classify(raw)
            layers += counted
            busy += b
            loop_samples += s
    return {"mode": mode, "msgs_per_s": result["msgs_per_s"], "accepted": result["accepted"],
            "server_ms": server_ms / accepted,
            "client_ms": (usage.ru_utime + usage.ru_stime) * 1000 / accepted,
            "resumed": (result["tls"] or {}).get("resumed_fraction"),
            "layers": layers, "busy": busy, "loop_samples": loop_samples}


def loop_us(r: dict) -> float:
    """Busy event-loop time per message, all workers: busy samples over the messages
    accepted while py-spy recorded (at the run's average rate)."""
    return r["busy"] / RATE * 1e6 / max(1.0, r["msgs_per_s"] * DURATION_S)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=4000, help="messages per mode (default 4000)")
    p.add_argument("--modes", default="plain,starttls,smtps")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("tls_profile: py-spy not found (pip install py-spy)")
    base = Path(tempfile.mkdtemp(prefix="ccsmtp-tlsprof-"))
    base.chmod(0o755)
    server = None
    results = []
    try:
        tls = make_tls_files(base / "tls")
        server = Ccsmtp(base, None, args.workers, tls)
        server.start([])
        for mode in args.modes.split(","):
            r = run_mode(mode, server, tls.ca, args.count, base)
            results.append(r)
            print(f"tls_profile: {mode}: {r['msgs_per_s']:.0f} msg/s", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    header = ["", *(r["mode"] for r in results)]
    rows = [["msg/s", *(f"{r['msgs_per_s']:.0f}" for r in results)],
            ["server CPU ms/msg (whole tree)", *(f"{r['server_ms']:.3f}" for r in results)],
            ["client CPU ms/msg (ccsmtp-send)", *(f"{r['client_ms']:.3f}" for r in results)],
            ["handshakes resumed", *("-" if r["resumed"] is None else f"{r['resumed']:.1%}"
                                     for r in results)],
            ["event loops busy (share of samples)",
             *(f"{r['busy'] / max(1, r['loop_samples']):.0%}" for r in results)],
            ["event loops busy, us/msg (all workers)", *(f"{loop_us(r):.0f}" for r in results)]]
    for name in LAYERS:
        rows.append([f"  {name}", *(f"{r['layers'][name] / max(1, r['busy']):5.1%} "
                                    f"{r['layers'][name] / max(1, r['busy']) * loop_us(r):4.0f}"
                                    for r in results)])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join([row[0].ljust(widths[0])] +
                                [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) + " |")
    print("\n(layer rows: share of the event-loop threads' busy samples, innermost layer wins,"
          " and us per message)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
