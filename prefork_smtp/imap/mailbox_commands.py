"""The IMAP commands that work on a mailbox (RFC 3501 §6.3.1-2, §6.3.10, §6.4; RFC 4315
UID EXPUNGE; RFC 2177 IDLE updates): synchronous code over a store.mailbox_views.ImapView.

Owns: SELECT/EXAMINE, STATUS, FETCH, STORE, SEARCH, EXPUNGE, UID EXPUNGE, CLOSE, CHECK,
NOOP and the untagged updates (EXPUNGE, EXISTS, FETCH FLAGS) other sessions' changes
cause; which octets each sends; setting \\Seen on fetches; reading as little of each
message as the items need (the ENVELOPE cache, headers only for header items).
Must not: know tags, states or sockets. Each command is a generator of response octets
(whole responses, except a streamed literal) whose return value is an Outcome; the
protocol builds the tagged line from it. Blocking: a session runs a Job in a thread,
batch by batch, writing each batch before it asks for the next (back-pressure). A batch
also ends after BATCH_SECONDS of work (commands yield b"" between messages to allow
it): the next one waits its turn in the service's few I/O threads behind other
sessions' commands, so that one user's long SEARCH or first FETCH of a large mailbox
holds no other user up for its whole length.
Fails how: store errors become an Outcome (NO for a busy mailbox or an I/O error,
BYE when the mailbox's UIDVALIDITY changed under the session); an error in the middle
of a streamed literal cannot be answered and is fatal (the connection is closed).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from typing import Callable, Generator, Iterable, Iterator, Sequence

from ..store import mailbox_views, mailstore
from ..store.mbox_scan import FP, UID as UID_FIELD
from . import commands as C
from . import response as R
from . import search as S
from .envelope_cache import EnvelopeCache, cache_for
from .fetch import item_name, sorted_flags, with_uid
from .message import MailItem, Message

log = logging.getLogger("ccsmtp.imap")

# One thread hop carries about this much output (a session writes it, waits until the
# client has read it, then asks for more)...
BATCH_BYTES = 256 * 1024
# ...or this much work: then the command waits in the I/O threads' queue for its next
# turn (a few ms of others' commands; longer slices starve them, shorter ones cost a
# thread hop each for little).
BATCH_SECONDS = 0.02
# SEARCH and FETCH may pause (yield b"") every this many messages.
PAUSE_EVERY = 16
# A whole-message FETCH item (BODY[], RFC822) of a message above this size is streamed
# from the mailbox as the client reads it, never held whole.
STREAM_BYTES = 1024 * 1024
# New cache entries are written out every this many messages of a long FETCH.
CACHE_FLUSH = 500

PERMANENT_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")

# Items served from the mail store's index, without the message.
_INDEX_ITEMS = frozenset({"UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE"})
# Items the cache holds (field number in an envelope_cache entry, after the fp).
_CACHED_ITEMS = {"ENVELOPE": 1, "BODY": 2, "BODYSTRUCTURE": 3}
_HEADER_SECTIONS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How a mailbox command ended. status OK/NO/BAD with code and text for the tagged
    line; selected: the mailbox a SELECT/EXAMINE opened; unselect: leave the SELECTED
    state (CLOSE, a failed SELECT); bye: send `* BYE bye` and close (the mailbox was
    lost); fatal: the output stopped mid-response: close without a word; error: for
    the log."""
    status: str
    text: str
    code: str | None = None
    selected: "SelectedMailbox | None" = None
    unselect: bool = False
    bye: str | None = None
    fatal: bool = False
    error: BaseException | None = None


# The protocol says "<command> completed" for an OK with this (empty) text.
OK_DONE = ""

Command = Generator[bytes, None, Outcome]


# --- the selected mailbox ------------------------------------------------------------

class SelectedMailbox:
    """A session's open mailbox: its view (sequence numbers, flags it has reported),
    whether it is read-only (EXAMINE), and the mailbox's envelope cache."""

    def __init__(self, spool_dir: str, name: str, read_only: bool):
        self.name = name
        self.read_only = read_only
        self.view = mailbox_views.ImapView(spool_dir, name)
        self.cache: EnvelopeCache = cache_for(spool_dir, name)


def open_mailbox(spool_dir: str, name: str, read_only: bool) -> SelectedMailbox:
    return SelectedMailbox(spool_dir, name, read_only)


# --- running a command batch by batch ------------------------------------------------

