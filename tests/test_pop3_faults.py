"""kill -9 of the worker in the middle of a POP3 QUIT that deletes, under delivery load.

The real server (2 workers) and a mailbox of a few hundred messages that SMTP senders
keep adding to. Each round: a POP3 session logs in, marks a random few of its messages
(sometimes all of them) with DELE, sends QUIT, and the worker holding the connection is
killed -9 a random moment later: before the expunge starts, while it copies, between
its renames, after, before or after the +OK. Then, with the file read under the mbox
lock as mutt reads it (SPEC §6, §9; store/mailstore.py's crash window):
- every message is intact (its X-Check digest matches its body) and there once;
- nothing acknowledged or seen before is missing unless this test deleted it;
- the messages of the interrupted QUIT are either all there (old set) or all gone
  (new set), and all gone if the client got its +OK;
- a message once gone never comes back;
- the next session's UIDLs of the survivors are the ones they had (no UIDVALIDITY
  change: a crash between the two renames is reconciled by fingerprint).
At the end the senders stop, and every message a sender got a 250 for and this test
did not delete is in the mailbox.

CCSMTP_POP3_KILLS (default 40) sets the number of rounds; the figures are printed
and appended to RELIABILITY_LOG.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import smtplib
import threading
import time

from conftest import DOMAIN, SENDER, record_figures
from pop3_support import (Pop3Server, prepare_spool, split_mbox, start_pop3, write_mailbox)
from prefork_smtp.store import mailbox_index

KILLS = int(os.environ.get("CCSMTP_POP3_KILLS", "40"))
INITIAL_MESSAGES = 300
MAILBOX_CEILING = 400         # senders pause above this many messages
S_COMMIT_FAILED = b"-ERR [SYS/TEMP] Some deleted messages not removed.\r\n"


def checked_content(mid: str, rng: random.Random) -> bytes:
    """A message whose X-Check header is the digest of its body as stored (LF ends)."""
    lines = []
    for k in range(rng.randint(3, 60)):
        lead = rng.choice(["", "", ".", "..", " "])
        lines.append(lead + f"{mid} line {k} " + "z" * rng.randint(0, 200))
    if rng.random() < 0.03:
        lines.append("q" * rng.randint(20_000, 100_000))     # a big one now and then
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()[:32]
    return (f"From: {SENDER}\r\nTo: alice@{DOMAIN}\r\nSubject: kill test\r\n"
            f"Message-ID: {mid}\r\nX-Check: {digest}\r\n\r\n" + body.replace("\n", "\r\n")).encode()


_MID = re.compile(rb"(?mi)^Message-ID: (<[^>\n]*>)$")
_CHECK = re.compile(rb"(?mi)^X-Check: ([0-9a-f]{32})$")


def parse_checked(stored: bytes) -> tuple[str, bool]:
    """(Message-ID, intact) of one stored message."""
    header, _, body = stored.partition(b"\n\n")
    mid, check = _MID.search(header), _CHECK.search(header)
    if mid is not None and mid.group(1).startswith(b"<barrier-"):
        return mid.group(1).decode(), True      # conftest's settle() marker
    if mid is None or check is None:
        return f"<unparsable {stored[:60]!r}>", False
    # What follows the header is the body and mboxrd's blank separator line.
    body = body[:-1]
    intact = hashlib.sha256(body).hexdigest()[:32] == check.group(1).decode()
    return mid.group(1).decode(), intact


class Senders:
    """SMTP senders adding to alice; a sender whose connection dies (its worker was
    killed) starts a new one. Remembers what got a 250."""

    def __init__(self, pop3: Pop3Server, count: int = 2, interval: float = 0.05):
        self.pop3 = pop3
        self.acked: set[str] = set()
        self.attempts = 0
        self.failures = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pause_above = MAILBOX_CEILING
        self.interval = interval
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(count)]

    def __enter__(self) -> "Senders":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, n: int) -> None:
        rng = random.Random(n * 7919 + os.getpid())
        seq = 0
        client = None
        while not self.stop.is_set():
            if self.pop3.smtp.count("alice") > self.pause_above:
                time.sleep(0.05)
                continue
            mid = f"<load-{n}-{seq}-{rng.getrandbits(32):08x}@test>"
            seq += 1
            try:
                if client is None:
                    client = smtplib.SMTP(self.pop3.host, self.pop3.smtp.port, timeout=10)
                with self.lock:
                    self.attempts += 1
                refused = client.sendmail(SENDER, [f"alice@{DOMAIN}"], checked_content(mid, rng))
                assert not refused
                with self.lock:
                    self.acked.add(mid)
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.failures += 1
                client = None
            time.sleep(rng.uniform(0, self.interval))
        if client is not None:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                pass


class Book:
    def __init__(self, pop3: Pop3Server):
        self.pop3 = pop3
        self.index_path = mailbox_index.Paths(str(pop3.spool), "alice").index
        self.seen: set[str] = set()          # ever seen in the mailbox
        self.deleted: set[str] = set()       # removed by this test's sessions
        self.uidl_of: dict[str, str] = {}
        self.figures = dict(rounds=0, kills=0, kills_before_reply=0, expunges_completed=0,
                            expunges_not_completed=0, ok_then_killed=0,
                            new_mailbox_old_index=0, messages_checked=0, messages_deleted=0,
                            uidls_checked=0)

    def mailbox(self) -> dict[str, int]:
        """Message-ID -> position, after checking that every message is intact, once."""
        data = self.pop3.smtp.raw("alice")
        present: dict[str, int] = {}
        for position, stored in enumerate(split_mbox(data)):
            mid, intact = parse_checked(stored)
            assert intact, f"damaged message {mid}: {stored[:300]!r}"
            assert mid not in present, f"{mid} is there twice"
            present[mid] = position
        self.figures["messages_checked"] += len(present)
        return present

    def after_kill(self, present: dict[str, int], in_flight: set[str], got_ok: bool) -> None:
        back = self.deleted & set(present)
        assert not back, f"deleted messages came back: {sorted(back)[:5]}"
        lost = self.seen - self.deleted - in_flight - set(present)
        assert not lost, f"messages lost: {sorted(lost)[:5]}"
        there = in_flight & set(present)
        assert there in (set(), in_flight), \
            f"half of an interrupted QUIT applied: {len(there)} of {len(in_flight)} still there"
        if there:
            assert not got_ok, "+OK for a QUIT whose deletions are not done"
            self.figures["expunges_not_completed"] += 1
        else:
            self.figures["expunges_completed"] += 1
            self.figures["ok_then_killed"] += got_ok
            self.deleted |= in_flight
            self.figures["messages_deleted"] += len(in_flight)
        self.seen |= set(present)
        # Between the two renames: the new mailbox, the old index (reconciled on open).
        with open(self.index_path, "rb") as f:
            header = mailbox_index.Header.unpack(f.read(mailbox_index.HEADER_BYTES))
        if header.mbox_ino != os.stat(self.pop3.spool / "alice").st_ino:
            self.figures["new_mailbox_old_index"] += 1

    def check_uidls(self, uidls: list[tuple[int, str]], ids: list[str]) -> None:
        for (_, uidl), mid in zip(uidls, ids):
            assert self.uidl_of.setdefault(mid, uidl) == uidl, \
                f"{mid}: UIDL {self.uidl_of[mid]} became {uidl}"
        self.figures["uidls_checked"] += len(ids)


def login(pop3: Pop3Server, timeout: float = 10.0):
    """A logged-in session (the killed worker's lock dies with it, but the replacement
    may need a moment to start)."""
    deadline = time.monotonic() + timeout
    while True:
        wire = pop3.wire(timeout=20)
        reply = wire.login("alice", "secret")
        if reply.startswith(b"+OK"):
            return wire
        wire.close()
        assert time.monotonic() < deadline, f"cannot log in: {reply!r}"
        time.sleep(0.05)


def test_kill_9_during_quit_with_dele_under_delivery_load(start_server, work_dir):
    rng = random.Random(int(os.environ.get("CCSMTP_POP3_KILL_SEED", "0")) or None)
    spool = work_dir / "spool-kill"
    prepare_spool(spool)
    seed_rng = random.Random(1)
    write_mailbox(spool / "alice", INITIAL_MESSAGES,
                  lambda n: checked_content(f"<seed-{n}@test>", seed_rng))
    pop3 = start_pop3(start_server, work_dir, scheme="SHA512-CRYPT", spool=spool)
    book = Book(pop3)
    book.seen = set(book.mailbox())
    # How long a QUIT with a few DELEs takes here: the kill delays spread over that.
    quit_times = []
    started = time.monotonic()
    with Senders(pop3) as senders:
        for _ in range(3):
            wire = login(pop3)
            count = int(wire.cmd("STAT").split()[1])
            ids = [parse_checked(m)[0] for m in split_mbox(pop3.smtp.raw("alice"))[:count]]
            number = rng.randint(1, count)
            wire.cmd(f"DELE {number}")
            t0 = time.monotonic()
            assert wire.cmd("QUIT") == b"+OK Bye\r\n"
            quit_times.append(time.monotonic() - t0)
            wire.close()
            book.deleted.add(ids[number - 1])
        # Kill at a uniform moment in [0, spread]; spread adapts so that about half the
        # kills come before the +OK, which puts most of them inside the expunge.
        spread = 1.5 * max(quit_times)
        book.seen = set(book.mailbox())
        for round_ in range(KILLS):
            wire = login(pop3)
            count = int(wire.cmd("STAT").split()[1])
            uidls = wire.listing("UIDL")
            snapshot = split_mbox(pop3.smtp.raw("alice"))[:count]
            ids = [parse_checked(m)[0] for m in snapshot]
            book.check_uidls(uidls, ids)
            if rng.random() < 0.05:
                doomed = list(range(1, count + 1))
            else:
                doomed = rng.sample(range(1, count + 1), min(count, rng.randint(1, 8)))
            for n in doomed:
                assert wire.cmd(f"DELE {n}").startswith(b"+OK")
            in_flight = {ids[n - 1] for n in doomed}
            worker = pop3.worker_of(wire.sock)
            assert worker is not None
            wire.send(b"QUIT\r\n")
            time.sleep(rng.uniform(0, spread))
            os.kill(worker.pid, signal.SIGKILL)
            book.figures["kills"] += 1
            try:
                reply = wire.line()
            except ConnectionResetError:     # killed with our QUIT unread
                reply = b""
            got_ok = reply == b"+OK Bye\r\n"
            assert got_ok or reply in (b"", S_COMMIT_FAILED), reply
            book.figures["kills_before_reply"] += not got_ok
            spread = min(max(spread * (0.85 if got_ok else 1.15), 0.002), 1.0)
            wire.close()
            pop3.smtp.wait_for_processes("ccsmtp: worker", 2, timeout=10, exclude={worker.pid})
            book.after_kill(book.mailbox(), in_flight, got_ok)
            book.figures["rounds"] += 1
        senders.stop.set()
    # Everything acknowledged and not deleted is there, once, intact.
    pop3.smtp.settle(["alice"], timeout=30)
    present = book.mailbox()
    book.seen |= senders.acked
    lost = (senders.acked | book.seen) - book.deleted - set(present)
    lost = {mid for mid in lost if not mid.startswith("<barrier")}
    assert not lost, f"acknowledged messages lost: {sorted(lost)[:5]}"
    wire = login(pop3)
    count = int(wire.cmd("STAT").split()[1])
    book.check_uidls(wire.listing("UIDL"),
                     [parse_checked(m)[0] for m in split_mbox(pop3.smtp.raw("alice"))[:count]])
    wire.cmd("QUIT")
    wire.close()
    book.figures.update(seconds=round(time.monotonic() - started, 1),
                        quit_ms=round(1000 * max(quit_times), 1),
                        smtp_acked=len(senders.acked), smtp_attempts=senders.attempts,
                        smtp_failed=senders.failures, final_messages=len(present))
    record_figures("pop3.kill9_quit_dele", **book.figures)
    assert book.figures["expunges_completed"] and book.figures["kills"] == KILLS
