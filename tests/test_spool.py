"""The durable queue, mbox formatting and locking, and the delivery process's rounds,
without sockets: real files in a temporary spool."""

from __future__ import annotations

import dataclasses
import fcntl
import mailbox
import multiprocessing
import os
import re
import resource
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_smtp import config
from prefork_smtp.store import delivery, mbox, queue, sink
from prefork_smtp.store.envelope import Envelope, Recipient

ENVELOPE = Envelope(
    mail_from="sender@example.net",
    recipients=(Recipient("alice@example.org", "alice"), Recipient("Bob+x@example.org", "bob")),
    helo="client.example.net",
    protocol="ESMTP",
    client_address="192.0.2.7",
    body="7BIT",
)


@pytest.fixture
def spool(tmp_path):
    path = str(tmp_path / "spool")
    os.mkdir(path)
    queue.recover(path)
    return path


def make_config(spool_dir: str) -> config.Config:
    return config.build({"spool": spool_dir, "listen": ["127.0.0.1:2525"],
                         "domains": ["example.org"], "hostname": "mx.example.org"})


IDS = queue.QueueIds()


def queued(content: bytes, envelope: Envelope = ENVELOPE) -> queue.QueuedMessage:
    return queue.QueuedMessage(IDS.next(), envelope, time.time(), content, size=len(content))


def write(spool_dir: str, messages: list[queue.QueuedMessage], full: bool = False) -> int:
    """Append messages to the log and flush, as a worker's committer does."""
    log = queue.Log(spool_dir)
    try:
        end = log.append([queue.encode_payload(m) for m in messages], full)
        log.sync(end)
        return end
    finally:
        log.close()


def read_all(spool_dir: str) -> list[queue.QueuedMessage]:
    log = queue.Log(spool_dir)
    try:
        out = []
        for segment in log.segments():
            records, _, _ = log.read(segment, segment.base)
            out += [queue.decode_payload(p, lsn) for lsn, cancelled, p in records if not cancelled]
        return out
    finally:
        log.close()


def deliver(d: delivery.Delivery) -> int:
    """One round and its flush; how many messages are still queued."""
    d.deliver_round()
    d.settle(force=True)
    return d.pending()


def read_mbox(spool_dir: str, name: str) -> list[mailbox.mboxMessage]:
    return list(mailbox.mbox(os.path.join(spool_dir, name), create=False))


# --- queue -------------------------------------------------------------------------

def test_records_round_trip_every_field(spool):
    messages = [queued(b"Subject: one\r\n\r\nbody\r\n"), queued(b"")]
    write(spool, messages)
    loaded = read_all(spool)
    assert [dataclasses.replace(m, lsn=0) for m in loaded] == messages
    assert [q.queue_id for q in queue.queued(spool)] == [m.queue_id for m in messages]


def test_only_flushed_records_are_read_and_a_flush_covers_every_writer(spool):
    first, second = queue.Log(spool), queue.Log(spool)    # two workers
    try:
        end1 = first.append([queue.encode_payload(queued(b"one\r\n"))])
        end2 = second.append([queue.encode_payload(queued(b"two\r\n"))])
        assert read_all(spool) == [] and queue.queued(spool) == []
        second.sync(end2)                  # one flush, led by the second writer
        assert first.synced >= end1        # ... covers the first one's record too
        assert [m.content for m in read_all(spool)] == [b"one\r\n", b"two\r\n"]
    finally:
        first.close()
        second.close()


def test_a_torn_or_stale_tail_ends_the_records_and_recovery_keeps_the_rest(spool):
    write(spool, [queued(b"kept\r\n")])
    log = queue.Log(spool)
    try:
        end = log.append([queue.encode_payload(queued(b"torn\r\n" * 100))])
        [segment] = log.segments()
        # kill -9 half-way through a write: the end of the record never arrived
        fd = log.fd(segment.seg_id)
        off = queue.HEADER_BYTES + end - segment.base
        os.pwrite(fd, bytes(300), off - 300)
    finally:
        log.close()
    queue.recover(spool)
    assert [m.content for m in read_all(spool)] == [b"kept\r\n"]
    write(spool, [queued(b"after\r\n")])     # the log goes on over the torn record
    assert [m.content for m in read_all(spool)] == [b"kept\r\n", b"after\r\n"]


