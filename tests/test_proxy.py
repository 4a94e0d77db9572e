"""Tests for the PROXY protocol header parser (prefork_smtp.net.proxy), SPEC §11.

Tables of good and malformed headers, each fed whole, one byte at a time and split at
every point together with what follows it; Hypothesis properties (any input gives a
result and never an exception, chunking never changes it, nothing past the header is
consumed); and real HAProxy (send-proxy, send-proxy-v2, its health checks) in front of
a small socket server here that feeds what it receives to the parser.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_smtp.net import proxy as P
from servers import haproxy_factory, proxy_v1, proxy_v2  # noqa: F401 (fixture)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMTP_TAIL = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n"
TLS_TAIL = bytes.fromhex("160301020001") + bytes(range(256))     # a ClientHello's start
LONGEST_V1 = ("PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
              "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n").encode()
LONGEST_TCP6 = LONGEST_V1.replace(b"UNKNOWN", b"TCP6")       # 104 octets (spec §2.1)
FULL6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
V2_SOURCE, V2_DEST = ("192.0.2.1", 56324), ("198.51.100.2", 25)
V2_GOOD = proxy_v2(V2_SOURCE, V2_DEST)


def with_crc32c(tlvs: list[tuple[int, bytes]], **kw) -> bytes:
    """A v2 TCP4 header whose CRC32C TLV (last) holds the right checksum."""
    header = proxy_v2(V2_SOURCE, V2_DEST, tlvs + [(0x03, bytes(4))], **kw)
    return header[:-4] + struct.pack("!I", P.crc32c(header))


# --- the tables ------------------------------------------------------------------------

# (id, header, source, destination)
GOOD = [
    ("v1 TCP4", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
     ("192.0.2.1", 56324), ("198.51.100.2", 25)),
    ("v1 TCP4 extremes", b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
     ("255.255.255.255", 65535), ("0.0.0.0", 0)),
    ("v1 TCP6", b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n", ("2001:db8::1", 1),
     ("2001:db8::2", 25)),
    ("v1 TCP6 longest, 104 octets", LONGEST_TCP6, (FULL6, 65535), (FULL6, 65535)),
    ("v1 TCP6 upper case", b"PROXY TCP6 2001:DB8:0:0:0:0:0:A ::1 1024 25\r\n",
     ("2001:db8::a", 1024), ("::1", 25)),
    ("v1 TCP6 IPv4-mapped", b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 25\r\n", ("192.0.2.7", 1),
     ("::1", 25)),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", None, None),
    ("v1 UNKNOWN longest, 107 octets", LONGEST_V1, None, None),
    ("v1 UNKNOWN with anything", b"PROXY UNKNOWN whatever it says\r\n", None, None),
    ("v2 TCP4", V2_GOOD, V2_SOURCE, V2_DEST),
    ("v2 TCP6", proxy_v2(("2001:db8::1", 65535), ("2001:db8::25", 25)), ("2001:db8::1", 65535),
     ("2001:db8::25", 25)),
    ("v2 TCP6 IPv4-mapped", proxy_v2(("::ffff:192.0.2.7", 4), ("::1", 25)), ("192.0.2.7", 4),
     ("::1", 25)),
    ("v2 TLVs skipped", proxy_v2(V2_SOURCE, V2_DEST, [(0x05, b"id-1"), (0x04, b""),
                                                      (0x20, b"\x01" + bytes(4)), (0xE0, b"x" * 300)]),
     V2_SOURCE, V2_DEST),
    ("v2 CRC32C checked", with_crc32c([(0x05, b"unique")]), V2_SOURCE, V2_DEST),
    ("v2 LOCAL", proxy_v2(command=0x0), None, None),
    ("v2 LOCAL, block discarded", proxy_v2(command=0x0, family=0x11, address_block=b"\xff" * 7),
     None, None),
    ("v2 LOCAL, family ignored", proxy_v2(command=0x0, family=0x99), None, None),
    ("v2 UNSPEC", proxy_v2(family=0x00, address_block=b"ignored"), None, None),
    ("v2 AF_UNIX stream", proxy_v2(family=0x31, address_block=bytes(216)), None, None),
    ("v2 at the size cap", proxy_v2(V2_SOURCE, V2_DEST, [(0x04, bytes(P.V2_MAX_HEADER - 31))]),
     V2_SOURCE, V2_DEST),
]

_V1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"


def _tlv_area(raw: bytes) -> bytes:
    """A TCP4 header whose TLV area is raw, with a length field that covers it."""
    return proxy_v2(family=0x11, address_block=V2_GOOD[16:] + raw)


# (id, input, words of the reason, octets after which the error is known)
BAD = [
    ("an SMTP command", b"EHLO client.example\r\n", "not a PROXY protocol header", 1),
    ("a TLS ClientHello", TLS_TAIL, "not a PROXY protocol header", 1),
    ("HTTP", b"GET / HTTP/1.1\r\n", "not a PROXY protocol header", 1),
    ("lower case proxy", _V1.lower(), "not a PROXY protocol header", 1),
    ("PROXY without the space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY", 6),
    ("POST", b"POST / HTTP/1.1\r\n", "not a PROXY protocol header", 2),
    ("a blank line", b"\r\n\r\nEHLO x\r\n", "not a PROXY protocol header", 5),
    ("v1 two spaces", _V1.replace(b"TCP4 ", b"TCP4  "), "not 4 separated", len(_V1) + 1),
    ("v1 trailing space", _V1[:-2] + b" \r\n", "not 4 separated", len(_V1) + 1),
    ("v1 three fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "not 4", 30),
    ("v1 tab", _V1.replace(b" 25", b"\t25"), "0x09", _V1.index(b" 25") + 1),
    ("v1 LF alone", _V1[:-2] + b"\n", "LF without CR", len(_V1) - 1),
    ("v1 CR alone", _V1[:-2] + b"\rX", "CR without LF", len(_V1)),
    ("v1 CR CR LF", _V1[:-2] + b"\r\r\n", "CR without LF", len(_V1)),
    ("v1 NUL", _V1.replace(b"TCP4", b"TC\x00P4"), "0x00", 9),
    ("v1 8-bit octet", _V1.replace(b"TCP4", b"TCP\xb4"), "0xB4", 10),
    ("v1 unknown protocol", _V1.replace(b"TCP4", b"TCP5"), "unknown protocol 'TCP5'", len(_V1)),
    ("v1 UDP4", _V1.replace(b"TCP4", b"UDP4"), "unknown protocol", len(_V1)),
    ("v1 UNKNOWNX", b"PROXY UNKNOWNX\r\n", "unknown protocol", 16),
    ("v1 nothing", b"PROXY \r\n", "unknown protocol", 8),
    ("v1 leading zero in IPv4", _V1.replace(b"192.0.2.1", b"192.0.2.01"), "not an address",
     len(_V1) + 1),
    ("v1 octal IPv4", _V1.replace(b"192.0.2.1", b"0300.0.2.1"), "not an address", len(_V1) + 1),
    ("v1 octet over 255", _V1.replace(b"192.0.2.1", b"192.0.2.256"), "not an address",
     len(_V1) + 2),
    ("v1 three-part IPv4", _V1.replace(b"192.0.2.1", b"192.0.2"), "not an address", len(_V1) - 2),
    ("v1 IPv6 in TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an address for TCP4", 24),
    ("v1 IPv4 in TCP6", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not an address for TCP6", 32),
    ("v1 IPv6 scope", b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "not an address", 31),
    ("v1 IPv6 five hex digits", b"PROXY TCP6 00001::1 ::1 1 2\r\n", "not an address", 29),
    ("v1 IPv6 two ::", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "not an address", 28),
    ("v1 IPv6 nine groups", f"PROXY TCP6 {FULL6}:1 ::1 1 2\r\n".encode(), "not an address", 62),
    ("v1 port with leading zero", _V1.replace(b" 25\r", b" 025\r"), "not a port", len(_V1) + 1),
    ("v1 port 65536", _V1.replace(b" 25\r", b" 65536\r"), "not a port", len(_V1) + 3),
    ("v1 port with sign", _V1.replace(b" 25\r", b" +25\r"), "not a port", len(_V1) + 1),
    ("v1 port in hex", _V1.replace(b" 25\r", b" 0x19\r"), "not a port", len(_V1) + 2),
    ("v1 empty port", _V1.replace(b" 25\r", b" \r"), "not a port", len(_V1) - 2),
    ("v1 108 octets", LONGEST_V1[:-2] + b"f\r\n", "no CRLF within 107", 107),
    ("v1 endless", b"PROXY UNKNOWN " + b"x" * 200, "no CRLF within 107", 107),
    ("v1 CRLF at 107-108", LONGEST_V1[:-2] + b"5\r\n", "no CRLF within 107", 107),
    ("v2 signature off at octet 5", V2_GOOD[:4] + b"\x01" + V2_GOOD[5:], "not a PROXY", 5),
    ("v2 signature off at octet 12", V2_GOOD[:11] + b"\r" + V2_GOOD[12:], "not a PROXY", 12),
    ("v2 version 1", proxy_v2(V2_SOURCE, V2_DEST, version=1), "version 1, not 2", 13),
    ("v2 version 3", proxy_v2(V2_SOURCE, V2_DEST, version=3), "version 3, not 2", 13),
    ("v2 command 2", proxy_v2(V2_SOURCE, V2_DEST, command=2), "unknown command 0x2", 13),
    ("v2 command F", proxy_v2(V2_SOURCE, V2_DEST, command=0xF), "unknown command 0xF", 13),
    ("v2 UDP over IPv4", proxy_v2(V2_SOURCE, V2_DEST, family=0x12), "UDP over IPv4", 14),
    ("v2 UDP over IPv6", proxy_v2(family=0x22, address_block=bytes(36)), "UDP over IPv6", 14),
    ("v2 UNIX datagram", proxy_v2(family=0x32, address_block=bytes(216)), "UNIX datagram", 14),
    ("v2 family 4", proxy_v2(V2_SOURCE, V2_DEST, family=0x41), "unknown address family", 14),
    ("v2 protocol 3", proxy_v2(V2_SOURCE, V2_DEST, family=0x13), "unknown address family", 14),
    ("v2 INET with UNSPEC protocol", proxy_v2(V2_SOURCE, V2_DEST, family=0x10),
     "unknown address family", 14),
    ("v2 TCP4 block too short", proxy_v2(family=0x11, address_block=bytes(11)),
     "11-octet address block", 27),
    ("v2 TCP4 length shorter than its block", proxy_v2(V2_SOURCE, V2_DEST, length=8),
     "8-octet address block", 24),
    ("v2 TCP6 with a TCP4 block", proxy_v2(V2_SOURCE, V2_DEST, family=0x21),
     "12-octet address block, TCP over IPv6 needs 36", 28),
    ("v2 UNIX block too short", proxy_v2(family=0x31, address_block=bytes(200)),
     "200-octet address block", 216),
    ("v2 TLV overruns", _tlv_area(b"\x05\x00\x09abc"), "TLV 0x05 of 9 octets overruns", 34),
    ("v2 stray octets after TLVs", _tlv_area(b"\x05\x00\x01x\x04\x00"),
     "2 stray octet(s) after the last TLV", 34),
    ("v2 CRC32C mismatch", with_crc32c([])[:-1] + b"\x00", "CRC32C checksum mismatch", 35),
    ("v2 CRC32C of 3 octets", proxy_v2(V2_SOURCE, V2_DEST, [(0x03, b"abc")]), "malformed", 34),
    ("v2 two CRC32C", proxy_v2(V2_SOURCE, V2_DEST, [(0x03, bytes(4))] * 2), "repeated", 42),
    ("v2 over the size cap", proxy_v2(V2_SOURCE, V2_DEST, [(0x04, bytes(P.V2_MAX_HEADER - 30))]),
     f"more than the {P.V2_MAX_HEADER}", 16),
    ("v2 length 65535", proxy_v2(V2_SOURCE, V2_DEST, length=65535), "65551 octets", 16),
]



def feed_bytewise(data: bytes) -> tuple[P.Result, int]:
    """Feed one byte at a time; the first result that is not NEED_MORE, and how many
    bytes it took."""
    parser = P.ProxyHeaderParser()
    for i in range(len(data)):
        result = parser.feed(data[i:i + 1])
        if result is not P.NEED_MORE:
            return result, i + 1
    return P.NEED_MORE, len(data)


def address(pair):
    return None if pair is None else P.Address(*pair)


# --- good headers ----------------------------------------------------------------------

@pytest.mark.parametrize("header, source, destination", [c[1:] for c in GOOD],
                         ids=[c[0] for c in GOOD])
@pytest.mark.parametrize("tail", [b"", SMTP_TAIL, TLS_TAIL], ids=["alone", "+SMTP", "+TLS"])
def test_good_header_whole(header, source, destination, tail):
    result = P.ProxyHeaderParser().feed(header + tail)
    assert isinstance(result, P.ProxyHeader), result
    assert result.version == (1 if header.startswith(b"PROXY") else 2)
    assert (result.source, result.destination) == (address(source), address(destination))
    assert result.header_length == len(header)
    assert result.leftover == tail


@pytest.mark.parametrize("header, source, destination", [c[1:] for c in GOOD],
                         ids=[c[0] for c in GOOD])
def test_good_header_byte_at_a_time(header, source, destination):
    """Every proper prefix needs more (a truncated header is never taken as complete),
    and the header is complete at its last byte, with nothing left over."""
    result, used = feed_bytewise(header + SMTP_TAIL)
    assert isinstance(result, P.ProxyHeader), result
    assert used == len(header)
    assert result.leftover == b""
    assert result.source == address(source)


@pytest.mark.parametrize("header, source", [(c[1], c[2]) for c in GOOD], ids=[c[0] for c in GOOD])
def test_good_header_split_anywhere(header, source):
    """Two reads, cut at every point; what follows the header in the second comes back."""
    data = header + SMTP_TAIL
    step = max(1, len(header) // 200)    # the 4 KiB header: every 20th point
    for cut in range(0, len(header), step):
        parser = P.ProxyHeaderParser()
        assert parser.feed(data[:cut]) is P.NEED_MORE
        result = parser.feed(data[cut:])
        assert isinstance(result, P.ProxyHeader), (cut, result)
        assert result.source == address(source)
        assert result.leftover == SMTP_TAIL


def test_header_in_many_pieces_then_commands_in_the_last():
    parser = P.ProxyHeaderParser()
    header = proxy_v2(V2_SOURCE, V2_DEST, [(0x05, b"abc" * 20)])
    body, last = header[:-3], header[-3:]
    for i in range(0, len(body), 7):
        assert parser.feed(body[i:i + 7]) is P.NEED_MORE
    result = parser.feed(last + SMTP_TAIL)
    assert isinstance(result, P.ProxyHeader)
    assert result.leftover == SMTP_TAIL
    assert result.tlvs == ((0x05, b"abc" * 20),)


def test_tlvs_are_returned_as_sent():
    result = P.ProxyHeaderParser().feed(with_crc32c([(0x05, b"id"), (0x20, b"\x01\x00\x00\x00\x00")]))
    assert isinstance(result, P.ProxyHeader)
    assert [t for t, _ in result.tlvs] == [0x05, 0x20, 0x03]


@pytest.mark.parametrize("header", [_V1, V2_GOOD], ids=["v1", "v2"])
def test_truncated_header_needs_more_forever(header):
    """Cut anywhere: more is needed; the caller's 5 s deadline ends the wait."""
    for cut in range(len(header)):
        assert P.ProxyHeaderParser().feed(header[:cut]) is P.NEED_MORE


