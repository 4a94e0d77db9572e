"""ccsmtp-status: what the master and each of its processes are doing.

Owns: reading the scoreboard (SPOOL/.ccsmtp/scoreboard) and asking psutil about each
process: pid, user, RSS, CPU%, sessions now, messages so far, uptime; as a table or
JSON. Read-only; needs to be able to read the spool's .ccsmtp directory (root or the
ccsmtp user). Errors are one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn, Sequence

import psutil

from ..layout import SCOREBOARD, state_path
from ..process.scoreboard import Scoreboard, SlotInfo

PROG = "ccsmtp-status"
CPU_SAMPLE_S = 0.2


def _die(message: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(1)


def collect(spool_dir: str, pidfile: str | None = None) -> list[dict[str, Any]]:
    path = state_path(spool_dir, SCOREBOARD)
    try:
        board = Scoreboard(path)
    except FileNotFoundError:
        raise RuntimeError(f"no scoreboard at {path}: is ccsmtp running with spool {spool_dir}?")
    except PermissionError:
        raise RuntimeError(f"cannot read {path}: run as root or as the ccsmtp user")
    slots = [s for s in board.live() if psutil.pid_exists(s.pid)]
    board.close()
    master_pid = _master_pid(pidfile, slots)
    rows: list[tuple[psutil.Process, dict[str, Any]]] = []
    if master_pid:
        rows.append(_row(master_pid, "master", None))
    for info in sorted(slots, key=lambda s: (s.kind, s.worker_id, s.pid)):
        rows.append(_row(info.pid, info.role, info))
    live = [(proc, row) for proc, row in rows if proc is not None]
    for proc, _ in live:
        proc.cpu_percent(None)
    time.sleep(CPU_SAMPLE_S)
    for proc, row in live:
        try:
            row["cpu_percent"] = proc.cpu_percent(None)
        except psutil.Error:
            pass
    return [row for _, row in rows]


def _master_pid(pidfile: str | None, slots: list[SlotInfo]) -> int | None:
    if pidfile:
        try:
            with open(pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot read pid file {pidfile}: {e}")
    for info in slots:
        try:
            return psutil.Process(info.pid).ppid()
        except psutil.Error:
            continue
    return None


def _row(pid: int, role: str, info: SlotInfo | None) -> tuple[Any, dict[str, Any]]:
    row: dict[str, Any] = {"role": role, "pid": pid}
    if info is not None:
        row.update(sessions=info.total_sessions, messages=info.messages)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            row.update(user=proc.username(), rss_bytes=proc.memory_info().rss,
                       uptime_s=round(time.time() - proc.create_time(), 1), cpu_percent=0.0)
        return proc, row
    except psutil.Error:
        row["gone"] = True
        return None, row


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'ROLE':<10} {'PID':>7} {'USER':<10} {'RSS':>9} {'CPU%':>6} {'SESSIONS':>8} {'MESSAGES':>9} {'UPTIME':>9}"
    lines = [header]
    for r in rows:
        rss = f"{r.get('rss_bytes', 0) / 1048576:.1f}M"
        lines.append(f"{r['role']:<10} {r['pid']:>7} {r.get('user', '?'):<10} {rss:>9} "
                     f"{r.get('cpu_percent', 0.0):>6.1f} {r.get('sessions', ''):>8} "
                     f"{r.get('messages', ''):>9} {_duration(r.get('uptime_s', 0)):>9}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Show ccsmtp's processes.")
    parser.add_argument("-s", "--spool", default="/var/spool/ccsmtp", help="spool directory")
    parser.add_argument("--pidfile", help="the master's pid file (default: found from the workers)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        rows = collect(os.path.abspath(args.spool), args.pidfile)
    except RuntimeError as e:
        _die(str(e))
    if not rows:
        _die(f"no ccsmtp processes found for spool {args.spool}")
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
