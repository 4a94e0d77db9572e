"""ccsmtp-passwd: add a user to the users file, or change a user's password (SPEC §9).

    ccsmtp-passwd [-c CONFIG | -f FILE] NAME [--stdin]

Owns: finding the file (-f, or users_file in the TOML config), reading the password
(from the terminal without echo, asked twice; or one line of stdin), and rewriting the
file: NAME's password field becomes an {ARGON2ID} hash (users.hash_password), every
other byte stays as it was, the owner and mode are kept (a new file is 0640), and the
file is replaced atomically (temporary file in the same directory, fsync, rename, fsync
of the directory), under a lock on the directory so that two runs cannot lose each
other's change. The result must load (users.parse_users) or nothing is written: the file
is checked before the password is asked for, and again before it is replaced.
Must not: echo, log or print a password or a hash; leave a temporary file behind; follow
a symlink by replacing it (the file it points to is replaced).
Fails: one line on stderr and no traceback; exit 2 for usage (bad option or NAME, no
file named, bad config), 1 for runtime (unreadable or broken file, passwords that differ,
I/O errors). The file is unchanged whenever the exit status is not 0.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import hmac
import os
import stat
import sys
import tempfile
import warnings
from typing import Iterator, NoReturn, Sequence

from ..auth.users import (UsersFileError, hash_password, line_name, parse_users,
                          split_lines)
from ..config import ConfigError, build
from ..layout import is_safe_mailbox
from ..store.fsutil import fsync_dir, write_all

PROG = "ccsmtp-passwd"
NEW_FILE_MODE = 0o640
# A well-formed password field to check a file's future shape before a password exists;
# never written.
_PLACEHOLDER = "{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=1$" + "A" * 22 + "$" + "A" * 43


class Failure(Exception):
    """A runtime failure (exit 1); str() is the one line to show."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _die(2, f"{message} (see {PROG} --help)")   # one line, not argparse's usage block


def _die(status: int, message: object) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(status)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Add a user to ccsmtp's users file, or change a "
                "user's password (written as {ARGON2ID}, as doveadm pw -s ARGON2ID).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="CONFIG", help="ccsmtp's TOML config; "
                       "its users_file is the file to change")
    where.add_argument("-f", "--file", metavar="FILE", help="the users file to change")
    p.add_argument("name", metavar="NAME", help="user name (= mailbox name, lower-cased)")
    p.add_argument("--stdin", action="store_true",
                   help="read the password from one line of stdin instead of the terminal")
    return p


def users_file(args: argparse.Namespace) -> str:
    if args.file:
        return args.file
    if not args.config:
        _die(2, f"name the users file with -f FILE or -c CONFIG (see {PROG} --help)")
    try:
        config = build({}, args.config)
    except ConfigError as e:
        _die(2, e)
    if not config.users_file:
        _die(2, f"config file {args.config}: users_file is not set "
                "(set it, or name the file with -f FILE)")
    return config.users_file


def user_name(raw: str) -> str:
    name = raw.lower()
    if not raw.isascii() or not is_safe_mailbox(name):
        _die(2, f"NAME {raw!r} is not a valid user name (letters, digits, '.', '_', '-'; "
                "not starting with '.', not ending in '.lock', at most 250)")
    return name


# --- the file's new contents ----------------------------------------------------------------

def with_password(data: bytes, name: str, field: str) -> tuple[bytes, bool]:
    """The file's contents with NAME's password field set to `field`, every other byte
    kept; and whether NAME was there already (else a line is appended)."""
    lines = split_lines(data)
    for i, line in enumerate(lines):
        written = line_name(line)
        if written is None or written.lower() != name:
            continue
        end = b"\r\n" if line.endswith(b"\r\n") else b"\n" if line.endswith(b"\n") else b""
        fields = line[:len(line) - len(end)].split(b":", 2)
        rest = b":" + fields[2] if len(fields) == 3 else b""
        lines[i] = fields[0] + b":" + field.encode("ascii") + rest + end
        return b"".join(lines), True
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data + f"{name}:{field}\n".encode("ascii"), False


