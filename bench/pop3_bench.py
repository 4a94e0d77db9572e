"""POP3: ccsmtp beside a private Dovecot POP3 on the same mbox files.

    sudo python3 bench/pop3_bench.py [--rounds 3] [--quick] [--json-out FILE] [--keep]

Scenarios (no deletions, so every round reads the same mailboxes):
  A  one session on a 10,000-message mailbox (~35 MB): log in, LIST, RETR every
     message, QUIT. msgs/s and MB/s of the session, from connect to the QUIT reply.
  B  200 users with 100-message mailboxes, 20 sessions at a time, each doing A's
     steps: sessions/s and msgs/s, from the first connect to the last QUIT reply.
Each round runs both servers, in alternating order; the table shows medians over the
rounds, and each ratio is the median of the per-round ratios (same round, same
machine load). A warm-up round first builds both servers' indexes (ccsmtp's first
login of a mailbox scans it; so does Dovecot's) and checks that both send the same
bytes: LIST sizes and every RETR of A's mailbox, compared with each other.
CPU: user+system time of each server's process tree (with reaped children) per message
retrieved, logins included: steadier than throughput on a shared machine.
Peak RSS: sampled every 50 ms over each server's processes during the measured
rounds: ccsmtp's workers, Dovecot's pop3 (one per session) and auth processes.

The load client is an asyncio POP3 client in this process (one command at a time,
as most clients; --pipeline N keeps N RETRs in flight). It shares the 2 cores with
the servers, as the SMTP bench's client does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pop3_servers import (IS_ROOT, BenchError, CcsmtpPop3, DovecotPop3, Pop3Target,  # noqa: E402
                          dovecot_binary, ids, write_mailbox, write_users, CCSMTP_USER)

PASSWORD = "bench-password"


# --- the load client ---------------------------------------------------------------------

class Pop3Error(Exception):
    pass


class Conn:
    """A lean POP3 client connection: one receive buffer, replies found with
    bytes.find (asyncio's StreamReader costs the client more CPU than the servers
    spend on a RETR, and the client shares the cores with them)."""

    def __init__(self, sock):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int) -> "Conn":
        import socket
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def _fill(self) -> None:
        data = await self.loop.sock_recv(self.sock, 1 << 18)
        if not data:
            raise Pop3Error("connection closed")
        self.buf += data

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def ok(self) -> bytes:
        """One status line, which must be +OK."""
        while (end := self.buf.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        if not line.startswith(b"+OK"):
            raise Pop3Error(line[:200])
        return line

    async def body(self) -> bytes:
        """A multi-line body up to and with its '.' line."""
        start = 0
        while True:
            if self.buf[:3] == b".\r\n":
                end = 3
                break
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                end = i + 5
                break
            start = max(0, len(self.buf) - 4)
            await self._fill()
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def close(self) -> None:
        self.sock.close()


async def session(port: int, user: str, pipeline: int = 1,
                  keep: list[bytes] | None = None) -> tuple[int, int]:
    """Log in, LIST, RETR all, QUIT; returns (messages, octets received in RETR bodies).
    With keep, every message's content (unstuffed) is appended to it."""
    conn = await Conn.open(port)
    try:
        await conn.ok()
        await conn.send(f"USER {user}\r\nPASS {PASSWORD}\r\nLIST\r\n".encode())
        for _ in range(3):
            await conn.ok()
        listing = await conn.body()
        count = listing.count(b"\r\n") - 1
        octets = 0
        sent = 0
        for n in range(1, count + 1):
            if sent < min(count, n - 1 + pipeline):
                last = min(count, n - 1 + pipeline)
                await conn.send(b"".join(b"RETR %d\r\n" % k for k in range(sent + 1, last + 1)))
                sent = last
            await conn.ok()
            body = await conn.body()
            octets += len(body)
            if keep is not None:
                content = body[:-3].replace(b"\r\n..", b"\r\n.")
                keep.append(content[1:] if content.startswith(b"..") else content)
        await conn.send(b"QUIT\r\n")
        await conn.ok()
        return count, octets
    finally:
        conn.close()


