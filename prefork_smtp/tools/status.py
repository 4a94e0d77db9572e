"""ccsmtp-status: is ccsmtp running, and what is each of its processes doing.

Owns: finding the running masters in the process table (title "ccsmtp: master"),
the spool of each, reading its scoreboard (SPOOL/.ccsmtp/scoreboard) and asking
psutil about each process: pid, user, RSS, CPU%, sessions now (per service),
messages so far, uptime; as a table or JSON. Read-only.

How the spool of a master is found: from its title, which ends in "-s SPOOL" unless
the spool is the default (process/master.py). /proc/PID/cmdline is readable by every
user; the master's cwd, open files and memory maps (where the scoreboard shows) are
not readable by the ccsmtp user itself, because a process that changed its uid
from root is not "dumpable" and the kernel then hides them from all but root. A file
the master writes would need a well-known directory that every instance can write
(/run is root's) and goes stale when the master is killed; the title lives exactly
as long as the master.

Needs to read SPOOL/.ccsmtp (root or the ccsmtp user). Exit status 0 when it could
report on a running ccsmtp; 1, with one line, when none is running or none could be
read (with -s: when that one could not). Without -s, a master whose scoreboard cannot
be read (another user's test instance, say) is shown with the reason, and a warning.

JSON (--json): a list of rows, one per process, the master of each instance first:
    role          "master", "worker N", "delivery"
    pid, master_pid, spool
    user, rss_bytes, cpu_percent, uptime_s   (absent, with "gone": true, if it just exited)
    sessions, messages                       (children: open sessions, messages so far)
    sessions_by_service                      (children: {"smtp": n, "pop3": n, "imap": n})
    error                                    (master row only: its scoreboard could not be read)
    queue                                    (master row only, when delivery has said:
        {"messages", "copies", "oldest_age_s", "failed", "destination", "unreachable_s",
         "as_of_s"}: queued messages and copies as the delivery process last saw them
        (it rewrites SPOOL/.ccsmtp/delivery.state at most once a second, when they
        change), the age of the oldest, copies in failed/, and for how long the
        destination has been unreachable (null: it is not); nothing is read from
        the queue itself, so this stays cheap however long the queue)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, NoReturn, Sequence

import psutil

from ..config import SERVICE_FAMILIES, implicit_tls
from ..layout import DEFAULT_SPOOL, SCOREBOARD, state_path
from ..process.scoreboard import Scoreboard, SlotInfo
from ..store import delivery_state, failed

PROG = "ccsmtp-status"
CPU_SAMPLE_S = 0.2
MASTER_TITLE = "ccsmtp: master"
CHILD_TITLE = "ccsmtp: "
SPOOL_MARK = " -s "          # the master's title ends in " -s SPOOL" (non-default spool)


def _die(message: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(1)


def title_of(proc: psutil.Process) -> str:
    """What ps shows: setproctitle leaves empty padding arguments behind."""
    return " ".join(arg for arg in proc.cmdline() if arg).strip()


@dataclasses.dataclass
class Instance:
    """One running ccsmtp: its master (None if only its children are left) and spool."""
    spool: str
    master_pid: int | None = None
    title: str = ""
    error: str | None = None
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    procs: list[tuple[psutil.Process, dict[str, Any]]] = dataclasses.field(default_factory=list)

    @property
    def families(self) -> list[str]:
        """The service families this instance listens for (from the title), else
        those with sessions open now."""
        listening = {_family(word.split("://", 1)[0] if "://" in word else "smtp")
                     for word in _title_words(self.title)[2:]}
        busy = {family for row in self.rows
                for family, count in row.get("sessions_by_service", {}).items() if count}
        found = listening | busy or {"smtp"}
        return [family for family in SERVICE_FAMILIES if family in found]

    def heading(self) -> str:
        words = _title_words(self.title)
        if self.master_pid is None:
            what = "no master (its children are finishing)"
        elif words[:1] == ["-w"] and len(words) >= 2:
            what = (f"master {self.master_pid}, {words[1]} worker(s), "
                    f"listening on {' '.join(words[2:]) or '?'}")
        else:
            what = f"master {self.master_pid}, {' '.join(words) or 'starting'}"
        return f"ccsmtp on {self.spool}: {what}"


def _title_words(title: str) -> list[str]:
    """The master's title without "ccsmtp: master" and the spool: ["-w", "2", ADDR...]."""
    rest = title[len(MASTER_TITLE):].partition(SPOOL_MARK)[0]
    return rest.split()


