"""What the master reads from files for the workers: the TLS certificate and the
users file.

Owns: loading them at start, as root, before privileges are dropped (so a key only
root can read works), and again on SIGHUP as the unprivileged user, when a file that
cannot be read or does not fit leaves the old one in use, with one log line saying
why (SPEC §8). Workers inherit the loaded objects when they are forked.
Fails at start with CredentialsError, one line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl

from .auth.users import Users, UsersFileError, load_users
from .config import Config
from .net import tls

log = logging.getLogger("ccsmtp.master")


class CredentialsError(Exception):
    """A configured file cannot be used; str() is one line."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    tls: ssl.SSLContext | None = None
    users: Users | None = None


def load(config: Config) -> Credentials:
    """At start: every configured file must be usable."""
    try:
        context = _tls(config)
        users = load_users(config.users_file) if config.users_file else None
    except (tls.TLSConfigError, UsersFileError) as e:
        raise CredentialsError(e) from None
    return Credentials(context, users)


def reload(config: Config, old: Credentials) -> Credentials:
    """On SIGHUP: read the files again; what cannot be read keeps its old version."""
    try:
        context = _tls(config)
        if context is not None:
            log.info("SIGHUP: TLS certificate %s loaded", config.tls_cert)
        elif old.tls is not None:
            log.info("SIGHUP: no tls_cert any more: TLS is off for new connections")
    except tls.TLSConfigError as e:
        context = old.tls
        log.error("SIGHUP: cannot use the new certificate (%s); %s", e,
                  "TLS stays off" if old.tls is None else "keeping the one in use")
    try:
        users = load_users(config.users_file) if config.users_file else None
        if users is not None:
            log.info("SIGHUP: %d user(s) read from %s", len(users), config.users_file)
    except UsersFileError as e:
        users = old.users
        log.error("SIGHUP: %s; keeping the %d user(s) read before", e,
                  len(old.users) if old.users is not None else 0)
    return Credentials(context, users)


def _tls(config: Config) -> ssl.SSLContext | None:
    if not config.tls_cert or not config.tls_key:
        return None
    return tls.server_context(config.tls_cert, config.tls_key)
