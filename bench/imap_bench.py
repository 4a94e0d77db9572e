"""IMAP benchmark: ccsmtp against a private Dovecot (mbox INBOX) on the same 10,000-message
mailbox, on loopback.

    sudo python3 bench/imap_bench.py [--messages 10000] [--idle 100] [--sessions 20]
                                     [--mbsync-messages 1000] [--rounds 3]
                                     [--scenarios fetch,idle,rss,mbsync]

Scenarios, each against both servers:
  fetch   SELECT + UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE), on a fresh mailbox (first:
          no index, no cache) and then again (second, third), one raw-socket client that
          reads until the tagged OK (client parsing is not measured)
  idle    N sessions SELECT and IDLE; one message is appended to the mbox (under its
          locks, as delivery does); time until every session has seen "* n EXISTS"
  rss     M sessions each SELECT + UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE) and stay
          open; the largest ccsmtp worker RSS (and Dovecot's largest imap process)
  mbsync  (issue 10, scenario c) mbsync (isync) syncs bob's 1,000-message mailbox into an
          empty Maildir (first: every message fetched), then again with nothing new
          (second); --rounds times, each into a new Maildir with no sync state; the
          median of each, and ccsmtp's time over Dovecot's (1.1 s pass before each sync:
          mbsync itself sleeps 1 s when the Maildir changed within the current second),
          with "FSync no" (--mbsync-fsync: mbsync's default, an fsync per message file
          written, which on a slow disk costs more than either server does)
Needs root (both servers drop to nobody), dovecot-imapd, isync (mbsync) for the mbsync
scenario, and tests/servers.py.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import servers  # noqa: E402
from prefork_smtp.store import mbox  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau").split()
FETCH = b"UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)"


def message(i: int, rnd: random.Random) -> bytes:
    subject = " ".join(rnd.choice(WORDS) for _ in range(6))
    body = "\n".join(" ".join(rnd.choice(WORDS) for _ in range(12))
                     for _ in range(rnd.randint(5, 60)))
    return (f"From sender{i % 50}@example.org Mon Jan  1 00:{i // 60 % 60:02d}:{i % 60:02d} 2024\n"
            f"Return-Path: <sender{i % 50}@example.org>\n"
            f"Received: from mx.example.org (mx.example.org [192.0.2.{i % 250}])\n"
            f"\tby mail.example.org (ccsmtp) with ESMTP id {i:012X}\n"
            f"\tfor <alice@example.org>; Mon, 1 Jan 2024 00:00:00 +0000\n"
            f"From: \"Sender Number {i % 50}\" <sender{i % 50}@example.org>\n"
            f"To: Alice <alice@example.org>, bob@example.org\nCc: carol@example.org\n"
            f"Subject: {subject}\nDate: Mon, 1 Jan 2024 00:{i // 60 % 60:02d}:{i % 60:02d} +0000\n"
            f"Message-ID: <{i}.{rnd.getrandbits(40):x}@example.org>\n"
            f"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n{body}\n\n").encode()


def make_mbox(path: Path, count: int) -> None:
    rnd = random.Random(1)
    with open(path, "wb") as f:
        for i in range(count):
            f.write(message(i, rnd))


# --- a tiny IMAP client -----------------------------------------------------------------

class Client:
    def __init__(self, port: int, user: str, password: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = bytearray()
        self._read_until(b"\r\n")
        self.n = 0
        self.command(f"LOGIN {user} {password}".encode())

    def _read_until(self, marker: bytes) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[:i + len(marker)])
                del self.buf[:i + len(marker)]
                return out
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def command(self, line: bytes) -> bytes:
        self.n += 1
        tag = b"t%d" % self.n
        self.sock.sendall(tag + b" " + line + b"\r\n")
        self.buf[0:0] = b"\r\n"          # the buffer starts at a line start
        out = self._read_until(b"\r\n" + tag + b" ") + self._read_until(b"\r\n")
        return out[2:]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.sendall(b"z LOGOUT\r\n")
        except OSError:
            pass
        self.sock.close()


# --- the servers -------------------------------------------------------------------------

def start_ccsmtp(root: Path, mailboxes: dict[str, Path]) -> tuple[subprocess.Popen, int, dict[str, Path]]:
    import crypt_r
    spool = root / "spool"
    spool.mkdir()
    shutil.chown(spool, "nobody")
    users = root / "users"
    with open(users, "w") as f:
        for user, source in mailboxes.items():
            shutil.copy(source, spool / user)
            shutil.chown(spool / user, "nobody")
            f.write(f"{user}:{{SHA512-CRYPT}}"
                    f"{crypt_r.crypt('secret', crypt_r.mksalt(crypt_r.METHOD_SHA512))}\n")
    users.chmod(0o644)
    config = root / "ccsmtp.toml"
    config.write_text(f'users_file = "{users}"\nmax_connections_per_client = 1000\n')
    config.chmod(0o644)
    smtp, imap = servers.free_port(), servers.free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bin" / "ccsmtp-master"), "-w", "2",
                             "-l", f"127.0.0.1:{smtp}", "-l", f"imap://127.0.0.1:{imap}",
                             "-s", str(spool), "-d", "example.org", "-c", str(config),
                             "-u", "nobody"], stdout=subprocess.DEVNULL,
                            stderr=open(root / "ccsmtp.log", "wb"), start_new_session=True)
    servers.wait_until(lambda: servers.read_greeting("127.0.0.1", imap), proc, "ccsmtp IMAP")
    return proc, imap, {user: spool / user for user in mailboxes}


def start_dovecot(mailboxes: dict[str, Path]):
    original = servers.dovecot_config
    servers.dovecot_config = lambda *a: original(*a).replace(
        "mail_location = maildir:~/Maildir", "mail_location = mbox:~/mail:INBOX=~/inbox"
    ) + "protocol imap {\n  mail_max_userip_connections = 1000\n}\n" + \
        "service imap-login {\n  process_limit = 1000\n}\n"
    try:
        dovecot = servers.start_dovecot(users=tuple(mailboxes), imap=True)
    finally:
        servers.dovecot_config = original
    inboxes = {}
    for user, source in mailboxes.items():
        home = dovecot.home(user)
        (home / "mail").mkdir(parents=True)
        (home / ".ccsmtp").mkdir()        # mbox.append's dot-lock scratch file goes here
        shutil.copy(source, home / "inbox")
        for path in (home, home / "mail", home / "inbox"):
            shutil.chown(path, "nobody", "nogroup")
        inboxes[user] = home / "inbox"
    return dovecot, dovecot.imap_port, inboxes


# --- scenarios --------------------------------------------------------------------------

def fetch_rounds(port: int, password: str, rounds: int = 3) -> list[float]:
    out = []
    for _ in range(rounds):
        client = Client(port, "alice", password)
        start = time.perf_counter()
        client.command(b"SELECT INBOX")
        client.command(FETCH)
        out.append(time.perf_counter() - start)
        client.close()
    return out


def idle_latency(port: int, password: str, mailbox: Path, sessions: int) -> tuple[float, float]:
    clients = []
    for _ in range(sessions):
        client = Client(port, "alice", password)
        client.command(b"SELECT INBOX")
        client.send(b"i IDLE\r\n")
        client._read_until(b"+ ")
        client._read_until(b"\r\n")
        clients.append(client)
    time.sleep(1.0)
    seen: list[float] = []
    lock = threading.Lock()

    def wait(client: Client) -> None:
        client.sock.settimeout(30)
        client._read_until(b" EXISTS\r\n")
        with lock:
            seen.append(time.perf_counter())

    threads = [threading.Thread(target=wait, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    data = message(999_999, random.Random(2))
    start = time.perf_counter()
    mbox.append(str(mailbox.parent), mailbox.name, [data])
    for t in threads:
        t.join(40)
    for client in clients:
        client.close()
    seen.sort()
    return seen[len(seen) // 2] - start, seen[-1] - start


def rss_peak(port: int, password: str, sessions: int, pids) -> float:
    clients = []
    for _ in range(sessions):
        client = Client(port, "alice", password)
        client.command(b"SELECT INBOX")
        client.command(FETCH)
        clients.append(client)
    peak = 0
    for pid in pids():
        try:
            peak = max(peak, psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            pass
    for client in clients:
        client.close()
    return peak / 2**20


MBSYNC_RC = """\
FSync {fsync}

