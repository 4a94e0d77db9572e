"""Running ccsmtp as a daemon (SPEC §4): supervision, recycling, limits across workers,
tarpit, log reopening and ccsmtp-status, against the real master on a loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import DOMAIN, REPO, make_message, recv_reply
from prefork_smtp.process import master as master_module
from prefork_smtp.process.master import Child, Master, MasterError
from prefork_smtp.process.scoreboard import WORKER

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


def test_ccsmtp_status_without_a_server_is_one_clear_line(work_dir):
    out = subprocess.run([sys.executable, str(STATUS), "-s", str(work_dir / "nothing")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no scoreboard" in out.stderr
    assert "Traceback" not in out.stderr
