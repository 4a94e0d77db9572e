"""Fixtures that run the REAL ccsmtp master as a subprocess on a loopback port.

`start_server(...)` (a factory) and `server` (one server per test, options through
indirect parametrization) fork `bin/ccsmtp-master` in a new session, wait for its
greeting, and on teardown stop it with SIGTERM and check that it exited 0, logged no
traceback and left no process of its group behind.

As root the server drops to `nobody`, who cannot traverse pytest's tmp_path
(/tmp/pytest-of-root is 0700): the spool's parent is then a 0755 mkdtemp() directory
and the spool itself is left for the master to create and chown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import mailbox
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from prefork_smtp.store import queue as ccsmtp_queue

REPO = Path(__file__).resolve().parent.parent
MASTER = REPO / "bin" / "ccsmtp-master"
DOMAIN = "example.org"
IS_ROOT = os.geteuid() == 0
RUN_AS = "nobody"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
CLIENT_HELO = "client.test"
SENDER = "sender@remote.test"
QUEUED = re.compile(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)")
_SEPARATOR = re.compile(rb"^From ", re.MULTILINE)   # mboxrd quotes every other ^From


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_message(message_id: str, subject: str = "test", body: str = "Hello.\r\n") -> bytes:
    """An RFC 5322 message with CRLF line ends; message_id includes the angle brackets."""
    return (f"From: {SENDER}\r\nTo: someone@{DOMAIN}\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\n{body}").encode()


def master_command(*args: str) -> list[str]:
    """The master run by this interpreter, so root and non-root runs use the same one."""
    return [sys.executable, str(MASTER), *args]


def group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def process_title(proc: psutil.Process) -> str:
    """What ps shows: setproctitle leaves empty padding arguments behind."""
    return " ".join(arg for arg in proc.cmdline() if arg).strip()


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_UNREAD: "weakref.WeakKeyDictionary[socket.socket, bytes]" = weakref.WeakKeyDictionary()
_REPLY_END = re.compile(rb"(?:^|\r\n)\d{3} [^\r\n]*\r\n")


def recv_reply(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read one complete (possibly multi-line) SMTP reply from a raw socket. What
    arrives after it (a pipelined or unsolicited reply) is kept for the next call.
    Returns what there is (maybe b"") if the server closes first."""
    sock.settimeout(timeout)
    data = _UNREAD.pop(sock, b"")
    while True:
        match = _REPLY_END.search(data)
        if match:
            _UNREAD[sock] = data[match.end():]
            return data[:match.end()]
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def recv_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the server closes the connection (b"": it said nothing more)."""
    sock.settimeout(timeout)
    data = _UNREAD.pop(sock, b"")
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_locked(path: Path) -> bytes:
    """The whole file, under a shared fcntl lock as a mail reader takes it (the
    server's writers hold an exclusive lock while appending: no half message)."""
    with open(path, "rb") as f:
        fcntl.lockf(f, fcntl.LOCK_SH)
        try:
            return f.read()
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def parse_mbox(data: bytes, scratch_dir: Path) -> list[mailbox.mboxMessage]:
    fd, path = tempfile.mkstemp(dir=scratch_dir, suffix=".mbox")
    try:
        os.write(fd, data)
        os.close(fd)
        box = mailbox.mbox(path, create=False)
        try:
            return list(box)
        finally:
            box.close()
    finally:
        os.unlink(path)


@dataclasses.dataclass
class Server:
    host: str
    port: int
    spool: Path
    proc: subprocess.Popen
    stderr_path: Path
    scratch: Path
    args: list[str]
    expect_clean_exit: bool = True   # False once a test crashed it on purpose
    greeting: bytes = b""
    smtps_port: int | None = None     # an implicit-TLS listener (start_tls_server)

    # --- processes --------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        return self.proc.pid   # start_new_session=True

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def processes(self, title: str = "ccsmtp: ") -> list[psutil.Process]:
        """Live children of the master whose process title starts with `title`."""
        out = []
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                if process_title(child).startswith(title):
                    out.append(child)
            except psutil.Error:
                pass
        return out

    def workers(self) -> list[psutil.Process]:
        return self.processes("ccsmtp: worker")

    def delivery(self) -> list[psutil.Process]:
        return self.processes("ccsmtp: delivery")

    def wait_for_processes(self, title: str, count: int, timeout: float = 5.0,
                           exclude: set[int] = frozenset()) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            procs = [p for p in self.processes(title) if p.pid not in exclude]
            if len(procs) >= count:
                return procs
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(procs)} process(es) titled {title!r} after "
                                     f"{timeout} s, wanted {count}\n{self.stderr()}")
            time.sleep(0.02)

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Stop the master; returns its exit status. Kills the group if it hangs."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_group(self.pgid)
                self.proc.wait(5)
                raise AssertionError(f"master did not stop within {timeout} s of signal {sig}")
        return self.proc.returncode

    def crash(self) -> None:
        """kill -9 every process of the server at once (a power cut, as far as ccsmtp knows)."""
        self.expect_clean_exit = False
        kill_group(self.pgid)
        self.proc.wait(10)
        deadline = time.monotonic() + 5
        while group_members(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.02)

    # --- SMTP -------------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> tuple[socket.socket, bytes]:
        """A raw connection and the greeting."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        return sock, recv_reply(sock, timeout)

    def smtp(self, helo: str = CLIENT_HELO, timeout: float = 10.0) -> smtplib.SMTP:
        try:
            return smtplib.SMTP(self.host, self.port, local_hostname=helo, timeout=timeout)
        except smtplib.SMTPServerDisconnected as e:
            # Closed before the greeting: say what the server and its processes were doing.
            procs = [(p.pid, process_title(p)) for p in self.processes("")]
            raise AssertionError(f"connection closed before the greeting ({e}); processes "
                                 f"{procs}\n--- server log:\n{self.stderr()[-4000:]}") from e

    def send(self, recipients: list[str], content: bytes,
             sender: str = SENDER, helo: str = CLIENT_HELO) -> str:
        """One transaction over smtplib; returns the queue ID from the 250 reply."""
        with self.smtp(helo) as client:
            client.ehlo()
            code, reply = client.mail(sender)
            assert code == 250, reply
            for rcpt in recipients:
                code, reply = client.rcpt(rcpt)
                assert code == 250, (rcpt, reply)
            code, reply = client.data(content)
            assert code == 250, reply
        match = QUEUED.fullmatch(reply)
        assert match, reply
        return match.group(1).decode()

    def settle(self, names: list[str], timeout: float = 10.0) -> dict[str, list[mailbox.mboxMessage]]:
        """Send a barrier message to every mailbox in `names` and wait for it. Delivery
        takes the queue oldest first, so whatever was acknowledged before the barrier
        has been delivered (once or more) by then. Returns each mailbox's messages
        before the barrier."""
        token = f"<barrier-{uuid.uuid4().hex}@test>"
        self.send([f"{name}@{DOMAIN}" for name in names], make_message(token, "barrier"))
        out = {}
        for name in names:
            messages = self.wait_for_text(name, token.encode(), timeout)
            ids = [m["Message-ID"] for m in messages]
            assert ids.count(token) == 1, f"barrier delivered {ids.count(token)} times to {name}"
            out[name] = messages[:ids.index(token)]
        return out

    # --- mailboxes --------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.spool / name

    def raw(self, name: str) -> bytes:
        try:
            return read_locked(self.path(name))
        except FileNotFoundError:
            return b""

    def mbox(self, name: str) -> list[mailbox.mboxMessage]:
        """The messages of SPOOL/name, parsed by Python's mailbox.mbox ([] if absent)."""
        data = self.raw(name)
        return parse_mbox(data, self.scratch) if data else []

    def count(self, name: str) -> int:
        """Messages in SPOOL/name, counted without taking a lock (for polling)."""
        try:
            data = self.path(name).read_bytes()
        except FileNotFoundError:
            return 0
        return len(_SEPARATOR.findall(data))

    def wait_for_messages(self, name: str, count: int,
                          timeout: float = 10.0) -> list[mailbox.mboxMessage]:
        """Poll until SPOOL/name holds at least `count` messages; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            if self.count(name) >= count:
                messages = self.mbox(name)
                if len(messages) >= count:
                    return messages
            if time.monotonic() > deadline:
                raise AssertionError(f"mailbox {name}: {self.count(name)} message(s) after "
                                     f"{timeout} s, wanted {count}\n--- server log:\n"
                                     f"{self.stderr()[-4000:]}")
            time.sleep(0.02)

    def wait_for_text(self, name: str, needle: bytes,
                      timeout: float = 10.0) -> list[mailbox.mboxMessage]:
        """Poll until SPOOL/name contains `needle`; return its messages."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = needle in self.path(name).read_bytes()
            except FileNotFoundError:
                found = False
            if found:
                return self.mbox(name)
            if time.monotonic() > deadline:
                raise AssertionError(f"mailbox {name}: no {needle!r} after {timeout} s\n"
                                     f"--- server log:\n{self.stderr()[-4000:]}")
            time.sleep(0.02)

    def queued(self) -> list[str]:
        """Queue IDs of messages with copies not yet delivered (and durable)."""
        return [entry.queue_id for entry in ccsmtp_queue.queued(str(self.spool))]

    def wait_for_empty_queue(self, timeout: float = 5.0) -> None:
        """A copy leaves the queue just after its mailbox has it durably: wait for that."""
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > deadline:
                raise AssertionError(f"queue not empty after {timeout} s\n{self.stderr()[-3000:]}")
            time.sleep(0.01)

    def mailboxes(self) -> list[str]:
        """Plain files directly in SPOOL: mailboxes. NAME.lock beside a mailbox NAME is
        someone's lock on it, there for a moment (delivery unlinks its own after the
        append that a reader may already see); any other file stays in the list."""
        names = {p.name for p in self.spool.iterdir() if p.is_file()}
        return sorted(n for n in names if not (n.endswith(".lock") and n[:-5] in names))


