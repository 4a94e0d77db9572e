"""Tests for ccsmtp-send (prefork_smtp/tools/send.py), the client and load generator.

Most tests run the client's main() in-process against Sink, a small asyncio SMTP
server on a loopback port in a background thread that records what arrived and
can misbehave on request (no PIPELINING, no EHLO, refusals, silence); it speaks
TLS, implicit or after STARTTLS, with certificates from a trustme test CA (the
server side of ccsmtp's own TLS is not needed for the client's tests). One test
runs bin/ccsmtp-send as a subprocess (exit status, no traceback) and one sends
load to the real ccsmtp master and counts the messages in its mbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from prefork_smtp.tools import send

REPO = Path(__file__).resolve().parent.parent
SEND = REPO / "bin" / "ccsmtp-send"
MASTER = REPO / "bin" / "ccsmtp-master"
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$")


# --- the sink --------------------------------------------------------------------------

@dataclass
class Transaction:
    mail_from: bytes
    rcpts: list[bytes]
    wire: bytes = b""               # as received: dot-stuffed, without the final ".\r\n"

    @property
    def content(self) -> bytes:     # RFC 5321 §4.5.2: undo the dot-stuffing
        return re.sub(rb"(?m)^\.", b"", self.wire)

    def header(self, name: str) -> list[bytes]:
        head = self.content.split(b"\r\n\r\n", 1)[0]
        return re.findall(rb"(?im)^" + name.encode() + rb":[ \t]*(.*?)\r$", head + b"\r")


@dataclass
class SinkOptions:
    greeting: bytes = b"220 sink.test ESMTP"
    ehlo: bool = True                 # False: 502 to EHLO, the client must fall back to HELO
    pipelining: bool = True
    hold_until_data: bool = False     # withhold replies until DATA: a client that waits deadlocks
    refuse_every: int = 0             # 554 at the end of every Nth message
    silent_after_data: bool = False   # never answer the final dot
    greet_first: int = 0              # greet only this many connections (0: all)
    tls: ssl.SSLContext | None = None         # TLS from the first byte (smtps)
    starttls: ssl.SSLContext | None = None    # offer STARTTLS with this context
    refuse_starttls: bool = False     # offer it, then answer 454
    inject_after_starttls: bool = False   # a reply right behind the 220, before TLS


@dataclass
class Sink:
    options: SinkOptions = field(default_factory=SinkOptions)
    transactions: list[Transaction] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    connections: int = 0
    pipelined: int = 0                # commands that arrived before the previous reply went out
    content_reads: int = 0            # data_received calls while in DATA
    secure: list[bool] = field(default_factory=list)      # per command: under TLS?
    handshakes: list[bool] = field(default_factory=list)  # per handshake: a session resumed?
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> "Sink":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        self._server = future.result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self) -> asyncio.base_events.Server:
        return await self._loop.create_server(lambda: SinkSession(self), "127.0.0.1", 0,
                                              ssl=self.options.tls)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"


class SinkSession(asyncio.Protocol):
    def __init__(self, sink: Sink):
        self.sink = sink
        self.opt = sink.options
        self.buf = b""
        self.txn: Transaction | None = None
        self.in_data = False
        self.held: list[bytes] = []
        self.mute = False
        self.tls = False
        self.upgrading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.sink.connections += 1
        if self.opt.tls is not None:
            self.handshake_done(transport)
        if self.opt.greet_first and self.sink.connections > self.opt.greet_first:
            return                          # a server at its process limit: silence
        transport.write(self.opt.greeting + b"\r\n")

    def reply(self, line: bytes) -> None:
        if self.opt.hold_until_data and self.txn is not None and not line.startswith(b"354"):
            self.held.append(line)
            return
        self.transport.write(b"".join(held + b"\r\n" for held in self.held) + line + b"\r\n")
        self.held = []

    def handshake_done(self, transport: asyncio.BaseTransport) -> None:
        self.tls = True
        self.sink.handshakes.append(transport.get_extra_info("ssl_object").session_reused)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.upgrading:
            return        # under TLS already: read once start_tls() has handed us its transport
        if self.in_data:
            self.sink.content_reads += 1
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.txn.wire += self.buf[:end + 2]
                self.buf = self.buf[end + 5:]
                self.in_data = False
                self.end_of_data()
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep or self.mute:
                return
            self.buf = rest
            if rest:
                self.sink.pipelined += 1
            self.command(line)

    def end_of_data(self) -> None:
        txn, self.txn = self.txn, None
        sink = self.sink
        with sink._lock:
            sink.transactions.append(txn)
            number = len(sink.transactions)
        if self.opt.silent_after_data:
            self.mute = True                    # hear nothing more, say nothing more
            return
        if self.opt.refuse_every and number % self.opt.refuse_every == 0:
            self.reply(b"554 5.7.1 refused by the sink")
        else:
            self.reply(b"250 2.0.0 Ok: queued as SINK%d" % number)

    def starttls(self) -> None:
        if self.opt.starttls is None or self.tls:
            return self.reply(b"502 5.5.1 no STARTTLS here")
        if self.opt.refuse_starttls:
            return self.reply(b"454 4.7.0 TLS not available due to temporary reason")
        extra = b"250 2.0.0 injected\r\n" if self.opt.inject_after_starttls else b""
        self.transport.write(b"220 2.0.0 Ready to start TLS\r\n" + extra)
        self.transport.pause_reading()    # the next bytes are the client's handshake
        self.buf = b""                    # RFC 3207 §4.2: nothing said before TLS counts
        self.upgrading = True
        asyncio.ensure_future(self.upgrade(), loop=self.sink._loop)

    async def upgrade(self) -> None:
        try:
            transport = await self.sink._loop.start_tls(self.transport, self, self.opt.starttls,
                                                        server_side=True)
        except (OSError, asyncio.TimeoutError):
            self.transport.abort()        # e.g. the client did not trust our certificate
            return
        self.transport, self.upgrading = transport, False
        self.handshake_done(transport)
        self.data_received(b"")

    def command(self, line: bytes) -> None:
        self.sink.commands.append(line)
        self.sink.secure.append(self.tls)
        verb = line[:4].upper()
        if line.upper() == b"STARTTLS":
            return self.starttls()
        if verb == b"EHLO":
            if not self.opt.ehlo:
                return self.reply(b"502 5.5.1 no EHLO here")
            ext = [b"sink.test", b"SIZE 100000000", b"8BITMIME"]
            if self.opt.starttls is not None and not self.tls:
                ext.append(b"STARTTLS")
            if self.opt.pipelining:
                ext.append(b"PIPELINING")
            self.transport.write(b"".join(b"250-" + e + b"\r\n" for e in ext[:-1])
                                 + b"250 " + ext[-1] + b"\r\n")
        elif verb == b"HELO":
            self.reply(b"250 sink.test")
        elif verb == b"MAIL":
            address = line.split(b":", 1)[1].split(b">", 1)[0].lstrip(b" <")
            if address == b"bad@sender.test":
                return self.reply(b"550 5.7.1 sender refused")
            self.txn = Transaction(address, [])
            self.reply(b"250 2.1.0 Ok")
        elif verb == b"RCPT":
            address = line.split(b":", 1)[1].strip(b" <>")
            if self.txn is None:
                return self.reply(b"503 5.5.1 need MAIL")
            if address.startswith(b"refuse"):
                return self.reply(b"550 5.1.1 no such user")
            self.txn.rcpts.append(address)
            self.reply(b"250 2.1.5 Ok")
        elif verb == b"DATA":
            if self.txn is None or not self.txn.rcpts:
                self.txn = None
                return self.reply(b"554 5.5.1 no valid recipients")
            self.in_data = True
            self.reply(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"RSET":
            self.txn = None
            self.reply(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.transport.write(b"221 2.0.0 Bye\r\n")
            self.transport.close()
        else:
            self.reply(b"502 5.5.2 unknown command")


@pytest.fixture
def sink_factory():
    sinks: list[Sink] = []

    def make(**options) -> Sink:
        sink = Sink(SinkOptions(**options)).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture
def sink(sink_factory) -> Sink:
    return sink_factory()


def run_main(capsys, *argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        old = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            status = send.main(list(argv))
        finally:
            sys.stdin = old
    else:
        status = send.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- message preparation (no sockets) -------------------------------------------------------

@pytest.mark.parametrize("raw, wire", [
    (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
    (b".x\n..y\nz.\n", b"..x\r\n...y\r\nz.\r\n.\r\n"),
    (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"", b".\r\n"),
])
def test_to_wire_normalises_line_ends_and_dot_stuffs(raw, wire):
    assert send.to_wire(raw) == wire


@pytest.mark.parametrize("size", [0, 1, 2, 3, 77, 78, 79, 1024, 102400])
def test_filler_has_the_requested_size(size):
    body = send.filler(size)
    assert len(body) == size or (size == 1 and body == b"")
    assert body == b"" or body.endswith(b"\r\n")


@pytest.mark.parametrize("size", [1024, 102400, 5000])
def test_generated_messages_have_the_requested_size_and_unique_ids(size):
    factory = send.MessageFactory("run", "a@x.test", ["b@y.test"], size, None)
    first, second = factory.make(0), factory.make(12345)
    assert len(first) == len(second) == size + 3      # + the final ".\r\n"
    assert factory.message_size == size
    ids = [re.search(rb"Message-ID: (<[^>]+>)", m).group(1) for m in (first, second)]
    assert ids[0] != ids[1]


def test_template_message_id_is_replaced_and_folded_lines_removed():
    template = b"Subject: t\nMessage-ID:\n <old@x>\nX-A: 1\n\n.body\n"
    factory = send.MessageFactory("r", "a@x", ["b@y"], None, template)
    wire = factory.make(7)
    assert b"old@x" not in wire and wire.count(b"Message-ID:") == 1
    assert b"X-A: 1\r\n" in wire and b"\r\n\r\n..body\r\n.\r\n" in wire


@pytest.mark.parametrize("raw, kept_id", [
    (b"Subject: s\nMessage-Id: <mine@x>\n\nbody\n", True),
    (b"Subject: s\n\nbody\n", False),
    (b"just a body line\n", False),
    (b"Subject: only headers", False),
])
def test_single_message_gets_message_id_and_date_when_missing(raw, kept_id):
    wire = send.prepare_single(raw)
    head = wire.split(b"\r\n\r\n", 1)[0]
    assert len(re.findall(rb"(?im)^Message-ID:", head)) == 1
    assert len(re.findall(rb"(?im)^Date:", head)) == 1
    assert (b"<mine@x>" in head) == kept_id
    assert wire.endswith(b"\r\n.\r\n")


@pytest.mark.parametrize("server, expected", [
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("127.0.0.1", ("127.0.0.1", 25)),
    (":2527", ("127.0.0.1", 2527)),
    ("mail.example.org:587", ("mail.example.org", 587)),
    ("mail.example.org", ("mail.example.org", 25)),
    ("[::1]:2526", ("::1", 2526)),
    ("[::1]", ("::1", 25)),
    ("[2001:db8::25]:465", ("2001:db8::25", 465)),
])
def test_server_argument_forms(server, expected):
    # Parsing looks nothing up: no skip can hide a parsing bug here.
    assert send.parse_server(server) == expected


def test_tls_has_its_own_default_port():
    assert send.parse_server("", send.DEFAULT_TLS_PORT) == ("127.0.0.1", 465)
    assert send.parse_server("mx.example.org", 465) == ("mx.example.org", 465)
    assert send.parse_server("mx.example.org:25", 465) == ("mx.example.org", 25)


@pytest.mark.parametrize("server, sockaddr", [
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("127.0.0.1", ("127.0.0.1", 25)),
    pytest.param("[::1]:2526", ("::1", 2526), marks=pytest.mark.skipif(
        not socket.has_ipv6, reason="Python built without IPv6")),
])
def test_server_literals_resolve_without_dns(server, sockaddr):
    # Address literals never need a resolver, so any error here is a bug of ours.
    _, got = send.resolve(server)
    assert got[:2] == sockaddr


@pytest.mark.parametrize("server", ["::1", "[::1]:", "host:", "a:b:c", "h:0", "h:65536",
                                    "[::1", "h:2x"])
def test_malformed_server_arguments_are_usage_errors(server):
    with pytest.raises(send.SMTPClientError) as caught:
        send.parse_server(server)
    assert caught.value.kind == "usage"


def test_nearest_rank_percentiles():
    values = [i / 1000 for i in range(1, 101)]   # 1..100 ms
    p = send.percentiles(values)
    assert (round(p["p50"]), round(p["p99"]), round(p["max"])) == (50, 99, 100)


# --- send mode against the sink ----------------------------------------------------------

def test_send_mode_from_file_prints_final_reply(sink, capsys, tmp_path):
    message = tmp_path / "m.txt"
    message.write_bytes(b"Subject: hello\n\nline one\n.leading dot\n")
    status, out, err = run_main(capsys, str(message), "--from", "a@x.test", "--to", "b@y.test",
                                "--to", "c@y.test", "--server", sink.server, "--helo", "me.test")
    assert (status, err) == (0, "")
    assert out == "250 2.0.0 Ok: queued as SINK1\n"
    (txn,) = sink.transactions
    assert txn.mail_from == b"a@x.test" and txn.rcpts == [b"b@y.test", b"c@y.test"]
    assert txn.content.endswith(b"\r\n\r\nline one\r\n.leading dot\r\n")
    assert b"\r\n..leading dot\r\n" in txn.wire
    assert len(txn.header("Message-ID")) == 1 and len(txn.header("Date")) == 1
    assert sink.commands[0] == b"EHLO me.test"
    assert sink.commands[1].startswith(b"MAIL FROM:<a@x.test> SIZE=")
    assert sink.commands[-1] == b"QUIT"


def test_send_mode_reads_stdin(sink, capsys):
    status, out, _ = run_main(capsys, "--to", "b@y.test", "--server", sink.server,
                              stdin=b"Subject: s\n\nfrom stdin\n")
    assert status == 0 and QUEUED.match(out.strip().replace("SINK", "X"))
    assert sink.transactions[0].content.endswith(b"from stdin\r\n")


def test_pipelines_mail_rcpt_data_when_offered(sink_factory, capsys):
    # The sink answers nothing before DATA: a client that waited for MAIL's reply hangs.
    sink = sink_factory(hold_until_data=True)
    status, out, err = run_main(capsys, "--to", "b@y.test", "--to", "c@y.test", "--server",
                                sink.server, "--timeout", "3", stdin=b"Subject: s\n\nx\n")
    assert status == 0, err
    assert sink.pipelined >= 3          # RCPT, RCPT and DATA were queued behind MAIL


def test_one_command_at_a_time_without_pipelining(sink_factory, capsys):
    sink = sink_factory(pipelining=False)
    status, _, err = run_main(capsys, "--to", "b@y.test", "--to", "c@y.test",
                              "--server", sink.server, stdin=b"Subject: s\n\nx\n")
    assert status == 0, err
    assert sink.pipelined == 0
    assert [c.split(b":")[0] for c in sink.commands[1:]] == [
        b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA", b"QUIT"]


def test_falls_back_to_helo(sink_factory, capsys):
    sink = sink_factory(ehlo=False)
    status, _, err = run_main(capsys, "--to", "b@y.test", "--server", sink.server,
                              "--helo", "me.test", stdin=b"x\n")
    assert status == 0, err
    assert sink.commands[:2] == [b"EHLO me.test", b"HELO me.test"]
    assert b"SIZE=" not in sink.commands[2]        # no EHLO, no extensions


def test_refused_recipient_is_a_warning_and_exit_1(sink, capsys):
    status, out, err = run_main(capsys, "--to", "b@y.test", "--to", "refuse@y.test",
                                "--server", sink.server, stdin=b"x\n")
    assert status == 1
    assert out.startswith("250 ")
    assert err == "ccsmtp-send: warning: recipient <refuse@y.test> refused: 550 5.1.1 no such user\n"
    assert sink.transactions[0].rcpts == [b"b@y.test"]


@pytest.mark.parametrize("options, args, message", [
    ({}, ["--to", "refuse@y.test"], "recipient <refuse@y.test> refused: 550 5.1.1 no such user"),
    ({}, ["--to", "b@y.test", "--from", "bad@sender.test"], "sender <bad@sender.test> refused"),
    ({"greeting": b"554 5.3.2 go away"}, ["--to", "b@y.test"],
     "server refused the session: 554 5.3.2 go away"),
    ({"silent_after_data": True}, ["--to", "b@y.test", "--timeout", "0.3"],
     "no reply to the end of the message within 0.3 s"),
    ({"refuse_every": 1}, ["--to", "b@y.test"], "message refused: 554 5.7.1 refused by the sink"),
])
def test_failures_are_one_line_and_exit_1(sink_factory, capsys, options, args, message):
    sink = sink_factory(**options)
    status, out, err = run_main(capsys, *args, "--server", sink.server, stdin=b"x\n")
    assert status == 1 and out == ""
    assert err.startswith("ccsmtp-send: error: ") and message in err
    assert err.count("\n") == 1


def test_slow_sends_the_content_line_by_line(sink, capsys):
    started = time.monotonic()
    status, _, err = run_main(capsys, "--to", "b@y.test", "--server", sink.server,
                              "--slow", "0.05", stdin=b"Subject: s\n\n1\n2\n3\n")
    assert status == 0, err
    assert time.monotonic() - started >= 0.3      # 7 lines with Message-ID and Date, 0.05 s each
    assert sink.content_reads >= 5


def test_large_message_is_sent_whole(sink, capsys, tmp_path):
    body = b"".join(b"%07d " % i + b"y" * 70 + b"\n" for i in range(40000))   # ~3 MB
    message = tmp_path / "big"
    message.write_bytes(b"Subject: big\n\n" + body)
    status, _, err = run_main(capsys, str(message), "--to", "b@y.test", "--server", sink.server)
    assert status == 0, err
    assert sink.transactions[0].content.endswith(body.replace(b"\n", b"\r\n"))


# --- load mode against the sink ----------------------------------------------------------------

def test_load_sends_every_message_once_with_unique_ids(sink, capsys):
    status, out, err = run_main(capsys, "--count", "203", "--concurrency", "10", "--size", "2000",
                                "--per-connection", "7", "--to", "b@y.test",
                                "--server", sink.server, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert (result["accepted"], result["failed"], result["errors"]) == (203, 0, {})
    assert result["connections"] == sink.connections == 29          # ceil(203 / 7)
    ids = [t.header("Message-ID")[0] for t in sink.transactions]
    assert len(ids) == len(set(ids)) == 203
    assert all(result["run_id"].encode() in i for i in ids)
    assert {len(t.content) for t in sink.transactions} == {2000}
    assert result["message_size"] == 2000
    assert result["msgs_per_s"] > 0 and result["latency_ms"]["p99"] >= result["latency_ms"]["p50"]
    assert len(sink.commands) == 29 * 2 + 203 * 3     # EHLO + QUIT per connection; MAIL RCPT DATA


def test_rotate_gives_each_message_one_recipient_in_turn(sink, capsys):
    status, out, err = run_main(capsys, "--count", "9", "--concurrency", "2", "--rotate",
                                "--to", "a@y.test", "--to", "b@y.test", "--to", "c@y.test",
                                "--server", sink.server, "--json")
    assert status == 0, err
    rcpts = sorted(t.rcpts[0] for t in sink.transactions)
    assert rcpts == [b"a@y.test"] * 3 + [b"b@y.test"] * 3 + [b"c@y.test"] * 3
    assert all(len(t.rcpts) == 1 for t in sink.transactions)
    assert {t.header("To")[0] for t in sink.transactions} == {b"undisclosed-recipients:;"}


def test_load_text_report(sink, capsys):
    status, out, _ = run_main(capsys, "--count", "20", "--concurrency", "4", "--to", "b@y.test",
                              "--server", sink.server)
    assert status == 0
    assert re.search(r"^20 of 20 messages accepted by 127\.0\.0\.1:\d+ in [\d.]+ s: "
                     r"[\d.]+ msgs/s", out)
    assert "p50" in out and "errors: none" in out


def test_load_counts_refusals_and_keeps_going(sink_factory, capsys):
    sink = sink_factory(refuse_every=5)
    status, out, err = run_main(capsys, "--count", "50", "--concurrency", "3", "--per-connection",
                                "10", "--to", "b@y.test", "--server", sink.server, "--json")
    assert status == 1
    result = json.loads(out)
    assert (result["accepted"], result["failed"], result["errors"]) == (40, 10, {"message": 10})
    assert "554 5.7.1" in result["first_errors"]["message"]
    assert err == "ccsmtp-send: error: 10 of 50 messages failed\n"


def test_load_against_nothing_fails_in_one_line(capsys):
    status, out, err = run_main(capsys, "--count", "10", "--concurrency", "2", "--to", "b@y.test",
                                "--server", f"127.0.0.1:{free_port()}")
    assert status == 1
    assert err.endswith("Connection refused\n") and err.count("\n") == 1


def test_idle_connections_are_held_while_the_load_runs(sink, capsys):
    status, out, err = run_main(capsys, "--idle", "60", "--count", "5", "--to", "b@y.test",
                                "--server", sink.server, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["idle"] == {"requested": 60, "held": 60, "errors": {}}
    assert result["accepted"] == 5 and sink.connections == 65
    assert result["greeting_ms"]["max"] < 1000


def test_idle_counts_only_greeted_connections(sink_factory, capsys):
    sink = sink_factory(greet_first=20)
    status, out, err = run_main(capsys, "--idle", "100", "--timeout", "0.3", "--to", "b@y.test",
                                "--server", sink.server, "--json")
    result = json.loads(out)
    assert result["idle"]["held"] == 20 and result["idle"]["errors"] == {"timeout": 80}
    assert status == 1 and err == "ccsmtp-send: error: held 20 of 100 idle connections\n"


def test_idle_stops_trying_once_connections_hang(capsys):
    # A listener that never accepts: past its backlog, connects hang (SYNs dropped),
    # as they do at a server at its process limit. 2000 / 256 timeouts in a row
    # would take 8 s; the client gives up after one.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        started = time.monotonic()
        status, out, _ = run_main(capsys, "--idle", "2000", "--timeout", "0.3", "--to", "b@y.test",
                                  "--server", "127.0.0.1:%d" % listener.getsockname()[1], "--json")
        assert time.monotonic() - started < 4
    result = json.loads(out)
    assert status == 1 and result["idle"]["held"] == 0
    assert result["idle"]["errors"]["stalled"] > 1000


@pytest.mark.parametrize("args, message", [
    (["--server", "127.0.0.1:1"], "no recipient: give at least one --to ADDR"),
    (["--to", "b@y", "--size", "10"], "--size needs --count"),
    (["--to", "b@y", "--count", "x"], "argument --count: 'x' is not a whole number"),
    (["--to", "b y@z"], "--to 'b y@z': no spaces"),
    (["--to", "b@y", "--server", "h:99999"], "port 99999 is out of range"),
])
def test_usage_errors_exit_2_in_one_line(capsys, args, message):
    try:
        status = send.main(args)
    except SystemExit as e:           # argparse's own errors leave through SystemExit
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.count("\n") == 1 and err.startswith("ccsmtp-send: usage error:")


def test_script_connection_refused_without_traceback():
    port = free_port()
    proc = subprocess.run([sys.executable, str(SEND), "--to", "b@y", "--server",
                           f"127.0.0.1:{port}"], input=b"x\n", capture_output=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr == f"ccsmtp-send: error: cannot connect to 127.0.0.1:{port}: " \
                          f"Connection refused\n".encode()
    assert proc.stdout == b""


# --- TLS against the sink ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cafile(ca, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


def verbs(sink: Sink) -> list[tuple[bytes, bool]]:
    """Each command's verb, and whether it came under TLS."""
    return [(c.split(b":")[0].split(b" ")[0], tls) for c, tls in zip(sink.commands, sink.secure)]


