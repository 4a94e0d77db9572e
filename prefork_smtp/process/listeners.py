"""Binding the listening sockets, before privileges are dropped.

Owns: creating TCP listeners that asyncio will treat as TCP (proto IPPROTO_TCP, so
accepted connections get TCP_NODELAY; socket.create_server() leaves proto 0 and
costs ~44 ms a transaction to Nagle and delayed ACKs), and turning bind errors
into one-line messages that say what to do.
"""

from __future__ import annotations

import dataclasses
import errno
import socket

from ..config import ListenAddress

LISTEN_BACKLOG = 4096


class ListenError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Listener:
    sock: socket.socket
    address: ListenAddress


def bind(address: ListenAddress) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            # [::]:25 next to 0.0.0.0:25: each family its own socket.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise ListenError(_explain(address, e)) from None
    sock.set_inheritable(True)
    return sock


def _explain(address: ListenAddress, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"cannot listen on {address}: address already in use (stop the other server or choose another port with -l)"
    if error.errno == errno.EACCES:
        return f"cannot listen on {address}: permission denied (ports below 1024 need root; start as root or use -l 127.0.0.1:2525)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: no such local address (check -l / listen)"
    return f"cannot listen on {address}: {error.strerror}"


def bind_all(addresses: tuple[ListenAddress, ...]) -> list[Listener]:
    listeners: list[Listener] = []
    try:
        for address in addresses:
            listeners.append(Listener(bind(address), address))
    except ListenError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners
