"""The ENVELOPE/BODYSTRUCTURE cache (envelope_cache.py) and how FETCH uses it and the
mail store (mailbox_commands.py): a second sync reads no message, headers-only items
read only headers, entries are keyed by fingerprint, the file survives torn and bad
records, compacts, and large bodies are streamed in batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prefork_smtp.imap import envelope_cache as EC
from prefork_smtp.imap import mailbox_commands as M
from prefork_smtp.imap import parser as P
from prefork_smtp.store import mailstore

from test_imap_protocol import USER, append, make_spool, mbox_message


def command(line: bytes) -> P.Command:
    parsed = P.parse_command(line)
    assert isinstance(parsed, P.Command), parsed
    return parsed


def fetch(box: M.SelectedMailbox, line: bytes) -> bytes:
    c = command(line)
    out, outcome = M.run(M.fetch(box, c.args, c.uid))
    assert outcome.status == "OK", outcome
    return out


@pytest.fixture
def box(tmp_path: Path) -> M.SelectedMailbox:
    spool = make_spool(tmp_path / "spool", count=20)
    _, outcome = M.run(M.select(spool, USER, read_only=False))
    return outcome.selected


class Reads:
    """Counts the mail store's message reads."""

    def __init__(self, monkeypatch):
        self.top = self.content = 0
        top, content = mailstore.Mailbox.top, mailstore.Mailbox.content

        def counting_top(mailbox, *args, **kwargs):
            self.top += 1
            return top(mailbox, *args, **kwargs)

        def counting_content(mailbox, *args, **kwargs):
            self.content += 1
            return content(mailbox, *args, **kwargs)

        monkeypatch.setattr(mailstore.Mailbox, "top", counting_top)
        monkeypatch.setattr(mailstore.Mailbox, "content", counting_content)


def test_envelope_needs_the_header_only_and_a_second_fetch_reads_nothing(box, monkeypatch):
    reads = Reads(monkeypatch)
    first = fetch(box, b"a UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)")
    assert (reads.top, reads.content) == (20, 0)
    second = fetch(box, b"a UID FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)")
    assert second == first and (reads.top, reads.content) == (20, 0)
    # BODYSTRUCTURE needs whole messages once; then everything is cached.
    fetch(box, b"a FETCH 1:* (BODYSTRUCTURE)")
    fetch(box, b"a FETCH 1:* (BODY ENVELOPE BODYSTRUCTURE)")
    assert (reads.top, reads.content) == (20, 20)


def test_another_process_reads_the_cache_file(box, monkeypatch, tmp_path):
    first = fetch(box, b"a UID FETCH 1:* (ENVELOPE BODYSTRUCTURE)")
    fresh = EC.EnvelopeCache(str(tmp_path / "spool"), USER)     # as another worker has it
    fresh.sync()
    assert len(fresh) == 20
    monkeypatch.setattr(box, "cache", fresh)
    reads = Reads(monkeypatch)
    assert fetch(box, b"a UID FETCH 1:* (ENVELOPE BODYSTRUCTURE)") == first
    assert (reads.top, reads.content) == (0, 0)


def test_entries_are_keyed_by_fingerprint(tmp_path):
    spool = make_spool(tmp_path / "spool", count=0)
    cache = EC.EnvelopeCache(spool, USER)
    cache.sync()
    cache.add([(1, 111, b"(env)", None, None)])
    assert cache.get(1, 111)[1] == b"(env)"
    assert cache.get(1, 222) is None and cache.get(2, 111) is None
    cache.add([(1, 111, None, b"(body)", None)])       # adds to the entry
    assert cache.get(1, 111)[1:] == (b"(env)", b"(body)", None)


def test_a_torn_record_is_read_once_complete_and_a_bad_one_ends_the_file(tmp_path):
    spool = make_spool(tmp_path / "spool", count=0)
    writer = EC.EnvelopeCache(spool, USER)
    writer.sync()
    writer.add([(1, 1, b"one", None, None)])
    path = Path(writer.path)
    record = EC._encode(2, 2, b"two", b"b", None)
    with open(path, "ab") as f:
        f.write(record[:10])                        # another process, half-way
    reader = EC.EnvelopeCache(spool, USER)
    reader.sync()
    assert len(reader) == 1
    with open(path, "ab") as f:
        f.write(record[10:])
    reader.sync()
    assert reader.get(2, 2)[1:] == (b"two", b"b", None)
    with open(path, "ab") as f:
        f.write(b"\x01" * 64)                       # garbage: not a record
    reader.sync()
    assert len(reader) == 2
    reader.add([(3, 3, b"three", None, None)])       # rewritten without the garbage
    again = EC.EnvelopeCache(spool, USER)
    again.sync()
    assert sorted(again._entries) == [1, 2, 3]


def test_dead_entries_are_compacted_away(tmp_path, monkeypatch):
    monkeypatch.setattr(EC, "SLACK_RECORDS", 5)
    spool = make_spool(tmp_path / "spool", count=0)
    cache = EC.EnvelopeCache(spool, USER)
    cache.sync()
    for uid in range(1, 31):
        cache.add([(uid, uid, b"x" * 100, None, None)], live_uids=range(1, 31))
    big = os.path.getsize(cache.path)
    cache.add([(31, 31, b"y", None, None)], live_uids=[30, 31])
    assert os.path.getsize(cache.path) < big / 5
    fresh = EC.EnvelopeCache(spool, USER)
    fresh.sync()
    assert sorted(fresh._entries) == [30, 31]


def test_a_large_body_is_streamed_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "STREAM_BYTES", 10_000)
    body = "".join(f"line {n:06d}\n" for n in range(60_000))      # ~720 KB
    spool = make_spool(tmp_path / "spool", count=1)
    append(spool, mbox_message(2, body=body))
    _, outcome = M.run(M.select(spool, USER, read_only=True))
    c = command(b"a FETCH 2 (UID BODY[])")
    job = M.Job(M.fetch(outcome.selected, c.args, c.uid))
    batches = []
    while job.outcome is None:
        if chunk := job.next_batch():
            batches.append(chunk)
    assert job.outcome.status == "OK" and len(batches) > 2
    out = b"".join(batches)
    head, _, rest = out.partition(b"\r\n")
    size = int(head.rsplit(b"{", 1)[1].rstrip(b"}"))
    assert head.startswith(b"* 2 FETCH (UID 2 BODY[] {")
    assert rest[:size].endswith(body.replace("\n", "\r\n").encode()) and rest[size:] == b")\r\n"


def test_messages_expunged_by_another_session_are_no_in_fetch(box, tmp_path):
    spool = str(tmp_path / "spool")
    _, other = M.run(M.select(spool, USER, read_only=False))
    c = command(b"a STORE 2 +FLAGS (\\Deleted)")
    M.run(M.store(other.selected, c.args, c.uid))
    M.run(M.expunge(other.selected))
    c = command(b"a FETCH 1:3 (UID)")
    out, outcome = M.run(M.fetch(box, c.args, c.uid))
    assert out == b"* 1 FETCH (UID 1)\r\n* 3 FETCH (UID 3)\r\n"
    assert (outcome.status, outcome.code) == ("NO", "EXPUNGEISSUED")
