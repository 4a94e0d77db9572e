"""Hostile input over the network, against the real server (SPEC §5, §6).

Random binary, NUL bytes, 10 MB lines, connection floods, slowloris, path traversal,
header injection and SMTP smuggling. Throughout each attack a watcher checks what
matters to everyone else: a fresh client (from an address of its own) completes a
whole transaction in under a second, the server's processes stay small, no worker is
replaced because of what a client sent, and (conftest's teardown) no traceback is
logged. The figures (bad inputs tried, connections, RSS high-water marks) are printed
and appended to RELIABILITY_LOG.

The state machine's own fuzz test is test_fuzz_protocol.py; this file is the network side.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import select
import smtplib
import socket
import struct
import threading
import time
import uuid

import psutil
import pytest

from conftest import (DOMAIN, SENDER, RssSampler, Server, make_message, record_figures,
                      recv_eof, recv_reply)
from test_integration import outside_spool

PROBE_IP = "127.0.0.250"          # the well-behaved client: none of the attacks use it
PROMPT_S = 1.0                    # a fresh transaction must take less than this
MAX_WORKER_RSS = 80 * 2**20       # high-water marks allowed while under attack
MAX_MASTER_RSS = 48 * 2**20
MAX_DELIVERY_RSS = 96 * 2**20     # it holds one long line whole while quoting it
S250_QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as [0-9A-Za-z]+\r\n")
FAST_TIMEOUTS = "timeout_command = 5\ntimeout_data = 5\n"


def attack_ip(n: int) -> str:
    """Attack connections come from 127.0.1.x, 40 per address: the per-client limit (50)
    is a separate test (test_operations), the point here is what the server does with
    what they send."""
    return f"127.0.1.{1 + n // 40}"


def connect(server: Server, n: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=timeout,
                                    source_address=(attack_ip(n), 0))


def attack_connections(server: Server) -> int:
    """Connections from the attack addresses the workers still hold."""
    count = 0
    for worker in server.workers():
        with contextlib.suppress(psutil.Error):
            count += sum(1 for c in worker.net_connections("tcp")
                         if c.raddr and c.raddr.ip.startswith("127.0.1."))
    return count


def reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Watch:
    """While an attack runs: probe with whole transactions every `interval` s, sample
    the RSS of every server process, and remember the workers, to check afterwards
    that none was replaced."""

    def __init__(self, server: Server, name: str, interval: float = 0.25):
        self.server = server
        self.name = name
        self.interval = interval
        self.timings: list[float] = []
        self.failures: list[str] = []
        self.sent: list[str] = []
        self.rss = RssSampler(server)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)
        self.workers = {p.pid for p in server.wait_for_processes("ccsmtp: worker", 2)}
        self.started = 0.0

    def __enter__(self) -> "Watch":
        self.started = time.monotonic()
        self.rss.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._probe_once()   # and once the attack is over
        self.rss.__exit__()
        self.elapsed = time.monotonic() - self.started

    def _probe(self) -> None:
        while True:
            self._probe_once()
            if self._stop.wait(self.interval):
                return

    def _probe_once(self) -> None:
        message_id = f"<probe-{self.name}-{len(self.sent)}-{uuid.uuid4().hex[:8]}@test>"
        started = time.monotonic()
        try:
            with smtplib.SMTP(self.server.host, self.server.port, local_hostname="probe.test",
                              timeout=10, source_address=(PROBE_IP, 0)) as client:
                refused = client.sendmail(SENDER, [f"probe@{DOMAIN}"], make_message(message_id))
                assert refused == {}, refused
        except (OSError, smtplib.SMTPException, AssertionError) as e:
            self.failures.append(f"{time.monotonic() - self.started:.1f}s: {e!r}")
            return
        self.timings.append(time.monotonic() - started)
        self.sent.append(message_id)

    def check(self, **figures: object) -> None:
        """The service stayed up for others, small, and with the same workers; record."""
        server = self.server
        assert not self.failures, f"fresh clients failed: {self.failures[:5]}"
        assert self.timings, "no probe completed"
        slow = [round(t, 3) for t in self.timings if t >= PROMPT_S]
        assert not slow, f"{len(slow)} of {len(self.timings)} fresh transactions took >= {PROMPT_S} s: {slow}"
        assert server.proc.poll() is None, "the master died"
        now = {p.pid for p in server.workers()}
        assert now == self.workers, f"workers replaced: {self.workers} -> {now}"
        assert " died: " not in server.stderr()
        ids = [m["Message-ID"] for m in server.settle(["probe"], timeout=20)["probe"]]
        assert set(self.sent) <= set(ids), "a probe's acknowledged message is missing"
        record_figures(f"hostile.{self.name}", **figures, seconds=round(self.elapsed, 1),
                       probes=len(self.timings),
                       probe_max_s=round(max(self.timings), 3),
                       probe_median_s=round(sorted(self.timings)[len(self.timings) // 2], 3),
                       rss=self.rss.summary())
        assert self.rss.peak("worker") < MAX_WORKER_RSS, self.rss.summary()
        assert self.rss.peak("master") < MAX_MASTER_RSS, self.rss.summary()
        assert self.rss.peak("delivery") < MAX_DELIVERY_RSS, self.rss.summary()


def run_threads(target, count: int) -> None:
    threads = [threading.Thread(target=target, args=(n,), daemon=True) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "an attack thread hung"


# --- junk on the wire ---------------------------------------------------------------

def test_random_binary_on_many_connections(server):
    """400 connections send random bytes (before or after the greeting, some inside
    DATA), read what comes back for a moment and go away, half of them with a reset."""
    rng = random.Random()
    seeds = [rng.randrange(2**32) for _ in range(400)]
    stats = collections.Counter()
    lock = threading.Lock()

    def attacker(n: int) -> None:
        r = random.Random(seeds[n])
        try:
            sock = connect(server, n)
        except OSError as e:
            with lock:
                stats[f"connect {type(e).__name__}"] += 1
            return
        sent = chunks = 0
        try:
            if r.random() < 0.7:
                recv_reply(sock, 5)
            if r.random() < 0.2:
                sock.sendall(f"EHLO x\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<junk@{DOMAIN}>\r\nDATA\r\n".encode())
            for _ in range(r.randint(1, 8)):
                data = r.randbytes(r.choice([1, 16, 512, 4096, 65536]))
                sock.sendall(data)
                sent += len(data)
                chunks += 1
            sock.settimeout(0.2)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass
        except OSError:
            pass   # the server may close a session that made too many errors
        finally:
            if n % 2:
                reset_close(sock)
            else:
                sock.close()
            with lock:
                stats["connections"] += 1
                stats["bytes"] += sent
                stats["chunks"] += chunks

    with Watch(server, "random_binary") as watch:
        for batch in range(0, 400, 80):
            run_threads(lambda n: attacker(batch + n), 80)
    watch.check(bad_inputs=stats["chunks"], connections=stats["connections"],
                random_bytes=stats["bytes"])
    # Nothing arrived from random bytes, not even inside DATA (no CRLF.CRLF at the end).
    assert server.count("junk") == 0


TRICKY_LINES = [b"From evil@x Mon Jan  1 00:00:00 2024", b">From quoted", b">>From twice", b".",
                b"..", b". ", b".From x", b"\0", b"\r", b"From ", b"from lower", b"\x85",
                "\u2028From x".encode(), b"\rFrom x", b"Received: x"]


def random_body(r: random.Random) -> bytes:
    """Random binary in CRLF lines, sprinkled with what mbox readers and DATA framing
    care about (From_ lines, dots, bare CR, NUL); never CRLF . CRLF itself."""
    lines = []
    for _ in range(r.randint(1, 400)):
        if r.random() < 0.25:
            lines.append(r.choice(TRICKY_LINES))
        else:
            lines.append(r.randbytes(r.randint(0, 300)).replace(b"\r\n", b"\n"))
    body = b"\r\n".join(lines) + b"\r\n"
    return body.replace(b"\r\n\r\n", b"\r\n \r\n")   # no blank line: the headers end once


def stuffed(content: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency, as a client does it."""
    content = content.replace(b"\r\n.", b"\r\n..")
    return b"." + content if content.startswith(b".") else content


