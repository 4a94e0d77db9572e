"""config.build: defaults (SPEC §2, §3), the TOML file, command line over file over
defaults, and a ConfigError naming the key for every unknown key or bad value."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest

from prefork_smtp import config
from prefork_smtp.config import ConfigError, ListenAddress


def write(tmp_path, text: str) -> str:
    path = tmp_path / "ccsmtp.toml"
    path.write_text(text)
    return str(path)


# --- defaults ---------------------------------------------------------------------------

def test_defaults_from_the_spec():
    cfg = config.build({})
    assert cfg.workers == (os.cpu_count() or 1)
    assert ListenAddress("0.0.0.0", 25) in cfg.listen
    assert set(cfg.listen) <= {ListenAddress("0.0.0.0", 25), ListenAddress("::", 25)}
    assert cfg.user is None and cfg.group is None
    assert cfg.spool_dir == "/var/spool/ccsmtp"
    assert "localhost" in cfg.domains and cfg.hostname.lower() in cfg.domains
    assert cfg.max_size_bytes == 26_214_400
    assert cfg.max_recipients == 1000
    assert cfg.timeout_command_s == 300
    assert cfg.timeout_data_s == 180
    assert cfg.graceful_timeout_s == 30
    assert cfg.max_connections_per_client == 50
    assert cfg.hard_error_limit == 20
    assert cfg.worker_timeout_s == 30
    assert cfg.max_sessions_per_worker == 0
    assert cfg.max_worker_rss_bytes == 0
    assert cfg.recipients == frozenset()
    assert dict(cfg.aliases) == {}
    assert cfg.catchall is None
    assert cfg.spool_mode == 0o600 and cfg.spool_group is None
    assert cfg.tls_cert is None and cfg.tls_key is None and cfg.tls_required is False
    assert cfg.users_file is None
    assert (cfg.pop3_timeout_s, cfg.imap_timeout_s) == (600, 1800)
    assert cfg.proxy_from == ()
    assert str(cfg.delivery) == "mbox" and cfg.smtputf8 is True
    assert cfg.pidfile is None and cfg.log_file is None
    assert cfg.log_level == "info"
    assert cfg.config_file is None


def test_domains_default_to_the_hostname_the_host_names_and_localhost():
    cfg = config.build({"hostname": "MX.Example.ORG"})
    assert cfg.hostname == "MX.Example.ORG"
    assert {"mx.example.org", "localhost", socket.gethostname().lower()} <= cfg.domains


def test_host_whose_fqdn_lookup_says_localhost(monkeypatch):
    # gethostname() "vm", getfqdn() "localhost" (a host with 127.0.0.1 vm in
    # /etc/hosts): mail to alice@vm must be local, and the greeting names "vm".
    monkeypatch.setattr(socket, "gethostname", lambda: "vm")
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "vm", ("127.0.0.1", 0))])
    cfg = config.build({})
    assert cfg.hostname == "vm"
    assert cfg.domains == frozenset({"vm", "localhost"})


def test_hostname_defaults_to_a_fully_qualified_name_when_there_is_one(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "mx")
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda *a, **k: [(2, 1, 6, "mx.example.org", ("192.0.2.1", 0))])
    cfg = config.build({})
    assert cfg.hostname == "mx.example.org"
    assert cfg.domains == frozenset({"mx", "mx.example.org", "localhost"})


def test_config_is_frozen():
    cfg = config.build({"aliases": {"root": "alice"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 3
    with pytest.raises(TypeError):
        cfg.aliases["root"] = "mallory"


# --- the file, and the command line over it -------------------------------------------

FILE = """
workers = 4
listen = ["127.0.0.1:2525", "[::1]:2525"]
spool = "/srv/mail"
domains = ["Example.ORG", "localhost"]
hostname = "mx.example.org"
max_size = "10M"
max_recipients = 50
timeout_command = 60
timeout_data = 90.5
graceful_timeout = 5
max_connections_per_client = 7
hard_error_limit = 9
worker_timeout = 11
max_sessions_per_worker = 1000
max_worker_rss = "512M"
recipients = ["Alice", "bob"]
catchall = "rest"
spool_mode = 0o640
pidfile = "/run/ccsmtp.pid"
log_level = "DEBUG"
log_file = "/var/log/ccsmtp.log"