def test_v2_length_longer_than_what_comes_needs_more():
    assert P.ProxyHeaderParser().feed(proxy_v2(V2_SOURCE, V2_DEST, length=40)) is P.NEED_MORE


def test_read_once_only():
    parser = P.ProxyHeaderParser()
    assert isinstance(parser.feed(_V1), P.ProxyHeader)
    with pytest.raises(RuntimeError):
        parser.feed(_V1)
    failed = P.ProxyHeaderParser()
    assert isinstance(failed.feed(b"EHLO"), P.ProxyError)
    with pytest.raises(RuntimeError):
        failed.feed(b"x")


def test_crc32c_known_answer():
    assert P.crc32c(b"123456789") == 0xE3069283    # RFC 3720 B.4 check value


def test_limits_are_the_specs():
    assert len(LONGEST_V1) == P.V1_MAX_LINE == 107
    assert len(LONGEST_TCP6) == 104
    assert len(dict((c[0], c[1]) for c in GOOD)["v2 at the size cap"]) == P.V2_MAX_HEADER


NETWORKS = tuple(ipaddress.ip_network(n) for n in ("127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"))


@pytest.mark.parametrize("peer, expected", [
    ("127.0.0.1", True), ("127.0.0.2", False), ("10.1.2.3", True), ("192.0.2.1", False),
    ("::ffff:10.1.2.3", True), ("::ffff:192.0.2.1", False), ("2001:db8::25", True),
    ("2001:db9::25", False), ("::1", False), ("2001:db8::1%eth0", True), ("", False),
    ("unknown", False), ("/run/ccsmtp.sock", False),
])
def test_from_proxy(peer, expected):
    assert P.from_proxy(peer, NETWORKS) is expected
    assert P.from_proxy(peer, ()) is False


