#!/usr/bin/env python3
"""Benchmark ccsmtp against Postfix, aiosmtpd-durable and smtp-sink (see bench/README.md).

Starts every server on its own 127.0.0.1 port under one temp directory, runs the
scenarios of issue 5 against each -- in rounds, rotating the order of the servers
in every round so that a noisy machine hurts them alike -- checks that every
accepted message reached its mbox file exactly once, stops everything, and prints
one table (and, with --json-out, every raw run).

    python3 bench/run.py --quick        # seconds: a smoke run
    python3 bench/run.py                # the full run (about 12 minutes on 2 cores)
    python3 bench/run.py --disks fast,2,8   # and A, B, E again with 2 ms and 8 ms flushes
    python3 bench/run.py --scenarios TP     # TLS (issue 8) and PROXY (issue 11) only

Every server's fsync-family calls go through bench/slowsync.c (LD_PRELOAD), a model
of a device whose cache flush takes F ms (see slowdisk.py); F is 0 on the fast disk.

Needs root for Postfix (its own instance via `postfix -c DIR`); without root, or
without the postfix package, the Postfix column is skipped and ratios are empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import MboxCounter, ProcessTree, PssSampler, message_ids  # noqa: E402
import servers  # noqa: E402
from servers import (DOMAIN, REPO, TARGETS, BenchError, Ccsmtp, Frontend, HAProxy,  # noqa: E402
                     Route, Target, make_tls_files)
import slowdisk  # noqa: E402

SEND = [sys.executable, str(REPO / "bin" / "ccsmtp-send")]
SENDER = "bench@bench.test"
SMTP_SOURCE_HEADERS = 130      # what smtp-source adds to its -l payload, roughly
DELIVERY_TIMEOUT_S = 60.0
IDLE_PER_SOURCE = 20000
MB = 1e6
CLIENT_CPUS: str | None = None   # --pin: the load client's CPU (taskset -c), the servers the rest


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    clients: tuple[str, ...]
    count: int
    concurrency: int = 1
    size: int = 1024
    per_connection: int = 1
    idle: int = 0
    timeout_s: float = 60.0
    every_round: bool = True
    hold_s: float = 0.0          # D: how long the idle connections stay after the probes
    fresh: bool = False          # restart every server first (memory is measured)
    spread: int = 1              # ccsmtp-send runs: mailboxes the messages rotate over
    servers: str = "main"        # "main": the --targets; "tls": those of them that speak
                                 # TLS; "proxy": the PROXY scenario's routes


# Mailboxes a ccsmtp-send run spreads its messages over in A, B, C: an MX serves
# many users. smtp-source cannot spread, so its runs all go to one mailbox (the
# worst case for per-message mbox locking, Postfix's in particular).
SPREAD = 20
# smtp-source runs (a cross-check of A and C by a C client) in the first rounds only:
# the full run must stay within about 15 minutes.
SOURCE_ROUNDS = 2
# What runs on a slow disk (issue 12): the scenarios whose numbers the flush decides.
SLOW_DISK_SCENARIOS = "ABE"
# The TLS scenario's clients: ccsmtp-send in plain text (the same load without TLS, in
# the same round: what TLS costs is the difference), with STARTTLS, with implicit TLS.
TLS_CLIENTS = ("ccsmtp-send", "ccsmtp-send/starttls", "ccsmtp-send/smtps")
# The PROXY scenario's routes (issue 11), each to ccsmtp instances of -w 1:
PROXY_ROUTES = (
    "direct-1",        # straight to one instance (no proxy_from)
    "haproxy-1",       # through HAProxy, no PROXY header, to that same instance
    "haproxy-pp2-1",   # through HAProxy with send-proxy-v2, to one instance (proxy_from)
    "haproxy-pp2-2",   # the same, round robin over two instances (own spools and ports)
)


def disk_ms(disk: str) -> float:
    """'fast' (the real disk) or a flush time in ms ('8', '8ms')."""
    return 0.0 if disk == "fast" else float(disk.removesuffix("ms"))


def scenarios(quick: bool, idle: int | None = None) -> list[Scenario]:
    q = quick
    idle = idle or (300 if q else 10000)
    probes = 1 if q else 3
    return [
        Scenario("A", "1 KB, new connection per message, 20 sessions",
                 ("ccsmtp-send", "smtp-source"), 200 if q else 5000, 20, spread=SPREAD),
        Scenario("B", "1 KB, 100 messages per connection, 20 sessions",
                 ("ccsmtp-send",), 1000 if q else 20000, 20, per_connection=100, spread=SPREAD),
        Scenario("C", "100 KB, new connection per message, 10 sessions",
                 ("ccsmtp-send", "smtp-source"), 60 if q else 2000, 10, size=102400,
                 spread=SPREAD),
        Scenario("E", "light load: one session at a time",
                 ("ccsmtp-send",), 20 if q else 200, 1),
        Scenario("T", "1 KB, new TLS connection per message (STARTTLS, smtps; and plain), "
                 "20 sessions", TLS_CLIENTS, 100 if q else 3000, 20, spread=SPREAD,
                 servers="tls"),
        Scenario("P", "A through HAProxy (send-proxy-v2) to ccsmtp -w 1, one and two "
                 "instances, beside direct", ("ccsmtp-send",), 200 if q else 5000, 20,
                 spread=SPREAD, servers="proxy"),
        Scenario("F", f"one {5 if q else 50} MiB message", ("ccsmtp-send",), 1, 1,
                 size=(5 if q else 50) * 2**20, timeout_s=300, every_round=False, fresh=True),
        # (quick: no restart before D, to save seconds; its memory figure is then rough)
        Scenario("D", f"{idle} idle connections held, then {probes} fresh client(s) one by one",
                 ("ccsmtp-send",), probes, 1, idle=idle, timeout_s=2 if q else 5,
                 every_round=False, fresh=not q, hold_s=0.5 if q else 2.0),
    ]


@dataclasses.dataclass
class Run:
    scenario: str
    client: str
    target: str
    round: int
    mailboxes: tuple[str, ...]
    disk: str = "fast"
    workers: int = 2
    sync_calls: int = 0          # fsync-family calls the server made during the run
    flushes: int = 0             # flushes its modelled device started (slow disks)
    requested: int = 0
    accepted: int = 0
    failed: int = 0
    client_elapsed_s: float = 0.0
    wall_s: float = 0.0
    delivered: int | None = None
    delivered_s: float | None = None
    message_size: int = 0
    latency_ms: dict = dataclasses.field(default_factory=dict)
    session_ms: dict = dataclasses.field(default_factory=dict)
    greeting_ms: dict = dataclasses.field(default_factory=dict)
    cpu_s: float = 0.0
    peak_rss_max: int = 0
    peak_rss_sum: int = 0
    tree_pss_before: int = 0
    tree_pss_peak: int = 0
    idle_held: int | None = None
    tls: dict | None = None      # ccsmtp-send's TLS report: handshakes, resumed, versions
    proxy_cpu_s: float | None = None   # HAProxy's CPU during the run (PROXY routes)
    client_cpu_s: float = 0.0    # the load client's own CPU (reaped children of the bench)
    errors: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.client_elapsed_s if self.client_elapsed_s else 0.0

    @property
    def delivered_per_s(self) -> float | None:
        if self.delivered_s is None or not self.delivered:
            return None
        return self.delivered / self.delivered_s

    @property
    def mb_per_s(self) -> float:
        return self.accepted_per_s * self.message_size / MB

    @property
    def cpu_ms_per_msg(self) -> float | None:
        return self.cpu_s * 1000 / self.accepted if self.accepted else None

    @property
    def syncs_per_msg(self) -> float | None:
        return self.sync_calls / self.accepted if self.accepted else None

    @property
    def flushes_per_msg(self) -> float | None:
        return self.flushes / self.accepted if self.accepted and self.flushes else None

    @property
    def resumed_fraction(self) -> float | None:
        return self.tls["resumed_fraction"] if self.tls and self.tls["handshakes"] else None

    @property
    def client_ms_per_msg(self) -> float | None:
        return self.client_cpu_s * 1000 / self.accepted if self.accepted and self.client_cpu_s else None

    @property
    def proxy_ms_per_msg(self) -> float | None:
        if self.proxy_cpu_s is None or not self.accepted:
            return None
        return self.proxy_cpu_s * 1000 / self.accepted


def log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# --- one run ---------------------------------------------------------------------------

def idle_per_process() -> int:
    """Idle connections one load-client process can hold (its descriptor limit)."""
    return min(IDLE_PER_SOURCE, resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 2048)


def start_holders(s: Scenario, target: Target) -> tuple[list[subprocess.Popen], int]:
    """D past one process's descriptors: more ccsmtp-send processes hold the idle
    connections beyond what the measuring client holds, each from its own source
    address. Returns them and how many connections they hold once settled."""
    per = idle_per_process()
    extra = max(0, s.idle - per)
    holders = []
    for k in range((extra + per - 1) // per):
        n = min(per, extra - k * per)
        holders.append(subprocess.Popen(
            SEND + ["--server", target.server, "--count", "0", "--idle", str(n), "--hold", "3600",
                    "--from", SENDER, "--to", f"hold@{DOMAIN}",
                    "--timeout", str(s.timeout_s), "--source", f"127.0.1.{k + 1}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if not holders:
        return [], 0
    held, last_change, previous = 0, time.monotonic(), -1
    while time.monotonic() - last_change < 5 and held < extra:
        time.sleep(0.5)
        held = sum(_established(h.pid) for h in holders)
        if held != previous:
            previous, last_change = held, time.monotonic()
    return holders, held


def _established(pid: int) -> int:
    try:
        return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.status == "ESTABLISHED")
    except psutil.Error:
        return 0


def tls_mode(client: str) -> str:
    """"starttls", "smtps" or "" (plain) for a client name such as ccsmtp-send/starttls."""
    return client.partition("/")[2]


def client_tag(client: str) -> str:
    """What a mailbox name says of the client: send, source, send-starttls, send-smtps."""
    return client.split("-", 1)[-1].replace("/", "-")


def client_command(s: Scenario, client: str, target: Target, rcpts: list[str],
                   ca_file: str | None = None) -> list[str]:
    if client == "smtp-source":
        (rcpt,) = rcpts
        return ["smtp-source", "-s", str(s.concurrency), "-m", str(s.count),
                "-l", str(max(0, s.size - SMTP_SOURCE_HEADERS)), "-f", SENDER, "-t", rcpt,
                "-M", "bench.test", target.server]
    mode = tls_mode(client)
    cmd = SEND + ["--server", target.address(mode), "--from", SENDER, "--helo", "bench.test",
                  "--count", str(s.count), "--concurrency", str(s.concurrency),
                  "--size", str(s.size), "--per-connection", str(s.per_connection),
                  "--timeout", str(s.timeout_s), "--json", "--rotate"]
    if mode:
        # The certificate is checked against the run's test CA (as an MX's client that
        # verifies would); each sender resumes its previous connection's TLS session.
        cmd += ["--starttls" if mode == "starttls" else "--tls"]
        cmd += ["--cafile", ca_file] if ca_file else ["--insecure"]
    for rcpt in rcpts:
        cmd += ["--to", rcpt]
    if s.idle:
        cmd += ["--idle", str(min(s.idle, idle_per_process())), "--hold", str(s.hold_s)]
    return cmd


def run_client(run: Run, s: Scenario, client: str, target: Target, rcpts: list[str],
               ca_file: str | None = None) -> None:
    cmd = client_command(s, client, target, rcpts, ca_file)
    if CLIENT_CPUS:
        cmd = ["taskset", "-c", CLIENT_CPUS] + cmd
    holders, held_by_holders = start_holders(s, target) if s.idle else ([], 0)
    started = time.monotonic()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=max(600, s.count))
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    run.wall_s = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.client_cpu_s = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    run.requested = s.count
    if client == "smtp-source":
        run.client_elapsed_s = run.wall_s
        run.message_size = s.size
        if proc.returncode == 0:
            run.accepted = s.count
        else:
            run.problems.append(f"smtp-source: {proc.stderr.strip().splitlines()[-1:]}")
        return
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        run.problems.append(f"ccsmtp-send: {proc.stderr.strip()}")
        return
    run.accepted = result["accepted"]
    run.failed = result["failed"]
    run.client_elapsed_s = result["elapsed_s"]
    run.message_size = result["message_size"]
    run.latency_ms = result["latency_ms"]
    run.session_ms = result["session_ms"]
    run.greeting_ms = result["greeting_ms"]
    run.errors = result["errors"]
    run.tls = result.get("tls")
    if result["idle"]:
        run.idle_held = result["idle"]["held"] + held_by_holders
        if result["idle"]["errors"]:
            run.errors = dict(run.errors, **{f"idle {k}": v
                                             for k, v in result["idle"]["errors"].items()})
    run.run_id = result["run_id"]       # type: ignore[attr-defined]


def wait_delivered(run: Run, target: Target, started: float) -> None:
    if not target.stores or run.accepted == 0:
        return
    counters = [MboxCounter(str(path)) for m in run.mailboxes for path in target.mailbox_paths(m)]
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S + run.accepted / 100
    while (count := sum(c.poll() for c in counters)) < run.accepted \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    run.delivered = count
    if count >= run.accepted:
        # From when the client began sending: its own start-up (Python's import
        # time, for ccsmtp-send) is not the server's delivery time.
        startup = max(0.0, run.wall_s - run.client_elapsed_s) if not run.idle_held else 0.0
        run.delivered_s = time.monotonic() - started - startup


def verify(run: Run, target: Target) -> None:
    """Every accepted message is in the mbox, once; then the mbox goes (disk space)."""
    if not target.stores:
        return
    paths = [path for m in run.mailboxes for path in target.mailbox_paths(m)]
    if run.accepted and run.delivered != run.accepted:
        run.problems.append(f"{run.delivered} of {run.accepted} accepted messages in the mboxes")
    run_id = getattr(run, "run_id", None)
    if run_id and run.accepted:
        ids = [i for path in paths for i in message_ids(str(path), run_id)]
        if len(ids) != len(set(ids)):
            run.problems.append(f"{len(ids) - len(set(ids))} duplicate Message-IDs")
        if len(set(ids)) != run.accepted:
            run.problems.append(f"{len(set(ids))} distinct Message-IDs for {run.accepted} accepted")
    for path in paths:
        path.unlink(missing_ok=True)


def run_one(s: Scenario, client: str, target: Target | Route, rnd: int,
            mailboxes: tuple[str, ...], disk: str = "fast", ca_file: str | None = None) -> Run:
    run = Run(s.key, client, target.name, rnd, mailboxes, disk, target.workers)
    calls_before, flushes_before = target.device.counters()
    tree = ProcessTree(*target.process_roots())
    proxy_pid = getattr(target, "proxy_root_pid", lambda: None)()
    proxy = ProcessTree(proxy_pid) if proxy_pid else None
    run.tree_pss_before = tree.pss() if s.idle else 0
    tree.reset_peaks()
    cpu_before = tree.cpu_s()
    proxy_before = proxy.cpu_s() if proxy else 0.0
    started = time.monotonic()
    # Only D needs the tree's memory over time; reading smaps of 100 Postfix
    # processes ten times a second would cost the other scenarios CPU.
    with PssSampler(tree, enabled=bool(s.idle)) as sampler:
        run_client(run, s, client, target, [f"{m}@{DOMAIN}" for m in mailboxes], ca_file)
        wait_delivered(run, target, started)
    run.cpu_s = tree.cpu_s() - cpu_before
    if proxy:
        run.proxy_cpu_s = proxy.cpu_s() - proxy_before
    calls_after, flushes_after = target.device.counters()
    run.sync_calls, run.flushes = calls_after - calls_before, flushes_after - flushes_before
    run.peak_rss_max, run.peak_rss_sum = tree.peak_rss()
    run.tree_pss_peak = sampler.peak
    verify(run, target)
    log(f"  {disk:>4} {s.key} r{rnd} {client:11} {target.name:9} " + summary(run))
    return run


def summary(run: Run) -> str:
    parts = [f"{run.accepted}/{run.requested} acc {run.accepted_per_s:8.1f}/s"]
    if run.delivered_per_s:
        parts.append(f"dlv {run.delivered_per_s:8.1f}/s")
    if run.latency_ms:
        parts.append(f"p50 {run.latency_ms['p50']:.1f} ms")
    if run.cpu_ms_per_msg is not None:
        parts.append(f"cpu {run.cpu_ms_per_msg:.2f} ms/msg")
    if run.resumed_fraction is not None:
        parts.append(f"resumed {run.resumed_fraction:.1%}")
    if run.proxy_ms_per_msg is not None:
        parts.append(f"haproxy {run.proxy_ms_per_msg:.2f} ms/msg")
    if run.idle_held is not None:
        parts.append(f"held {run.idle_held}")
    if run.errors:
        parts.append(f"errors {run.errors}")
    if run.problems:
        parts.append("PROBLEMS: " + "; ".join(run.problems))
    return ", ".join(parts)


# --- the plan ----------------------------------------------------------------------------

def servers_of(s: Scenario, targets: list[str], routes: list[str] = ()) -> list[str]:
    """The servers scenario S runs against: the --targets, those of them that speak TLS,
    or the PROXY routes."""
    if s.servers == "proxy":
        return list(routes)
    if s.servers == "tls":
        return [t for t in targets if TARGETS[t].speaks_tls]
    return list(targets)


def plan(selected: list[Scenario], targets: list[str], rounds: int,
         disks: tuple[str, ...] = ("fast",), routes: list[str] = ()) -> list[tuple]:
    """(disk, scenario, client, target, round, mailboxes) in the order they run.

    Each round rotates the order of the servers so that none is always first (when
    the page cache is cold) or last; D runs at the very end of the fast-disk phase
    because 10,000 idle connections leave the most behind in a server's memory. Slow
    disks run A, B and E with ccsmtp-send, after the fast disk.
    """
    steps, shift = [], 0
    for disk in disks:
        chosen = selected if disk == "fast" else \
            [dataclasses.replace(s, clients=("ccsmtp-send",)) for s in selected
             if s.key in SLOW_DISK_SCENARIOS]
        tag = "" if disk == "fast" else f"{disk.removesuffix('ms')}ms-"
        for rnd in range(1, rounds + 1):
            for s in chosen:
                if not s.every_round and rnd != rounds:
                    continue
                names = servers_of(s, targets, routes)
                if not names:
                    continue
                for client in s.clients:
                    if client == "smtp-source" and rnd > SOURCE_ROUNDS:
                        continue
                    order = names[shift % len(names):] + names[:shift % len(names)]
                    shift += 1
                    for name in order:
                        box = f"{tag}{s.key}{rnd}-{client_tag(client)}-{name}".lower()
                        spread = s.spread if client.startswith("ccsmtp-send") else 1
                        boxes = tuple(f"{box}-{i}" for i in range(spread)) if spread > 1 else (box,)
                        steps.append((disk, s, client, name, rnd, boxes))
    return steps


# --- the table ------------------------------------------------------------------------------

LEGEND = """\
acc msg/s: messages answered 250 per second of the client's sending time. dlv msg/s: the
same messages counted in the mbox files, per second from the client's first connect.
MB/s: accepted message bytes per second. p50/p99 ms: ccsmtp-send's latency per message
(connect..250 for a connection's first message, MAIL..250 for later ones); in E a whole
session (connect..221), in D a fresh client's connect..220. CPU ms/msg: user+system CPU
of the server's whole process tree (delivery included) per accepted message. peak RSS MB:
the largest single server process (VmHWM, reset before each run). x PF: this server /
Postfix in the same round, median over rounds: A-C messages/s, D connections held,
E and F Postfix's time / this one's (above 1 is faster than Postfix).
syncs/msg: fsync-family calls of the server's processes per accepted message;
flushes/msg: flushes its modelled device started per accepted message (slow disks). x aio:
the same ratio against aiosmtpd-durable.
Rows of A, B, C and E are medians over the rounds (smtp-source: the first %d rounds).
A-C with ccsmtp-send rotate over %d mailboxes; smtp-source sends all to one mailbox and
speaks HELO, without PIPELINING.""" % (SOURCE_ROUNDS, SPREAD)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(runs: list[Run], scenario: str, client: str, target: str, metric, invert=False,
          base: str = "postfix"):
    """Median over rounds of METRIC(target) / METRIC(base), same round (RUNS: one disk)."""
    by_round: dict[int, dict[str, Run]] = {}
    for r in runs:
        if r.scenario == scenario and r.client == client:
            by_round.setdefault(r.round, {})[r.target] = r
    ratios = []
    for pair in by_round.values():
        if target in pair and base in pair:
            a, b = metric(pair[target]), metric(pair[base])
            if a and b:
                ratios.append(b / a if invert else a / b)
    return median(ratios)


def fmt(value, spec: str = ".0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


HEADER = ["scen", "client", "server", "acc msg/s", "dlv msg/s", "MB/s", "p50 ms", "p99 ms",
          "CPU ms/msg", "peak RSS MB", "syncs/msg", "flushes/msg", "x PF acc", "x PF dlv",
          "x aio acc", "notes"]


def table(runs: list[Run], selected: list[Scenario], targets: list[str], disk: str = "fast",
          routes: list[str] = ()) -> str:
    runs = [r for r in runs if r.disk == disk]
    rows = [HEADER]
    for s in selected:
        for client in s.clients:
            for name in servers_of(s, targets, routes):
                mine = [r for r in runs if (r.scenario, r.client, r.target) == (s.key, client, name)]
                if mine:
                    rows.append(row(s, client, name, mine, runs))
    return markdown(rows)


def markdown(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        cells = [c.ljust(w) if j in (0, 1, 2, len(rows[0]) - 1) else c.rjust(w)
                 for j, (c, w) in enumerate(zip(r, widths))]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def row(s: Scenario, client: str, name: str, mine: list[Run], runs: list[Run]) -> list[str]:
    acc = median([r.accepted_per_s for r in mine])
    dlv = median([r.delivered_per_s for r in mine])
    mbs = median([r.mb_per_s for r in mine])
    cpu = median([r.cpu_ms_per_msg for r in mine])
    syncs = median([r.syncs_per_msg for r in mine])
    flushes = median([r.flushes_per_msg for r in mine])
    rss = max(r.peak_rss_max for r in mine) / 2**20
    if s.key == "E":
        lat = [r.session_ms for r in mine]          # connect..221
    elif s.key == "D":
        lat = [r.greeting_ms for r in mine]         # fresh client: connect..220
    else:
        lat = [r.latency_ms for r in mine]
    p50 = median([d.get("p50") for d in lat])
    p99 = median([d.get("p99") for d in lat])
    notes = []
    x_acc = x_dlv = x_aio = None
    if s.key in "ABCT":
        x_acc = ratio(runs, s.key, client, name, lambda r: r.accepted_per_s)
        x_dlv = ratio(runs, s.key, client, name, lambda r: r.delivered_per_s)
        x_aio = ratio(runs, s.key, client, name, lambda r: r.accepted_per_s, base="aiosmtpd")
    elif s.key == "E":
        x_acc = ratio(runs, s.key, client, name, lambda r: r.session_ms.get("p50"), invert=True)
        x_aio = ratio(runs, s.key, client, name, lambda r: r.session_ms.get("p50"), invert=True,
                      base="aiosmtpd")
    elif s.key == "F":
        r = mine[-1]
        notes.append(f"{r.message_size / 2**20:.0f} MiB in {r.client_elapsed_s:.2f} s")
        x_acc = ratio(runs, s.key, client, name, lambda r: r.client_elapsed_s, invert=True)
    elif s.key == "D":
        r = mine[-1]
        held = r.idle_held or 0
        per_conn = (r.tree_pss_peak - r.tree_pss_before) / held / 1024 if held else None
        fresh = (f"fresh 220 max {r.greeting_ms['max']:.0f} ms" if r.greeting_ms
                 else f"no fresh client greeted within {s.timeout_s:g} s")
        notes.append(f"held {held}/{s.idle}, {fmt(per_conn, '.1f')} KB/idle conn, {fresh}, "
                     f"{r.accepted}/{r.requested} fresh msgs ok")
        x_acc = ratio(runs, s.key, client, name, lambda r: r.idle_held)
        acc = dlv = mbs = cpu = syncs = flushes = None
    resumed = median([r.resumed_fraction for r in mine])
    if resumed is not None:
        notes.append(f"{resumed:.1%} of handshakes resumed")
    proxy_ms = median([r.proxy_ms_per_msg for r in mine])
    if proxy_ms is not None:
        notes.append(f"HAProxy {proxy_ms:.2f} ms CPU/msg")
    problems = sorted({p for r in mine for p in r.problems})
    errors: dict[str, int] = {}
    for r in mine:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    if errors:
        notes.append("errors " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())))
    notes.extend(problems)
    return [s.key, client, name, fmt(acc), fmt(dlv), fmt(mbs, ".2f"), fmt(p50, ".1f"),
            fmt(p99, ".1f"), fmt(cpu, ".2f"), fmt(rss, ".1f"), fmt(syncs, ".2f"),
            fmt(flushes, ".2f"), fmt(x_acc, ".2f"), fmt(x_dlv, ".2f"), fmt(x_aio, ".2f"),
            "; ".join(notes)]


def per_round(runs: list[Run], a: tuple[str, str, str], b: tuple[str, str, str],
              metric) -> float | None:
    """Median over rounds of METRIC(run A) / METRIC(run B), A and B (scenario, client,
    server) from the same round (and disk)."""
    pairs: dict[tuple, dict] = {}
    for r in runs:
        key = (r.scenario, r.client, r.target)
        if key in (a, b):
            pairs.setdefault((r.disk, r.round), {})[key] = r
    values = []
    for pair in pairs.values():
        if a in pair and b in pair:
            x, y = metric(pair[a]), metric(pair[b])
            if x is not None and y:
                values.append(x / y)
    return median(values)


def tls_table(runs: list[Run], targets: list[str]) -> str:
    """Issue 8: what TLS costs each server, and ccsmtp against Postfix."""
    rows = [["server", "plain msg/s", "STARTTLS msg/s", "smtps msg/s", "resumed STARTTLS / smtps",
             "CPU ms/msg plain / STARTTLS / smtps", "TLS share of CPU STARTTLS / smtps",
             "client CPU ms/msg plain / STARTTLS / smtps", "x PF STARTTLS / smtps",
             "x PF CPU/msg STARTTLS / smtps"]]
    T = [r for r in runs if r.scenario == "T"]
    for name in [t for t in targets if TARGETS[t].speaks_tls]:
        mine = {c: [r for r in T if (r.client, r.target) == (c, name)] for c in TLS_CLIENTS}
        if not any(mine.values()):
            continue
        plain, starttls, smtps = TLS_CLIENTS

        def med(client, metric, spec):
            return fmt(median([metric(r) for r in mine[client]]), spec)

        def share(client):
            # 1 - plain/TLS CPU per message, same server and round: TLS's part of it.
            value = per_round(T, ("T", plain, name), ("T", client, name), lambda r: r.cpu_ms_per_msg)
            return fmt(None if value is None else 1 - value, ".0%")

        def x_pf(client):
            return fmt(ratio(T, "T", client, name, lambda r: r.accepted_per_s), ".2f")

        def x_cpu(client):
            # Postfix's CPU per message / this server's, same round: above 1 = less CPU.
            return fmt(ratio(T, "T", client, name, lambda r: r.cpu_ms_per_msg, invert=True), ".2f")

        rows.append([name, med(plain, lambda r: r.accepted_per_s, ".0f"),
                     med(starttls, lambda r: r.accepted_per_s, ".0f"),
                     med(smtps, lambda r: r.accepted_per_s, ".0f"),
                     f"{med(starttls, lambda r: r.resumed_fraction, '.1%')} / "
                     f"{med(smtps, lambda r: r.resumed_fraction, '.1%')}",
                     " / ".join(med(c, lambda r: r.cpu_ms_per_msg, ".2f") for c in TLS_CLIENTS),
                     f"{share(starttls)} / {share(smtps)}",
                     " / ".join(med(c, lambda r: r.client_ms_per_msg, ".2f") for c in TLS_CLIENTS),
                     f"{x_pf(starttls)} / {x_pf(smtps)}",
                     f"{x_cpu(starttls)} / {x_cpu(smtps)}"])
    return markdown(rows) if len(rows) > 1 else ""


def proxy_table(runs: list[Run]) -> str:
    """Issue 11: each route's rate and CPU, and the ratios that answer its questions."""
    P = [r for r in runs if r.scenario == "P"]
    if not P:
        return ""
    rows = [["route", "acc msg/s", "ccsmtp CPU ms/msg", "HAProxy CPU ms/msg", "x direct-1",
             "x haproxy-1"]]
    for name in PROXY_ROUTES:
        mine = [r for r in P if r.target == name]
        if not mine:
            continue
        key = ("P", "ccsmtp-send", name)
        rows.append([name, fmt(median([r.accepted_per_s for r in mine])),
                     fmt(median([r.cpu_ms_per_msg for r in mine]), ".3f"),
                     fmt(median([r.proxy_ms_per_msg for r in mine]), ".3f"),
                     fmt(per_round(P, key, ("P", "ccsmtp-send", "direct-1"),
                                   lambda r: r.accepted_per_s), ".3f"),
                     fmt(per_round(P, key, ("P", "ccsmtp-send", "haproxy-1"),
                                   lambda r: r.accepted_per_s), ".3f")])
    lines = [markdown(rows), ""]
    base, pp2, two = (("P", "ccsmtp-send", n) for n in ("haproxy-1", "haproxy-pp2-1", "haproxy-pp2-2"))
    acc = per_round(P, pp2, base, lambda r: r.accepted_per_s)
    cpu = per_round(P, pp2, base, lambda r: r.cpu_ms_per_msg)
    hap = per_round(P, pp2, base, lambda r: r.proxy_ms_per_msg)
    if acc is not None:
        lines.append(f"PROXY v2 header (haproxy-pp2-1 / haproxy-1, same round, both through "
                     f"HAProxy): throughput x{acc:.3f} ({(acc - 1):+.1%}), ccsmtp CPU per "
                     f"message x{fmt(cpu, '.3f')}, HAProxy CPU per message x{fmt(hap, '.3f')}")
    hop = per_round(P, base, ("P", "ccsmtp-send", "direct-1"), lambda r: r.accepted_per_s)
    if hop is not None:
        lines.append(f"HAProxy's own cost (haproxy-1 / direct-1, no header): throughput "
                     f"x{hop:.3f} ({(hop - 1):+.1%})")
    second = per_round(P, two, pp2, lambda r: r.accepted_per_s)
    if second is not None:
        lines.append(f"A second instance (haproxy-pp2-2 / haproxy-pp2-1): throughput "
                     f"x{second:.3f}")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------

def machine() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def raise_fd_limit(needed: int = 0) -> None:
    """Servers inherit this: 10,000 idle connections need more than 1024 descriptors,
    50,000 more than the usual hard limit (root may raise it up to fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > hard != resource.RLIM_INFINITY and os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = min(needed, int(f.read()))
        except (OSError, ValueError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):   # no CAP_SYS_RESOURCE: the hard limit stays
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_proxy_routes(base: Path, shim: Path | None, say) -> tuple[dict[str, Route], list]:
    """The PROXY scenario's instances (-w 1 each: `proxy_from = ["127.0.0.1/32"]` on the two
    behind send-proxy-v2), HAProxy with a frontend per route, and the routes. Returns
    (routes by name, everything started: the caller stops it)."""
    started: list = []
    plain = Ccsmtp(base, shim, 1, name="ccsmtp-w1")
    first = Ccsmtp(base, shim, 1, name="ccsmtp-w1-pp2a", proxy_from="127.0.0.1/32")
    second = Ccsmtp(base, shim, 1, name="ccsmtp-w1-pp2b", proxy_from="127.0.0.1/32")
    for instance in (plain, first, second):
        started.append(instance)
        try:
            instance.start([])
        except BenchError:
            for done in started:
                done.stop()
            raise
        say(f"bench: {instance.name} on {instance.server} (pid {instance.root_pid()})")
    frontends = {"haproxy-1": Frontend("plain", [plain], send_proxy=False),
                 "haproxy-pp2-1": Frontend("pp2_one", [first], send_proxy=True),
                 "haproxy-pp2-2": Frontend("pp2_two", [first, second], send_proxy=True)}
    haproxy = HAProxy(base, list(frontends.values()))
    started.append(haproxy)
    try:
        haproxy.start()
    except BenchError:
        for done in started:
            done.stop()
        raise
    say(f"bench: haproxy (pid {haproxy.root_pid()}): " + ", ".join(
        f"{name} on 127.0.0.1:{fe.port}" for name, fe in frontends.items()))
    routes = {"direct-1": Route("direct-1", [plain])}
    for name, fe in frontends.items():
        routes[name] = Route(name, fe.backends, haproxy, fe)
    return routes, started


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, one round (a smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of A, B, C, E (default 3; quick 1)")
    p.add_argument("--scenarios", default="ABCDEFTP",
                   help="which scenarios (default: ABCDEFTP; T: TLS, P: PROXY)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"servers to run (default: {','.join(TARGETS)})")
    p.add_argument("--disks", default="fast",
                   help="disk phases: 'fast' and/or flush times in ms, e.g. fast,2,8 (default: "
                        f"fast); slow disks run {', '.join(SLOW_DISK_SCENARIOS)} only")
    p.add_argument("--workers", type=int, default=2, help="ccsmtp's -w (default 2)")
    p.add_argument("--idle", type=int, default=None, help="D: idle connections (default 10000)")
    p.add_argument("--pin", action="store_true",
                   help="run the load client on the last CPU and every server on the others "
                        "(taskset), so that the client's CPU does not come out of the servers'")
    p.add_argument("--json-out", metavar="FILE", help="write every run as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown:
        p.error(f"unknown target {unknown[0]!r} (known: {', '.join(TARGETS)})")
    selected = [s for s in scenarios(args.quick, args.idle) if s.key in args.scenarios.upper()]
    if not selected:
        p.error("no scenario selected")
    try:
        disks = tuple(d.strip() for d in args.disks.split(",") if d.strip())
        slow = any(disk_ms(d) for d in disks)
    except ValueError:
        p.error(f"--disks: 'fast' or milliseconds, not {args.disks!r}")
    for tool in ("smtp-source",):
        if shutil.which(tool) is None:
            log(f"bench: {tool} not found (Debian package postfix): its runs are skipped")
            selected = [dataclasses.replace(s, clients=tuple(c for c in s.clients if c != tool))
                        for s in selected]
    if any(s.servers == "proxy" for s in selected) and \
            shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"):
        log("bench: haproxy not found (apt-get install haproxy): P is skipped")
        selected = [s for s in selected if s.servers != "proxy"]

    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            p.error("--pin needs two CPUs and taskset (util-linux)")
        global CLIENT_CPUS
        CLIENT_CPUS = str(cpus[-1])
        servers.SERVER_CPUS = ",".join(map(str, cpus[:-1]))
    raise_fd_limit(2 * max(s.idle for s in selected) + 4096)
    signal.signal(signal.SIGTERM, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="ccsmtp-bench-"))
    os.chmod(base, 0o755)       # the servers' unprivileged users must reach their dirs
    began = time.monotonic()
    started: dict[str, Target] = {}
    routes: dict[str, Route] = {}
    extras: list = []           # the PROXY scenario's instances and HAProxy
    runs: list[Run] = []
    skipped: list[str] = []
    route_names = list(PROXY_ROUTES) if any(s.servers == "proxy" for s in selected) else []
    steps = plan(selected, wanted, rounds, disks, route_names)
    tls_files = None
    try:
        shim = None
        try:
            shim = slowdisk.build(base)
        except slowdisk.ShimError as e:
            if slow:
                log(f"bench: {e}")
                return 2
            log(f"bench: {e}; no sync counts")
        if any(s.servers == "tls" for s in selected):
            # One test CA per run; ccsmtp and Postfix get the same certificate, and then
            # offer STARTTLS in every scenario (the others' clients never ask for it).
            try:
                tls_files = make_tls_files(base / "tls")
            except BenchError as e:
                log(f"bench: {e}: T is skipped")
                skipped.append(f"T ({e})")
                steps = [step for step in steps if step[1].servers != "tls"]
        for name in wanted:
            target = TARGETS[name](base, shim, args.workers, tls_files)
            try:
                target.start(sorted({m for _, _, _, t, _, ms in steps if t == name for m in ms}))
            except BenchError as e:
                log(f"bench: {e}: skipped")
                skipped.append(f"{name} ({e})")
                target.stop()
                continue
            started[name] = target
            log(f"bench: {name} on {target.server} (pid {target.root_pid()})")
        targets = [t for t in wanted if t in started]
        if route_names:
            try:
                routes, extras = start_proxy_routes(base, shim, log)
            except BenchError as e:
                log(f"bench: {e}: P is skipped")
                skipped.append(f"P ({e})")
                for extra in extras:
                    extra.stop()
                routes, extras = {}, []
        previous, current_disk = None, None
        for disk, s, client, name, rnd, mailboxes in steps:
            if disk != current_disk:
                log(f"bench: disk {disk}" + (f" ({disk_ms(disk):g} ms per flush)" if disk_ms(disk) else ""))
                for target in started.values():
                    target.device.set_flush_ms(disk_ms(disk))
                current_disk = disk
            if s.fresh and previous is not s:
                log(f"bench: restarting the servers for {s.key}")
                for target in started.values():
                    target.restart()
            previous = s
            target = routes.get(name) if s.servers == "proxy" else started.get(name)
            if target is not None:
                runs.append(run_one(s, client, target, rnd, mailboxes, disk,
                                    str(tls_files.ca) if tls_files else None))
    except KeyboardInterrupt:
        log("bench: interrupted; stopping the servers")
        return 130
    finally:
        for target in list(started.values()) + extras:
            target.stop()
        if args.keep:
            log(f"bench: kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - began
    mode = "quick" if args.quick else "full"
    print(f"ccsmtp bench ({mode}, {rounds} round(s), {elapsed:.0f} s), "
          f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {machine()}, "
          f"ccsmtp -w {args.workers}" + (f", servers on CPU {servers.SERVER_CPUS} and the "
                                         f"load client on CPU {CLIENT_CPUS}" if args.pin else ""))
    for s in selected:
        print(f"  {s.key}: {s.title}; {s.count} msgs, {s.size} bytes")
    if skipped:
        print("  skipped: " + "; ".join(skipped))
    for disk in disks:
        print()
        print("Fast disk (the VM's own)" if disk == "fast" else
              f"Slow disk: every flush {disk_ms(disk):g} ms (bench/slowsync.c)")
        print()
        print(table(runs, selected, targets, disk, list(routes)))
    tls = tls_table(runs, targets)
    if tls:
        print()
        print("TLS (issue 8): ccsmtp-send, 1 KB, a new connection per message, 20 sessions; "
              "plain, STARTTLS and smtps in the same round")
        print()
        print(tls)
    proxy = proxy_table(runs)
    if proxy:
        print()
        print("PROXY (issue 11): scenario A's load over four routes to ccsmtp -w 1 instances")
        print()
        print(proxy)
    print()
    print(LEGEND)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([dataclasses.asdict(r) | {"run_id": getattr(r, "run_id", None)}
                       for r in runs], f, indent=1)
    bad = [r for r in runs if r.problems]
    if bad:
        log(f"bench: {len(bad)} run(s) with problems (see the notes column)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
