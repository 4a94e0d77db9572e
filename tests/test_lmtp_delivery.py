"""Delivery over LMTP into a real Dovecot (SPEC §11), the queue tool, and the recipe.

ccsmtp (the real master, tests/conftest.py) with `delivery = "lmtp:127.0.0.1:PORT"`
hands its queue to a private Dovecot (tests/servers.py; skipped, saying why, where
Dovecot cannot start). What is checked: messages arrive byte for byte apart from the
headers Dovecot adds, with one Received: of ours; every copy of a message goes in one
transaction; a refused copy is kept in failed/ and ccsmtp-queue lists, requeues and
deletes it; Dovecot stopped under load loses nothing and the log says the queue grew
and drained; the delivery process killed -9 at random under load loses nothing and
duplicates only what SPEC §11 allows (a message whose 250 from Dovecot came just
before the kill); SMTPUTF8 with `smtputf8 = false`; and the recipe: two ccsmtp behind
HAProxy (PROXY v2, health checks) into one Dovecot, one killed -9 half way.

Figures are printed and appended to RELIABILITY_LOG (conftest.record_figures).
CCSMTP_LMTP_KILL_SECONDS (default 8) and CCSMTP_RECIPE_SECONDS (default 8; the full
run uses 20) set how long the two load runs last.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import imaplib
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import (DOMAIN, IS_ROOT, QUEUED, REPO, SENDER, Server, make_message,
                      record_figures)
from fake_lmtp import DROP, STALL, FakeLMTP
from prefork_smtp.store.lmtp_sink import CONNECTIONS
from servers import Dovecot, dovecot, dovecot_factory, haproxy_factory, listening  # noqa: F401

QUEUE_TOOL = REPO / "bin" / "ccsmtp-queue"
STATUS_TOOL = REPO / "bin" / "ccsmtp-status"
KILL_SECONDS = float(os.environ.get("CCSMTP_LMTP_KILL_SECONDS", "8"))
RECIPE_SECONDS = float(os.environ.get("CCSMTP_RECIPE_SECONDS", "20"))
# What Dovecot's LMTP puts in front of a message it stores: Return-Path (RFC 2033 §4.2
# leaves that to the server), Delivered-To (when the transaction had one recipient), and
# its own Received (with continuation lines).
DOVECOT_ADDED = re.compile(rb"Return-Path: <[^\r\n]*>\r\n(?P<delivered_to>Delivered-To: [^\r\n]*\r\n)?"
                           rb"Received: from [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
OUR_RECEIVED = re.compile(rb"Received: from [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def lmtp_config(target: str, extra: str = "") -> str:
    return f'delivery = "{target}"\n{extra}'


def start_lmtp_server(start_server, dovecot_instance: Dovecot, extra: str = "", **options) -> Server:
    return start_server(config=lmtp_config(f"lmtp:127.0.0.1:{dovecot_instance.lmtp_port}", extra),
                        **options)


def with_id(dovecot_instance: Dovecot, user: str, message_id: str) -> list[bytes]:
    marker = f"Message-ID: {message_id}\r\n".encode()
    return [m for m in dovecot_instance.messages(user) if marker in m]


def wait_in_dovecot(dovecot_instance: Dovecot, user: str, message_id: str, server: Server | None = None,
                    timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        found = with_id(dovecot_instance, user, message_id)
        if found:
            assert len(found) == 1, f"{message_id} stored {len(found)} times for {user}"
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{message_id} not in {user}'s Maildir after {timeout} s\n"
                                 + (server.stderr()[-3000:] if server else "")
                                 + dovecot_instance.log()[-2000:])
        time.sleep(0.05)


def split_stored(stored: bytes) -> tuple[re.Match, bytes]:
    """(Dovecot's own headers, the rest: what ccsmtp handed over)."""
    added = DOVECOT_ADDED.match(stored)
    assert added and b"with LMTP" in added.group(), stored[:600]
    return added, stored[added.end():]


def queue_tool(server: Server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(QUEUE_TOOL), "-s", str(server.spool), *args],
                            capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, (args, result.returncode, result.stderr)
    return result


def queue_json(server: Server) -> dict:
    return json.loads(queue_tool(server, "--json").stdout)


def wait_for(condition, what: str, timeout: float = 15.0, server: Server | None = None):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s\n"
                                 + (server.stderr()[-3000:] if server else ""))
        time.sleep(0.05)


# --- messages arrive, byte for byte --------------------------------------------------------