def test_segments_fill_up_switch_and_are_reused_once_delivered(spool, monkeypatch):
    monkeypatch.setattr(queue, "SEGMENT_BYTES", 64 << 10)
    monkeypatch.setattr(queue, "SMALLER_SEGMENTS", (64 << 10,))
    cfg = make_config(spool)
    d = delivery.Delivery(cfg, None)
    for n in range(30):
        write(spool, [queued(b"Subject: %d\r\n\r\n" % n + b"x" * 10_000 + b"\r\n")])
        deliver(d)
    assert len(read_mbox(spool, "alice")) == 30 and queue.queued(spool) == []
    # Five segments' worth went through, but freed segments were taken again.
    assert len([n for n in os.listdir(os.path.join(spool, ".ccsmtp", "log"))
                if n.startswith("seg.")]) <= 4


def test_spilled_content_is_committed_as_a_data_file(spool):
    spill = queue.SpillFile(spool, "spill.1")
    spill.write(b"Subject: big\r\n\r\n")
    spill.write(b"x" * 100_000 + b"\r\n")
    message = queue.QueuedMessage("ABC123", ENVELOPE, time.time(), external=True, size=spill.size)
    spill.move_to(queue.data_path(spool, "ABC123"))
    write(spool, [message], full=True)
    [loaded] = read_all(spool)
    assert loaded.external and loaded.content == b""
    assert b"".join(queue.content_pieces(spool, loaded, piece_bytes=4096)) == \
        b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    assert deliver(delivery.Delivery(make_config(spool), None)) == 0
    assert os.listdir(queue.queue_paths(spool)["data"]) == []
    assert queue.queued(spool) == []


def test_a_failed_flush_fails_the_records_and_cancels_them(spool, monkeypatch):
    def broken_fdatasync(fd):
        raise OSError(5, "Input/output error")
    log = queue.Log(spool)
    try:
        end = log.append([queue.encode_payload(queued(b"lost\r\n"))])
        monkeypatch.setattr(queue.os, "fdatasync", broken_fdatasync)
        with pytest.raises(queue.QueueError):
            log.sync(end)
        monkeypatch.undo()
        with pytest.raises(queue.QueueError):      # a follower learns it too
            log.sync(end)
    finally:
        log.close()
    write(spool, [queued(b"next\r\n")])
    assert [m.content for m in read_all(spool)] == [b"next\r\n"]


def test_a_full_disk_refuses_before_writing(spool, monkeypatch):
    class Full:
        f_bavail, f_frsize = 10, 4096
    monkeypatch.setattr(queue.os, "statvfs", lambda path: Full)
    log = queue.Log(spool)
    try:
        with pytest.raises(queue.QueueError) as info:
            log.append([queue.encode_payload(queued(b"x\r\n"))])
        assert info.value.disk_full
    finally:
        log.close()


def test_recover_removes_half_received_messages_and_orphan_data_files(spool):
    open(os.path.join(queue.queue_paths(spool)["tmp"], "spill.half"), "wb").close()
    open(queue.data_path(spool, "ORPHAN"), "wb").close()
    assert queue.recover(spool) == 2
    assert os.listdir(queue.queue_paths(spool)["tmp"]) == []
    assert os.listdir(queue.queue_paths(spool)["data"]) == []


def test_remove_copy_takes_one_copy_out(spool):
    message = queued(b"Subject: x\r\n\r\nx\r\n")
    write(spool, [message])
    assert queue.remove_copy(spool, message.queue_id, "bob")
    [entry] = queue.queued(spool)
    assert [r.mailbox for r in entry.recipients] == ["alice"]
    assert deliver(delivery.Delivery(make_config(spool), None)) == 0
    assert len(read_mbox(spool, "alice")) == 1 and not os.path.exists(os.path.join(spool, "bob"))


# --- mbox formatting ---------------------------------------------------------------

