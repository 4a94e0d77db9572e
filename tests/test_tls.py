"""TLS against the real server (SPEC §8, RFC 3207, RFC 8314): the programs people use
(swaks, openssl s_client, smtplib, a private Postfix relaying through us), the STARTTLS
rules, commands injected after STARTTLS (CVE-2011-0411), hostile handshakes, the
certificate re-read on HUP, and what the log says of each session.

Every delivered message is checked in its mbox: `with ESMTPS` and `(using TLSv1.x with
cipher ...)` in its Received header. The server runs as `nobody` when the tests run as
root, so the certificate files are 0644 in a 0755 directory (conftest's tls_files).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import pytest

from conftest import (CLIENT_HELO, DOMAIN, IS_ROOT, SENDER, Server, TLSFiles,
                      connect_smtps, free_port, make_message, recv_eof, recv_reply,
                      replace_file, start_tls_server, starttls)

S220_TLS = b"220 2.0.0 Ready to start TLS\r\n"
S502_TLS = b"502 5.5.1 Error: command not implemented\r\n"
S554_TLS = b"554 5.5.1 Error: TLS already active\r\n"
S530_TLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
S503_NEED_HELO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
S503_NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
S503_IN_MAIL = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
S250_SENDER = b"250 2.1.0 Ok\r\n"
S250_RCPT = b"250 2.1.5 Ok\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\r\n")
QUIET_S = 0.3          # how long "nothing more arrives" is watched for


def msgid() -> str:
    return f"<{uuid.uuid4().hex}@tls.test>"


def one_line(header: str) -> str:
    return " ".join(str(header).split())


def assert_received_over_tls(message, helo: str = CLIENT_HELO) -> None:
    received = one_line(message["Received"])
    assert received.startswith(f"from {helo} (unknown [127.0.0.1]) (using TLSv1."), received
    assert re.search(r"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+/\d+ bits\)\) "
                     r"by \S+ \(ccsmtp\) with ESMTPS id ", received), received


def command(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return recv_reply(sock)


def ehlo_extensions(sock: socket.socket, helo: str = CLIENT_HELO) -> set[str]:
    reply = command(sock, f"EHLO {helo}".encode())
    lines = reply.decode().split("\r\n")[:-1]
    assert all(line.startswith("250") for line in lines), reply
    return {line[4:] for line in lines[1:]}


def deliver(sock: socket.socket, rcpt: str, message_id: str, sender: str = SENDER,
            helo: str | None = CLIENT_HELO) -> str:
    """(EHLO,) MAIL, RCPT, DATA on an open session; returns the queue ID."""
    if helo:
        ehlo_extensions(sock, helo)
    assert command(sock, f"MAIL FROM:<{sender}>".encode()) == S250_SENDER
    assert command(sock, f"RCPT TO:<{rcpt}>".encode()) == S250_RCPT
    assert command(sock, b"DATA").startswith(b"354 ")
    reply = command(sock, make_message(message_id, "over tls") + b".")
    match = QUEUED.fullmatch(reply)
    assert match, reply
    return match.group(1).decode()


def quit_(sock: socket.socket) -> None:
    assert command(sock, b"QUIT").startswith(b"221 ")
    sock.close()


def quiet(sock: socket.socket, seconds: float = QUIET_S) -> bytes:
    """What the server sends unasked within `seconds` (b"" if nothing; it may be a
    TLS socket, so this reads rather than peeks)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536)
    except (socket.timeout, ssl.SSLWantReadError):
        return b""


def log_since(server: Server, mark: int) -> list[str]:
    return server.stderr()[mark:].splitlines()


