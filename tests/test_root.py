"""Tests that need root: binding below 1024, dropping privileges for good, and the
mail tools an administrator will point at the spool (swaks to send, mutt to read).

Skipped unless run as root. The server is the real master (conftest.py), started as
root with `-u nobody`.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import socket
import subprocess
import time
import uuid

import psutil
import pytest

from conftest import (DOMAIN, RUN_AS, SENDER, Server, free_port, make_message,
                      master_command, process_title)
from prefork_smtp.process import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def free_low_port() -> int:
    """A free port in 600-1000 (below 1024: only root may bind it)."""
    for port in range(600, 1000):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 600-1000")


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def ccsmtp_processes(server: Server) -> list[psutil.Process]:
    master = psutil.Process(server.pid)
    return [master] + [p for p in master.children(recursive=True)
                       if process_title(p).startswith("ccsmtp: ")]


def test_low_port_then_every_process_runs_unprivileged(start_server):
    port = free_low_port()
    server = start_server(port=port)
    server.wait_for_processes("ccsmtp: worker", 2)
    server.wait_for_processes("ccsmtp: delivery", 1)
    nobody = pwd.getpwnam(RUN_AS)
    procs = ccsmtp_processes(server)
    titles = sorted(process_title(p).split(" [")[0] for p in procs)
    assert titles == ["ccsmtp: delivery", f"ccsmtp: master -w 2 127.0.0.1:{port} -s {server.spool}",
                      "ccsmtp: worker 1", "ccsmtp: worker 2"]
    for proc in procs:
        status = proc_status(proc.pid)
        what = f"{process_title(proc)} (pid {proc.pid})"
        # Real, effective, saved and filesystem IDs: Uid/Gid list all four.
        assert [int(u) for u in status["Uid"].split()] == [nobody.pw_uid] * 4, what
        assert [int(g) for g in status["Gid"].split()] == [nobody.pw_gid] * 4, what
        assert all(u != 0 for u in proc.uids()) and all(g != 0 for g in proc.gids()), what
        assert status["Groups"].split() == [], what   # setgroups([]): root's groups gone
        # No capability left that could give root back.
        assert int(status["CapPrm"], 16) == 0 and int(status["CapEff"], 16) == 0, what
    # The spool was created for the user, and a session still works end to end.
    assert os.stat(server.spool).st_uid == nobody.pw_uid
    server.send([f"alice@{DOMAIN}"], make_message("<low-port@test>", "low port"))
    [msg] = server.wait_for_messages("alice", 1)
    assert msg["Message-ID"] == "<low-port@test>"
    info = os.stat(server.path("alice"))
    assert (info.st_uid, info.st_mode & 0o777) == (nobody.pw_uid, 0o600)


def reader_group() -> grp.struct_group:
    """A group the server's user is not in: its mailboxes get it from the spool alone."""
    nobody = pwd.getpwnam(RUN_AS)
    groups = sorted(grp.getgrall(), key=lambda g: g.gr_name != "mail")
    for group in groups:
        if group.gr_gid not in (0, nobody.pw_gid) and RUN_AS not in group.gr_mem:
            return group
    pytest.skip("no group to test spool_group with")


def test_spool_group_gives_new_mailboxes_its_group_and_mode_without_a_group_for_us(
        start_server):
    group = reader_group()
    server = start_server(config=f'spool_group = "{group.gr_name}"\nspool_mode = 0o660\n')
    server.send([f"alice@{DOMAIN}"], make_message("<group@test>", "for the readers"))
    server.wait_for_messages("alice", 1)
    nobody = pwd.getpwnam(RUN_AS)
    mailbox = os.stat(server.path("alice"))
    assert (mailbox.st_uid, mailbox.st_gid) == (nobody.pw_uid, group.gr_gid)
    assert stat.S_IMODE(mailbox.st_mode) == 0o660          # whatever the umask
    spool = os.stat(server.spool)
    assert spool.st_gid == group.gr_gid and spool.st_mode & stat.S_ISGID
    assert spool.st_mode & 0o050 == 0o050                  # the readers may enter
    state = os.stat(server.spool / ".ccsmtp")
    assert stat.S_IMODE(state.st_mode) & 0o077 == 0         # the queue stays private
    # The server holds no supplementary group for this (nor anything else).
    for proc in ccsmtp_processes(server):
        status = proc_status(proc.pid)
        assert status["Groups"].split() == [], process_title(proc)
        assert [int(g) for g in status["Gid"].split()] == [nobody.pw_gid] * 4
        assert int(status["CapPrm"], 16) == 0 and int(status["CapEff"], 16) == 0


