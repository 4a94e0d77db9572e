"""IMAP4rev1 command parser (RFC 3501 §9 with LITERAL+, SASL-IR, IDLE, UIDPLUS), sans-IO.

Owns: turning the octets a client sends into events: complete commands with typed
arguments, requests to send a literal continuation, BAD reasons, and raw lines when the
caller asks for one (AUTHENTICATE responses, IDLE's DONE); the helpers that read those
lines (decode_sasl_line, is_idle_done). Also the limits on what is buffered: command
text and literal octets. The arguments are read by grammar.py into the values of
commands.py; this module frames (lines, literals, pauses) and makes events.
Must not: touch sockets, clocks, files or loggers; decide policy (what a state allows,
whether APPEND is refused): the caller does, between events.

Use (h11 style, one event at a time so that the caller can act between them):

    parser.receive_data(data)
    while True:
        event = parser.next_event()
        if event is Status.NEED_DATA: break            # read more from the client
        if event is Status.PAUSED: ...                 # see below
        ...                                            # Command, SendContinuation, ParseError, Line

`feed(data)` does both and returns the events up to NEED_DATA or PAUSED (for tests and
simple callers; it cannot refuse a literal, see SendContinuation).

Framing. A command is lines and literals: a line ending in `{n}` (synchronising) or
`{n+}` (RFC 7888 non-synchronising) is followed by n octets and then more of the command.
For `{n}` the parser first returns SendContinuation: the caller writes
response.CONTINUE_LITERAL, or refuses the command with a tagged NO/BAD and calls
refuse_literal() (RFC 3501 §7.5). Before that, the parser has already checked the tag,
the command name, that the command takes strings at all, the octets of the line, and the
size; the rest of the grammar is checked when the command is complete (so a command that
is wrong after a literal costs the client the literal's octets, never more than the
limit).

Limits (set by the caller, changeable between events: SPEC §9 wants 64 KiB before login
and max_size after): `max_line_bytes` bounds the text of one command (all its lines,
literal octets excluded) and of a raw line; `max_literal_bytes` bounds the literal
octets of one command together. A synchronising literal over the limit is refused
without a continuation request (BAD [TOOBIG]; the client will not send it). A
non-synchronising one is already on its way: RFC 7888 leaves the server the choice of
reading and dropping it or closing; we close (ParseError.fatal), because a
{4294967295+} would otherwise have us read 4 GB. Nothing larger than the limits is ever
buffered: an over-long line is dropped as it arrives and answered when its end comes.

Pauses. After AUTHENTICATE, IDLE and STARTTLS commands and after every raw Line, the
parser stops (next_event returns Status.PAUSED) because the octets that follow are not
commands, or must not be read yet. The caller then calls:
  - expect_line(): the next event is a Line (a SASL response line, or IDLE's DONE);
  - discard_buffered(): STARTTLS; drop what the client sent before the handshake
    (SPEC §8, CVE-2021-33515 class);
  - resume(): parse commands again.

Fails closed: any octets give events; nothing in here raises on client input. After a
fatal ParseError the parser ignores all further input.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Union

from . import response as T
from .grammar import (COMMANDS, MAX_NUMBER, UID_COMMANDS, ArgumentError, CommandSpec,
                      decode_base64, read_arguments, tag_and_command)

# SPEC §9: 64 KiB before login (the service raises max_literal_bytes to max_size after
# login); 64 KiB is also Dovecot's imap_max_line_length.
DEFAULT_MAX_LINE_BYTES = 64 * 1024
DEFAULT_MAX_LITERAL_BYTES = 64 * 1024
# Enough of an over-long line's end to see whether it announced a literal: "{n}" / "{n+}".
_TAIL_BYTES = 16


# --- events ------------------------------------------------------------------------------

class Status(enum.Enum):
    NEED_DATA = "need data"   # give the parser more octets
    PAUSED = "paused"         # call expect_line(), discard_buffered() or resume()


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A complete command. `name` is upper-case; for `UID FETCH ...` it is "FETCH" with
    uid=True. `args` is the command's argument object (None for commands without)."""
    tag: str
    name: str
    args: object = None
    uid: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class SendContinuation:
    """The command so far ends in an acceptable synchronising literal of `size` octets:
    write response.CONTINUE_LITERAL now, or refuse the command and call refuse_literal()."""
    tag: str
    command: str
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class ParseError:
    """Answer `tag BAD reason` (`* BAD reason` when tag is None: response.bad()).
    fatal: the input cannot be resynchronised (non-synchronising literal over the limit);
    send the BAD, then close the connection."""
    tag: str | None
    reason: str
    fatal: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """A raw line asked for with expect_line(), without its CRLF. too_long: the line was
    over max_line_bytes and was dropped (data is empty)."""
    data: bytes
    too_long: bool = False