def wait_for_log(server: Server, needle: str, mark: int = 0, timeout: float = 10.0,
                 count: int = 1) -> list[str]:
    """Poll the server's log (from offset `mark`) until `count` lines contain needle."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log_since(server, mark)
        if sum(needle in line for line in lines) >= count:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} in the log after {timeout} s:\n"
                                 + "\n".join(lines[-30:]))
        time.sleep(0.05)


def peer_der(server: Server, tls: TLSFiles, via: str) -> bytes:
    """The certificate the server presents now, over STARTTLS or smtps."""
    if via == "smtps":
        sock, greeting = connect_smtps(server, tls.client_context())
    else:
        raw, greeting = server.connect()
        sock = starttls(raw, tls.client_context())
    with sock:
        assert greeting.startswith(b"220 "), greeting
        der = sock.getpeercert(binary_form=True)
        quit_(sock)
    return der


@pytest.fixture
def tls_server(start_server, tls_files) -> Server:
    return start_tls_server(start_server, tls_files)


# --- real clients: swaks, openssl s_client, smtplib, Postfix -----------------------------

def swaks_with_tls() -> str | None:
    """Why swaks cannot be used for TLS here (None: it can)."""
    if shutil.which("swaks") is None:
        return "swaks is not installed"
    support = subprocess.run(["swaks", "--support"], capture_output=True, text=True, timeout=30)
    if "=== TLS supported" not in support.stdout + support.stderr:
        return "swaks has no TLS here (Debian: libnet-ssleay-perl)"
    return None


@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
def test_swaks_delivers_over_starttls_and_implicit_tls(tls_server, tls_files, mode):
    why = swaks_with_tls()
    if why:
        pytest.skip(why)
    port = tls_server.port if mode == "--tls" else tls_server.smtps_port
    token = msgid()
    proc = subprocess.run(
        ["swaks", mode, "--tls-verify", "--tls-ca-path", str(tls_files.ca_file),
         "--server", "localhost", "--port", str(port), "--helo", "swaks.test",
         "--from", SENDER, "--to", f"alice@{DOMAIN}", "--header", f"Message-Id: {token}",
         "--body", "Sent by swaks over TLS.\n.leading dot"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "=== TLS started with cipher TLSv1." in proc.stdout, proc.stdout
    assert re.search(r"<~ +250 2\.0\.0 Ok: queued as", proc.stdout), proc.stdout
    [message] = tls_server.wait_for_messages("alice", 1)
    assert message["Message-ID"] == token
    assert_received_over_tls(message, "swaks.test")
    assert ".leading dot" in message.get_payload()


class LineReader:
    """Lines from a child's stdout with a deadline (select, no threads)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.buf = b""

    def reply(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        out = b""
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                out += line + b"\n"
                if re.match(rb"\d{3} ", line):
                    return out
            left = deadline - time.monotonic()
            assert left > 0, f"no complete reply from s_client within {timeout} s: {out!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"s_client closed its output after {out!r}"
                self.buf += chunk


def s_client(tls: TLSFiles, port: int, starttls_: bool) -> subprocess.Popen:
    # -quiet: no session dump, and lines starting with R or Q (RCPT, QUIT) are not
    # s_client commands; -crlf: our lines go out with CRLF; the name and chain are
    # verified against the test CA.
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-crlf",
            "-CAfile", str(tls.ca_file), "-verify_return_error", "-verify_hostname", "localhost",
            "-servername", "localhost"]
    if starttls_:
        args += ["-starttls", "smtp", "-name", "s-client.test"]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("listener", ["starttls", "smtps"])
def test_openssl_s_client_scripted_dialogue(tls_server, tls_files, listener):
    """A dialogue typed into s_client's stdin, one line per reply, as a person
    checking a server does. With -starttls smtp, s_client does EHLO and STARTTLS
    itself; our first line reaches the server right after the handshake."""
    port = tls_server.port if listener == "starttls" else tls_server.smtps_port
    proc = s_client(tls_files, port, starttls_=listener == "starttls")
    lines = LineReader(proc)
    token = msgid()

    def say(line: str, expect: bytes) -> bytes:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
        reply = lines.reply()
        assert reply.startswith(expect), (line, reply)
        return reply

    try:
        if listener == "smtps":
            assert lines.reply().startswith(b"220 "), "no greeting after the handshake"
        extensions = say("EHLO s-client.test", b"250-")
        assert b"STARTTLS" not in extensions and b"CHUNKING" in extensions, extensions
        say(f"MAIL FROM:<{SENDER}>", b"250 2.1.0")
        say(f"RCPT TO:<bob@{DOMAIN}>", b"250 2.1.5")
        say("DATA", b"354 ")
        body = make_message(token, "typed into s_client").decode().replace("\r\n", "\n")
        say(body + ".", b"250 2.0.0 Ok: queued as ")
        say("QUIT", b"221 ")
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    [message] = tls_server.wait_for_messages("bob", 1)
    assert message["Message-ID"] == token
    assert_received_over_tls(message, "s-client.test")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_pipelining_the_whole_transaction(tls_server, tls_files):
    """Everything on stdin at once: s_client sends it in one go the moment the
    handshake is done, in the same segment as its Finished or right behind it."""
    token = msgid()
    script = (f"EHLO s-client.test\nMAIL FROM:<{SENDER}>\nRCPT TO:<carol@{DOMAIN}>\nDATA\n"
              + make_message(token).decode().replace("\r\n", "\n") + ".\nQUIT\n")
    proc = s_client(tls_files, tls_server.port, starttls_=True)
    out, err = proc.communicate(script.encode(), timeout=20)
    assert proc.returncode == 0, err
    replies = re.findall(rb"^(\d{3}) ", out, re.MULTILINE)
    assert replies == [b"250", b"250", b"250", b"354", b"250", b"221"], out
    [message] = tls_server.wait_for_messages("carol", 1)
    assert message["Message-ID"] == token
    assert_received_over_tls(message, "s-client.test")