def test_starttls_then_a_second_ehlo_then_the_mail_under_tls(sink_factory, ca, cafile, capsys):
    sink = sink_factory(starttls=server_context(ca))
    status, out, err = run_main(capsys, "--starttls", "--cafile", cafile, "--to", "b@y.test",
                                "--server", sink.server, "--helo", "me.test", "--json",
                                stdin=b"Subject: secret\n\nunder TLS\n")
    assert status == 0, err
    assert verbs(sink) == [(b"EHLO", False), (b"STARTTLS", False), (b"EHLO", True),
                           (b"MAIL", True), (b"RCPT", True), (b"DATA", True), (b"QUIT", True)]
    assert sink.commands[2] == b"EHLO me.test"
    result = json.loads(out)
    assert result["reply"].startswith("250 ") and result["tls"]["mode"] == "starttls"
    assert result["tls"]["version"] in ("TLSv1.2", "TLSv1.3") and result["tls"]["cipher"]
    assert sink.transactions[0].content.endswith(b"under TLS\r\n")


def test_implicit_tls_from_the_first_byte(sink_factory, ca, cafile, capsys):
    sink = sink_factory(tls=server_context(ca))
    status, out, err = run_main(capsys, "--tls", "--cafile", cafile, "--to", "b@y.test",
                                "--server", sink.server, stdin=b"x\n")
    assert status == 0, err
    assert out.startswith("250 2.0.0 Ok: queued as SINK1")
    assert verbs(sink) == [(b"EHLO", True), (b"MAIL", True), (b"RCPT", True), (b"DATA", True),
                           (b"QUIT", True)]
    assert len(sink.handshakes) == 1


