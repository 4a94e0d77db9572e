"""Private HAProxy and Dovecot instances for tests, and PROXY headers built by hand.

Each instance runs as a child of the test, in its own session, with its own config file,
runtime directories, pid/log files and loopback ports under a fresh temporary directory;
nothing under /etc or any system service is touched. Stopping sends SIGTERM to the
process, waits, and then SIGKILLs what is left of its process group.

Pytest fixtures (request them by name, or import the classes and start them yourself):

    haproxy_factory(backends, send_proxy="v2", ...) -> HAProxy
        A TCP-mode HAProxy listening on haproxy.host:haproxy.port that balances over
        `backends` ((host, port) pairs) and prefixes each connection with a PROXY header
        ("v1" = send-proxy, "v2" = send-proxy-v2; proxy_v2_options e.g. "crc32c").
    dovecot_factory(users=("alice", "bob"), imap=False) -> Dovecot
    dovecot                                             -> Dovecot with alice and bob
        Dovecot LMTP on dovecot.lmtp_port (and the unix socket dovecot.lmtp_socket), IMAP
        on dovecot.imap_port when imap=True (login: user / dovecot.password). Mail is
        Maildir under dovecot.home(user), stored with CRLF line ends (mail_save_crlf) so
        that a message can be compared byte for byte: dovecot.messages(user).
        Skips the test, saying why, when Dovecot is not installed or cannot start.

Running as root or not: Dovecot refuses to deliver as root, so as root the mailboxes
belong to `nobody` and Dovecot's internal and login users are its Debian accounts
(`dovecot`, `dovenull`) when they exist; as any other user, every one of them is that
user and the services that would chroot (anvil, imap-login) do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
IS_ROOT = os.geteuid() == 0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def private_dir(prefix: str) -> Path:
    """A fresh directory that services running as other users can traverse (pytest's
    tmp_path is 0700 under /tmp/pytest-of-root when running as root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def listening(port: int) -> bool:
    """Whether a TCP socket listens on port (any local address), from /proc/net: no
    connection is made, so a proxy in front of a test server forwards nothing."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_until(ready: Callable[[], bytes | bool], proc: subprocess.Popen, what: str,
               timeout: float = START_TIMEOUT_S) -> bytes | bool:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before {what}")
        try:
            result = ready()
            if result:
                return result
        except OSError as e:
            last_error = e
        time.sleep(0.05)
    raise RuntimeError(f"not {what} after {timeout:.0f} s" + (f" ({last_error})" if last_error else ""))


def read_greeting(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=2.0) as s:
        return s.recv(1024)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, wait, then SIGKILL the process group it leads (start_new_session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT_S)


# --- HAProxy -----------------------------------------------------------------------------

@dataclasses.dataclass
class HAProxy:
    host: str
    port: int
    config_path: Path
    log_path: Path
    proc: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def haproxy_config(frontend: tuple[str, int], backends: Sequence[tuple[str, int]],
                   send_proxy: str, proxy_v2_options: str = "", check: bool = False) -> str:
    """TCP mode, round robin. check=True adds health checks that carry a PROXY header
    too (check-send-proxy): for v2 those are LOCAL connections."""
    keyword = {"v1": "send-proxy", "v2": "send-proxy-v2"}[send_proxy]
    if proxy_v2_options:
        keyword += f" proxy-v2-options {proxy_v2_options}"
    if check:
        keyword += " check check-send-proxy inter 200ms"

    def address(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    servers = "\n".join(f"    server s{i} {address(*b)} {keyword}" for i, b in enumerate(backends))
    return f"""\
global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp_in
    bind {address(*frontend)}
    default_backend smtp_out

backend smtp_out
    balance roundrobin
{servers}
"""


def start_haproxy(workdir: Path, backends: Sequence[tuple[str, int]], send_proxy: str = "v2",
                  proxy_v2_options: str = "", host: str = "127.0.0.1",
                  check: bool = False) -> HAProxy:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(binary):
        pytest.skip("haproxy is not installed")
    port = free_port(host)
    config_path = workdir / "haproxy.cfg"
    config_path.write_text(haproxy_config((host, port), backends, send_proxy,
                                          proxy_v2_options, check))
    log_path = workdir / "haproxy.log"
    with open(log_path, "wb") as log:
        # -db: foreground, no daemon; logs (warnings, alerts) go to stderr.
        proc = subprocess.Popen([binary, "-db", "-f", str(config_path)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    haproxy = HAProxy(host, port, config_path, log_path, proc)
    try:
        wait_until(lambda: listening(port), proc, f"listening on port {port}")
    except RuntimeError as e:
        haproxy.stop()
        raise RuntimeError(f"haproxy did not start: {e}\n{haproxy.log()}") from None
    return haproxy


@pytest.fixture
def haproxy_factory(tmp_path: Path) -> Iterator[Callable[..., HAProxy]]:
    started: list[HAProxy] = []

    def start(backends: Sequence[tuple[str, int]], send_proxy: str = "v2", **kwargs) -> HAProxy:
        workdir = tmp_path / f"haproxy{len(started)}"
        workdir.mkdir()
        haproxy = start_haproxy(workdir, backends, send_proxy, **kwargs)
        started.append(haproxy)
        return haproxy

    yield start
    for haproxy in started:
        haproxy.stop()


# --- Dovecot -----------------------------------------------------------------------------

DOVECOT_PASSWORD = "secret"


@dataclasses.dataclass(frozen=True)
class Accounts:
    """Who Dovecot's processes run as and who owns the mail."""
    internal_user: str
    internal_group: str
    login_user: str
    mail_uid: int
    mail_gid: int

    @classmethod
    def for_this_process(cls) -> "Accounts":
        if not IS_ROOT:
            me = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            return cls(me, group, me, os.getuid(), os.getgid())
        nobody = pwd.getpwnam("nobody")
        internal, login = _account("dovecot", "nobody"), _account("dovenull", "nobody")
        internal_group = grp.getgrgid(pwd.getpwnam(internal).pw_gid).gr_name
        return cls(internal, internal_group, login, nobody.pw_uid, nobody.pw_gid)


def _account(name: str, fallback: str) -> str:
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        return fallback


@dataclasses.dataclass
class Dovecot:
    root: Path
    config_path: Path
    log_path: Path
    lmtp_port: int
    lmtp_socket: Path
    imap_port: int | None
    users: tuple[str, ...]
    proc: subprocess.Popen
    password: str = DOVECOT_PASSWORD

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def home(self, user: str) -> Path:
        return self.root / "mail" / user

    def messages(self, user: str) -> list[bytes]:
        """The user's INBOX messages, as Dovecot stored them, oldest first."""
        maildir = self.home(user) / "Maildir"
        files = [p for sub in ("new", "cur") if (maildir / sub).is_dir()
                 for p in (maildir / sub).iterdir()]
        files.sort(key=_maildir_order)
        return [p.read_bytes() for p in files]

    def wait_for_messages(self, user: str, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(user)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def add_user(self, user: str) -> None:
        """A new mail user (Dovecot reads its passwd-file again when it changes)."""
        accounts = Accounts.for_this_process()
        with open(self.root / "passwd", "a") as f:
            f.write(f"{user}:{{PLAIN}}{self.password}:{accounts.mail_uid}:{accounts.mail_gid}"
                    f"::{self.home(user)}\n")
        self.users = self.users + (user,)
        # Dovecot looks at a passwd-file's stat at most once per wall-clock second
        # (db-passwd-file.c: last_sync_time): a lookup in the second of the previous
        # one would not see the new user. Return in the next second.
        time.sleep(1.01 - time.time() % 1)

    def restart(self) -> None:
        """Start it again after stop(): same configuration, ports and mail."""
        assert self.proc.poll() is not None, "stop() it first"
        self.proc = _spawn_dovecot(self.config_path, self.root / "dovecot.stderr")
        for port in (self.lmtp_port, self.imap_port):
            if port:
                wait_until(lambda: read_greeting("127.0.0.1", port), self.proc,
                           f"greeting on port {port}")

    def doveadm(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["doveadm", "-c", str(self.config_path), *args],
                              capture_output=True, timeout=30)

    def stop(self) -> None:
        stop_process(self.proc)


def _maildir_order(path: Path) -> tuple[int, int, str]:
    """Dovecot's Maildir names start with the delivery time: SECONDS.M<usec>P<pid>..."""
    match = re.match(r"(\d+)\.M(\d+)", path.name)
    return (int(match.group(1)), int(match.group(2)), path.name) if match else (0, 0, path.name)


def dovecot_config(root: Path, accounts: Accounts, lmtp_port: int, imap_port: int | None) -> str:
    protocols = "lmtp imap" if imap_port else "lmtp"
    imap = f"""
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
""" if imap_port else ""
    return f"""\
# A private Dovecot for ccsmtp's tests: loopback only, everything under {root}.
instance_name = ccsmtp-test-{root.name}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = {protocols}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
default_internal_user = {accounts.internal_user}
default_internal_group = {accounts.internal_group}
default_login_user = {accounts.login_user}
first_valid_uid = 1
# alice@example.org is the user alice.
auth_username_format = %Ln
mail_location = maildir:~/Maildir
# Stored as received (CRLF), so tests compare messages byte for byte.
mail_save_crlf = yes
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
# Not root: nothing can chroot.
service anvil {{
  chroot =
}}
{imap}"""


def start_dovecot(users: Sequence[str] = ("alice", "bob"), imap: bool = False) -> Dovecot:
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if not os.path.exists(binary):
        pytest.skip("Dovecot is not installed (Debian: dovecot-core, dovecot-lmtpd)")
    try:
        accounts = Accounts.for_this_process()
    except KeyError as e:
        pytest.skip(f"no account for Dovecot to use: {e}")
    root = private_dir("ccsmtp-dovecot-")
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir()
    with open(root / "passwd", "w") as f:
        for user in users:
            f.write(f"{user}:{{PLAIN}}{DOVECOT_PASSWORD}:{accounts.mail_uid}:{accounts.mail_gid}"
                    f"::{root / 'mail' / user}\n")
    if IS_ROOT:
        os.chown(root / "mail", accounts.mail_uid, accounts.mail_gid)
    lmtp_port = free_port()
    imap_port = free_port() if imap else None
    config_path = root / "dovecot.conf"
    config_path.write_text(dovecot_config(root, accounts, lmtp_port, imap_port))
    stderr_path = root / "dovecot.stderr"
    proc = _spawn_dovecot(config_path, stderr_path)
    dovecot = Dovecot(root, config_path, root / "dovecot.log", lmtp_port, root / "run" / "lmtp",
                      imap_port, tuple(users), proc)
    try:
        for port in (lmtp_port, imap_port):
            if port:
                wait_until(lambda: read_greeting("127.0.0.1", port), proc, f"greeting on port {port}")
    except RuntimeError as e:
        dovecot.stop()
        why = (stderr_path.read_text(errors="replace") + dovecot.log()).strip()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"Dovecot cannot start here: {e}: {why[-800:]}")
    return dovecot


def _spawn_dovecot(config_path: Path, stderr_path: Path) -> subprocess.Popen:
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    with open(stderr_path, "ab") as err:
        return subprocess.Popen([binary, "-F", "-c", str(config_path)], stdin=subprocess.DEVNULL,
                                stdout=err, stderr=subprocess.STDOUT, start_new_session=True)


def remove_dovecot(dovecot: Dovecot) -> None:
    dovecot.stop()
    shutil.rmtree(dovecot.root, ignore_errors=True)


@pytest.fixture
def dovecot_factory() -> Iterator[Callable[..., Dovecot]]:
    started: list[Dovecot] = []

    def start(users: Sequence[str] = ("alice", "bob"), imap: bool = False) -> Dovecot:
        dovecot = start_dovecot(users, imap)
        started.append(dovecot)
        return dovecot

    yield start
    for dovecot in started:
        remove_dovecot(dovecot)


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    """One Dovecot (alice, bob; LMTP only) shared by a module's tests: tests tell their
    messages apart by Message-ID rather than counting mailboxes from empty."""
    instance = start_dovecot()
    yield instance
    remove_dovecot(instance)


# --- PROXY headers by hand (doc/proxy-protocol.txt) ---------------------------------------

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))


def proxy_v2(source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None,
             tlvs: Sequence[tuple[int, bytes]] = (), command: int = 0x1,
             family: int | None = None, version: int = 2, length: int | None = None,
             address_block: bytes | None = None) -> bytes:
    """A v2 header; source None makes an UNSPEC one. The keyword arguments after tlvs
    override single fields so that tests can build malformed headers."""
    if address_block is None:
        if source is None:
            address_block = b""
        else:
            assert destination is not None
            src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
            address_block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    if family is None:
        family = 0x00 if source is None else (0x11 if ":" not in source[0] else 0x21)
    tail = address_block + b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in tlvs)
    if length is None:
        length = len(tail)
    return (PROXY_V2_SIGNATURE + bytes([(version << 4) | command, family])
            + struct.pack("!H", length) + tail)
