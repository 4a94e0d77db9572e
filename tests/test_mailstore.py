"""The mailbox access layer (store/mailstore.py, mbox_scan.py, mailbox_index.py): the
visible form of messages, UIDs and UIDVALIDITY that last, flags across processes,
POP3 and IMAP views, and expunges that never lose or damage another message.
Real files in a temporary spool; other processes are forked where it matters."""

from __future__ import annotations

import contextlib
import fcntl
import mailbox
import multiprocessing
import os
import re
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_smtp.layout import DELIVERY_JOURNAL, state_path
from prefork_smtp.store import mailbox_index, mailbox_views, mailstore, mbox, mbox_scan, queue
from prefork_smtp.store.envelope import Envelope, Recipient

ENVELOPE = Envelope("sender@example.net", (Recipient("alice@example.org", "alice"),),
                    "client.example.net", "ESMTP", "192.0.2.7", "7BIT")
STATE = {b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imap", b"x-imapbase",
         b"content-length"}


@pytest.fixture
def spool(tmp_path):
    path = str(tmp_path / "spool")
    os.mkdir(path)
    queue.make_dirs(path)
    return path


def copy_bytes(content: bytes, n: int = 0, when: float = 1.7e9) -> bytes:
    """What delivery appends for content (CRLF lines, as received)."""
    return b"".join(mbox.format_copy(ENVELOPE, [content], queue_id="%010X" % n,
                                     recipient="alice@example.org", received_at=when + n,
                                     hostname="mx.example.org"))


def deliver(spool: str, content: bytes, n: int = 0, name: str = "alice") -> bytes:
    data = copy_bytes(content, n)
    mbox.append(spool, name, [data])
    return data


def subject(n: int) -> bytes:
    return b"Subject: message %d\r\nMessage-ID: <%d@example.net>\r\n\r\nbody of %d\r\n" % (n, n, n)


def raw(spool: str, name: str = "alice") -> bytes:
    with open(os.path.join(spool, name), "rb") as f:
        return f.read()


def fresh(spool: str, name: str = "alice") -> mailstore.Mailbox:
    """A Mailbox as another process would have it (own descriptors and locks)."""
    box = mailstore.Mailbox(spool, name)
    box.refresh(wait=True)
    return box


def uids(box: mailstore.Mailbox) -> list[int]:
    return box.column(mbox_scan.UID).tolist()


def by_subject(box: mailstore.Mailbox) -> dict[bytes, int]:
    out = {}
    for uid in uids(box):
        m = re.search(rb"Subject: ([^\r]*)", box.content(uid))
        out[m.group(1)] = uid
    return out


@contextlib.contextmanager
def mutt_locks(spool: str, name: str = "alice"):
    """The locks mutt takes to rewrite a mailbox: dot-lock and a POSIX fcntl lock."""
    path = os.path.join(spool, name)
    mbox.take_dotlock(path + ".lock")
    try:
        with open(path, "r+b") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            yield f
    finally:
        os.unlink(path + ".lock")


def rewrite_in_place(spool: str, transform, name: str = "alice") -> None:
    """Rewrite the file in place (same inode), under mutt's locks, as mutt does."""
    with mutt_locks(spool, name) as f:
        data = transform(f.read())
        f.seek(0)
        f.write(data)
        f.truncate()


def messages_of(data: bytes) -> list[bytes]:
    starts = [m.start() for m in re.finditer(rb"(?m)^From ", data)]
    return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]


def reference_visible(region: bytes) -> bytes:
    """The visible form of one stored message, line by line (the slow, obvious way)."""
    nl = region.find(b"\n")
    if nl < 0:
        return b""
    content = region[nl + 1:]
    if region.endswith(b"\n\n") and len(region) - 2 >= nl:
        content = content[:-1]
    lines = content.split(b"\n")
    out, in_header, dropping = [], True, False
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if in_header:
            if last or (line == b""):
                in_header = False
            elif dropping and line[:1] in (b" ", b"\t"):
                continue
            else:
                dropping = False
                m = re.match(rb"([^:\s]+)[ \t]*:", line)
                if m and m.group(1).lower() in STATE:
                    dropping = True
                    continue
        if re.match(rb">+From ", line):
            line = line[1:]
        out.append(line if last else line + b"\r\n")
    return b"".join(out)


def scan_all(data: bytes, tmp_path) -> tuple[list[tuple], int, list[bytes]]:
    path = tmp_path / "scan.mbox"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        result = mbox_scan.scan(fd, 0, len(data), mtime=1234)
        recs = [tuple(result.records[i:i + mbox_scan.FIELDS])
                for i in range(0, len(result.records), mbox_scan.FIELDS)]
        visible = [b"".join(mbox_scan.visible_pieces(fd, r[mbox_scan.OFFSET], r[mbox_scan.LENGTH],
                                                     r[mbox_scan.LAYOUT], r[mbox_scan.FP], 7))
                   for r in recs]
        return recs, result.first, visible
    finally:
        os.close(fd)


# --- the visible form -------------------------------------------------------------------

