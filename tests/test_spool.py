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
from prefork_smtp.store import delivery, mbox, queue
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
    queue.make_dirs(path)
    return path


def make_config(spool_dir: str) -> config.Config:
    return config.build({"spool": spool_dir, "listen": ["127.0.0.1:2525"],
                         "domains": ["example.org"], "hostname": "mx.example.org"})


def queued(content: bytes, envelope: Envelope = ENVELOPE) -> queue.QueuedMessage:
    return queue.QueuedMessage(queue.QueueIds().next(), envelope, time.time(), content,
                               size=len(content))


def read_mbox(spool_dir: str, name: str) -> list[mailbox.mboxMessage]:
    return list(mailbox.mbox(os.path.join(spool_dir, name), create=False))


# --- queue -------------------------------------------------------------------------

def test_batch_round_trips_every_field(spool):
    messages = [queued(b"Subject: one\r\n\r\nbody\r\n"), queued(b"")]
    name = queue.write_batch(spool, messages)
    assert queue.ready_batches(spool) == [name]
    assert queue.read_batch(spool, name) == messages
    assert os.listdir(queue.queue_paths(spool)["tmp"]) == []


def test_spilled_content_is_committed_as_a_data_file(spool):
    spill = queue.SpillFile(spool, "spill.1")
    spill.write(b"Subject: big\r\n\r\n")
    spill.write(b"x" * 100_000 + b"\r\n")
    message = queue.QueuedMessage("ABC123", ENVELOPE, time.time(), external=True, size=spill.size)
    name = queue.write_batch(spool, [message], {"ABC123": spill})
    [loaded] = queue.read_batch(spool, name)
    assert loaded.external and loaded.content == b""
    assert b"".join(queue.content_pieces(spool, loaded, piece_bytes=4096)) == \
        b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    queue.remove_batch(spool, name, [loaded])
    assert os.listdir(queue.queue_paths(spool)["data"]) == []
    assert queue.ready_batches(spool) == []


def test_failed_batch_write_leaves_nothing_behind(spool, monkeypatch):
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(queue.os, "fsync", broken_fsync)
    with pytest.raises(queue.QueueError) as info:
        queue.write_batch(spool, [queued(b"x\r\n")])
    assert info.value.disk_full
    paths = queue.queue_paths(spool)
    assert os.listdir(paths["tmp"]) == [] and os.listdir(paths["queue"]) == []


def test_clean_tmp_removes_unfinished_batches(spool):
    open(os.path.join(queue.queue_paths(spool)["tmp"], "half"), "wb").close()
    assert queue.clean_tmp(spool) == 1
    assert os.listdir(queue.queue_paths(spool)["tmp"]) == []


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
    queue.write_batch(spool, [queued(FORGED_STATE + body)])
    delivery.Delivery(cfg, None).deliver_round()
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
    queue.write_batch(spool, [queued(b"Subject: 1\r\n\r\nFrom x\r\n", twice_to_alice),
                              queued(b"Subject: 2\r\n\r\n.dot\r\n", twice_to_alice)])
    assert delivery.Delivery(cfg, None).deliver_round() == 0
    alice, bob = read_mbox(spool, "alice"), read_mbox(spool, "bob")
    assert [m["Subject"] for m in alice] == ["1", "2"] and len(bob) == 2
    assert alice[0].get_payload() == ">From x\n"
    assert queue.ready_batches(spool) == []
    assert oct(os.stat(os.path.join(spool, "alice")).st_mode & 0o777) == oct(cfg.spool_mode)


def test_busy_mailbox_defers_only_itself_and_partial_progress_is_kept(spool):
    cfg = make_config(spool)
    name = queue.write_batch(spool, [queued(b"Subject: 1\r\n\r\nx\r\n")])
    open(os.path.join(spool, "alice.lock"), "w").close()    # a reader's dot-lock
    worker = delivery.Delivery(cfg, None)
    assert worker.deliver_round() == 1
    assert len(read_mbox(spool, "bob")) == 1 and not os.path.exists(os.path.join(spool, "alice"))
    assert {mb for _, mb in queue.read_done(spool, name)} == {"bob"}
    os.unlink(os.path.join(spool, "alice.lock"))
    worker.retry_at.clear()
    assert worker.deliver_round() == 0
    assert len(read_mbox(spool, "alice")) == 1 and len(read_mbox(spool, "bob")) == 1