class Job:
    """One command's generator, run a batch at a time (from a thread)."""

    def __init__(self, command: Command):
        self._command = command
        self.outcome: Outcome | None = None

    def next_batch(self, limit: int = BATCH_BYTES, seconds: float = BATCH_SECONDS) -> bytes:
        """The next octets to send, up to about `limit` of them or `seconds` of work
        (b"" with no outcome: more is to come; b"" with `outcome` set: finished)."""
        out: list[bytes] = []
        size = 0
        deadline = time.monotonic() + seconds
        while self.outcome is None and size < limit and time.monotonic() < deadline:
            try:
                chunk = next(self._command)
            except StopIteration as stop:
                self.outcome = stop.value
                break
            except Exception as e:          # at a response boundary: answer it
                self.outcome = failure(e)
                break
            out.append(chunk)
            size += len(chunk)
        return b"".join(out)

    def close(self) -> None:
        self._command.close()


def run(command: "Command | Job") -> tuple[bytes, Outcome]:
    """All of a command's output and its outcome (for tests)."""
    job = command if isinstance(command, Job) else Job(command)
    out = []
    while job.outcome is None:
        out.append(job.next_batch())
    return b"".join(out), job.outcome


def failure(error: BaseException) -> Outcome:
    """The Outcome for a store error."""
    if isinstance(error, mailstore.MailboxChanged):
        return Outcome(R.NO, "Mailbox changed", bye="[UNAVAILABLE] Mailbox was replaced; "
                       "UIDVALIDITY changed", error=error)
    if isinstance(error, mailstore.MailboxBusy):
        return Outcome(R.NO, "Mailbox is busy, try again shortly", code="INUSE")
    if isinstance(error, (mailstore.MailboxError, OSError)):
        return Outcome(R.NO, "Mailbox unavailable now", code="UNAVAILABLE", error=error)
    return Outcome(R.NO, "Internal error", code="SERVERBUG", error=error)


# --- updates (RFC 3501 §7.3.1, §7.4.1, §5.2) -----------------------------------------

def updates(box: SelectedMailbox, allow_expunge: bool) -> Iterator[bytes]:
    """What changed since the session last looked: EXPUNGE (only when allowed: never
    during FETCH, STORE, SEARCH), EXISTS, FETCH FLAGS. Raises MailboxChanged when the
    UIDVALIDITY changed (the caller says BYE)."""
    changes = box.view.refresh(allow_expunge=allow_expunge)
    if changes.lost:
        raise mailstore.MailboxChanged("UIDVALIDITY changed")
    out = [b"* %d EXPUNGE\r\n" % seq for seq in changes.expunged]
    if changes.new_uids:
        out.append(b"* %d EXISTS\r\n" % changes.exists)
    for seq, uid, flags in changes.flags:
        out.append(b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, uid, _flags(flags)))
    if out:
        yield b"".join(out)


def poll(box: SelectedMailbox) -> Command:
    """NOOP, CHECK and IDLE: report what changed."""
    yield from updates(box, allow_expunge=True)
    return Outcome(R.OK, OK_DONE)


# --- SELECT, EXAMINE, STATUS, CLOSE -----------------------------------------------------

def select(spool_dir: str, name: str, read_only: bool) -> Command:
    """RFC 3501 §6.3.1/2. No message is ever \\Recent here (see the README)."""
    box = open_mailbox(spool_dir, name, read_only)
    view = box.view
    keywords = view.mailbox.keywords
    flags = PERMANENT_FLAGS + tuple(keywords)
    out = [b"* FLAGS " + R.flag_list(flags) + b"\r\n"]
    permanent = () if read_only else flags + ("\\*",)
    out.append(R.untagged(R.OK, "Flags permitted.",
                          code="PERMANENTFLAGS " + R.flag_list(permanent).decode("ascii")))
    out.append(b"* %d EXISTS\r\n* 0 RECENT\r\n" % view.exists)
    unseen = _first_unseen(view)
    if unseen:
        out.append(R.untagged(R.OK, f"First unseen.", code=f"UNSEEN {unseen}"))
    out.append(R.untagged(R.OK, "UIDs valid", code=f"UIDVALIDITY {view.uidvalidity}"))
    out.append(R.untagged(R.OK, "Predicted next UID", code=f"UIDNEXT {view.uidnext}"))
    yield b"".join(out)
    return Outcome(R.OK, OK_DONE,
                   code="READ-ONLY" if read_only else "READ-WRITE", selected=box)