[aliases]
Root = "Alice"
"sales@example.org" = "bob"
"""


def test_toml_file_is_read(tmp_path):
    path = write(tmp_path, FILE)
    cfg = config.build({}, path)
    assert cfg.workers == 4
    assert cfg.listen == (ListenAddress("127.0.0.1", 2525), ListenAddress("::1", 2525))
    assert cfg.spool_dir == "/srv/mail"
    assert cfg.domains == frozenset({"example.org", "localhost"})
    assert cfg.hostname == "mx.example.org"
    assert cfg.max_size_bytes == 10 * 1024 * 1024
    assert cfg.max_recipients == 50
    assert (cfg.timeout_command_s, cfg.timeout_data_s, cfg.graceful_timeout_s) == (60, 90.5, 5)
    assert cfg.max_connections_per_client == 7
    assert cfg.hard_error_limit == 9
    assert cfg.worker_timeout_s == 11
    assert cfg.max_sessions_per_worker == 1000
    assert cfg.max_worker_rss_bytes == 512 * 1024 * 1024
    assert cfg.recipients == frozenset({"alice", "bob"})
    assert cfg.catchall == "rest"
    assert cfg.spool_mode == 0o640
    assert cfg.pidfile == "/run/ccsmtp.pid"
    assert cfg.log_level == "debug"
    assert cfg.log_file == "/var/log/ccsmtp.log"
    assert dict(cfg.aliases) == {"root": "alice", "sales@example.org": "bob"}
    assert cfg.config_file == path


def test_command_line_wins_over_file_and_none_means_unset(tmp_path):
    path = write(tmp_path, 'workers = 4\nmax_size = 1000\nhostname = "file.example.org"\n')
    cfg = config.build({"workers": "2", "max_size": None, "listen": ["127.0.0.1:2525"],
                        "hostname": None}, path)
    assert cfg.workers == 2
    assert cfg.max_size_bytes == 1000
    assert cfg.hostname == "file.example.org"
    assert cfg.listen == (ListenAddress("127.0.0.1", 2525),)


def test_domain_with_trailing_dot_is_normalised():
    assert config.build({"domains": ["Example.ORG."]}).domains == frozenset({"example.org"})


def test_file_wins_over_defaults(tmp_path):
    cfg = config.build({}, write(tmp_path, "max_recipients = 3\n"))
    assert cfg.max_recipients == 3
    assert cfg.hard_error_limit == 20


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'spool = "spool"\n')
    cfg = config.build({}, "ccsmtp.toml")
    assert cfg.spool_dir == str(tmp_path / "spool")
    assert cfg.config_file == str(tmp_path / "ccsmtp.toml")


@pytest.mark.parametrize("value, expected", [
    ("1000", 1000), (1000, 1000), ("25M", 25 * 1024 ** 2), ("25m", 25 * 1024 ** 2),
    ("10k", 10240), ("1G", 1024 ** 3), ("2MiB", 2 * 1024 ** 2), (" 7 ", 7), (0, 0),
])
def test_sizes(value, expected):
    assert config.build({"max_size": value}).max_size_bytes == expected


@pytest.mark.parametrize("value, expected", [(0o600, 0o600), ("600", 0o600), ("0o640", 0o640),
                                             (0o660, 0o660)])
def test_spool_mode(value, expected):
    assert config.build({"spool_mode": value}).spool_mode == expected


# --- errors name the key --------------------------------------------------------------

def error_for(values: dict, path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.build(values, path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_in_the_file_is_named(tmp_path):
    message = error_for({}, write(tmp_path, "workers = 2\nmax_sise = 10\n"))
    assert "'max_sise'" in message
    assert "ccsmtp.toml" in message


def test_unknown_setting_on_the_command_line_is_named():
    assert "'colour'" in error_for({"colour": "blue"})


@pytest.mark.parametrize("text", ["workers = ", "workers = 2\nworkers = 3\n", "[aliases\n"])
def test_invalid_toml(tmp_path, text):
    assert "not valid TOML" in error_for({}, write(tmp_path, text))


def test_missing_file(tmp_path):
    assert "does not exist" in error_for({}, str(tmp_path / "nope.toml"))


BAD_VALUES = [
    ("workers", 0), ("workers", -1), ("workers", "many"), ("workers", True), ("workers", 2.5),
    ("workers", 100_000),
    ("max_size", "abc"), ("max_size", -1), ("max_size", "10X"), ("max_size", 1.5),
    ("max_recipients", 0), ("hard_error_limit", 0),
    ("listen", "nope"), ("listen", ["127.0.0.1:25", "nope"]), ("listen", []),
    ("timeout_command", 0), ("timeout_data", -5), ("graceful_timeout", "soon"),
    ("worker_timeout", False),
    ("spool_mode", 0o000), ("spool_mode", 0o400), ("spool_mode", 0o1777), ("spool_mode", "rw"),
    ("hostname", "bad host"), ("hostname", "-bad.example"), ("hostname", ""),
    ("domains", ["example.org", "bad domain"]),
    ("recipients", ["../etc"]), ("catchall", ".hidden"), ("catchall", "x.lock"),
    ("aliases", "alice"),
    ("spool", ""), ("spool", "/tmp/a\nb"), ("user", 0),
    ("log_level", "loud"),
    ("tls_required", "maybe"), ("smtputf8", 1), ("users_file", ""),
    ("pop3_timeout", 0), ("imap_timeout", "never"),
    ("proxy_from", ["10.0.0.0/8", "not-a-net"]), ("proxy_from", "300.1.1.1"),
    ("delivery", "maildir"), ("delivery", "lmtp:"), ("delivery", "lmtp:host"),
    ("delivery", "lmtp:host:0"), ("delivery", "lmtp:unix:relative/path"), ("delivery", "lmtp:[::1:24"),
    ("listen", "ftp://127.0.0.1:21"), ("listen", "smtp//127.0.0.1:25"),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_names_the_key(key, value):
    assert error_for({key: value}).startswith(key)


@pytest.mark.parametrize("mailbox", ["../etc/passwd", "a/b", ".hidden", "inbox.lock", "x" * 251,
                                     "jörg", "a b", ""])
def test_alias_to_an_unsafe_mailbox(mailbox):
    assert error_for({"aliases": {"root": mailbox}}).startswith("aliases.root")


def test_bad_value_in_the_file_names_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "workers = 0\n")
    assert error_for({}, path).startswith(f"config file {path}: workers:")
    path = write(tmp_path, "spool_mode = 0\n")
    assert error_for({}, path).startswith(f"config file {path}: spool_mode:")
    # Checked even where the command line overrides the key.
    assert error_for({"workers": "2"}, write(tmp_path, "workers = 0\n")).endswith("got 0")


# --- listen ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, host, port, family", [
    ("127.0.0.1:2525", "127.0.0.1", 2525, socket.AF_INET),
    ("0.0.0.0:25", "0.0.0.0", 25, socket.AF_INET),
    ("[::1]:2525", "::1", 2525, socket.AF_INET6),
    ("[::]:25", "::", 25, socket.AF_INET6),
    ("[2001:db8::1]:587", "2001:db8::1", 587, socket.AF_INET6),
    ("[::ffff:192.0.2.1]:25", "::ffff:192.0.2.1", 25, socket.AF_INET6),
    ("127.0.0.1:65535", "127.0.0.1", 65535, socket.AF_INET),
])
def test_parse_listen(text, host, port, family):
    address = config.parse_listen(text)
    assert (address.host, address.port, address.family) == (host, port, family)
    assert str(address) == text


@pytest.mark.parametrize("text", [
    "nope", "127.0.0.1", "127.0.0.1:", ":25", "127.0.0.1:0", "127.0.0.1:65536",
    "::1:2525", "[::1]", "[::1]2525", "[127.0.0.1]:25", "localhost:25", "999.0.0.1:25",
    "[::1]:25x", "127.0.0.1:25 ",
])
def test_bad_listen(text):
    with pytest.raises(ConfigError) as info:
        config.parse_listen(text)
    assert str(info.value).startswith("listen")


def test_one_listen_string_is_one_address():
    assert config.build({"listen": "[::1]:2525"}).listen == (ListenAddress("::1", 2525),)


@pytest.mark.parametrize("text, service, implicit", [
    ("127.0.0.1:2525", "smtp", False), ("smtp://127.0.0.1:2525", "smtp", False),
    ("smtps://127.0.0.1:465", "smtps", True), ("POP3://[::1]:110", "pop3", False),
    ("pop3s://0.0.0.0:995", "pop3s", True), ("imap://127.0.0.1:143", "imap", False),
    ("imaps://[::]:993", "imaps", True),
])
def test_listen_with_a_service(text, service, implicit):
    address = config.parse_listen(text)
    assert (address.service, address.implicit_tls) == (service, implicit)
    assert config.parse_listen(str(address)) == address


def test_implicit_tls_listener_needs_a_certificate():
    message = error_for({"listen": ["127.0.0.1:2525", "smtps://127.0.0.1:4650"]})
    assert message.startswith("listen") and "smtps://127.0.0.1:4650" in message and "tls_cert" in message
    cfg = config.build({"listen": ["smtps://127.0.0.1:4650"], "tls_cert": "c.pem", "tls_key": "k.pem"})
    assert cfg.listen[0].implicit_tls


@pytest.mark.parametrize("values", [{"tls_cert": "c.pem"}, {"tls_key": "k.pem"},
                                    {"tls_required": True}])
def test_tls_settings_that_need_each_other(values):
    assert error_for(values).startswith(("tls_cert", "tls_required"))


def test_tls_and_users_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.build({"tls_cert": "c.pem", "tls_key": "k.pem", "users_file": "users"})
    assert (cfg.tls_cert, cfg.tls_key, cfg.users_file) == (
        str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), str(tmp_path / "users"))


@pytest.mark.parametrize("text, kind, host, port, path", [
    ("mbox", "mbox", None, None, None),
    ("lmtp:127.0.0.1:24", "lmtp", "127.0.0.1", 24, None),
    ("lmtp:dovecot.internal:24", "lmtp", "dovecot.internal", 24, None),
    ("lmtp:[::1]:2424", "lmtp", "::1", 2424, None),
    ("lmtp:unix:/run/dovecot/lmtp", "lmtp", None, None, "/run/dovecot/lmtp"),
])
def test_delivery_targets(text, kind, host, port, path):
    target = config.build({"delivery": text}).delivery
    assert (target.kind, target.host, target.port, target.path) == (kind, host, port, path)
    assert str(target) == text


def test_proxy_from_networks():
    cfg = config.build({"proxy_from": ["127.0.0.1", "10.0.0.0/8", "::1"]})
    assert [str(n) for n in cfg.proxy_from] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]


def test_pop3_and_imap_listeners_need_a_users_file():
    message = error_for({"listen": ["127.0.0.1:2525", "pop3://127.0.0.1:1100"]})
    assert message.startswith("listen") and "pop3://127.0.0.1:1100" in message and "users_file" in message
    cfg = config.build({"listen": ["imap://127.0.0.1:1430"], "users_file": "users"})
    assert cfg.listen[0].service == "imap"
