"""The POP3 servers of bench/pop3_bench.py: ccsmtp and a private Dovecot, both reading
the same mbox files with the same users file.

Owns: writing the mailboxes (as delivery writes them: mbox.format_copy), the shared
users file (Dovecot's passwd-file: `name:{SCHEME}hash:uid:gid::home`; ccsmtp reads the
first two fields, SPEC §9), each server's configuration, starting and stopping it, and
its process tree (for RSS).
- ccsmtp: bin/ccsmtp-master -w 2 with pop3:// on 127.0.0.1.
- Dovecot: `dovecot -F -c FILE` with its own base_dir, state_dir, log and index
  directory under the bench's temp directory; mail_location mbox with INBOX = the
  ccsmtp spool's file. As root, Dovecot's mail processes run as `daemon`, who may read
  the mailboxes (0644, owned by ccsmtp's `nobody`) but not write them: Dovecot would
  otherwise write X-IMAPbase/X-UID headers into every message at the first session
  (mbox_lazy_writes still writes when a mailbox is closed), and the two servers would
  no longer read the same bytes. Its indexes live in its own directory.
Must not: listen anywhere but 127.0.0.1, or touch /etc or the system's Dovecot.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prefork_smtp.store import mbox  # noqa: E402
from prefork_smtp.store.envelope import Envelope, Recipient  # noqa: E402

IS_ROOT = os.geteuid() == 0
CCSMTP_USER = "nobody"          # ccsmtp drops to it as root; it owns the mailboxes
DOVECOT_MAIL_USER = "daemon"    # reads the mailboxes, cannot write them
START_TIMEOUT_S = 20.0
DOMAIN = "example.org"


class BenchError(Exception):
    """A server could not be set up: str() says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ids(user: str) -> tuple[int, int]:
    if not IS_ROOT:
        return os.getuid(), os.getgid()
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


# --- mailboxes and users -----------------------------------------------------------------

def message(n: int, rng: random.Random) -> bytes:
    """1-6 KB of text; every 50th has a '>From '-quoted line and lines starting with dots."""
    lines = [b"line %d of message %d, some text to fill it up a bit more" % (k, n)
             for k in range(rng.randint(15, 100))]
    if n % 50 == 0:
        lines += [b"From the start of a line", b">From quoted", b".leading dot", b".."]
    return (b"From: sender@example.net\r\nTo: user@example.org\r\nSubject: bench %d\r\n"
            b"Message-ID: <bench-%d@example.net>\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\n\r\n"
            % (n, n)) + b"\r\n".join(lines) + b"\r\n"


def write_mailbox(path: Path, count: int, seed: int) -> int:
    rng = random.Random(seed)
    envelope = Envelope("sender@example.net", (Recipient(f"{path.name}@{DOMAIN}", path.name),),
                        "client.example.net", "ESMTP", "192.0.2.7", "7BIT")
    size = 0
    with open(path, "wb") as f:
        for n in range(count):
            size += f.write(b"".join(mbox.format_copy(
                envelope, [message(n, rng)], queue_id=f"{seed:08X}{n:012X}",
                recipient=f"{path.name}@{DOMAIN}", received_at=1_790_000_000 + n,
                hostname="bench.invalid")))
    os.chown(path, *ids(CCSMTP_USER))
    os.chmod(path, 0o644)
    return size


def write_users(path: Path, users: list[str], password: str, scheme: str, home: Path) -> None:
    """One file for both servers."""
    if scheme == "SHA512-CRYPT":
        import crypt_r
        hashed = crypt_r.crypt(password, crypt_r.mksalt(crypt_r.METHOD_SHA512))
    elif scheme == "ARGON2ID":
        from prefork_smtp.auth.users import hash_password
        hashed = hash_password(password).split("}", 1)[1]
    else:
        raise ValueError(scheme)
    uid, gid = ids(DOVECOT_MAIL_USER)
    with open(path, "w") as f:
        for user in users:
            f.write(f"{user}:{{{scheme}}}{hashed}:{uid}:{gid}::{home / user}\n")
    os.chmod(path, 0o644)


# --- processes ---------------------------------------------------------------------------

def wait_for_pop3(port: int, proc: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"+OK"):
                    s.sendall(b"QUIT\r\n")
                    return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise BenchError(f"{name} did not greet on 127.0.0.1:{port}: {tail.strip()}")


