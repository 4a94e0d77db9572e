"""What a worker and the services it runs say to each other.

Owns: the interface between the process side (a worker accepting connections) and
the protocol side (SMTP today; POP3 and IMAP join the same way). The worker knows no
protocol: for each listener it is handed a Service (as gunicorn hands its workers a
WSGI app), starts it once per protocol family in its process, and asks the running
service for a session per accepted connection.
Depends only on the configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from typing import TYPE_CHECKING, Callable, Protocol

from .config import Config, ListenAddress

if TYPE_CHECKING:
    from .auth.login import LoginChecker


class Session(Protocol):
    """What a worker asks of every session, whatever its protocol."""

    family: str

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else once the work in hand is done."""

    def abort(self) -> None:
        """Fast stop: drop the connection."""


class SessionHooks:
    """What a session tells its worker: counters and its own end."""

    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self.messages = 0

    def opened(self, session: Session) -> None:
        self.sessions.add(session)

    def closed(self, session: Session) -> None:
        self.sessions.discard(session)

    def message_queued(self) -> None:
        self.messages += 1

    def admit(self, client_ip: str) -> bool:
        """Count a new connection from client_ip; False if it is one too many."""
        return True

    def release(self, client_ip: str) -> None:
        """A connection counted by admit() has ended."""

    def broken(self, why: object) -> None:
        """This process can no longer serve well (out of memory): let it be replaced."""


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What a worker gives the services it starts."""

    worker_id: int
    config: Config
    hooks: SessionHooks
    notify_delivery: socket.socket | None   # a datagram here wakes the delivery process
    tls: ssl.SSLContext | None = None       # the server's TLS context, if it has a certificate
    login: "LoginChecker | None" = None     # checks user names and passwords (POP3, IMAP)


class RunningService(Protocol):
    """A service started in one worker: makes its sessions, and finishes its work."""

    def new_session(self, listener: ListenAddress) -> asyncio.Protocol: ...

    async def close(self) -> None:
        """After the last session: finish what is in hand (e.g. queue commits)."""


@dataclasses.dataclass(frozen=True)
class Service:
    name: str                 # as a listener names it: smtp://...
    family: str               # the protocol (config.SERVICE_FAMILIES); started once per worker
    start: Callable[[WorkerContext], RunningService]
