"""ccsmtp-passwd end to end: the real bin/ccsmtp-passwd in a subprocess (and on a
pseudo-terminal for the prompt), checked by loading the file and by `doveadm pw -t`."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefork_smtp.auth.users import load_users, split_lines
from prefork_smtp.tools import passwd as passwd_tool

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "bin" / "ccsmtp-passwd"
DOVEADM = shutil.which("doveadm")
IS_ROOT = os.geteuid() == 0
# Hashes that only need to parse; made with doveadm pw -s SCHEME (their passwords don't matter).
SHA256 = "{SHA256-CRYPT}$5$ZnPZh4ON6/kC2h.7$xj8foNa5cL/5mt2xxNtc1xPjl5FJnSwkPS6NumuTKjB"
BLF = "{BLF-CRYPT}$2y$05$GOoYZmPBpw3n7yOzH5Yetu/34B3D7zsgIrBoAqzuQ1XHb7c0DuJ4u"


def run_tool(*args: str, stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], input=stdin, capture_output=True,
                          timeout=60, cwd=cwd, start_new_session=True)   # no terminal


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, text: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == status, (result.returncode, err)
    assert err.startswith("ccsmtp-passwd: error: ") and err.count("\n") == 1, err
    assert text in err, err
    assert "Traceback" not in err


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_new_file_gets_one_argon2id_line_and_mode_0640(tmp_path):
    path = tmp_path / "users"
    result = run_tool("-f", str(path), "Alice", "--stdin", stdin="s3cret wörd\n".encode())
    assert result.returncode == 0, result.stderr
    assert b"added alice" in result.stdout
    data = path.read_bytes()
    assert data.startswith(b"alice:{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=1$")
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert b"s3cret" not in result.stdout + result.stderr
    assert oct(path.stat().st_mode & 0o7777) == oct(0o640)
    users = load_users(str(path))
    assert users.verify("alice", "s3cret wörd")
    assert not users.verify("alice", "s3cret wörd\n")
    if DOVEADM:
        field = data.decode().strip().split(":", 1)[1]
        ok = subprocess.run([DOVEADM, "pw", "-t", field, "-p", "s3cret wörd"], capture_output=True)
        assert ok.returncode == 0, ok.stderr


def test_changing_a_user_keeps_every_other_byte_mode_and_owner(tmp_path):
    path = tmp_path / "users"
    before = (b"# ccsmtp and dovecot users\r\n"
              b"\n"
              b"carol:" + SHA256.encode() + b"\r\n"
              b"Bob:" + BLF.encode() + b":1000:1000:Bob B:/home/bob::userdb_quota=1G\n"
              b"  # indented, with UTF-8: \xc3\xa9\n"
              b"zed:" + SHA256.encode())                     # no final newline
    path.write_bytes(before)
    path.chmod(0o604)
    if IS_ROOT:
        os.chown(path, 65534, 65534)
    inode = path.stat().st_ino
    result = run_tool("-f", str(path), "bob", "--stdin", stdin=b"new pass\r\n")
    assert result.returncode == 0, result.stderr
    assert b"changed the password of bob" in result.stdout
    after = path.read_bytes()
    old_lines, new_lines = split_lines(before), split_lines(after)
    assert len(old_lines) == len(new_lines)
    changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b]
    assert changed == [3]
    assert new_lines[3].startswith(b"Bob:{ARGON2ID}$argon2id$")
    assert new_lines[3].endswith(b":1000:1000:Bob B:/home/bob::userdb_quota=1G\n")
    st = path.stat()
    assert st.st_ino != inode                                  # replaced, not rewritten
    assert oct(st.st_mode & 0o7777) == oct(0o604)
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert temp_files(tmp_path) == []
    users = load_users(str(path))
    assert users.verify("bob", "new pass")                     # CRLF on stdin is not password
    assert not users.verify("bob", "new pass\r")


def test_adding_to_a_file_without_a_final_newline(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"carol:" + SHA256.encode())
    result = run_tool("-f", str(path), "dave", "--stdin", stdin=b"pw")   # no newline either
    assert result.returncode == 0, result.stderr
    lines = split_lines(path.read_bytes())
    assert lines[0] == b"carol:" + SHA256.encode() + b"\n"
    assert lines[1].startswith(b"dave:{ARGON2ID}") and len(lines) == 2
    assert load_users(str(path)).verify("dave", "pw")


def test_config_names_the_file_and_symlinks_stay(tmp_path):
    real = tmp_path / "real-users"
    real.write_bytes(b"carol:" + SHA256.encode() + b"\n")
    link = tmp_path / "users"
    link.symlink_to(real.name)
    config = tmp_path / "ccsmtp.toml"
    config.write_text(f'users_file = "{link}"\nworkers = 1\n')
    result = run_tool("-c", str(config), "erin", "--stdin", stdin=b"pw\n")
    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    assert b"erin:{ARGON2ID}" in real.read_bytes()


def test_a_broken_file_is_left_alone_before_any_password_is_read(tmp_path):
    path = tmp_path / "users"
    before = b"carol:" + SHA256.encode() + b"\n# x\neve:{PLAIN}hunter2\n"
    path.write_bytes(before)
    result = run_tool("-f", str(path), "bob", "--stdin", stdin=b"pw\n")
    assert_one_line_error(result, 1, f"users file {path}, line 3: user eve: scheme {{PLAIN}}")
    assert b"hunter2" not in result.stderr
    assert path.read_bytes() == before
    # ... but the broken line of the user being changed is mended:
    result = run_tool("-f", str(path), "eve", "--stdin", stdin=b"pw\n")
    assert result.returncode == 0, result.stderr
    assert load_users(str(path)).verify("eve", "pw")


@pytest.mark.parametrize("args, stdin, status, text", [
    (["-f", "{users}", "al ice", "--stdin"], b"pw\n", 2, "NAME 'al ice' is not a valid user name"),
    (["-f", "{users}", "bob.lock", "--stdin"], b"pw\n", 2, "is not a valid user name"),
    (["-f", "{users}", "\u212aate", "--stdin"], b"pw\n", 2, "is not a valid user name"),
    (["bob", "--stdin"], b"pw\n", 2, "name the users file with -f FILE or -c CONFIG"),
    (["-f", "{users}", "-c", "{config}", "bob"], b"", 2, "not allowed with argument"),
    (["-f", "{users}"], b"", 2, "the following arguments are required: NAME"),
    (["-f", "{users}", "bob", "--bogus"], b"", 2, "unrecognized arguments: --bogus"),
    (["-c", "{config}", "bob", "--stdin"], b"pw\n", 2, "users_file is not set"),
    (["-c", "{bad_config}", "bob", "--stdin"], b"pw\n", 2, "unknown key 'bogus'"),
    (["-c", "{missing}", "bob", "--stdin"], b"pw\n", 2, "does not exist"),
    (["-f", "{users}", "bob", "--stdin"], b"", 1, "no password on stdin"),
    (["-f", "{users}", "bob", "--stdin"], b"\n", 1, "empty password refused"),
    (["-f", "{users}", "bob", "--stdin"], b"\xff\xfe\n", 1, "not UTF-8"),
    (["-f", "{users}", "bob", "--stdin"], b"a\0b\n", 1, "cannot contain NUL"),
    (["-f", "{users}", "bob"], b"pw\npw\n", 1, "no terminal to read the password from"),
    (["-f", "{missing}/users", "bob", "--stdin"], b"pw\n", 1, "cannot open directory"),
])
def test_errors_are_one_line_and_change_nothing(tmp_path, args, stdin, status, text):
    users = tmp_path / "users"
    before = b"carol:" + SHA256.encode() + b"\n"
    users.write_bytes(before)
    (tmp_path / "plain.toml").write_text("workers = 1\n")
    (tmp_path / "bad.toml").write_text("bogus = 1\n")
    names = {"users": users, "config": tmp_path / "plain.toml", "bad_config": tmp_path / "bad.toml",
             "missing": tmp_path / "missing"}
    result = run_tool(*(a.format(**names) for a in args), stdin=stdin)
    assert_one_line_error(result, status, text)
    assert users.read_bytes() == before
    assert temp_files(tmp_path) == []


def test_a_failed_replace_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "users"
    path.write_bytes(b"old\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(passwd_tool.os, "replace", broken_replace)
    with pytest.raises(OSError):
        passwd_tool.replace_file(str(path), b"new\n")
    assert path.read_bytes() == b"old\n"
    assert temp_files(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["users"]


def test_concurrent_runs_lose_no_user(tmp_path):
    path = tmp_path / "users"
    names = [f"user{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, str(TOOL), "-f", str(path), name, "--stdin"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True) for name in names]
    for proc, name in zip(procs, names):
        proc.stdin.write(f"pw-{name}\n".encode())
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(60) == 0, proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    users = load_users(str(path))
    assert sorted(users.names()) == names
    assert all(users.verify(name, f"pw-{name}") for name in names)


# --- the prompt, on a pseudo-terminal ----------------------------------------------------------

class Terminal:
    """bin/ccsmtp-passwd on a pseudo-terminal that is its controlling terminal (where
    getpass reads), with what it writes to the terminal collected."""

    def __init__(self, *args: str):
        pid, fd = pty.fork()
        if pid == 0:   # the child: its stdin/stdout/stderr and /dev/tty are the pty
            try:
                os.execv(sys.executable, [sys.executable, str(TOOL), *args])
            finally:
                os._exit(127)
        self.pid, self.fd, self.output = pid, fd, b""

    def expect(self, text: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal; got {self.output!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:   # EIO: the child has gone
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {text!r}; got {self.output!r}")
                self.output += chunk

    def type(self, line: bytes) -> None:
        os.write(self.fd, line + b"\r")   # Enter, as a keyboard sends it

    def finish(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            assert time.monotonic() < deadline, "ccsmtp-passwd did not exit"
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.fd, 4096)
                except OSError:
                    pass
        try:
            while select.select([self.fd], [], [], 0)[0]:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    break
                self.output += chunk
        except OSError:
            pass
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_prompt_asks_twice_without_echo(tmp_path):
    path = tmp_path / "users"
    term = Terminal("-f", str(path), "frank")
    term.expect(b"New password for frank: ")
    term.type(b"Tty-Secret-1")
    term.expect(b"Retype new password for frank: ")
    term.type(b"Tty-Secret-1")
    assert term.finish() == 0, term.output
    assert b"Tty-Secret-1" not in term.output                  # never echoed
    assert b"added frank" in term.output
    assert load_users(str(path)).verify("frank", "Tty-Secret-1")


def test_prompt_refuses_two_different_passwords(tmp_path):
    path = tmp_path / "users"
    term = Terminal("-f", str(path), "frank")
    term.expect(b"New password for frank: ")
    term.type(b"one")
    term.expect(b"Retype new password for frank: ")
    term.type(b"two")
    assert term.finish() == 1, term.output
    assert b"the two passwords differ; nothing changed" in term.output
    assert b"Traceback" not in term.output
    assert not path.exists()
