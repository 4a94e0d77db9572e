"""The PROXY protocol header, versions 1 and 2 (HAProxy's doc/proxy-protocol.txt), sans-IO.

Owns: recognising and strictly parsing the one header a trusted proxy puts in front of a
connection, fed in whatever pieces the network delivers, and saying where the client
really is and which bytes after the header belong to the application protocol.
Must not: touch sockets, clocks, loggers or configuration.

What the caller (the session) owns, by SPEC §11 and the spec's §2 and §5:
- Deciding that a header is required: only for connections from `proxy_from`, never by
  guessing from the bytes (spec §5: guessing lets any client forge its address).
- The deadline, HEADER_TIMEOUT_S: a connection that has not completed its header by
  then is closed without a greeting (spec §2: "a few seconds, at least 3").
- Reading the header exactly once, before the greeting and before any TLS, and never
  again: feed() refuses to be called after it has given a result.
- Handing `leftover` to the next layer (a TLS handshake or the SMTP protocol): those
  bytes arrived in the same reads as the header but are not part of it.

Usage:
    if from_proxy(peer_host, config.proxy_from):
        parser = ProxyHeaderParser()
        result = parser.feed(data)  # for each read, until the result is not NEED_MORE
    NeedMore      -> read more (until the deadline)
    ProxyHeader   -> result.source: Address(host, port), or None = use the socket's peer
                     (v1 UNKNOWN; v2 LOCAL, UNSPEC, AF_UNIX); result.leftover
    ProxyError    -> result.reason, one line for the log; close the connection

Fails closed: any byte string yields one of the three results, never an exception. Bytes
that cannot start either signature are refused at the first such byte, so an SMTP
client (which sends nothing before the greeting) waits for the deadline, and one that
speaks first (or a TLS ClientHello) is refused at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Iterable, NamedTuple, Union

# SPEC §11: a connection from a proxy network has this long to send its header.
HEADER_TIMEOUT_S = 5.0

# Spec §2.1: "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n" is the
# longest line, 107 octets with the CRLF; no CRLF within them makes the line invalid.
V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107

# Spec §2.2: the 12-octet signature, then version/command, family/protocol and the
# length of the rest, 16 octets in all.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
# The length field allows 16 + 65535 octets; nothing a proxy sends comes near that. The
# largest header HAProxy builds (IPv6 addresses, UNIQUE_ID <= 128, AUTHORITY and ALPN
# <= 255 each, the SSL TLV with version, cipher, algorithms and a certificate CN, CRC32C,
# NETNS) stays under 1.5 KiB, and AF_UNIX addresses add 216. Postfix caps at 536 (one
# minimal MSS), which AF_UNIX plus SSL TLVs can exceed; 4 KiB leaves room for every
# registered TLV while bounding what an idle connection can make us buffer.
V2_MAX_HEADER = 4096

_V2_VERSION = 0x2
_V2_LOCAL = 0x0     # a connection the proxy made itself (health check): use the real peer
_V2_PROXY = 0x1     # relayed: the address block says who the client is
_TLV_HEADER = 3     # type, 16-bit length
_TLV_CRC32C = 0x03  # spec §2.2.3: checked when present


class Address(NamedTuple):
    """Like a socket's peername: host in canonical text form, port."""
    host: str
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class NeedMore:
    """The header is not complete yet: feed more bytes."""


NEED_MORE = NeedMore()


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int                     # 1 or 2
    source: Address | None           # None: use the connection's own peer address
    destination: Address | None
    header_length: int               # octets of the header itself
    leftover: bytes                  # what followed it: the application protocol's bytes
    tlvs: tuple[tuple[int, bytes], ...] = ()   # v2 TLVs as sent, (type, value)


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyError:
    reason: str                      # one line, safe to log (input shown with repr)


Result = Union[NeedMore, ProxyHeader, ProxyError]


@dataclasses.dataclass(frozen=True, slots=True)
class _Family:
    name: str
    address_length: int | None       # None: address information is not ours to read
    ip_length: int = 0               # octets per IP address; 0: not an IP family


# Spec §2.2, the 14th octet. Only TCP carries SMTP; UDP and UNIX datagram are refused.
_V2_FAMILIES = {
    0x00: _Family("UNSPEC", None),
    0x11: _Family("TCP over IPv4", 12, 4),
    0x21: _Family("TCP over IPv6", 36, 16),
    0x31: _Family("UNIX stream", 216),
}
_V2_REFUSED_FAMILIES = {0x12: "UDP over IPv4", 0x22: "UDP over IPv6", 0x32: "UNIX datagram"}

_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")     # shape only; ipaddress checks the rest
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_V1_FAMILIES = {"TCP4": (_V1_IPV4, ipaddress.IPv4Address),
                "TCP6": (_V1_IPV6, ipaddress.IPv6Address)}