def test_visible_form_is_byte_exact(tmp_path):
    stored = (b"From a@b Thu Jan  1 00:00:00 1970\n"
              b"Return-Path: <a@b>\nStatus: RO\nX-Keywords: $Junk\n  $Other\n\tmore\n"
              b"Subject: hi\ncontent-LENGTH : 99\nX-UID: 7\nX-Status: AF\nLines: 3\n"
              b"X-IMAPbase: 1 2\nX-IMAP-Other: kept\n"
              b"\n>From me\n>>From you\nFrom-not-quoted\nStatus: RO in the body\n\n"
              b"From b Sat Feb 14 10:00:00 2009\nSubject: 2\n\nno final newline")
    recs, first, visible = scan_all(stored, tmp_path)
    assert first == 0
    assert visible == [
        b"Return-Path: <a@b>\r\nSubject: hi\r\nLines: 3\r\nX-IMAP-Other: kept\r\n\r\n"
        b"From me\r\n>From you\r\nFrom-not-quoted\r\nStatus: RO in the body\r\n",
        b"Subject: 2\r\n\r\nno final newline"]
    assert [r[mbox_scan.SIZE] for r in recs] == [len(v) for v in visible]
    assert [r[mbox_scan.LINES] for r in recs] == [9, 3]
    assert [r[mbox_scan.DATE] for r in recs] == [0, 1234605600]
    # Status: R is \Seen, X-Status: A and F are \Answered and \Flagged (as Dovecot writes).
    assert recs[0][mbox_scan.FLAGS] == mbox_scan.SEEN | mbox_scan.ANSWERED | mbox_scan.FLAGGED


def test_visible_form_of_delivered_mail_is_what_was_received(spool):
    content = (b"Subject: crlf\r\n\r\nFrom the start\r\n>From quoted\r\n.dot\r\n"
               b"bare\rcr\r\n\r\n\r\n")
    deliver(spool, content)
    box = fresh(spool)
    [uid] = uids(box)
    visible = box.content(uid)
    assert visible.startswith(b"Return-Path: <sender@example.net>\r\nReceived: from client.example.net")
    assert visible.endswith(b" +0000\r\n" + content)
    info = box.info(uid)
    assert info.size == len(visible) and info.lines == visible.count(b"\r\n")
    assert info.internaldate == int(1.7e9)
    assert b"".join(box.iter_content(uid, 5)) == visible


def test_dovecot_placeholder_is_hidden_and_kept_by_expunge(spool):
    placeholder = (b"From MAILER-DAEMON Sun Dec  3 13:40:15 2006\n"
                   b"Date: 03 Dec 2006 13:40:15 +0100\n"
                   b"From: Mail System Internal Data <MAILER-DAEMON@example>\n"
                   b"Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\n"
                   b"Message-ID: <1165149615@example>\nX-IMAP: 1135694114 0000000927\nStatus: RO\n\n"
                   b"This text is part of the internal format of your mail folder, and is not\n"
                   b"a real message.\n\n")
    with open(os.path.join(spool, "alice"), "wb") as f:
        f.write(placeholder)
    box = fresh(spool)
    assert box.count == 0
    deliver(spool, subject(1), 1)
    deliver(spool, subject(2), 2)
    box.refresh()
    assert box.count == 2
    first = uids(box)[0]
    box.store_flags([first], ["\\Deleted"], "add")
    assert box.expunge([first]) == [first]
    assert raw(spool).startswith(placeholder)
    assert list(by_subject(fresh(spool))) == [b"message 2"]


def test_top_gives_header_blank_line_and_body_lines(spool):
    deliver(spool, b"Subject: t\r\n\r\none\r\n>From two\r\nthree\r\n")
    box = fresh(spool)
    [uid] = uids(box)
    full = box.content(uid)
    header = full[:full.index(b"\r\n\r\n") + 4]
    assert box.top(uid, 0) == header
    assert box.top(uid, 2) == header + b"one\r\n>From two\r\n"
    assert box.top(uid, 100) == full


def test_big_message_is_streamed_in_pieces(spool):
    content = b"Subject: big\r\n\r\n" + b"".join(b"%07d From inside a line\r\n>From x\r\n" % i
                                                  for i in range(60_000))
    deliver(spool, subject(1), 1)
    deliver(spool, content, 2)
    deliver(spool, subject(3), 3)
    assert len(raw(spool)) > 2 * mbox_scan.READ_BYTES
    box = fresh(spool)
    assert len(uids(box)) == 3
    uid = uids(box)[1]
    pieces = list(box.iter_content(uid))
    assert len(pieces) > 10 and max(map(len, pieces)) < 2 * mbox_scan.PIECE_BYTES
    visible = b"".join(pieces)
    assert visible.endswith(b" +0000\r\n" + content)
    assert box.info(uid).size == len(visible)


_LINES = st.sampled_from([
    b"From x", b">From x", b">>From y", b"From", b"Fro", b">", b"", b"", b" folded", b"\tfolded",
    b"Status: RO", b"status:O", b"X-Status: A", b"X-Keywords: $a", b"X-UID: 12", b"X-IMAP: 1 2",
    b"X-IMAPbase: 3 4", b"Content-Length: 10", b"Lines: 2", b"Subject: s", b"X-Other: o",
    b"text\r", b"a\rb", b"From: someone"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(_LINES, max_size=12), min_size=1, max_size=5),
       st.sampled_from([7, 40, 1 << 20]), st.booleans())