def _first_unseen(view: mailbox_views.ImapView) -> int:
    for seq in range(1, view.exists + 1):
        if "\\Seen" not in view.flags(seq):
            return seq
    return 0


def status(spool_dir: str, name: str, items: Sequence[str]) -> Command:
    """RFC 3501 §6.3.10, for the user's INBOX."""
    view = mailbox_views.ImapView(spool_dir, name)
    values = {
        "MESSAGES": lambda: view.exists,
        "RECENT": lambda: 0,
        "UIDNEXT": lambda: view.uidnext,
        "UIDVALIDITY": lambda: view.uidvalidity,
        "UNSEEN": lambda: sum(1 for seq in range(1, view.exists + 1)
                              if "\\Seen" not in view.flags(seq)),
    }
    pairs = " ".join(f"{item} {values[item]()}" for item in items)
    yield f"* STATUS INBOX ({pairs})\r\n".encode("ascii")
    return Outcome(R.OK, OK_DONE)


def close(box: SelectedMailbox) -> Command:
    """RFC 3501 §6.4.2: expunge \\Deleted messages silently (read-write only), unselect.
    "All messages that have the \\Deleted flag set": also those another session
    flagged since this one last looked, so the view catches up first (what changed
    is not reported: CLOSE sends no untagged responses)."""
    if not box.read_only:
        if box.view.refresh(allow_expunge=False).lost:
            raise mailstore.MailboxChanged("UIDVALIDITY changed")
        deleted = [info.uid for info in box.view.messages() if "\\Deleted" in info.flags]
        if deleted:
            box.view.expunge(deleted)
    return Outcome(R.OK, OK_DONE, unselect=True)
    yield b""   # a generator, like the other commands  # pragma: no cover


# --- EXPUNGE and UID EXPUNGE -----------------------------------------------------------

def expunge(box: SelectedMailbox, uid_set: C.SequenceSet | None = None) -> Command:
    """RFC 3501 §6.4.3; with uid_set, RFC 4315 §2.1 (only those of the \\Deleted
    messages whose UIDs are in the set)."""
    if box.read_only:
        return Outcome(R.NO, "Mailbox is read-only", code="READ-ONLY")
    yield from updates(box, allow_expunge=True)
    view = box.view
    candidates = view.uids.tolist()
    if uid_set is not None:
        candidates = uid_set.select(candidates, candidates[-1] if candidates else 0)
    wanted = set(candidates)
    deleted = [info.uid for info in view.messages()
               if info.uid in wanted and "\\Deleted" in info.flags]
    if deleted:
        view.expunge(deleted)
    yield from updates(box, allow_expunge=True)
    return Outcome(R.OK, OK_DONE)


# --- STORE -------------------------------------------------------------------------------

_STORE_MODES = {C.StoreMode.REPLACE: "replace", C.StoreMode.ADD: "add",
                C.StoreMode.REMOVE: "remove"}


def store(box: SelectedMailbox, args: C.Store, uid: bool) -> Command:
    """RFC 3501 §6.4.6. \\Recent cannot be stored and is ignored."""
    if box.read_only:
        return Outcome(R.NO, "Mailbox is read-only", code="READ-ONLY")
    yield from updates(box, allow_expunge=False)
    view = box.view
    chosen = _resolve(view, args.sequence_set, uid)
    if chosen is None:
        return Outcome(R.BAD, "Invalid message sequence number")
    flags = [f for f in args.flags if f.lower() != "\\recent"]
    try:
        result = view.store_flags([u for _, u in chosen], flags, _STORE_MODES[args.mode])
    except ValueError:
        return Outcome(R.BAD, "Invalid flag")
    except mailstore.MailboxError as e:
        if isinstance(e, (mailstore.MailboxBusy, mailstore.MailboxChanged)):
            raise
        return Outcome(R.NO, "Too many keywords in this mailbox", code="LIMIT")
    out = []
    missing = False
    for seq, u in chosen:
        new = result.get(u)
        if new is None:
            missing = True
        elif not args.silent:
            uid_part = b"UID %d " % u if uid else b""
            out.append(b"* %d FETCH (%sFLAGS %s)\r\n" % (seq, uid_part, _flags(new)))
    if out:
        yield b"".join(out)
    if missing:
        return Outcome(R.NO, "Some of the messages no longer exist", code="EXPUNGEISSUED")
    return Outcome(R.OK, OK_DONE)


# --- SEARCH -----------------------------------------------------------------------------