@pytest.mark.parametrize("options, message", [
    ({}, "does not offer STARTTLS"),
    ({"refuse_starttls": True}, "STARTTLS refused: 454 4.7.0 TLS not available"),
    ({"inject_after_starttls": True}, "server sent more after its reply to STARTTLS"),
])
def test_starttls_that_cannot_happen_is_an_error_never_a_plain_send(
        sink_factory, ca, cafile, capsys, options, message):
    if "refuse_starttls" in options or "inject_after_starttls" in options:
        options = {**options, "starttls": server_context(ca)}
    sink = sink_factory(**options)
    status, out, err = run_main(capsys, "--starttls", "--cafile", cafile, "--to", "b@y.test",
                                "--server", sink.server, stdin=b"x\n")
    assert (status, out) == (1, "")
    assert err.startswith("ccsmtp-send: error: ") and message in err and err.count("\n") == 1
    assert [verb for verb, _ in verbs(sink)] == [b"EHLO", b"STARTTLS"][:len(sink.commands)]
    assert sink.transactions == [] and sink.handshakes == []


@pytest.mark.parametrize("mode", ["--tls", "--starttls"])
def test_an_untrusted_certificate_is_refused_unless_insecure(sink_factory, ca, capsys, mode):
    context = server_context(ca)
    sink = sink_factory(**({"tls": context} if mode == "--tls" else {"starttls": context}))
    status, out, err = run_main(capsys, mode, "--to", "b@y.test", "--server", sink.server,
                                stdin=b"x\n")   # the system's CAs do not know the test CA
    assert (status, out) == (1, "")
    assert f"TLS handshake with {sink.server} failed: certificate not trusted" in err
    assert "--cafile" in err and err.count("\n") == 1
    assert sink.transactions == []
    status, out, err = run_main(capsys, mode, "--insecure", "--to", "b@y.test",
                                "--server", sink.server, stdin=b"x\n")
    assert status == 0, err
    assert len(sink.transactions) == 1