IMAPAccount bench
Host 127.0.0.1
Port {port}
User {user}
Pass {password}
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account bench

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Sync All
Expunge None
SyncState {state}/
"""


def mbsync_once(root: Path, name: str, port: int, user: str, password: str,
                expected: int, fsync: bool) -> tuple[float, float]:
    """A full sync into an empty Maildir and the no-change sync after it, in seconds."""
    work = Path(tempfile.mkdtemp(prefix=f"mbsync-{name}-", dir=root))
    maildir, state = work / "maildir", work / "state"
    maildir.mkdir()
    state.mkdir()
    rc = work / "mbsyncrc"
    rc.write_text(MBSYNC_RC.format(port=port, user=user, password=password, maildir=maildir,
                                   state=state, fsync="yes" if fsync else "no"))
    times = []
    for _ in range(2):
        # mbsync sleeps 1 s before a sync that follows one whose Maildir changes are still
        # in the current second (strace: clock_nanosleep of 1 s): wait that out here, so
        # that the client's own pause is not timed.
        time.sleep(1.1)
        start = time.perf_counter()
        done = subprocess.run(["mbsync", "-c", str(rc), "-q", "inbox"], capture_output=True,
                              text=True, timeout=600)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"mbsync against {name} failed: {done.stdout}{done.stderr}")
    got = sum(1 for sub in ("new", "cur") for _ in (maildir / "INBOX" / sub).iterdir())
    if got != expected:
        raise RuntimeError(f"mbsync against {name}: {got} messages in the Maildir, "
                           f"expected {expected}")
    shutil.rmtree(work)
    return times[0], times[1]


def mbsync_rounds(root: Path, targets: list[tuple[str, int, str]], user: str, expected: int,
                  rounds: int, fsync: bool) -> dict[str, tuple[list[float], list[float]]]:
    """Each round syncs from every server, the order rotating from round to round."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _, _ in targets}
    for n in range(rounds):
        for name, port, password in targets[n % len(targets):] + targets[:n % len(targets)]:
            first, second = mbsync_once(root, name, port, user, password, expected, fsync)
            out[name][0].append(first)
            out[name][1].append(second)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--mbsync-messages", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=3, help="mbsync rounds (medians are shown)")
    ap.add_argument("--scenarios", default="fetch,idle,rss,mbsync")
    ap.add_argument("--mbsync-fsync", action="store_true",
                    help="let mbsync fsync each message it writes (its default)")
    args = ap.parse_args()
    scenarios = set(args.scenarios.split(","))
    if "mbsync" in scenarios and shutil.which("mbsync") is None:
        sys.exit("mbsync is not installed (Debian: isync); leave it out with --scenarios")
    root = Path(tempfile.mkdtemp(prefix="imap-bench-"))
    root.chmod(0o755)
    source = root / "source.mbox"
    make_mbox(source, args.messages)
    small = root / "small.mbox"
    make_mbox(small, args.mbsync_messages)
    mailboxes = {"alice": source, "bob": small}
    proc, port, cc_boxes = start_ccsmtp(root, mailboxes)
    dovecot, dport, dv_boxes = start_dovecot(mailboxes)
    dpass = servers.DOVECOT_PASSWORD

    def cc_workers():
        return [c.pid for c in psutil.Process(proc.pid).children()
                if "worker" in " ".join(c.cmdline())]

    def dv_imaps():
        return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "imap"]

    try:
        print(f"{args.messages} messages, {source.stat().st_size / 2**20:.1f} MB")
        if "fetch" in scenarios:
            for name, p, pw in (("ccsmtp", port, "secret"), ("dovecot", dport, dpass)):
                rounds = fetch_rounds(p, pw)
                print(f"fetch  {name:8s} first {rounds[0]:.3f}s second {rounds[1]:.3f}s "
                      f"third {rounds[2]:.3f}s")
        if "idle" in scenarios:
            for name, p, pw, box in (("ccsmtp", port, "secret", cc_boxes["alice"]),
                                     ("dovecot", dport, dpass, dv_boxes["alice"])):
                median, last = idle_latency(p, pw, box, args.idle)
                print(f"idle   {name:8s} {args.idle} sessions: median {median * 1000:.0f} ms, "
                      f"last {last * 1000:.0f} ms")
        if "rss" in scenarios:
            for name, p, pw, pids in (("ccsmtp", port, "secret", cc_workers),
                                      ("dovecot", dport, dpass, dv_imaps)):
                print(f"rss    {name:8s} {args.sessions} sessions: largest process "
                      f"{rss_peak(p, pw, args.sessions, pids):.1f} MB")
        if "mbsync" in scenarios:
            print(f"mbsync {args.mbsync_messages} messages "
                  f"({small.stat().st_size / 2**20:.1f} MB), {args.rounds} rounds, "
                  f"FSync {'yes' if args.mbsync_fsync else 'no'}:")
            medians = {}
            results = mbsync_rounds(root, [("ccsmtp", port, "secret"), ("dovecot", dport, dpass)],
                                    "bob", args.mbsync_messages, args.rounds, args.mbsync_fsync)
            for name, (first, second) in results.items():
                medians[name] = (statistics.median(first), statistics.median(second))
                print(f"mbsync {name:8s} full sync {medians[name][0]:.3f}s "
                      f"(rounds {', '.join(f'{t:.3f}' for t in first)}); "
                      f"nothing new {medians[name][1]:.3f}s "
                      f"(rounds {', '.join(f'{t:.3f}' for t in second)})")
            (cf, cs), (df, ds) = medians["ccsmtp"], medians["dovecot"]
            print(f"mbsync ccsmtp/dovecot: full sync {cf / df:.2f}x the time, "
                  f"nothing new {cs / ds:.2f}x the time")
    finally:
        proc.terminate()
        proc.wait(30)
        servers.remove_dovecot(dovecot)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