def search(box: SelectedMailbox, args: C.Search, uid: bool) -> Command:
    """RFC 3501 §6.4.4 (search.py evaluates); content is read only for the keys that
    need it, headers only when no key needs the body."""
    yield from updates(box, allow_expunge=False)
    view = box.view
    try:
        S.compile_program(args)
    except S.BadCharset as e:
        return Outcome(R.NO, "Unsupported charset", code=e.code)
    headers_only = S.content_cost(args) <= 1
    items = []
    for seq, info in enumerate(view.messages(), 1):
        if info.size == 0 and info.internaldate == 0:
            continue            # expunged by another session, not reported yet
        items.append(MailItem(seq, info.uid, info.flags, _date(info.internaldate), info.size,
                              _loader(view, info.uid, headers_only)))
    found = []
    for n, (item, matched) in enumerate(S.evaluate(args, items), 1):
        if matched:
            found.append(item)
        if n % PAUSE_EVERY == 0:
            yield b""           # a turn for other sessions' commands (Job.next_batch)
    yield R.search_response(item.uid if uid else item.seq for item in found)
    return Outcome(R.OK, OK_DONE)


def _loader(view: mailbox_views.ImapView, uid: int, headers_only: bool) -> Callable[[], Message]:
    """MailItem.load: the message read and parsed (its header only when the program
    needs no more), afresh at each call. search's context keeps the message being
    evaluated; an item that kept its own would keep the whole mailbox in memory, parsed,
    until the SEARCH ends (a 24 MB mailbox: +33 MB per SEARCH TEXT in progress)."""
    if headers_only:
        return lambda: Message.from_header(view.mailbox.top(uid, 0, uidvalidity=view.uidvalidity))
    return lambda: Message(view.content(uid))


# --- FETCH ------------------------------------------------------------------------------

def fetch(box: SelectedMailbox, args: C.Fetch, uid: bool) -> Command:
    """RFC 3501 §6.4.5, §6.4.8. BODY[...] (not .PEEK), RFC822 and RFC822.TEXT set
    \\Seen first in a read-write mailbox, and those messages then also show FLAGS."""
    yield from updates(box, allow_expunge=False)
    view = box.view
    chosen = _resolve(view, args.sequence_set, uid)
    if chosen is None:
        return Outcome(R.BAD, "Invalid message sequence number")
    atts = with_uid(args.attributes) if uid else tuple(args.attributes)
    plan = _Plan(atts, box.read_only)
    if plan.sets_seen:
        _set_seen(view, chosen)
    infos = _infos(view, chosen)
    fetcher = _Fetcher(box, plan)
    gone = False
    out: list[bytes] = []
    size = 0
    for seq, u in chosen:
        info = infos.get(u)
        if info is None:
            gone = True
            continue
        try:
            response = fetcher.render(seq, info)
        except mailstore.MessageGone:
            gone = True
            continue
        if isinstance(response, _Stream):
            if out:
                yield b"".join(out)
                out, size = [], 0
            try:
                yield from response.pieces()
            except Exception as e:          # mid-literal: nothing more can be said
                fetcher.flush()
                return Outcome(R.NO, "Message unreadable", fatal=True, error=e)
            continue
        out.append(response)
        size += len(response)
        if size >= BATCH_BYTES:
            yield b"".join(out)
            out, size = [], 0
        elif len(out) % PAUSE_EVERY == 0:
            yield b""           # a turn for other sessions' commands (Job.next_batch)
    fetcher.flush()
    if out:
        yield b"".join(out)
    if gone:
        # RFC 2180 §4.1.3: answer what exists, and NO for the rest.
        return Outcome(R.NO, "Some of the messages no longer exist", code="EXPUNGEISSUED")
    return Outcome(R.OK, OK_DONE)


def _set_seen(view: mailbox_views.ImapView, chosen: list[tuple[int, int]]) -> None:
    unseen = [u for seq, u in chosen if "\\Seen" not in view.flags(seq)]
    if unseen:
        view.store_flags(unseen, ["\\Seen"], "add")


def _infos(view: mailbox_views.ImapView, chosen: list[tuple[int, int]]
           ) -> dict[int, mailstore.MessageInfo]:
    """MessageInfo of the chosen messages that still exist."""
    if len(chosen) * 8 < view.exists:
        # A few messages of a large mailbox (a client reading one message): look them
        # up by UID rather than listing the whole mailbox.
        out = {}
        for _, u in chosen:
            try:
                out[u] = view.mailbox.info(u)
            except mailstore.MessageGone:
                pass
        return out
    wanted = {u for _, u in chosen}
    return {info.uid: info for info in view.messages()
            if info.uid in wanted and not (info.size == 0 and info.internaldate == 0)}