async def listing(port: int, user: str) -> list[bytes]:
    conn = await Conn.open(port)
    try:
        await conn.ok()
        await conn.send(f"USER {user}\r\nPASS {PASSWORD}\r\nLIST\r\nQUIT\r\n".encode())
        for _ in range(3):
            await conn.ok()
        body = await conn.body()
        await conn.ok()
        return body.split(b"\r\n")[:-2]
    finally:
        conn.close()


async def scenario_a(port: int, user: str, pipeline: int) -> dict:
    started = time.perf_counter()
    messages, octets = await session(port, user, pipeline)
    seconds = time.perf_counter() - started
    return dict(seconds=seconds, messages=messages, octets=octets,
                msgs_per_s=messages / seconds, mb_per_s=octets / seconds / 2**20)


async def scenario_b(port: int, users: list[str], concurrency: int, pipeline: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(user: str) -> tuple[int, int]:
        async with gate:
            t0 = time.perf_counter()
            result = await session(port, user, pipeline)
            latencies.append(time.perf_counter() - t0)
            return result

    started = time.perf_counter()
    results = await asyncio.gather(*(one(u) for u in users))
    seconds = time.perf_counter() - started
    messages = sum(m for m, _ in results)
    octets = sum(o for _, o in results)
    return dict(seconds=seconds, sessions=len(users), messages=messages, octets=octets,
                sessions_per_s=len(users) / seconds, msgs_per_s=messages / seconds,
                mb_per_s=octets / seconds / 2**20,
                session_p50_ms=1000 * statistics.median(latencies))


def tree_cpu(target: Pop3Target) -> float:
    """User+system CPU seconds of the server's processes, with the children they
    reaped (Dovecot's per-session pop3 processes)."""
    total = 0.0
    for proc in target.tree():
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def with_cpu(target: Pop3Target, scenario) -> dict:
    """Run a scenario; add the server's CPU per message retrieved (it does not depend
    on how busy the rest of the machine is, as throughput does)."""
    before = tree_cpu(target)
    result = asyncio.run(scenario())
    time.sleep(0.3)      # Dovecot's master reaps the last pop3 processes
    result["cpu_us_per_msg"] = (tree_cpu(target) - before) / result["messages"] * 1e6
    return result


# --- RSS ---------------------------------------------------------------------------------

class RssPeaks:
    """Highest RSS of any of a server's session-serving processes, sampled in a thread."""

    def __init__(self, targets: list[Pop3Target], interval: float = 0.05):
        self.targets = targets
        self.interval = interval
        self.peak = {t.name: 0 for t in targets}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for target in self.targets:
                for proc in target.workers():
                    with contextlib.suppress(psutil.Error):
                        self.peak[target.name] = max(self.peak[target.name],
                                                     proc.memory_info().rss)


# --- the run -----------------------------------------------------------------------------

def prepare(base: Path, args: argparse.Namespace) -> tuple[Path, Path, str, list[str]]:
    spool = base / "spool"
    spool.mkdir(mode=0o755)
    os.chown(spool, *ids(CCSMTP_USER))
    big = "big"
    small = [f"u{n:03d}" for n in range(args.users)]
    t0 = time.perf_counter()
    size = write_mailbox(spool / big, args.messages, seed=1)
    for n, user in enumerate(small):
        size += write_mailbox(spool / user, args.per_user, seed=100 + n)
    home = base / "homes"
    home.mkdir()
    users_file = base / "users"
    write_users(users_file, [big] + small, PASSWORD, args.scheme, home)
    print(f"mailboxes: {big} ({args.messages} msgs), {len(small)} x {args.per_user} msgs; "
          f"{size / 2**20:.1f} MB written in {time.perf_counter() - t0:.1f} s; "
          f"users file {args.scheme}")
    return spool, users_file, big, small


def fingerprint(spool: Path) -> dict[str, str]:
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(spool.iterdir()) if p.is_file()}