def test_smtplib_starttls_verifies_the_certificate_and_delivers(tls_server, tls_files):
    token = msgid()
    with smtplib.SMTP(tls_server.host, tls_server.port, local_hostname="smtplib.test",
                      timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls") and client.has_extn("chunking")
        code, _ = client.starttls(context=tls_files.client_context())   # checks 127.0.0.1
        assert code == 220
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.has_extn("chunking") and client.has_extn("pipelining")
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.sendmail(SENDER, [f"dave@{DOMAIN}"], make_message(token))
    [message] = tls_server.wait_for_messages("dave", 1)
    assert message["Message-ID"] == token
    assert_received_over_tls(message, "smtplib.test")


def test_smtplib_smtp_ssl_on_the_smtps_listener(tls_server, tls_files):
    token = msgid()
    with smtplib.SMTP_SSL(tls_server.host, tls_server.smtps_port, local_hostname="smtplib.test",
                          context=tls_files.client_context(), timeout=10) as client:
        code, _ = client.ehlo()
        assert code == 250 and not client.has_extn("starttls")
        code, reply = client.docmd("STARTTLS")
        assert (code, reply) == (554, b"5.5.1 Error: TLS already active")
        client.sendmail(SENDER, [f"erin@{DOMAIN}"], make_message(token))
    [message] = tls_server.wait_for_messages("erin", 1)
    assert message["Message-ID"] == token
    assert_received_over_tls(message, "smtplib.test")


def old_protocol_context(tls: TLSFiles, newest: ssl.TLSVersion) -> ssl.SSLContext:
    context = tls.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TLS 1.0/1.1 on purpose
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = newest
    context.set_ciphers("DEFAULT:@SECLEVEL=0")    # let the client offer what it may
    return context


def test_tls_1_2_is_accepted_and_older_protocols_are_refused(tls_server, tls_files):
    """SPEC §8: TLS 1.2 or newer. A TLS 1.2 client delivers (and the Received header
    names TLSv1.2 and its cipher); a client that offers at most TLS 1.1 is refused
    in the handshake, with one log line."""
    token = msgid()
    with smtplib.SMTP_SSL(tls_server.host, tls_server.smtps_port, local_hostname="tls12.test",
                          context=old_protocol_context(tls_files, ssl.TLSVersion.TLSv1_2),
                          timeout=10) as client:
        assert client.sock.version() == "TLSv1.2"
        client.sendmail(SENDER, [f"alice@{DOMAIN}"], make_message(token))
    [message] = tls_server.wait_for_messages("alice", 1)
    assert message["Message-ID"] == token
    assert_received_over_tls(message, "tls12.test")
    assert "(using TLSv1.2 with cipher ECDHE-" in one_line(message["Received"])

    mark = len(tls_server.stderr())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = old_protocol_context(tls_files, ssl.TLSVersion.TLSv1_1)
    for listener in ("smtps", "starttls"):
        port = tls_server.smtps_port if listener == "smtps" else tls_server.port
        with socket.create_connection((tls_server.host, port), timeout=5) as raw:
            if listener == "starttls":
                recv_reply(raw)
                assert command(raw, b"EHLO old.test").startswith(b"250-")
                assert command(raw, b"STARTTLS") == S220_TLS
            with pytest.raises((ssl.SSLError, ConnectionError)):
                context.wrap_socket(raw, server_hostname="localhost")
    lines = wait_for_log(tls_server, "TLS handshake failed", mark, count=2)
    time.sleep(0.2)
    failures = [line for line in log_since(tls_server, mark) if "TLS handshake failed" in line]
    assert len(failures) == 2 and all(line.endswith(": UNSUPPORTED_PROTOCOL")
                                      for line in failures), lines


class PrivatePostfix:
    """A Postfix instance of its own (`postfix -c DIR`): queue and data under DIR,
    smtpd on a loopback port, every message relayed to relayhost over TLS that it
    insists on (smtp_tls_security_level = encrypt). /etc/postfix is never read
    for anything but the program locations (postconf -d)."""

    MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

    def __init__(self, base: Path, relay_port: int, ca_file: Path):
        self.dir = base
        base.mkdir(mode=0o755)
        self.conf, queue, data = (base / d for d in ("conf", "queue", "data"))
        for d in (self.conf, queue, data):
            d.mkdir(mode=0o755)
        shutil.chown(data, "postfix")
        self.port = free_port()
        self.maillog = base / "maillog"
        where = {key: _postconf_default(key) for key in
                 ("command_directory", "daemon_directory", "shlib_directory")}
        (self.conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = {where["command_directory"]}
daemon_directory = {where["daemon_directory"]}
shlib_directory = {where["shlib_directory"]}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydomain = test
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{relay_port}
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca_file}
smtp_tls_loglevel = 1
alias_maps =
alias_database =
local_recipient_maps =
maillog_file_prefixes = {base}
maillog_file = {self.maillog}
biff = no
""")
        (self.conf / "master.cf").write_text(self.MASTER_CF.format(port=self.port))

    def postfix(self, action: str) -> None:
        result = subprocess.run(["postfix", "-c", str(self.conf), action], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert result.returncode == 0, f"postfix {action}: {result.stderr}\n{self.log()}"

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def sendmail(self, sender: str, rcpt: str, content: bytes) -> None:
        result = subprocess.run(["sendmail", "-C", str(self.conf), "-f", sender, rcpt],
                                input=content, capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr


def _postconf_default(key: str) -> str:
    return subprocess.run(["postconf", "-dh", key], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


@pytest.mark.skipif(not IS_ROOT, reason="Postfix's master runs as root")
@pytest.mark.skipif(shutil.which("postfix") is None or shutil.which("sendmail") is None,
                    reason="postfix is not installed")
def test_a_private_postfix_relays_to_us_with_tls_required(tls_server, tls_files, work_dir):
    postfix = PrivatePostfix(work_dir / "postfix", tls_server.port, tls_files.ca_file)
    postfix.postfix("start")
    try:
        by_sendmail, by_smtp = msgid(), msgid()
        postfix.sendmail("pf@remote.test", f"frank@{DOMAIN}",
                         make_message(by_sendmail, "via sendmail",
                                      "From the postfix queue\r\n.dot\r\n").replace(b"\r\n", b"\n"))
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as client:
            client.sendmail("pf@remote.test", [f"frank@{DOMAIN}"],
                            make_message(by_smtp, "via postfix smtpd"))
        messages = tls_server.wait_for_messages("frank", 2, timeout=30)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- postfix maillog:\n{postfix.log()[-3000:]}") from None
    finally:
        postfix.postfix("stop")
    assert sorted(m["Message-ID"] for m in messages) == sorted([by_sendmail, by_smtp])
    for message in messages:
        assert_received_over_tls(message, "postfix.test")
        assert message.get_from().startswith("pf@remote.test ")
    sent = re.findall(r"status=sent \(250 2\.0\.0 Ok: queued as ", postfix.log())
    assert len(sent) == 2, postfix.log()
    # Postfix checked our chain against the test CA (it would say Untrusted otherwise).
    assert re.search(rf"Trusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:"
                     rf"{tls_server.port}: TLSv1\.[23] with cipher", postfix.log()), postfix.log()
    by_sendmail_message = next(m for m in messages if m["Message-ID"] == by_sendmail)
    assert ">From the postfix queue\n.dot\n" in by_sendmail_message.as_string()


# --- STARTTLS rules (SPEC §8) -------------------------------------------------------------

def test_starttls_is_offered_only_with_a_certificate_and_never_inside_tls(
        start_server, tls_files):
    with_cert = start_tls_server(start_server, tls_files)
    sock, _ = with_cert.connect()
    assert "STARTTLS" in ehlo_extensions(sock)
    tls = starttls(sock, tls_files.client_context())
    extensions = ehlo_extensions(tls)
    assert "STARTTLS" not in extensions
    assert {"CHUNKING", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= extensions
    assert command(tls, b"STARTTLS") == S554_TLS          # a second STARTTLS
    assert command(tls, b"NOOP") == b"250 2.0.0 Ok\r\n"   # and the session goes on
    quit_(tls)
    smtps, _ = connect_smtps(with_cert, tls_files.client_context())
    assert "STARTTLS" not in ehlo_extensions(smtps)
    assert command(smtps, b"STARTTLS") == S554_TLS
    quit_(smtps)

    plain = start_server(workers=1)
    sock, _ = plain.connect()
    extensions = ehlo_extensions(sock)
    assert "STARTTLS" not in extensions and "CHUNKING" in extensions
    assert command(sock, b"STARTTLS") == S502_TLS
    # Nothing was handed to TLS: the session goes on in plain text.
    assert deliver(sock, f"alice@{DOMAIN}", msgid(), helo=None)
    quit_(sock)
    [message] = plain.wait_for_messages("alice", 1)
    assert " with ESMTP id " in one_line(message["Received"])
    assert "using" not in message["Received"]


def test_the_handshake_forgets_everything_said_before_it(tls_server, tls_files):
    sock, _ = tls_server.connect()
    assert "STARTTLS" in ehlo_extensions(sock, "before.test")
    assert command(sock, b"MAIL FROM:<before@remote.test>") == S250_SENDER
    assert command(sock, b"STARTTLS") == S503_IN_MAIL     # not inside a transaction
    assert command(sock, b"RSET") == b"250 2.0.0 Ok\r\n"
    assert command(sock, b"HELO before.test") == b"250 " + tls_server.greeting.split()[1] + b"\r\n"
    sock.sendall(b"STARTTLS\r\n")
    assert recv_reply(sock) == S220_TLS
    tls = tls_files.client_context().wrap_socket(sock, server_hostname="localhost")
    assert quiet(tls) == b""                 # no second greeting: the client speaks first
    # HELO is forgotten: MAIL and RCPT need EHLO again.
    assert command(tls, f"MAIL FROM:<{SENDER}>".encode()) == S503_NEED_HELO
    assert command(tls, f"RCPT TO:<alice@{DOMAIN}>".encode()) == S503_NEED_HELO
    assert "STARTTLS" not in ehlo_extensions(tls, "after.test")
    assert command(tls, f"RCPT TO:<alice@{DOMAIN}>".encode()) == S503_NEED_MAIL
    token = msgid()
    deliver(tls, f"alice@{DOMAIN}", token, helo=None)
    quit_(tls)
    [message] = tls_server.wait_for_messages("alice", 1)
    assert message["Message-ID"] == token
    assert message["Return-Path"] == f"<{SENDER}>"
    assert_received_over_tls(message, "after.test")    # the HELO said inside TLS


def test_tls_required_refuses_mail_in_plain_text_only(start_server, tls_files):
    server = start_tls_server(start_server, tls_files, config="tls_required = true\n")
    sock, _ = server.connect()
    assert "STARTTLS" in ehlo_extensions(sock)
    assert command(sock, f"MAIL FROM:<{SENDER}>".encode()) == S530_TLS
    assert command(sock, f"RCPT TO:<alice@{DOMAIN}>".encode()) == S503_NEED_MAIL
    tls = starttls(sock, tls_files.client_context())
    first = msgid()
    deliver(tls, f"alice@{DOMAIN}", first)
    quit_(tls)
    smtps, _ = connect_smtps(server, tls_files.client_context())
    second = msgid()
    deliver(smtps, f"alice@{DOMAIN}", second)
    quit_(smtps)
    messages = server.wait_for_messages("alice", 2)
    assert [m["Message-ID"] for m in messages] == [first, second]
    for message in messages:
        assert_received_over_tls(message)


# --- commands injected after STARTTLS (CVE-2011-0411) -------------------------------------

INJECTIONS = {
    # The classic: a man in the middle appends commands to the client's STARTTLS.
    "rset-mail": b"RSET\r\nMAIL FROM:<evil@x.test>\r\n",
    # A whole restart: executed after the handshake, RCPT would be 250 and not 503.
    "ehlo-mail-rcpt": (b"EHLO evil.test\r\nMAIL FROM:<evil@x.test>\r\n"
                       b"RCPT TO:<alice@example.org>\r\n"),
    "bare-lf": b"EHLO evil.test\nMAIL FROM:<evil@x.test>\n",
    # Even the client's own EHLO in the same segment is never read.
    "ehlo-only": b"EHLO client.test\r\n",
}


@pytest.mark.parametrize("name", INJECTIONS)
def test_commands_sent_with_starttls_are_never_executed(tls_server, tls_files, name):
    injected = INJECTIONS[name]
    sock, _ = tls_server.connect()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert "STARTTLS" in ehlo_extensions(sock)
    mark = len(tls_server.stderr())
    # One send() of a few dozen bytes with Nagle off: one TCP segment, read by the
    # server in one recv() together with the STARTTLS line.
    assert sock.send(b"STARTTLS\r\n" + injected) == len(b"STARTTLS\r\n" + injected)
    assert recv_reply(sock) == S220_TLS
    # Executed in plain text, their replies would follow the 220 (and the handshake
    # below would fail on them).
    assert quiet(sock) == b""
    tls = tls_files.client_context().wrap_socket(sock, server_hostname="localhost")
    # Executed after the handshake, their replies would come now, unasked.
    assert quiet(tls) == b""
    assert command(tls, f"RCPT TO:<alice@{DOMAIN}>".encode()) == S503_NEED_HELO
    assert command(tls, b"DATA") == S503_NEED_HELO
    assert "STARTTLS" not in ehlo_extensions(tls)
    assert command(tls, f"RCPT TO:<alice@{DOMAIN}>".encode()) == S503_NEED_MAIL
    token = msgid()
    deliver(tls, f"alice@{DOMAIN}", token, helo=None)
    quit_(tls)
    [message] = tls_server.wait_for_messages("alice", 1)
    assert (message["Message-ID"], message["Return-Path"]) == (token, f"<{SENDER}>")
    lines = wait_for_log(tls_server, "disconnect from", mark)
    discarded = [line for line in lines if "after STARTTLS" in line]
    assert len(discarded) == 1 and f"discarded {len(injected)} byte(s) sent after STARTTLS" \
        in discarded[0], lines
    assert not any("evil" in line for line in lines), lines


def test_commands_sent_behind_starttls_in_a_later_segment_are_taken_for_tls(
        tls_server, tls_files):
    """Bytes that arrive after the server stopped reading plain text go to the TLS
    layer, which sees no ClientHello in them: the connection ends, nothing is run."""
    sock, _ = tls_server.connect()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert "STARTTLS" in ehlo_extensions(sock)
    mark = len(tls_server.stderr())
    sock.sendall(b"STARTTLS\r\n")
    time.sleep(0.2)     # the server has read the line and stopped reading plain text
    sock.sendall(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<alice@example.org>\r\n")
    assert recv_reply(sock) == S220_TLS
    tail = recv_eof(sock)
    assert not re.search(rb"^\d{3} ", tail, re.MULTILINE), tail   # no SMTP reply: a TLS alert at most
    sock.close()
    lines = wait_for_log(tls_server, "disconnect from", mark)
    assert sum("TLS handshake failed with [127.0.0.1]" in line for line in lines) == 1, lines
    assert not any("evil" in line for line in lines), lines


class BioClient:
    """A TLS client on memory BIOs, so that the test decides what goes into which
    segment; recv/settimeout/sendall as recv_reply() needs them."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake_then(self, first: bytes) -> None:
        """Handshake, then send the client's Finished and `first` in one segment."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := self.outgoing.read():
                    self.sock.sendall(pending)
                self._fill()
        self.tls.write(first)
        self.sock.sendall(self.outgoing.read())

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.incoming.write(chunk)

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLZeroReturnError:
                return b""

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())


@pytest.mark.parametrize("listener", ["starttls", "smtps"])
def test_the_first_command_in_the_segment_that_ends_the_handshake_is_answered(
        tls_server, tls_files, listener):
    """A client's first command can arrive with its TLS Finished (s_client and
    Postfix send it right behind). Regression: the session dropped it, because the
    TLS layer hands it over before start_tls() returns, and the client waited for
    an answer until the command timeout."""
    port = tls_server.port if listener == "starttls" else tls_server.smtps_port
    sock = socket.create_connection((tls_server.host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        if listener == "starttls":
            recv_reply(sock)
            assert command(sock, b"EHLO client.test").startswith(b"250-")
            assert command(sock, b"STARTTLS") == S220_TLS
        client = BioClient(sock, tls_files.client_context())
        client.handshake_then(b"EHLO early.test\r\n")
        if listener == "smtps":
            assert recv_reply(client).startswith(b"220 ")   # greeting first, then the answer
        reply = recv_reply(client, timeout=5)
        assert reply.startswith(b"250-") and b"CHUNKING" in reply, reply
        token = msgid()
        deliver(client, f"alice@{DOMAIN}", token, helo=None)
        assert command(client, b"QUIT").startswith(b"221 ")
    [message] = tls_server.wait_for_messages("alice", 1)
    assert message["Message-ID"] == token
    assert_received_over_tls(message, "early.test")


# --- hostile handshakes (SPEC §8: one log line, never a traceback) ------------------------

def client_hello(tls: TLSFiles) -> bytes:
    """The first flight of a real client: a complete ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100
    return hello


