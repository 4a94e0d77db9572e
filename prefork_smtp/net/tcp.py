"""TCP details shared by the server and the load client. Depends on nothing of ours."""

from __future__ import annotations

import asyncio
import socket
import typing


def stream_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """The transport of a new connection, with Nagle's algorithm off: SMTP is a
    dialogue of small writes, and Nagle plus delayed ACKs costs ~40 ms per reply.
    (asyncio sets TCP_NODELAY itself only when the socket's proto is IPPROTO_TCP.)"""
    # Not an isinstance check: uvloop's transports are stream transports without
    # being asyncio.Transport subclasses.
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return typing.cast(asyncio.Transport, transport)
