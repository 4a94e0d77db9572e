"""A scriptable LMTP server (RFC 2033) for tests of LMTP clients.

    server = FakeLMTP(respond=script)        # TCP on 127.0.0.1; FakeLMTP(unix_path=...)
    server.target                            # a config.DeliveryTarget for the client
    server.sessions                          # what each connection saw: commands, messages
    server.close()

By default it behaves like a well-mannered LMTP server: 220, LHLO with `extensions`,
250 to MAIL and RCPT, 354 to DATA (503 without a recipient), reads DATA to CRLF.CRLF
or BDAT chunks, then one 250 per accepted recipient. `respond(event, session, arg)`
may replace any answer: return bytes to send instead, DROP to close the connection
at once, STALL to say nothing more (it reads on until the client hangs up), FREEZE
to neither read nor write any more (until server.close()), or None for the default.
Events and their arg:

    "greeting" None | "lhlo" line | "mail" line | "rcpt" address | "data" None (354)
    "content" bytes received so far of this message (after each read: DROP, STALL)
    "bdat" (size, last) for a chunk that is not the last | "final" address (per
    accepted recipient, after the content) | "rset" None | "idle" None (after a
    transaction's last reply: DROP models an idle timeout)

A command that arrived together with more input (it was pipelined: the client did not
wait for its reply) is recorded in session.pipelined.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import threading
from typing import Callable

from prefork_smtp.config import DeliveryTarget

DROP = object()
STALL = object()
FREEZE = object()
DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")
Respond = Callable[[str, "Session", object], object]


@dataclasses.dataclass
class Message:
    mail: str                        # the MAIL command line
    recipients: list[str]            # accepted RCPT addresses, in order
    wire: bytes = b""                # content as it came over the wire (stuffed for DATA)
    content: bytes = b""             # as stored: unstuffed (DATA) or the chunks joined (BDAT)
    via: str = ""                    # "DATA" or "BDAT"
    chunks: list[int] = dataclasses.field(default_factory=list)
    complete: bool = False


@dataclasses.dataclass
class Session:
    commands: list[str] = dataclasses.field(default_factory=list)
    messages: list[Message] = dataclasses.field(default_factory=list)
    pipelined: list[str] = dataclasses.field(default_factory=list)
    closed_by_client: bool = False


class _Dropped(Exception):
    pass


class FakeLMTP:
    def __init__(self, respond: Respond | None = None, *,
                 extensions: tuple[str, ...] = DEFAULT_EXTENSIONS, unix_path: str | None = None):
        self.respond = respond or (lambda event, session, arg: None)
        self.extensions = extensions
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.target = DeliveryTarget("lmtp", path=unix_path)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.target = DeliveryTarget("lmtp", host="127.0.0.1", port=self.sock.getsockname()[1])
        self.sock.listen(16)
        self.sessions: list[Session] = []
        self.errors: list[str] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept() thread (Linux)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)   # wakes the thread blocked in recv
                    conn.close()
                except OSError:
                    pass
        if self.target.path and os.path.exists(self.target.path):
            os.unlink(self.target.path)

    @property
    def messages(self) -> list[Message]:
        return [m for s in self.sessions for m in s.messages]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            session = Session()
            with self._lock:
                self.sessions.append(session)
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, session), daemon=True).start()

    def _serve(self, conn: socket.socket, session: Session) -> None:
        try:
            _Conversation(self, conn, session).run()
        except _Dropped:
            pass
        except OSError:
            pass
        except Exception as e:  # a bug in a test script: make it visible
            self.errors.append(repr(e))
        finally:
            conn.close()


class _Conversation:
    def __init__(self, server: FakeLMTP, conn: socket.socket, session: Session):
        self.server, self.conn, self.session = server, conn, session
        self.buf = b""
        self.message: Message | None = None

    # --- I/O -------------------------------------------------------------------

    def _say(self, event: str, default: bytes, arg: object = None) -> bytes:
        answer = self.server.respond(event, self.session, arg)
        if answer is DROP:
            raise _Dropped
        self._stall_or_freeze(answer)
        reply = default if answer is None else answer
        self.conn.sendall(reply)      # type: ignore[arg-type]
        return reply                  # type: ignore[return-value]

    def _stall_or_freeze(self, answer: object) -> None:
        if answer is FREEZE:
            self.server.closed.wait()
            raise _Dropped
        if answer is STALL:
            self._wait_for_hangup()

    def _wait_for_hangup(self) -> None:
        while self.conn.recv(65536):
            pass
        self.session.closed_by_client = True
        raise _Dropped

    def _fill(self) -> None:
        data = self.conn.recv(65536)
        if not data:
            self.session.closed_by_client = True
            raise _Dropped
        self.buf += data

    def _line(self) -> str:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    # --- the conversation ------------------------------------------------------------

    def run(self) -> None:
        self._say("greeting", b"220 fake.test LMTP ready\r\n")
        while True:
            line = self._line()
            self.session.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if self.buf and verb != "BDAT":      # BDAT's chunk follows it by design
                self.session.pipelined.append(line)
            handler = getattr(self, "_" + verb.lower(), None) if verb.isalpha() else None
            if handler is None:
                self.conn.sendall(b"500 5.5.2 unknown command\r\n")
            else:
                handler(line)

    def _lhlo(self, line: str) -> None:
        lines = ["fake.test"] + list(self.server.extensions)
        text = "".join(f"250{'-' if i < len(lines) - 1 else ' '}{w}\r\n" for i, w in enumerate(lines))
        self._say("lhlo", text.encode(), line)

    def _mail(self, line: str) -> None:
        reply = self._say("mail", b"250 2.1.0 OK\r\n", line)
        if reply.startswith(b"2"):
            self.message = Message(line, [])

    def _rcpt(self, line: str) -> None:
        match = re.match(r"RCPT TO:<(.*)>", line, re.IGNORECASE)
        address = match.group(1) if match else line
        if self.message is None:
            self.conn.sendall(b"503 5.5.1 MAIL needed first\r\n")
            return
        reply = self._say("rcpt", b"250 2.1.5 OK\r\n", address)
        if reply.startswith(b"2"):
            self.message.recipients.append(address)

    def _data(self, line: str) -> None:
        if self.message is None or not self.message.recipients:
            self.conn.sendall(b"503 5.5.1 No valid recipients\r\n")
            return
        reply = self._say("data", b"354 OK\r\n")
        if not reply.startswith(b"354"):
            return
        message = self.message
        message.via = "DATA"
        self.session.messages.append(message)
        data = b"\r\n" + self.buf          # so that a first line "." is found too
        while (end := data.find(b"\r\n.\r\n")) < 0:
            self._content_event(data[2:])
            self._fill()
            data = b"\r\n" + self.buf
        message.wire = data[2:end + 2]      # with the content's last CRLF
        self.buf = data[end + 5:]
        message.content = (b"\r\n" + message.wire).replace(b"\r\n.", b"\r\n")[2:]
        message.complete = True
        self._finish()

    def _content_event(self, so_far: bytes) -> None:
        answer = self.server.respond("content", self.session, so_far)
        if answer is DROP:
            raise _Dropped
        self._stall_or_freeze(answer)

    def _bdat(self, line: str) -> None:
        words = line.split()
        size, last = int(words[1]), len(words) > 2 and words[2].upper() == "LAST"
        if self.message is not None and self.message not in self.session.messages:
            self.message.via = "BDAT"
            self.session.messages.append(self.message)
        while len(self.buf) < size:
            if self.message is not None:
                self._content_event(self.message.wire + self.buf)
            self._fill()
        chunk, self.buf = self.buf[:size], self.buf[size:]
        if self.message is None or not self.message.recipients:
            self.conn.sendall(b"503 5.5.1 No valid recipients\r\n")
            return
        self.message.wire += chunk
        self.message.content += chunk
        self.message.chunks.append(size)
        if not last:
            self._say("bdat", f"250 2.0.0 {size} octets received\r\n".encode(), (size, last))
            return
        self.message.complete = True
        self._finish()

    def _finish(self) -> None:
        message, self.message = self.message, None
        assert message is not None
        for address in message.recipients:
            self._say("final", f"250 2.0.0 <{address}> Saved\r\n".encode(), address)
        self._say("idle", b"")

    def _rset(self, line: str) -> None:
        self.message = None
        self._say("rset", b"250 2.0.0 OK\r\n")

    def _noop(self, line: str) -> None:
        self.conn.sendall(b"250 2.0.0 OK\r\n")

    def _quit(self, line: str) -> None:
        self.conn.sendall(b"221 2.0.0 Bye\r\n")
        raise _Dropped