def open_for_handshake(server: Server, listener: str, source: str) -> socket.socket:
    """A connection from `source` at the point where the server expects a ClientHello."""
    port = server.port if listener == "starttls" else server.smtps_port
    sock = socket.create_connection((server.host, port), timeout=10, source_address=(source, 0))
    if listener == "starttls":
        recv_reply(sock)
        assert command(sock, b"EHLO client.test").startswith(b"250-")
        assert command(sock, b"STARTTLS") == S220_TLS
    return sock


def garbage(sock: socket.socket, hello: bytes) -> None:
    sock.sendall(b"EHLO not-a-client-hello.test\r\n" * 4)


def half_hello_then_close(sock: socket.socket, hello: bytes) -> None:
    sock.sendall(hello[:60])
    time.sleep(0.2)
    sock.close()


def hello_then_close(sock: socket.socket, hello: bytes) -> None:
    sock.sendall(hello)
    sock.recv(65536)          # the server's answer arrives; the client leaves
    sock.close()


def silence(sock: socket.socket, hello: bytes) -> None:
    pass                      # the handshake's timeout (the command timeout) ends it


def half_hello_then_silence(sock: socket.socket, hello: bytes) -> None:
    sock.sendall(hello[:60])


HOSTILE = {
    # name: (what the client does, the reason logged)
    "garbage": (garbage, "WRONG_VERSION_NUMBER"),
    "half-hello-then-close": (half_hello_then_close, "connection closed by client"),
    "hello-then-close": (hello_then_close, "connection closed by client"),
    "silence": (silence, "timed out"),
    "half-hello-then-silence": (half_hello_then_silence, "timed out"),
}
HANDSHAKE_TIMEOUT_S = 3


