"""The durable queue, mbox formatting and locking, and the delivery process's rounds,
without sockets: real files in a temporary spool."""

from __future__ import annotations

import dataclasses
import fcntl
import mailbox
import multiprocessing
import os
import resource
import time

import pytest

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