def read_current(path: str) -> bytes:
    """The file's bytes; b"" if it does not exist yet."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror}") from None


def checked(data: bytes, name: str, field: str, path: str) -> tuple[bytes, bool]:
    new, existed = with_password(data, name, field)
    try:
        parse_users(new, path)
    except UsersFileError as e:
        raise Failure(f"{e} (fix that line first; nothing changed)") from None
    return new, existed


@contextlib.contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """flock on the directory: the file itself is replaced, so it cannot carry the lock."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise Failure(f"cannot open directory {directory}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> None:
    """Write data to a temporary file beside path with path's owner and mode (0640 for
    a new file), fsync it, rename it over path, fsync the directory."""
    directory = os.path.dirname(path)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    # mkstemp makes it 0600: no one else can read the hashes before the mode is set.
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                dir=directory)
    try:
        try:
            write_all(fd, [data])
            if old is not None:
                _keep_owner(fd, old, path)
            os.fchmod(fd, stat.S_IMODE(old.st_mode) if old is not None else NEW_FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    try:
        fsync_dir(directory)
    except OSError as e:
        raise Failure(f"replaced {path}, but could not fsync its directory: {e.strerror}") from None


def _keep_owner(fd: int, old: os.stat_result, path: str) -> None:
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise Failure(f"cannot keep the owner of {path} ({old.st_uid}:{old.st_gid}): "
                      "run as root or as its owner; nothing changed") from None


# --- the password ---------------------------------------------------------------------------

def password_from_stdin() -> str:
    line = sys.stdin.buffer.readline()
    if not line:
        raise Failure("no password on stdin (one line was expected); nothing changed")
    line = line.removesuffix(b"\n").removesuffix(b"\r")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise Failure("the password on stdin is not UTF-8; nothing changed") from None


def password_from_terminal(name: str) -> str:
    with warnings.catch_warnings():
        # Without a terminal getpass would read stdin with echo, after a warning.
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            first = getpass.getpass(f"New password for {name}: ")
            again = getpass.getpass(f"Retype new password for {name}: ")
        except getpass.GetPassWarning:
            raise Failure("no terminal to read the password from without echo "
                          "(use --stdin to read it from a pipe); nothing changed") from None
        except EOFError:
            raise Failure("no password given; nothing changed") from None
    if not hmac.compare_digest(first.encode(), again.encode()):
        raise Failure("the two passwords differ; nothing changed")
    return first


def check_password(password: str) -> str:
    if not password:
        raise Failure("empty password refused; nothing changed")
    if "\0" in password:
        raise Failure("a password cannot contain NUL; nothing changed")
    return password


# --- the command ----------------------------------------------------------------------------

def run(path: str, name: str, from_stdin: bool) -> bool:
    """Set NAME's password in the file; True if NAME was there already."""
    checked(read_current(path), name, _PLACEHOLDER, path)   # a broken file fails before the prompt
    password = check_password(password_from_stdin() if from_stdin
                              else password_from_terminal(name))
    field = hash_password(password)
    with directory_lock(os.path.dirname(path)):
        new, existed = checked(read_current(path), name, field, path)
        try:
            replace_file(path, new)
        except OSError as e:
            raise Failure(f"cannot write {path}: {e.strerror or e}; nothing changed") from None
    return existed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = user_name(args.name)
    # The file a symlink names is the one to replace; the link stays.
    path = os.path.realpath(users_file(args))
    try:
        existed = run(path, name, args.stdin)
    except Failure as e:
        _die(1, e)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        _die(1, "interrupted; nothing changed")
    print(f"{PROG}: {'changed the password of' if existed else 'added'} {name} in {path} "
          "(the server reads it again on SIGHUP)")
    return 0
