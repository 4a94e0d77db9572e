#!/usr/bin/env python3
"""The scaling curve of ccsmtp (issue 12, part 4), then the plots.

    sudo python3 bench/curve.py                 # about 15 minutes on 2 cores
    python3 bench/curve.py --plot-only          # redraw from bench/curve.json

A and B at -w 1, 2, 4, 8 on the fast disk and with 8 ms flushes, Postfix and
aiosmtpd-durable measured beside each -w 2 run for reference; then D (idle
connections held) at 10,000, 20,000 and 50,000 connections with -w 4: whether a
fresh client is still greeted within 100 ms, and the memory per idle connection.
(-w 4 for D: a process may hold only as many descriptors as the hard limit allows,
20,000 on the development VM, so 50,000 connections need at least three workers;
the load client spreads them over several processes and source addresses.)
Each point is one bench/run.py invocation (its JSON is kept in bench/curve.json);
plot.py draws bench/scaling-ab.png and bench/scaling-d.png from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "curve.json"


def bench(args: list[str]) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(BENCH / "run.py"), "--json-out", out.name] + args
        print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        runs = json.loads(Path(out.name).read_text() or "[]")
    if result.returncode not in (0, 1):
        raise SystemExit(f"bench/run.py failed ({result.returncode}): {' '.join(args)}")
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--idle", default="10000,20000,50000")
    p.add_argument("--idle-workers", type=int, default=4, help="ccsmtp's -w for D")
    p.add_argument("--disks", default="fast,8")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    if not args.plot_only:
        runs: list[dict] = []
        for workers in [int(w) for w in args.workers.split(",")]:
            targets = "ccsmtp,postfix,aiosmtpd" if workers == 2 else "ccsmtp"
            runs += bench(["--targets", targets, "--scenarios", "AB", "--disks", args.disks,
                           "--workers", str(workers), "--rounds", str(args.rounds)])
        for idle in [int(n) for n in args.idle.split(",")]:
            for run in bench(["--targets", "ccsmtp", "--scenarios", "D", "--idle", str(idle),
                              "--workers", str(args.idle_workers)]):
                runs.append(dict(run, idle_requested=idle))
        OUT.write_text(json.dumps(runs, indent=1))
    sys.path.insert(0, str(BENCH))
    import plot
    plot.main([str(OUT)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
