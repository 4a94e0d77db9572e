"""kill -9 around EXPUNGE through the real IMAP service (SPEC §9: "Expunging follows the
same no-loss rule as POP3 deletion").

A sender keeps delivering to alice over SMTP while, iteration after iteration, an IMAP
client logs in, reads the whole mailbox, marks a few messages \\Deleted and removes
them with EXPUNGE, UID EXPUNGE or CLOSE; the worker holding that connection (found by
the connection) is killed -9 at a random moment around the command. The next
iteration's session checks what the kill left, over IMAP and in the file itself
(Python's mailbox.mbox):
  - no message lost: every message seen before and not removed is there, byte for byte
    as first seen, under the same UID; UIDVALIDITY never changes; new UIDs are above
    every UID seen before (never reused);
  - no message damaged: each one ends with exactly the octets its sender sent, and the
    file holds the same messages in the same order, each body whole;
  - the removal in flight took all of its messages or none, and all of them once its
    tagged OK (or an untagged EXPUNGE) reached the client; flags were kept;
and at the end every message the sender got a 250 for is there exactly once or was
removed by the test (more copies only of an attempt whose 250 never arrived). An
observer session on the other worker lives through the kills and follows every
change through NOOP's EXPUNGE and EXISTS responses: its sequence numbers must match
the mailbox's. The figures are printed and appended to RELIABILITY_LOG.

Also here: the worker's RSS with a 10,000-message mailbox open and fetched in 20
sessions, and a stale dot-lock broken by delivery and an expunge at once (each writer
checks, once it holds the kernel lock, that the file is still SPOOL/NAME).

CCSMTP_IMAP_KILLS (default 200) sets the number of kill iterations, CCSMTP_IMAP_KILL_SECONDS
(default 35) a time after which no new one starts.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import pwd
import random
import re
import signal
import smtplib
import statistics
import subprocess
import threading
import time
import uuid

import psutil
import pytest

from prefork_smtp.store import mailbox_index, mailstore, mbox, mbox_scan, queue

from conftest import (DOMAIN, IS_ROOT, RUN_AS, SENDER, RssSampler, parse_mbox, read_locked,
                      record_figures)
from imapwire import Closed, Wire
from test_imap_server import PASSWORD, start_imap

KILL_ITERATIONS = int(os.environ.get("CCSMTP_IMAP_KILLS", "200"))
# On a machine shared with other work the iterations slow down: no new one starts after
# this many seconds (the figures say how many ran).
KILL_SECONDS = float(os.environ.get("CCSMTP_IMAP_KILL_SECONDS", "35"))
MAILBOX_TARGET = 40          # the sender pauses above this many messages
MIN_TO_EXPUNGE = 8           # fewer present: this iteration only checks
UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]")
FETCH_RE = re.compile(rb"\* \d+ FETCH \(UID (\d+) FLAGS \(([^)]*)\) BODY\[\] \{\d+\}\r\n\Z")
MESSAGE_ID_RE = re.compile(rb"(?im)^Message-ID: (<[^>\r\n]+>)\r?$")


# --- the sender ----------------------------------------------------------------------

class Sent:
    __slots__ = ("message_id", "content", "acked", "uncertain")

    def __init__(self, message_id: str, content: bytes):
        self.message_id, self.content = message_id, content
        self.acked = self.uncertain = 0


def new_message(rng: random.Random) -> Sent:
    message_id = f"<kx-{uuid.uuid4().hex[:16]}@test>"
    size = rng.choice([300] * 16 + [8_000] * 3 + [60_000])
    lines = [rng.randbytes(30).hex() for _ in range(max(1, size // 62))]
    # What mbox quoting and SMTP transparency touch, byte for byte through both.
    for tricky in ("From the start of a line", ">From quoted once", ".a leading dot", "."):
        if rng.random() < 0.3:
            lines.insert(rng.randrange(len(lines) + 1), tricky)
    body = "".join(line + "\r\n" for line in lines)
    content = (f"From: {SENDER}\r\nTo: alice@{DOMAIN}\r\nSubject: kill {message_id}\r\n"
               f"Message-ID: {message_id}\r\n\r\n{body}").encode()
    return Sent(message_id, content)


class Sender(threading.Thread):
    """Delivers to alice over SMTP, retrying a message (same Message-ID) until it gets
    250; pauses while the mailbox is full enough."""

    def __init__(self, server, seed: int, stop: threading.Event, room):
        super().__init__(daemon=True)
        self.server, self.rng, self.stop, self.room = server, random.Random(seed), stop, room
        self.sent: dict[str, Sent] = {}
        self.errors: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        current = None
        while not self.stop.is_set():
            if not self.room():
                time.sleep(0.01)
                continue
            if current is None:
                current = new_message(self.rng)
                self.sent[current.message_id] = current
            if self._attempt(current):
                current = None
                time.sleep(self.rng.uniform(0, 0.02))
            else:
                time.sleep(0.02)

    def _attempt(self, message: Sent) -> bool:
        try:
            client = smtplib.SMTP(self.server.host, self.server.port, local_hostname="kill.test",
                                  timeout=10)
        except (OSError, smtplib.SMTPException) as e:
            self.errors[type(e).__name__] += 1
            return False
        try:
            client.ehlo()
            if client.mail(SENDER)[0] != 250 or client.rcpt(f"alice@{DOMAIN}")[0] != 250:
                return False
            try:
                code, _ = client.data(message.content)
            except smtplib.SMTPDataError:
                return False
            except (OSError, smtplib.SMTPException):
                message.uncertain += 1      # the message may have gone out: no reply came
                raise
            if code == 250:
                message.acked += 1
                return True
            return False
        except (OSError, smtplib.SMTPException) as e:
            self.errors[type(e).__name__] += 1
            return False
        finally:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()


# --- what the test knows ----------------------------------------------------------------

class Pending:
    """The removal in flight at the last kill."""

    def __init__(self, mode: str, doomed: set[int], acked: bool, untagged: bool, refused: bool):
        self.mode, self.doomed, self.acked, self.untagged, self.refused = \
            mode, doomed, acked, untagged, refused


class Book:
    def __init__(self, sent: dict[str, Sent]):
        self.sent = sent
        self.uidvalidity: int | None = None
        self.known: dict[int, tuple[str, str]] = {}   # uid -> (message id, sha256 of BODY[])
        self.removed: dict[int, str] = {}             # uid -> message id
        self.flagged: set[int] = set()                # \Deleted, stored and acknowledged
        self.top_uid = 0
        self.figures: collections.Counter[str] = collections.Counter()

    def verify(self, uidvalidity: int, view: dict[int, tuple[frozenset[bytes], bytes]],
               pending: Pending | None) -> list[int]:
        """Check a fresh session's view of the mailbox; returns its UIDs in order."""
        if self.uidvalidity is None:
            self.uidvalidity = uidvalidity
        assert uidvalidity == self.uidvalidity, "UIDVALIDITY changed"
        present = set(view)
        if pending is not None:
            self._settle(pending, present)
        lost = set(self.known) - set(self.removed) - present
        assert not lost, f"messages lost: UIDs {sorted(lost)} " \
                         f"({[self.known[u][0] for u in sorted(lost)]})"
        assert not present & set(self.removed), "a removed message came back"
        for uid in sorted(view):
            flags, content = view[uid]
            digest = hashlib.sha256(content).hexdigest()
            if uid in self.known:
                assert self.known[uid][1] == digest, f"UID {uid} changed its content"
            else:
                assert uid > self.top_uid, f"new UID {uid} not above {self.top_uid}: reused"
                message_id = _message_id(content)
                self._check_new(uid, message_id, content)
                self.known[uid] = (message_id, digest)
                self.top_uid = uid
            deleted = b"\\Deleted" in flags
            assert deleted == (uid in self.flagged), \
                f"UID {uid}: flags {sorted(flags)}, \\Deleted expected: {uid in self.flagged}"
            assert flags <= {b"\\Deleted"}, f"UID {uid}: flags {sorted(flags)}"
        self.figures["messages_checked"] += len(view)
        return sorted(view)

    def _check_new(self, uid: int, message_id: str, content: bytes) -> None:
        if message_id.startswith("<barrier-"):
            return
        sent = self.sent.get(message_id)
        assert sent is not None, f"UID {uid}: a message nobody sent: {message_id}"
        assert content.endswith(sent.content), f"UID {uid} ({message_id}) is damaged"
        assert content[:len(content) - len(sent.content)].startswith(b"Return-Path: "), uid

    def _settle(self, pending: Pending, present: set[int]) -> None:
        there = pending.doomed & present
        if not there:
            kind = "acked" if pending.acked else "completed_unacked"
            for uid in pending.doomed:
                self.removed[uid] = self.known[uid][0]
            self.flagged -= pending.doomed
        else:
            assert there == pending.doomed, \
                f"half of an interrupted {pending.mode}: {sorted(pending.doomed)} -> {sorted(there)}"
            assert not pending.acked, f"{pending.mode} acknowledged, its messages are back"
            assert not pending.untagged, f"{pending.mode} reported EXPUNGE, its messages are back"
            kind = "refused" if pending.refused else "not_completed"
        self.figures[f"total_{kind}"] += 1
        self.figures[f"{pending.mode.lower().replace(' ', '_')}_{kind}"] += 1

    def final_counts(self, view_ids: list[str]) -> None:
        """Every acknowledged message is there once, or was removed by the test."""
        found = collections.Counter(view_ids)
        gone = collections.Counter(self.removed.values())
        problems = []
        for message_id, sent in self.sent.items():
            copies = found[message_id] + gone[message_id]
            if sent.acked and copies == 0:
                problems.append(f"acknowledged {message_id} is missing")
            if copies > sent.acked + sent.uncertain:
                problems.append(f"{message_id}: {copies} copies, acknowledged {sent.acked}, "
                                f"unanswered {sent.uncertain}")
            self.figures["duplicates"] += max(0, copies - 1)
        assert not problems, "\n".join(problems[:20])