def test_visible_form_matches_the_line_by_line_reference(tmp_path, bodies, read_bytes, last_newline):
    """Any content, quoted as mboxrd requires, read back in pieces of any size: the
    visible form is the line-by-line reference's, and its size and lines are exact."""
    stored = b""
    for lines in bodies:
        text = b"".join(line + b"\n" for line in lines)
        stored += b"From s@x Thu Jan  1 00:00:00 1970\n" + mbox._quote(text) + b"\n"
    if not last_newline:
        stored = stored.rstrip(b"\n")
    old = mbox_scan.READ_BYTES
    mbox_scan.READ_BYTES = read_bytes
    try:
        recs, first, visible = scan_all(stored, tmp_path)
    finally:
        mbox_scan.READ_BYTES = old
    expected = [reference_visible(region) for region in messages_of(stored)]
    assert visible == expected
    assert [r[mbox_scan.SIZE] for r in recs] == [len(v) for v in visible]
    assert [r[mbox_scan.LINES] for r in recs] == \
        [v.count(b"\r\n") + (1 if v and not v.endswith(b"\r\n") else 0) for v in visible]
    # The same facts, whatever the read size.
    recs_again, _, _ = scan_all(stored, tmp_path)
    assert recs_again == recs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_round_trip_through_delivery_quoting(contents):
    """Content delivered through format_copy's quoting reads back as it was sent,
    less the state headers of its header block (here: none can be in it)."""
    import tempfile
    with tempfile.TemporaryDirectory() as top:
        data = b""
        sent = []
        for n, content in enumerate(contents):
            body = b"X-Test: %d\n\n" % n + content.replace(b"\r", b"")
            data += copy_bytes(body, n)
            text = body.replace(b"\n", b"\r\n")
            sent.append(text if text.endswith(b"\r\n") else text + b"\r\n")
        path = os.path.join(top, "m")
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            result = mbox_scan.scan(fd, 0, len(data), mtime=0)
            r = result.records
            got = [b"".join(mbox_scan.visible_pieces(fd, r[i + mbox_scan.OFFSET], r[i + mbox_scan.LENGTH],
                                                     r[i + mbox_scan.LAYOUT], r[i + mbox_scan.FP]))
                   for i in range(0, len(r), mbox_scan.FIELDS)]
        finally:
            os.close(fd)
        assert len(got) == len(sent)
        for visible, text in zip(got, sent):
            assert visible.endswith(b" +0000\r\n" + text)


# --- identity ---------------------------------------------------------------------------

def test_uids_and_uidvalidity_last_across_reopen(spool):
    for n in range(5):
        deliver(spool, subject(n), n)
    box = fresh(spool)
    assert uids(box) == [1, 2, 3, 4, 5] and box.uidnext == 6
    again = fresh(spool)
    assert uids(again) == uids(box) and again.uidvalidity == box.uidvalidity
    assert by_subject(again) == by_subject(box)


def test_uidvalidity_changes_only_when_the_index_is_lost_and_never_repeats(spool):
    deliver(spool, subject(1), 1)
    seen = [fresh(spool).uidvalidity]
    assert fresh(spool).uidvalidity == seen[0]
    paths = mailbox_index.Paths(spool, "alice")
    for _ in range(3):
        os.unlink(paths.index)
        seen.append(fresh(spool).uidvalidity)
    with open(paths.index, "r+b") as f:       # a damaged index counts as lost
        f.write(b"garbage")
    seen.append(fresh(spool).uidvalidity)
    assert len(set(seen)) == len(seen) and seen == sorted(seen)


def test_new_messages_get_new_uids_whoever_appends_them(spool):
    deliver(spool, subject(1), 1)
    box = fresh(spool)
    view = mailbox_views.ImapView(spool, "alice")
    # procmail or mutt appending under the same locks, in their own format
    with mutt_locks(spool) as f:
        f.seek(0, os.SEEK_END)
        f.write(b"From someone@example.com Mon Mar  2 10:00:00 2026\nSubject: foreign\n\n"
                b">From body\n\n")
    deliver(spool, subject(3), 3)
    changes = view.refresh()
    assert changes.new_uids == [2, 3] and changes.exists == 3 and not changes.expunged
    box.refresh()
    assert box.content(2).endswith(b"Subject: foreign\r\n\r\nFrom body\r\n")
    assert box.info(2).internaldate == 1772445600


def test_uids_and_flags_survive_a_mutt_rewrite(spool):
    for n in range(6):
        deliver(spool, subject(n), n)
    box = fresh(spool)
    before = by_subject(box)
    box.store_flags([before[b"message 1"]], ["\\Flagged", "$Work"], "add")
    view = mailbox_views.ImapView(spool, "alice")

    def mutt_sync(data: bytes) -> bytes:
        # mutt marks messages read and rewrites them with Status:, Content-Length:
        # and Lines: at the end of the header, and drops a deleted one (message 3).
        out = b""
        for region in messages_of(data):
            if b"message 3" in region:
                continue
            head, sep, body = region.partition(b"\n\n")
            body_len = len(body) - 1
            out += head + b"\nStatus: RO\nContent-Length: %d\nLines: 1" % body_len + sep + body
        return out
    rewrite_in_place(spool, mutt_sync)
    after = fresh(spool)
    assert by_subject(after) == {k: v for k, v in before.items() if k != b"message 3"}
    assert after.info(before[b"message 1"]).flags == {"\\Flagged", "$Work"}
    assert after.uidnext == box.uidnext and after.uidvalidity == box.uidvalidity
    changes = view.refresh()
    assert changes.expunged == [4] and changes.exists == 5 and not changes.new_uids
    assert b"Status" not in after.content(before[b"message 0"])