def _family(service: str) -> str:
    return service[:-1] if implicit_tls(service) else service


def spool_of(title: str) -> str:
    _, mark, spool = title.partition(SPOOL_MARK)
    return spool if mark else DEFAULT_SPOOL


def running_masters() -> list[tuple[int, str]]:
    """(pid, title) of every process whose title says it is a ccsmtp master."""
    found = []
    for proc in psutil.process_iter():
        try:
            title = title_of(proc)
        except psutil.Error:
            continue
        if title == MASTER_TITLE or title.startswith(MASTER_TITLE + " "):
            found.append((proc.pid, title))
    return sorted(found)


def find_instances(spool: str | None, pidfile: str | None) -> list[Instance]:
    masters = running_masters()
    if spool is None:
        return [Instance(spool_of(title), pid, title) for pid, title in masters]
    instance = Instance(spool)
    if pidfile:
        instance.master_pid = _read_pidfile(pidfile)
    else:
        instance.master_pid = next((pid for pid, title in masters if spool_of(title) == spool),
                                   None)
    instance.title = dict(masters).get(instance.master_pid, "")
    return [instance]


def _read_pidfile(pidfile: str) -> int:
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read pid file {pidfile}: {e}")


def read_instance(instance: Instance) -> None:
    """Fill in the rows of one instance (psutil figures, less the CPU sample)."""
    path = state_path(instance.spool, SCOREBOARD)
    slots: list[SlotInfo] = []
    try:
        board = Scoreboard(path)
    except FileNotFoundError:
        instance.error = f"no scoreboard at {path}: is ccsmtp running with spool {instance.spool}?"
    except PermissionError:
        instance.error = f"cannot read {path}: run as root or as the ccsmtp user"
    else:
        try:
            slots = [s for s in board.live() if _belongs(s.pid, instance.master_pid)]
        finally:
            board.close()
    if instance.master_pid is None:
        instance.master_pid, instance.title = _master_of(slots)
    if instance.master_pid is not None:
        _add_row(instance, instance.master_pid, "master", None)
        if instance.error:
            instance.rows[0]["error"] = instance.error
        elif (summary := queue_summary(instance.spool)) is not None:
            instance.rows[0]["queue"] = summary
    for info in sorted(slots, key=lambda s: (s.kind, s.worker_id, s.pid)):
        _add_row(instance, info.pid, info.role, info)


def queue_summary(spool: str) -> dict[str, Any] | None:
    """The queue as delivery last described it (delivery_state.py), or None."""
    try:
        state = delivery_state.read(spool)
        failed_copies = failed.count(spool)
    except OSError:
        return None
    if state is None:
        return None
    now = time.time()
    oldest, down = state.get("oldest"), state.get("unreachable")
    return {"messages": state.get("messages", 0), "copies": state.get("copies", 0),
            "oldest_age_s": round(max(0.0, now - oldest), 1) if oldest else None,
            "failed": failed_copies, "destination": state.get("destination"),
            "unreachable_s": round(max(0.0, now - down["since"]), 1) if down else None,
            "as_of_s": round(max(0.0, now - state.get("updated", now)), 1)}


def format_queue(summary: dict[str, Any]) -> str:
    text = f"queue: {summary['messages']} message(s), {summary['copies']} cop" + \
        ("y" if summary["copies"] == 1 else "ies")
    if summary["oldest_age_s"] is not None:
        text += f", oldest {_duration(summary['oldest_age_s'])}"
    text += f"; {summary['failed']} failed"
    if summary["unreachable_s"] is not None:
        text += f"; {summary['destination']} unreachable for {_duration(summary['unreachable_s'])}"
    return text + " (ccsmtp-queue lists them)"


def _belongs(pid: int, master_pid: int | None) -> bool:
    """A scoreboard slot names a live child of this instance (slots of a killed
    instance may name pids that were reused since)."""
    try:
        proc = psutil.Process(pid)
        if master_pid is not None:
            return proc.ppid() == master_pid
        return title_of(proc).startswith(CHILD_TITLE)
    except psutil.Error:
        return False


