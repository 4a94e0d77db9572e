"""The worker's mailbox watcher (watcher.py): inotify through ctypes, and the stat() poll
used where inotify is missing. A subscriber hears of an append to its mbox, a NAME.lock
going away and an index change; a mailbox nobody watches wakes nobody."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from prefork_smtp.imap import watcher as W
from prefork_smtp.store import mailbox_views

from test_imap_protocol import USER, make_spool, mbox_message


async def heard(spool: str, use_inotify: bool, change) -> tuple[int, int, str]:
    watcher = W.Watcher(spool, use_inotify=use_inotify)
    calls = {"alice": 0, "bob": 0}
    watcher.subscribe("alice", lambda: calls.__setitem__("alice", calls["alice"] + 1))
    watcher.subscribe("bob", lambda: calls.__setitem__("bob", calls["bob"] + 1))
    await asyncio.sleep(0.05)
    change()
    for _ in range(40):
        await asyncio.sleep(0.05)
        if calls["alice"]:
            break
    mode = watcher.mode
    watcher.close()
    return calls["alice"], calls["bob"], mode


@pytest.fixture
def spool(tmp_path: Path) -> str:
    spool = make_spool(tmp_path / "spool", count=2)
    make_spool(tmp_path / "spool", count=1, name="bob")
    for name in (USER, "bob"):
        mailbox_views.ImapView(spool, name)     # the mail store makes its index directories
    return spool


@pytest.mark.parametrize("use_inotify", [True, False])
def test_an_append_is_heard_by_that_mailbox_only(spool, use_inotify):
    if use_inotify and W._LIBC is None:
        pytest.skip("no inotify here")

    def append() -> None:
        with open(os.path.join(spool, USER), "ab") as f:
            f.write(mbox_message(3))

    alice, bob, mode = asyncio.run(heard(spool, use_inotify, append))
    assert alice >= 1 and bob == 0
    assert mode == ("inotify" if use_inotify else "poll")


def test_a_flag_change_by_another_process_is_heard(spool):
    if W._LIBC is None:
        pytest.skip("no inotify here")

    def store() -> None:
        view = mailbox_views.ImapView(spool, USER)
        view.store_flags([view.uid(1)], ["\\Seen"], "add")

    alice, bob, _ = asyncio.run(heard(spool, True, store))
    assert alice >= 1 and bob == 0


def test_a_dot_lock_going_away_is_heard(spool):
    if W._LIBC is None:
        pytest.skip("no inotify here")
    lock = Path(spool) / f"{USER}.lock"
    lock.write_text("1\n")
    alice, bob, _ = asyncio.run(heard(spool, True, lock.unlink))
    assert alice >= 1 and bob == 0