def test_uids_survive_dovecot_headers(spool):
    for n in range(4):
        deliver(spool, subject(n), n)
    box = fresh(spool)
    before = by_subject(box)
    sizes = [box.info(uid).size for uid in uids(box)]

    def dovecot_sync(data: bytes) -> bytes:
        out = b""
        for k, region in enumerate(messages_of(data)):
            head, sep, body = region.partition(b"\n\n")
            extra = b"\nX-IMAPbase: 1795000000 0000000005" if k == 0 else b""
            out += head + extra + b"\nStatus: O\nX-UID: %d\nX-Keywords:            " % (k + 1) + sep + body
        return out
    rewrite_in_place(spool, dovecot_sync)
    after = fresh(spool)
    assert by_subject(after) == before
    assert [after.info(uid).size for uid in uids(after)] == sizes
    for uid in uids(after):
        assert not re.search(rb"X-UID|X-IMAPbase|X-Keywords|Status", after.content(uid))


def test_a_stale_index_after_a_crash_between_the_renames_is_reconciled(spool, monkeypatch):
    for n in range(6):
        deliver(spool, subject(n), n)
    box = fresh(spool)
    before = by_subject(box)
    box.store_flags([before[b"message 4"]], ["\\Answered"], "add")
    victims = [before[b"message 1"], before[b"message 2"]]
    uidnext = box.uidnext

    def crash(*args, **kwargs):
        raise SystemExit("killed between the renames")
    monkeypatch.setattr(mailbox_index, "commit_new_index", crash)
    with pytest.raises(SystemExit):
        box.expunge(victims, only_deleted=False)
    monkeypatch.undo()
    assert b"message 1" not in raw(spool)            # the new mailbox is in place
    after = fresh(spool)                              # the old index: reconciled
    assert by_subject(after) == {k: v for k, v in before.items() if v not in victims}
    assert after.info(before[b"message 4"]).flags == {"\\Answered"}
    assert after.uidnext == uidnext
    deliver(spool, subject(9), 9)
    after.refresh()
    assert uids(after)[-1] == uidnext                 # never a removed message's UID


def test_a_file_replaced_by_another_program_is_reconciled(spool):
    for n in range(3):
        deliver(spool, subject(n), n)
    box = fresh(spool)
    before = by_subject(box)
    data = raw(spool)
    path = os.path.join(spool, "alice")
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.rename(path + ".new", path)
    box.refresh()
    assert by_subject(box) == before


def test_sessions_never_act_on_uids_of_a_lost_index(spool):
    for n in range(3):
        deliver(spool, subject(n), n)
    view = mailbox_views.ImapView(spool, "alice")
    with mailbox_views.Pop3Maildrop(spool, "alice") as drop:
        os.unlink(mailbox_index.Paths(spool, "alice").index)
        assert view.refresh().lost
        for act in (lambda: drop.commit([1]), lambda: b"".join(drop.iter_content(1)),
                    lambda: view.expunge([1]), lambda: view.store_flags([1], ["\\Seen"], "add"),
                    lambda: view.content(1)):
            with pytest.raises(mailstore.MailboxChanged):
                act()
    assert len(messages_of(raw(spool))) == 3


# --- flags ------------------------------------------------------------------------------

def _store_in_child(spool: str, uid: int, done) -> None:
    box = mailstore.Mailbox(spool, "alice")
    box.refresh(wait=True)
    box.store_flags([uid], ["\\Seen", "$Label1"], "add")
    done.set()


def test_flags_stored_in_one_process_are_seen_by_another(spool):
    for n in range(3):
        deliver(spool, subject(n), n)
    view = mailbox_views.ImapView(spool, "alice")
    ctx = multiprocessing.get_context("fork")
    done = ctx.Event()
    child = ctx.Process(target=_store_in_child, args=(spool, 2, done))
    child.start()
    child.join(10)
    assert child.exitcode == 0 and done.is_set()
    changes = view.refresh()
    assert changes.flags == [(2, 2, frozenset({"\\Seen", "$Label1"}))]
    assert not view.refresh()
    # A session's own changes are not reported back to it.
    view.store_flags([1], ["\\Flagged"], "add")
    assert not view.refresh().flags
    assert view.store_flags([1, 2], ["\\Draft"], "replace") == {1: {"\\Draft"}, 2: {"\\Draft"}}
    assert view.store_flags([2], ["\\draft"], "remove") == {2: frozenset()}
    with pytest.raises(ValueError):
        view.store_flags([1], ["\\Recent"], "add")