def stored_bodies(raw: bytes, count: int) -> list[bytes]:
    """The bodies of the first `count` messages of a mboxrd file, by its own rules
    (every ^>*From  line of content is quoted, so "\nFrom " only starts a message)."""
    assert raw.startswith(b"From ")
    bodies, start = [], 0
    for _ in range(count):
        header_end = raw.index(b"\n\n", start) + 2
        end = raw.find(b"\nFrom ", header_end)
        end = len(raw) - 1 if end < 0 else end
        bodies.append(raw[header_end:end])
        start = end + 1
    return bodies


def test_random_binary_bodies_are_stored_byte_for_byte(server):
    """8-bit clean: random binary bodies (NUL, bare CR, lone dots, From_ lines, stray
    UTF-8 line separators) arrive as one message each, with CRLF -> LF and mboxrd
    quoting as the only changes."""
    r = random.Random()
    bodies = [random_body(r) for _ in range(30)]
    with Watch(server, "random_bodies") as watch:
        sock, _ = server.connect()
        with sock:
            sock.sendall(b"EHLO bin.test\r\n")
            assert recv_reply(sock).startswith(b"250")
            for n, body in enumerate(bodies):
                head = f"Subject: binary {n}\r\nMessage-ID: <bin-{n}@test>\r\n\r\n".encode()
                sock.sendall(f"MAIL FROM:<{SENDER}> BODY=8BITMIME\r\nRCPT TO:<bin@{DOMAIN}>\r\n"
                             "DATA\r\n".encode())
                assert [recv_reply(sock)[:3] for _ in range(3)] == [b"250", b"250", b"354"]
                sock.sendall(stuffed(head + body) + b".\r\n")
                assert S250_QUEUED.fullmatch(recv_reply(sock)), n
    watch.check(bad_inputs=len(bodies), connections=1, bytes=sum(map(len, bodies)))
    server.settle(["bin"])
    raw = server.raw("bin")
    assert raw.count(b"\nReturn-Path: ") == len(bodies) + 1
    for n, (sent, stored) in enumerate(zip(bodies, stored_bodies(raw, len(bodies)))):
        expected = re.sub(rb"(?m)^(>*From )", rb">\1", sent.replace(b"\r\n", b"\n"))
        assert stored == expected, f"message {n} differs"


