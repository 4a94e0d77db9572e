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
- TLS (issue 8): with a TLSFiles (a test CA made once per run, make_tls_files), ccsmtp
  and Postfix get the same certificate: STARTTLS on their SMTP port and implicit TLS
  on a second one (tls_port).
- PROXY (issue 11): HAProxy, a private TCP-mode instance with one frontend per route,
  in front of ccsmtp instances (`-w 1`, their own spools and ports, `proxy_from`
  when the route sends PROXY v2 headers); a Route is what a client connects to
  (HAProxy's frontend or an instance itself) and the instances behind it.
Every server runs with the slow-disk shim preloaded when the bench built it
(slowdisk.py): its syncs then go through its own modelled device, whose flush time
the bench sets per phase (0 in the fast-disk phase: the shim then only counts).
Must not: listen anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
# run.py --pin: every server (and HAProxy) starts under `taskset -c SERVER_CPUS`, so that
# its processes, forked children included, stay off the load client's CPU.
SERVER_CPUS: str | None = None


def pinned(args: list[str]) -> list[str]:
    return ["taskset", "-c", SERVER_CPUS] + args if SERVER_CPUS else args


class BenchError(Exception):
    """A server could not be set up: str() says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A PROXY v2 header with the LOCAL command and no address (HAProxy's health checks send
# it): a server that takes PROXY headers from us then uses the connection's own address.
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])


def wait_for_greeting(port: int, proc: subprocess.Popen | None, name: str, log: Path | None,
                      preamble: bytes = b"") -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if preamble:
                    s.sendall(preamble)
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


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """The server certificate (and key) every TLS-speaking target uses, and the test CA
    that issued it, for the client's --cafile."""
    cert: Path
    key: Path
    ca: Path


TLS_NAMES = ("127.0.0.1", "mx.bench.test")     # the client checks the name it connects to


def make_tls_files(directory: Path) -> TLSFiles:
    """A test CA (trustme: ECDSA P-256 keys, as its default) and one server certificate
    for 127.0.0.1, as PEM files that ccsmtp's workers (nobody) and Postfix can read."""
    try:
        import trustme
    except ImportError:
        raise BenchError("TLS: trustme is not installed (pip install trustme)") from None
    directory.mkdir(mode=0o755)
    ca = trustme.CA()
    leaf = ca.issue_cert(*TLS_NAMES)
    files = TLSFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    leaf.cert_chain_pems[0].write_to_path(str(files.cert))
    leaf.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    for path in (files.cert, files.key, files.ca):
        os.chmod(path, 0o644)       # a throw-away key: the servers' users must read it
    return files


class Target:
    """One server under test."""

    name = ""
    stores = True               # False: nothing is delivered (smtp-sink)
    speaks_tls = False          # can be given a certificate (ccsmtp, Postfix)

    def __init__(self, base: Path, shim: Path | None = None, workers: int = 2,
                 tls: TLSFiles | None = None, name: str | None = None):
        self.name = name or type(self).name
        self.dir = base / self.name
        self.dir.mkdir(mode=0o755)
        self.mailboxes: list[str] = []
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "log"
        self.workers = workers
        self.device = Device(self.dir / "device", shim)
        self.tls = tls if self.speaks_tls else None
        self.tls_port = free_port() if self.tls else None     # implicit TLS (smtps)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def address(self, tls_mode: str = "") -> str:
        """Where a client connects: the SMTP port (plain or STARTTLS), or with tls_mode
        "smtps" the implicit-TLS port."""
        if tls_mode == "smtps":
            if self.tls_port is None:
                raise BenchError(f"{self.name}: no implicit-TLS listener")
            return f"127.0.0.1:{self.tls_port}"
        return self.server

    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def process_roots(self) -> list[int]:
        """The roots of the process trees whose CPU and memory count as this server's."""
        return [self.root_pid()]

    def mailbox(self, name: str) -> Path:
        raise NotImplementedError

    def mailbox_paths(self, name: str) -> list[Path]:
        """Every file where a message to mailbox NAME may land (several instances: one
        each)."""
        return [self.mailbox(name)]

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

    def _spawn(self, args: list[str], env: dict | None = None, preamble: bytes = b"") -> None:
        env = dict(env or os.environ, **self.device.env())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(pinned(args), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log,
                                         start_new_session=True, env=env, cwd=self.dir)
        wait_for_greeting(self.port, self.proc, self.name, self.log, preamble)


class Ccsmtp(Target):
    name = "ccsmtp"
    speaks_tls = True

    def __init__(self, *args, proxy_from: str | None = None, extra_config: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.proxy_from = proxy_from      # a network whose connections carry a PROXY header
        self.extra_config = extra_config  # more TOML lines (lmtp_bench.py: delivery = ...)

    def start(self, mailboxes: list[str]) -> None:
        self.mailboxes = mailboxes
        self.spool = self.dir / "spool"       # the master creates it (and chowns it as root)
        config = self.dir / "ccsmtp.toml"
        # Scenario D holds 10,000 connections from 127.0.0.1; Postfix exempts
        # $mynetworks from its per-client limit by default, this does the same.
        text = "max_connections_per_client = 0\n"
        if self.tls:
            text += f'tls_cert = "{self.tls.cert}"\ntls_key = "{self.tls.key}"\n'
        if self.proxy_from:
            text += f'proxy_from = ["{self.proxy_from}"]\n'
        config.write_text(text + self.extra_config)
        args = [sys.executable, str(REPO / "bin" / "ccsmtp-master"), "-w", str(self.workers),
                "-l", self.server, "-s", str(self.spool), "-d", DOMAIN, "-c", str(config),
                "--max-size", str(MAX_SIZE), "--hostname", "ccsmtp.bench.test",
                "--log-file", str(self.dir / "ccsmtp.log")]
        if self.tls_port:
            args += ["-l", f"smtps://127.0.0.1:{self.tls_port}"]
        if IS_ROOT:
            args += ["-u", RUN_AS]
        # Behind PROXY every connection from us must start with a header, the readiness
        # probe's too.
        self._spawn(args, preamble=PROXY_V2_LOCAL if self.proxy_from else b"")

    def mailbox(self, name: str) -> Path:
        return self.spool / name


class Postfix(Target):
    name = "postfix"
    speaks_tls = True

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
{self._tls_settings()}""")
        # Postfix refuses $1 substitution in mailbox maps, so every mailbox is listed.
        (conf / "vmailbox").write_text("".join(f"{m}@{DOMAIN} {m}\n" for m in mailboxes))
        master_cf = self.MASTER_CF.format(listen=self.server)
        if self.tls:
            # tlsmgr keeps the session-ticket keys that every smtpd process shares (it
            # is in Debian's stock master.cf); the second port is implicit TLS.
            master_cf += "tlsmgr    unix  - - n 1000? 1 tlsmgr\n"
            master_cf += (f"127.0.0.1:{self.tls_port} inet n - n - - smtpd "
                          "-o smtpd_tls_wrappermode=yes\n")
        (conf / "master.cf").write_text(master_cf)
        self.conf = conf
        result = subprocess.run(pinned(["postfix", "-c", str(conf), "start"]), capture_output=True,
                                text=True, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **self.device.env()))
        if result.returncode != 0:
            raise BenchError(f"postfix start failed: {self._maillog_tail()}")
        self.pidfile = queue / "pid" / "master.pid"
        wait_for_greeting(self.port, None, self.name, self.dir / "maillog")

    def _tls_settings(self) -> str:
        """The certificate, STARTTLS offered (`may`); everything else Postfix's default:
        no session cache database, session tickets (smtpd_tls_session_cache_timeout =
        3600s, keys from tlsmgr), TLS 1.3 when the client has it, no client
        certificates asked for."""
        if not self.tls:
            return ""
        return (f"smtpd_tls_cert_file = {self.tls.cert}\n"
                f"smtpd_tls_key_file = {self.tls.key}\n"
                "smtpd_tls_security_level = may\n")

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


# --- PROXY (issue 11): HAProxy in front of ccsmtp instances ---------------------------------

@dataclasses.dataclass
class Frontend:
    """One HAProxy frontend: its port, the instances it balances over (round robin),
    and whether it prefixes each connection with a PROXY v2 header (send-proxy-v2)."""
    name: str
    backends: list[Ccsmtp]
    send_proxy: bool
    port: int = dataclasses.field(default_factory=free_port)


class HAProxy:
    """A private HAProxy in TCP mode (`haproxy -db -f CONFIG`), one frontend per route.

    One thread (`nbthread 1`): its CPU is then one process's, measured beside the
    servers'; it runs as the bench's user and listens on 127.0.0.1 only."""

    name = "haproxy"

    def __init__(self, base: Path, frontends: list[Frontend]):
        self.dir = base / self.name
        self.dir.mkdir(mode=0o755)
        self.frontends = frontends
        self.config = self.dir / "haproxy.cfg"
        self.log = self.dir / "log"
        self.proc: subprocess.Popen | None = None

    def config_text(self) -> str:
        parts = ["""\
global
    maxconn 4096
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""]
        for fe in self.frontends:
            option = " send-proxy-v2" if fe.send_proxy else ""
            servers = "".join(f"    server s{i} {b.server}{option}\n"
                              for i, b in enumerate(fe.backends))
            parts.append(f"""
frontend {fe.name}
    bind 127.0.0.1:{fe.port}
    default_backend {fe.name}_out

backend {fe.name}_out
    balance roundrobin
{servers}""")
        return "".join(parts)

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(binary):
            raise BenchError("haproxy: not found (apt-get install haproxy)")
        self.config.write_text(self.config_text())
        with open(self.log, "ab") as log:
            # -db: foreground, no daemon, no master process; warnings to the log.
            self.proc = subprocess.Popen(pinned([binary, "-db", "-f", str(self.config)]),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, cwd=self.dir)
        for fe in self.frontends:       # through every frontend to its first instance
            wait_for_greeting(fe.port, self.proc, f"haproxy frontend {fe.name}", self.log)

    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait(10)


class CompositeDevice:
    """The modelled disks of several instances, read and set as one."""

    def __init__(self, devices: list[Device]):
        self.devices = devices

    def set_flush_ms(self, ms: float) -> None:
        for device in self.devices:
            device.set_flush_ms(ms)

    def counters(self) -> tuple[int, int]:
        pairs = [d.counters() for d in self.devices]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


class Route:
    """What a client of the PROXY scenario connects to: an instance itself, or an HAProxy
    frontend and the instances behind it. Its CPU, memory and mailboxes are those of
    its instances (HAProxy's CPU is measured apart: proxy_root_pid()). Starting and
    stopping are the instances' and HAProxy's own."""

    stores = True

    def __init__(self, name: str, backends: list[Ccsmtp], proxy: HAProxy | None = None,
                 frontend: Frontend | None = None):
        self.name = name
        self.backends = backends
        self.proxy = proxy
        self.frontend = frontend
        self.workers = sum(b.workers for b in backends)
        self.device = CompositeDevice([b.device for b in backends])

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.frontend.port}" if self.frontend else self.backends[0].server

    def address(self, tls_mode: str = "") -> str:
        if tls_mode:
            raise BenchError(f"{self.name}: the PROXY routes speak plain SMTP only")
        return self.server

    def process_roots(self) -> list[int]:
        return [b.root_pid() for b in self.backends]

    def proxy_root_pid(self) -> int | None:
        return self.proxy.root_pid() if self.proxy else None

    def mailbox_paths(self, name: str) -> list[Path]:
        return [b.mailbox(name) for b in self.backends]


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
