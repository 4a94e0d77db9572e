"""TLS for every service (SPEC §8): the server context and what a session reports of it.

Owns: building the server-side `ssl.SSLContext` from `tls_cert`/`tls_key` (TLS 1.2 or
newer, the standard library's secure defaults), checking that the key matches the
certificate, and describing an established connection (protocol version, cipher) for
logs and Received: headers.
Must not: read files after start other than when asked (the master builds the context
as root at start and again on SIGHUP; workers inherit it when forked, so every worker
shares one session-ticket key and a client resumes its TLS session on any worker).
Fails with TLSConfigError, one line naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import ssl


class TLSConfigError(Exception):
    """The certificate or key cannot be used; str() is one line."""


@dataclasses.dataclass(frozen=True, slots=True)
class TLSInfo:
    version: str      # "TLSv1.3", as ssl.SSLObject.version() names it
    cipher: str       # "TLS_AES_256_GCM_SHA384", OpenSSL's name
    bits: int

    def __str__(self) -> str:
        return f"{self.version} with cipher {self.cipher} ({self.bits}/{self.bits} bits)"


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server context for the certificate chain and key, or TLSConfigError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Mail clients and MTAs do not present certificates; asking for one only slows
    # the handshake down (Postfix: smtpd_tls_ask_ccert = no).
    context.verify_mode = ssl.CERT_NONE
    for key, path in (("tls_cert", cert_path), ("tls_key", key_path)):
        _check_readable(key, path)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"tls_key: {key_path} is not the key of the certificate in "
                                 f"{cert_path}") from None
        raise TLSConfigError(f"tls_cert, tls_key: {cert_path} and {key_path} are not a PEM "
                             f"certificate chain and its key ({e.reason or e})") from None
    return context


def _check_readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise TLSConfigError(f"{key}: {path}: no such file") from None
    except PermissionError:
        raise TLSConfigError(f"{key}: {path}: permission denied (make it readable by the "
                             "user or group ccsmtp runs as, e.g. Debian's ssl-cert)") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{key}: {path}: is a directory, not a PEM file") from None
    except OSError as e:
        raise TLSConfigError(f"{key}: {path}: {e.strerror}") from None


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> TLSInfo | None:
    """Version and cipher of an established TLS connection (None if it is not one)."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    if cipher is None or version is None:
        return None
    name, _, bits = cipher
    return TLSInfo(version, name, bits or 0)