# --- malformed input -------------------------------------------------------------------

@pytest.mark.parametrize("data, words, at", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_header_whole(data, words, at):
    result = P.ProxyHeaderParser().feed(data)
    assert isinstance(result, P.ProxyError), result
    assert words in result.reason
    assert "\n" not in result.reason and "\r" not in result.reason


@pytest.mark.parametrize("data, words, at", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_header_byte_at_a_time(data, words, at):
    """The same error, known after exactly `at` octets: a client that is not a proxy
    is refused at its first byte, a bad v2 version or family before the length."""
    whole = P.ProxyHeaderParser().feed(data)
    result, used = feed_bytewise(data)
    assert result == whole
    assert used == at


# --- properties --------------------------------------------------------------------------

def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def run(pieces: list[bytes]) -> tuple[P.Result, int]:
    """Feed pieces until a result; that result and how many bytes were fed."""
    parser, fed = P.ProxyHeaderParser(), 0
    for piece in pieces:
        result = parser.feed(piece)
        fed += len(piece)
        if result is not P.NEED_MORE:
            return result, fed
    return P.NEED_MORE, fed


def check_invariants(data: bytes, pieces: list[bytes]) -> None:
    whole = P.ProxyHeaderParser().feed(data)
    result, fed = run(pieces)
    assert type(result) is type(whole)
    if isinstance(whole, P.ProxyError):
        assert result == whole
        assert whole.reason and "\n" not in whole.reason
    elif isinstance(whole, P.ProxyHeader):
        assert isinstance(result, P.ProxyHeader)
        # Never consumes past the header: what follows it comes back untouched.
        assert whole.leftover == data[whole.header_length:]
        assert result.leftover == data[whole.header_length:fed]
        assert (result.source, result.header_length) == (whole.source, whole.header_length)
        # The header is complete exactly at its last byte, not before.
        assert P.ProxyHeaderParser().feed(data[:whole.header_length - 1]) is P.NEED_MORE
        assert whole.header_length <= max(P.V1_MAX_LINE, P.V2_MAX_HEADER)


PREFIXES = st.sampled_from([b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                            P.V2_SIGNATURE, P.V2_SIGNATURE + b"\x21\x11", P.V2_SIGNATURE + b"\x20"])


@FUZZ
@given(prefix=PREFIXES, rest=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_fuzz_any_input(prefix, rest, cuts):
    data = prefix + rest
    check_invariants(data, chunked(data, cuts))


IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(0, 65535)
TLVS = st.lists(st.tuples(st.integers(0, 255).filter(lambda t: t != 0x03), st.binary(max_size=40)),
                max_size=5)


@st.composite
def valid_headers(draw):
    v6 = draw(st.booleans())
    host = IPV6 if v6 else IPV4
    source, destination = (draw(host), draw(PORT)), (draw(host), draw(PORT))
    if draw(st.booleans()):
        return proxy_v1(source, destination), source
    return proxy_v2(source, destination, draw(TLVS)), source


@FUZZ
@given(header=valid_headers(), tail=st.binary(max_size=100), cuts=st.lists(st.integers(0, 500), max_size=6))
def test_fuzz_valid_headers(header, tail, cuts):
    data, (source, port) = header[0] + tail, header[1]
    result, fed = run(chunked(data, cuts))
    assert isinstance(result, P.ProxyHeader), result
    assert result.header_length == len(header[0])
    assert result.leftover == data[len(header[0]):fed]
    ip = ipaddress.ip_address(source)
    unmapped = getattr(ip, "ipv4_mapped", None) or ip
    assert result.source == P.Address(str(unmapped), port)


@FUZZ
@given(header=valid_headers(), position=st.integers(0, 10_000), value=st.integers(0, 255),
       tail=st.binary(max_size=20), cuts=st.lists(st.integers(0, 500), max_size=6))
def test_fuzz_mutated_headers(header, position, value, tail, cuts):
    data = bytearray(header[0] + tail)
    data[position % len(data)] = value
    check_invariants(bytes(data), chunked(bytes(data), cuts))


# --- real HAProxy ------------------------------------------------------------------------

CLIENT_IP = "127.0.0.5"     # any 127/8 address is ours on Linux loopback


class HeaderServer:
    """Accepts connections, parses each one's PROXY header and answers with the source it
    names and every byte that followed the header up to the client's end of line."""

    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()[:2]
        self.results: list[P.Result] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            parser, result = P.ProxyHeaderParser(), P.NEED_MORE
            try:
                while result is P.NEED_MORE:
                    data = conn.recv(7)     # small reads: the header arrives in pieces
                    if not data:
                        break
                    result = parser.feed(data)
                with self.lock:
                    self.results.append(result)
                if not isinstance(result, P.ProxyHeader):
                    return
                rest = result.leftover
                while not rest.endswith(b"\n"):
                    data = conn.recv(4096)
                    if not data:
                        return
                    rest += data
                source = result.source.host if result.source else "local"
                conn.sendall(f"{source} v{result.version} ".encode() + rest)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def through_haproxy(haproxy, payload: bytes, client_ip: str) -> bytes:
    family = socket.AF_INET6 if ":" in client_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.bind((client_ip, 0))
        client.connect((haproxy.host, haproxy.port))
        client.sendall(payload)    # at once, before anything comes back
        answer = b""
        while not answer.endswith(b"\n"):
            data = client.recv(4096)
            if not data:
                break
            answer += data
        return answer


@pytest.mark.parametrize("send_proxy, options", [("v1", ""), ("v2", ""), ("v2", "crc32c,unique-id")],
                         ids=["send-proxy", "send-proxy-v2", "send-proxy-v2 crc32c unique-id"])
@pytest.mark.parametrize("payload", [b"EHLO client.example\r\n", TLS_TAIL[:50] + b"\n"],
                         ids=["SMTP", "TLS bytes"])
def test_real_haproxy(haproxy_factory, send_proxy, options, payload):
    server = HeaderServer()
    try:
        haproxy = haproxy_factory([server.address], send_proxy, proxy_v2_options=options)
        answer = through_haproxy(haproxy, payload, CLIENT_IP)
        assert answer == f"{CLIENT_IP} v{send_proxy[1]} ".encode() + payload, haproxy.log()
    finally:
        server.close()


@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_real_haproxy_ipv6(haproxy_factory, send_proxy):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = HeaderServer("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    try:
        haproxy = haproxy_factory([server.address], send_proxy, host="::1")
        answer = through_haproxy(haproxy, b"EHLO six\r\n", "::1")
        assert answer == f"::1 v{send_proxy[1]} EHLO six\r\n".encode(), haproxy.log()
    finally:
        server.close()


def test_real_haproxy_health_checks_are_local(haproxy_factory):
    """HAProxy's health checks with check-send-proxy are v2 LOCAL connections: the
    parser says "use the connection's own address"."""
    server = HeaderServer()
    try:
        haproxy = haproxy_factory([server.address], "v2", check=True)
        deadline = 100
        while deadline and not server.results:
            deadline -= 1
            threading.Event().wait(0.1)
        with server.lock:
            first = server.results[0] if server.results else None
        assert isinstance(first, P.ProxyHeader), (first, haproxy.log())
        assert (first.version, first.source, first.destination) == (2, None, None)
    finally:
        server.close()