def test_copies_arrive_byte_exact_with_one_received_of_ours(start_server, dovecot):
    server = start_lmtp_server(start_server, dovecot)
    body = (b"Line one.\r\n.starts with a dot\r\n..\r\n" + "Grüße, 8 bit\r\n".encode()
            + b"x" * 3000 + b"\r\nFrom the start of a line\r\nend\r\n")
    content = (f"From: {SENDER}\r\nTo: alice@{DOMAIN}\r\nSubject: exact\r\n"
               "Message-ID: <lmtp-exact@test>\r\n").encode() + b"\r\n" + body
    queue_id = server.send([f"Alice+tag@{DOMAIN}"], content)
    stored = wait_in_dovecot(dovecot, "alice", "<lmtp-exact@test>", server)
    added, handed_over = split_stored(stored)
    # One transaction with one recipient: Dovecot says whom it was for.
    assert added.group("delivered_to") == b"Delivered-To: alice@example.org\r\n"
    ours = OUR_RECEIVED.match(handed_over)
    assert ours, handed_over[:400]
    assert handed_over[ours.end():] == content                  # the rest is the client's, exactly
    received = ours.group().decode()
    assert f"id {queue_id}" in received and "for <Alice+tag@example.org>" in received
    assert "(unknown [127.0.0.1])" in received and "from client.test" in received
    assert handed_over.count(b"\r\nReceived: ") + handed_over.startswith(b"Received: ") == 1
    assert b"\r\nFrom " not in stored.split(b"\r\n\r\n")[0] and not stored.startswith(b"From ")
    assert stored.count(b"Return-Path:") == 1
    server.wait_for_empty_queue()
    assert server.mailboxes() == []                              # no mbox written
    assert f"relay=lmtp:127.0.0.1:{dovecot.lmtp_port}" in server.stderr()


def test_state_headers_and_a_forged_return_path_are_not_handed_over(start_server, dovecot):
    server = start_lmtp_server(start_server, dovecot)
    content = (b"Return-Path: <forged@evil.test>\r\nStatus: RO\r\nX-UID: 7\r\nFrom: a@b.test\r\n"
               b"Subject: state\r\nMessage-ID: <lmtp-state@test>\r\n\r\nStatus: in the body stays\r\n")
    server.send([f"bob@{DOMAIN}"], content)
    _, handed_over = split_stored(wait_in_dovecot(dovecot, "bob", "<lmtp-state@test>", server))
    rest = handed_over[OUR_RECEIVED.match(handed_over).end():]
    assert rest == (b"From: a@b.test\r\nSubject: state\r\nMessage-ID: <lmtp-state@test>\r\n\r\n"
                    b"Status: in the body stays\r\n")


def test_every_copy_of_a_message_goes_in_one_transaction(start_server, dovecot):
    """alice, bob (twice, as Bob+x) and postmaster: one MAIL, one RCPT per mailbox; the
    stored copies have no Delivered-To (Dovecot adds it to one-recipient transactions
    only) and our Received: names no recipient (it would show Bcc recipients)."""
    if "postmaster" not in dovecot.users:
        dovecot.add_user("postmaster")
    server = start_lmtp_server(start_server, dovecot)
    content = make_message("<lmtp-several@test>")
    server.send([f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"Bob+x@{DOMAIN}", "postmaster"], content)
    for user in ("alice", "bob", "postmaster"):
        added, handed_over = split_stored(wait_in_dovecot(dovecot, user, "<lmtp-several@test>",
                                                          server))
        assert added.group("delivered_to") is None, user
        ours = OUR_RECEIVED.match(handed_over)
        assert b"for <" not in ours.group() and handed_over[ours.end():] == content
    assert len(with_id(dovecot, "bob", "<lmtp-several@test>")) == 1   # one copy per mailbox