class _Plan:
    """What a FETCH's items need: computed once per command, not per message."""

    def __init__(self, atts: Sequence[C.FetchAtt], read_only: bool):
        self.atts = tuple(atts)
        self.names = [item_name(a) for a in atts]
        self.sets_seen = not read_only and any(a.sets_seen for a in atts)
        if self.sets_seen and not any(a.name == "FLAGS" and a.section is None for a in atts):
            self.atts += (C.FetchAtt("FLAGS"),)
            self.names.append(b"FLAGS")
        content = [a for a in self.atts
                   if a.section is not None or a.name not in _INDEX_ITEMS]
        self.cached = [a.name for a in content if a.section is None and a.name in _CACHED_ITEMS]
        # Items that need the message itself (beyond what the cache may hold).
        self.direct = [a for a in content if not (a.section is None and a.name in _CACHED_ITEMS)]
        self.headers_only = all(_header_only(a) for a in self.direct) and \
            all(n == "ENVELOPE" for n in self.cached)
        whole = [a for a in self.direct if _whole_message(a)]
        self.streamable = len(whole) == 1 and len(self.direct) == 1 and not self.cached


def _header_only(att: C.FetchAtt) -> bool:
    if att.section is None:
        return att.name == "RFC822.HEADER"
    return not att.section.part and att.section.text in _HEADER_SECTIONS


def _whole_message(att: C.FetchAtt) -> bool:
    if att.section is None:
        return att.name == "RFC822"
    return not att.section.part and att.section.text is None and att.partial is None


@dataclasses.dataclass(slots=True)
class _Stream:
    """A FETCH response whose one literal is a whole large message, read as sent."""
    head: bytes
    size: int
    content: Iterator[bytes]

    def pieces(self) -> Iterator[bytes]:
        yield self.head + b"{%d}\r\n" % self.size
        sent = 0
        for piece in self.content:
            sent += len(piece)
            yield piece.replace(b"\0", b"\x80")   # as response.literal() does
        if sent != self.size:
            raise mailstore.MailboxChanged("message size changed while it was sent")
        yield b")\r\n"


class _Fetcher:
    """Renders FETCH responses for one command, with the cache's help."""

    def __init__(self, box: SelectedMailbox, plan: _Plan):
        self.box = box
        self.view = box.view
        self.plan = plan
        self._flag_text: dict[frozenset[str], bytes] = {}
        self._new: list[tuple] = []
        self._fps: dict[int, int] | None = None
        if plan.cached:
            box.cache.sync()
            mailbox = self.view.mailbox
            with mailbox._lock:
                self._fps = dict(zip(mailbox.column(UID_FIELD), mailbox.column(FP)))

    def render(self, seq: int, info: mailstore.MessageInfo) -> "bytes | _Stream":
        plan = self.plan
        if plan.streamable and info.size > STREAM_BYTES:
            return self._stream(seq, info)
        cached = self._cached(info.uid)
        known = list(cached) if cached is not None else None
        message: list[Message] = []

        def msg() -> Message:
            if not message:
                data = self._read(info.uid, plan.headers_only)
                message.append(Message.from_header(data) if plan.headers_only else Message(data))
            return message[0]

        items = [name + b" " + self._value(att, info, cached, msg)
                 for att, name in zip(plan.atts, plan.names)]
        if cached is not None and cached != known:
            self._remember(info.uid, cached, msg)
        return b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n"

    def _value(self, att: C.FetchAtt, info: mailstore.MessageInfo, cached: list | None,
               msg: Callable[[], Message]) -> bytes:
        if att.section is not None:
            s = att.section
            return R.literal(msg().section(s.part, s.text, s.fields, att.partial))
        name = att.name
        if name == "UID":
            return b"%d" % info.uid
        if name == "FLAGS":
            return self._flags(info.flags)
        if name == "RFC822.SIZE":
            return b"%d" % info.size
        if name == "INTERNALDATE":
            return R.internaldate(_date(info.internaldate))
        field = _CACHED_ITEMS.get(name)
        if field is not None:
            value = cached[field - 1]
            if value is None:
                value = cached[field - 1] = _computed(name, msg())
            return value
        if name == "RFC822":
            return R.literal(msg().data)
        if name == "RFC822.HEADER":
            return R.literal(msg().section((), "HEADER"))
        return R.literal(msg().section((), "TEXT"))     # RFC822.TEXT

    def _cached(self, uid: int) -> list | None:
        """The cache's [envelope, body, bodystructure] for this message (None items:
        not known yet); None when the FETCH asks for none of them."""
        if self._fps is None:
            return None
        fp = self._fps.get(uid)
        entry = self.box.cache.get(uid, fp) if fp is not None else None
        return list(entry[1:]) if entry is not None else [None, None, None]

    def _remember(self, uid: int, cached: list, msg: Callable[[], Message]) -> None:
        fp = self._fps.get(uid) if self._fps else None
        if fp is None:
            return
        if not self.plan.headers_only:
            # The whole message is here: the cache gets all three strings at once.
            message = msg()
            for name, field in _CACHED_ITEMS.items():
                if cached[field - 1] is None:
                    cached[field - 1] = _computed(name, message)
        self._new.append((uid, fp, *cached))
        if len(self._new) >= CACHE_FLUSH:
            self.flush()

    def flush(self) -> None:
        if self._new:
            self.box.cache.add(self._new, live_uids=self._fps.keys() if self._fps else None)
            self._new = []

    def _flags(self, flags: frozenset[str]) -> bytes:
        text = self._flag_text.get(flags)
        if text is None:
            text = self._flag_text[flags] = _flags(flags)
        return text

    def _read(self, uid: int, headers_only: bool) -> bytes:
        view = self.view
        if headers_only:
            return view.mailbox.top(uid, 0, uidvalidity=view.uidvalidity)
        return view.content(uid)

    def _stream(self, seq: int, info: mailstore.MessageInfo) -> _Stream:
        plan = self.plan
        # The whole-message item goes last, so that its literal ends the response.
        parts = [name + b" " + self._value(att, info, None, _no_message) + b" "
                 for att, name in zip(plan.atts, plan.names) if not _whole_message(att)]
        whole = next(n for n, a in zip(plan.names, plan.atts) if _whole_message(a))
        head = b"* %d FETCH (" % seq + b"".join(parts) + whole + b" "
        return _Stream(head, info.size, self.view.iter_content(info.uid))