def test_keywords_are_limited(spool):
    deliver(spool, subject(1), 1)
    box = fresh(spool)
    box.store_flags([1], [f"k{i}" for i in range(mailstore.MAX_KEYWORDS)], "add")
    with pytest.raises(mailstore.MailboxError):
        box.store_flags([1], ["one-too-many"], "add")
    assert len(fresh(spool).info(1).flags) == mailstore.MAX_KEYWORDS


# --- IMAP views -------------------------------------------------------------------------

def test_imap_view_reports_expunges_new_mail_and_flags_in_order(spool):
    for n in range(6):
        deliver(spool, subject(n), n)
    mine = mailbox_views.ImapView(spool, "alice")
    other = mailbox_views.ImapView(spool, "alice")
    assert mine.uids.tolist() == [1, 2, 3, 4, 5, 6] and mine.uidnext == 7
    other.store_flags([2, 4, 5], ["\\Deleted"], "add")
    assert other.expunge([2, 4, 5, 6]) == [2, 4, 5]      # 6 is not \Deleted
    deliver(spool, subject(7), 7)
    # During a FETCH, expunges wait; new mail does not.
    held = mine.refresh(allow_expunge=False)
    assert held.expunged == [] and held.new_uids == [7] and held.exists == 7
    with pytest.raises(mailstore.MessageGone):
        mine.content(2)
    changes = mine.refresh()
    assert changes.expunged == [5, 4, 2]     # each EXPUNGE in turn: highest first
    assert mine.uids.tolist() == [1, 3, 6, 7] and changes.exists == 4
    assert [m.uid for m in mine.messages()] == [1, 3, 6, 7]
    assert mine.seq(6) == 3 and mine.uid(4) == 7


def test_twenty_views_of_ten_thousand_messages_stay_small(tmp_path):
    """Run in a child so that its RSS is measured alone."""
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    child = ctx.Process(target=_twenty_views, args=(str(tmp_path), result))
    child.start()
    rss_mb, count = result.get(timeout=120)
    child.join(10)
    assert count == 10_000
    assert rss_mb < 60, rss_mb


def _twenty_views(top: str, result) -> None:
    spool = os.path.join(top, "spool")
    os.mkdir(spool)
    queue.make_dirs(spool)
    with open(os.path.join(spool, "alice"), "wb") as f:
        for n in range(10_000):
            f.write(copy_bytes(subject(n) + b"x" * 2000 + b"\r\n", n))
    views = [mailbox_views.ImapView(spool, "alice") for _ in range(20)]
    for v in views:
        v.refresh()
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    result.put((rss / 1024, views[0].exists))


# --- POP3 -------------------------------------------------------------------------------

def _hold_pop3(spool: str, ready) -> None:
    drop = mailbox_views.Pop3Maildrop(spool, "alice")
    ready.set()
    time.sleep(60)
    drop.close()


def test_pop3_lock_is_exclusive_across_processes_and_dies_with_its_holder(spool):
    deliver(spool, subject(1), 1)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_pop3, args=(spool, ready))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with pytest.raises(mailbox_views.MailboxInUse):
            mailbox_views.Pop3Maildrop(spool, "alice")
        assert time.monotonic() - started < 1      # at once, not after a wait
        mbox.append(spool, "alice", [copy_bytes(subject(2), 2)])   # delivery goes on
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    with mailbox_views.Pop3Maildrop(spool, "alice") as drop:
        assert drop.count == 2
        with pytest.raises(mailbox_views.MailboxInUse):       # in one process too
            mailbox_views.Pop3Maildrop(spool, "alice")


def test_pop3_snapshot_and_mail_delivered_before_commit_survives(spool):
    sent = {n: deliver(spool, subject(n), n) for n in range(4)}
    with mailbox_views.Pop3Maildrop(spool, "alice") as drop:
        assert drop.count == 4
        listing = [(drop.size(n), drop.uidl(n)) for n in range(1, 5)]
        assert all(re.fullmatch(r"[\x21-\x7e]{1,70}", uidl) for _, uidl in listing)
        assert len({uidl for _, uidl in listing}) == 4
        assert [len(b"".join(drop.iter_content(n))) for n in range(1, 5)] == [s for s, _ in listing]
        sent[4] = deliver(spool, subject(4), 4)          # arrives during the session
        assert drop.count == 4                           # kept for the next login
        assert drop.commit([1, 3]) == [1, 3]
    assert raw(spool) == sent[1] + sent[3] + sent[4]
    with mailbox_views.Pop3Maildrop(spool, "alice") as drop:
        assert [drop.uidl(n) for n in (1, 2)] == [listing[1][1], listing[3][1]]
        assert drop.uidl(3).endswith(".5")
    assert len(mailbox.mbox(os.path.join(spool, "alice"))) == 3


def test_expunge_keeps_mode_and_group_and_locks_are_released(spool):
    deliver(spool, subject(1), 1)
    deliver(spool, subject(2), 2)
    path = os.path.join(spool, "alice")
    os.chmod(path, 0o660)
    box = fresh(spool)
    assert box.expunge([1], only_deleted=False) == [1]
    st = os.stat(path)
    assert oct(st.st_mode & 0o777) == "0o660"
    assert not os.path.exists(path + ".lock")
    assert sorted(os.listdir(mailbox_index.Paths(spool, "alice").dir)) == ["index", "lock"]
    mbox.append(spool, "alice", [copy_bytes(subject(3), 3)])