Event = Union[Command, SendContinuation, ParseError, Line]


# --- helpers for the caller ------------------------------------------------------------------

SASL_CANCEL = object()   # decode_sasl_line(): the client sent "*" (RFC 3501 §6.2.2)


def decode_sasl_line(line: bytes) -> bytes | object | None:
    """An AUTHENTICATE response line read with expect_line(): the decoded octets,
    SASL_CANCEL for "*", or None when it is not base64 (answer BAD)."""
    if line == b"*":
        return SASL_CANCEL
    return decode_base64(line)


def is_idle_done(line: bytes) -> bool:
    """RFC 2177 §3: IDLE ends with the line "DONE" (any case, as atoms are)."""
    return line.upper() == b"DONE"


# --- one complete command --------------------------------------------------------------------

def parse_command(data: bytes) -> Command | ParseError:
    """Parse one complete command as on the wire, without its final line end (literals
    inline after their "{n}" line). The framer calls this; tests may too."""
    tag, name, uid, spec, error = tag_and_command(data)
    if error is not None:
        return ParseError(tag, error)
    try:
        args = read_arguments(data, spec, uid)
    except ArgumentError as e:
        return ParseError(tag, f"{T.BAD_ARGUMENTS}: {e}")
    return Command(tag, name, args, uid)


# --- the framer ----------------------------------------------------------------------------------

class _Mode(enum.Enum):
    LINE = "line"           # reading command text
    LITERAL = "literal"     # reading literal octets
    RAW_LINE = "raw line"   # expect_line() was called
    PAUSED = "paused"
    DEAD = "dead"           # after a fatal error: input is ignored


def _literal_marker(body: bytes) -> tuple[int, bool] | None:
    """(size, non-synchronising) when a line (without its line end) ends in {n} or {n+}.
    A size too large for any limit comes back as MAX_NUMBER + 1."""
    if not body.endswith(b"}"):
        return None
    head = body[:-1]
    nonsync = head.endswith(b"+")
    if nonsync:
        head = head[:-1]
    stripped = head.rstrip(b"0123456789")
    digits = head[len(stripped):]
    if not digits or not stripped.endswith(b"{"):
        return None
    size = int(digits) if len(digits) <= 10 else MAX_NUMBER + 1
    return size, nonsync


