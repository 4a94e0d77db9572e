"""What the POP3 tests share: a real ccsmtp server with POP3 listeners, a raw POP3
client, mailboxes written straight to disk, and the visible form of a stored message
worked out independently of the server's code.

    pop3 = start_pop3(start_server, work_dir, users={"alice": "secret"})
    pop3.smtp                  conftest.Server (SMTP port, spool, log, processes)
    pop3.port, pop3.tls_port   pop3:// and pop3s:// listeners (STLS offered on pop3://)
    pop3.ca                    the trustme CA that signed the server's certificate
    pop3.client(...)           poplib.POP3 / POP3_SSL, logged in if a password is given
    pop3.wire(...)             Wire: a raw socket speaking POP3 line by line

Users: `ccsmtp-passwd --stdin` writes them ({ARGON2ID}, ~70 ms a check here), or with
scheme="SHA512-CRYPT" they are written as crypt(3) hashes (a few ms) for tests that log
in hundreds of times; SPEC §9 accepts both, and an unknown user is checked against a
stand-in of the scheme most users have, so a test's timing is the same either way.

As root the server runs as nobody: every file it reads (users, certificate) is 0644 in
work_dir (0755), and mailboxes written here are chowned to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import poplib
import pwd
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import crypt_r

from conftest import DOMAIN, IS_ROOT, REPO, RUN_AS, Server, free_port

sys.path.insert(0, str(REPO))
from prefork_smtp.store import mbox  # noqa: E402
from prefork_smtp.store.envelope import Envelope, Recipient  # noqa: E402

PASSWD = REPO / "bin" / "ccsmtp-passwd"
STATE_HEADERS = (b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imapbase", b"x-imap",
                 b"content-length")


# --- files the server reads -----------------------------------------------------------

def make_certificate(directory: Path) -> tuple[Path, Path]:
    """(server PEM: key and chain, CA PEM) from a fresh trustme CA, for localhost and
    127.0.0.1."""
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    server_pem, ca_pem = directory / "pop3-server.pem", directory / "pop3-ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    for path in (server_pem, ca_pem):
        path.chmod(0o644)
    return server_pem, ca_pem


def write_users(path: Path, users: dict[str, str], scheme: str = "ARGON2ID") -> Path:
    """The users file: through bin/ccsmtp-passwd (ARGON2ID), or SHA512-CRYPT lines."""
    if scheme == "ARGON2ID":
        for name, password in users.items():
            subprocess.run([sys.executable, str(PASSWD), "-f", str(path), name, "--stdin"],
                           input=password + "\n", text=True, check=True, capture_output=True,
                           timeout=30)
    elif scheme == "SHA512-CRYPT":
        with open(path, "w") as f:
            for name, password in users.items():
                hashed = crypt_r.crypt(password, crypt_r.mksalt(crypt_r.METHOD_SHA512))
                f.write(f"{name}:{{SHA512-CRYPT}}{hashed}\n")
    else:
        raise ValueError(scheme)
    path.chmod(0o644)
    return path


def server_user() -> tuple[int, int]:
    if not IS_ROOT:
        return os.getuid(), os.getgid()
    entry = pwd.getpwnam(RUN_AS)
    return entry.pw_uid, entry.pw_gid


# --- the server ---------------------------------------------------------------------------

@dataclasses.dataclass
class Pop3Server:
    smtp: Server
    port: int
    tls_port: int | None
    ca: Path
    users: dict[str, str]
    host: str = "127.0.0.1"

    @property
    def spool(self) -> Path:
        return self.smtp.spool

    def log(self) -> str:
        return self.smtp.stderr()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def client(self, user: str | None = None, password: str | None = None, *,
               tls: str | None = None, timeout: float = 30.0,
               source_ip: str | None = None) -> poplib.POP3:
        """poplib: tls None (plain), "stls" or "pop3s"; logged in with USER/PASS when a
        user is named (password: the user's own by default)."""
        source = (source_ip, 0) if source_ip else None
        if tls == "pop3s":
            assert self.tls_port is not None
            client = poplib.POP3_SSL(self.host, self.tls_port, timeout=timeout,
                                     context=self.ssl_context())
        else:
            client = _POP3From(self.host, self.port, timeout=timeout, source=source)
            if tls == "stls":
                client.stls(self.ssl_context())
        if user is not None:
            client.user(user)
            client.pass_(self.users[user] if password is None else password)
        return client

    def wire(self, source_ip: str | None = None, timeout: float = 30.0,
             tls: bool = False) -> "Wire":
        if tls:
            assert self.tls_port is not None
            raw = socket.create_connection((self.host, self.tls_port), timeout=timeout)
            sock = self.ssl_context().wrap_socket(raw, server_hostname="localhost")
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout,
                                            source_address=(source_ip, 0) if source_ip else None)
        return Wire(sock)

    def restart(self, start_server: Callable[..., Server]) -> "Pop3Server":
        """Stop this server and start another on the same spool, config and ports."""
        assert self.smtp.stop() == 0, self.log()[-3000:]
        args = self.smtp.args
        config = args[args.index("-c") + 1]
        listen = [a for a in args if a.startswith(("pop3://", "pop3s://"))]
        workers = int(args[args.index("-w") + 1])
        extra = [x for a in listen for x in ("-l", a)] + ["-c", config]
        server = start_server(workers=workers, spool=self.spool, port=self.smtp.port,
                              extra_args=extra)
        return dataclasses.replace(self, smtp=server)

    def worker_of(self, sock: socket.socket):
        """The worker process holding the server's end of a client socket (IPv4): its
        inode from /proc/net/tcp, then the worker with that descriptor (psutil's
        net_connections takes ~0.2 s a call here, and is the fallback)."""
        ip, port = sock.getsockname()
        remote = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
        for _ in range(20):
            with open("/proc/net/tcp") as f:
                inodes = [fields[9] for fields in (line.split() for line in f.readlines()[1:])
                          if fields[2] == remote and fields[9] != "0"]
            targets = {f"socket:[{inode}]" for inode in inodes}
            for worker in self.smtp.workers():
                fd_dir = f"/proc/{worker.pid}/fd"
                with contextlib.suppress(OSError):
                    for fd in os.listdir(fd_dir):
                        with contextlib.suppress(OSError):
                            if os.readlink(f"{fd_dir}/{fd}") in targets:
                                return worker
            time.sleep(0.05)
        for worker in self.smtp.workers():
            with contextlib.suppress(Exception):
                if any(c.raddr and (c.raddr.ip, c.raddr.port) == (ip, port)
                       for c in worker.net_connections("tcp")):
                    return worker
        return None