# --- interrupted deliveries -------------------------------------------------------------

@pytest.mark.parametrize("filler", [0, 700_000], ids=["small", "scanned-before-locking"])
def test_half_appended_message_is_not_indexed_and_blocks_expunge_until_repaired(spool, filler):
    first = deliver(spool, subject(1) + b"f" * filler + b"\r\n", 1)
    second = deliver(spool, subject(2) + b"f" * filler + b"\r\n", 2)
    journal = mbox.AppendJournal(state_path(spool, DELIVERY_JOURNAL))
    # Delivery killed -9 half-way through an append: journal entry and half a copy.
    journal.begin("alice", len(first + second))
    with open(os.path.join(spool, "alice"), "ab") as f:
        f.write(copy_bytes(subject(3), 3)[:70])
    assert (os.path.getsize(os.path.join(spool, "alice")) > mailstore.PRESCAN_BYTES) == bool(filler)
    box = fresh(spool)
    assert uids(box) == [1, 2]
    with pytest.raises(mailstore.MailboxBusy):
        box.expunge([1], only_deleted=False)
    assert raw(spool).startswith(first + second)
    assert mbox.undo_interrupted_appends(spool, journal) == set()
    third = deliver(spool, subject(3), 3)
    box.refresh()
    assert uids(box) == [1, 2, 3]
    assert box.expunge([1], only_deleted=False) == [1]
    assert raw(spool) == second + third
    journal.close()


def test_refresh_does_not_wait_for_a_busy_mailbox(spool):
    deliver(spool, subject(1), 1)
    box = fresh(spool)
    view = mailbox_views.ImapView(spool, "alice")
    deliver(spool, subject(2), 2)
    with mutt_locks(spool):
        started = time.monotonic()
        assert view.refresh().new_uids == []            # busy: try again later
        assert time.monotonic() - started < 0.5
        with pytest.raises(mailstore.MailboxBusy):
            box.expunge([1], only_deleted=False)
    assert view.refresh().new_uids == [2]


def test_a_reader_changed_under_raises_instead_of_giving_wrong_bytes(spool):
    for n in range(3):
        deliver(spool, subject(n), n)
    box = fresh(spool)
    stream = box.iter_content(2, 16)
    first = next(stream)
    # Someone edits the body in place, same length (no state header involved).
    rewrite_in_place(spool, lambda data: data.replace(b"body of 1", b"BODY OF 1"))
    with pytest.raises(mailstore.MailboxChanged):
        for _ in stream:
            pass
    assert first
    # Read again: the index notices, the edited message is a new one.
    box.refresh(wait=True)
    with pytest.raises(mailstore.MessageGone):
        box.content(2)


# --- kill -9 ----------------------------------------------------------------------------
# A child doing expunges (IMAP and POP3 ways) is killed at random moments while another
# process delivers with mbox.append. After each kill, with delivery paused: the file
# is exactly the expected messages, byte for byte, each once; a removal in flight
# removed all of its messages or none; reopening gives every survivor its old UID.

KILL_ITERATIONS = int(os.environ.get("MAILSTORE_KILL_ITERATIONS", "300"))
KILL_MAILBOX_BYTES = 400_000


def token_copy(token: int) -> bytes:
    filler = b"x" * (20_000 if token % 10 == 0 else 300)
    content = (b"Subject: tok-%d\r\n\r\nFrom a line start\r\n>From quoted\r\n%s\r\n" % (token, filler))
    return copy_bytes(content, token)


def _appender(spool: str, log_path: str, pause, paused, stop) -> None:
    import random
    rng = random.Random(os.getpid())
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    token = 0
    while not stop.is_set():
        if pause.is_set():
            paused.set()
            while pause.is_set() and not stop.is_set():
                time.sleep(0.001)
            paused.clear()
            continue
        if os.path.getsize(os.path.join(spool, "alice")) > KILL_MAILBOX_BYTES:
            time.sleep(0.002)
            continue
        try:
            mbox.append(spool, "alice", [token_copy(token)])
        except mbox.MailboxBusy:
            time.sleep(0.001)
            continue
        os.write(log, b"%d\n" % token)
        token += 1
        time.sleep(rng.uniform(0, 0.004))


def _expunger(spool: str, log_path: str, seed: int) -> None:
    import random
    mailstore._registry.clear()          # nothing shared with the parent after fork
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    box = mailstore.Mailbox(spool, "alice")
    while True:
        try:
            box.refresh(wait=True)
            present = uids(box)
            if len(present) < 15:
                time.sleep(0.002)
                continue
            pick = rng.sample(present, rng.randint(1, 3))
            tokens = {uid: _token_of(box.content(uid)) for uid in pick}
        except (mailstore.MailboxBusy, mailstore.MailboxChanged, mailstore.MessageGone):
            continue
        os.write(log, b"intent %s\n" % b",".join(b"%d" % t for t in tokens.values()))
        try:
            if rng.random() < 0.5:
                box.store_flags(pick, ["\\Deleted"], "add")
                removed = box.expunge(pick)
            else:
                with mailbox_views.Pop3Maildrop(spool, "alice") as drop:
                    numbers = [drop.uids.tolist().index(uid) + 1 for uid in pick if uid in drop.uids]
                    removed = drop.commit(numbers)
        except (mailstore.MailboxBusy, mailbox_views.MailboxInUse):
            os.write(log, b"busy\n")
            continue
        os.write(log, b"done %s\n" % b",".join(b"%d" % tokens[uid] for uid in removed))
        time.sleep(rng.uniform(0, 0.003))


