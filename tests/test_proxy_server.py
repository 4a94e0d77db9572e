"""PROXY protocol against the real server (SPEC §11), with real HAProxy in front.

The client binds to 127.0.0.5 and talks to HAProxy on 127.0.0.1; HAProxy connects to
ccsmtp from 127.0.0.1, which is in `proxy_from`. The address that counts — in
Received:, the log and the per-client limit — must be 127.0.0.5.
"""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import ssl
import struct
import time

import pytest

from conftest import DOMAIN, SENDER, make_message, recv_eof, recv_reply
from servers import haproxy_factory, listening  # noqa: F401  (a fixture)

CLIENT = "127.0.0.5"
OTHER_CLIENT = "127.0.0.6"
PROXY_CONFIG = 'proxy_from = ["127.0.0.1/32"]\n'


def start_behind_proxy(start_server, config: str = "", **options):
    """ccsmtp taking PROXY headers from 127.0.0.1 (the readiness probe of the fixture
    would have none, so wait for the listener instead)."""
    server = start_server(config=PROXY_CONFIG + config, wait=False, **options)
    deadline = time.monotonic() + 15
    while not listening(server.port) or len(server.workers()) < 1:
        assert server.proc.poll() is None, server.stderr()
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.05)
    return server


def smtp_from(host: str, port: int, source: str, timeout: float = 10) -> smtplib.SMTP:
    return smtplib.SMTP(host, port, local_hostname="client.test", timeout=timeout,
                        source_address=(source, 0))


def received_of(server, mailbox: str, message_id: str) -> str:
    """The Received: header of the message, once delivered (no barrier message: a
    direct connection to the server would need a PROXY header)."""
    messages = server.wait_for_text(mailbox, message_id.encode(), 10)
    [message] = [m for m in messages if m["Message-ID"] == message_id]
    return message.get_all("Received")[0]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_client_address_behind_haproxy_counts(start_server, haproxy_factory, version):
    server = start_behind_proxy(start_server)
    proxy = haproxy_factory([(server.host, server.port)], version)
    with smtp_from(proxy.host, proxy.port, CLIENT) as client:
        client.sendmail(SENDER, [f"alice@{DOMAIN}"], make_message(f"<proxied-{version}@test>"))
    received = received_of(server, "alice", f"<proxied-{version}@test>")
    assert f"[{CLIENT}]" in received and "127.0.0.1" not in received
    assert f"connect from [{CLIENT}]" in server.stderr()


def start_smtps_behind_proxy(start_server, tls_files):
    """Behind PROXY with the test certificate and an smtps listener (server.smtps_port)."""
    smtps_port = _free_port()
    server = start_behind_proxy(start_server, tls_files.config(),
                                extra_args=["-l", f"smtps://127.0.0.1:{smtps_port}"])
    server.smtps_port = smtps_port
    return server


