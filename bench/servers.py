"""The servers under test, each on its own loopback port under one temp directory.

Owns: writing each server's configuration, starting it, knowing its process tree
and where its mbox files appear, and stopping it (and everything it started).
- ccsmtp: bin/ccsmtp-master -w 2 (or -w N for the scaling curve), spool of
  per-recipient mbox files.
- Postfix: a private instance (`postfix -c DIR`) with its own main.cf, master.cf,
  queue and data directories, delivering through virtual(8) to one mbox file per
  recipient. Needs root (Postfix's master runs as root, daemons as `postfix`).
- aiosmtpd 1.4.6: bench/aiosmtpd_mbox.py, a handler that appends to an mbox and
  fsyncs before 250; installed on demand into a cache directory, never a runtime
  dependency of ccsmtp.
- smtp-sink: Postfix's test sink; stores nothing (the no-storage ceiling).
Every server runs with the slow-disk shim preloaded when the bench built it
(slowdisk.py): its syncs then go through its own modelled device, whose flush time
the bench sets per phase (0 in the fast-disk phase: the shim then only counts).
Must not: listen anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from slowdisk import Device

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
DOMAIN = "example.org"
MAX_SIZE = 104_857_600          # every server accepts the 50 MB message of scenario F
AIOSMTPD_VERSION = "1.4.6"
DEPS_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ccsmtp-bench" / \
    f"aiosmtpd-{AIOSMTPD_VERSION}"
IS_ROOT = os.geteuid() == 0
RUN_AS = "nobody"
START_TIMEOUT_S = 20.0


class BenchError(Exception):
    """A server could not be set up: str() says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_greeting(port: int, proc: subprocess.Popen | None, name: str, log: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise BenchError(f"{name} did not greet on 127.0.0.1:{port}: {tail.strip()}")


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in root.children(recursive=True) + [root]:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)