@pytest.mark.parametrize("listener", ["starttls", "smtps"])
def test_hostile_handshakes_cost_one_log_line_and_nothing_else(start_server, tls_files, listener):
    """Garbage instead of a ClientHello, a handshake abandoned half-way or after the
    server's answer, a client that never finishes (the handshake has the command
    timeout): each ends its connection with exactly one log line and no traceback,
    the worker serves on (none is replaced) and a TLS transaction right after
    succeeds. The attacks run at once, each from an address of its own."""
    server = start_tls_server(start_server, tls_files,
                              config=f"timeout_command = {HANDSHAKE_TIMEOUT_S}\n")
    workers = {p.pid for p in server.wait_for_processes("ccsmtp: worker", 1)}
    hello = client_hello(tls_files)
    # Meanwhile an idle TLS session: the command timeout ends it with 421, over TLS.
    if listener == "smtps":
        idle, _ = connect_smtps(server, tls_files.client_context())
    else:
        raw, _ = server.connect()
        idle = starttls(raw, tls_files.client_context())
    ehlo_extensions(idle)
    sources = {name: f"127.0.0.{10 + n}" for n, name in enumerate(HOSTILE)}
    socks = {name: open_for_handshake(server, listener, sources[name]) for name in HOSTILE}
    t0 = time.monotonic()
    for name, (attack, _) in HOSTILE.items():
        attack(socks[name], hello)
    for name, sock in socks.items():
        if sock.fileno() < 0:
            continue            # the client closed it
        try:
            leftover = recv_eof(sock, timeout=HANDSHAKE_TIMEOUT_S * 4)
        except ConnectionResetError:
            leftover = b""
        sock.close()
        assert not re.search(rb"^\d{3} ", leftover, re.MULTILINE), (name, leftover)
        if HOSTILE[name][1] == "timed out":
            elapsed = time.monotonic() - t0
            assert HANDSHAKE_TIMEOUT_S - 0.5 < elapsed < HANDSHAKE_TIMEOUT_S * 3, (name, elapsed)
    assert recv_reply(idle, timeout=HANDSHAKE_TIMEOUT_S * 4).startswith(b"421 4.4.2 ")
    assert recv_eof(idle) == b""       # after the server's close_notify
    idle.close()
    for name in HOSTILE:
        wait_for_log(server, f"TLS handshake failed with [{sources[name]}]")
    time.sleep(0.2)             # anything a failure logs after its line
    log = server.stderr().splitlines()
    for name, (_, reason) in HOSTILE.items():
        about = [line for line in log if f"[{sources[name]}]" in line]
        failures = [line for line in about if "TLS handshake failed" in line]
        assert len(failures) == 1 and failures[0].endswith(f": {reason}"), (name, about)
        others = [line for line in about if line not in failures]
        expected = [f"connect from [{sources[name]}]" + (" to smtps" if listener == "smtps" else "")]
        if listener == "starttls":   # the session had begun: its own last line
            expected.append(f"disconnect from [{sources[name]}] commands=2 messages=0")
        assert [line.split("]: ", 1)[1] for line in others] == expected, (name, about)
    noise = [line for line in log if re.search(r"warning|error|exception|Traceback", line, re.I)]
    assert noise == [], noise
    # The same worker serves the next client, over TLS.
    token = msgid()
    if listener == "smtps":
        fresh, _ = connect_smtps(server, tls_files.client_context())
    else:
        raw, _ = server.connect()
        fresh = starttls(raw, tls_files.client_context())
    deliver(fresh, f"alice@{DOMAIN}", token)
    quit_(fresh)
    [message] = server.wait_for_messages("alice", 1)
    assert_received_over_tls(message)
    assert {p.pid for p in server.workers()} == workers, server.stderr()[-3000:]