def test_dropping_privileges_leaves_no_way_back_to_root():
    identity = privileges.resolve(RUN_AS, None)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            privileges.drop(identity)
            refused = 0
            for regain in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setgid(0),
                           lambda: os.setegid(0), lambda: os.setgroups([0]),
                           lambda: os.setresuid(0, 0, 0)):
                try:
                    regain()
                except PermissionError:
                    refused += 1
            ids = (os.getresuid(), os.getresgid(), os.getgroups())
            code = 0 if refused == 6 and ids == ((identity.uid,) * 3, (identity.gid,) * 3, []) else 1
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_spool_owned_by_someone_else_is_refused(work_dir):
    spool = work_dir / "root-owned"
    spool.mkdir()   # root's, not nobody's
    t0 = time.monotonic()
    proc = subprocess.run(master_command("-u", RUN_AS, "-l", f"127.0.0.1:{free_port()}",
                                         "-s", str(spool)),
                          capture_output=True, text=True, timeout=10)
    assert time.monotonic() - t0 < 3
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(spool) in lines[0] and "chown" in lines[0], lines[0]


def test_root_as_the_user_to_become_is_refused(work_dir):
    proc = subprocess.run(master_command("-u", "root", "-l", f"127.0.0.1:{free_port()}",
                                         "-s", str(work_dir / "spool")),
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "root" in lines[0], proc.stderr


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_sends_a_message_that_arrives(server):
    subject = f"swaks {uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        ["swaks", "--server", server.host, "--port", str(server.port), "--helo", "swaks.test",
         "--from", SENDER, "--to", f"alice@{DOMAIN}", "--header", f"Subject: {subject}",
         "--body", "Sent by swaks.\n.leading dot\nFrom swaks"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "250 2.0.0 Ok: queued as" in proc.stdout
    [msg] = server.wait_for_messages("alice", 1)
    assert msg["Subject"] == subject
    assert " ".join(msg["Received"].split()).startswith("from swaks.test (unknown [127.0.0.1])")
    body = msg.get_payload()
    assert ".leading dot" in body and ">From swaks" in body


@pytest.mark.skipif(shutil.which("mutt") is None or shutil.which("tmux") is None,
                    reason="mutt and tmux are needed")
def test_mutt_reads_the_mailbox(server):
    subjects = [f"for mutt {n} {uuid.uuid4().hex[:6]}" for n in range(3)]
    for n, subject in enumerate(subjects):
        body = "From the first line, quoted in the mbox.\r\n..dot\r\n"
        server.send([f"alice@{DOMAIN}"], make_message(f"<mutt{n}@test>", subject, body))
    server.wait_for_messages("alice", 3)
    before = server.raw("alice")

    socket_name = f"ccsmtp-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"   # a private tmux server
    tmux = ["tmux", "-L", socket_name]
    env = {**os.environ, "TERM": "xterm"}
    # -n -F /dev/null: no system or user configuration; folder= the spool, so mutt
    # does not stop to ask whether to create ~/Mail; -R: read-only.
    command = (f"mutt -n -F /dev/null -e 'set folder={server.spool}' "
               f"-R -f {server.path('alice')}")
    subprocess.run(tmux + ["new-session", "-d", "-x", "200", "-y", "50", command],
                   check=True, env=env, timeout=10)
    try:
        screen = ""
        deadline = time.monotonic() + 10
        while "Msgs:" not in screen:
            assert time.monotonic() < deadline, f"mutt never showed its index:\n{screen}"
            time.sleep(0.1)
            screen = subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True,
                                    text=True, env=env, timeout=10).stdout
        time.sleep(0.2)   # let it finish drawing the index
        screen = subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True,
                                text=True, env=env, timeout=10).stdout
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, env=env, timeout=10)
    assert "Msgs:3 " in screen, screen
    for subject in subjects:
        assert subject in screen, screen
    assert server.raw("alice") == before   # read-only: mutt changed nothing
    # And delivery goes on after mutt has been in the mailbox.
    server.send([f"alice@{DOMAIN}"], make_message("<after-mutt@test>"))
    server.wait_for_messages("alice", 4)


def test_mailbox_files_are_private_to_the_user(server):
    server.send([f"bob@{DOMAIN}"], make_message("<private@test>"))
    server.wait_for_messages("bob", 1)
    nobody = pwd.getpwnam(RUN_AS)
    info = os.stat(server.path("bob"))
    assert (info.st_uid, info.st_mode & 0o777) == (nobody.pw_uid, 0o600)
    state = os.stat(server.spool / ".ccsmtp")
    assert (state.st_uid, state.st_mode & 0o777) == (nobody.pw_uid, 0o700)
