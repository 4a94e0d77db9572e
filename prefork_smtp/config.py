"""The configuration: one frozen object holding every setting and limit.

Owns: the defaults, reading the TOML file, merging command-line values over the
file over the defaults, and validating every value. Must not: touch sockets,
users or the spool (the CLI checks those). Fails with ConfigError, whose text is
one line naming the key and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .layout import DEFAULT_SPOOL, is_safe_mailbox


class ConfigError(Exception):
    """A bad setting; str() is one line naming the key."""


# The protocols a listener can speak (sessions are counted per family), and the
# services of SPEC §2: each family plainly (offering STARTTLS/STLS) or with implicit
# TLS (the name with an "s": RFC 8314).
SERVICE_FAMILIES = ("smtp", "pop3", "imap")
SERVICES = ("smtp", "smtps", "pop3", "pop3s", "imap", "imaps")
DEFAULT_SERVICE = "smtp"


def implicit_tls(service: str) -> bool:
    return service.endswith("s")


@dataclasses.dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int
    service: str = DEFAULT_SERVICE

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def implicit_tls(self) -> bool:
        return implicit_tls(self.service)

    def __str__(self) -> str:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return address if self.service == DEFAULT_SERVICE else f"{self.service}://{address}"


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryTarget:
    """Where delivery puts mail (SPEC §11): the mbox files, or an LMTP server."""
    kind: str                  # "mbox" or "lmtp"
    host: str | None = None    # lmtp over TCP
    port: int | None = None
    path: str | None = None    # lmtp over a unix socket

    def __str__(self) -> str:
        if self.kind == "mbox":
            return "mbox"
        if self.path:
            return f"lmtp:unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"lmtp:{host}:{self.port}"


MBOX_DELIVERY = DeliveryTarget("mbox")


class Domains(frozenset):
    """The local domains: a set that remembers the first one named, the domain of a
    bare local-part when delivery must name one (LMTP's RCPT TO, SPEC §11; as
    Postfix appends $myorigin)."""

    first: str

    def __new__(cls, names: "list[str] | tuple[str, ...]") -> "Domains":
        domains = super().__new__(cls, names)
        domains.first = names[0] if names else "localhost"
        return domains

    def __reduce__(self):   # type: ignore[override]
        return (Domains, ([self.first] + sorted(self - {self.first}),))


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    workers: int
    listen: tuple[ListenAddress, ...]
    user: str | None                       # None: "ccsmtp" if it exists, else "nobody"
    group: str | None                      # None: the user's primary group
    spool_dir: str
    domains: frozenset[str]
    hostname: str
    max_size_bytes: int = 26_214_400       # SPEC §2; Postfix's message_size_limit is 10 MB
    max_recipients: int = 1000             # Postfix smtpd_recipient_limit
    timeout_command_s: float = 300.0       # RFC 5321 §4.5.3.2.7: 5 minutes
    timeout_data_s: float = 180.0          # RFC 5321 §4.5.3.2.6 asks 3 minutes per block
    graceful_timeout_s: float = 30.0
    max_connections_per_client: int = 50   # Postfix smtpd_client_connection_count_limit
    soft_error_limit: int = 10             # Postfix smtpd_soft_error_limit
    hard_error_limit: int = 20             # Postfix smtpd_hard_error_limit
    error_delay_s: float = 1.0             # Postfix smtpd_error_sleep_time
    worker_timeout_s: float = 30.0
    max_sessions_per_worker: int = 0       # 0: never recycle
    max_worker_rss_bytes: int = 0          # 0: no limit
    recipients: frozenset[str] = frozenset()   # empty: any safe local-part
    aliases: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    catchall: str | None = None
    spool_mode: int = 0o600
    spool_group: str | None = None         # group of mailbox files, for local readers
    tls_cert: str | None = None            # PEM: certificate, then intermediates
    tls_key: str | None = None
    tls_required: bool = False             # 530 5.7.0 to MAIL on plain connections
    users_file: str | None = None          # Dovecot passwd-file format (SPEC §9)
    pop3_timeout_s: float = 600.0          # autologout; RFC 1939 §3 asks at least 10 minutes
    imap_timeout_s: float = 1800.0         # autologout; RFC 3501 §5.4 asks at least 30 minutes
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    delivery: DeliveryTarget = MBOX_DELIVERY
    smtputf8: bool = True                  # Postfix smtputf8_enable
    pidfile: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    config_file: str | None = None


def host_names() -> list[str]:
    """This host's names, as hostname(1), getfqdn() and the resolver's canonical name
    give them; the first one with a dot is the best candidate for the FQDN."""
    names = [socket.gethostname(), socket.getfqdn()]
    try:
        names.append(socket.getaddrinfo(names[0], None, flags=socket.AI_CANONNAME)[0][3])
    except (OSError, IndexError, UnicodeError):
        pass
    out: list[str] = []
    for name in names:
        name = (name or "").rstrip(".")
        if name and name.lower() not in (n.lower() for n in out) and _is_hostname(name):
            out.append(name)
    return out


def default_hostname() -> str:
    """A fully qualified name when the host has one (Postfix's $myhostname), else the
    plain host name; "localhost" only when there is nothing better."""
    names = [n for n in host_names() if n.lower() not in ("localhost", "localhost.localdomain")]
    qualified = [n for n in names if "." in n]
    return (qualified or names or ["localhost"])[0]


def default_domains(hostname: str) -> Domains:
    """As Postfix's mydestination: $myhostname (first), the host's other names, localhost."""
    return Domains([hostname.lower(), "localhost", *(n.lower() for n in host_names())])


def default_listen() -> tuple[ListenAddress, ...]:
    addresses = [ListenAddress("0.0.0.0", 25)]
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        addresses.append(ListenAddress("::", 25))
    return tuple(addresses)


# --- value parsers: each takes the raw value and the key, returns the value or raises ---

def _int(low: int, high: int | None = None) -> Callable[[Any, str], int]:
    def parse(value: Any, key: str) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{key}: must be {bound}, got {value}")
        return value
    return parse


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key}: expected a positive number of seconds, got {value!r}")
    return float(value)


_SIZE_SUFFIX = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def _bytes(value: Any, key: str) -> int:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", value, re.IGNORECASE)
        if not match:
            raise ConfigError(f"{key}: expected a size like 26214400 or '25M', got {value!r}")
        value = int(match.group(1)) * _SIZE_SUFFIX[match.group(2).lower()]
    return _int(0)(value, key)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{key}: expected a non-empty single-line string, got {value!r}")
    return value


def _is_hostname(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value))


def _hostname(value: Any, key: str) -> str:
    value = _text(value, key)
    if not _is_hostname(value):
        raise ConfigError(f"{key}: {value!r} is not a valid host name")
    return value


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _network(value: Any, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _text(value, key)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a network like 10.0.0.0/8 or 127.0.0.1") from None


def _delivery(value: Any, key: str) -> DeliveryTarget:
    text = _text(value, key)
    if text == "mbox":
        return MBOX_DELIVERY
    usage = f"{key}: {text!r} is not \"mbox\", \"lmtp:HOST:PORT\" or \"lmtp:unix:/PATH\""
    if not text.startswith("lmtp:"):
        raise ConfigError(usage)
    rest = text[len("lmtp:"):]
    if rest.startswith("unix:"):
        path = rest[len("unix:"):]
        if not path.startswith("/"):
            raise ConfigError(f"{key}: the LMTP socket path in {text!r} must be absolute")
        return DeliveryTarget("lmtp", path=path)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9.-]+):(\d+)", rest)
    if not match:
        raise ConfigError(usage)
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port {port} in {text!r} is out of range 1-65535")
    return DeliveryTarget("lmtp", host=host, port=port)


def _list(item: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    def parse(value: Any, key: str) -> tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(item(v, key) for v in value)
    return parse


def parse_listen(value: Any, key: str = "listen") -> ListenAddress:
    text = _text(value, key)
    service, sep, address = text.partition("://")
    if not sep:
        service, address = DEFAULT_SERVICE, text
    elif service.lower() not in SERVICES:
        raise ConfigError(f"{key}: unknown service {service!r} in {text!r} "
                          f"(one of {', '.join(SERVICES)})")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", address)
    if not match:
        raise ConfigError(f"{key}: {text!r} is not [SERVICE://]ADDR:PORT "
                          "(use [::1]:2525 for IPv6)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port {port} in {text!r} is out of range 1-65535")
    family = socket.AF_INET6 if match.group(1) else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        raise ConfigError(f"{key}: {host!r} in {text!r} is not a numeric IP address") from None
    return ListenAddress(host, port, service.lower())


def _domain(value: Any, key: str) -> str:
    text = _text(value, key)
    return _hostname(text[:-1] if text.endswith(".") else text, key).lower()


def _mailbox(value: Any, key: str) -> str:
    name = _text(value, key).lower()
    if not is_safe_mailbox(name):
        raise ConfigError(f"{key}: {value!r} is not a safe mailbox name "
                          "(letters, digits, '.', '_', '-'; not starting with '.')")
    return name


def _aliases(value: Any, key: str) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of address = mailbox, got {value!r}")
    return MappingProxyType({_text(k, key).lower(): _mailbox(v, f"{key}.{k}")
                             for k, v in value.items()})


def _mode(value: Any, key: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ConfigError(f"{key}: expected an octal mode like 0o600, got {value!r}") from None
    mode = _int(0, 0o777)(value, key)
    if not mode & 0o600 == 0o600:
        raise ConfigError(f"{key}: {oct(mode)} must let the owner read and write")
    return mode


def _log_level(value: Any, key: str) -> str:
    level = _text(value, key).lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"{key}: {value!r} is not one of debug, info, warning, error, critical")
    return level


# TOML key -> (Config field, parser). The command line uses the same keys.
KEYS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "workers": ("workers", _int(1, 1024)),
    "listen": ("listen", _list(parse_listen)),
    "user": ("user", _text),
    "group": ("group", _text),
    "spool": ("spool_dir", _text),
    "domains": ("domains", lambda v, k: Domains(_list(_domain)(v, k))),
    "hostname": ("hostname", _hostname),
    "max_size": ("max_size_bytes", _bytes),
    "max_recipients": ("max_recipients", _int(1)),
    "timeout_command": ("timeout_command_s", _seconds),
    "timeout_data": ("timeout_data_s", _seconds),
    "graceful_timeout": ("graceful_timeout_s", _seconds),
    "max_connections_per_client": ("max_connections_per_client", _int(0)),
    "soft_error_limit": ("soft_error_limit", _int(1)),
    "hard_error_limit": ("hard_error_limit", _int(1)),
    "error_delay": ("error_delay_s", lambda v, k: 0.0 if v == 0 else _seconds(v, k)),
    "worker_timeout": ("worker_timeout_s", _seconds),
    "max_sessions_per_worker": ("max_sessions_per_worker", _int(0)),
    "max_worker_rss": ("max_worker_rss_bytes", _bytes),
    "recipients": ("recipients", lambda v, k: frozenset(_list(_mailbox)(v, k))),
    "aliases": ("aliases", _aliases),
    "catchall": ("catchall", _mailbox),
    "spool_mode": ("spool_mode", _mode),
    "spool_group": ("spool_group", _text),
    "tls_cert": ("tls_cert", _text),
    "tls_key": ("tls_key", _text),
    "tls_required": ("tls_required", _bool),
    "users_file": ("users_file", _text),
    "pop3_timeout": ("pop3_timeout_s", _seconds),
    "imap_timeout": ("imap_timeout_s", _seconds),
    "proxy_from": ("proxy_from", _list(_network)),
    "delivery": ("delivery", _delivery),
    "smtputf8": ("smtputf8", _bool),
    "pidfile": ("pidfile", _text),
    "log_level": ("log_level", _log_level),
    "log_file": ("log_file", _text),
}


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown key {unknown[0]!r} "
                          f"(known keys: {', '.join(KEYS)})")
    return data


def build(cli_values: Mapping[str, Any], config_file: str | None = None) -> Config:
    """Defaults, then the file, then the command line (values given as TOML keys)."""
    from_file = _parse_all(read_toml(config_file), f"config file {config_file}: ") if config_file else {}
    # The file is checked whole even where the command line overrides it: a bad value
    # must not lie in wait for the next start without -w.
    values = {**from_file, **_parse_all({k: v for k, v in cli_values.items() if v is not None}, "")}
    hostname = values.get("hostname") or default_hostname()
    values.setdefault("hostname", hostname)
    values.setdefault("workers", os.cpu_count() or 1)
    values.setdefault("listen", default_listen())
    values.setdefault("user", None)
    values.setdefault("group", None)
    values.setdefault("spool_dir", DEFAULT_SPOOL)
    values.setdefault("domains", default_domains(hostname))
    values["spool_dir"] = os.path.abspath(values["spool_dir"])
    for key in ("tls_cert", "tls_key", "users_file"):
        if values.get(key):
            values[key] = os.path.abspath(values[key])
    values["config_file"] = os.path.abspath(config_file) if config_file else None
    _check_together(values)
    return Config(**values)


def _check_together(values: Mapping[str, Any]) -> None:
    """Settings that are fine alone but not side by side."""
    if not values["listen"]:
        raise ConfigError("listen: at least one ADDR:PORT is needed")
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise ConfigError("tls_cert, tls_key: give both (certificate and key) or neither")
    if not values.get("tls_cert"):
        implicit = [str(a) for a in values["listen"] if a.implicit_tls]
        if implicit:
            raise ConfigError(f"listen: {implicit[0]} needs a certificate (set tls_cert and "
                              "tls_key, or listen without TLS)")
        if values.get("tls_required"):
            raise ConfigError("tls_required: needs a certificate (set tls_cert and tls_key)")
    readers = [str(a) for a in values["listen"] if not a.service.startswith("smtp")]
    if readers and not values.get("users_file"):
        raise ConfigError(f"listen: {readers[0]} needs users_file (the users who may log in; "
                          "make it with ccsmtp-passwd)")


def _parse_all(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise ConfigError(f"{where}unknown setting {key!r}")
        field, parse = KEYS[key]
        try:
            values[field] = parse(value, key)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
    return values