def test_restart_after_crash_between_mailbox_fsync_and_cleanup_does_not_duplicate(spool):
    cfg = make_config(spool)
    name = queue.write_batch(spool, [queued(b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3)])
    saved = open(os.path.join(queue.queue_paths(spool)["queue"], name), "rb").read()
    delivery.Delivery(cfg, None).deliver_round()
    # As if the process died after the mailboxes were synced but before the batch went.
    with open(os.path.join(queue.queue_paths(spool)["queue"], name), "wb") as f:
        f.write(saved)
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    assert restarted.deliver_round() == 0
    assert len(read_mbox(spool, "alice")) == 3 and len(read_mbox(spool, "bob")) == 3


def test_tls_sessions_get_the_tls_comment_in_received():
    tls = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    text = format_one(b"x\r\n", protocol="ESMTPS", tls=tls)
    assert (b"Received: from client.example.net (unknown [192.0.2.7])\n"
            b"\t(using " + tls.encode() + b")\n"
            b"\tby mx.example.org (ccsmtp) with ESMTPS id QID1\n") in text


def test_tls_field_round_trips_through_the_queue(spool):
    message = queued(b"x\r\n", dataclasses.replace(ENVELOPE, protocol="ESMTPS", tls="TLSv1.2 with cipher X (128/128 bits)"))
    name = queue.write_batch(spool, [message])
    assert queue.read_batch(spool, name) == [message]


def test_recovery_recognises_copies_received_over_tls(spool):
    cfg = make_config(spool)
    tls_envelope = dataclasses.replace(ENVELOPE, protocol="ESMTPS", tls="TLSv1.3 with cipher X (256/256 bits)")
    name = queue.write_batch(spool, [queued(b"Subject: %d\r\n\r\nx\r\n" % i, tls_envelope)
                                     for i in range(2)])
    saved = open(os.path.join(queue.queue_paths(spool)["queue"], name), "rb").read()
    delivery.Delivery(cfg, None).deliver_round()
    with open(os.path.join(queue.queue_paths(spool)["queue"], name), "wb") as f:
        f.write(saved)
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    assert restarted.deliver_round() == 0
    assert len(read_mbox(spool, "alice")) == 2


def test_forged_trace_header_in_content_does_not_fool_recovery(spool):
    cfg = make_config(spool)
    victim = queued(b"Subject: real\r\n\r\nx\r\n")
    forged = (b"Subject: forged\r\n\r\nFrom x Thu Jan  1 00:00:00 1970\r\nReturn-Path: <>\r\n"
              b"Received: from x\r\n\tby y (ccsmtp) with ESMTP id " + victim.queue_id.encode() + b"\r\n")
    queue.write_batch(spool, [queued(forged)])
    delivery.Delivery(cfg, None).deliver_round()
    queue.write_batch(spool, [victim])
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    restarted.deliver_round()
    assert [m["Subject"] for m in read_mbox(spool, "alice")] == ["forged", "real"]


def test_corrupt_batch_is_quarantined_and_the_rest_delivered(spool):
    cfg = make_config(spool)
    with open(os.path.join(queue.queue_paths(spool)["queue"], "0000BROKEN"), "wb") as f:
        f.write(b"12 99\n{not json")
    queue.write_batch(spool, [queued(b"Subject: ok\r\n\r\nx\r\n")])
    delivery.Delivery(cfg, None).deliver_round()
    assert [m["Subject"] for m in read_mbox(spool, "alice")] == ["ok"]
    assert os.listdir(os.path.join(spool, ".ccsmtp", "corrupt")) == ["0000BROKEN"]


def test_append_cut_short_by_a_kill_is_cut_back_and_delivered_again(spool):
    cfg = make_config(spool)
    queue.write_batch(spool, [queued(b"Subject: old\r\n\r\nx\r\n")])
    delivery.Delivery(cfg, None).deliver_round()
    path = os.path.join(spool, "alice")
    before = open(path, "rb").read()
    message = queued(b"Subject: new\r\n\r\n" + b"y" * 5000 + b"\r\n")
    queue.write_batch(spool, [message])
    # What kill -9 in the middle of an append leaves: the journal entry, the start of
    # the copy (From_ line and trace headers, which name the queue ID), a dot-lock.
    dead = delivery.Delivery(cfg, None)
    dead.journal.begin("alice", len(before))
    whole = b"".join(dead._format(delivery.Copy("b", message, "alice@example.org", "alice")))
    with open(path, "ab") as f:
        f.write(whole[:len(whole) // 2])
    with open(path + ".lock", "w") as f:
        f.write("999999999\n")    # no such pid: a dead owner's lock is broken at once
    restarted = delivery.Delivery(cfg, None)
    restarted.recover()
    assert restarted.deliver_round() == 0
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