def compare(targets: list[Pop3Target], big: str, small: list[str]) -> str:
    """Both servers' LIST and RETR bytes of the big mailbox, and LIST of a small one."""
    contents = {}
    for target in targets:
        kept: list[bytes] = []
        asyncio.run(session(target.port, big, keep=kept))
        contents[target.name] = (asyncio.run(listing(target.port, big)), kept,
                                 asyncio.run(listing(target.port, small[0])))
    (l1, c1, s1), (l2, c2, s2) = contents.values()
    if len(c1) != len(c2):
        return f"DIFFERENT: {len(c1)} messages against {len(c2)}"
    differ = [n for n, (a, b) in enumerate(zip(c1, c2)) if a != b]
    # Dovecot shows mboxrd's '>From ' quoting as stored; ccsmtp removes one '>' (SPEC §9).
    quoting = [n for n in differ if re.sub(rb"(?m)^>(>*From )", rb"\1", c2[n]) == c1[n]]
    sizes_ok = all(a.split()[1] == str(len(c)).encode() for a, c in zip(l1, c1)) and \
        all(a.split()[1] == str(len(c)).encode() for a, c in zip(l2, c2))
    text = (f"{len(c1) - len(differ)} of {len(c1)} RETRs of {big} identical"
            + (f", {len(quoting)} differ only by Dovecot not unquoting '>From '" if quoting else "")
            + f"; LIST octets = RETR bytes for both: {'yes' if sizes_ok else 'NO'}")
    if len(quoting) != len(differ) or not sizes_ok:
        text = "DIFFERENT: " + text
    return text