def format_one(content: bytes, pieces: int = 1, **overrides) -> bytes:
    env = dataclasses.replace(ENVELOPE, **overrides)
    step = max(1, len(content) // pieces)
    chunks = [content[i:i + step] for i in range(0, len(content), step)] or [b""]
    return b"".join(mbox.format_copy(env, chunks, queue_id="QID1", recipient="alice@example.org",
                                     received_at=0.0, hostname="mx.example.org"))


def test_copy_has_from_line_trace_headers_lf_endings_and_blank_line():
    text = format_one(b"Subject: hi\r\n\r\nbody\r\n")
    assert text == (
        b"From sender@example.net Thu Jan  1 00:00:00 1970\n"
        b"Return-Path: <sender@example.net>\n"
        b"Received: from client.example.net (unknown [192.0.2.7])\n"
        b"\tby mx.example.org (ccsmtp) with ESMTP id QID1\n"
        b"\tfor <alice@example.org>; Thu, 01 Jan 1970 00:00:00 +0000\n"
        b"Subject: hi\n\nbody\n\n")


@pytest.mark.parametrize("pieces", [1, 3, 7, 1000])
def test_mboxrd_quoting_is_the_same_however_content_is_cut(pieces):
    content = b"Subject: q\r\n\r\nFrom me\r\n>From you\r\n>>From x\r\nNot From\r\nFrom\r\nlast"
    text = format_one(content, pieces)
    body = text.split(b"\n\n", 1)[1]
    assert body == b">From me\n>>From you\n>>>From x\nNot From\nFrom\nlast\n\n"


def test_null_sender_is_mailer_daemon_and_ipv6_client_is_a_literal():
    text = format_one(b"x\r\n", mail_from="", client_address="2001:db8::1")
    assert text.startswith(b"From MAILER-DAEMON ")
    assert b"Return-Path: <>\n" in text and b"(unknown [IPv6:2001:db8::1])" in text


# --- state headers (SPEC §6) -----------------------------------------------------------

FORGED_STATE = (
    b"Return-Path: <forged@example.com>\r\n"
    b"Received: from relay.example.net by mx.example.net; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Status: RO\r\n"
    b"Subject: state\r\n"
    b"X-Status: AF\r\n"
    b"X-Keywords: $Forwarded\r\n"
    b"\tJunk\r\n"
    b" NonJunk\r\n"
    b"STATUS:RO\r\n"
    b"x-uid : 5\r\n"
    b"X-IMAP: 1 2\r\n"
    b"X-IMAPbase: 1234 5\r\n"
    b"X-UIDL: kept, not ours\r\n"
    b"X-Status-Report: kept\r\n"
    b"Content-Length: 3\r\n"
    b"Content-Type: text/plain;\r\n"
    b"\tcharset=us-ascii\r\n"
    b"\r\n"
    b"Status: RO is a body line\r\n"
    b"Content-Length: 1\r\n"
    b"X-UID: 7\r\n"
    b"\r\n"
    b"From here on\r\n"
)
CLEANED = (
    b"Received: from relay.example.net by mx.example.net; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Subject: state\r\n"
    b"X-UIDL: kept, not ours\r\n"
    b"X-Status-Report: kept\r\n"
    b"Content-Type: text/plain;\r\n"
    b"\tcharset=us-ascii\r\n"
    b"\r\n"
    b"Status: RO is a body line\r\n"
    b"Content-Length: 1\r\n"
    b"X-UID: 7\r\n"
    b"\r\n"
    b"From here on\r\n"
)


def cut(content: bytes, *offsets: int) -> list[bytes]:
    bounds = [0, *sorted(offsets), len(content)]
    return [content[a:b] for a, b in zip(bounds, bounds[1:])]


def strip_state(pieces: list[bytes]) -> bytes:
    return b"".join(mbox.without_state_headers(pieces))


def test_state_headers_and_their_folded_lines_leave_the_header_section_only():
    assert strip_state([FORGED_STATE]) == CLEANED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64])
def test_state_headers_are_removed_however_the_header_section_is_cut(size):
    pieces = [FORGED_STATE[i:i + size] for i in range(0, len(FORGED_STATE), size)]
    assert strip_state(pieces) == CLEANED


def test_every_single_cut_gives_the_same_result():
    for at in range(len(FORGED_STATE) + 1):
        assert strip_state(cut(FORGED_STATE, at)) == CLEANED, at