class _POP3From(poplib.POP3):
    """poplib.POP3 from a chosen source address."""

    def __init__(self, host: str, port: int, timeout: float, source: tuple[str, int] | None):
        self._source = source
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, self._source)


def start_pop3(start_server: Callable[..., Server], work_dir: Path, *,
               users: dict[str, str] | None = None, scheme: str = "ARGON2ID",
               workers: int = 2, tls: bool = True, extra_config: str = "",
               spool: Path | None = None) -> Pop3Server:
    users = {"alice": "secret"} if users is None else users
    directory = work_dir / f"pop3-{len(list(work_dir.glob('pop3-*')))}"
    directory.mkdir()
    directory.chmod(0o755)
    users_path = write_users(directory / "users", users, scheme)
    config = f'users_file = "{users_path}"\n'
    server_pem, ca_pem = make_certificate(directory)
    if tls:
        config += f'tls_cert = "{server_pem}"\ntls_key = "{server_pem}"\n'
    config += extra_config
    port = free_port()
    tls_port = free_port() if tls else None
    extra = ["-l", f"pop3://127.0.0.1:{port}"]
    if tls_port:
        extra += ["-l", f"pop3s://127.0.0.1:{tls_port}"]
    config_path = directory / "ccsmtp.toml"
    config_path.write_text(config)
    config_path.chmod(0o644)
    server = start_server(workers=workers, spool=spool, extra_args=extra + ["-c", str(config_path)])
    pop3 = Pop3Server(server, port, tls_port, ca_pem, dict(users))
    wait_for_pop3(pop3)
    return pop3


