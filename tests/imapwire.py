"""A small raw-socket IMAP client for the fault and hostile-input tests: it sends
exactly the octets a test gives it and hands back every response, literals included,
so that a test can see what a server sent before it died or closed.

A response is a list [text, literal, text, literal, ..., text]: the text pieces end in
CRLF (a piece followed by a literal ends in "{n}\\r\\n"), literals are raw octets.
"""

from __future__ import annotations

import re
import socket
import time

_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n\Z")


class Closed(Exception):
    """The server closed the connection (or reset it) before a whole response came."""


class Wire:
    def __init__(self, host: str, port: int, timeout: float = 10.0,
                 source_ip: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source_ip, 0) if source_ip else None)
        self.buf = bytearray()
        self.n = 0
        self.greeting = self.read_line()

    # --- reading ------------------------------------------------------------------------

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed(bytes(self.buf))
        self.buf += chunk

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i + 2])
                del self.buf[:i + 2]
                return line
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_response(self) -> list[bytes]:
        parts = [self.read_line()]
        while True:
            m = _LITERAL_AT_END.search(parts[-1])
            if not m:
                return parts
            parts.append(self.read_exact(int(m.group(1))))
            parts.append(self.read_line())

    def read_until_tagged(self, tag: bytes) -> tuple[list[list[bytes]], bytes]:
        """Untagged responses, then the tagged line (without CRLF)."""
        untagged = []
        while True:
            response = self.read_response()
            if response[0].startswith(tag + b" "):
                return untagged, response[0].rstrip(b"\r\n")
            untagged.append(response)

    def read_all(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes (or timeout passes quietly)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = bytes(self.buf)
        self.buf.clear()
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
        return data

    # --- writing ------------------------------------------------------------------------

    def next_tag(self) -> bytes:
        self.n += 1
        return b"t%d" % self.n

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes | str) -> tuple[list[list[bytes]], bytes]:
        """Send `TAG line` and read to its tagged response."""
        if isinstance(line, str):
            line = line.encode()
        tag = self.next_tag()
        self.send(tag + b" " + line + b"\r\n")
        untagged, tagged = self.read_until_tagged(tag)
        return untagged, tagged[len(tag) + 1:]

    def ok(self, line: bytes | str) -> list[list[bytes]]:
        untagged, tagged = self.command(line)
        assert tagged.startswith(b"OK"), (line, tagged)
        return untagged

    def login(self, user: str, password: str) -> None:
        self.ok(f'LOGIN {user} "{password}"')

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