NUL_COMMANDS = [
    b"\0", b"\0\0\0\0", b"HELO a\0b", b"EHLO \0", b"EHLO x\0.test", b"NOOP\0", b"RSET\0",
    b"MAIL FROM:<a\0@remote.test>", b"MAIL FROM:<a@remote.test>\0", b"MAIL\0FROM:<a@b.c>",
    b"RCPT TO:<nul\0@example.org>", b"RCPT TO:<nul@exam\0ple.org>", b"DATA\0", b"QUIT\0",
    b"\0MAIL FROM:<a@remote.test>",
]


@pytest.mark.parametrize("server", [{"config": "soft_error_limit = 20\n"}], indirect=True)
def test_nul_bytes_in_commands_are_refused_and_the_session_goes_on(server):
    with Watch(server, "nul_bytes") as watch:
        sock, greeting = server.connect()
        with sock:
            sock.sendall(b"EHLO nul.test\r\n")
            assert recv_reply(sock).startswith(b"250")
            for n, command in enumerate(NUL_COMMANDS):
                if n == 8:   # RCPT needs a transaction
                    sock.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
                    assert recv_reply(sock).startswith(b"250 2.1.0")
                sock.sendall(command + b"\r\n")
                reply = recv_reply(sock)
                assert reply.startswith((b"500 5.5.2 ", b"501 ")), (command, reply)
                if n == 7:
                    sock.sendall(b"RSET\r\n")
                    assert recv_reply(sock).startswith(b"250")
            # Still a working session: a whole transaction.
            sock.sendall(f"RSET\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<nul@{DOMAIN}>\r\nDATA\r\n".encode())
            assert [recv_reply(sock)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
            sock.sendall(make_message("<after-nul@test>") + b".\r\n")
            assert S250_QUEUED.fullmatch(recv_reply(sock))
    watch.check(bad_inputs=len(NUL_COMMANDS), connections=1)
    boxes = server.settle(["nul"])
    assert [m["Message-ID"] for m in boxes["nul"]] == ["<after-nul@test>"]
    assert server.mailboxes() == ["nul", "probe"]


TEN_MB = 10 * 1024 * 1024


def send_big(sock: socket.socket, prefix: bytes, size: int, suffix: bytes) -> None:
    """prefix, size bytes of one line without a newline, suffix: in 1 MB writes."""
    sock.sendall(prefix)
    piece = b"A" * (1 << 20)
    for _ in range(size // len(piece)):
        sock.sendall(piece)
    sock.sendall(suffix)


def test_a_10_mb_command_line_without_newline(server):
    """Discarded as it arrives (500 5.5.2 once the line ends), the session goes on, and
    the worker does not hold 10 MB for it."""
    with Watch(server, "10mb_command") as watch:
        sock, greeting = server.connect(timeout=30)
        with sock:
            send_big(sock, b"EHLO ", TEN_MB, b"\r\n")
            assert recv_reply(sock, 30).startswith(b"500 5.5.2 "), "line too long"
            sock.sendall(b"NOOP\r\n")
            assert recv_reply(sock).startswith(b"250 ")
            # The same without ever ending the line: the client goes away.
            send_big(sock, b"MAIL FROM:<", TEN_MB, b"")
        time.sleep(0.3)
    watch.check(bad_inputs=2, connections=1, line_bytes=TEN_MB)


def test_a_10_mb_line_without_newline_inside_data_is_stored_unchanged(server):
    """SPEC §5: DATA lines of any length are stored unchanged; spilled to disk as they
    arrive (the worker stays small)."""
    with Watch(server, "10mb_data_line") as watch:
        sock, greeting = server.connect(timeout=30)
        with sock:
            sock.sendall(f"EHLO big.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<longline@{DOMAIN}>\r\n"
                         "DATA\r\n".encode())
            assert [recv_reply(sock)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
            send_big(sock, b"Subject: long line\r\nMessage-ID: <longline@test>\r\n\r\n", TEN_MB,
                     b"\r\n.\r\n")
            assert S250_QUEUED.fullmatch(recv_reply(sock, 60))
        [message] = server.wait_for_messages("longline", 1, timeout=60)
    watch.check(bad_inputs=1, connections=1, line_bytes=TEN_MB)
    assert message["Message-ID"] == "<longline@test>"
    assert message.get_payload() == "A" * TEN_MB + "\n"


def test_1000_rapid_connects_and_disconnects(server):
    """Connect and go at once (a third reset, a third after the greeting, a third
    before it), 1,000 times from one address; then that address is welcome again
    (no connection count leaks, the per-client limit is not stuck)."""
    outcomes = collections.Counter()
    with Watch(server, "connect_flood") as watch:
        for n in range(1000):
            try:
                sock = socket.create_connection((server.host, server.port), timeout=5)
            except OSError as e:
                outcomes[type(e).__name__] += 1
                continue
            if n % 3 == 0:
                reset_close(sock)
            elif n % 3 == 1:
                greeting = recv_reply(sock)
                outcomes["greeted" if greeting.startswith(b"220 ") else greeting[:9].decode()] += 1
                sock.close()
            else:
                sock.close()
            outcomes["connections"] += 1
        time.sleep(0.5)
    assert outcomes["connections"] == 1000, outcomes
    # The per-client limit counts open connections only: all closed, so welcome.
    deadline = time.monotonic() + 5
    while True:
        sock, greeting = server.connect()
        with sock:
            sock.sendall(b"QUIT\r\n")
        if greeting.startswith(b"220 ") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert greeting.startswith(b"220 "), greeting
    watch.check(bad_inputs=1000, connections=1000, outcomes=dict(outcomes))


@pytest.mark.parametrize("server", [{"config": FAST_TIMEOUTS}], indirect=True)
def test_a_pipelined_flood_of_noop_does_not_hold_up_other_clients(server):
    """Fast, not slow: 20 clients each pipeline 1.2 MB of NOOP and never read a reply.
    Others must still be served promptly, and the flooders let go of within seconds."""
    flood = b"NOOP\r\n" * 200_000
    socks = []
    with Watch(server, "noop_flood") as watch:
        for n in range(20):
            sock = connect(server, n)
            sock.setblocking(False)
            sent = 0
            try:
                while sent < len(flood):
                    sent += sock.send(flood[sent:])
            except BlockingIOError:
                pass
            socks.append((sock, sent))
        deadline = time.monotonic() + 15
        while attack_connections(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        let_go_after = time.monotonic() - watch.started
        for sock, _ in socks:
            sock.close()
    # With a junk-command limit the tarpit and the error limit end them in ~10 s.
    assert let_go_after < 15, "flooding sessions were still open after 15 s"
    watch.check(bad_inputs=sum(sent for _, sent in socks) // 6, connections=len(socks),
                flooders_let_go_after_s=round(let_go_after, 1))


@pytest.mark.parametrize("server", [{"config": FAST_TIMEOUTS}], indirect=True)
def test_slowloris_hundreds_of_connections_trickling_one_byte_every_2_s(server):
    """SPEC §5: a deadline per command or DATA block, so trickling does not extend it.
    250 connections trickle a command and 50 a message, one byte every ~2 s; all get
    421 4.4.2 at the 5 s deadline while fresh clients are served promptly."""
    command_phase, data_phase = 250, 50
    socks: list[socket.socket] = []
    opened: dict[int, float] = {}
    with Watch(server, "slowloris") as watch:
        for n in range(command_phase + data_phase):
            sock = connect(server, n, timeout=10)
            assert recv_reply(sock).startswith(b"220 ")
            if n >= command_phase:
                sock.sendall(f"EHLO slow.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<slow@{DOMAIN}>\r\n"
                             "DATA\r\n".encode())
                assert [recv_reply(sock)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
            sock.setblocking(False)
            socks.append(sock)
            opened[sock.fileno()] = time.monotonic()
        trickle = b"EHLO slowloris.example.net\r\n" + b"Subject: slow\r\n" * 3
        replies: dict[int, bytes] = collections.defaultdict(bytes)
        closed_after: dict[int, float] = {}
        position = 0
        bytes_sent = 0
        deadline = time.monotonic() + 12
        while len(closed_after) < len(socks) and time.monotonic() < deadline:
            for sock in socks:
                fd = sock.fileno()
                if fd in closed_after:
                    continue
                try:
                    sock.send(trickle[position % len(trickle):][:1])
                    bytes_sent += 1
                except (BlockingIOError, OSError):
                    pass
            position += 1
            end = time.monotonic() + 2
            while time.monotonic() < end:
                live = [s for s in socks if s.fileno() not in closed_after]
                ready, _, _ = select.select(live, [], [], max(0.0, end - time.monotonic()))
                for sock in ready:
                    try:
                        chunk = sock.recv(4096)
                    except OSError:
                        chunk = b""
                    replies[sock.fileno()] += chunk
                    if not chunk:
                        closed_after[sock.fileno()] = time.monotonic() - opened[sock.fileno()]
                if not live:
                    break
        lifetimes = sorted(closed_after.values())
        for sock in socks:
            sock.close()
    assert len(closed_after) == len(socks), f"{len(socks) - len(closed_after)} still open after 12 s"
    timeouts = sum(1 for r in replies.values() if b"421 4.4.2 " in r)
    assert timeouts == len(socks), f"{timeouts} of {len(socks)} got 421 4.4.2"
    assert lifetimes[-1] < 8, f"slowest connection lived {lifetimes[-1]:.1f} s with a 5 s deadline"
    watch.check(bad_inputs=bytes_sent, connections=len(socks),
                longest_connection_s=round(lifetimes[-1], 1))
    assert server.count("slow") == 0


# --- where mail goes (SPEC §6) ------------------------------------------------------------

HOSTILE_RECIPIENTS = [
    ("../../x@example.org", (b"550 5.1.1", b"501 5.1.3")),
    ('"../x"@example.org', (b"550 5.1.1",)),
    ('"../../../../etc/passwd"@example.org', (b"550 5.1.1",)),
    ("a/b@example.org", (b"550 5.1.1",)),
    ('"a\\\\b"@example.org', (b"550 5.1.1",)),
    ('"a/../../b"@example.org', (b"550 5.1.1",)),
    ("x" * 300 + "@example.org", (b"550 5.1.1", b"501 5.1.3")),
    ("y" * 251 + "@example.org", (b"550 5.1.1",)),
    (".hidden@example.org", (b"550 5.1.1", b"501 5.1.3")),
    ('".hidden"@example.org', (b"550 5.1.1",)),
    ('".ccsmtp"@example.org', (b"550 5.1.1",)),
    ('"."@example.org', (b"550 5.1.1",)),
    ('".."@example.org', (b"550 5.1.1",)),
    ("x.lock@example.org", (b"550 5.1.1",)),
    ("X.LOCK@example.org", (b"550 5.1.1",)),
    ("x.lock+tag@example.org", (b"550 5.1.1",)),
    ('"x\\ y"@example.org', (b"550 5.1.1",)),
    ('"~root"@example.org', (b"550 5.1.1",)),
    ("$HOME@example.org", (b"550 5.1.1",)),
    ("a*b@example.org", (b"550 5.1.1",)),
    ("x@[127.0.0.1]", (b"550 5.7.1",)),
    ("x@example.org.evil.test", (b"550 5.7.1",)),
    ("x@example.org/../evil.test", (b"501 5.1.3",)),
]
# Odd but safe: accepted, and delivered to the mailbox named here.
SAFE_ODDITIES = [("CON@example.org", "con"), ("nul@example.org", "nul"),
                 ("z" * 250 + "@example.org", "z" * 250),
                 ("postmaster+a/b@example.org", "postmaster"),
                 ("dot.ted@example.org", "dot.ted"), ("-dash@example.org", "-dash")]


def spool_snapshot(server: Server) -> set[tuple[str, int]]:
    return {(str(p.relative_to(server.spool)), p.stat().st_size)
            for p in server.spool.rglob("*") if ".ccsmtp" not in p.parts}


def test_path_traversal_and_unsafe_local_parts_are_refused_and_nothing_lands_outside(
        server, work_dir):
    before = outside_spool(server, work_dir)
    with Watch(server, "path_traversal") as watch:
        for rcpt, expected in HOSTILE_RECIPIENTS:
            with server.smtp() as client:   # a session each: stay clear of the error limits
                client.ehlo()
                assert client.mail(SENDER)[0] == 250
                code, reply = client.docmd(f"RCPT TO:<{rcpt}>")
                assert f"{code} ".encode() + reply[:5] in expected, (rcpt, code, reply)
                code, reply = client.docmd("DATA")
                assert code == 554, (rcpt, code, reply)
        for rcpt, mailbox in SAFE_ODDITIES:
            queue_id = server.send([rcpt], make_message(f"<{mailbox[:20]}@test>"))
            assert queue_id
    watch.check(bad_inputs=len(HOSTILE_RECIPIENTS), connections=len(HOSTILE_RECIPIENTS))
    server.settle(sorted({m for _, m in SAFE_ODDITIES}))
    assert outside_spool(server, work_dir) == before
    names = server.mailboxes()
    assert sorted(names) == sorted({m for _, m in SAFE_ODDITIES} | {"probe"}), names
    assert not [n for n in os.listdir(server.spool) if n.startswith(".") and n != ".ccsmtp"]
    assert not (work_dir / "x").exists() and not (server.spool.parent / "x").exists()


def test_a_non_ascii_local_part_that_lowercases_to_ascii_needs_an_alias(server):
    sock, _ = server.connect()
    with sock:
        sock.sendall(f"EHLO utf8.test\r\nMAIL FROM:<{SENDER}> SMTPUTF8\r\n".encode())
        assert [recv_reply(sock)[:3] for _ in range(2)] == [b"250", b"250"]
        sock.sendall("RCPT TO:<\u212a@example.org>\r\n".encode())
        reply = recv_reply(sock)
        assert reply.startswith(b"550 5.1.1"), reply
    assert "k" not in server.mailboxes()


# --- header injection (SPEC §5: CR, LF or NUL in an address never reaches a header) -----

INJECTIONS = [
    b"EHLO evil\rX-Injected: 1",
    b"EHLO evil\nX-Injected: 1",
    b"HELO evil\r\nX-Injected: 1",
    b"EHLO evil\x0bX-Injected:1",
    b"EHLO evil\x0cX-Injected:1",
    b"EHLO evil.test\x00X-Injected:1",
    b"MAIL FROM:<a\rb@remote.test>",
    b"MAIL FROM:<a@remote.test\nX-Injected: 1>",
    b"MAIL FROM:<a@remote.test\rX-Injected: 1>",
    b"MAIL FROM:<a@remote.test\x00X-Injected: 1>",
    b'MAIL FROM:<"a\rX-Injected: 1"@remote.test>',
    b'MAIL FROM:<"a\nX-Injected: 1"@remote.test>',
    b'MAIL FROM:<"a\x0bX-Injected:1"@remote.test>',
    "MAIL FROM:<a\u2028X-Injected:1@remote.test> SMTPUTF8".encode(),
    "MAIL FROM:<a\x85X-Injected:1@remote.test> SMTPUTF8".encode(),
    "MAIL FROM:<\"a\u2029X-Injected:1\"@remote.test> SMTPUTF8".encode(),
    b"MAIL FROM:<a@remote.test> BODY=8BITMIME\rX-Injected: 1",
    b"RCPT TO:<inject@example.org\r\nX-Injected: 1>",
    b"RCPT TO:<inject@example.org\nX-Injected: 1>",
    b"RCPT TO:<inject\r@example.org>",
    b'RCPT TO:<"inject\rX-Injected: 1"@example.org>',
    b"RCPT TO:<inject@example.org>\rX-Injected: 1",
]


def test_cr_lf_nul_in_helo_and_addresses_never_reach_a_header_or_the_from_line(server):
    """Each injection attempt comes first in a session that then sends a valid
    transaction, keeping whatever the attempt set (a HELO name, a sender) if the
    server took it: anything injected would show in that message's From_ line,
    Return-Path or Received header."""
    sender_taken = set()
    with Watch(server, "header_injection") as watch:
        for n, attempt in enumerate(INJECTIONS):
            sock, _ = server.connect()
            with sock:
                if not attempt.startswith((b"EHLO", b"HELO")):
                    sock.sendall(b"EHLO inject.test\r\n")
                    assert recv_reply(sock).startswith(b"250")
                if attempt.startswith(b"RCPT"):
                    sock.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
                    assert recv_reply(sock).startswith(b"250")
                sock.sendall(attempt + b"\r\nNOOP\r\n")
                replies = []
                while not replies or replies[-1] != b"250 2.0.0 Ok\r\n":   # up to the NOOP's
                    replies.append(recv_reply(sock))
                    assert replies[-1], (attempt, replies)
                if attempt.startswith((b"EHLO", b"HELO")) and not replies[0].startswith(b"250"):
                    sock.sendall(b"EHLO fine.test\r\n")
                    assert recv_reply(sock).startswith(b"250")
                if attempt.startswith(b"MAIL") and replies[0].startswith(b"250"):
                    sender_taken.add(n)
                elif not attempt.startswith(b"RCPT"):
                    sock.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
                    assert recv_reply(sock).startswith(b"250"), (attempt, replies)
                sock.sendall(f"RCPT TO:<inject@{DOMAIN}>\r\nDATA\r\n".encode())
                assert recv_reply(sock).startswith(b"250"), (attempt, replies)
                assert recv_reply(sock).startswith(b"354"), (attempt, replies)
                sock.sendall(make_message(f"<inject-{n}@test>", body=f"attempt {n}\r\n") + b".\r\n")
                assert S250_QUEUED.fullmatch(recv_reply(sock)), attempt
    watch.check(bad_inputs=len(INJECTIONS), connections=len(INJECTIONS),
                senders_accepted=len(sender_taken))
    messages = server.settle(["inject"])["inject"]
    assert [m["Message-ID"] for m in messages] == [f"<inject-{n}@test>" for n in range(len(INJECTIONS))]
    raw = server.raw("inject")
    assert b"X-Injected" not in raw
    for n, message in enumerate(messages):
        assert message.get_all("X-Injected") is None
        if n not in sender_taken:
            assert message.get_from().split(" ")[0] == SENDER, message.get_from()
            assert message["Return-Path"] == f"<{SENDER}>"
    for line in raw.split(b"\n"):
        assert b"\r" not in line and b"\0" not in line, line


# --- SMTP smuggling (SPEC §5: only CRLF . CRLF ends DATA) ---------------------------------

SMUGGLED = (b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<smuggled@example.org>\r\nDATA\r\n"
            b"Subject: smuggled\r\nMessage-ID: <smuggled@test>\r\n\r\nevil payload\r\n")
ALMOST_ENDS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
    "CR.CRLF": b"\r.\r\n",
    "LF.CR": b"\n.\r",
    "CRLF.NUL.CRLF": b"\r\n.\0\r\n",
    "CRLF.SP.CRLF": b"\r\n. \r\n",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
}


@pytest.mark.parametrize("position", ["after-body", "first-line"])
def test_smuggled_second_transaction_stays_inside_one_message(server, position):
    """For every almost-end-of-data, a second transaction after it is content: one
    message arrives, with the smuggled text in it, and no message for `smuggled`."""
    names = list(ALMOST_ENDS)
    if position == "first-line":
        # Right after DATA's own CRLF, "." CRLF is a real (empty) end: not a smuggling case.
        names = [name for name in names if ALMOST_ENDS[name].lstrip(b"\r\n") != b".\r\n"]
    with Watch(server, f"smuggling_{position}") as watch:
        for name in names:
            sock, _ = server.connect()
            with sock:
                sock.sendall(f"EHLO smuggle.test\r\nMAIL FROM:<{SENDER}>\r\n"
                             f"RCPT TO:<target@{DOMAIN}>\r\nDATA\r\n".encode())
                assert [recv_reply(sock)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
                if position == "after-body":
                    head = (f"Subject: {name}\r\nMessage-ID: <{name}@test>\r\n\r\nreal body".encode())
                    sock.sendall(head + ALMOST_ENDS[name] + SMUGGLED + b".\r\nQUIT\r\n")
                else:
                    # The almost-end right at the start of DATA (the first line).
                    sock.sendall(ALMOST_ENDS[name].lstrip(b"\r\n") + SMUGGLED
                                 + f"X-Variant: {name}\r\n".encode() + b".\r\nQUIT\r\n")
                rest = recv_eof(sock, 10)
            assert len(S250_QUEUED.findall(rest)) == 1, (name, rest)
            assert rest.endswith(b"221 2.0.0 Bye\r\n") and rest.count(b"\r\n") == 2, (name, rest)
    watch.check(bad_inputs=len(names), connections=len(names))
    target = server.settle(["target"])["target"]
    assert "smuggled" not in server.mailboxes()
    raw = server.raw("target")
    assert len(target) == len(names), [m["Subject"] for m in target]
    for name, message in zip(names, target):
        text = message.as_bytes()
        assert b"MAIL FROM:<evil@remote.test>" in text and b"evil payload" in text, (name, text)
        if position == "after-body":
            assert message["Message-ID"] == f"<{name}@test>", name
    assert raw.count(b"\nReturn-Path: ") == len(names) + 1   # and the barrier