# --- figures and resource sampling (test_faults.py, test_hostile.py) --------------------

RELIABILITY_LOG = Path(os.environ.get("CCSMTP_RELIABILITY_LOG", "/tmp/ccsmtp-reliability.txt"))


def record_figures(test: str, **figures: object) -> str:
    """Print what a fault or hostile-input test measured and append it to
    RELIABILITY_LOG, from which the README's Reliability section is written."""
    line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {test}: "
            + ", ".join(f"{key}={value}" for key, value in figures.items()))
    print(line)
    with contextlib.suppress(OSError), open(RELIABILITY_LOG, "a") as f:
        f.write(line + "\n")
    return line


class RssSampler:
    """High-water marks of the RSS of a server's master and children, sampled in a
    thread every `interval` s while the `with` block runs (and once at each end)."""

    def __init__(self, server: Server, interval: float = 0.1):
        self.server = server
        self.interval = interval
        self.peaks: dict[int, int] = {}      # pid -> highest RSS seen, bytes
        self.roles: dict[int, str] = {}      # pid -> "master", "worker", "delivery"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            master = psutil.Process(self.server.pid)
            procs = [(master, "master")] + [(child, "") for child in master.children()]
        except psutil.Error:
            return
        for proc, role in procs:
            try:
                rss = proc.memory_info().rss
                role = role or process_title(proc).split(" ")[1]
            except (psutil.Error, IndexError):
                continue
            self.roles[proc.pid] = role
            self.peaks[proc.pid] = max(rss, self.peaks.get(proc.pid, 0))

    def peak(self, role: str) -> int:
        """The highest RSS of any process in `role` (0 if none was seen)."""
        return max((rss for pid, rss in self.peaks.items() if self.roles[pid] == role), default=0)

    def summary(self) -> str:
        return " ".join(f"{role}={self.peak(role) / 2**20:.1f}MB"
                        for role in ("master", "worker", "delivery"))