def test_a_certificate_for_another_name_is_refused(sink_factory, ca, cafile, capsys):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mail.example.net").configure_cert(context)
    sink = sink_factory(tls=context)
    status, _, err = run_main(capsys, "--tls", "--cafile", cafile, "--to", "b@y.test",
                              "--server", sink.server, stdin=b"x\n")
    assert status == 1 and "certificate not trusted" in err and "127.0.0.1" in err


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", ["--tls", "--starttls"])
def test_load_over_tls_resumes_sessions_on_reconnects(sink_factory, ca, cafile, capsys, mode,
                                                      maximum):
    context = server_context(ca, maximum)
    sink = sink_factory(**({"tls": context} if mode == "--tls" else {"starttls": context}))
    status, out, err = run_main(capsys, mode, "--cafile", cafile, "--count", "30",
                                "--concurrency", "3", "--to", "b@y.test", "--server",
                                sink.server, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["accepted"] == 30 and result["connections"] == 30
    tls = result["tls"]
    # Each of the 3 senders' first handshake is a full one; every later one resumes
    # the session of that sender's previous connection.
    assert (tls["mode"], tls["handshakes"], tls["resumed"]) == (mode[2:], 30, 27)
    assert tls["resumed_fraction"] == pytest.approx(0.9)
    assert tls["versions"] == {maximum.name.replace("v1_", "v1."): 30}
    assert sink.handshakes.count(True) == 27           # the server saw it the same way
    if mode == "--starttls":
        assert [verb for verb, _ in verbs(sink)].count(b"STARTTLS") == 30
        assert all(tls for verb, tls in verbs(sink) if verb in (b"MAIL", b"RCPT", b"DATA"))


def test_load_over_tls_with_several_messages_per_connection_and_a_text_report(
        sink_factory, ca, cafile, capsys):
    sink = sink_factory(starttls=server_context(ca))
    status, out, err = run_main(capsys, "--starttls", "--cafile", cafile, "--count", "12",
                                "--concurrency", "2", "--per-connection", "3", "--to", "b@y.test",
                                "--server", sink.server)
    assert status == 0, err
    assert re.search(r"^TLS \(starttls\): 4 handshakes, 2 resumed a session \(50\.0%\); "
                     r"TLSv1\.3 4$", out, re.M), out
    assert len(sink.transactions) == 12


def test_load_with_starttls_refused_counts_every_message_failed(sink_factory, ca, cafile, capsys):
    sink = sink_factory(starttls=server_context(ca), refuse_starttls=True)
    status, out, err = run_main(capsys, "--starttls", "--cafile", cafile, "--count", "6",
                                "--concurrency", "2", "--to", "b@y.test", "--server",
                                sink.server, "--json")
    assert status == 1
    result = json.loads(out)
    assert (result["accepted"], result["errors"]) == (0, {"starttls": 6})
    assert sink.transactions == []


def test_idle_connections_over_tls_are_held_after_their_handshake(sink_factory, ca, cafile,
                                                                  capsys):
    sink = sink_factory(tls=server_context(ca))
    status, out, err = run_main(capsys, "--tls", "--cafile", cafile, "--idle", "10", "--count",
                                "2", "--to", "b@y.test", "--server", sink.server, "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["idle"] == {"requested": 10, "held": 10, "errors": {}}
    assert len(sink.handshakes) == 12 and result["tls"]["handshakes"] == 2


def test_plain_load_reports_no_tls(sink, capsys):
    status, out, _ = run_main(capsys, "--count", "2", "--to", "b@y.test", "--server",
                              sink.server, "--json")
    assert status == 0 and json.loads(out)["tls"] is None


@pytest.mark.parametrize("args, message", [
    (["--tls", "--starttls"], "argument --starttls: not allowed with argument --tls"),
    (["--cafile", "x.pem"], "--cafile needs --tls or --starttls"),
    (["--insecure"], "--insecure needs --tls or --starttls"),
    (["--tls", "--insecure", "--cafile", "x.pem"], "give --cafile or --insecure, not both"),
])
def test_tls_usage_errors_exit_2(capsys, args, message):
    try:
        status = send.main(["--to", "b@y", *args])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1


def test_an_unreadable_cafile_is_one_line_and_exit_1(capsys, tmp_path):
    status, _, err = run_main(capsys, "--tls", "--cafile", str(tmp_path / "none.pem"),
                              "--to", "b@y", "--server", f"127.0.0.1:{free_port()}")
    assert status == 1
    assert err == f"ccsmtp-send: error: cannot read --cafile {tmp_path / 'none.pem'}: " \
                  "No such file or directory\n"


# --- against the real server -------------------------------------------------------------------

@pytest.fixture
def ccsmtp_server():
    """bin/ccsmtp-master -w 1 on a loopback port; as root it runs as nobody."""
    base = tempfile.mkdtemp(prefix="ccsmtp-send-test-")
    os.chmod(base, 0o755)              # nobody must be able to reach the spool
    spool = os.path.join(base, "spool")
    port = free_port()
    args = [sys.executable, str(MASTER), "-w", "1", "-l", f"127.0.0.1:{port}", "-s", spool,
            "-d", "example.org", "--log-file", os.path.join(base, "log")]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
                if s.recv(100).startswith(b"220"):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ccsmtp-master did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        yield port, spool
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)


def test_load_against_ccsmtp_is_delivered_once_each(ccsmtp_server, capsys):
    port, spool = ccsmtp_server
    status, out, err = run_main(capsys, "--count", "120", "--concurrency", "6", "--per-connection",
                                "4", "--to", "alice@example.org", "--to", "bob@example.org",
                                "--server", f"127.0.0.1:{port}", "--json")
    assert status == 0, err
    assert json.loads(out)["accepted"] == 120
    for mailbox in ("alice", "bob"):
        path = Path(spool, mailbox)
        deadline = time.monotonic() + 10
        while True:
            data = path.read_bytes() if path.exists() else b""
            ids = re.findall(rb"(?im)^Message-ID: (<[^>]+>)$", data)
            if len(ids) >= 120 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(ids) == len(set(ids)) == 120, mailbox
        assert len(re.findall(rb"^From ", data, re.M)) == 120