def _message_id(content: bytes) -> str:
    m = MESSAGE_ID_RE.search(content.split(b"\r\n\r\n", 1)[0])
    assert m, content[:300]
    return m.group(1).decode()


def _mboxrd(content: bytes) -> bytes:
    return re.sub(rb"(?m)^(>*From )", rb">\1", content.replace(b"\r\n", b"\n"))


def scratch_mbox(spool, name: str) -> str:
    """Where an expunge writes the new mailbox before renaming it (mailstore)."""
    return mailbox_index.Paths(str(spool), name).new_mbox


def index_mbox_inode(spool, name: str) -> int:
    """The inode of the mbox file the index describes."""
    with open(mailbox_index.Paths(str(spool), name).index, "rb") as f:
        return mailbox_index.Header.unpack(f.read(mailbox_index.HEADER_BYTES)).mbox_ino


# --- one IMAP session ------------------------------------------------------------------

def connect(imap, deadline_s: float = 15.0) -> Wire:
    """A logged-in session with INBOX selected (waits while workers are replaced)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            wire = Wire("127.0.0.1", imap.imap, timeout=15)
            if wire.greeting.startswith(b"* OK"):
                return wire
            wire.close()
        except (OSError, Closed):
            pass
        assert time.monotonic() < deadline, "no IMAP greeting for 15 s"
        time.sleep(0.05)


def read_view(wire: Wire) -> tuple[int, dict[int, tuple[frozenset[bytes], bytes]]]:
    untagged = wire.ok("SELECT INBOX")
    [uidvalidity] = [int(m.group(1)) for r in untagged if (m := UIDVALIDITY_RE.search(r[0]))]
    view = {}
    for response in wire.ok("UID FETCH 1:* (UID FLAGS BODY.PEEK[])"):
        if re.fullmatch(rb"\* \d+ EXISTS\r\n", response[0]):
            continue               # delivered meanwhile: the FETCH includes it
        m = FETCH_RE.fullmatch(response[0])
        assert m and len(response) == 3 and response[2] == b")\r\n", response[:1]
        view[int(m.group(1))] = (frozenset(m.group(2).split()), response[1])
    return uidvalidity, view


def holder(server, connection) -> psutil.Process:
    """The worker serving this connection (a Wire, or anything with a .sock)."""
    for _ in range(50):
        pid = holder_pid(server, connection)
        if pid is not None:
            return psutil.Process(pid)
        time.sleep(0.02)
    raise AssertionError("no worker holds the connection")


def check_file(server, uids: list[int], book: Book) -> None:
    """mailbox.mbox reads the file: the session's messages first, in order, then only
    messages delivered since; every body whole."""
    messages = parse_mbox(read_locked(server.path("alice")), server.scratch)
    ids = [m["Message-ID"] for m in messages]
    assert ids[:len(uids)] == [book.known[u][0] for u in uids], "the file and IMAP disagree"
    for message in messages:
        sent = book.sent.get(message["Message-ID"])
        if sent is None:
            assert message["Message-ID"].startswith("<barrier-"), message["Message-ID"]
            continue
        body = sent.content.split(b"\r\n\r\n", 1)[1]
        payload = message.get_payload().encode("utf-8", "surrogateescape")
        assert payload == _mboxrd(body), f"{message['Message-ID']} damaged in the file"


class Observer:
    """A session that stays open across the kills (reopened when its own worker is the
    one killed) and follows the mailbox through NOOP's EXPUNGE and EXISTS responses:
    its sequence numbers must always match the mailbox (UID SEARCH ALL)."""

    def __init__(self, imap):
        self.imap = imap
        self.reopened = 0
        self.polls = 0
        self.expunges_seen = 0
        self._open()

    def _open(self) -> None:
        self.wire = connect(self.imap)
        self.wire.login("alice", PASSWORD)
        self.uids: list[int] = []
        self._apply(self.wire.ok("SELECT INBOX"))

    def _apply(self, untagged: list[list[bytes]]) -> None:
        for response in untagged:
            m = re.fullmatch(rb"\* (\d+) (EXPUNGE|EXISTS)\r\n", response[0])
            if m and m.group(2) == b"EXPUNGE":
                n = int(m.group(1))
                assert 1 <= n <= len(self.uids), f"EXPUNGE {n} of {len(self.uids)} messages"
                del self.uids[n - 1]
                self.expunges_seen += 1
            elif m:
                exists = int(m.group(1))
                assert exists >= len(self.uids), f"EXISTS {exists} < {len(self.uids)}"
                while len(self.uids) < exists:
                    fetched = self.wire.ok(f"FETCH {len(self.uids) + 1}:{exists} (UID)")
                    for r in fetched:
                        f = re.fullmatch(rb"\* (\d+) FETCH \(UID (\d+)\)\r\n", r[0])
                        if f:
                            assert int(f.group(1)) == len(self.uids) + 1, r
                            self.uids.append(int(f.group(2)))
                        else:           # more delivered meanwhile: fetch those too
                            more = re.fullmatch(rb"\* (\d+) EXISTS\r\n", r[0])
                            assert more, r
                            exists = max(exists, int(more.group(1)))

    def poll(self, server, killed_pid: int | None) -> None:
        try:
            if killed_pid is not None and holder_pid(server, self.wire) in (None, killed_pid):
                raise Closed(b"")
            for _ in range(5):
                self._apply(self.wire.ok("NOOP"))
                untagged = self.wire.ok("UID SEARCH ALL")
                if any(r[0].endswith(b" EXISTS\r\n") for r in untagged):
                    self._apply([r for r in untagged if not r[0].startswith(b"* SEARCH")])
                    continue            # delivered meanwhile: look again
                [found] = [r[0] for r in untagged if r[0].startswith(b"* SEARCH")]
                assert [int(u) for u in found.split()[2:]] == self.uids, \
                    "the observer's sequence numbers went wrong"
                self.polls += 1
                return
        except (Closed, OSError):
            self.wire.close()
            self.reopened += 1
            self._open()

    def worker_pid(self, server) -> int | None:
        return holder_pid(server, self.wire)

    def close(self) -> None:
        self.wire.close()


def connect_avoiding(imap, pid: int | None) -> Wire:
    """A session on another worker than pid where one is up (so that the observer
    lives through most kills)."""
    for _ in range(20):
        wire = connect(imap)
        if pid is None or holder_pid(imap.server, wire) != pid:
            return wire
        wire.close()
    return connect(imap)


def holder_pid(server, connection) -> int | None:
    """The pid of the worker holding the server's end of this connection: ss(8) finds
    that socket's inode by its ports (netlink, fast however many sockets the machine
    has, where psutil reads all of /proc/net/tcp), then the worker whose descriptors
    include it."""
    here, there = connection.sock.getsockname(), connection.sock.getpeername()
    try:
        out = subprocess.run(["ss", "-Htne", "state", "established",
                              f"( sport = :{there[1]} and dport = :{here[1]} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return _holder_pid_by_psutil(server, here)
    inodes = {f"socket:[{m}]" for m in re.findall(r"ino:(\d+)", out)}
    for worker in server.workers():
        try:
            fds = os.listdir(f"/proc/{worker.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{worker.pid}/fd/{fd}") in inodes:
                    return worker.pid
            except OSError:
                continue
    return None


def _holder_pid_by_psutil(server, here: tuple) -> int | None:
    for worker in server.workers():
        try:
            if any(c.raddr and (c.raddr.ip, c.raddr.port) == here
                   for c in worker.net_connections("tcp")):
                return worker.pid
        except psutil.Error:
            continue
    return None


# --- the test ---------------------------------------------------------------------------

MODES = ("EXPUNGE", "UID EXPUNGE", "CLOSE")


def test_kill_9_around_expunge_under_delivery_loses_and_damages_nothing(start_server, work_dir):
    # Three workers: while the killed one's successor starts, two serve (the observer's
    # and another for the next expunge).
    imap = start_imap(functools.partial(start_server, workers=3), work_dir)
    server = imap.server
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    stop = threading.Event()
    present_count = [0]
    sender = Sender(server, rng.randrange(2**32), stop, lambda: present_count[0] < MAILBOX_TARGET)
    book = Book(sender.sent)
    pending: Pending | None = None
    latencies: list[float] = [0.03]
    kills = 0
    started = time.monotonic()
    killed_pid = None
    phases: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def clock(name: str):
        begun = time.monotonic()
        try:
            yield
        finally:
            phases[name] += time.monotonic() - begun

    with RssSampler(server) as rss:
        sender.start()
        observer = Observer(imap)
        try:
            for iteration in range(KILL_ITERATIONS + 1):
                with clock("connect"):
                    wire = connect_avoiding(imap, observer.worker_pid(server))
                try:
                    with clock("read"):
                        wire.login("alice", PASSWORD)
                        uidvalidity, view = read_view(wire)
                    with clock("verify"):
                        uids = book.verify(uidvalidity, view, pending)
                        pending = None
                        check_file(server, uids, book)
                        present_count[0] = len(uids)
                    with clock("observer"):
                        observer.poll(server, killed_pid)
                        killed_pid = None
                    candidates = [u for u in uids if u not in book.flagged]
                    if iteration == KILL_ITERATIONS or time.monotonic() - started > KILL_SECONDS:
                        break                  # checked what the last kill left: done
                    if len(candidates) < MIN_TO_EXPUNGE:
                        book.figures["check_only"] += 1
                        time.sleep(0.05)
                        continue
                    with clock("expunge_and_kill"):
                        pending, killed_pid = expunge_and_kill(server, wire, rng, book,
                                                               candidates, latencies)
                    kills += 1
                finally:
                    wire.close()
        finally:
            observer.close()
            stop.set()
            sender.join(30)
        # Everything acknowledged is in by now; one last look over IMAP and in the file.
        server.settle(["alice"], timeout=60)
        wire = connect(imap)
        with wire:
            wire.login("alice", PASSWORD)
            uidvalidity, view = read_view(wire)
            uids = book.verify(uidvalidity, view, pending)
            check_file(server, uids, book)
    book.final_counts([book.known[u][0] for u in uids])
    elapsed = time.monotonic() - started
    acknowledged = sum(1 for s in sender.sent.values() if s.acked)
    f = book.figures
    line = record_figures(
        "imap_faults.kill_9_around_expunge", seed=seed, iterations=iteration,
        kills=kills, expunges_acknowledged=f["total_acked"],
        completed_without_ok=f["total_completed_unacked"],
        not_completed=f["total_not_completed"], refused=f["total_refused"],
        killed_mid_rewrite=f["killed_mid_rewrite"],
        killed_between_renames=f["killed_between_renames"],
        by_mode={m: {k: f[f"{m.lower().replace(' ', '_')}_{k}"]
                     for k in ("acked", "completed_unacked", "not_completed", "refused")}
                 for m in MODES},
        messages_checked=f["messages_checked"], messages_removed=len(book.removed),
        messages_acknowledged=acknowledged, messages_lost=0, messages_damaged=0,
        duplicates_of_unanswered_smtp=f["duplicates"],
        unanswered_smtp=sum(s.uncertain for s in sender.sent.values()),
        expunge_latency_median_ms=round(statistics.median(latencies) * 1000, 1),
        observer_polls=observer.polls, observer_expunges_seen=observer.expunges_seen,
        observer_reopened=observer.reopened,
        phase_seconds={k: round(v, 1) for k, v in phases.items()},
        seconds=round(elapsed, 1), rss=rss.summary())
    assert kills >= min(KILL_ITERATIONS // 2, 20), line
    assert f["total_acked"] and f["total_not_completed"] + f["total_completed_unacked"], line


def expunge_and_kill(server, wire: Wire, rng: random.Random, book: Book, candidates: list[int],
                     latencies: list[float]) -> tuple[Pending, int]:
    """Mark a few messages \\Deleted, remove them one of three ways, and kill -9 the
    worker at a random moment around it. Returns what was in flight."""
    chosen = sorted(rng.sample(candidates, rng.randint(1, min(5, len(candidates) // 3))))
    wire.ok("UID STORE %s +FLAGS.SILENT (\\Deleted)" % ",".join(map(str, chosen)))
    book.flagged |= set(chosen)
    mode = rng.choice(MODES)
    doomed = set(book.flagged)
    command = mode
    if mode == "UID EXPUNGE":
        # Some \Deleted messages outside the set stay; a message in the set without
        # \Deleted stays too.
        named = set(chosen) | {rng.choice(candidates)}
        doomed &= named
        command = "UID EXPUNGE " + ",".join(map(str, sorted(named)))
    worker = holder(server, wire)
    tag = wire.next_tag()
    # One time in eight the kill waits for the tagged response: the expunge's duration
    # then sets how long the others wait (so that most land inside it).
    measure = rng.random() < 0.125
    delay = rng.uniform(0, 1.5 * statistics.median(latencies[-50:]))
    sent_at = time.monotonic()
    wire.send(tag + b" " + command.encode() + b"\r\n")
    if measure:
        try:
            wire.read_until_tagged(tag)
            latencies.append(time.monotonic() - sent_at)
        except Closed:
            pass
    else:
        time.sleep(delay)
    os.kill(worker.pid, signal.SIGKILL)
    try:
        worker.wait(10)
    except psutil.TimeoutExpired:
        raise AssertionError(f"worker {worker.pid} still there 10 s after kill -9")
    # What the kill interrupted, seen before anyone touches the mailbox again.
    if os.path.exists(scratch_mbox(server.spool, "alice")):
        book.figures["killed_mid_rewrite"] += 1
    if index_mbox_inode(server.spool, "alice") != os.stat(server.path("alice")).st_ino:
        book.figures["killed_between_renames"] += 1
    received = wire.read_all(5)
    if measure:
        received = tag + b" OK (measured)\r\n" + received
    lines = received.split(b"\r\n")
    acked = any(line.startswith(tag + b" OK") for line in lines)
    refused = any(line.startswith(tag + b" NO") or line.startswith(tag + b" BAD") for line in lines)
    assert not any(line.startswith(tag + b" BAD") for line in lines), received[-300:]
    untagged = any(re.fullmatch(rb"\* \d+ EXPUNGE", line) for line in lines)
    return Pending(mode, doomed, acked, untagged, refused), worker.pid


# --- memory: a large mailbox open in many sessions ------------------------------------------

RSS_MESSAGES = 10_000
RSS_SESSIONS = 20
MAX_RSS_WITH_LARGE_MAILBOX = 100 * 2**20


def write_large_mbox(path, count: int) -> None:
    """count ordinary messages in mboxrd, as delivery writes them (a 24 MB file)."""
    rng = random.Random(10)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "wb") as f:
        for i in range(count):
            body = "\n".join(" ".join(rng.choice(words) for _ in range(12))
                             for _ in range(rng.randint(5, 60)))
            f.write(f"From sender{i % 50}@example.org Mon Jan  1 00:00:00 2024\n"
                    f"Return-Path: <sender{i % 50}@example.org>\n"
                    f"From: \"Sender {i % 50}\" <sender{i % 50}@example.org>\n"
                    f"To: Alice <alice@{DOMAIN}>\nCc: carol@{DOMAIN}\n"
                    f"Subject: {' '.join(rng.choice(words) for _ in range(6))}\n"
                    f"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <{i}.large@test>\n\n"
                    f"{body}\n\n".encode())


def test_twenty_sessions_on_a_10000_message_mailbox_keep_one_worker_under_100_mb(
        start_server, work_dir):
    """All 20 sessions on one worker (the other is stopped while they connect), each
    SELECT + UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE), as a mail client's first sync,
    and left open: that worker's peak RSS, through the real server."""
    imap = start_imap(start_server, work_dir)
    server = imap.server
    scratch = work_dir / "large.mbox"
    write_large_mbox(scratch, RSS_MESSAGES)
    if IS_ROOT:
        user = pwd.getpwnam(RUN_AS)
        os.chown(scratch, user.pw_uid, user.pw_gid)
    os.rename(scratch, server.path("alice"))
    worker, other = server.wait_for_processes("ccsmtp: worker", 2)
    wires: list[Wire] = []
    timings = []
    with RssSampler(server) as rss:
        other.suspend()
        try:
            for _ in range(RSS_SESSIONS):
                wires.append(Wire("127.0.0.1", imap.imap, timeout=120))
        finally:
            other.resume()
        try:
            assert all(holder(server, w).pid == worker.pid for w in wires)
            for wire in wires:
                started = time.monotonic()
                wire.login("alice", PASSWORD)
                wire.ok("SELECT INBOX")
                fetched = wire.ok("UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)")
                timings.append(time.monotonic() - started)
                assert len(fetched) == RSS_MESSAGES
            time.sleep(0.5)
            rss.sample()
            held = worker.memory_info().rss
        finally:
            for wire in wires:
                wire.close()
    peak = max(rss.peaks.get(worker.pid, 0), held)
    line = record_figures("imap_faults.large_mailbox_rss", messages=RSS_MESSAGES,
                          mbox_mb=round(server.path("alice").stat().st_size / 2**20, 1),
                          sessions_on_one_worker=RSS_SESSIONS,
                          worker_peak_mb=round(peak / 2**20, 1),
                          first_sync_s=round(timings[0], 2),
                          later_syncs_median_s=round(statistics.median(timings[1:]), 2),
                          rss=rss.summary())
    assert peak < MAX_RSS_WITH_LARGE_MAILBOX, line