def wait_for_pop3(pop3: Pop3Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((pop3.host, pop3.port), timeout=2) as s:
                if s.recv(100).startswith(b"+OK"):
                    s.sendall(b"QUIT\r\n")
                    with contextlib.suppress(OSError):
                        s.recv(100)
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no POP3 greeting:\n{pop3.log()[-3000:]}")
        time.sleep(0.05)


# --- a raw client -------------------------------------------------------------------------

class Wire:
    """POP3 over a raw socket: send what you like, read replies exactly as sent."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.greeting = self.line()

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes:
        """One reply line with its CRLF (b"" if the server closed first)."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                out, self.buf = self.buf, b""
                return out
        i = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def multi(self) -> bytes:
        """The body of a multi-line response after its status line, as sent
        (dot-stuffed, with the final '.' CRLF)."""
        start = 0
        while True:
            if self.buf.startswith(b".\r\n"):
                end = 3
                break
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                end = i + 5
                break
            start = max(0, len(self.buf) - 4)
            if not self._fill():
                raise EOFError("closed inside a multi-line response")
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def cmd(self, command: str | bytes) -> bytes:
        self.send((command.encode() if isinstance(command, str) else command) + b"\r\n")
        return self.line()

    def login(self, user: str, password: str) -> bytes:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd(f"PASS {password}")

    def listing(self, command: str = "LIST") -> list[tuple[int, str]]:
        status = self.cmd(command)
        assert status.startswith(b"+OK"), status
        body = self.multi()
        return [(int(n), v) for n, v in (line.split(" ", 1) for line in
                                          body[:-3].decode().split("\r\n") if line)]

    def retr(self, number: int) -> tuple[bytes, bytes]:
        """(status line, content as sent less the terminator, still dot-stuffed)."""
        status = self.cmd(f"RETR {number}")
        assert status.startswith(b"+OK"), status
        body = self.multi()
        return status, body[:-3]

    def eof(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        out = self.buf
        self.buf = b""
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                out += chunk
        return out


def unstuff(sent: bytes) -> bytes:
    """RFC 1939 §3: a line beginning with '.' lost one."""
    out = re.sub(rb"(?m)^\.", b"", sent) if sent.startswith(b".") or b"\n." in sent else sent
    return out


# --- mailboxes ----------------------------------------------------------------------------

ENVELOPE = Envelope("sender@remote.test", (Recipient(f"alice@{DOMAIN}", "alice"),),
                    "client.test", "ESMTP", "127.0.0.1", "7BIT")


def stored_copy(content: bytes, n: int, received_at: float = 1_790_000_000.0) -> bytes:
    """One message as delivery appends it (mbox.format_copy: From_ line, Return-Path,
    Received, mboxrd quoting, LF line ends, a blank line after)."""
    return b"".join(mbox.format_copy(ENVELOPE, [content], queue_id=f"{n:020X}",
                                     recipient=f"alice@{DOMAIN}", received_at=received_at + n,
                                     hostname="test.invalid"))


def generated_content(n: int, lines: int = 12) -> bytes:
    """Message n: a few quoting and stuffing cases every 7th message."""
    body = b"".join(b"line %d of message %d, some words to fill it\r\n" % (k, n)
                    for k in range(lines))
    if n % 7 == 0:
        body += b"From the start of a line\r\n>From quoted once\r\n.leading dot\r\n..two\r\n.\r\n"
    return (b"From: sender@remote.test\r\nTo: alice@example.org\r\nSubject: message %d\r\n"
            b"Message-ID: <gen-%d@test>\r\n\r\n" % (n, n)) + body


def write_mailbox(path: Path, count: int, content: Callable[[int], bytes] = generated_content,
                  start: int = 0) -> int:
    """Append `count` messages straight to the mbox file (no server involved), owned
    by the server's user, mode 0600; returns the bytes written."""
    written = 0
    uid, gid = server_user()
    with open(path, "ab") as f:
        batch = []
        for n in range(start, start + count):
            batch.append(stored_copy(content(n), n))
            if len(batch) >= 1000:
                written += f.write(b"".join(batch))
                batch = []
        written += f.write(b"".join(batch))
    os.chown(path, uid, gid)
    os.chmod(path, 0o600)
    return written


def prepare_spool(spool: Path) -> None:
    """A spool made before the server starts, owned by its user."""
    spool.mkdir(mode=0o700, exist_ok=True)
    os.chown(spool, *server_user())


def split_mbox(data: bytes) -> list[bytes]:
    """The stored messages of an mboxrd file, each from its From_ line to the end of its
    separator line (content 'From ' lines are quoted, so this split is exact)."""
    if not data:
        return []
    assert data.startswith(b"From "), data[:80]
    starts = [0] + [m.start() + 1 for m in re.finditer(rb"\nFrom ", data)]
    return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]


def visible(stored: bytes) -> bytes:
    """What RETR must send for a stored message (SPEC §9), less dot-stuffing and the
    terminator: no From_ line, no separator blank line, state headers left out of the
    header, '>From' lines unquoted one level, LF as CRLF."""
    content = stored.split(b"\n", 1)[1]
    if content.endswith(b"\n\n"):
        content = content[:-1]
    header, sep, body = content.partition(b"\n\n")
    if not sep:
        header, body = content, b""
    kept, skipping = [], False
    for line in header.split(b"\n"):
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        name = line.split(b":", 1)[0].strip().lower()
        skipping = b":" in line and name in STATE_HEADERS
        if not skipping:
            kept.append(line)
    content = b"\n".join(kept) + sep + body
    content = re.sub(rb"(?m)^>(>*From )", rb"\1", content)
    return content.replace(b"\n", b"\r\n")


def message_ids(data: bytes) -> list[str]:
    return [m.group(1).decode() for m in re.finditer(rb"(?mi)^Message-ID: (<[^>\r\n]*>)", data)]


def rss_of(procs: Iterable) -> int:
    best = 0
    for proc in procs:
        with contextlib.suppress(Exception):
            best = max(best, proc.memory_info().rss)
    return best


def run_quietly(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, timeout=kwargs.pop("timeout", 60),
                          **kwargs)


class BioTLS:
    """A TLS client over memory BIOs, so that the test decides what goes in each send:
    handshake(first) sends `first` in the same segment as the client's Finished, as
    GnuTLS clients (mpop) do after STLS."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str = "localhost"):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)

    def handshake(self, first: bytes = b"") -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("closed during the handshake")
                self.incoming.write(data)
        if first:
            self.tls.write(first)
        self.sock.sendall(self.outgoing.read())

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def read_until(self, end: bytes, timeout: float = 5.0) -> bytes:
        """Decrypted bytes until `end` is among them, the server closes, or the timeout
        (then what came so far)."""
        self.sock.settimeout(timeout)
        data = b""
        while end not in data:
            try:
                data += self.tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return data
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                return data
            if not chunk:
                return data
            self.incoming.write(chunk)
        return data
