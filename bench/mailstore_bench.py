"""Mailstore figures: building the index, later opens, listings, refreshes, expunges,
and memory, for mailboxes of 10,000 and 100,000 messages.

    python3 bench/mailstore_bench.py [--sizes 10000,100000] [--dir /tmp]

Each measurement that reports memory runs in a fresh child process (RSS = VmHWM of
that process, the interpreter included). Messages are what delivery writes
(mbox.format_copy), 1-6 KB each, a few with '>From ' lines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefork_smtp.store import mailbox_views, mailstore, mbox, queue  # noqa: E402
from prefork_smtp.store.envelope import Envelope, Recipient  # noqa: E402

ENVELOPE = Envelope("sender@example.net", (Recipient("alice@example.org", "alice"),),
                    "client.example.net", "ESMTP", "192.0.2.7", "7BIT")


def make_mailbox(spool: str, count: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    path = os.path.join(spool, "alice")
    with open(path, "wb") as f:
        for i in range(count):
            body = b"".join(b"line %d of message %d, some text to fill it up a bit\r\n" % (k, i)
                            for k in range(rng.randint(15, 100)))
            if i % 50 == 0:
                body += b"From the start of a line\r\n"
            content = (b"From: Sender <sender@example.net>\r\nTo: alice@example.org\r\n"
                       b"Subject: message %d\r\nMessage-ID: <%d@example.net>\r\n\r\n" % (i, i) + body)
            f.write(b"".join(mbox.format_copy(ENVELOPE, [content], queue_id="%012X" % i,
                                              recipient="alice@example.org",
                                              received_at=1.7e9 + i, hostname="mx.example.org")))
    return os.path.getsize(path)


def rss_kb() -> tuple[int, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def child(task: str, spool: str) -> dict:
    out: dict = {"rss_start_kb": rss_kb()[0]}
    t0 = time.perf_counter()
    if task == "open":
        box = mailstore.open_mailbox(spool, "alice")
        out["open_s"] = time.perf_counter() - t0
        out["messages"] = box.count
        t0 = time.perf_counter()
        view = mailbox_views.ImapView(spool, "alice")
        infos = view.messages()
        out["view_and_list_all_s"] = time.perf_counter() - t0
        assert len(infos) == box.count
        t0 = time.perf_counter()
        cols = box.listing()
        out["listing_columns_s"] = time.perf_counter() - t0
        assert len(cols["uid"]) == box.count
        t0 = time.perf_counter()
        for _ in range(1000):
            view.refresh()
        out["refresh_unchanged_us"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        pop = mailbox_views.Pop3Maildrop(spool, "alice")
        out["pop3_login_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in range(1, min(pop.count, 200) + 1):
            b"".join(pop.iter_content(n))
        out["retr_200_s"] = time.perf_counter() - t0
        pop.close()
    elif task == "views20":
        box = mailstore.open_mailbox(spool, "alice")
        views = [mailbox_views.ImapView(spool, "alice") for _ in range(20)]
        for v in views:
            v.messages()
            v.refresh()
        out["views"] = len(views)
        out["messages"] = box.count
        out["open_20_views_s"] = time.perf_counter() - t0
    elif task == "append_refresh":
        box = mailstore.open_mailbox(spool, "alice")
        view = mailbox_views.ImapView(spool, "alice")
        mbox.append(spool, "alice", [b"From x Thu Jan  1 00:00:00 2026\nSubject: new\n\nnew\n\n"])
        t0 = time.perf_counter()
        changes = view.refresh()
        out["refresh_after_append_s"] = time.perf_counter() - t0
        assert changes.new_uids, changes
        t0 = time.perf_counter()
        view.store_flags(view.uids[:100], ["\\Seen"], "add")
        out["store_100_flags_s"] = time.perf_counter() - t0
        other = mailstore.Mailbox(spool, "alice")     # as another process would see it
        other.refresh()
        t0 = time.perf_counter()
        view.store_flags([view.uids[5]], ["\\Deleted"], "add")
        other.refresh()
        out["flag_change_seen_by_other_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        removed = view.expunge([view.uids[5]])
        out["expunge_1_s"] = time.perf_counter() - t0
        assert len(removed) == 1
        out["messages"] = box.count
    out["rss_kb"], out["rss_peak_kb"] = rss_kb()
    return out


def run_child(task: str, spool: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", task, spool],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    for count in (int(s) for s in args.sizes.split(",")):
        top = tempfile.mkdtemp(dir=args.dir)
        try:
            spool = os.path.join(top, "spool")
            os.mkdir(spool)
            queue.make_dirs(spool)
            size = make_mailbox(spool, count)
            print(f"--- {count} messages, {size / 1e6:.1f} MB mbox")
            first = run_child("open", spool)
            print(f"first open (index built): {first['open_s']:.2f} s, "
                  f"peak RSS {first['rss_peak_kb'] / 1024:.1f} MB")
            for run in range(2):
                later = run_child("open", spool)
                print(f"later open: {later['open_s'] * 1e3:.1f} ms; ImapView + list all "
                      f"(uid, flags, size, lines, internaldate): {later['view_and_list_all_s'] * 1e3:.1f} ms; "
                      f"columns: {later['listing_columns_s'] * 1e3:.2f} ms; "
                      f"refresh unchanged: {later['refresh_unchanged_us']:.1f} us; "
                      f"POP3 login: {later['pop3_login_s'] * 1e3:.1f} ms; "
                      f"200 RETR: {later['retr_200_s'] * 1e3:.1f} ms; "
                      f"peak RSS {later['rss_peak_kb'] / 1024:.1f} MB (interpreter alone "
                      f"{later['rss_start_kb'] / 1024:.1f} MB)")
            views = run_child("views20", spool)
            print(f"20 ImapViews in one process: {views['open_20_views_s'] * 1e3:.0f} ms, "
                  f"peak RSS {views['rss_peak_kb'] / 1024:.1f} MB")
            changes = run_child("append_refresh", spool)
            print(f"refresh after one append: {changes['refresh_after_append_s'] * 1e3:.2f} ms; "
                  f"STORE +\\Seen on 100: {changes['store_100_flags_s'] * 1e3:.2f} ms; "
                  f"flag change seen by another Mailbox: {changes['flag_change_seen_by_other_s'] * 1e3:.2f} ms; "
                  f"expunge 1: {changes['expunge_1_s'] * 1e3:.0f} ms")
        finally:
            shutil.rmtree(top)


if __name__ == "__main__":
    main()
