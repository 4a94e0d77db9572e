"""A session that closes after its last reply lets go of its transport once the client
has closed too (net/session.py, close_after_reply).

After the last reply the server half-closes (plain) or sends close_notify (TLS) and
gives the client CLOSE_LINGER_S to close its end before aborting. When the client
closes first, the linger timer must go with the connection: it held the transport,
and a TLS transport holds asyncio's 256 KiB read buffer, so every TLS session lived
on for a second after it ended. Under the bench's TLS load (~350 sessions/s per
worker) that was ~750 dead TLS protocols per worker, 290 MB of RSS instead of 37.

In-process: a minimal StreamSession subclass on a real loopback socket, with the
TLS context ccsmtp builds (net/tls.py) for a trustme certificate.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
import weakref

import pytest

from prefork_smtp.config import Config, ListenAddress
from prefork_smtp.net.session import CLOSE_LINGER_S, StreamSession
from prefork_smtp.net.tls import server_context
from prefork_smtp.service import SessionHooks, WorkerContext


class QuitOnly(StreamSession):
    """Greets, answers STARTTLS with 220 and a handshake, and QUIT with 221 and a close."""

    family = "smtp"
    made: list["QuitOnly"] = []

    def begin(self) -> None:
        QuitOnly.made.append(self)
        self.write(b"220 ready\r\n")

    def received(self, data: bytes) -> None:
        if data.startswith(b"STARTTLS"):
            self.write(b"220 go ahead\r\n")
            self.start_tls(lambda: None)
        elif data.startswith(b"QUIT"):
            self.write(b"221 bye\r\n")
            self.close_after_reply()

    def refusal(self, why: str) -> bytes:
        return b"421 " + why.encode() + b"\r\n"


@pytest.fixture
def tls_context(tls_files):
    return server_context(str(tls_files.cert), str(tls_files.key))


def worker_context(tls: ssl.SSLContext | None) -> WorkerContext:
    config = Config(workers=1, listen=(), user=None, group=None, spool_dir="/nonexistent",
                    domains=frozenset({"example.org"}), hostname="mx.test")
    return WorkerContext(1, config, SessionHooks(), None, tls)


async def one_session(tls: ssl.SSLContext | None) -> tuple[weakref.ref, weakref.ref]:
    """A session to QUIT (over STARTTLS when tls is given) whose client closes at once;
    weak references to the session and to the transport it ended with."""
    QuitOnly.made.clear()
    loop = asyncio.get_running_loop()
    context = worker_context(tls)
    listener = ListenAddress("127.0.0.1", 0)
    server = await loop.create_server(lambda: QuitOnly(context, listener), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220")
        if tls is not None:
            writer.write(b"STARTTLS\r\n")
            assert (await reader.readline()).startswith(b"220")
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
            await writer.start_tls(client)
        writer.write(b"QUIT\r\n")
        assert await reader.readline() == b"221 bye\r\n"
        writer.close()          # the client closes first, well within the linger
        session = QuitOnly.made[0]
        deadline = loop.time() + 5
        while not session._ended:
            assert loop.time() < deadline, "the session did not see the client close"
            await asyncio.sleep(0.01)
        transport = session.transport
        assert transport is not None
        refs = weakref.ref(session), weakref.ref(transport)
        del session, transport
        QuitOnly.made.clear()
        await asyncio.sleep(0.05)     # a turn or two for asyncio's own close callbacks
        return refs
    finally:
        server.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "starttls"])
def test_an_ended_session_and_its_transport_are_freed_within_the_linger(encrypted, tls_context):
    async def scenario() -> None:
        started = asyncio.get_running_loop().time()
        session, transport = await one_session(tls_context if encrypted else None)
        gc.collect()
        assert asyncio.get_running_loop().time() - started < CLOSE_LINGER_S
        assert session() is None, "the ended session is still referenced"
        assert transport() is None, "the ended session's transport is still referenced"

    asyncio.run(scenario())