def run(args: argparse.Namespace) -> dict:
    base = Path(tempfile.mkdtemp(prefix="ccsmtp-pop3-bench-"))
    base.chmod(0o755)
    targets: list[Pop3Target] = []
    try:
        spool, users_file, big, small = prepare(base, args)
        targets = [CcsmtpPop3(base, spool, users_file, workers=args.workers)]
        if not args.no_dovecot:
            if dovecot_binary() is None:
                print("Dovecot POP3 is not installed: ccsmtp only, no ratios")
            else:
                targets.append(DovecotPop3(base, spool, users_file))
        before = fingerprint(spool)
        for target in targets:
            target.start()
        print("warm-up (both build their indexes) ...", flush=True)
        for target in targets:
            asyncio.run(scenario_a(target.port, big, args.pipeline))
            asyncio.run(scenario_b(target.port, small, args.concurrency, args.pipeline))
        same = compare(targets, big, small) if len(targets) == 2 else "-"
        print(f"content check: {same}")
        rounds: list[dict[str, dict]] = []
        with RssPeaks(targets) as rss:
            for r in range(args.rounds):
                order = targets if r % 2 == 0 else targets[::-1]
                result: dict[str, dict] = {}
                for target in order:
                    a = with_cpu(target, lambda: scenario_a(target.port, big, args.pipeline))
                    b = with_cpu(target, lambda: scenario_b(target.port, small, args.concurrency,
                                                            args.pipeline))
                    result[target.name] = {"A": a, "B": b}
                    print(f"round {r + 1} {target.name:8} A {a['msgs_per_s']:8.0f} msg/s "
                          f"{a['mb_per_s']:6.1f} MB/s {a['cpu_us_per_msg']:5.0f} us CPU/msg | "
                          f"B {b['sessions_per_s']:6.1f} sess/s {b['msgs_per_s']:7.0f} msg/s "
                          f"{b['cpu_us_per_msg']:5.0f} us CPU/msg", flush=True)
                rounds.append(result)
        unchanged = fingerprint(spool) == before
        print(f"mbox files unchanged by both servers: {'yes' if unchanged else 'NO'}")
        report = summarize(rounds, rss.peak, same, args)
        report["mbox_files_unchanged"] = unchanged
        return report
    finally:
        for target in targets:
            target.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def summarize(rounds: list[dict[str, dict]], peaks: dict[str, int], same: str,
              args: argparse.Namespace) -> dict:
    names = list(rounds[0])
    med = lambda values: statistics.median(values)  # noqa: E731
    table = {}
    for name in names:
        table[name] = {
            "A_msgs_per_s": med([r[name]["A"]["msgs_per_s"] for r in rounds]),
            "A_mb_per_s": med([r[name]["A"]["mb_per_s"] for r in rounds]),
            "A_seconds": med([r[name]["A"]["seconds"] for r in rounds]),
            "B_sessions_per_s": med([r[name]["B"]["sessions_per_s"] for r in rounds]),
            "B_msgs_per_s": med([r[name]["B"]["msgs_per_s"] for r in rounds]),
            "B_session_p50_ms": med([r[name]["B"]["session_p50_ms"] for r in rounds]),
            "A_cpu_us_per_msg": med([r[name]["A"]["cpu_us_per_msg"] for r in rounds]),
            "B_cpu_us_per_msg": med([r[name]["B"]["cpu_us_per_msg"] for r in rounds]),
            "peak_rss_mb": peaks[name] / 2**20,
        }
    ratios = {}
    if "dovecot" in names:
        for key, scenario, field in (("A_msgs", "A", "msgs_per_s"), ("A_mb", "A", "mb_per_s"),
                                     ("B_sessions", "B", "sessions_per_s"),
                                     ("B_msgs", "B", "msgs_per_s")):
            ratios[key] = med([r["ccsmtp"][scenario][field] / r["dovecot"][scenario][field]
                               for r in rounds])
        for scenario in ("A", "B"):      # above 1: ccsmtp spends less CPU per message
            ratios[f"{scenario}_cpu_efficiency"] = med(
                [r["dovecot"][scenario]["cpu_us_per_msg"] / r["ccsmtp"][scenario]["cpu_us_per_msg"]
                 for r in rounds])
    print()
    print(f"POP3, {args.rounds} rounds (medians); A: 1 session, {args.messages} msgs; "
          f"B: {args.users} sessions x {args.per_user} msgs, {args.concurrency} at a time; "
          f"pipeline {args.pipeline}; users {args.scheme}")
    print(f"{'server':10} {'A msg/s':>9} {'A MB/s':>7} {'A us/msg':>9} {'B sess/s':>9} "
          f"{'B msg/s':>8} {'B p50 ms':>9} {'B us/msg':>9} {'peak RSS MB':>12}")
    for name, row in table.items():
        print(f"{name:10} {row['A_msgs_per_s']:9.0f} {row['A_mb_per_s']:7.1f} "
              f"{row['A_cpu_us_per_msg']:9.0f} {row['B_sessions_per_s']:9.1f} "
              f"{row['B_msgs_per_s']:8.0f} {row['B_session_p50_ms']:9.0f} "
              f"{row['B_cpu_us_per_msg']:9.0f} {row['peak_rss_mb']:12.1f}")
    print("us/msg: the server's CPU (user+system, its whole process tree) per message "
          "retrieved, logins included")
    if ratios:
        print("ccsmtp / dovecot (median of per-round ratios): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"content: {same}")
    return {"table": table, "ratios": ratios, "rounds": rounds, "content": same,
            "args": vars(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--per-user", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scheme", choices=["SHA512-CRYPT", "ARGON2ID"], default="SHA512-CRYPT")
    parser.add_argument("--quick", action="store_true", help="1 round, 2,000 + 40 x 100 msgs")
    parser.add_argument("--no-dovecot", action="store_true")
    parser.add_argument("--json-out")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.messages, args.users = 1, 2_000, 40
    if not IS_ROOT:
        print("note: not root: Dovecot's mail processes run as you and may write into the "
              "mbox files", file=sys.stderr)
    try:
        report = run(args)
    except BenchError as e:
        print(f"pop3_bench: {e}", file=sys.stderr)
        sys.exit(1)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
