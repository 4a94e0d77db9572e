"""The configuration: one frozen object holding every setting and limit.

Owns: the defaults, reading the TOML file, merging command-line values over the
file over the defaults, and validating every value. Must not: touch sockets,
users or the spool (the CLI checks those). Fails with ConfigError, whose text is
one line naming the key and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .layout import is_safe_mailbox


class ConfigError(Exception):
    """A bad setting; str() is one line naming the key."""


# The protocols a listener can speak; sessions are counted per family.
SERVICE_FAMILIES = ("smtp",)


@dataclasses.dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int
    service: str = "smtp"

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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
    pidfile: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    config_file: str | None = None


def default_hostname() -> str:
    return socket.getfqdn() or socket.gethostname() or "localhost"


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


def _hostname(value: Any, key: str) -> str:
    value = _text(value, key)
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
        raise ConfigError(f"{key}: {value!r} is not a valid host name")
    return value


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
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ConfigError(f"{key}: {text!r} is not ADDR:PORT (use [::1]:2525 for IPv6)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port {port} in {text!r} is out of range 1-65535")
    family = socket.AF_INET6 if match.group(1) else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        raise ConfigError(f"{key}: {host!r} in {text!r} is not a numeric IP address") from None
    return ListenAddress(host, port)


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
    "domains": ("domains", lambda v, k: frozenset(_list(_domain)(v, k))),
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
    hostname = values.get("hostname") or _hostname_or_localhost()
    values.setdefault("hostname", hostname)
    values.setdefault("workers", os.cpu_count() or 1)
    values.setdefault("listen", default_listen())
    values.setdefault("user", None)
    values.setdefault("group", None)
    values.setdefault("spool_dir", "/var/spool/ccsmtp")
    values.setdefault("domains", frozenset({hostname.lower(), "localhost"}))
    values["spool_dir"] = os.path.abspath(values["spool_dir"])
    values["config_file"] = os.path.abspath(config_file) if config_file else None
    if not values["listen"]:
        raise ConfigError("listen: at least one ADDR:PORT is needed")
    return Config(**values)


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


def _hostname_or_localhost() -> str:
    name = default_hostname()
    try:
        return _hostname(name, "hostname")
    except ConfigError:
        return "localhost"