def from_proxy(peer_host: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether a connection from peer_host (a socket's peername host) must begin with a
    PROXY header: it is in one of the `proxy_from` networks. An IPv4 client seen on a
    dual-stack listener (::ffff:10.0.0.1) counts as its IPv4 address; a peer that is no
    IP address (a unix socket) is never a proxy."""
    try:
        address = ipaddress.ip_address(peer_host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class ProxyHeaderParser:
    """One connection's PROXY header. feed() until the result is not NEED_MORE."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._result: ProxyHeader | ProxyError | None = None

    def feed(self, data: bytes) -> Result:
        if self._result is not None:
            # The header is read once per connection (SPEC §11); more is a caller bug.
            raise RuntimeError("the PROXY header has already been read")
        self._buf += data
        result = self._parse()
        if not isinstance(result, NeedMore):
            self._result = result
            self._buf = bytearray()
        return result

    def _parse(self) -> Result:
        buf = self._buf
        if not buf:
            return NEED_MORE
        for signature, parse in ((V1_PREFIX, self._v1), (V2_SIGNATURE, self._v2)):
            if buf[0] == signature[0]:
                seen = min(len(buf), len(signature))
                if buf[:seen] != signature[:seen]:
                    return _not_a_header(buf, signature)
                return NEED_MORE if seen < len(signature) else parse()
        return _not_a_header(buf, b"")

    # --- version 1 ---------------------------------------------------------------

    def _v1(self) -> Result:
        window = bytes(self._buf[:V1_MAX_LINE])
        end = window.find(b"\r\n")
        line = window if end < 0 else window[:end]
        bad = _first_bad_v1_byte(line, complete=end >= 0)
        if bad is not None:
            return ProxyError(f"v1 header: {bad}")
        if end < 0:
            if len(window) >= V1_MAX_LINE:
                return ProxyError(f"v1 header: no CRLF within {V1_MAX_LINE} octets")
            return NEED_MORE
        parsed = _parse_v1_line(line.decode("ascii"))
        if isinstance(parsed, str):
            return ProxyError(f"v1 header: {parsed}")
        source, destination = parsed
        return self._done(1, source, destination, end + 2)

    # --- version 2 ---------------------------------------------------------------

    def _v2(self) -> Result:
        # Checked octet by octet as they arrive, so a bad version, command or family is
        # refused before the rest: 13th octet, then 14th, then the length.
        buf = self._buf
        fixed = bytes(buf[len(V2_SIGNATURE):V2_FIXED_LENGTH])   # up to 4 octets so far
        if not fixed:
            return NEED_MORE
        version, command = fixed[0] >> 4, fixed[0] & 0x0F
        if version != _V2_VERSION:
            return ProxyError(f"v2 header: version {version}, not 2")
        if command not in (_V2_LOCAL, _V2_PROXY):
            return ProxyError(f"v2 header: unknown command 0x{command:X}")
        if len(fixed) >= 2 and command == _V2_PROXY:
            problem = _family_problem(fixed[1])
            if problem:
                return ProxyError(f"v2 header: {problem}")
        if len(fixed) < 4:
            return NEED_MORE
        total = V2_FIXED_LENGTH + int.from_bytes(fixed[2:4], "big")
        if total > V2_MAX_HEADER:
            return ProxyError(f"v2 header: {total} octets, more than the {V2_MAX_HEADER} we accept")
        if len(buf) < total:
            return NEED_MORE
        header = bytes(buf[:total])
        family = _V2_FAMILIES[header[13]] if command == _V2_PROXY else None
        if family is None or family.address_length is None:
            # Spec §2.2: for LOCAL the receiver discards the whole block, family included;
            # for UNSPEC it ignores the address information. Either way: the real peer.
            return self._done(2, None, None, total)
        parsed = _parse_v2_block(header, family)
        if isinstance(parsed, str):
            return ProxyError(f"v2 header: {parsed}")
        source, destination, tlvs = parsed
        return self._done(2, source, destination, total, tlvs)

    def _done(self, version: int, source: Address | None, destination: Address | None,
              length: int, tlvs: tuple[tuple[int, bytes], ...] = ()) -> ProxyHeader:
        return ProxyHeader(version, source, destination, length, bytes(self._buf[length:]), tlvs)


# --- version 1 details ------------------------------------------------------------

def _first_bad_v1_byte(line: bytes, complete: bool) -> str | None:
    """The line is US-ASCII text (spec §2.1); CR and LF only as the final CRLF.
    The answer depends only on the octets up to the bad one, so it is the same
    however the header was cut into pieces."""
    for i, byte in enumerate(line):
        if byte == 0x0D and i == len(line) - 1 and not complete:
            return None                        # may be the start of the CRLF
        if byte == 0x0D:
            return f"CR without LF at octet {i}"
        if byte == 0x0A:
            return f"LF without CR at octet {i}"
        if not 0x20 <= byte <= 0x7E:
            return f"octet 0x{byte:02X} at {i} is not printable US-ASCII"
    return None


def _parse_v1_line(line: str) -> tuple[Address | None, Address | None] | str:
    """(source, destination), or the reason the line is not a valid header."""
    fields = line.split(" ")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        # Spec §2.1: the rest of an UNKNOWN line may be omitted and must be ignored.
        return None, None
    if protocol not in _V1_FAMILIES:
        return f"unknown protocol {protocol[:16]!r}"
    if len(fields) != 6:
        return f"{len(fields) - 2} fields after {protocol}, not 4 separated by single spaces"
    source = _v1_address(protocol, fields[2], fields[4])
    destination = _v1_address(protocol, fields[3], fields[5])
    for found in (source, destination):
        if isinstance(found, str):
            return found
    return source, destination   # type: ignore[return-value]


def _v1_address(protocol: str, host: str, port: str) -> Address | str:
    shape, kind = _V1_FAMILIES[protocol]
    try:
        if not shape.fullmatch(host):
            raise ValueError
        address = kind(host)
    except ValueError:
        return f"{host[:45]!r} is not an address for {protocol}"
    if not _V1_PORT.fullmatch(port) or int(port) > 65535:
        return f"{port[:8]!r} is not a port"
    return Address(_canonical(address), int(port))


# --- version 2 details ------------------------------------------------------------

def _family_problem(byte: int) -> str | None:
    if byte in _V2_FAMILIES:
        return None
    if byte in _V2_REFUSED_FAMILIES:
        return f"{_V2_REFUSED_FAMILIES[byte]} is not supported"
    return f"unknown address family and protocol 0x{byte:02X}"


def _parse_v2_block(header: bytes, family: _Family
                    ) -> tuple[Address | None, Address | None, tuple[tuple[int, bytes], ...]] | str:
    """(source, destination, TLVs) from a complete PROXY header, or a reason."""
    assert family.address_length is not None
    block = header[V2_FIXED_LENGTH:]
    if len(block) < family.address_length:
        return (f"{len(block)}-octet address block, {family.name} needs "
                f"{family.address_length}")
    tlvs = _parse_tlvs(header, V2_FIXED_LENGTH + family.address_length)
    if isinstance(tlvs, str):
        return tlvs
    if not family.ip_length:
        return None, None, tlvs          # AF_UNIX: no network address to use
    n = family.ip_length
    ip = ipaddress.IPv4Address if n == 4 else ipaddress.IPv6Address
    ports = block[2 * n:2 * n + 4]
    source = Address(_canonical(ip(block[:n])), int.from_bytes(ports[:2], "big"))
    destination = Address(_canonical(ip(block[n:2 * n])), int.from_bytes(ports[2:], "big"))
    return source, destination, tlvs


def _parse_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...] | str:
    """The TLVs from start to the end of the header (spec §2.2); each must fit whole."""
    tlvs, crc_at = [], None
    pos = start
    while pos < len(header):
        if len(header) - pos < _TLV_HEADER:
            return f"{len(header) - pos} stray octet(s) after the last TLV"
        kind = header[pos]
        length = int.from_bytes(header[pos + 1:pos + 3], "big")
        value_at = pos + _TLV_HEADER
        if value_at + length > len(header):
            return f"TLV 0x{kind:02X} of {length} octets overruns the header"
        if kind == _TLV_CRC32C:
            if length != 4 or crc_at is not None:
                return "malformed or repeated CRC32C TLV"
            crc_at = value_at
        tlvs.append((kind, header[value_at:value_at + length]))
        pos = value_at + length
    if crc_at is not None:
        # Spec §2.2.3: the checksum of the whole header with the field itself zeroed.
        zeroed = header[:crc_at] + bytes(4) + header[crc_at + 4:]
        if crc32c(zeroed) != int.from_bytes(header[crc_at:crc_at + 4], "big"):
            return "CRC32C checksum mismatch"
    return tuple(tlvs)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1   # Castagnoli, reflected
        table.append(n)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (RFC 4960 Appendix B), as the PP2_TYPE_CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- shared -------------------------------------------------------------------------

def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # An IPv4-mapped IPv6 address is the IPv4 client (as Postfix converts it), so that
    # per-client limits count one client once whichever way the proxy wrote it.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _not_a_header(buf: bytearray, signature: bytes) -> ProxyError:
    # Shows the input up to the first octet that fits neither signature: the same
    # reason however the input was cut into pieces.
    mismatch = next(i for i, byte in enumerate(buf) if i >= len(signature) or byte != signature[i])
    return ProxyError(f"not a PROXY protocol header: {bytes(buf[:mismatch + 1])!r}")