def _no_message() -> Message:
    raise AssertionError("a streamed FETCH needs no other item of the message")


def _computed(name: str, message: Message) -> bytes:
    if name == "ENVELOPE":
        return R.envelope(message.envelope())
    return R.body(message.body_structure(), extensible=name == "BODYSTRUCTURE")


# --- helpers ----------------------------------------------------------------------------

def _resolve(view: mailbox_views.ImapView, seqs: C.SequenceSet, uid: bool
             ) -> list[tuple[int, int]] | None:
    """(seq, uid) of the messages a set names, ascending; None for a sequence set that
    names a message that does not exist (RFC 3501 §9: BAD). A UID set may name UIDs
    that do not exist: they are left out (§6.4.8)."""
    uids = view.uids
    if uid:
        largest = uids[-1] if len(uids) else 0
        chosen = seqs.select(uids, largest)
        return [(view.seq(u), u) for u in chosen]
    n = len(uids)
    if n == 0 or seqs.exceeds(n) or any(lo == 0 or hi == 0 for lo, hi in seqs.ranges):
        return None
    return [(seq, uids[seq - 1]) for seq in seqs.select(range(1, n + 1), n)]


def _flags(flags: Iterable[str]) -> bytes:
    return R.flag_list(sorted_flags(flags))


def _date(timestamp: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


# --- what the protocol asks for ---------------------------------------------------------

def job_for(work, spool_dir: str) -> Job:
    """The Job for a protocol.MailboxWork (nothing runs until next_batch())."""
    return Job(_COMMANDS[work.command](work, spool_dir))


_COMMANDS: dict[str, Callable[..., Command]] = {
    "SELECT": lambda w, spool: select(spool, w.user, read_only=False),
    "EXAMINE": lambda w, spool: select(spool, w.user, read_only=True),
    "STATUS": lambda w, spool: status(spool, w.user, w.args),
    "FETCH": lambda w, spool: fetch(w.mailbox, w.args, w.uid),
    "STORE": lambda w, spool: store(w.mailbox, w.args, w.uid),
    "SEARCH": lambda w, spool: search(w.mailbox, w.args, w.uid),
    "EXPUNGE": lambda w, spool: expunge(w.mailbox, w.args.sequence_set if w.uid else None),
    "CLOSE": lambda w, spool: close(w.mailbox),
    "POLL": lambda w, spool: poll(w.mailbox),
}