class ServerFactory:
    """Starts servers; every one started is stopped and checked at teardown."""

    def __init__(self, base: Path):
        self.base = base
        self.servers: list[Server] = []
        self._n = 0

    def new_spool(self) -> Path:
        self._n += 1
        return self.base / f"spool{self._n}"   # not created: the master does it

    def write_config(self, text: str) -> Path:
        self._n += 1
        path = self.base / f"ccsmtp{self._n}.toml"
        path.write_text(text)
        path.chmod(0o644)   # a reload (HUP) reads it again as the unprivileged user
        return path

    def __call__(self, *, workers: int = 2, extra_args: tuple[str, ...] | list[str] = (),
                 config: str | None = None, spool: Path | None = None,
                 port: int | None = None, wait: bool = True) -> Server:
        spool = spool or self.new_spool()
        port = port or free_port()
        self._n += 1
        stderr_path = self.base / f"master{self._n}.log"
        args = ["-w", str(workers), "-l", f"127.0.0.1:{port}", "-s", str(spool), "-d", DOMAIN]
        if IS_ROOT:
            args += ["-u", RUN_AS]
        if config is not None:
            args += ["-c", str(self.write_config(config))]
        args += list(extra_args)
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(master_command(*args), stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, start_new_session=True, cwd=REPO)
        server = Server("127.0.0.1", port, spool, proc, stderr_path, self.base, args)
        self.servers.append(server)
        if wait:
            server.greeting = self._wait_ready(server)
        return server

    @staticmethod
    def _wait_ready(server: Server) -> bytes:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.proc.poll() is not None:
                raise AssertionError(f"master exited {server.proc.returncode} at start-up:\n"
                                     f"{server.stderr()}")
            try:
                sock, greeting = server.connect(timeout=2)
            except OSError:
                greeting = b""
            else:
                with sock:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                        recv_reply(sock, 2)
                        # Wait for the server's close: by then it has forgotten this
                        # connection, so it does not count against a per-client limit.
                        recv_eof(sock, 2)
            if greeting.startswith(b"220 "):
                return greeting
            if time.monotonic() > deadline:
                raise AssertionError(f"no greeting within {START_TIMEOUT_S} s:\n{server.stderr()}")
            time.sleep(0.05)

    def finish(self) -> list[str]:
        """Stop every server; return the problems found (empty: all clean)."""
        problems = []
        for server in self.servers:
            try:
                code = server.stop()
            except AssertionError as e:
                problems.append(f"port {server.port}: {e}")
                code = None
            survivors = group_members(server.pgid)
            if survivors:
                kill_group(server.pgid)
                problems.append(f"port {server.port}: processes outlived the master: "
                                f"{[p.pid for p in survivors]}")
            log = server.stderr()
            if "Traceback" in log:
                at = log.find("Traceback")   # show the traceback, not just the log's tail
                problems.append(f"port {server.port}: traceback in the log:\n"
                                f"{log[max(0, at - 1500):at + 2500]}")
            if server.expect_clean_exit and code != 0:
                problems.append(f"port {server.port}: master exited {code}:\n{log[-4000:]}")
        return problems


