"""CHUNKING (RFC 3030, SPEC §10) over real sockets, and timeout_data for DATA blocks and
BDAT chunks (SPEC §5), against the real server.

swaks and smtplib cannot send BDAT, so these tests speak it on raw sockets: chunks
cut anywhere (inside a CRLF, before a dot) stored byte for byte, pipelined BDATs,
octets read and dropped when a chunk is refused (no recipient, over max_size), a bad
chunk size closing the connection, BDAT inside TLS, a message of several MB spilled to
disk while it arrives, and a chunk that stalls cut off at timeout_data.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid

import pytest

from conftest import (CLIENT_HELO, DOMAIN, SENDER, Server, connect_smtps, recv_eof,
                      recv_reply, start_tls_server, starttls)

S250_SENDER = b"250 2.1.0 Ok\r\n"
S250_RCPT = b"250 2.1.5 Ok\r\n"
S250_OK = b"250 2.0.0 Ok\r\n"
S421_TIMEOUT = b"421 4.4.2 Error: timeout exceeded\r\n"
S501_BDAT = b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n"
S503_NEED_HELO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
S503_NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
S503_DATA_AFTER_BDAT = b"503 5.5.1 Error: DATA after BDAT in one transaction\r\n"
S552_TOO_BIG = b"552 5.3.4 Error: message file too big\r\n"
S554_NO_RCPT = b"554 5.5.1 Error: no valid recipients\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as [0-9A-Za-z]+\r\n")
SPILL_BYTES = 1 << 20        # smtp/session.py: larger messages go to SPOOL/.ccsmtp/tmp


def octets(n: int) -> bytes:
    return b"250 2.0.0 %d octets received\r\n" % n


def bdat(chunk: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


def command(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return recv_reply(sock)


def open_transaction(sock: socket.socket, rcpt: str) -> None:
    """EHLO (CHUNKING offered), MAIL, RCPT on a session whose greeting was read."""
    reply = command(sock, f"EHLO {CLIENT_HELO}".encode())
    assert b"250-CHUNKING\r\n" in reply, reply
    assert command(sock, f"MAIL FROM:<{SENDER}>".encode()) == S250_SENDER
    assert command(sock, f"RCPT TO:<{rcpt}>".encode()) == S250_RCPT


def send_chunks(sock: socket.socket, chunks: list[bytes]) -> bytes:
    """One BDAT per chunk, each answered before the next; the last one LAST.
    Returns the final reply."""
    for chunk in chunks[:-1]:
        sock.sendall(bdat(chunk))
        assert recv_reply(sock, timeout=30) == octets(len(chunk))
    sock.sendall(bdat(chunks[-1], last=True))
    return recv_reply(sock, timeout=30)


def cut(content: bytes, *at: int) -> list[bytes]:
    bounds = [0, *at, len(content)]
    return [content[a:b] for a, b in zip(bounds, bounds[1:])]


def mboxrd(content: bytes) -> bytes:
    """What the mbox holds of content: LF line ends, '^>*From ' lines quoted once more."""
    return re.sub(rb"(?m)^(>*From )", rb">\1", content.replace(b"\r\n", b"\n"))


def stored_content(raw: bytes) -> bytes:
    """The content of the only message of a mailbox: after the From_ line and our
    Return-Path: and Received: (with its continuation lines), before the blank line
    that ends each message."""
    assert len(re.findall(rb"(?m)^From ", raw)) == 1, raw[:500]
    lines = raw.split(b"\n")
    assert lines[0].startswith(b"From ") and lines[1].startswith(b"Return-Path: <")
    assert lines[2].startswith(b"Received: ")
    n = 3
    while lines[n].startswith(b"\t"):
        n += 1
    rest = b"\n".join(lines[n:])
    assert rest.endswith(b"\n\n"), rest[-200:]
    return rest[:-1]


def assert_stored(server: Server, name: str, content: bytes) -> None:
    server.wait_for_messages(name, 1, timeout=30)
    got, expected = stored_content(server.raw(name)), mboxrd(content)
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                  min(len(got), len(expected)))
        pytest.fail(f"stored copy differs at offset {at} of {len(expected)} (got {len(got)} "
                    f"bytes): {got[max(0, at - 60):at + 60]!r} != "
                    f"{expected[max(0, at - 60):at + 60]!r}")


def tricky_message(message_id: str) -> bytes:
    """Content that DATA would treat differently: nothing here is unstuffed or ends
    the message under BDAT."""
    return (f"Subject: chunks\r\nMessage-ID: {message_id}\r\n\r\n".encode()
            + b".leading dot, kept as it is\r\n"
            + b"..two dots, kept as they are\r\n"
            + b"From the first column\r\n"
            + b">From quoted once already\r\n"
            + b"8bit: caf\xc3\xa9\r\n"
            + b"\r\n.\r\n"                       # DATA's end marker, mere content here
            + b"QUIT\r\n"                        # and a command line, mere content too
            + b"BDAT 5 LAST\r\n"
            + b"a bare\nLF and a bare\rCR\r\n"
            + b"last line\r\n")


def msgid() -> str:
    return f"<{uuid.uuid4().hex}@chunks.test>"


# --- chunks stored byte for byte --------------------------------------------------------

@pytest.mark.parametrize("server", [{"workers": 1}], indirect=True)
def test_a_message_in_several_chunks_is_stored_byte_for_byte(server):
    content = tricky_message(msgid())
    # Cut inside a CRLF, between CRLF and the dot of the end marker, inside "From ",
    # after one octet, and an empty LAST chunk, as some clients send.
    crlf = content.index(b"\r\n.leading") + 1
    marker = content.index(b"\r\n.\r\n") + 2
    from_ = content.index(b"From the") + 2
    chunks = cut(content, 1, crlf, from_, marker, len(content))
    assert b"".join(chunks) == content and chunks[-1] == b""
    sock, _ = server.connect()
    with sock:
        open_transaction(sock, f"alice@{DOMAIN}")
        assert QUEUED.fullmatch(send_chunks(sock, chunks))
        assert command(sock, b"QUIT").startswith(b"221 ")
    assert_stored(server, "alice", content)
    [message] = server.mbox("alice")
    assert " with ESMTP id " in " ".join(message["Received"].split())


@pytest.mark.parametrize("server", [{"workers": 1}], indirect=True)
def test_pipelined_bdats_are_answered_in_order(server):
    """Two transactions, their BDATs and the commands around them in one write
    (RFC 3030 §4.2: BDAT may be pipelined); DATA after BDAT is refused."""
    first, second = tricky_message(msgid()), tricky_message(msgid())
    a, b, c = cut(first, 7, 100)
    stream = (f"EHLO {CLIENT_HELO}\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<alice@{DOMAIN}>\r\n".encode()
              + bdat(a) + bdat(b) + b"DATA\r\n" + bdat(c, last=True)
              + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<bob@{DOMAIN}>\r\n".encode()
              + bdat(second, last=True) + b"NOOP\r\nQUIT\r\n")
    sock, _ = server.connect()
    with sock:
        sock.sendall(stream)
        replies = [recv_reply(sock, timeout=15) for _ in range(12)]
        assert recv_eof(sock) == b""
    assert replies[0].startswith(b"250-")
    assert replies[1:5] == [S250_SENDER, S250_RCPT, octets(len(a)), octets(len(b))]
    assert replies[5] == S503_DATA_AFTER_BDAT
    assert QUEUED.fullmatch(replies[6]), replies[6]
    assert replies[7:9] == [S250_SENDER, S250_RCPT]
    assert QUEUED.fullmatch(replies[9]), replies[9]
    assert replies[10] == S250_OK and replies[11].startswith(b"221 "), replies
    assert_stored(server, "alice", first)
    assert_stored(server, "bob", second)


# --- refused chunks: the octets are read all the same -----------------------------------

@pytest.mark.parametrize("server", [{"workers": 1}], indirect=True)
def test_refused_chunks_are_read_and_never_taken_for_commands(server):
    payload = b"QUIT\r\nRSET\r\n"     # run as commands, QUIT would close the session
    sock, _ = server.connect()
    with sock:
        # Before EHLO, and with no transaction: refused as DATA would be.
        sock.sendall(bdat(payload))
        assert recv_reply(sock) == S503_NEED_HELO
        assert command(sock, f"EHLO {CLIENT_HELO}".encode()).startswith(b"250-")
        sock.sendall(bdat(payload, last=True))
        assert recv_reply(sock) == S503_NEED_MAIL
        # Every recipient refused: 554, and the octets are gone all the same.
        assert command(sock, f"MAIL FROM:<{SENDER}>".encode()) == S250_SENDER
        assert command(sock, b"RCPT TO:<someone@elsewhere.test>").startswith(b"550 5.7.1 ")
        sock.sendall(bdat(payload, last=True))
        assert recv_reply(sock) == S554_NO_RCPT
        assert command(sock, b"NOOP") == S250_OK
        # A bad end marker: 501, octets read, the session goes on.
        assert command(sock, b"RSET") == S250_OK
        assert command(sock, f"MAIL FROM:<{SENDER}>".encode()) == S250_SENDER
        assert command(sock, f"RCPT TO:<alice@{DOMAIN}>".encode()) == S250_RCPT
        sock.sendall(b"BDAT %d FIRST\r\n" % len(payload) + payload)
        assert recv_reply(sock).startswith(b"501 5.5.4 ")
        assert command(sock, b"NOOP") == S250_OK
        assert command(sock, b"QUIT").startswith(b"221 ")
    server.settle(["alice"])
    # Nothing but the barrier anywhere (NAME.lock may linger while delivery unlocks).
    assert server.mailboxes() == ["alice"]
    assert server.count("alice") == 1


@pytest.mark.parametrize("server", [{"workers": 1, "extra_args": ["--max-size", "1000"]}],
                         indirect=True)
def test_chunks_over_max_size_get_552_and_later_chunks_503(server):
    sock, _ = server.connect()
    with sock:
        open_transaction(sock, f"alice@{DOMAIN}")
        sock.sendall(bdat(b"x" * 598 + b"\r\n"))
        assert recv_reply(sock) == octets(600)
        sock.sendall(bdat(b"QUIT\r\n" * 100))                  # 1,200 octets in all
        assert recv_reply(sock) == S552_TOO_BIG
        sock.sendall(bdat(b"QUIT\r\n" * 2, last=True))         # the transaction is over
        assert recv_reply(sock) == S503_NEED_MAIL
        assert command(sock, b"NOOP") == S250_OK
        # The session goes on, and a message that fits is taken.
        content = tricky_message(msgid())
        assert command(sock, f"MAIL FROM:<{SENDER}>".encode()) == S250_SENDER
        assert command(sock, f"RCPT TO:<alice@{DOMAIN}>".encode()) == S250_RCPT
        assert QUEUED.fullmatch(send_chunks(sock, cut(content, 50)))
        assert command(sock, b"QUIT").startswith(b"221 ")
    assert_stored(server, "alice", content)


BAD_SIZES = [b"BDAT +5 LAST", b"BDAT -5", b"BDAT 0x10", b"BDAT 1_0 LAST", b"BDAT 5.0",
             b"BDAT", b"BDAT LAST", b"BDAT five",
             "BDAT \u0665 LAST".encode(),      # ARABIC-INDIC DIGIT FIVE: a digit to Python's int()
             "BDAT \uff15".encode()]           # FULLWIDTH DIGIT FIVE


@pytest.mark.parametrize("server", [{"workers": 1}], indirect=True)
def test_a_chunk_size_that_is_not_digits_closes_the_connection_with_501(server):
    """RFC 3030's chunk-size is 1*DIGIT; after anything else the stream cannot be
    resynchronised, so the server answers 501 and closes."""
    for line in BAD_SIZES:
        sock, _ = server.connect()
        with sock:
            open_transaction(sock, f"alice@{DOMAIN}")
            sock.sendall(line + b"\r\nhelloNOOP\r\n")
            assert recv_reply(sock) == S501_BDAT, line
            assert recv_eof(sock) == b"", line
    server.settle(["alice"])
    assert server.count("alice") == 1          # the barrier only


# --- BDAT inside TLS --------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["starttls", "smtps"])
def test_bdat_inside_tls(start_server, tls_files, listener):
    server = start_tls_server(start_server, tls_files)
    content = tricky_message(msgid())
    if listener == "smtps":
        sock, _ = connect_smtps(server, tls_files.client_context())
    else:
        raw, _ = server.connect()
        sock = starttls(raw, tls_files.client_context())
    with sock:
        open_transaction(sock, f"alice@{DOMAIN}")
        assert QUEUED.fullmatch(send_chunks(sock, cut(content, 3, 64, 65)))
        assert command(sock, b"QUIT").startswith(b"221 ")
    assert_stored(server, "alice", content)
    [message] = server.mbox("alice")
    received = " ".join(message["Received"].split())
    assert "(using TLSv1." in received and " with ESMTPS id " in received, received


# --- a large message --------------------------------------------------------------------

def large_content(lines: int = 30_000) -> bytes:
    """~2.5 MB whose From-quoting and dots fall at every offset, plus a 300 kB line."""
    out = [f"Subject: large\r\nMessage-ID: {msgid()}\r\n\r\n".encode()]
    for i in range(lines):
        pad = b"p" * (i % 151)
        out.append((b"From line %d %s", b".dot %d %s", b">From %d%s", b"plain %d %s  ",
                    b"%d%s")[i % 5] % (i, pad) + b"\r\n")
        if i == lines // 2:
            out.append(b"y" * 300_000 + b"\r\n")
    return b"".join(out)


@pytest.mark.parametrize("server", [{"workers": 1}], indirect=True)
def test_a_large_message_in_chunks_is_spilled_to_disk_and_stored_intact(server):
    content = large_content()
    assert len(content) > 2 * SPILL_BYTES
    inside_crlf = content.index(b"\r\n", SPILL_BYTES + 10) + 1
    chunks = cut(content, 1000, inside_crlf, inside_crlf + 777_777)
    tmp = server.spool / ".ccsmtp" / "tmp"
    sock, _ = server.connect()
    with sock:
        open_transaction(sock, f"large@{DOMAIN}")
        for chunk in chunks[:-1]:
            sock.sendall(bdat(chunk))
            assert recv_reply(sock, timeout=30) == octets(len(chunk))
        # More than SPILL_BYTES have come: they are in a file, not in the worker.
        spilled = [tmp / name for name in os.listdir(tmp)]
        assert len(spilled) == 1 and spilled[0].stat().st_size >= SPILL_BYTES, spilled
        sock.sendall(bdat(chunks[-1], last=True))
        assert QUEUED.fullmatch(recv_reply(sock, timeout=30))
        assert command(sock, b"QUIT").startswith(b"221 ")
    assert_stored(server, "large", content)
    assert os.listdir(tmp) == []
    # The log's size counts the last chunk too (written into the spill file at commit).
    assert f"nrcpt=1, size={len(content)}" in server.stderr()


# --- timeout_data: a stalled DATA block or BDAT chunk (SPEC §5, §10) ---------------------

TIMEOUT_DATA_S = 2
TIMEOUT_COMMAND_S = 30
DEADLINES = f"timeout_command = {TIMEOUT_COMMAND_S}\ntimeout_data = {TIMEOUT_DATA_S}\n"


def stall(sock: socket.socket, opening: bytes, trickle: bytes) -> tuple[bytes, float]:
    """Send `opening`, then the bytes of `trickle` one every 0.4 s (nothing, if it is
    empty) until the server answers; returns (its answer and what followed, seconds
    from the opening)."""
    t0 = time.monotonic()
    sock.sendall(opening)
    sock.settimeout(0.4)
    reply = b""
    for i in range(100):
        if i < len(trickle):
            try:
                sock.send(trickle[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            chunk = sock.recv(1000)
        except socket.timeout:
            if time.monotonic() - t0 > TIMEOUT_COMMAND_S:
                break
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        reply += chunk
        if reply.endswith(b"\r\n"):
            break
    elapsed = time.monotonic() - t0
    return reply + recv_eof(sock, timeout=5), elapsed


def run_stalls(server: Server, cases: dict[str, tuple[bytes, bytes, bytes]],
               rcpt: str) -> dict[str, tuple[bytes, float]]:
    """Each case on a connection of its own, all at once: after MAIL and RCPT, a
    prelude (one command, answered before the clock starts), then stall()."""
    results: dict[str, tuple[bytes, float]] = {}

    def run(name: str, prelude: bytes, opening: bytes, trickle: bytes) -> None:
        sock, _ = server.connect(timeout=10)
        with sock:
            open_transaction(sock, rcpt)
            if prelude:
                sock.sendall(prelude)
                assert recv_reply(sock)[:3] in (b"250", b"354"), name
            results[name] = stall(sock, opening, trickle)

    threads = [threading.Thread(target=run, args=(name, *case)) for name, case in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_COMMAND_S + 15)
    assert set(results) == set(cases), f"cases that did not finish: {set(cases) - set(results)}"
    return results


def check_cut_off(server: Server, results: dict[str, tuple[bytes, float]], mailbox: str) -> None:
    for name, (reply, elapsed) in results.items():
        assert reply == S421_TIMEOUT, (name, reply)
        # Within about timeout_data of the opening, far from timeout_command.
        assert TIMEOUT_DATA_S - 0.5 < elapsed < TIMEOUT_COMMAND_S / 2, (name, elapsed)
    log = server.stderr()
    assert log.count("timeout after DATA from [127.0.0.1]") == len(results), log[-3000:]
    server.settle([mailbox])
    assert server.count(mailbox) == 1           # the barrier only: nothing half-stored


@pytest.mark.parametrize("server", [{"workers": 1, "config": DEADLINES}], indirect=True)
def test_a_stalled_data_block_is_cut_off_at_timeout_data_not_timeout_command(server):
    """The deadline fix: with timeout_data (2 s) shorter than timeout_command (30 s),
    a DATA block that stalls, or trickles one byte every 0.4 s, gets 421 4.4.2 after
    about timeout_data; the shorter deadline takes effect at once."""
    results = run_stalls(server, {
        "stall": (b"DATA\r\n", b"Subject: stalled\r\n\r\nhalf a li", b""),
        "trickle": (b"DATA\r\n", b"Subject: trickled\r\n\r\n", b"a line that never ends\r\n" * 8),
    }, f"stalled@{DOMAIN}")
    check_cut_off(server, results, "stalled")


@pytest.mark.parametrize("server", [{"workers": 1, "config": DEADLINES}], indirect=True)
def test_a_stalled_bdat_chunk_is_cut_off_at_timeout_data_not_timeout_command(server):
    results = run_stalls(server, {
        "stall": (b"", b"BDAT 1000 LAST\r\nSubject: stalled\r\n", b""),
        "trickle": (b"", b"BDAT 1000 LAST\r\n", b"x" * 100),
        "second-chunk": (bdat(b"Subject: two\r\n\r\n"), b"BDAT 50 LAST\r\nabc", b""),
    }, f"stalled@{DOMAIN}")
    check_cut_off(server, results, "stalled")


@pytest.mark.parametrize("server", [{"workers": 1, "config": DEADLINES}], indirect=True)
def test_between_chunks_the_command_timeout_applies(server):
    """timeout_data is for the octets of a chunk; waiting longer than it before the
    next BDAT command is waiting for a command."""
    content = tricky_message(msgid())
    first, rest = cut(content, 40)
    sock, _ = server.connect()
    with sock:
        open_transaction(sock, f"alice@{DOMAIN}")
        sock.sendall(bdat(first))
        assert recv_reply(sock) == octets(len(first))
        time.sleep(TIMEOUT_DATA_S + 1)
        sock.sendall(bdat(rest, last=True))
        assert QUEUED.fullmatch(recv_reply(sock))
        assert command(sock, b"QUIT").startswith(b"221 ")
    assert_stored(server, "alice", content)