def test_the_body_is_passed_on_as_it_came_never_rescanned():
    head, body1, body2 = b"Status: RO\r\nSubject: s\r\n", b"\r\nStatus: 1\r\n", b"X-UID: 2\r\n"
    out = list(mbox.without_state_headers([head, body1, body2]))
    assert b"".join(out) == b"Subject: s\r\n" + body1 + body2
    assert out[-1] is body2          # the pieces after the header section, untouched


def test_mail_without_state_headers_is_passed_on_whole():
    piece = b"Subject: plain\r\nX-Spam-Flag: NO\r\n\r\nStatus: RO\r\n"
    assert list(mbox.without_state_headers([piece])) == [piece]


@pytest.mark.parametrize("content, expected", [
    (b"", b""),
    (b"\r\nStatus: RO\r\n", b"\r\nStatus: RO\r\n"),          # no header section at all
    (b"Status: RO\r\n", b""),                                      # headers only
    (b"Status: RO", b""),                                          # no line end at all
    (b"Status", b"Status"),                                        # not a field
    (b"Subject: x\nStatus: RO\n\nbody\n", b"Subject: x\n\nbody\n"),  # bare LF lines
    (b"Status" + b" " * 2000 + b": RO\r\nA: b\r\n", b"A: b\r\n"),
    (b"Status" + b" " * 10 + b"RO\r\n", b"Status" + b" " * 10 + b"RO\r\n"),  # no colon: kept
    (b" folded first\r\nStatus: RO\r\n\r\n", b" folded first\r\n\r\n"),
    (b"X: " + b"y" * 100_000 + b"\r\nX-UID: 1\r\n\r\n", b"X: " + b"y" * 100_000 + b"\r\n\r\n"),
])
def test_state_header_edge_cases(content, expected):
    assert strip_state([content]) == expected
    assert strip_state([content[i:i + 1] for i in range(len(content))]) == expected


def _reference_strip(content: bytes) -> bytes:
    """The same rule, on the whole message at once, line by line."""
    lines = re.findall(rb"[^\n]*\n|[^\n]+$", content)
    out, dropping = [], False
    for n, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return b"".join(out + lines[n:])
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")
        dropping = bool(colon) and bool(re.fullmatch(rb"[!-9;-~]+", name)) \
            and name.lower() in mbox.STATE_HEADERS
        if not dropping:
            out.append(line)
    return b"".join(out)


