#!/usr/bin/env python3
"""LMTP delivery into Dovecot beside mbox delivery, under the same load (issue 11).

One ccsmtp (`-w 2`) delivering to its mbox spool, and one delivering over LMTP to a
private Dovecot (tests/servers.py: loopback, its own base_dir, Maildir, users from a
passwd-file), each driven in turn with the same load: ccsmtp-send, 1 KB messages,
20 sessions, 100 messages per connection (scenario B: the SMTP side is then not
what limits), rotating over 20 mailboxes. Per round and target it reports accepted
messages/s (the client's) and delivered messages/s (every accepted message counted
in the mbox files or in the Maildirs, from the first connect), and the CPU of the
ccsmtp process tree and of Dovecot's per delivered message. Rounds alternate the
targets; the table gives medians.

    sudo python3 bench/lmtp_bench.py [--count 20000] [--rounds 3]

Needs Dovecot (Debian: dovecot-core, dovecot-lmtpd); root, so that Dovecot delivers
as the mail user `nobody` as in the tests. About 2 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import MboxCounter, ProcessTree  # noqa: E402
from servers import DOMAIN, REPO, BenchError, Ccsmtp  # noqa: E402

SEND = [sys.executable, str(REPO / "bin" / "ccsmtp-send")]
SENDER = "bench@bench.test"
MAILBOXES = [f"u{i}" for i in range(20)]
DELIVERY_TIMEOUT_S = 120.0


def load_test_servers():
    """tests/servers.py (the private Dovecot the LMTP tests use), under its own name:
    bench/ has a servers module too."""
    sys.path.insert(0, str(REPO / "tests"))
    spec = importlib.util.spec_from_file_location("test_servers", REPO / "tests" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_servers"] = module       # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def maildir_count(dovecot, user: str) -> int:
    maildir = dovecot.home(user) / "Maildir"
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur")
               if (maildir / sub).is_dir())


def run_round(name: str, target: Ccsmtp, count: int, delivered_count, extra_trees=()) -> dict:
    before = delivered_count()
    tree = ProcessTree(target.root_pid())
    others = [ProcessTree(pid) for pid in extra_trees]
    cpu0, other0 = tree.cpu_s(), sum(t.cpu_s() for t in others)
    cmd = SEND + ["--server", target.server, "--from", SENDER, "--helo", "bench.test",
                  "--count", str(count), "--concurrency", "20", "--size", "1024",
                  "--per-connection", "100", "--json", "--rotate"]
    for m in MAILBOXES:
        cmd += ["--to", f"{m}@{DOMAIN}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise BenchError(f"ccsmtp-send: {proc.stderr.strip()[-400:]}")
    result = json.loads(proc.stdout)
    accepted = result["accepted"]
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while (got := delivered_count() - before) < accepted and time.monotonic() < deadline:
        time.sleep(0.02)
    delivered_s = time.monotonic() - started
    cpu = tree.cpu_s() - cpu0
    other = sum(t.cpu_s() for t in others) - other0
    row = {"target": name, "accepted": accepted, "delivered": got,
           "accepted_per_s": accepted / result["elapsed_s"], "delivered_per_s": got / delivered_s,
           "ccsmtp_cpu_ms_per_msg": cpu * 1000 / max(1, got),
           "dovecot_cpu_ms_per_msg": other * 1000 / max(1, got) if extra_trees else None,
           "errors": result["errors"]}
    if got != accepted:
        row["problem"] = f"{got} of {accepted} accepted messages delivered"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if shutil.which("dovecot") is None and not os.path.exists("/usr/sbin/dovecot"):
        print("lmtp_bench: Dovecot is not installed (apt-get install dovecot-core "
              "dovecot-lmtpd)", file=sys.stderr)
        return 1
    test_servers = load_test_servers()
    base = Path(tempfile.mkdtemp(prefix="ccsmtp-lmtp-bench-"))
    os.chmod(base, 0o755)
    dovecot = test_servers.start_dovecot(users=MAILBOXES)
    mbox = Ccsmtp(base, name="ccsmtp-mbox")
    lmtp = Ccsmtp(base, name="ccsmtp-lmtp",
                  extra_config=f'delivery = "lmtp:127.0.0.1:{dovecot.lmtp_port}"\n')
    rows = []
    try:
        mbox.start(MAILBOXES)
        lmtp.start(MAILBOXES)
        counters: list[MboxCounter] = []

        def in_mboxes() -> int:
            if not counters:
                counters.extend(MboxCounter(str(mbox.mailbox(m))) for m in MAILBOXES)
            return sum(c.poll() for c in counters)

        def in_dovecot() -> int:
            return sum(maildir_count(dovecot, m) for m in MAILBOXES)

        for rnd in range(args.rounds):
            for name, target, counter, extra in (("mbox", mbox, in_mboxes, ()),
                                                  ("lmtp", lmtp, in_dovecot, (dovecot.proc.pid,))):
                row = run_round(name, target, args.count, counter, extra)
                row["round"] = rnd + 1
                rows.append(row)
                print(f"round {rnd + 1} {name:5}: accepted {row['accepted_per_s']:7.0f}/s, "
                      f"delivered {row['delivered_per_s']:7.0f}/s, ccsmtp CPU "
                      f"{row['ccsmtp_cpu_ms_per_msg']:.2f} ms/msg"
                      + (f", Dovecot CPU {row['dovecot_cpu_ms_per_msg']:.2f} ms/msg"
                         if row["dovecot_cpu_ms_per_msg"] is not None else "")
                      + (f"  PROBLEM: {row['problem']}" if "problem" in row else ""),
                      file=sys.stderr)
    finally:
        for target in (mbox, lmtp):
            target.stop()
        test_servers.remove_dovecot(dovecot)
        shutil.rmtree(base, ignore_errors=True)

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["target"] == name and r[key] is not None]
        return statistics.median(values) if values else None

    print(f"\nLMTP into Dovecot vs mbox: ccsmtp -w 2, ccsmtp-send 1 KB, 20 sessions, 100 "
          f"messages per connection, {args.count} messages a round, medians of {args.rounds}\n")
    print("| delivery | accepted msg/s | delivered msg/s | ccsmtp CPU ms/msg | Dovecot CPU ms/msg |")
    print("|---|---|---|---|---|")
    for name in ("mbox", "lmtp"):
        dovecot_cpu = median(name, "dovecot_cpu_ms_per_msg")
        print(f"| {name} | {median(name, 'accepted_per_s'):.0f} | "
              f"{median(name, 'delivered_per_s'):.0f} | "
              f"{median(name, 'ccsmtp_cpu_ms_per_msg'):.2f} | "
              f"{'-' if dovecot_cpu is None else f'{dovecot_cpu:.2f}'} |")
    ratio = median("lmtp", "delivered_per_s") / median("mbox", "delivered_per_s")
    print(f"\nLMTP / mbox delivered msg/s: x{ratio:.2f}")
    problems = [r for r in rows if "problem" in r]
    for r in problems:
        print(f"PROBLEM round {r['round']} {r['target']}: {r['problem']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
