"""ccsmtp-master: the command line (SPEC §2) and the start-up sequence.

Owns: parsing options, then, in this order and before anything is forked: the
configuration, logging, the user to become, the listeners, the spool, the pid file;
then dropping root and handing over to the master.
Every user error is one line on stderr and exit status 2 (usage, configuration) or
1 (runtime: port taken, spool not writable), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

# Everything the workers and delivery will ever need is imported here, before root
# is dropped: afterwards the interpreter's own files may not be readable any more.
import asyncio  # noqa: F401
import concurrent.futures.thread  # noqa: F401  (run_in_executor imports it lazily)
import encodings.idna  # noqa: F401
import json  # noqa: F401

from . import config as configuration
from . import credentials, logs
from .auth.throttle import Throttle
from .layout import SCOREBOARD, state_path
from .process import listeners as listening
from .process import privileges
from .process.anvil import Anvil
from .process.master import Master
from .process.scoreboard import Scoreboard
from .process.shared import SharedMemory
from .services import SERVICES
from .store import lmtp_sink  # noqa: F401  (sink_for imports it when delivery = lmtp:)
from .store import spool

PROG = "ccsmtp-master"
log = logging.getLogger("ccsmtp.master")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        _die(2, f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="ccsmtp: a pre-fork SMTP server delivering to mbox files.")
    p.add_argument("-w", "--workers", type=str, help="worker processes (default: number of CPUs)")
    p.add_argument("-l", "--listen", action="append", metavar="ADDR:PORT",
                   help="listen address, repeatable; [::1]:2525 for IPv6 (default 0.0.0.0:25 and [::]:25)")
    p.add_argument("-u", "--user", help="user to run as after binding (default ccsmtp, else nobody)")
    p.add_argument("-g", "--group", help="group to run as (default: the user's group)")
    p.add_argument("-s", "--spool", metavar="DIR", help="spool directory (default /var/spool/ccsmtp)")
    p.add_argument("-d", "--domain", action="append", dest="domains", metavar="DOMAIN",
                   help="local domain, repeatable (default: host name and localhost)")
    p.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--hostname", help="name in the greeting and Received: headers")
    p.add_argument("--max-size", metavar="BYTES", dest="max_size", help="message size limit")
    p.add_argument("--pidfile", metavar="FILE", help="write the master's pid here")
    p.add_argument("--log-level", dest="log_level", help="debug, info, warning, error")
    p.add_argument("--log-file", dest="log_file", metavar="FILE", help="log here instead of stderr")
    return p


def _die(status: int, message: object) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:
        return 130


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli_values: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = configuration.build(cli_values, args.config)
    except configuration.ConfigError as e:
        _die(2, e)
    missing = [address for address in config.listen if address.service not in SERVICES]
    if missing:
        _die(2, f"listen: {missing[0]}: the {missing[0].service} service is not available "
                f"(available: {', '.join(SERVICES)})")
    try:
        logs.setup(config.log_level, config.log_file)
    except OSError as e:
        _die(1, f"cannot open log file {config.log_file}: {e.strerror} (fix it or use --log-file)")

    identity = _identity(config)
    spool_gid = _spool_group(config)
    try:
        loaded = credentials.load(config)     # as root: a root-only key works
    except credentials.CredentialsError as e:
        _die(2, e)
    try:
        listeners = listening.bind_all(config.listen)
    except listening.ListenError as e:
        _die(1, e)
    privileges.raise_open_files_limit()
    try:
        spool.prepare(config.spool_dir, identity, spool_gid)
    except spool.SpoolError as e:
        _die(1, e)
    _write_pidfile(config.pidfile)

    if identity is not None:
        logs.chown_log_file(config.log_file, identity.uid, identity.gid)
        try:
            privileges.drop(identity)
        except (OSError, privileges.PrivilegeError) as e:
            _die(1, f"cannot drop privileges to {identity.user}: {e}")
    try:
        removed = spool.open_queue(config.spool_dir)
    except spool.SpoolError as e:
        _die(1, e)
    if removed:
        log.info("removed %d unfinished queue file(s) left by a crash", removed)
    shared = SharedMemory(Scoreboard(state_path(config.spool_dir, SCOREBOARD), create=True),
                          Anvil(), Throttle())

    def reload() -> configuration.Config:
        return configuration.build(cli_values, args.config)

    try:
        return Master(config, listeners, SERVICES, loaded, shared, reload).run()
    finally:
        _remove_pidfile(config.pidfile)


def _identity(config: configuration.Config) -> privileges.Identity | None:
    if os.geteuid() != 0:
        if config.user or config.group:
            log.warning("not started as root: --user/--group ignored, running as uid %d", os.geteuid())
        return None
    try:
        return privileges.resolve(config.user, config.group)
    except privileges.PrivilegeError as e:
        _die(2, e)


def _spool_group(config: configuration.Config) -> int | None:
    """spool_group's gid, resolved while /etc/group can still be read by us."""
    if config.spool_group is None:
        return None
    try:
        gid = privileges.resolve_group(config.spool_group, "spool_group")
    except privileges.PrivilegeError as e:
        _die(2, e)
    if not config.spool_mode & 0o060:
        log.warning("spool_group %s has no access to mailboxes with spool_mode %s "
                    "(set spool_mode = 0o640 or 0o660)", config.spool_group, oct(config.spool_mode))
    return gid


def _write_pidfile(path: str | None) -> None:
    if not path:
        return
    try:
        with open(path) as f:
            old = int(f.read().strip() or 0)
        if old and old != os.getpid() and _alive(old):
            _die(1, f"pid file {path} names running process {old}: is ccsmtp already running?")
    except (FileNotFoundError, ValueError):
        pass
    except OSError as e:
        _die(1, f"cannot read pid file {path}: {e.strerror}")
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        _die(1, f"cannot write pid file {path}: {e.strerror} (fix it or use --pidfile)")


def _remove_pidfile(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass   # after dropping root the directory may not be ours


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