def send_over_tls(tls: ssl.SSLSocket, message_id: str) -> None:
    assert recv_reply(tls).startswith(b"220 ")
    tls.sendall(f"EHLO c.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<alice@{DOMAIN}>\r\n"
                "DATA\r\n".encode())
    assert [recv_reply(tls)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    tls.sendall(make_message(message_id) + b".\r\nQUIT\r\n")
    assert recv_reply(tls).startswith(b"250 2.0.0 Ok: queued")


def test_implicit_tls_behind_haproxy(start_server, haproxy_factory, tls_files):
    server = start_smtps_behind_proxy(start_server, tls_files)
    proxy = haproxy_factory([("127.0.0.1", server.smtps_port)], "v2")
    raw = socket.create_connection((proxy.host, proxy.port), source_address=(CLIENT, 0), timeout=10)
    with tls_files.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        send_over_tls(tls, "<proxied-tls@test>")
    received = received_of(server, "alice", "<proxied-tls@test>")
    assert f"[{CLIENT}]" in received and "with ESMTPS" in received


def test_implicit_tls_after_a_header_in_pieces(start_server, tls_files):
    # The header comes after the session has started (the peek waits for it) and in
    # pieces; the ClientHello right behind it must reach TLS untouched.
    server = start_smtps_behind_proxy(start_server, tls_files)
    header = v2_header()
    raw = socket.create_connection((server.host, server.smtps_port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    time.sleep(0.2)
    for i in range(0, len(header), 5):
        raw.sendall(header[i:i + 5])
        time.sleep(0.05)
    with tls_files.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        send_over_tls(tls, "<pieces-tls@test>")
    received = received_of(server, "alice", "<pieces-tls@test>")
    assert f"[{CLIENT}]" in received and "with ESMTPS" in received


def test_health_checks_come_as_local_and_do_no_harm(start_server, haproxy_factory):
    server = start_behind_proxy(start_server)
    proxy = haproxy_factory([(server.host, server.port)], "v2", check=True)
    time.sleep(1.0)     # several checks (inter 200ms): v2 LOCAL, the proxy's own address
    with smtp_from(proxy.host, proxy.port, CLIENT) as client:
        client.sendmail(SENDER, [f"alice@{DOMAIN}"], make_message("<after-checks@test>"))
    received = received_of(server, "alice", "<after-checks@test>")
    assert f"[{CLIENT}]" in received
    assert "Traceback" not in server.stderr()


def test_the_per_client_limit_counts_the_proxied_address(start_server, haproxy_factory):
    server = start_behind_proxy(start_server, "max_connections_per_client = 2\n")
    proxy = haproxy_factory([(server.host, server.port)], "v1")
    held = []
    try:
        for _ in range(2):
            sock = socket.create_connection((proxy.host, proxy.port), source_address=(CLIENT, 0),
                                            timeout=5)
            assert recv_reply(sock).startswith(b"220 ")
            held.append(sock)
        third = socket.create_connection((proxy.host, proxy.port), source_address=(CLIENT, 0),
                                         timeout=5)
        with third:
            assert recv_reply(third).startswith(b"421 4.7.0")
        # Everyone comes from HAProxy's 127.0.0.1; another client must still get in.
        other = socket.create_connection((proxy.host, proxy.port),
                                         source_address=(OTHER_CLIENT, 0), timeout=5)
        with other:
            assert recv_reply(other).startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()


def v1_header(source: str = CLIENT) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 40000 25\r\n".encode()


def v2_header(source: str = CLIENT) -> bytes:
    block = (ipaddress.ip_address(source).packed + ipaddress.ip_address("127.0.0.1").packed
             + struct.pack("!HH", 40000, 25))
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(block)) + block


def test_a_header_in_pieces_followed_at_once_by_commands(start_server):
    server = start_behind_proxy(start_server)
    header = v2_header()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(header) - 1, 5):
            sock.sendall(header[i:min(i + 5, len(header) - 1)])
            time.sleep(0.05)
        sock.sendall(header[-1:] + b"EHLO c.test\r\n")   # the last byte and a command together
        assert recv_reply(sock).startswith(b"220 ")
        assert recv_reply(sock).startswith(b"250-")
    assert f"connect from [{CLIENT}]" in server.stderr()


@pytest.mark.parametrize("header", [v1_header, v2_header], ids=["v1", "v2"])
def test_a_header_and_a_whole_transaction_in_one_packet(start_server, header):
    # Sent with the connection's first segment, the header is usually in the kernel's
    # buffer before the session starts, and taken there at once: not one byte of the
    # pipelined transaction behind it may go with it.
    server = start_behind_proxy(start_server)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(header() + b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n"
                     b"RCPT TO:<alice@example.org>\r\nDATA\r\n"
                     + make_message("<one-packet@test>") + b".\r\nQUIT\r\n")
        said = recv_eof(sock, 5)
    codes = [line[:4] for line in said.split(b"\r\n") if line and line[3:4] == b" "]
    assert codes == [b"220 ", b"250 ", b"250 ", b"250 ", b"354 ", b"250 ", b"221 "], said
    assert f"[{CLIENT}]" in received_of(server, "alice", "<one-packet@test>")


@pytest.mark.parametrize("opening, why", [
    (b"EHLO c.test\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4\r\n", ""),
    (b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25 extra\r\n", ""),
])
def test_a_connection_from_the_proxy_without_a_valid_header_gets_no_greeting(start_server, opening, why):
    server = start_behind_proxy(start_server)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(opening)
        assert not said_before_closing(sock).startswith(b"220")
    log = server.stderr()
    assert log.count("no valid PROXY header from proxy [127.0.0.1]") == 1 and why in log
    # The worker serves on: a proper header gets a greeting.
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(v1_header())
        assert recv_reply(sock).startswith(b"220 ")


@pytest.mark.slow
def test_a_silent_connection_from_the_proxy_is_closed_after_5_seconds(start_server):
    server = start_behind_proxy(start_server)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        started = time.monotonic()
        assert said_before_closing(sock, 10) == b""
        assert 4.5 < time.monotonic() - started < 8
    assert "incomplete after 5 s" in server.stderr()


def test_a_header_from_elsewhere_is_just_bad_input(server):
    # No proxy_from: a client cannot claim another address. v1 is a command we do not
    # know; v2's signature is bytes that are no commands (one line of them even says QUIT).
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        assert recv_reply(sock).startswith(b"220 ")
        sock.sendall(v1_header("203.0.113.1"))
        assert recv_reply(sock).startswith(b"500 5.5.2")
        sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\n"
                     b"DATA\r\n" + make_message("<not-proxied@test>") + b".\r\n")
        replies = [recv_reply(sock)[:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"250", b"354", b"250"]
    received = received_of(server, "alice", "<not-proxied@test>")
    assert "[127.0.0.1]" in received and "203.0.113.1" not in received


def test_a_second_header_is_not_read(start_server):
    # Read once per connection, never after: a later PROXY line is a bad command.
    server = start_behind_proxy(start_server)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(v1_header())
        assert recv_reply(sock).startswith(b"220 ")
        sock.sendall(v1_header("203.0.113.2"))
        assert recv_reply(sock).startswith(b"500 5.5.2")
    assert "203.0.113.2" not in server.stderr()


def said_before_closing(sock: socket.socket, timeout: float = 5) -> bytes:
    """What the server said before it closed (a reset counts as closing)."""
    try:
        return recv_eof(sock, timeout)
    except ConnectionResetError:
        return b""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
