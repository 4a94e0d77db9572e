"""Hostile input against the live IMAP service (SPEC §8, §9), as test_hostile.py does for
SMTP: huge literals, NUL octets, deep nesting of commands and of MIME, 10 MB lines,
commands smuggled behind STARTTLS, password guessing from one address (with POP3's
failures counting too), pipelined floods whose responses are never read, and random
command streams (Hypothesis; CCSMTP_IMAP_FUZZ_EXAMPLES, default 150).

Throughout each attack a watcher logs in over IMAP from an address of its own, selects
and fetches (a whole session, which must take under PROMPT_S), samples the RSS of every
server process, and afterwards checks that no worker was replaced and (conftest's
teardown) that no traceback was logged. The figures are printed and appended to
RELIABILITY_LOG.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_smtp.store import mbox

from conftest import DOMAIN, make_message
from imapwire import Closed, Wire
from test_hostile import PROBE_IP, TEN_MB, Watch, attack_ip
from test_imap_faults import holder, write_large_mbox
from test_imap_server import PASSWORD, ImapServer, start_imap

PROMPT_S = 1.0
# max_size for these servers: literals up to it are taken after login, none larger.
MAX_SIZE = 1_000_000
CONFIG = f"max_size = {MAX_SIZE}\n"


class ImapWatch(Watch):
    """test_hostile.Watch with an IMAP probe: LOGIN, SELECT, UID FETCH, LOGOUT."""

    def __init__(self, imap: ImapServer, name: str, interval: float = 0.25):
        super().__init__(imap.server, name, interval)
        self.imap = imap

    def _probe_once(self) -> None:
        started = time.monotonic()
        try:
            with Wire("127.0.0.1", self.imap.imap, timeout=10, source_ip=PROBE_IP) as wire:
                wire.login("bob", PASSWORD)
                wire.ok("SELECT INBOX")
                fetched = wire.ok("UID FETCH 1:* (FLAGS ENVELOPE)")
                assert fetched and b"probe message" in fetched[0][0], fetched[:1]
                wire.ok("LOGOUT")
        except (OSError, Closed, AssertionError) as e:
            self.failures.append(f"{time.monotonic() - self.started:.1f}s: {e!r}")
            return
        self.timings.append(time.monotonic() - started)


@pytest.fixture
def imap(start_server, work_dir) -> ImapServer:
    imap = start_imap(start_server, work_dir, extra_config=CONFIG)
    imap.server.send([f"bob@{DOMAIN}"], make_message("<probe@test>", "probe message"))
    imap.deliver(2, "alice")
    imap.server.wait_for_text("bob", b"<probe@test>")
    return imap


def attacker(imap: ImapServer, n: int = 0, login: bool = False, select: bool = False,
             timeout: float = 10.0) -> Wire:
    wire = Wire("127.0.0.1", imap.imap, timeout=timeout, source_ip=attack_ip(n))
    assert wire.greeting.startswith(b"* OK [CAPABILITY ")
    if login:
        wire.login("alice", PASSWORD)
    if select:
        wire.ok("SELECT INBOX")
    return wire


def still_working(wire: Wire) -> None:
    untagged, tagged = wire.command("NOOP")
    assert tagged.startswith(b"OK"), tagged


def send_quietly(wire: Wire, data: bytes) -> bool:
    """Send what a server may refuse half-way by closing; False if it did."""
    try:
        wire.send(data)
        return True
    except OSError:
        return False


# --- literals (SPEC §9: 64 KiB before login, max_size after; no "+" when too big) -----

def refused_at_once(wire: Wire, announcement: bytes) -> bytes:
    """Send a command ending in a synchronising literal that must be refused: the
    answer is a tagged BAD [TOOBIG], never a "+" continuation."""
    tag = wire.next_tag()
    wire.send(tag + b" " + announcement + b"\r\n")
    response = wire.read_line()
    assert response.startswith(tag + b" BAD [TOOBIG]"), (announcement, response)
    return response


def test_huge_literals_are_refused_without_a_continuation_and_memory_stays_bounded(imap):
    closed_after_nonsync = 0
    pumped = 0
    with ImapWatch(imap, "imap_literals") as watch:
        with attacker(imap) as wire:
            refused_at_once(wire, b"LOGIN {999999999}")
            refused_at_once(wire, b"LOGIN alice {65537}")
            refused_at_once(wire, b"AUTHENTICATE PLAIN {4294967296}")
            still_working(wire)
            # Within the limit before login, a literal is invited.
            tag = wire.next_tag()
            wire.send(tag + b" LOGIN {5}\r\n")
            assert wire.read_line() == b"+ Ready for literal data\r\n"
            wire.send(b"alice " + PASSWORD.encode() + b"\r\n")
            assert wire.read_until_tagged(tag)[1].startswith(tag + b" OK")
            # After login the limit is max_size.
            refused_at_once(wire, b"SEARCH TEXT {999999999}")
            refused_at_once(wire, b"SEARCH TEXT {%d}" % (MAX_SIZE + 1))
            wire.ok("SELECT INBOX")
            tag = wire.next_tag()
            wire.send(tag + b" SEARCH TEXT {%d}\r\n" % MAX_SIZE)
            assert wire.read_line() == b"+ Ready for literal data\r\n"
            wire.send(b"z" * MAX_SIZE + b"\r\n")
            untagged, tagged = wire.read_until_tagged(tag)
            assert tagged.startswith(tag + b" OK") and untagged == [[b"* SEARCH\r\n"]]
        # Non-synchronising: the octets are already coming, so the server answers BAD
        # and closes rather than read a gigabyte; before and after login.
        for login in (False, True):
            for size in (999_999_999, 4_294_967_295):
                wire = attacker(imap, login=login)
                with wire:
                    tag = wire.next_tag()
                    command = b"SEARCH TEXT" if login else b"LOGIN alice"
                    wire.send(tag + b" " + command + b" {%d+}\r\n" % size)
                    chunk = b"y" * (1 << 20)
                    for _ in range(20):            # 20 MB after it, as fast as it goes
                        if not send_quietly(wire, chunk):
                            break
                        pumped += len(chunk)
                    rest = wire.read_all(10)
                    assert rest.startswith(tag + b" BAD [TOOBIG]"), rest[:200]
                    assert b"* BYE " in rest, rest[:300]
                    closed_after_nonsync += 1
        # Many sessions each taking a literal of max_size at once: memory is bounded by
        # max_size per command, not by what clients announce.
        wires = [attacker(imap, n, login=True, select=True) for n in range(8)]
        try:
            tags = []
            for wire in wires:
                tags.append(wire.next_tag())
                wire.send(tags[-1] + b" SEARCH TEXT {%d+}\r\n" % MAX_SIZE)
            for wire in wires:
                wire.send(b"w" * MAX_SIZE + b"\r\n")
            for wire, tag in zip(wires, tags):
                assert wire.read_until_tagged(tag)[1].startswith(tag + b" OK")
        finally:
            for wire in wires:
                wire.close()
    watch.check(bad_inputs=6 + closed_after_nonsync, connections=2 + closed_after_nonsync + 8,
                nonsync_closed=closed_after_nonsync, bytes_pumped_after_refusal=pumped,
                max_size_literals=8)


# --- NUL octets (CVE-2019-11500 class) -------------------------------------------------------

NUL_BEFORE_LOGIN = [b'LOGIN "al\0ice" secret', b'LOGIN alice "se\0cret"', b"NOOP\0",
                    b"NOOP \0", b"CAPABILITY\0x", b'AUTHENTICATE "PL\0AIN"']
NUL_AFTER_LOGIN = [b'SEARCH SUBJECT "x\0y"', b'SEARCH HEADER "Subject\0" "x"',
                   b'FETCH 1 (BODY.PEEK[HEADER.FIELDS ("Sub\0ject")])',
                   b"STORE 1 +FLAGS (\\Seen\0)", b'STORE 1 +FLAGS (k\0w)', b'STATUS "IN\0BOX" (MESSAGES)',
                   b"UID FETCH 1:\0 FLAGS", b'SEARCH CHARSET "UTF-8\0" ALL']
NUL_LITERALS = [(b"SEARCH SUBJECT", b"x\0y"), (b"SEARCH BODY", b"\0" * 100),
                (b"SEARCH HEADER", b"Sub\0ject")]


def test_nul_octets_in_strings_and_literals_are_bad_and_the_session_goes_on(imap):
    answered = 0
    with ImapWatch(imap, "imap_nul") as watch:
        with attacker(imap) as wire:
            for command in NUL_BEFORE_LOGIN:
                untagged, tagged = wire.command(command)
                assert tagged.startswith(b"BAD"), (command, tagged)
                answered += 1
            # A literal with a NUL, synchronising and not.
            tag = wire.next_tag()
            wire.send(tag + b" LOGIN {5}\r\n")
            assert wire.read_line().startswith(b"+ ")
            wire.send(b"al\0ce secret\r\n")
            assert wire.read_until_tagged(tag)[1].startswith(tag + b" BAD"), "NUL in a literal"
            tag = wire.next_tag()
            wire.send(tag + b" LOGIN {5+}\r\nal\0ce {6+}\r\nsecret\r\n")
            assert wire.read_until_tagged(tag)[1].startswith(tag + b" BAD")
            answered += 2
            still_working(wire)
        with attacker(imap, login=True, select=True) as wire:
            for command in NUL_AFTER_LOGIN:
                untagged, tagged = wire.command(command)
                assert tagged.startswith(b"BAD"), (command, tagged)
                answered += 1
            for command, literal in NUL_LITERALS:
                for nonsync in (False, True):
                    tag = wire.next_tag()
                    head = tag + b" " + command + (b" {%d+}\r\n" if nonsync else b" {%d}\r\n") % len(literal)
                    if command == b"SEARCH HEADER":
                        literal_tail = b' "x"\r\n'
                    else:
                        literal_tail = b"\r\n"
                    wire.send(head)
                    if not nonsync:
                        assert wire.read_line().startswith(b"+ ")
                    wire.send(literal + literal_tail)
                    tagged = wire.read_until_tagged(tag)[1]
                    assert tagged.startswith(tag + b" BAD"), (command, tagged)
                    answered += 1
            # Nothing was stored from any of it, and the session is whole.
            untagged = wire.ok("FETCH 1:* (FLAGS)")
            assert all(b"FLAGS ()" in r[0] for r in untagged), untagged
        # The SASL response line: base64 of PLAIN with extra NULs is refused, not a login.
        with attacker(imap) as wire:
            for payload in (b"\0alice\0" + PASSWORD.encode() + b"\0x", b"alice\0\0alice\0" + PASSWORD.encode(),
                            b"\0\0\0", b"\0alice\0\0" + PASSWORD.encode()):
                tagged = wire.command(b"AUTHENTICATE PLAIN " + base64.b64encode(payload))[1]
                assert tagged.startswith((b"NO", b"BAD")), (payload, tagged)
                answered += 1
    watch.check(bad_inputs=answered, connections=3)


# --- nesting ------------------------------------------------------------------------------

def deep_commands(depth: int) -> dict[str, bytes]:
    return {
        "fetch parentheses": b"FETCH 1 " + b"(" * depth + b"FLAGS" + b")" * depth,
        "search parentheses": b"SEARCH " + b"(" * depth + b"ALL" + b")" * depth,
        "search NOT": b"SEARCH " + b"NOT " * depth + b"ALL",
        "search OR": b"SEARCH " + b"OR ALL " * depth + b"ALL",
        "search mixed": b"SEARCH " + b"(NOT OR (" * (depth // 3) + b"ALL SEEN" + b"))" * (depth // 3),
        "store flags": b"STORE 1 +FLAGS " + b"(" * depth + b"\\Seen" + b")" * depth,
        "section parts": b"FETCH 1 BODY.PEEK[" + b"1." * depth + b"1]",
        "header fields": b"FETCH 1 BODY.PEEK[HEADER.FIELDS (" + b"(" * depth + b")]",
    }


def test_deeply_nested_commands_are_answered_quickly(imap):
    slowest = 0.0
    count = 0
    with ImapWatch(imap, "imap_nested_commands") as watch:
        for depth in (20, 99, 101, 1000, 10_000):
            # A session per depth: each BAD counts toward hard_error_limit.
            with attacker(imap, login=True, select=True) as wire:
                for name, command in deep_commands(depth).items():
                    started = time.monotonic()
                    untagged, tagged = wire.command(command)
                    slowest = max(slowest, time.monotonic() - started)
                    count += 1
                    assert tagged.startswith((b"OK", b"BAD", b"NO")), (name, depth, tagged)
                    if depth > 100 and name.startswith("search"):
                        assert tagged.startswith(b"BAD"), (name, depth, tagged)
                    if depth <= 99 and name.startswith("search") and name != "search mixed":
                        assert tagged.startswith(b"OK"), (name, depth, tagged)
                still_working(wire)
    watch.check(bad_inputs=count, connections=5, slowest_answer_s=round(slowest, 3))
    assert slowest < 2.0, slowest


def nested_rfc822(depth: int) -> bytes:
    """A message inside a message ... depth levels down (message/rfc822 each)."""
    inner = b"Subject: level 0\r\nContent-Type: text/plain\r\n\r\ninnermost text\r\n"
    for level in range(1, depth):
        inner = (b"Subject: level %d\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: message/rfc822\r\n\r\n" % level) + inner
    return inner


def nested_multipart(depth: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\ninnermost text\r\n"
    for level in range(depth - 1, 0, -1):
        boundary = b"b%03d" % level    # none a prefix of another (RFC 2046 §5.1.1)
        body = (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" + boundary +
                b"\r\n" + body + b"\r\n--" + boundary + b"--\r\n")
    return body


@pytest.mark.parametrize("kind", ["message/rfc822", "multipart"])
def test_a_message_nested_200_levels_is_opaque_past_100_and_answered_quickly(imap, kind):
    depth = 200
    inner = nested_rfc822(depth) if kind == "message/rfc822" else nested_multipart(depth)
    message_id = f"<nested-{kind.replace('/', '-')}@test>"
    content = (f"From: x@{DOMAIN}\r\nTo: alice@{DOMAIN}\r\nMessage-ID: {message_id}\r\n"
               "MIME-Version: 1.0\r\n").encode() + inner
    imap.server.send([f"alice@{DOMAIN}"], content)
    imap.server.wait_for_text("alice", message_id.encode())
    timings = {}
    with ImapWatch(imap, f"imap_nested_{kind.split('/')[0]}") as watch:
        with attacker(imap, login=True, select=True) as wire:
            for items in ("BODYSTRUCTURE", "BODY", "ENVELOPE", "BODY.PEEK[]",
                          "BODY.PEEK[" + ".".join(["1"] * 150) + "]",
                          "BODY.PEEK[" + ".".join(["1"] * 99) + ".HEADER]"):
                started = time.monotonic()
                untagged = wire.ok(f"FETCH 3 ({items})")
                timings[items[:24]] = round(time.monotonic() - started, 3)
                if items == "BODYSTRUCTURE":
                    structure = b"".join(b"".join(r) for r in untagged)
            started = time.monotonic()
            wire.ok("SEARCH BODY innermost")
            timings["SEARCH BODY"] = round(time.monotonic() - started, 3)
    opened = structure.upper().count(b'"RFC822"') if kind == "message/rfc822" \
        else structure.upper().count(b'"MIXED"')
    watch.check(bad_inputs=1, connections=1, depth=depth, levels_opened=opened,
                timings_s=timings)
    assert b'"APPLICATION" "OCTET-STREAM"' in structure.upper(), structure[-500:]
    assert 95 <= opened <= 100, opened
    assert max(timings.values()) < 5.0, timings


# --- 10 MB lines -----------------------------------------------------------------------------

def send_big(wire: Wire, prefix: bytes, size: int, suffix: bytes) -> None:
    wire.send(prefix)
    piece = b"A" * (1 << 20)
    for _ in range(size // len(piece)):
        wire.send(piece)
    wire.send(suffix)


def test_10_mb_lines_are_dropped_as_they_arrive(imap):
    with ImapWatch(imap, "imap_10mb_line") as watch:
        with attacker(imap, timeout=60) as wire:
            send_big(wire, b"a NOOP ", TEN_MB, b"\r\n")
            response = wire.read_line()
            assert response.startswith((b"a BAD", b"* BAD")) and b"too long" in response, response
            still_working(wire)
            wire.login("alice", PASSWORD)
            wire.ok("SELECT INBOX")
            # In IDLE, where only DONE is expected, and as a SASL response.
            wire.send(b"i IDLE\r\n")
            assert wire.read_line().startswith(b"+ ")
            send_big(wire, b"", TEN_MB, b"\r\n")
            untagged, tagged = wire.read_until_tagged(b"i")
            assert tagged.startswith(b"i BAD"), tagged
            still_working(wire)
        with attacker(imap, timeout=60) as wire:
            wire.send(b"s AUTHENTICATE PLAIN\r\n")
            assert wire.read_line().startswith(b"+")
            send_big(wire, b"", TEN_MB, b"\r\n")
            assert wire.read_until_tagged(b"s")[1].startswith(b"s BAD")
            still_working(wire)
            # And never ended: the client goes away with 10 MB unanswered.
            send_big(wire, b"b LOGIN ", TEN_MB, b"")
        time.sleep(0.3)
    watch.check(bad_inputs=4, connections=2, line_bytes=TEN_MB)


# --- STARTTLS with commands pipelined behind it (SPEC §8) ------------------------------------

INJECTED = [
    b"b LOGIN alice {pw}\r\nc SELECT INBOX\r\nd STORE 1:* +FLAGS (\\Deleted)\r\ne EXPUNGE\r\n",
    b"b LOGIN {5+}\r\nalice {pwlen+}\r\n{pw}\r\nc SELECT INBOX\r\nd STORE 1:* +FLAGS (\\Flagged)\r\n",
    b"b AUTHENTICATE PLAIN {plain}\r\nc SELECT INBOX\r\nd STORE 1:* +FLAGS (\\Answered)\r\n",
    b"b CAPABILITY\r\nc NOOP\r\n",
]


def test_commands_pipelined_after_starttls_are_never_executed(imap):
    plain = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
    with ImapWatch(imap, "imap_starttls_injection") as watch:
        for n, template in enumerate(INJECTED):
            injected = (template.replace(b"{pw}", PASSWORD.encode())
                        .replace(b"{pwlen+}", b"{%d+}" % len(PASSWORD))
                        .replace(b"{plain}", plain))
            with attacker(imap, n) as wire:
                wire.send(b"a STARTTLS\r\n" + injected)
                assert wire.read_line() == b"a OK Begin TLS negotiation now\r\n"
                tls = imap.tls_context().wrap_socket(wire.sock, server_hostname="127.0.0.1")
                assert not wire.buf, f"plain text after the STARTTLS reply: {bytes(wire.buf)!r}"
                wire.sock = tls
                untagged, tagged = wire.command("SELECT INBOX")
                assert tagged == b"BAD Not logged in", (n, untagged, tagged)
                capability = wire.ok("CAPABILITY")
                assert b"STARTTLS" not in capability[0][0]
                still_working(wire)
    watch.check(bad_inputs=len(INJECTED), connections=len(INJECTED))
    assert imap.server.stderr().count("sent after STARTTLS") >= len(INJECTED)
    with Wire("127.0.0.1", imap.imap) as wire:
        wire.login("alice", PASSWORD)
        wire.ok("SELECT INBOX")
        flags = wire.ok("FETCH 1:* (FLAGS)")
        assert len(flags) == 2 and all(b"FLAGS ())" in r[0] for r in flags), flags


# --- guessing passwords from one address (SPEC §9) --------------------------------------------

GUESSER_IP = "127.0.3.7"


class Pop3Wire:
    """poplib cannot choose its source address."""

    def __init__(self, port: int, source_ip: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=40,
                                             source_address=(source_ip, 0))
        self.reader = self.sock.makefile("rb")
        assert self.reader.readline().startswith(b"+OK")

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reader.readline()


def imap_guess(imap: ImapServer, password: str = "wrong") -> tuple[float, bytes, Wire]:
    wire = Wire("127.0.0.1", imap.imap, timeout=40, source_ip=GUESSER_IP)
    started = time.monotonic()
    untagged, tagged = wire.command(f'LOGIN alice "{password}"')
    return time.monotonic() - started, tagged, wire


def test_failed_logins_from_one_address_are_delayed_across_workers_and_services(imap):
    """SPEC §9: 2 s, doubling, at most 15 s, counted per address over every worker and
    over POP3 and IMAP alike; a correct login from elsewhere is not held up."""
    server = imap.server
    with ImapWatch(imap, "imap_login_guessing") as watch:
        # 1. A POP3 failure: 2 s.
        pop = Pop3Wire(imap.pop3, GUESSER_IP)
        assert pop.command(b"USER alice").startswith(b"+OK")
        started = time.monotonic()
        reply = pop.command(b"PASS wrong")
        pop3_delay = time.monotonic() - started
        assert reply.startswith(b"-ERR"), reply
        pop_worker = holder(server, pop)
        pop.sock.close()
        # 2. Then IMAP, on the other worker if possible: 4 s (the second failure).
        for _ in range(20):
            wire = Wire("127.0.0.1", imap.imap, timeout=40, source_ip=GUESSER_IP)
            if holder(server, wire).pid != pop_worker.pid:
                break
            wire.close()
        imap_worker = holder(server, wire)
        started = time.monotonic()
        untagged, tagged = wire.command('LOGIN alice "wrong"')
        imap_delay = time.monotonic() - started
        wire.close()
        assert tagged.startswith(b"NO [AUTHENTICATIONFAILED]"), tagged
        # 3. Ten at once: 8 s and then 15 s each, never more.
        results: list[tuple[float, bytes, int]] = []
        lock = threading.Lock()

        def guess(_: int) -> None:
            delay, tagged, wire = imap_guess(imap)
            with lock:
                results.append((delay, tagged, holder(server, wire).pid))
            wire.close()

        threads = [threading.Thread(target=guess, args=(n,)) for n in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # A correct password from that address is not delayed either (it does not reset
        # the count).
        started = time.monotonic()
        with Wire("127.0.0.1", imap.imap, timeout=20, source_ip=GUESSER_IP) as wire:
            wire.login("alice", PASSWORD)
        right_after = time.monotonic() - started
    delays = sorted(d for d, _, _ in results)
    workers = {pid for _, _, pid in results} | {pop_worker.pid, imap_worker.pid}
    watch.check(bad_inputs=12, connections=12, pop3_first_s=round(pop3_delay, 2),
                imap_second_s=round(imap_delay, 2), parallel_s=[round(d, 1) for d in delays],
                workers_involved=len(workers), correct_login_s=round(right_after, 3))
    assert all(t.startswith(b"NO [AUTHENTICATIONFAILED]") for _, t, _ in results), results
    assert 1.9 <= pop3_delay < 6, pop3_delay
    assert 3.9 <= imap_delay < 9, imap_delay          # counted on from POP3's failure
    assert delays[0] >= 7.9 and delays[-1] < 15 + 6, delays
    assert sum(1 for d in delays if d >= 14.9) >= 8, delays
    assert right_after < PROMPT_S, right_after
    assert len(workers) == 2, "the failures all landed on one worker"
    log = server.stderr()
    assert log.count("imap login failed: user=<alice>") >= 11 and "wrong" not in log


# --- random command streams (Hypothesis) ---------------------------------------------------
# Mostly well-formed commands of every state (so that they reach the mailbox code), some
# of them mutated, and some plain junk.

SEQUENCES = [b"1", b"2", b"3", b"*", b"1:*", b"2:3", b"3,1", b"3:1", b"1,2,3", b"5", b"0", b"0:2",
             b"4294967295", b"4294967296", b"1:4294967295", b"*:1", b"2,*", b"", b"1:", b"a"]
SECTIONS = [b"", b"1", b"2", b"1.2", b"0", b"1.0", b"HEADER", b"TEXT", b"MIME", b"1.MIME",
            b"2.HEADER", b"1.1.1.TEXT", b"HEADER.FIELDS (Subject From)",
            b"HEADER.FIELDS.NOT (To Received)", b"HEADER.FIELDS ()", b"1.HEADER.FIELDS (X)",
            b"99", b"4294967296"]
PARTIALS = [b"", b"<0.10>", b"<5.0>", b"<4294967295.1>", b"<1>", b"<0.4294967296>", b"<.>"]
SIMPLE_ATTS = [b"FLAGS", b"UID", b"ENVELOPE", b"BODY", b"BODYSTRUCTURE", b"RFC822", b"RFC822.SIZE",
               b"RFC822.HEADER", b"RFC822.TEXT", b"INTERNALDATE", b"ALL", b"FAST", b"FULL",
               b"BODY.PEEK", b"X-GM-MSGID"]
SEARCH_KEYS = [b"ALL", b"ANSWERED", b"DELETED", b"FLAGGED", b"NEW", b"OLD", b"RECENT", b"SEEN",
               b"UNANSWERED", b"UNDELETED", b"UNFLAGGED", b"UNSEEN", b"DRAFT", b"UNDRAFT",
               b"SUBJECT level", b"FROM x", b"TO alice", b"CC \"\"", b"BCC {1}", b"BODY innermost",
               b"TEXT Hello", b'HEADER Subject "subject"', b"HEADER X-None \"\"",
               b"KEYWORD kw", b"UNKEYWORD $Junk", b"LARGER 100", b"SMALLER 4294967295",
               b"SINCE 1-Jan-2024", b"BEFORE 31-Dec-2999", b"ON 29-Feb-2024", b"SENTON 1-Jan-1970",
               b"SENTSINCE 32-Jan-2024", b"UID 1:*", b"UID 0", b"1:*", b"*", b"NOT", b"OR"]
FLAGS = [b"\\Seen", b"\\Deleted", b"\\Flagged", b"\\Answered", b"\\Draft", b"\\Recent", b"\\Junk",
         b"$Forwarded", b"kw", b"KW", b"x" * 40, b"\\"]


def _atts(draw) -> bytes:
    def one() -> bytes:
        if draw(st.booleans()):
            return draw(st.sampled_from(SIMPLE_ATTS))
        name = draw(st.sampled_from([b"BODY", b"BODY.PEEK", b"BINARY"]))
        return (name + b"[" + draw(st.sampled_from(SECTIONS)) + b"]"
                + draw(st.sampled_from(PARTIALS)))
    atts = [one() for _ in range(draw(st.integers(1, 4)))]
    return atts[0] if len(atts) == 1 and draw(st.booleans()) else b"(" + b" ".join(atts) + b")"


def _search_program(draw, depth: int = 0) -> bytes:
    keys = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(SEARCH_KEYS))
        if key in (b"NOT", b"OR") and depth < 3:
            operands = 1 if key == b"NOT" else 2
            key += b" " + b" ".join(_search_program(draw, depth + 1) for _ in range(operands))
        elif depth < 3 and draw(st.integers(0, 5)) == 0:
            key = b"(" + _search_program(draw, depth + 1) + b")"
        keys.append(key)
    return b" ".join(keys)


@st.composite
def well_formed(draw) -> bytes:
    uid = b"UID " if draw(st.booleans()) else b""
    seq = draw(st.sampled_from(SEQUENCES))
    kind = draw(st.sampled_from(["fetch", "fetch", "search", "store", "other"]))
    if kind == "fetch":
        return uid + b"FETCH " + seq + b" " + _atts(draw)
    if kind == "search":
        charset = draw(st.sampled_from([b"", b"CHARSET UTF-8 ", b"CHARSET US-ASCII ",
                                        b"CHARSET KOI8-R ", b"CHARSET "]))
        return uid + b"SEARCH " + charset + _search_program(draw)
    if kind == "store":
        mode = draw(st.sampled_from([b"FLAGS", b"+FLAGS", b"-FLAGS", b"FLAGS.SILENT",
                                     b"+FLAGS.SILENT", b"-FLAGS.SILENT", b"+FLAG"]))
        flags = b" ".join(draw(st.lists(st.sampled_from(FLAGS), max_size=4)))
        return uid + b"STORE " + seq + b" " + mode + b" " + (
            b"(" + flags + b")" if draw(st.booleans()) else flags)
    return draw(st.sampled_from([
        b"EXPUNGE", b"UID EXPUNGE " + seq, b"CLOSE", b"CHECK", b"NOOP", b"NAMESPACE",
        b"STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)", b"STATUS INBOX ()",
        b"SELECT INBOX", b"EXAMINE inbox", b"SELECT Trash", b'LIST "" *', b'LSUB "" %',
        b"LIST \"\" \"\"", b"COPY 1 INBOX", b"UID COPY 1:* x", b"APPEND INBOX {3+}\r\nabc",
        b"IDLE\r\nDONE", b"IDLE\r\nNOT DONE", b"CAPABILITY", b"ENABLE CONDSTORE", b"UNSELECT",
        b"LOGIN alice x", b"AUTHENTICATE PLAIN", b"STARTTLS", b"CREATE x", b"RENAME INBOX x",
        b"SUBSCRIBE INBOX"]))


def _mutate(draw, line: bytes) -> bytes:
    if not line or draw(st.integers(0, 3)):
        return line
    i = draw(st.integers(0, len(line)))
    how = draw(st.sampled_from(["insert", "delete", "duplicate", "truncate"]))
    if how == "insert":
        return line[:i] + draw(st.binary(min_size=1, max_size=4)) + line[i:]
    if how == "delete":
        return line[:i] + line[i + 1:]
    if how == "duplicate":
        return line[:i] + line[i:] + line[i:]
    return line[:i]


@st.composite
def command_streams(draw) -> bytes:
    lines = []
    for n in range(draw(st.integers(1, 12))):
        tag = draw(st.sampled_from([b"a%d" % n] * 8 + [b"*", b"+", b"", b"t(%d" % n]))
        if draw(st.integers(0, 5)):
            body = _mutate(draw, draw(well_formed()))
        else:
            body = b" ".join(draw(st.lists(st.one_of(st.sampled_from(SEARCH_KEYS + SIMPLE_ATTS),
                                                     st.binary(max_size=8)), max_size=8)))
        end = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b""]))
        lines.append(tag + b" " + body + end)
    return b"".join(lines)


def test_random_command_streams_never_produce_a_traceback(imap):
    results: dict[str, int] = {"streams": 0, "closed_by_server": 0, "bytes": 0, "OK": 0, "NO": 0,
                               "BAD": 0}

    @settings(max_examples=int(os.environ.get("CCSMTP_IMAP_FUZZ_EXAMPLES", "150")),
              deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(command_streams(), st.sampled_from(["none", "login", "select", "examine"]))
    def run(stream: bytes, state: str) -> None:
        n = results["streams"]
        with attacker(imap, n, login=state != "none", timeout=10) as wire:
            if state in ("select", "examine"):
                wire.ok(f"{state.upper()} INBOX")
            if send_quietly(wire, stream + b"\r\nzz LOGOUT\r\n"):
                results["bytes"] += len(stream)
            # Read until the LOGOUT is answered, the server closes, or all goes quiet.
            data = bytearray()
            wire.sock.settimeout(0.5)
            with contextlib.suppress(OSError):
                while not data.endswith(b"zz OK Logout completed\r\n"):
                    chunk = wire.sock.recv(1 << 16)
                    if not chunk:
                        results["closed_by_server"] += 1
                        break
                    data += chunk
            assert b"SERVERBUG" not in data and b"Internal" not in data, bytes(data[-500:])
            for status in (b"OK", b"NO", b"BAD"):
                results[status.decode()] += len(re.findall(rb"(?m)^[^ *+\r\n]+ " + status + rb" ", bytes(data)))
        results["streams"] += 1
        assert "Traceback" not in imap.server.stderr()

    with ImapWatch(imap, "imap_random_streams") as watch:
        run()
    watch.check(bad_inputs=results["streams"], connections=results["streams"],
                closed_by_server=results["closed_by_server"], stream_bytes=results["bytes"],
                tagged_ok=results["OK"], tagged_no=results["NO"], tagged_bad=results["BAD"])
    # The mailbox is still readable over IMAP and whole in the file.
    with Wire("127.0.0.1", imap.imap) as wire:
        wire.login("alice", PASSWORD)
        wire.ok("SELECT INBOX")
        wire.ok("FETCH 1:* (BODY.PEEK[] BODYSTRUCTURE)")


# --- pipelined floods whose responses are never read ------------------------------------------

FLOODS = {
    "capability": (False, b"a CAPABILITY\r\n"),
    "list": (True, b'a LIST "" *\r\n'),
    "fetch": (True, b"a FETCH 1:* (BODY.PEEK[] BODYSTRUCTURE ENVELOPE)\r\n"),
    "search": (True, b"a SEARCH TEXT hello\r\n"),
}


def test_pipelined_floods_never_read_keep_the_worker_small(imap):
    """Clients pipeline megabytes of commands whose responses they never read: the
    server stops reading them once its output waits (back-pressure), so the worker's
    memory does not grow with what they send."""
    body = "".join(f"line {n:06d} of a longer message\r\n" for n in range(20_000))   # ~0.6 MB
    imap.server.send([f"alice@{DOMAIN}"], make_message("<flood-big@test>", "big", body))
    imap.server.wait_for_text("alice", b"line 019999")
    sent: dict[str, int] = {}
    commands = 0
    with ImapWatch(imap, "imap_pipelined_floods") as watch:
        wires = []
        for n, (name, (selected, command)) in enumerate(FLOODS.items()):
            wire = attacker(imap, n, login=selected, select=selected)
            wire.sock.setblocking(False)
            flood = command * (40_000_000 // len(command))
            pushed = 0
            progress = time.monotonic()
            # Until the server stops reading (nothing taken for half a second).
            while pushed < len(flood) and time.monotonic() - progress < 0.5:
                try:
                    pushed += wire.sock.send(flood[pushed:pushed + 65536])
                    progress = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.01)
            assert pushed < len(flood), f"{name}: the server read all of it"
            sent[name] = pushed
            commands += pushed // len(command)
            wires.append(wire)
        time.sleep(2)            # whatever the server would do with it, it has done
        for wire in wires:
            wire.close()
    watch.check(bad_inputs=commands, connections=len(FLOODS), bytes_pushed=sent)


# --- one user's long commands and everyone else ------------------------------------------------

def test_one_users_long_searches_do_not_hold_up_other_users(imap):
    """Six sessions of one user each pipeline 3 SEARCH TEXT over a 5,000-message mailbox
    (each reads every message): more long commands than the worker has I/O threads. Another
    user's whole session (the watcher's probe) must still be prompt: a long command
    takes turns with the others (mailbox_commands.BATCH_SECONDS) instead of holding a
    thread from start to end."""
    large = imap.server.scratch / "large.mbox"
    write_large_mbox(large, 5_000)
    mbox.append(str(imap.server.spool), "alice", [large.read_bytes()])
    with Wire("127.0.0.1", imap.imap, timeout=60) as wire:      # index the mailbox first
        wire.login("alice", PASSWORD)
        wire.ok("SELECT INBOX")
        started = time.monotonic()
        wire.ok("SEARCH TEXT zzzz")
        one_search = time.monotonic() - started
    searches = 0
    with ImapWatch(imap, "imap_long_searches") as watch:
        hogs = [attacker(imap, n, login=True, select=True, timeout=120) for n in range(6)]
        try:
            for hog in hogs:
                hog.send(b"".join(b"s%d SEARCH TEXT zzzz\r\n" % i for i in range(3)))
            for hog in hogs:
                for i in range(3):
                    assert hog.read_until_tagged(b"s%d" % i)[1].startswith(b"s%d OK" % i)
                    searches += 1
        finally:
            for hog in hogs:
                hog.close()
    watch.check(bad_inputs=searches, connections=6, one_search_s=round(one_search, 2),
                mailbox_messages=5_002)
