"""What the master reads from files for the workers: the TLS certificate (and, as
services join, the users file).

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

from .config import Config
from .net import tls

log = logging.getLogger("ccsmtp.master")


class CredentialsError(Exception):
    """A configured file cannot be used; str() is one line."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    tls: ssl.SSLContext | None = None
    tls_files: tuple[str, str] | None = None   # (cert, key) the context was made from


def load(config: Config) -> Credentials:
    """At start: every configured file must be usable."""
    if not config.tls_cert or not config.tls_key:
        return Credentials()
    try:
        context = tls.server_context(config.tls_cert, config.tls_key)
    except tls.TLSConfigError as e:
        raise CredentialsError(e) from None
    return Credentials(context, (config.tls_cert, config.tls_key))


def reload(config: Config, old: Credentials) -> Credentials:
    """On SIGHUP: read the files again; what cannot be read keeps its old version."""
    if not config.tls_cert or not config.tls_key:
        if old.tls is not None:
            log.info("SIGHUP: no tls_cert any more: TLS is off for new connections")
        return Credentials()
    try:
        context = tls.server_context(config.tls_cert, config.tls_key)
    except tls.TLSConfigError as e:
        if old.tls is None:
            log.error("SIGHUP: cannot use the new certificate (%s); TLS stays off", e)
        else:
            log.error("SIGHUP: cannot use the new certificate (%s); keeping the one in use", e)
        return old
    log.info("SIGHUP: TLS certificate %s loaded", config.tls_cert)
    return Credentials(context, (config.tls_cert, config.tls_key))