class Pop3Target:
    name = ""

    def __init__(self, base: Path, spool: Path, users_file: Path):
        self.dir = base / self.name
        self.dir.mkdir(mode=0o755)
        self.spool = spool
        self.users_file = users_file
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "stderr.log"

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        return []

    def workers(self) -> list[psutil.Process]:
        """The processes that serve POP3 sessions."""
        raise NotImplementedError

    def _spawn(self, args: list[str]) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, cwd=self.dir)
        wait_for_pop3(self.port, self.proc, self.name, self.log)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class CcsmtpPop3(Pop3Target):
    name = "ccsmtp"

    def __init__(self, base: Path, spool: Path, users_file: Path, workers: int = 2):
        super().__init__(base, spool, users_file)
        self.worker_count = workers

    def start(self) -> None:
        config = self.dir / "ccsmtp.toml"
        config.write_text(f'users_file = "{self.users_file}"\nmax_connections_per_client = 0\n')
        config.chmod(0o644)
        args = [sys.executable, str(REPO / "bin" / "ccsmtp-master"), "-w", str(self.worker_count),
                "-l", f"127.0.0.1:{free_port()}", "-l", f"pop3://127.0.0.1:{self.port}",
                "-s", str(self.spool), "-d", DOMAIN, "-c", str(config),
                "--log-file", str(self.dir / "ccsmtp.log")]
        if IS_ROOT:
            args += ["-u", CCSMTP_USER]
        self._spawn(args)

    def workers(self) -> list[psutil.Process]:
        out = []
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                if " ".join(proc.cmdline()).startswith("ccsmtp: worker"):
                    out.append(proc)
        return out


def dovecot_binary() -> str | None:
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    pop3 = Path("/usr/lib/dovecot/pop3")
    return binary if os.path.exists(binary) and pop3.exists() else None


class DovecotPop3(Pop3Target):
    name = "dovecot"

    def start(self) -> None:
        binary = dovecot_binary()
        if binary is None:
            raise BenchError("Dovecot's POP3 server is not installed (Debian: dovecot-pop3d)")
        root = self.dir
        for sub in ("run", "state", "index"):
            (root / sub).mkdir(exist_ok=True)
        os.chown(root / "index", *ids(DOVECOT_MAIL_USER))
        internal = _account("dovecot", "nobody") if IS_ROOT else pwd.getpwuid(os.getuid()).pw_name
        login = _account("dovenull", "nobody") if IS_ROOT else internal
        internal_group = _group_of(internal)
        config = root / "dovecot.conf"
        config.write_text(f"""\
# A private Dovecot POP3 for ccsmtp's benchmark: loopback only, state under {root}.
instance_name = ccsmtp-pop3-bench-{root.parent.name}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {login}
first_valid_uid = 1
auth_username_format = %Ln
# The mailbox is ccsmtp's file; Dovecot keeps its indexes (and any other folders) apart.
mail_location = mbox:{root}/index/%u/mail:INBOX={self.spool}/%u:INDEX={root}/index/%u
mbox_read_locks = fcntl
mbox_write_locks = fcntl
# RETR does not mark messages seen: rounds stay repeatable, nothing to write back.
pop3_no_flag_updates = yes
passdb {{
  driver = passwd-file
  args = {self.users_file}
}}
userdb {{
  driver = passwd-file
  args = {self.users_file}
}}
# Dovecot's documented high-performance login mode: login processes serve many
# connections and stay up (the default starts one per connection).
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  chroot =
  service_count = 0
  process_min_avail = 2
}}
service anvil {{
  chroot =
}}
""")
        self._spawn([binary, "-F", "-c", str(config)])

    def workers(self) -> list[psutil.Process]:
        """The pop3 processes (one per session) and auth (where passwords are hashed:
        what a ccsmtp worker does in its threads). Titles are INSTANCE/NAME."""
        out = []
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                title = " ".join(proc.cmdline())
                if title.rsplit("/", 1)[-1].split(" ")[0] in ("pop3", "auth", "auth-worker"):
                    out.append(proc)
        return out


def _account(name: str, fallback: str) -> str:
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        return fallback


def _group_of(user: str) -> str:
    import grp
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