# --- what the log says (one line per session, one per message) ---------------------------

def test_log_lines_say_whether_a_session_was_encrypted(tls_server, tls_files):
    """The disconnect line and the queued line end with tls=TLSv1.x for a session
    that was encrypted (STARTTLS or smtps), and say nothing of TLS for one that was not."""
    queue_ids = {}
    for n, how in enumerate(("plain", "starttls", "smtps"), start=2):
        source = (f"127.0.0.{n}", 0)
        port = tls_server.smtps_port if how == "smtps" else tls_server.port
        sock = socket.create_connection((tls_server.host, port), timeout=5, source_address=source)
        if how == "smtps":
            sock = tls_files.client_context().wrap_socket(sock, server_hostname="localhost")
        recv_reply(sock)
        if how == "starttls":
            sock = starttls(sock, tls_files.client_context())
        queue_ids[how] = deliver(sock, f"alice@{DOMAIN}", msgid())
        quit_(sock)
    lines = wait_for_log(tls_server, "disconnect from [127.0.0.4]")
    for n, how in enumerate(("plain", "starttls", "smtps"), start=2):
        [queued] = [line for line in lines if f": {queue_ids[how]}: client=" in line]
        [disconnect] = [line for line in lines if f"disconnect from [127.0.0.{n}] " in line]
        assert f"client=[127.0.0.{n}], helo={CLIENT_HELO}, from=<{SENDER}>, nrcpt=1" in queued
        assert "messages=1" in disconnect, disconnect
        if how == "plain":
            assert "tls=" not in queued and "tls=" not in disconnect, (queued, disconnect)
        else:
            assert re.search(r", tls=TLSv1\.[23]$", queued), queued
            assert re.search(r" tls=TLSv1\.[23]$", disconnect), disconnect


