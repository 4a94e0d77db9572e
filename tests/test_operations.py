"""Running ccsmtp as a daemon (SPEC §4): supervision, recycling, limits across workers,
tarpit, log reopening and ccsmtp-status, against the real master on a loopback port."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import DOMAIN, REPO, free_port, make_message, recv_reply
from prefork_smtp import config as configuration
from prefork_smtp import logs
from prefork_smtp.process import master as master_module
from prefork_smtp.process import privileges
from prefork_smtp.process.anvil import Anvil
from prefork_smtp.process.listeners import Listener, bind
from prefork_smtp.process.master import Child, Master, MasterError
from prefork_smtp.auth.throttle import Throttle
from prefork_smtp.credentials import Credentials
from prefork_smtp.process.scoreboard import WORKER, Scoreboard
from prefork_smtp.process.shared import SharedMemory
from prefork_smtp.process.worker import WORKER_BOOT_ERROR, Worker
from prefork_smtp.service import Service
from prefork_smtp.services import SERVICES
from prefork_smtp.store import queue
from prefork_smtp.tools import status as status_module

STATUS = REPO / "bin" / "ccsmtp-status"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def connect_from(server, source_ip: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((server.host, server.port), timeout=5,
                                    source_address=(source_ip, 0))
    return sock, recv_reply(sock)


# --- supervision --------------------------------------------------------------------

@pytest.mark.parametrize("server", [{"config": "worker_timeout = 1.5\n"}], indirect=True)
def test_a_worker_without_heartbeat_is_killed_and_replaced(server):
    [victim, *_] = server.wait_for_processes("ccsmtp: worker", 2)
    victim.suspend()   # SIGSTOP: alive, but it makes no progress
    started = time.monotonic()
    wait_until(lambda: not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE,
               6, "hung worker killed")
    server.wait_for_processes("ccsmtp: worker", 2, timeout=3, exclude={victim.pid})
    assert time.monotonic() - started < 6
    assert "sent no heartbeat" in server.stderr()
    server.send([f"alice@{DOMAIN}"], make_message("<after-hang@test>"))
    server.wait_for_messages("alice", 1)


def test_killing_workers_under_load_loses_no_acknowledged_message(server):
    acknowledged: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            message_id = f"<load-{n}-{i}@test>"
            try:
                server.send([f"load@{DOMAIN}"], make_message(message_id))
                acknowledged.append(message_id)
            except (OSError, AssertionError) as e:
                errors.append(repr(e))    # a killed worker drops its sessions: fine
            i += 1

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        for _ in range(4):
            time.sleep(0.4)
            for worker in server.workers()[:1]:
                worker.kill()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(acknowledged) > 50
    ids = [m["Message-ID"] for m in server.settle(["load"], timeout=20)["load"]]
    missing = set(acknowledged) - set(ids)
    assert not missing, f"{len(missing)} acknowledged messages lost"
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    server.wait_for_processes("ccsmtp: worker", 2)


@pytest.mark.parametrize("server", [{"config": "max_sessions_per_worker = 5\n"}], indirect=True)
def test_workers_retire_after_max_sessions_and_no_client_is_refused(server):
    before = {p.pid for p in server.workers()}
    for i in range(30):
        sock, greeting = server.connect()
        with sock:
            assert greeting.startswith(b"220 "), (i, greeting)
            sock.sendall(b"QUIT\r\n")
            assert recv_reply(sock).startswith(b"221")
    wait_until(lambda: not before & {p.pid for p in server.workers()}, 10,
               "every original worker retired")
    # Retirees finish their last sessions beside their successors, then leave.
    wait_until(lambda: len(server.workers()) == 2, 10, "back to two workers")
    assert "retiring after" in server.stderr()


@pytest.mark.slow
@pytest.mark.parametrize("server", [{"config": "max_worker_rss = 1024\n"}], indirect=True)
def test_a_worker_over_max_worker_rss_retires_and_is_replaced(server):
    before = {p.pid for p in server.workers()}
    wait_until(lambda: not before & {p.pid for p in server.workers()}, 15,
               "workers over max_worker_rss replaced")
    assert "max_worker_rss" in server.stderr()
    server.send([f"alice@{DOMAIN}"], make_message("<rss@test>"))
    server.wait_for_messages("alice", 1)


def test_when_the_master_dies_its_children_exit(server):
    children = server.workers() + server.delivery()
    assert len(children) == 3
    server.expect_clean_exit = False
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(5)
    gone = lambda: all(not psutil.pid_exists(p.pid) or p.status() == psutil.STATUS_ZOMBIE
                       for p in children)
    wait_until(gone, 10, "workers and delivery exit after the master died")
    with pytest.raises(OSError):   # nobody holds the port any more
        socket.create_connection((server.host, server.port), timeout=2).close()


def test_children_that_die_at_start_up_are_throttled_then_the_master_gives_up():
    # The policy alone, without forking: _after_death is what reap_children calls.
    master = Master.__new__(Master)
    master.stop_mode = None
    master.quick_deaths = 0
    master.next_spawn_at = 0.0
    now = time.monotonic()
    delays = []
    with pytest.raises(MasterError, match="died at start-up"):
        for pid in range(1, 100):
            master._after_death(Child(pid, 0, WORKER, 1, 0, now), 256)   # exit status 1 at once
            delays.append(master.next_spawn_at - time.monotonic())
    assert len(delays) == master_module.MAX_QUICK_DEATHS - 1
    nominal = [round(d, 1) for d in delays]
    assert nominal == sorted(nominal) and delays[-1] > 1.0   # backing off, not fork-looping
    # A worker that lived a while resets the count.
    master.quick_deaths = 5
    master._after_death(Child(1000, 0, WORKER, 1, 0, now - 60), 9)
    assert master.quick_deaths == 0


@pytest.mark.parametrize("server", [{"workers": 1}], indirect=True)
def test_a_worker_that_cannot_start_stops_the_master_instead_of_fork_looping(server):
    # SPEC §4. A real way for a worker to fail at start: the queue it must write was
    # made unwritable after the master checked it (a careless chown or chmod -R).
    tmp = server.spool / ".ccsmtp" / "tmp"
    server.wait_for_processes("ccsmtp: worker", 1)
    server.expect_clean_exit = False
    tmp.chmod(0o500)
    try:
        server.send_signal(signal.SIGTTIN)      # one more worker, which cannot start
        code = server.proc.wait(20)
    finally:
        tmp.chmod(0o700)
    log = server.stderr()
    assert code == 1, log
    assert log.count("cannot start") == 1, log   # one attempt: no fork loop, no back-off
    assert f"worker 2 cannot start: the smtp service: {tmp} is not writable" in log, log
    assert "worker 2 could not start (exit 3;" in log, log
    assert "Traceback" not in log


def _run_worker(tmp_path, port: int, services=SERVICES, close_listener: bool = False) -> int:
    """Worker.run() in a forked child, as the master runs it; its exit code."""
    spool = str(tmp_path / "spool")
    os.mkdir(spool)
    queue.make_dirs(spool)
    queue.recover(spool)        # the log, as the master leaves it before forking workers
    cfg = configuration.build({"spool": spool, "listen": [f"127.0.0.1:{port}"],
                               "domains": ["example.org"]})
    listener = Listener(bind(cfg.listen[0]), cfg.listen[0])
    if close_listener:
        listener.sock.close()
    board = Scoreboard(str(tmp_path / "scoreboard"), create=True)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            logs.setup("info", None)     # to stderr, as ccsmtp-master logs
            shared = SharedMemory(board, Anvil(), Throttle())
            code = Worker(1, 0, cfg, [listener], services, Credentials(), shared, None, None,
                          os.getppid()).run()
        finally:
            os._exit(code)
    listener.sock.close()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _failing_service(error: BaseException) -> dict[str, Service]:
    def start(context):
        raise error
    return {"smtp": Service("smtp", "smtp", start)}


@pytest.mark.parametrize("case, code, line", [
    ("closed listener", WORKER_BOOT_ERROR,
     "critical: worker 1 cannot start: listener 127.0.0.1:{port}: Bad file descriptor"),
    ("service fails", WORKER_BOOT_ERROR,
     "critical: worker 1 cannot start: the smtp service: broken"),
    ("out of descriptors", 1,
     "error: worker 1 cannot start: the smtp service: Too many open files (short of a "
     "resource: may pass)"),
])
def test_worker_start_up_failures_exit_with_one_log_line(tmp_path, capfd, case, code, line):
    services = {"service fails": _failing_service(ValueError("broken")),
                "out of descriptors": _failing_service(OSError(errno.EMFILE,
                                                               os.strerror(errno.EMFILE)))}
    port = free_port()
    got = _run_worker(tmp_path, port, services.get(case, SERVICES),
                      close_listener=case == "closed listener")
    err = capfd.readouterr().err
    assert got == code, err
    lines = [text.split(": ", 1)[1] for text in err.splitlines() if "worker 1" in text]
    assert lines == [line.format(port=port)], err
    assert "Traceback" not in err


# --- limits across workers ----------------------------------------------------------

def test_sixty_connections_from_one_client_get_421_past_the_limit_while_others_are_served(server):
    held, refused = [], 0
    try:
        for _ in range(60):
            sock, greeting = connect_from(server, "127.0.0.1")
            if greeting.startswith(b"220 "):
                held.append(sock)
            else:
                assert greeting.startswith(b"421 4.7.0"), greeting
                refused += 1
                sock.close()
        assert len(held) == 50 and refused == 10
        other, greeting = connect_from(server, "127.0.0.2")
        with other:
            assert greeting.startswith(b"220 ")
        assert {p.pid for p in server.workers()}, "served by the workers"
    finally:
        for sock in held:
            sock.close()
    # The limit counts open connections: once they are closed, the client is welcome.
    wait_until(lambda: connect_from(server, "127.0.0.1")[1].startswith(b"220 "), 5,
               "connections counted down after close")


@pytest.mark.parametrize("server", [{"config": "soft_error_limit = 2\nerror_delay = 0.4\n"}],
                         indirect=True)
def test_errors_past_the_soft_limit_are_slowed_down(server):
    sock, _ = server.connect()
    with sock:
        timings = []
        for _ in range(5):
            started = time.monotonic()
            sock.sendall(b"BOGUS\r\n")
            assert recv_reply(sock).startswith(b"500 5.5.2")
            timings.append(time.monotonic() - started)
        assert max(timings[:2]) < 0.3
        assert min(timings[3:]) >= 0.35


@pytest.mark.parametrize("server", [{"config": "hard_error_limit = 3\nerror_delay = 0\n"}],
                         indirect=True)
def test_more_errors_than_the_hard_limit_close_with_421(server):
    sock, _ = server.connect()
    with sock:
        sock.sendall(b"BOGUS\r\n" * 4)
        replies = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            replies += chunk
    assert replies.count(b"500 5.5.2") == 4
    assert replies.endswith(b"421 4.7.0 Error: too many errors\r\n")


# --- logs and status ----------------------------------------------------------------

def test_usr1_reopens_the_log_file(start_server, work_dir):
    log_file = work_dir / "ccsmtp.log"
    server = start_server(extra_args=["--log-file", str(log_file)])
    wait_until(lambda: log_file.exists() and "master started" in log_file.read_text(), 5,
               "master logs to the file")
    rotated = work_dir / "ccsmtp.log.1"
    log_file.rename(rotated)
    # As logrotate's "create" does: the server's user cannot create files in the
    # log directory once it has dropped root.
    log_file.touch()
    if os.geteuid() == 0:
        os.chown(log_file, psutil.Process(server.pid).uids().real, -1)
    server.send_signal(signal.SIGUSR1)
    wait_until(lambda: "SIGUSR1" in log_file.read_text(), 5, "master logs to the new file")
    server.send([f"alice@{DOMAIN}"], make_message("<rotated@test>"))
    server.wait_for_messages("alice", 1)
    # Workers write their lines in batches (logs.BATCH_S): wait for both processes.
    text = wait_until(lambda: (t := log_file.read_text()) and "status=sent" in t
                      and "ccsmtp/smtpd[" in t and t, 5, "delivery and workers log to the new file")
    assert "ccsmtp/smtpd[" in text and "SIGUSR1" in text
    assert "status=sent" not in rotated.read_text()


def test_ccsmtp_status_lists_the_master_and_its_workers(server):
    server.send([f"alice@{DOMAIN}"], make_message("<status@test>"))
    server.wait_for_messages("alice", 1)

    def status() -> list[dict]:
        out = subprocess.run([sys.executable, str(STATUS), "-s", str(server.spool), "--json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    # The scoreboard is posted with each heartbeat (every second).
    rows = wait_until(lambda: (r := status()) and sum(
        row["messages"] for row in r if row["role"].startswith("worker")) >= 1 and r,
        5, "the message counted in the status")
    by_role = {row["role"]: row for row in rows}
    assert by_role["master"]["pid"] == server.pid
    worker_pids = {row["pid"] for row in rows if row["role"].startswith("worker")}
    assert worker_pids == {p.pid for p in server.workers()}
    assert by_role["delivery"]["pid"] == server.delivery()[0].pid
    expected_user = "nobody" if os.geteuid() == 0 else psutil.Process().username()
    assert all(row["user"] == expected_user and row["rss_bytes"] > 0 for row in rows)
    table = subprocess.run([sys.executable, str(STATUS), "-s", str(server.spool)],
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and "worker 1" in table.stdout and "delivery" in table.stdout


def status_json(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(STATUS), "--json", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_ccsmtp_status_alone_finds_every_running_master(start_server):
    servers = [start_server(workers=1), start_server(workers=2)]
    for server, workers in zip(servers, (1, 2)):
        server.wait_for_processes("ccsmtp: worker", workers)
        server.wait_for_processes("ccsmtp: delivery", 1)
    rows = status_json()       # no -s: from the process table (other masters may be there)
    for server in servers:
        mine = [row for row in rows if row["master_pid"] == server.pid]
        assert mine[0]["role"] == "master" and mine[0]["pid"] == server.pid
        assert {row["spool"] for row in mine} == {str(server.spool)}
        assert {row["pid"] for row in mine if row["role"].startswith("worker")} == \
            {p.pid for p in server.workers()}
        assert [row["pid"] for row in mine if row["role"] == "delivery"] == \
            [p.pid for p in server.delivery()]
        assert all(set(row["sessions_by_service"]) == {"smtp", "pop3", "imap"}
                   for row in mine[1:])
    table = subprocess.run([sys.executable, str(STATUS)], capture_output=True, text=True,
                           timeout=30)
    assert table.returncode == 0, table.stderr
    for server, workers in zip(servers, (1, 2)):
        assert (f"ccsmtp on {server.spool}: master {server.pid}, {workers} worker(s), "
                f"listening on 127.0.0.1:{server.port}\n") in table.stdout


def test_ccsmtp_status_counts_open_sessions_per_service(server):
    sock, greeting = server.connect()
    with sock:
        assert greeting.startswith(b"220 ")

        def smtp_sessions() -> int:
            rows = [row for row in status_json("-s", str(server.spool))
                    if row["role"].startswith("worker")]
            return sum(row["sessions_by_service"]["smtp"] for row in rows) == 1 and \
                sum(row["sessions"] for row in rows) == 1

        wait_until(smtp_sessions, 5, "one open SMTP session in the status")


def test_the_table_shows_sessions_per_service_when_more_than_smtp_listens():
    def instance(title: str, pop3: int = 5) -> status_module.Instance:
        rows = [{"role": "master", "pid": 10, "user": "ccsmtp", "rss_bytes": 2**20},
                {"role": "worker 1", "pid": 11, "user": "ccsmtp", "rss_bytes": 2**20,
                 "sessions": 2 + pop3, "messages": 3,
                 "sessions_by_service": {"smtp": 2, "pop3": pop3, "imap": 0}}]
        return status_module.Instance("/srv/mail", 10, title, rows=rows)

    both = status_module.format_table(instance(
        "ccsmtp: master -w 1 0.0.0.0:25 pop3s://0.0.0.0:995 -s /srv/mail")).splitlines()
    assert both[0] == "ccsmtp on /srv/mail: master 10, 1 worker(s), listening on 0.0.0.0:25 " \
                      "pop3s://0.0.0.0:995"
    assert both[1].split() == ["ROLE", "PID", "USER", "RSS", "CPU%", "SMTP", "POP3",
                               "MESSAGES", "UPTIME"]
    assert both[3].split()[:8] == ["worker", "1", "11", "ccsmtp", "1.0M", "0.0", "2", "5"]
    smtp = status_module.format_table(instance("ccsmtp: master -w 1 0.0.0.0:25", pop3=0))
    assert "SESSIONS" in smtp.splitlines()[1].split() and "POP3" not in smtp
    assert smtp.splitlines()[3].split()[6] == "2"
    # A family with sessions open is shown even when the title does not say (a stop).
    stopping = status_module.format_table(instance("ccsmtp: master [graceful stop]", pop3=1))
    assert stopping.splitlines()[1].split()[5:7] == ["SMTP", "POP3"]


@pytest.mark.parametrize("title, spool", [
    ("ccsmtp: master -w 8 0.0.0.0:25 [::]:25", "/var/spool/ccsmtp"),
    ("ccsmtp: master -w 2 127.0.0.1:2525 -s /srv/my spool", "/srv/my spool"),
    ("ccsmtp: master [graceful stop] -s /srv/x", "/srv/x"),
])
def test_the_spool_of_a_master_is_read_from_its_title(title, spool):
    assert status_module.spool_of(title) == spool


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become the server's user")
def test_ccsmtp_status_as_the_servers_own_user(server):
    """What the ccsmtp user can see of a master that dropped root: not its memory maps
    or cwd (the kernel hides them), but its title, which names the spool."""
    server.wait_for_processes("ccsmtp: worker", 2)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(read_end)
            privileges.drop(privileges.resolve(psutil.Process(server.pid).username(), None))
            try:
                psutil.Process(server.pid).memory_maps()
                hidden = False
            except psutil.AccessDenied:
                hidden = True
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                status_code = status_module.main(["--json"])
            with os.fdopen(write_end, "w") as out:
                json.dump({"hidden": hidden, "code": status_code, "out": captured.getvalue()}, out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as result_file:
        result = json.loads(result_file.read() or "{}")
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert result["hidden"] and result["code"] == 0
    mine = [row for row in json.loads(result["out"]) if row["master_pid"] == server.pid]
    assert [row["role"] for row in mine] == ["master", "worker 1", "worker 2", "delivery"]


def test_ccsmtp_status_with_no_master_running_is_one_line_and_exit_1():
    # In a PID namespace of its own, nothing else runs: not even the masters of other
    # tests on this machine.
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    ns = ["--pid", "--fork", "--mount-proc"] if os.geteuid() == 0 else \
        ["--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
    out = subprocess.run([unshare, *ns, sys.executable, str(STATUS)], capture_output=True,
                         text=True, timeout=30)
    if out.stderr.startswith("unshare:"):
        pytest.skip(f"no PID namespace here: {out.stderr.strip()}")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == "ccsmtp-status: error: no ccsmtp master is running " \
                         "(start one with ccsmtp-master)\n"


def test_ccsmtp_status_without_a_server_is_one_clear_line(work_dir):
    out = subprocess.run([sys.executable, str(STATUS), "-s", str(work_dir / "nothing")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no scoreboard" in out.stderr
    assert "Traceback" not in out.stderr