@pytest.fixture
def work_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for spools, configs and logs that the server's user can traverse."""
    if not IS_ROOT:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="ccsmtp-test-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- TLS (SPEC §8) -----------------------------------------------------------------------

TLS_NAMES = ("localhost", "127.0.0.1", "mail.example.org")   # what the server cert is for


@dataclasses.dataclass
class TLSFiles:
    """A test CA (trustme) and a server certificate it issued, as PEM files that the
    server reads at start as root and again on HUP as `nobody`: 0644 files in a 0755
    directory."""
    ca: "trustme.CA"
    dir: Path
    cert: Path         # the server certificate, then its chain
    key: Path
    ca_file: Path      # for clients that verify (openssl, swaks, Postfix)

    def config(self, extra: str = "") -> str:
        """TOML text that configures these files (plus `extra`)."""
        return f'tls_cert = "{self.cert}"\ntls_key = "{self.key}"\n{extra}'

    def issue(self, *names: str) -> bytes:
        """Replace the files with a new certificate from the same CA (for `names`,
        default TLS_NAMES); returns its DER form, to compare with a peer's."""
        leaf = self.ca.issue_cert(*(names or TLS_NAMES))
        replace_file(self.key, leaf.private_key_pem.bytes())
        replace_file(self.cert, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    def client_context(self) -> ssl.SSLContext:
        """What a careful client uses: verify the chain and the name against our CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write data to path by rename: a reader sees the old file or the new, never half."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


@pytest.fixture
def tls_files(work_dir: Path) -> TLSFiles:
    """A fresh test CA and server certificate (TLS_NAMES) under work_dir/tls."""
    trustme = pytest.importorskip("trustme")
    base = work_dir / "tls"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    ca = trustme.CA()
    files = TLSFiles(ca, base, base / "cert.pem", base / "key.pem", base / "ca.pem")
    ca.cert_pem.write_to_path(str(files.ca_file))
    files.ca_file.chmod(0o644)
    files.issue()
    return files


def start_tls_server(start_server: "ServerFactory", tls: TLSFiles, *, config: str = "",
                     smtps: bool = True, **options) -> Server:
    """A server with a certificate: STARTTLS on its plain port and, with smtps, an
    implicit-TLS listener on server.smtps_port."""
    extra = list(options.pop("extra_args", ()))
    smtps_port = free_port() if smtps else None
    if smtps_port:
        extra += ["-l", f"smtps://127.0.0.1:{smtps_port}"]
    options.setdefault("workers", 1)
    server = start_server(config=tls.config(config), extra_args=extra, **options)
    server.smtps_port = smtps_port
    return server


def starttls(sock: socket.socket, context: ssl.SSLContext, helo: str = CLIENT_HELO,
             server_hostname: str = "localhost") -> ssl.SSLSocket:
    """EHLO, STARTTLS (offered, 220), then the handshake on the same socket. The
    greeting must have been read. Returns the TLS socket; the client starts again
    with EHLO (RFC 3207 §4.2)."""
    sock.sendall(f"EHLO {helo}\r\n".encode())
    ehlo = recv_reply(sock)
    assert b"250-STARTTLS\r\n" in ehlo or b"250 STARTTLS\r\n" in ehlo, ehlo
    sock.sendall(b"STARTTLS\r\n")
    assert recv_reply(sock) == b"220 2.0.0 Ready to start TLS\r\n"
    assert not _UNREAD.get(sock), "bytes after the 220 for STARTTLS"
    return context.wrap_socket(sock, server_hostname=server_hostname)


def connect_smtps(server: Server, context: ssl.SSLContext,
                  timeout: float = 5.0) -> tuple[ssl.SSLSocket, bytes]:
    """A connection to the implicit-TLS listener, handshake done, and the greeting."""
    assert server.smtps_port is not None
    raw = socket.create_connection((server.host, server.smtps_port), timeout=timeout)
    try:
        sock = context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    return sock, recv_reply(sock, timeout)


@pytest.fixture
def start_server(work_dir: Path) -> Iterator[Callable[..., Server]]:
    """Factory: start_server(workers=2, extra_args=(), config=None, spool=None)."""
    factory = ServerFactory(work_dir)
    try:
        yield factory
    finally:
        problems = factory.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def server(request: pytest.FixtureRequest, start_server: ServerFactory) -> Server:
    """One running server; options via indirect parametrization, e.g.
    @pytest.mark.parametrize("server", [{"workers": 1}], indirect=True)."""
    options = getattr(request, "param", None) or {}
    return start_server(**options)