# --- a stale dot-lock broken by two processes at once ----------------------------------------

DEAD_PID = 99_999_999          # above any pid_max: kill(pid, 0) says ESRCH


def test_a_delivery_and_an_expunge_breaking_the_same_stale_dot_lock_lose_no_mail(
        tmp_path, monkeypatch):
    """After kill -9 of a process holding SPOOL/alice.lock (an expunging worker, or
    delivery mid-append), delivery and an expunge may both find the lock stale. The
    interleaving is forced with hooks at the two points where each waits in reality:
    delivery between reading the dead pid and unlinking, the expunge once it holds
    both locks, and delivery's fcntl-lock retry (LOCK_RETRIES x LOCK_RETRY_S) ending
    after the expunge's rename."""
    spool = str(tmp_path / "spool")
    os.mkdir(spool)
    queue.make_dirs(spool)
    for n in range(3):
        mbox.append(spool, "alice", [b"From x@example.org Mon Jan  1 00:00:00 2024\n"
                                     b"Subject: old %d\n\nbody\n\n" % n])
    box = mailstore.Mailbox(spool, "alice")
    box.refresh(wait=True)
    first_uid = box.column(mbox_scan.UID)[0]
    box.store_flags([first_uid], ["\\Deleted"], "add")
    with open(os.path.join(spool, "alice.lock"), "w") as f:
        f.write(f"{DEAD_PID}\n")            # left by a process killed -9 holding it

    b_read_pid, a_holds_locks, b_opened, a_done = (threading.Event() for _ in range(4))
    original_owner_is_dead, original_lock_briefly = mbox._owner_is_dead, mbox._lock_briefly
    original_rewrite = mailstore.Mailbox._rewrite

    def owner_is_dead(path):
        dead = original_owner_is_dead(path)
        if threading.current_thread() is delivery:
            b_read_pid.set()
            a_holds_locks.wait(10)          # the expunge breaks the lock meanwhile
        return dead

    def lock_briefly(fd):
        if threading.current_thread() is delivery:
            b_opened.set()
            a_done.wait(10)                 # its retries outlast the expunge
        return original_lock_briefly(fd)

    def rewrite(self, fd, remove):
        a_holds_locks.set()
        b_opened.wait(2)                    # delivery opens SPOOL/alice meanwhile
        return original_rewrite(self, fd, remove)

    monkeypatch.setattr(mbox, "_owner_is_dead", owner_is_dead)
    monkeypatch.setattr(mbox, "_lock_briefly", lock_briefly)
    monkeypatch.setattr(mailstore.Mailbox, "_rewrite", rewrite)
    new_mail = b"From x@example.org Mon Jan  1 00:00:00 2024\nSubject: new\n\nbody\n\n"
    outcome: list[object] = []

    def deliver() -> None:
        for _ in range(100):                # as the delivery process retries a busy mailbox
            try:
                mbox.append(spool, "alice", [new_mail])
                outcome.append("appended")
                return
            except mbox.MailboxBusy:
                time.sleep(0.01)
        outcome.append("busy")

    delivery = threading.Thread(target=deliver)
    delivery.start()
    assert b_read_pid.wait(10)
    try:
        removed = box.expunge([first_uid])
    finally:
        a_done.set()
        a_holds_locks.set()
        delivery.join(10)
    assert removed == [first_uid] and outcome == ["appended"], (removed, outcome)
    with open(os.path.join(spool, "alice"), "rb") as f:
        data = f.read()
    assert data.count(b"Subject: old") == 2
    assert b"Subject: new" in data, "delivery reported the message appended; it is not there"