def _line_body(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def _line_fault(body: bytes) -> str | None:
    if b"\0" in body:
        return T.NUL_IN_COMMAND
    if b"\r" in body:
        return T.BARE_CR
    if not body.isascii():
        return T.EIGHT_BIT_OUTSIDE_LITERAL
    return None


class CommandParser:
    """One connection's command parser. Not thread-safe."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 max_literal_bytes: int = DEFAULT_MAX_LITERAL_BYTES):
        self.max_line_bytes = max_line_bytes
        self.max_literal_bytes = max_literal_bytes
        self._buf = bytearray()
        self._pos = 0               # first unread octet of _buf
        self._scan = 0              # where the search for the line end resumes
        self._mode = _Mode.LINE
        self._discarding = False    # inside a line over the limit
        self._tail = b""            # the last octets of that line
        self._start_command()

    # --- public interface -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._mode is _Mode.DEAD:
            return
        if self._pos:
            del self._buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | Status:
        while True:
            mode = self._mode
            if mode is _Mode.PAUSED:
                return Status.PAUSED
            if mode is _Mode.DEAD:
                return Status.NEED_DATA
            if mode is _Mode.LITERAL:
                if not self._read_literal():
                    return Status.NEED_DATA
                continue
            limit = self.max_line_bytes - (self._text_bytes if mode is _Mode.LINE else 0)
            line = self._take_line(limit, command=mode is _Mode.LINE)
            if line is None:
                return Status.NEED_DATA
            event = self._raw_line(line) if mode is _Mode.RAW_LINE else self._command_line(line)
            if event is not None:
                return event

    def feed(self, data: bytes) -> list[Event]:
        """receive_data() and every event up to NEED_DATA or PAUSED. Synchronising
        literals are accepted: write response.CONTINUE_LITERAL for each SendContinuation."""
        self.receive_data(data)
        events = []
        while True:
            event = self.next_event()
            if isinstance(event, Status):
                return events
            events.append(event)

    @property
    def paused(self) -> bool:
        return self._mode is _Mode.PAUSED

    @property
    def held_bytes(self) -> int:
        """Octets the parser holds: unread input plus the command so far. Never more than
        max_line_bytes + max_literal_bytes plus what the last receive_data() brought."""
        return (len(self._buf) - self._pos + sum(map(len, self._pieces))
                + (len(self._literal) if self._literal is not None else 0))

    @property
    def buffered_bytes(self) -> int:
        """Octets received and not yet parsed (e.g. sent after STARTTLS)."""
        return len(self._buf) - self._pos

    def expect_line(self) -> None:
        """The next event is a Line: the raw next line (a SASL response, IDLE's DONE)."""
        if self._mode not in (_Mode.PAUSED, _Mode.LINE) or self._pieces:
            raise RuntimeError("expect_line() in the middle of a command")
        self._mode = _Mode.RAW_LINE

    def resume(self) -> None:
        if self._mode is _Mode.PAUSED:
            self._mode = _Mode.LINE

    def discard_buffered(self) -> int:
        """Drop the octets not parsed yet; returns how many (STARTTLS, SPEC §8)."""
        dropped = len(self._buf) - self._pos
        self._buf.clear()
        self._pos = self._scan = 0
        self._discarding = False
        return dropped

    def refuse_literal(self) -> None:
        """After SendContinuation, instead of writing the continuation: the caller has
        answered the command (NO/BAD) and the client will not send the literal."""
        if self._mode is not _Mode.LITERAL or not self._awaiting_continuation:
            raise RuntimeError("refuse_literal() without a pending SendContinuation")
        self._mode = _Mode.LINE
        self._start_command()

    # --- lines -------------------------------------------------------------------------------

    def _take_line(self, limit: int, command: bool) -> "bytes | _TooLong | None":
        """The next line with its line end; None when it is not complete yet; _TooLong
        (holding the line's last octets) when it is over `limit`. Octets past the limit
        are dropped as they arrive."""
        buf = self._buf
        end = buf.find(b"\n", max(self._scan, self._pos))
        if end < 0:
            if len(buf) - self._pos > limit or self._discarding:
                if command and not self._discarding:
                    self._note_tag(bytes(buf[self._pos:self._pos + limit]))
                self._tail = (self._tail + bytes(buf[max(self._pos, len(buf) - _TAIL_BYTES):])
                              )[-_TAIL_BYTES:]
                self._discarding = True
                del buf[self._pos:]
            self._scan = len(buf)
            return None
        line = bytes(buf[self._pos:end + 1])
        self._pos = self._scan = end + 1
        if self._discarding or len(line) > limit:
            if command and not self._discarding:
                self._note_tag(line[:limit])
            tail = (self._tail + line)[-_TAIL_BYTES:]
            self._discarding = False
            self._tail = b""
            return _TooLong(tail)
        return line

    def _note_tag(self, start: bytes) -> None:
        """Keep the tag of a first line that is too long, for its BAD."""
        if not self._pieces:
            tag = tag_and_command(start)[0]
            # Only a tag followed by its space: a line of 64 KiB without one has none.
            if tag is not None and start[len(tag):len(tag) + 1] == b" ":
                self._tag = tag

    def _raw_line(self, line: bytes) -> Line:
        self._mode = _Mode.PAUSED
        if isinstance(line, _TooLong):
            return Line(b"", too_long=True)
        return Line(_line_body(line))

    def _command_line(self, line: bytes) -> Event | None:
        if isinstance(line, _TooLong):
            return self._too_long(_line_body(line.tail))
        first = not self._pieces
        body = _line_body(line)
        self._text_bytes += len(line)
        if first and not body:
            return self._finish(ParseError(None, T.EMPTY_LINE))
        fault = _line_fault(body)
        if first:
            self._tag, self._name, self._uid, self._spec, error = tag_and_command(body)
            fault = fault or error
        self._failure = self._failure or fault
        marker = _literal_marker(body)
        if marker is None:
            return self._complete(body)
        self._pieces.append(line)
        return self._literal_announced(*marker)

    def _too_long(self, tail: bytes) -> Event:
        if tail.endswith(b"+}"):        # maybe {n+}: its octets are coming, cannot resync
            return self._die(ParseError(self._tag, T.LINE_TOO_LONG, fatal=True))
        # {n}: the client waits for "+"; it gets this BAD instead and drops the command.
        return self._finish(ParseError(self._tag, T.LINE_TOO_LONG))

    def _complete(self, body: bytes) -> Event:
        if self._failure:
            return self._finish(ParseError(self._tag, self._failure))
        self._pieces.append(body)
        event = parse_command(b"".join(self._pieces))
        self._finish(None)
        if isinstance(event, Command) and self._spec_pauses(event):
            self._mode = _Mode.PAUSED
        return event

    def _spec_pauses(self, command: Command) -> bool:
        table = UID_COMMANDS if command.uid else COMMANDS
        return table[command.name].pause_after

    def _literal_announced(self, size: int, nonsync: bool) -> Event | None:
        refusal = self._failure
        if refusal is None and not self._spec.takes_strings:
            refusal = T.LITERAL_NOT_ALLOWED
        if size > self.max_literal_bytes - self._literal_bytes:
            if nonsync:
                return self._die(ParseError(self._tag, T.LITERAL_TOO_BIG, fatal=True))
            return self._finish(ParseError(self._tag, T.LITERAL_TOO_BIG))
        if refusal is not None and not nonsync:
            return self._finish(ParseError(self._tag, refusal))
        # Read the octets: kept for the command, or only skipped when it has failed
        # (a non-synchronising literal of a refused command is on its way anyway).
        self._failure = refusal
        self._literal_bytes += size
        self._literal_left = size
        self._literal = bytearray() if refusal is None else None
        self._mode = _Mode.LITERAL
        self._awaiting_continuation = not nonsync
        if nonsync:
            return None
        return SendContinuation(self._tag, self._name, size)

    def _read_literal(self) -> bool:
        """Take literal octets; False when more are needed."""
        self._awaiting_continuation = False
        if self._literal_left:
            available = len(self._buf) - self._pos
            if not available:
                return False
            take = min(available, self._literal_left)
            chunk = self._buf[self._pos:self._pos + take]
            self._pos += take
            self._scan = self._pos
            self._literal_left -= take
            if self._literal is not None:
                if b"\0" in chunk:          # CVE-2019-11500 class: refuse, keep reading
                    self._failure = T.NUL_IN_COMMAND
                    self._literal = None
                else:
                    self._literal += chunk
            if self._literal_left:
                return False
        self._pieces.append(bytes(self._literal) if self._literal is not None else b"")
        self._literal = None
        self._mode = _Mode.LINE
        return True

    def _finish(self, event: Event | None) -> Event | None:
        self._mode = _Mode.LINE
        self._start_command()
        return event

    def _die(self, event: ParseError) -> ParseError:
        """A fatal error: forget everything and ignore all further input."""
        self.discard_buffered()
        self._start_command()
        self._mode = _Mode.DEAD
        return event

    def _start_command(self) -> None:
        self._pieces: list[bytes] = []
        self._text_bytes = 0
        self._literal_bytes = 0
        self._tag: str | None = None
        self._name: str | None = None
        self._uid = False
        self._spec: CommandSpec | None = None
        self._failure: str | None = None
        self._literal_left = 0
        self._literal: bytearray | None = None
        self._awaiting_continuation = False


@dataclasses.dataclass(frozen=True, slots=True)
class _TooLong:
    tail: bytes