def _token_of(visible: bytes) -> int:
    return int(re.search(rb"Subject: tok-(-?\d+)", visible).group(1))


def _read_lines(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class _KillBook:
    """What the parent knows: tokens delivered, removed for sure, UIDs seen."""

    def __init__(self):
        self.deleted: set[int] = set()
        self.uid_of: dict[int, int] = {}
        self.token_of_uid: dict[int, int] = {}
        self.uidvalidity = None
        self.lines_seen = 0
        self.figures = dict(iterations=0, killed_running=0, expunges=0, in_flight_old_set=0,
                            in_flight_new_set=0, stale_index_after_kill=0, messages_checked=0)

    def settle_expunges(self, lines: list[bytes], present: set[int]) -> None:
        """The new lines of the log are the last child's, the last one killed."""
        lines, self.lines_seen = lines[self.lines_seen:], len(lines)
        in_flight: set[int] = set()
        for line in lines:
            word, _, rest = line.partition(b" ")
            tokens = {int(t) for t in rest.split(b",") if t}
            if word == b"intent":
                in_flight = tokens
            elif word == b"done":
                self.deleted |= tokens
                self.figures["expunges"] += 1
                in_flight = set()
            else:
                in_flight = set()
        assert not self.deleted & present, "a removed message came back"
        if in_flight:
            there = in_flight & present
            assert there in (set(), in_flight - self.deleted), \
                f"half of an interrupted removal: {in_flight} vs {there}"
            if there:
                self.figures["in_flight_old_set"] += 1
            else:
                self.figures["in_flight_new_set"] += 1
                self.deleted |= in_flight

    def check_mailbox(self, spool: str, delivered: list[int]) -> None:
        data = raw(spool)
        present = [int(re.search(rb"Subject: tok-(-?\d+)", region).group(1))
                   for region in messages_of(data)]
        assert len(present) == len(set(present)), "a message is there twice"
        assert present == sorted(present), "messages out of order"
        missing = set(delivered) - set(present) - self.deleted
        return data, present, missing

    def check(self, spool: str, appended_log: str, expunged_log: str) -> None:
        delivered = [int(t) for t in _read_lines(appended_log)]
        data, present, missing = self.check_mailbox(spool, delivered)
        self.settle_expunges(_read_lines(expunged_log), set(present))
        missing -= self.deleted
        assert not missing, f"delivered messages lost: {sorted(missing)}"
        assert data == b"".join(token_copy(t) for t in present), "the mailbox is not byte for byte"
        assert [_token_of(m.as_bytes()) for m in mailbox.mbox(os.path.join(spool, "alice"))] == present
        index = mailbox_index.Paths(spool, "alice").index
        if os.path.exists(index):     # not before the first child built it
            with open(index, "rb") as f:
                header = mailbox_index.Header.unpack(f.read(mailbox_index.HEADER_BYTES))
            if header.mbox_ino != os.stat(os.path.join(spool, "alice")).st_ino:
                self.figures["stale_index_after_kill"] += 1
        box = fresh(spool)
        if self.uidvalidity is None:
            self.uidvalidity = box.uidvalidity
        assert box.uidvalidity == self.uidvalidity
        seen = uids(box)
        assert seen == sorted(set(seen))
        assert len(seen) == len(present)
        for uid, token in zip(seen, present):
            visible = box.content(uid)
            assert _token_of(visible) == token
            assert visible == reference_visible(token_copy(token))
            assert box.info(uid).size == len(visible)
            assert self.uid_of.setdefault(token, uid) == uid, "a message changed its UID"
            assert self.token_of_uid.setdefault(uid, token) == token, "a UID was reused"
        self.figures["messages_checked"] += len(present)


def test_expunges_killed_at_random_moments_never_lose_or_damage_mail(spool, tmp_path):
    import random
    rng = random.Random(20261129)
    for token in range(-30, 0):
        mbox.append(spool, "alice", [token_copy(token)])
    appended_log, expunged_log = str(tmp_path / "appended"), str(tmp_path / "expunged")
    with open(appended_log, "wb") as f:
        f.write(b"".join(b"%d\n" % t for t in range(-30, 0)))
    ctx = multiprocessing.get_context("fork")
    pause, paused, stop = ctx.Event(), ctx.Event(), ctx.Event()
    appender = ctx.Process(target=_appender, args=(spool, appended_log, pause, paused, stop))
    appender.start()
    book = _KillBook()
    started = time.monotonic()
    try:
        for iteration in range(KILL_ITERATIONS):
            child = ctx.Process(target=_expunger, args=(spool, expunged_log, rng.getrandbits(32)))
            child.start()
            time.sleep(rng.uniform(0, 0.04))
            if child.is_alive():
                book.figures["killed_running"] += 1
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
            pause.set()
            assert paused.wait(10), "the appender is stuck"
            book.check(spool, appended_log, expunged_log)
            book.figures["iterations"] += 1
            pause.clear()
    finally:
        stop.set()
        appender.join(10)
        if appender.is_alive():
            appender.kill()
    book.figures["delivered"] = len(_read_lines(appended_log))
    book.figures["seconds"] = round(time.monotonic() - started, 1)
    print("\nkill -9 figures:", book.figures)
    # How often each window is hit depends on the machine's speed: only that the
    # children did work is asserted; the figures are printed.
    assert book.figures["killed_running"] and book.figures["expunges"]


# --- with the real Dovecot ---------------------------------------------------------------

DOVECOT_CONF = """\
base_dir = {top}/run
log_path = {top}/dovecot.log
ssl = no
protocols =
listen = 127.0.0.1
mail_location = mbox:{top}/mail:INBOX={spool}/alice
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={top}/home
}}
passdb {{
  driver = static
  args = nopassword=y
}}
"""


@pytest.fixture
def dovecot():
    """A Dovecot instance of its own (config, base_dir, no listener) whose user
    'alice' has SPOOL/alice as INBOX; doveadm talks to it. Needs root (Dovecot
    refuses to be root for mail, so the files go to 'nobody')."""
    import pwd
    import shutil
    import subprocess
    import tempfile
    if not (shutil.which("dovecot") and shutil.which("doveadm")) or os.geteuid() != 0:
        pytest.skip("needs dovecot-imapd and root")
    nobody = pwd.getpwnam("nobody")
    top = tempfile.mkdtemp(prefix="ccsmtp-dovecot-", dir="/tmp")
    os.chmod(top, 0o755)
    spool = os.path.join(top, "spool")
    for sub in ("spool", "mail", "home", "run"):
        os.mkdir(os.path.join(top, sub))
    queue.make_dirs(spool)
    for sub in ("spool", "mail", "home"):
        os.chown(os.path.join(top, sub), nobody.pw_uid, nobody.pw_gid)
    conf = os.path.join(top, "dovecot.conf")
    with open(conf, "w") as f:
        f.write(DOVECOT_CONF.format(top=top, spool=spool, uid=nobody.pw_uid, gid=nobody.pw_gid))
    subprocess.run(["dovecot", "-c", conf], check=True, timeout=30)

    def doveadm(*args: str) -> str:
        for attempt in range(50):     # the auth service may still be starting
            done = subprocess.run(["doveadm", "-c", conf, *args], capture_output=True, text=True,
                                  timeout=30)
            if done.returncode == 0 or "auth-userdb" not in done.stderr:
                break
            time.sleep(0.1)
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        yield spool, doveadm, nobody
    finally:
        with open(os.path.join(top, "run", "master.pid")) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(top, ignore_errors=True)


def test_dovecot_on_the_same_mailbox(dovecot):
    spool, doveadm, nobody = dovecot
    for n in range(4):
        deliver(spool, subject(n), n)
    os.chown(os.path.join(spool, "alice"), nobody.pw_uid, nobody.pw_gid)
    box = fresh(spool)
    before = by_subject(box)
    contents = {uid: box.content(uid) for uid in uids(box)}
    box.store_flags([before[b"message 2"]], ["\\Flagged"], "add")
    # Dovecot syncs the mbox: X-IMAPbase, X-UID (padded), Status headers in place.
    doveadm("flags", "add", "-u", "alice", "\\Seen", "mailbox", "INBOX", "all")
    assert b"X-UID: " in raw(spool) and b"X-IMAPbase: " in raw(spool)
    box = fresh(spool)
    assert by_subject(box) == before
    assert {uid: box.content(uid) for uid in uids(box)} == contents
    assert box.info(before[b"message 2"]).flags == {"\\Flagged"}
    # Dovecot expunges one, we expunge another: each side keeps its UIDs.
    doveadm("expunge", "-u", "alice", "mailbox", "INBOX", "header", "Subject", "message 1")
    box = fresh(spool)
    assert by_subject(box) == {k: v for k, v in before.items() if k != b"message 1"}
    assert box.expunge([before[b"message 0"]], only_deleted=False) == [before[b"message 0"]]
    assert os.stat(os.path.join(spool, "alice")).st_uid == nobody.pw_uid
    listed = doveadm("fetch", "-u", "alice", "uid hdr.subject", "mailbox", "INBOX", "all")
    assert re.findall(r"uid: (\d+)", listed) == ["3", "4"]    # Dovecot's UIDs kept too
    # Emptied by Dovecot: its placeholder is no message; new mail gets a new UID.
    doveadm("expunge", "-u", "alice", "mailbox", "INBOX", "all")
    assert b"FOLDER INTERNAL DATA" in raw(spool)
    box = fresh(spool)
    assert box.count == 0
    deliver(spool, subject(9), 9)
    box.refresh()
    assert list(by_subject(box)) == [b"message 9"] and uids(box) == [box.uidnext - 1]
    assert uids(box)[0] > max(before.values())
    listed = doveadm("fetch", "-u", "alice", "hdr.subject", "mailbox", "INBOX", "all")
    assert "message 9" in listed