def test_recipients_named_at_the_domain_the_client_used(start_server):
    """Against a fake LMTP server, to see the wire: RCPT TO is the mailbox (aliases
    applied) at the client's domain, lower-cased; a bare local-part gets the first
    local domain; the envelope's BODY goes along; one MAIL for all of them."""
    fake = FakeLMTP(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"))
    try:
        server = start_server(config=lmtp_config(str(fake.target), 'aliases = { "info" = "carol" }\n'),
                              extra_args=["-d", "other.test"])
        with server.smtp() as client:
            client.ehlo()
            client.mail(SENDER, ["BODY=8BITMIME"])
            for rcpt in (f"Alice+tag@{DOMAIN.upper()}", "info@other.test", "postmaster"):
                assert client.rcpt(rcpt)[0] == 250
            assert client.data(make_message("<lmtp-wire@test>"))[0] == 250
        wait_for(lambda: any(m.complete for m in fake.messages), "delivered", server=server)
        [message] = fake.messages
        assert message.mail == f"MAIL FROM:<{SENDER}> BODY=8BITMIME"
        assert message.recipients == [f"alice@{DOMAIN}", "carol@other.test", f"postmaster@{DOMAIN}"]
        assert message.content.startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n")
        server.wait_for_empty_queue()
    finally:
        fake.close()


# --- refused copies: failed/, and ccsmtp-queue ----------------------------------------------

def test_a_refused_copy_is_kept_in_failed_listed_requeued_and_deleted(start_server, dovecot_factory):
    instance = dovecot_factory(users=("alice",))
    server = start_lmtp_server(start_server, instance)
    content = make_message("<lmtp-unknown@test>", body="Kept whole.\r\n.dot\r\n")
    queue_id = server.send([f"alice@{DOMAIN}", f"Dora+x@{DOMAIN}"], content)
    wait_in_dovecot(instance, "alice", "<lmtp-unknown@test>", server)
    server.wait_for_empty_queue()
    failed_dir = server.spool / ".ccsmtp" / "failed"
    assert sorted(p.name for p in failed_dir.iterdir()) == [f"{queue_id}.dora"]
    log = server.stderr()
    assert re.search(rf"{queue_id}: to=<Dora\+x@example.org>, relay=lmtp:\S+, delay=\S+, "
                     r"status=failed \(RCPT TO: 550 5\.1\.1 .*kept in failed/", log), log[-2000:]
    assert "bounce" not in log.lower()

    listing = queue_json(server)
    assert listing["queued"] == []
    [copy] = listing["failed"]
    assert (copy["id"], copy["mailbox"], copy["recipient"], copy["sender"]) == \
        (queue_id, "dora", f"Dora+x@{DOMAIN}", SENDER)
    assert copy["reason"].startswith("RCPT TO: 550 5.1.1") and copy["size"] == len(content)
    text = queue_tool(server).stdout
    assert f"{queue_id}!" in text and "550 5.1.1" in text and "1 failed copy" in text

    # The user exists now: requeue it, and it arrives (a new queue ID, the same content).
    instance.add_user("dora")
    result = queue_tool(server, "--requeue", queue_id)
    new_id = re.fullmatch(rf"requeued {queue_id}\.dora as (\w+)\n", result.stdout).group(1)
    assert new_id != queue_id
    stored = wait_in_dovecot(instance, "dora", "<lmtp-unknown@test>", server)
    _, handed_over = split_stored(stored)
    ours = OUR_RECEIVED.match(handed_over)
    assert f"id {new_id}".encode() in ours.group() and b"for <Dora+x@example.org>" in ours.group()
    assert handed_over[ours.end():] == content
    assert list(failed_dir.iterdir()) == []
    server.wait_for_empty_queue()

    # IDs that are not there are one-line errors, exit 1.
    other = server.send([f"erin@{DOMAIN}"], make_message("<lmtp-erin@test>"))
    wait_for(lambda: list(failed_dir.iterdir()), "erin's copy in failed/", server=server)
    for args in (["--requeue", queue_id], ["--delete", "ABC123"], ["--requeue", "x/y"]):
        missing = queue_tool(server, *args, check=False)
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing
        assert missing.stderr.startswith("ccsmtp-queue: error: ")
    # With ccsmtp stopped: no requeue (the log is put in order at start-up), but a
    # failed copy can be deleted.
    assert server.stop() == 0
    offline = queue_tool(server, "--requeue", "all", check=False)
    assert offline.returncode == 1 and "ccsmtp is not running" in offline.stderr, offline
    assert queue_tool(server, "--delete", f"{other}.erin").stdout == f"deleted {other}.erin (failed)\n"
    assert list(failed_dir.iterdir()) == [] and queue_tool(server).stdout.startswith("Mail queue is empty")


@pytest.mark.parametrize("args", [["--flush", "--delete", "X"], ["--bogus"], ["--requeue"],
                                  ["-s", "/tmp", "-c", "/etc/ccsmtp.toml"]])
def test_queue_tool_usage_errors(args):
    result = subprocess.run([sys.executable, str(QUEUE_TOOL), *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result
    assert result.stderr.startswith("ccsmtp-queue: error: ") and "Traceback" not in result.stderr


def test_queue_tool_without_a_queue(tmp_path):
    result = subprocess.run([sys.executable, str(QUEUE_TOOL), "-s", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "no queue in" in result.stderr, result


class Switch:
    """A fake LMTP server that refuses connections (closes them at once) or defers a
    recipient with 452, as told, and counts the connections it sees."""

    def __init__(self) -> None:
        self.down = True
        self.defer: set[str] = set()
        self.fake = FakeLMTP(self.respond)

    def respond(self, event, session, arg):
        if event == "greeting" and self.down:
            return DROP
        if event == "rcpt" and arg.split("@")[0] in self.defer:
            return b"452 4.2.2 Mailbox is full, try later\r\n"
        return None

    @property
    def connections(self) -> int:
        return len(self.fake.sessions)


def test_an_unreachable_server_is_retried_with_backoff_and_the_log_says_the_queue_grows(start_server):
    switch = Switch()
    try:
        server = start_server(config=lmtp_config(str(switch.fake.target)))
        ids = [server.send([f"alice@{DOMAIN}"], make_message(f"<lmtp-backoff-{n}@test>"))
               for n in range(3)]
        started = time.monotonic()
        # Attempts at about 0, 1, 3, 7 s: one connection per attempt, not per copy.
        time.sleep(7.6 - (time.monotonic() - started))
        attempts = switch.connections
        assert 3 <= attempts <= 5, attempts
        log = server.stderr()
        assert log.count("unreachable: ") == 1, log[-3000:]
        assert re.search(r"queue (growing|waiting): 3 messages \(3 copies\) waiting, the oldest "
                         r"for \d+ s; lmtp:\S+ unreachable for \d+ s", log), log[-3000:]
        assert "status=deferred" not in log                    # not one line per copy

        listing = queue_json(server)
        assert sorted(m["id"] for m in listing["queued"]) == sorted(ids)
        assert all("connection closed by the server" in m["recipients"][0]["last_error"]
                   for m in listing["queued"]), listing
        assert listing["delivery"]["unreachable"]["attempts"] >= 3
        status = subprocess.run([sys.executable, str(STATUS_TOOL), "-s", str(server.spool), "--json"],
                                capture_output=True, text=True, timeout=30)
        master = json.loads(status.stdout)[0]
        assert master["queue"]["messages"] == 3 and master["queue"]["oldest_age_s"] >= 7
        assert master["queue"]["unreachable_s"] >= 6, master

        # --flush: the next attempt comes at once, not when the backoff (8 s) is up.
        before = switch.connections
        flushed_at = time.monotonic()
        assert "retry every deferred copy now" in queue_tool(server, "--flush").stdout
        wait_for(lambda: switch.connections > before, "an attempt after --flush", 3, server)
        assert time.monotonic() - flushed_at < 2.5
        switch.down = False
        queue_tool(server, "--flush")
        server.wait_for_empty_queue(timeout=5)
        assert len(switch.fake.messages) == 3
        wait_for(lambda: "queue drained" in server.stderr(), "the log says it drained", 3, server)
        assert re.search(r"reachable again after \d+\.\d s", server.stderr())
    finally:
        switch.fake.close()


def test_a_deferred_copy_shows_its_last_error_waits_alone_and_can_be_deleted(start_server):
    switch = Switch()
    switch.down = False
    switch.defer = {"alice"}
    try:
        server = start_server(config=lmtp_config(str(switch.fake.target)))
        first = server.send([f"alice@{DOMAIN}", f"bob@{DOMAIN}"], make_message("<lmtp-452@test>"))
        wait_for(lambda: any(m.complete for m in switch.fake.messages), "bob's copy", server=server)
        [message] = [m for m in switch.fake.messages if m.complete]
        assert message.recipients == [f"bob@{DOMAIN}"]
        # bob is not held up by alice: a second message for him goes at once.
        server.send([f"bob@{DOMAIN}"], make_message("<lmtp-452-bob@test>"))
        wait_for(lambda: len([m for m in switch.fake.messages if m.complete]) == 2, "bob's second",
                 server=server)
        # delivery.state is rewritten at most once a second.
        listing = wait_for(lambda: (lambda q: q if q["queued"] and q["queued"][0]["recipients"][0]
                                    ["last_error"] else None)(queue_json(server)),
                           "the last error in the listing", 5, server)
        [queued] = listing["queued"]
        assert queued["id"] == first
        [rcpt] = queued["recipients"]
        assert rcpt["mailbox"] == "alice" and rcpt["last_error"].startswith("RCPT TO: 452 4.2.2")
        assert "452 4.2.2 Mailbox is full" in queue_tool(server).stdout
        log = server.stderr()
        assert log.count(f"{first}: to=<alice@example.org>") == 1 and "status=deferred" in log

        assert queue_tool(server, "--delete", first).stdout == f"deleted {first}.alice (queued)\n"
        server.wait_for_empty_queue(timeout=5)
        wait_for(lambda: "removed from the queue" in server.stderr(), "delivery saw it", 5, server)
        switch.defer = set()
        queue_tool(server, "--flush")
        time.sleep(1.5)
        assert all(f"alice@{DOMAIN}" not in m.recipients for m in switch.fake.messages if m.complete)
    finally:
        switch.fake.close()


# --- load, faults and what arrives ------------------------------------------------------------

@dataclasses.dataclass
class Sent:
    """What a client knows about one message (one Message-ID), over its attempts."""
    message_id: str
    mailboxes: tuple[str, ...]
    source: str
    acked: int = 0                 # 250 after DATA
    uncertain: int = 0             # the connection broke during DATA: stored or not


class Sender(threading.Thread):
    """Sends one message per connection from `source`, pausing up to `pause` s between
    them, and retries a message until it gets 250, keeping its Message-ID (as an MTA
    would). Notes how long it went without a 250 after a failure (failover time)."""

    def __init__(self, host: str, port: int, mailboxes: list[str], stop: threading.Event,
                 sent: list[Sent], seed: int, source: str = "127.0.0.1", pause: float = 0.05):
        super().__init__(daemon=True)
        self.host, self.port, self.source, self.pause = host, port, source, pause
        self.mailboxes, self.stop, self.sent = mailboxes, stop, sent
        self.rng = random.Random(seed)
        self.errors: collections.Counter[str] = collections.Counter()
        self.failed_since: float | None = None
        self.gaps: list[float] = []     # from a failed attempt to the next 250

    def run(self) -> None:
        current: Sent | None = None
        while not self.stop.is_set():
            if current is None:
                count = self.rng.choice([1, 1, 1, 2])
                current = Sent(f"<load-{uuid.uuid4().hex}@test>",
                               tuple(self.rng.sample(self.mailboxes, count)), self.source)
                self.sent.append(current)
            try:
                ok = self._attempt(current)
            except (OSError, smtplib.SMTPException) as e:
                self.errors[type(e).__name__] += 1
                ok = False
            now = time.monotonic()
            if ok:
                current = None
                if self.failed_since is not None:
                    self.gaps.append(now - self.failed_since)
                    self.failed_since = None
                time.sleep(self.rng.uniform(0, self.pause))
            else:
                if self.failed_since is None:
                    self.failed_since = now
                time.sleep(0.02)

    def _attempt(self, sent: Sent) -> bool:
        with smtplib.SMTP(self.host, self.port, local_hostname="load.test", timeout=10,
                          source_address=(self.source, 0)) as client:
            client.ehlo()
            if client.mail(SENDER)[0] != 250:
                return False
            for mailbox in sent.mailboxes:
                if client.rcpt(f"{mailbox}@{DOMAIN}")[0] != 250:
                    return False
            try:
                code, reply = client.data(make_message(sent.message_id, "load"))
            except (OSError, smtplib.SMTPServerDisconnected):
                sent.uncertain += 1
                raise
            if code == 250 and QUEUED.search(b"250 " + reply):
                sent.acked += 1
                return True
            return False


def run_senders(senders: list[Sender]) -> None:
    for sender in senders:
        sender.start()


def stop_senders(senders: list[Sender], stop: threading.Event) -> None:
    stop.set()
    for sender in senders:
        sender.join(30)


MESSAGE_ID = re.compile(rb"\r\nMessage-ID: (<[^>\r\n]+>)\r\n")


def stored_ids(dovecot_instance: Dovecot, users: list[str]) -> collections.Counter:
    """(Message-ID, user) -> how many times it is in the user's Maildir."""
    found: collections.Counter = collections.Counter()
    for user in users:
        for message in dovecot_instance.messages(user):
            match = MESSAGE_ID.search(message)
            if match:
                found[(match.group(1).decode(), user)] += 1
    return found


def check_arrived(found: collections.Counter, sent: list[Sent]) -> dict[str, int]:
    """Every acknowledged message is in each of its mailboxes; nothing is there that
    nobody sent. Duplicates: all extra copies, and the messages with more copies than
    the client can explain (250s plus broken attempts): LMTP's at-least-once window."""
    by_id = {s.message_id: s for s in sent}
    problems = [f"{user}: a message nobody sent there: {mid}" for (mid, user) in found
                if mid not in by_id or user not in by_id[mid].mailboxes]
    figures = collections.Counter(copies_acknowledged=0, copies_found=0, duplicate_copies=0,
                                  messages_duplicated_by_delivery=0)
    for s in sent:
        for user in s.mailboxes:
            copies = found[(s.message_id, user)]
            if s.acked and not copies:
                problems.append(f"{user}: acknowledged {s.message_id} is missing")
            figures["copies_acknowledged"] += bool(s.acked)
            figures["copies_found"] += copies
            figures["duplicate_copies"] += max(0, copies - 1)
        if any(found[(s.message_id, u)] > s.acked + s.uncertain for u in s.mailboxes):
            figures["messages_duplicated_by_delivery"] += 1
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
    return dict(figures)


def sample_queue(spool: Path, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    """Queue depth as delivery reports it (delivery.state), every 0.25 s."""
    path = spool / ".ccsmtp" / "delivery.state"
    while not stop.wait(0.25):
        with contextlib.suppress(OSError, ValueError):
            samples.append((time.monotonic(), json.loads(path.read_text())["messages"]))


def wait_until_delivered(server: Server, timeout: float) -> float:
    started = time.monotonic()
    server.wait_for_empty_queue(timeout=timeout)
    return time.monotonic() - started


def test_dovecot_killed_under_load_for_10_s_loses_nothing(start_server, dovecot_factory):
    """Senders keep going while Dovecot is killed -9 and started again 10 s later:
    ccsmtp keeps answering 250 (the queue is the buffer), the log says the queue
    grows, then that it drained; every acknowledged message is in Dovecot."""
    users = ["alice", "bob", "carol"]
    instance = dovecot_factory(users=tuple(users))
    server = start_lmtp_server(start_server, instance, workers=2)
    stop, sampling = threading.Event(), threading.Event()
    sent: list[Sent] = []
    samples: list[tuple[float, int]] = []
    senders = [Sender(server.host, server.port, users, stop, sent, seed, pause=0.1)
               for seed in range(6)]
    sampler = threading.Thread(target=sample_queue, args=(server.spool, samples, sampling),
                               daemon=True)
    sampler.start()
    run_senders(senders)
    try:
        time.sleep(2)
        os.killpg(instance.proc.pid, signal.SIGKILL)
        instance.proc.wait(10)
        killed_at = time.monotonic()
        acked_before = sum(s.acked for s in sent)
        time.sleep(10)
        acked_while_down = sum(s.acked for s in sent) - acked_before
        instance.restart()
        restarted_at = time.monotonic()
        time.sleep(2)
    finally:
        stop_senders(senders, stop)
    wait_until_delivered(server, 60)
    drained_after_restart = time.monotonic() - restarted_at
    sampling.set()
    sampler.join()
    figures = check_arrived(stored_ids(instance, users), sent)
    down = [depth for at, depth in samples if killed_at <= at <= restarted_at]
    peak = max(down, default=0)
    log = server.stderr()
    line = record_figures(
        "lmtp.dovecot_down_10s", senders=len(senders), messages_sent=len(sent),
        acknowledged=sum(1 for s in sent if s.acked), acknowledged_while_down=acked_while_down,
        queue_peak=peak, drained_s_after_restart=round(drained_after_restart, 1),
        client_errors=dict(sum((s.errors for s in senders), collections.Counter())), **figures)
    assert acked_while_down > 50, line
    assert peak >= acked_while_down * 0.8 and down[-1] >= down[0], (line, down)
    # Retries back off to at most 30 s apart: drained well within 30 s of the restart.
    assert drained_after_restart < 40, line
    assert figures["messages_duplicated_by_delivery"] <= CONNECTIONS, line
    assert log.count(" unreachable: ") == 1
    assert re.search(r"queue growing: \d+ messages", log), log[-3000:]
    assert "reachable again after" in log and "queue drained: " in log, log[-3000:]
    print("\n".join(l for l in log.splitlines() if "ccsmtp/local" in l and "status=" not in l))


def test_delivery_killed_9_at_random_under_load_loses_nothing(start_server, dovecot_factory):
    """The delivery process is killed -9 every 0.3-1.5 s while senders go on. Nothing
    acknowledged is lost; a message is handed to Dovecot twice only when the kill came
    between Dovecot taking it and the queue's update: at most the CONNECTIONS
    transactions then running, per kill."""
    users = ["alice", "bob", "carol"]
    instance = dovecot_factory(users=tuple(users))
    server = start_lmtp_server(start_server, instance, workers=2)
    stop = threading.Event()
    sent: list[Sent] = []
    senders = [Sender(server.host, server.port, users, stop, sent, seed, pause=0.05)
               for seed in range(8)]
    rng = random.Random()
    kills = 0
    run_senders(senders)
    started = time.monotonic()
    try:
        while time.monotonic() - started < KILL_SECONDS:
            time.sleep(rng.uniform(0.3, 1.5))
            victims = server.delivery()
            if victims:
                with contextlib.suppress(psutil.Error):
                    victims[0].kill()
                    kills += 1
    finally:
        stop_senders(senders, stop)
    assert server.proc.poll() is None, server.stderr()[-3000:]
    drain_s = wait_until_delivered(server, 90)
    figures = check_arrived(stored_ids(instance, users), sent)
    line = record_figures(
        "lmtp.delivery_kill_9", seconds=round(time.monotonic() - started, 1), kills=kills,
        messages_sent=len(sent), acknowledged=sum(1 for s in sent if s.acked),
        unanswered_attempts=sum(s.uncertain for s in sent), drain_s=round(drain_s, 1), **figures)
    assert kills >= KILL_SECONDS / 1.5 - 1 and sum(1 for s in sent if s.acked) > 100, line
    # Each kill can catch at most the transactions then running (CONNECTIONS) between
    # Dovecot storing a message and the queue's update.
    assert figures["messages_duplicated_by_delivery"] <= kills * CONNECTIONS, line


# --- SMTPUTF8 --------------------------------------------------------------------------------

def lmtp_offers(port: int, keyword: str) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"LHLO probe.test\r\n")
        lines = []
        while True:
            line = reader.readline()
            lines.append(line[4:].strip().upper())
            if line[3:4] != b"-":
                break
        sock.sendall(b"QUIT\r\n")
    return keyword.encode() in lines


def send_utf8(server: Server, sender: str, rcpt: str, content: bytes) -> str:
    with server.smtp() as client:
        client.ehlo()
        code, reply = client.mail(sender, ["SMTPUTF8"])
        assert code == 250, reply
        assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(content)
        assert code == 250, reply
    return QUEUED.search(b"250 " + reply).group(1).decode()


def test_smtputf8_false_sends_what_needs_it_to_failed(start_server, dovecot, work_dir):
    """Messages queued with SMTPUTF8 while the LMTP server was away; ccsmtp restarted
    with `smtputf8 = false`: what needs SMTPUTF8 (a non-ASCII sender, a UTF-8 header)
    goes to failed/ with the reason, what does not (an ASCII message that merely said
    SMTPUTF8) is delivered; and SMTPUTF8 is no longer offered."""
    spool = work_dir / "utf8-spool"
    closed_port = free_port_number()
    first = start_server(spool=spool, config=lmtp_config(f"lmtp:127.0.0.1:{closed_port}"))
    non_ascii_sender = send_utf8(first, "jörg@exämple.test", f"alice@{DOMAIN}",
                                 make_message("<utf8-sender@test>"))
    utf8_header = send_utf8(first, SENDER, f"alice@{DOMAIN}",
                            make_message("<utf8-header@test>", subject="Grüße"))
    plain = send_utf8(first, SENDER, f"alice@{DOMAIN}", make_message("<utf8-plain@test>"))
    assert first.stop() == 0
    assert "still queued (lmtp:127.0.0.1" in first.stderr()

    second = start_lmtp_server(start_server, dovecot, "smtputf8 = false\n", spool=spool)
    wait_in_dovecot(dovecot, "alice", "<utf8-plain@test>", second)
    second.wait_for_empty_queue()
    failed_copies = {c["id"]: c for c in queue_json(second)["failed"]}
    assert sorted(failed_copies) == sorted([non_ascii_sender, utf8_header])
    for copy in failed_copies.values():
        assert "needs SMTPUTF8" in copy["reason"] and "smtputf8 = false" in copy["reason"]
    assert with_id(dovecot, "alice", "<utf8-sender@test>") == []
    with second.smtp() as client:
        assert client.ehlo()[0] == 250 and not client.has_extn("smtputf8")
        assert client.docmd(f"MAIL FROM:<{SENDER}> SMTPUTF8")[0] == 555


def test_smtputf8_true_and_a_server_without_it(start_server, dovecot):
    """smtputf8 = true (the default) with Dovecot 2.3, which lacks SMTPUTF8: a copy from
    a non-ASCII sender cannot be handed over and goes to failed/ (a Dovecot that offers
    SMTPUTF8 takes it)."""
    offered = lmtp_offers(dovecot.lmtp_port, "SMTPUTF8")
    server = start_lmtp_server(start_server, dovecot)
    queue_id = send_utf8(server, "jörg@exämple.test", f"bob@{DOMAIN}",
                         make_message("<utf8-true@test>"))
    if offered:
        wait_in_dovecot(dovecot, "bob", "<utf8-true@test>", server)
        return
    wait_for(lambda: queue_json(server)["failed"], "the copy in failed/", server=server)
    [copy] = queue_json(server)["failed"]
    assert copy["id"] == queue_id and "needs SMTPUTF8" in copy["reason"], copy


def free_port_number() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a slow server: the heartbeat goes on, a stop is not held up ----------------------------

def test_a_silent_lmtp_server_neither_gets_delivery_killed_nor_holds_up_a_stop(start_server):
    fake = FakeLMTP(lambda event, session, arg: STALL if event == "final" else None)
    try:
        server = start_server(config=lmtp_config(str(fake.target),
                                                 "worker_timeout = 2\ngraceful_timeout = 2\n"))
        [delivery] = server.delivery()
        queue_id = server.send([f"alice@{DOMAIN}"], make_message("<lmtp-stall@test>"))
        wait_for(lambda: any(m.complete for m in fake.messages), "the content sent", server=server)
        time.sleep(5)            # the reply never comes; the master would kill at 2 s
        assert [p.pid for p in server.delivery()] == [delivery.pid], server.stderr()[-2000:]
        assert "sent no heartbeat" not in server.stderr()
        stopping = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - stopping < 10
        assert server.queued() == [queue_id]     # not answered: still queued, tried again later
    finally:
        fake.close()


# --- the recipe: ccsmtp instances behind HAProxy, into one Dovecot (SPEC §11) -----------------

RECEIVED_BY_US = re.compile(rb"Received: from \S+ \(unknown \[([0-9.]+)\]\)\r\n\s+by (\S+) \(ccsmtp\)")


def imap_headers(dovecot_instance: Dovecot, user: str) -> list[bytes]:
    """Every message's Message-ID and Received fields, read over Dovecot's IMAP."""
    imap = imaplib.IMAP4("127.0.0.1", dovecot_instance.imap_port)
    try:
        imap.login(user, dovecot_instance.password)
        imap.select("INBOX", readonly=True)
        status, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID RECEIVED)])")
        if status != "OK" or data == [None]:
            return []
        return [part[1] for part in data if isinstance(part, tuple)]
    finally:
        imap.logout()


def test_recipe_two_instances_behind_haproxy_into_one_dovecot(start_server, haproxy_factory,
                                                              dovecot_factory):
    """Two ccsmtp instances (their own spools and ports, proxy_from 127.0.0.1, LMTP to
    one Dovecot) behind one HAProxy (round robin, health checks, PROXY v2). 20 senders
    from 127.0.0.10-29 for CCSMTP_RECIPE_SECONDS; half way the first instance's whole
    process group is killed -9, and it is started again on its spool a second later.
    Every message that got a 250 is in Dovecot (read over IMAP), and its Received:
    names the client's own address."""
    from test_proxy_server import start_behind_proxy
    users = ["alice", "bob", "carol", "dave"]
    instance = dovecot_factory(users=tuple(users), imap=True)
    config = lmtp_config(f"lmtp:127.0.0.1:{instance.lmtp_port}")

    def mx(n: int, **options) -> Server:
        return start_behind_proxy(start_server, config, workers=2,
                                  extra_args=["--hostname", f"mx{n}.example.org"], **options)

    servers = [mx(1), mx(2)]
    proxy = haproxy_factory([(s.host, s.port) for s in servers], "v2", check=True)
    stop = threading.Event()
    sent: list[Sent] = []
    senders = [Sender(proxy.host, proxy.port, users, stop, sent, n, source=f"127.0.0.{10 + n}",
                      pause=0.1) for n in range(20)]
    run_senders(senders)
    started = time.monotonic()
    try:
        time.sleep(RECIPE_SECONDS / 2)
        victim = servers[0]
        acked_before_kill = sum(1 for s in sent if s.acked)
        victim.crash()                         # kill -9 of the whole process group
        killed_at = time.monotonic()
        time.sleep(1.0)
        restarted = mx(1, spool=victim.spool, port=victim.port)
        restart_s = time.monotonic() - killed_at
        time.sleep(max(0.0, started + RECIPE_SECONDS - time.monotonic()))
    finally:
        stop_senders(senders, stop)
    elapsed = time.monotonic() - started
    for server in (restarted, servers[1]):
        server.wait_for_empty_queue(timeout=90)

    found: collections.Counter = collections.Counter()
    problems = []
    by_id = {s.message_id: s for s in sent}
    by_instance: collections.Counter = collections.Counter()
    for user in users:
        for header in imap_headers(instance, user):
            match = MESSAGE_ID.search(b"\r\n" + header)
            ours = RECEIVED_BY_US.search(header)
            if not match or not ours:
                problems.append(f"{user}: a message without our Received: {header[:300]!r}")
                continue
            message_id = match.group(1).decode()
            found[(message_id, user)] += 1
            by_instance[ours.group(2).decode()] += 1
            source = by_id[message_id].source if message_id in by_id else None
            if ours.group(1).decode() != source:
                problems.append(f"{message_id}: Received names {ours.group(1)!r}, the client was {source}")
    assert not problems, "\n".join(problems[:20])
    figures = check_arrived(found, sent)
    gaps = sorted(g for s in senders for g in s.gaps)
    line = record_figures(
        "lmtp.recipe_haproxy", seconds=round(elapsed, 1), senders=len(senders),
        messages_sent=len(sent), acknowledged=sum(1 for s in sent if s.acked),
        acknowledged_before_kill=acked_before_kill,
        unanswered_attempts=sum(s.uncertain for s in sent),
        copies_delivered=figures["copies_found"], duplicate_copies=figures["duplicate_copies"],
        messages_duplicated_by_delivery=figures["messages_duplicated_by_delivery"],
        copies_by_instance=dict(by_instance), restart_s=round(restart_s, 1),
        senders_that_saw_a_failure=len({id(s) for s in senders if s.gaps}),
        failover_s_median=round(gaps[len(gaps) // 2], 2) if gaps else 0,
        failover_s_max=round(gaps[-1], 2) if gaps else 0,
        client_errors=dict(sum((s.errors for s in senders), collections.Counter())),
        copies_acknowledged=figures["copies_acknowledged"])
    assert sum(1 for s in sent if s.acked) > 200, line
    assert set(by_instance) == {"mx1.example.org", "mx2.example.org"}, line
    # One process group killed once: at most the messages its delivery had in hand.
    assert figures["messages_duplicated_by_delivery"] <= CONNECTIONS, line
    assert not gaps or gaps[-1] < 10, line