# --- the certificate is read again on HUP (SPEC §4, §8) -----------------------------------

def wait_for_certificate(server: Server, tls: TLSFiles, der: bytes, timeout: float = 10.0) -> None:
    """Until new connections (both listeners, several in a row) get `der`: after HUP
    the old workers may still take a connection or two while they retire."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 4:
        via = ("starttls", "smtps")[streak % 2]
        if peer_der(server, tls, via) == der:
            streak += 1
        else:
            streak = 0
            assert time.monotonic() < deadline, f"still the old certificate {timeout} s after HUP"
            time.sleep(0.1)


def hup_and_wait(server: Server, mark: int) -> list[str]:
    server.send_signal(signal.SIGHUP)
    return wait_for_log(server, "SIGHUP: configuration reloaded", mark)


def test_hup_rereads_the_certificate_and_keeps_the_old_one_when_the_new_is_unusable(
        start_server, tls_files):
    server = start_tls_server(start_server, tls_files)
    first = peer_der(server, tls_files, "smtps")
    assert peer_der(server, tls_files, "starttls") == first

    second = tls_files.issue()
    assert second != first
    mark = len(server.stderr())
    lines = hup_and_wait(server, mark)
    assert any(f"SIGHUP: TLS certificate {tls_files.cert} loaded" in line for line in lines), lines
    wait_for_certificate(server, tls_files, second)

    good_cert, good_key = tls_files.cert.read_bytes(), tls_files.key.read_bytes()
    broken = {
        "garbage": lambda: replace_file(tls_files.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n"),
        # As root the master reads as nobody; as a user, mode 0 keeps out its owner too.
        "unreadable": lambda: replace_file(tls_files.key, good_key, mode=0o000),
        "missing": lambda: tls_files.key.unlink(),
        "other key": lambda: replace_file(tls_files.key,
                                          tls_files.ca.issue_cert("x.test").private_key_pem.bytes()),
    }
    why = {"garbage": "not a PEM certificate chain", "unreadable": "permission denied",
           "missing": "no such file", "other key": "is not the key of the certificate"}
    for name, breakage in broken.items():
        replace_file(tls_files.cert, good_cert)
        replace_file(tls_files.key, good_key)
        breakage()
        mark = len(server.stderr())
        lines = hup_and_wait(server, mark)
        complaints = [line for line in lines if "cannot use the new certificate" in line]
        assert len(complaints) == 1, (name, lines)
        assert why[name] in complaints[0] and "keeping the one in use" in complaints[0], complaints
        assert "Traceback" not in server.stderr()
        wait_for_certificate(server, tls_files, second)   # new workers, old certificate
    assert server.proc.poll() is None


def test_hup_can_turn_starttls_on_and_an_smtps_listener_keeps_its_certificate(
        start_server, tls_files):
    """A certificate added on HUP: new connections are offered STARTTLS. The keys
    taken out while an smtps listener needs them: the reload is refused (the
    listener cannot run without one) and TLS stays on."""
    plain = start_server(workers=1, config="")
    sock, _ = plain.connect()
    assert "STARTTLS" not in ehlo_extensions(sock)
    quit_(sock)
    config = Path(plain.args[plain.args.index("-c") + 1])
    config.write_text(tls_files.config())
    mark = len(plain.stderr())
    hup_and_wait(plain, mark)
    deadline = time.monotonic() + 10     # old workers may take a connection or two
    while True:
        sock, _ = plain.connect()
        if "STARTTLS" in ehlo_extensions(sock):
            break
        quit_(sock)
        assert time.monotonic() < deadline, "no STARTTLS 10 s after HUP"
        time.sleep(0.1)
    assert command(sock, b"STARTTLS") == S220_TLS
    tls = tls_files.client_context().wrap_socket(sock, server_hostname="localhost")
    deliver(tls, f"alice@{DOMAIN}", msgid())
    quit_(tls)

    server = start_tls_server(start_server, tls_files)
    der = peer_der(server, tls_files, "smtps")
    config = Path(server.args[server.args.index("-c") + 1])
    config.write_text("")
    mark = len(server.stderr())
    server.send_signal(signal.SIGHUP)
    lines = wait_for_log(server, "SIGHUP: reload failed, keeping the running configuration", mark)
    complaint = next(line for line in lines if "reload failed" in line)
    assert "smtps://127.0.0.1:" in complaint and "tls_cert" in complaint, complaint
    assert peer_der(server, tls_files, "smtps") == der
    assert peer_der(server, tls_files, "starttls") == der