_LINES = st.sampled_from([
    b"Status: RO\r\n", b"X-UID: 1\r\n", b"content-length : 9\r\n", b"X-IMAPbase: 1 2\r\n",
    b"Subject: s\r\n", b"X-Statusx: k\r\n", b"\tfolded\r\n", b" more\r\n", b"\r\n", b"\n",
    b"Return-Path: <x@y>\n", b"From x\r\n", b"Statu\r\n", b"S: \r\r\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINES, max_size=12), st.lists(st.integers(0, 200), max_size=6))
def test_streaming_matches_the_whole_message_rule(lines, offsets):
    content = b"".join(lines)
    offsets = [o for o in offsets if o <= len(content)]
    assert strip_state(cut(content, *offsets)) == _reference_strip(content)


def test_copy_in_the_mailbox_has_no_state_headers_and_its_whole_body(spool):
    cfg = make_config(spool)
    body = b"line 1\r\nline 2 is longer than Content-Length says\r\n"
    write(spool, [queued(FORGED_STATE + body)])
    deliver(delivery.Delivery(cfg, None))
    [message] = read_mbox(spool, "alice")
    for name in ("Status", "X-Status", "X-Keywords", "X-UID", "X-IMAP", "X-IMAPbase",
                 "Content-Length"):
        assert message[name] is None, name
    assert message.get_all("Return-Path") == ["<sender@example.net>"]   # ours only
    assert message.get_flags() == ""                                     # not marked read
    assert message.get_payload().endswith("From here on\n" + body.decode().replace("\r", ""))


def test_a_new_mailbox_gets_spool_mode_whatever_the_umask(spool):
    old = os.umask(0o077)
    try:
        mbox.append(spool, "alice", [b"From x Thu Jan  1 00:00:00 1970\n\nbody\n\n"], 0o660)
    finally:
        os.umask(old)
    assert oct(os.stat(os.path.join(spool, "alice")).st_mode & 0o777) == oct(0o660)


def test_unsafe_mailbox_names_are_refused_before_any_file_is_touched(spool):
    for name in ("../escape", ".ccsmtp", "a/b", "x.lock", ""):
        with pytest.raises(ValueError):
            mbox.append(spool, name, [b"data"])
    assert sorted(os.listdir(spool)) == [".ccsmtp"]


# --- mbox locking -------------------------------------------------------------------

def _hold_posix_lock(path: str, ready, release) -> None:
    # What mutt does: a classic POSIX fcntl lock, from another process.
    with open(path, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        ready.set()
        release.wait(10)


def test_mailbox_locked_by_a_reader_is_busy_and_untouched(spool):
    mbox.append(spool, "alice", [b"From a Thu Jan  1 00:00:00 1970\nfirst\n\n"])
    path = os.path.join(spool, "alice")
    before = open(path, "rb").read()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    reader = ctx.Process(target=_hold_posix_lock, args=(path, ready, release))
    reader.start()
    try:
        assert ready.wait(5)
        with pytest.raises(mbox.MailboxBusy):
            mbox.append(spool, "alice", [b"second\n"])
        assert open(path, "rb").read() == before
        assert not os.path.exists(path + ".lock"), "our dot-lock must be released"
    finally:
        release.set()
        reader.join(5)
    mbox.append(spool, "alice", [b"From b Thu Jan  1 00:00:00 1970\nsecond\n\n"])
    assert len(read_mbox(spool, "alice")) == 2


def test_fresh_dot_lock_makes_mailbox_busy_and_stale_one_is_broken(spool):
    lock = os.path.join(spool, "alice.lock")
    open(lock, "w").close()
    with pytest.raises(mbox.MailboxBusy):
        mbox.append(spool, "alice", [b"x\n"])
    old = time.time() - mbox.STALE_DOTLOCK_S - 10
    os.utime(lock, (old, old))
    mbox.append(spool, "alice", [b"x\n"])
    assert open(os.path.join(spool, "alice"), "rb").read() == b"x\n"
    assert not os.path.exists(lock)


def _append_with_file_size_limit(spool_dir: str, limit: int, result) -> None:
    # A real failing write: the kernel refuses to grow the file past RLIMIT_FSIZE.
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        mbox.append(spool_dir, "alice", [b"y" * 1000, b"z" * 1000])
        result.put("appended")
    except OSError as e:
        result.put(f"error {e.errno}")


def test_failed_append_is_cut_back_to_the_old_length(spool):
    mbox.append(spool, "alice", [b"From a Thu Jan  1 00:00:00 1970\nfirst\n\n"])
    path = os.path.join(spool, "alice")
    before = open(path, "rb").read()
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    child = ctx.Process(target=_append_with_file_size_limit, args=(spool, len(before) + 1500, result))
    child.start()
    child.join(10)
    assert result.get(timeout=5).startswith("error")
    assert open(path, "rb").read() == before
    assert not os.path.exists(path + ".lock")


# --- delivery rounds -----------------------------------------------------------------

def test_delivery_appends_each_copy_once_per_mailbox_and_empties_the_queue(spool):
    cfg = make_config(spool)
    twice_to_alice = dataclasses.replace(ENVELOPE, recipients=(
        Recipient("alice@example.org", "alice"), Recipient("alice+tag@example.org", "alice"),
        Recipient("bob@example.org", "bob")))
    write(spool, [queued(b"Subject: 1\r\n\r\nFrom x\r\n", twice_to_alice),
                  queued(b"Subject: 2\r\n\r\n.dot\r\n", twice_to_alice)])
    assert deliver(delivery.Delivery(cfg, None)) == 0
    alice, bob = read_mbox(spool, "alice"), read_mbox(spool, "bob")
    assert [m["Subject"] for m in alice] == ["1", "2"] and len(bob) == 2
    assert alice[0].get_payload() == ">From x\n"
    assert queue.queued(spool) == []
    assert oct(os.stat(os.path.join(spool, "alice")).st_mode & 0o777) == oct(cfg.spool_mode)


def test_copies_leave_the_queue_only_after_a_flush_covers_the_mailboxes(spool, monkeypatch):
    monkeypatch.setattr(delivery, "SYNC_BATCH_S", 0.0)
    cfg = make_config(spool)
    first = queued(b"Subject: 1\r\n\r\nx\r\n")
    write(spool, [first])
    d = delivery.Delivery(cfg, None)
    d.deliver_round()
    assert len(read_mbox(spool, "alice")) == 1          # appended, not yet durable
    d.settle()                                          # asks for a flush, none ran yet
    assert queue.queued(spool)[0].queue_id == first.queue_id
    second = queued(b"Subject: 2\r\n\r\nx\r\n")
    write(spool, [second])                              # a worker's next flush: a syncfs
    d.settle()
    assert [q.queue_id for q in queue.queued(spool)] == [second.queue_id]


def test_busy_mailbox_defers_only_itself_and_partial_progress_is_kept(spool):
    cfg = make_config(spool)
    message = queued(b"Subject: 1\r\n\r\nx\r\n")
    write(spool, [message])
    open(os.path.join(spool, "alice.lock"), "w").close()    # a reader's dot-lock
    worker = delivery.Delivery(cfg, None)
    assert deliver(worker) == 1
    assert len(read_mbox(spool, "bob")) == 1 and not os.path.exists(os.path.join(spool, "alice"))
    [entry] = queue.queued(spool)
    assert [r.mailbox for r in entry.recipients] == ["alice"]
    os.unlink(os.path.join(spool, "alice.lock"))
    worker.retry_at.clear()
    assert deliver(worker) == 0
    assert len(read_mbox(spool, "alice")) == 1 and len(read_mbox(spool, "bob")) == 1


def test_restart_after_crash_between_append_and_done_record_does_not_duplicate(spool):
    cfg = make_config(spool)
    write(spool, [queued(b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3)])
    # As if the process died after appending, before the flush and the done records.
    delivery.Delivery(cfg, None).deliver_round()
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    assert deliver(restarted) == 0
    assert len(read_mbox(spool, "alice")) == 3 and len(read_mbox(spool, "bob")) == 3
    assert queue.queued(spool) == []


def test_tls_sessions_get_the_tls_comment_in_received():
    tls = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    text = format_one(b"x\r\n", protocol="ESMTPS", tls=tls)
    assert (b"Received: from client.example.net (unknown [192.0.2.7])\n"
            b"\t(using " + tls.encode() + b")\n"
            b"\tby mx.example.org (ccsmtp) with ESMTPS id QID1\n") in text


def test_tls_field_round_trips_through_the_queue(spool):
    tls = "TLSv1.2 with cipher X (128/128 bits)"
    message = queued(b"x\r\n", dataclasses.replace(ENVELOPE, protocol="ESMTPS", tls=tls))
    write(spool, [message])
    [loaded] = read_all(spool)
    assert dataclasses.replace(loaded, lsn=0) == message and loaded.envelope.tls == tls


def test_recovery_recognises_copies_received_over_tls(spool):
    cfg = make_config(spool)
    tls_envelope = dataclasses.replace(ENVELOPE, protocol="ESMTPS",
                                       tls="TLSv1.3 with cipher X (256/256 bits)")
    write(spool, [queued(b"Subject: %d\r\n\r\nx\r\n" % i, tls_envelope) for i in range(2)])
    # As if the process died after appending, before the flush and the done records:
    # the copies carry the TLS comment in their Received: header, and are still found.
    delivery.Delivery(cfg, None).deliver_round()
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    assert deliver(restarted) == 0
    assert len(read_mbox(spool, "alice")) == 2 and len(read_mbox(spool, "bob")) == 2


def test_forged_trace_header_in_content_does_not_fool_recovery(spool):
    cfg = make_config(spool)
    victim = queued(b"Subject: real\r\n\r\nx\r\n")
    forged = (b"Subject: forged\r\n\r\nFrom x Thu Jan  1 00:00:00 1970\r\nReturn-Path: <>\r\n"
              b"Received: from x\r\n\tby y (ccsmtp) with ESMTP id " + victim.queue_id.encode() + b"\r\n")
    write(spool, [queued(forged)])
    deliver(delivery.Delivery(cfg, None))
    write(spool, [victim])
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    deliver(restarted)
    assert [m["Subject"] for m in read_mbox(spool, "alice")] == ["forged", "real"]


def test_append_cut_short_by_a_kill_is_cut_back_and_delivered_again(spool):
    cfg = make_config(spool)
    write(spool, [queued(b"Subject: old\r\n\r\nx\r\n")])
    deliver(delivery.Delivery(cfg, None))
    path = os.path.join(spool, "alice")
    before = open(path, "rb").read()
    message = queued(b"Subject: new\r\n\r\n" + b"y" * 5000 + b"\r\n")
    write(spool, [message])
    # What kill -9 in the middle of an append leaves: the journal entry, the start of
    # the copy (From_ line and trace headers, which name the queue ID), a dot-lock.
    dead = delivery.Delivery(cfg, None)
    dead.sink.journal.begin("alice", len(before))
    whole = b"".join(dead.sink._format(sink.Copy(message, "alice@example.org", "alice")))
    with open(path, "ab") as f:
        f.write(whole[:len(whole) // 2])
    with open(path + ".lock", "w") as f:
        f.write("999999999\n")    # no such pid: a dead owner's lock is broken at once
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    assert deliver(restarted) == 0
    assert [m["Subject"] for m in read_mbox(spool, "alice")] == ["old", "new"]
    assert open(path, "rb").read() == before + whole
    assert [m["Subject"] for m in read_mbox(spool, "bob")] == ["old", "new"]


def test_append_retries_a_readers_brief_lock_before_deferring(spool, monkeypatch):
    # A POP3/IMAP reader indexing new mail holds the fcntl lock for well under a
    # millisecond: delivery tries again a few times instead of deferring for a second.
    real = mbox.lock_ofd
    attempts = []

    def busy_twice(fd, *, wait, shared=False):
        attempts.append(wait)
        if len(attempts) <= 2:
            raise BlockingIOError("held by a reader")
        real(fd, wait=wait, shared=shared)
    monkeypatch.setattr(mbox, "lock_ofd", busy_twice)
    mbox.append(spool, "alice", [b"From a Thu Jan  1 00:00:00 1970\nfirst\n\n"])
    assert attempts == [False, False, False]
    assert len(read_mbox(spool, "alice")) == 1

    def always_busy(fd, *, wait, shared=False):
        raise BlockingIOError("held")
    monkeypatch.setattr(mbox, "lock_ofd", always_busy)
    with pytest.raises(mbox.MailboxBusy):
        mbox.append(spool, "alice", [b"From b Thu Jan  1 00:00:00 1970\nsecond\n\n"])
    assert len(read_mbox(spool, "alice")) == 1 and not os.path.exists(os.path.join(spool, "alice.lock"))


class RefusingSink:
    """A sink that takes nothing for one mailbox and fails another: what LMTP may say."""
    durable_on_delivery = True

    def __init__(self):
        self.got = []

    def recover(self):
        pass

    def already_delivered(self, mailbox):
        return set()

    def deliver(self, mailbox, copies):
        self.got += [(mailbox, c.message.queue_id) for c in copies]
        if mailbox == "alice":
            return [sink.deferred("452 try later", 60.0)] * len(copies)
        return [sink.failed("550 no such user")] * len(copies)

    def close(self):
        pass


def test_a_sink_defers_and_fails_copies_per_mailbox(spool):
    message = queued(b"Subject: x\r\n\r\nx\r\n")
    write(spool, [message])
    target = RefusingSink()
    d = delivery.Delivery(make_config(spool), None, sink=target)
    assert deliver(d) == 1
    assert sorted(target.got) == [("alice", message.queue_id), ("bob", message.queue_id)]
    [entry] = queue.queued(spool)
    assert [r.mailbox for r in entry.recipients] == ["alice"]    # bob's copy failed: gone
    assert deliver(d) == 1 and len(target.got) == 2               # alice: not before 60 s
