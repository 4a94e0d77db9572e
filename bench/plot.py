#!/usr/bin/env python3
"""Draw the scaling curve from bench/curve.json (bench/curve.py writes it).

    python3 bench/plot.py [bench/curve.json]

bench/scaling-ab.png: accepted msg/s in A and B against ccsmtp's -w, fast disk and
8 ms flushes, with Postfix and aiosmtpd-durable (measured beside -w 2) as
horizontal references. bench/scaling-d.png: idle connections held against the slowest
fresh client's greeting and the memory per idle connection.
Needs matplotlib (a bench dependency only: pip install matplotlib).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def accepted_per_s(run: dict) -> float:
    return run["accepted"] / run["client_elapsed_s"] if run["client_elapsed_s"] else 0.0


def plot_ab(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, scenario in zip(axes, "AB"):
        mine = [r for r in runs if r["scenario"] == scenario and r["client"] == "ccsmtp-send"]
        for disk, style in (("fast", "-o"), ("8", "--s")):
            points: dict[int, list[float]] = defaultdict(list)
            for r in mine:
                if r["target"] == "ccsmtp" and r["disk"] == disk:
                    points[r["workers"]].append(accepted_per_s(r))
            if points:
                xs = sorted(points)
                ax.plot(xs, [statistics.median(points[x]) for x in xs], style,
                        label=f"ccsmtp, {'fast disk' if disk == 'fast' else disk + ' ms flush'}")
            for peer, color in (("postfix", "tab:red"), ("aiosmtpd", "tab:green")):
                values = [accepted_per_s(r) for r in mine if r["target"] == peer and r["disk"] == disk]
                if values:
                    ax.axhline(statistics.median(values), color=color,
                               linestyle="-" if disk == "fast" else "--", linewidth=1,
                               label=f"{peer}, {'fast' if disk == 'fast' else disk + ' ms'}")
        ax.set_title({"A": "A: 1 KB, new connection each, 20 sessions",
                      "B": "B: 1 KB, 100 per connection, 20 sessions"}[scenario], fontsize=10)
        ax.set_xlabel("ccsmtp worker processes (-w)")
        ax.set_ylabel("accepted msg/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ccsmtp scaling on the 2-core VM (load client on the same cores)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_d(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mine = sorted((r for r in runs if r["scenario"] == "D" and r["target"] == "ccsmtp"),
                  key=lambda r: r.get("idle_requested", 0))
    if not mine:
        return
    held = [r["idle_held"] or 0 for r in mine]
    fresh = [r["greeting_ms"].get("max", float("nan")) if r["greeting_ms"] else float("nan")
             for r in mine]
    per_conn = [(r["tree_pss_peak"] - r["tree_pss_before"]) / h / 1024 if h else float("nan")
                for r, h in zip(mine, held)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(held, fresh, "-o", color="tab:blue", label="slowest fresh client's 220 (ms)")
    ax.axhline(100, color="tab:blue", linestyle=":", linewidth=1, label="100 ms")
    for h, f, r in zip(held, fresh, mine):
        if f != f:   # NaN: no fresh client was greeted
            ax.annotate(f"{r.get('idle_requested', h):,} asked, {h:,} held:\nno fresh client greeted in 5 s",
                        (h, 0), xytext=(h, 25), ha="right", fontsize=7, color="tab:red",
                        arrowprops={"arrowstyle": "->", "color": "tab:red"})
    workers = sorted({r["workers"] for r in mine})
    ax.set_xlabel(f"idle connections held by ccsmtp (-w {', '.join(map(str, workers))})")
    ax.set_ylabel("fresh client connect..220, ms", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(held, per_conn, "--s", color="tab:orange", label="memory per idle connection (KB)")
    ax2.set_ylabel("KB per idle connection (PSS)", color="tab:orange")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center left")
    ax.grid(alpha=0.3)
    fig.suptitle("D: idle connections held, and a fresh client meanwhile", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs = load(Path(argv[0]) if argv else BENCH / "curve.json")
    plot_ab(runs, BENCH / "scaling-ab.png")
    plot_d(runs, BENCH / "scaling-d.png")
    print(f"wrote {BENCH / 'scaling-ab.png'} and {BENCH / 'scaling-d.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