class Target:
    """One server under test."""

    name = ""
    stores = True               # False: nothing is delivered (smtp-sink)

    def __init__(self, base: Path, shim: Path | None = None, workers: int = 2):
        self.dir = base / self.name
        self.dir.mkdir(mode=0o755)
        self.mailboxes: list[str] = []
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "log"
        self.workers = workers
        self.device = Device(self.dir / "device", shim)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def mailbox(self, name: str) -> Path:
        raise NotImplementedError

    def start(self, mailboxes: list[str]) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop and start again on the same port, directories and mailboxes."""
        self.stop()
        self.start(self.mailboxes)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait(10)

    def _spawn(self, args: list[str], env: dict | None = None) -> None:
        env = dict(env or os.environ, **self.device.env())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, env=env, cwd=self.dir)
        wait_for_greeting(self.port, self.proc, self.name, self.log)


class Ccsmtp(Target):
    name = "ccsmtp"

    def start(self, mailboxes: list[str]) -> None:
        self.mailboxes = mailboxes
        self.spool = self.dir / "spool"       # the master creates it (and chowns it as root)
        config = self.dir / "ccsmtp.toml"
        # Scenario D holds 10,000 connections from 127.0.0.1; Postfix exempts
        # $mynetworks from its per-client limit by default, this does the same.
        config.write_text("max_connections_per_client = 0\n")
        args = [sys.executable, str(REPO / "bin" / "ccsmtp-master"), "-w", str(self.workers),
                "-l", self.server, "-s", str(self.spool), "-d", DOMAIN, "-c", str(config),
                "--max-size", str(MAX_SIZE), "--hostname", "ccsmtp.bench.test",
                "--log-file", str(self.dir / "ccsmtp.log")]
        if IS_ROOT:
            args += ["-u", RUN_AS]
        self._spawn(args)

    def mailbox(self, name: str) -> Path:
        return self.spool / name


class Postfix(Target):
    name = "postfix"

    MASTER_CF = """\
{listen} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

    def start(self, mailboxes: list[str]) -> None:
        self.mailboxes = mailboxes
        if not IS_ROOT:
            raise BenchError("postfix: needs root (its master runs as root); run the bench as root")
        for tool in ("postfix", "postconf"):
            if shutil.which(tool) is None:
                raise BenchError(f"postfix: {tool} not found (apt-get install postfix)")
        conf, queue, data, mail = (self.dir / d for d in ("conf", "queue", "data", "mail"))
        for d in (conf, queue, data, mail):
            d.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(data, "postfix")
        shutil.chown(mail, RUN_AS, _group_of(RUN_AS))
        self.mail = mail
        daemon_dir = _postconf("daemon_directory")
        # Only what a private instance needs, plus: per-recipient mbox files through
        # virtual(8) (which fsyncs each append, as local(8) does), no size limits in
        # the way of scenario F, a log file instead of syslog. Everything else
        # (process limits, concurrency, queue fsyncs) is Postfix's default.
        (conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = {_postconf("command_directory")}
daemon_directory = {daemon_dir}
shlib_directory = {_postconf("shlib_directory")}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
relayhost =
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = texthash:{conf}/vmailbox
virtual_uid_maps = static:{_uid_of(RUN_AS)}
virtual_gid_maps = static:{_gid_of(RUN_AS)}
virtual_mailbox_limit = 0
mailbox_size_limit = 0
message_size_limit = {MAX_SIZE}
maillog_file_prefixes = {self.dir}
maillog_file = {self.dir}/maillog
biff = no
smtputf8_enable = no
import_environment = {self._import_environment()}
""")
        # Postfix refuses $1 substitution in mailbox maps, so every mailbox is listed.
        (conf / "vmailbox").write_text("".join(f"{m}@{DOMAIN} {m}\n" for m in mailboxes))
        (conf / "master.cf").write_text(self.MASTER_CF.format(listen=self.server))
        self.conf = conf
        result = subprocess.run(["postfix", "-c", str(conf), "start"], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **self.device.env()))
        if result.returncode != 0:
            raise BenchError(f"postfix start failed: {self._maillog_tail()}")
        self.pidfile = queue / "pid" / "master.pid"
        wait_for_greeting(self.port, None, self.name, self.dir / "maillog")

    def _import_environment(self) -> str:
        # Postfix's master cleans its children's environment: the shim goes through
        # import_environment (Postfix's default list, plus the shim's variables).
        default = _postconf("import_environment")
        extra = " ".join(f"{k}={v}" for k, v in self.device.env().items())
        return f"{default} {extra}".strip()

    def _maillog_tail(self) -> str:
        log = self.dir / "maillog"
        return log.read_text(errors="replace")[-1500:].strip() if log.exists() else "(no maillog)"

    def root_pid(self) -> int:
        return int(self.pidfile.read_text().split()[0])

    def mailbox(self, name: str) -> Path:
        return self.mail / name

    def stop(self) -> None:
        if not hasattr(self, "conf"):
            return
        try:
            pid = self.root_pid()
        except (OSError, ValueError):
            pid = None
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True,
                       stdin=subprocess.DEVNULL)
        if pid is not None:
            deadline = time.monotonic() + 15
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if psutil.pid_exists(pid):
                kill_tree(pid)


class Aiosmtpd(Target):
    name = "aiosmtpd"

    def start(self, mailboxes: list[str]) -> None:
        ensure_aiosmtpd()
        self.mail = self.dir / "mail"
        self.mail.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(DEPS_DIR))
        self._spawn([sys.executable, str(BENCH / "aiosmtpd_mbox.py"), "--listen", self.server,
                     "--domain", DOMAIN, "--mail-dir", str(self.mail),
                     "--max-size", str(MAX_SIZE)], env=env)

    def mailbox(self, name: str) -> Path:
        return self.mail / name


class SmtpSink(Target):
    name = "smtp-sink"
    stores = False

    def start(self, mailboxes: list[str]) -> None:
        if shutil.which("smtp-sink") is None:
            raise BenchError("smtp-sink: not found (it comes with the Debian package postfix)")
        args = ["smtp-sink", "-m", "20000"]
        if IS_ROOT:
            args += ["-u", RUN_AS]
        self._spawn(args + [self.server, "4096"])

    def mailbox(self, name: str) -> Path:
        raise BenchError("smtp-sink stores nothing")


TARGETS = {cls.name: cls for cls in (Ccsmtp, Postfix, Aiosmtpd, SmtpSink)}


def ensure_aiosmtpd() -> None:
    """aiosmtpd==1.4.6 in a cache directory (pip install --target), for the bench only."""
    marker = DEPS_DIR / "aiosmtpd" / "__init__.py"
    if marker.exists():
        return
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                             "--disable-pip-version-check", "--target", str(DEPS_DIR),
                             f"aiosmtpd=={AIOSMTPD_VERSION}"], capture_output=True, text=True)
    if result.returncode != 0 or not marker.exists():
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise BenchError(f"aiosmtpd: cannot install aiosmtpd=={AIOSMTPD_VERSION}: {last}")


def _postconf(name: str) -> str:
    out = subprocess.run(["postconf", "-dh", name], capture_output=True, text=True)
    return out.stdout.strip()


def _uid_of(user: str) -> int:
    import pwd
    return pwd.getpwnam(user).pw_uid


def _gid_of(user: str) -> int:
    import pwd
    return pwd.getpwnam(user).pw_gid


def _group_of(user: str) -> str:
    import grp
    return grp.getgrgid(_gid_of(user)).gr_name