def _master_of(slots: list[SlotInfo]) -> tuple[int | None, str]:
    """The master of these children, from the process table (not a stranger that
    adopted them after their master died)."""
    for info in slots:
        try:
            parent = psutil.Process(psutil.Process(info.pid).ppid())
            title = title_of(parent)
        except psutil.Error:
            continue
        if title.startswith(MASTER_TITLE):
            return parent.pid, title
    return None, ""


def _add_row(instance: Instance, pid: int, role: str, info: SlotInfo | None) -> None:
    row: dict[str, Any] = {"role": role, "pid": pid, "master_pid": instance.master_pid,
                           "spool": instance.spool}
    if info is not None:
        row.update(sessions=info.total_sessions, messages=info.messages,
                   sessions_by_service=dict(zip(SERVICE_FAMILIES, info.sessions)))
    instance.rows.append(row)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            row.update(user=proc.username(), rss_bytes=proc.memory_info().rss,
                       uptime_s=round(time.time() - proc.create_time(), 1), cpu_percent=0.0)
    except psutil.Error:
        row["gone"] = True
        return
    instance.procs.append((proc, row))


def sample_cpu(instances: list[Instance]) -> None:
    """CPU% of every process over one short interval (one sleep for all of them)."""
    procs = [pair for instance in instances for pair in instance.procs]
    for proc, _ in procs:
        try:
            proc.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(CPU_SAMPLE_S)
    for proc, row in procs:
        try:
            row["cpu_percent"] = proc.cpu_percent(None)
        except psutil.Error:
            pass


def format_table(instance: Instance) -> str:
    families = instance.families
    per_service = families != ["smtp"]
    sessions_head = " ".join(f"{family.upper():>5}" for family in families) if per_service \
        else f"{'SESSIONS':>8}"
    lines = [instance.heading(),
             f"{'ROLE':<10} {'PID':>7} {'USER':<10} {'RSS':>9} {'CPU%':>6} {sessions_head} "
             f"{'MESSAGES':>9} {'UPTIME':>9}"]
    for r in instance.rows:
        rss = f"{r.get('rss_bytes', 0) / 1048576:.1f}M"
        by_service = r.get("sessions_by_service")
        if per_service:
            sessions = " ".join(f"{by_service[f] if by_service else '':>5}" for f in families)
        else:
            sessions = f"{r.get('sessions', ''):>8}"
        lines.append(f"{r['role']:<10} {r['pid']:>7} {r.get('user', '?'):<10} {rss:>9} "
                     f"{r.get('cpu_percent', 0.0):>6.1f} {sessions} "
                     f"{r.get('messages', ''):>9} {_duration(r.get('uptime_s', 0)):>9}")
    if instance.error:
        lines.append(f"  {instance.error}")
    if instance.rows and "queue" in instance.rows[0]:
        lines.append(format_queue(instance.rows[0]["queue"]))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Show every running ccsmtp (or the one of -s SPOOL): "
                               "its master, workers and delivery process.")
    parser.add_argument("-s", "--spool", help="only the instance with this spool directory "
                                              "(default: every running master)")
    parser.add_argument("--pidfile", help="with -s: the master's pid file "
                                          "(default: found in the process table)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON: one list of rows (see the module documentation)")
    args = parser.parse_args(argv)
    if args.pidfile and not args.spool:
        parser.error("--pidfile needs -s SPOOL")
    spool = os.path.abspath(args.spool) if args.spool else None
    try:
        instances = find_instances(spool, args.pidfile)
        if not instances:
            _die("no ccsmtp master is running (start one with ccsmtp-master)")
        for instance in instances:
            read_instance(instance)
    except RuntimeError as e:
        _die(str(e))
    if spool is not None:
        [instance] = instances
        if instance.error and not instance.rows:
            _die(instance.error)
        if not instance.rows:
            _die(f"no ccsmtp processes found for spool {spool}")
    sample_cpu(instances)
    rows = [row for instance in instances for row in instance.rows]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n\n".join(format_table(instance) for instance in instances))
    failed = [instance.error for instance in instances if instance.error]
    if spool is not None or len(failed) == len(instances):
        for error in failed:
            sys.stderr.write(f"{PROG}: error: {error}\n")
        return 1 if failed else 0
    for error in failed:
        sys.stderr.write(f"{PROG}: warning: {error}\n")
    return 0
