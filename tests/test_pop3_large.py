"""A mailbox of 100,000 messages through the real POP3 server (SPEC §9).

The mbox is written straight to disk as delivery writes it (mbox.format_copy). The
first login builds the mail store's index (its time is reported); after it, LIST
(and UIDL, STAT) of all 100,000 messages complete in under a second measured at the
client, from the command to the final '.'; messages at the start, middle and end are
byte for byte; the worker's RSS stays bounded; one DELE and QUIT rewrites the file
and keeps every other message. CCSMTP_POP3_LARGE=N changes the size (default 100000).
"""

from __future__ import annotations

import os
import time

from conftest import RssSampler, record_figures
from pop3_support import (generated_content, prepare_spool, split_mbox, start_pop3,
                          stored_copy, unstuff, visible, write_mailbox)

MESSAGES = int(os.environ.get("CCSMTP_POP3_LARGE", "100000"))
LIST_BOUND_S = 1.0                 # the bound
WORKER_RSS_BOUND = 160 * 2**20     # a worker at rest is ~20 MB; the index is 72 B/message


def timed(wire, command: str, multi: bool) -> tuple[float, bytes, bytes]:
    started = time.monotonic()
    status = wire.cmd(command)
    body = wire.multi() if multi else b""
    return time.monotonic() - started, status, body


def test_a_mailbox_of_100000_messages(start_server, work_dir):
    spool = work_dir / "spool-large"
    prepare_spool(spool)
    t0 = time.monotonic()
    size = write_mailbox(spool / "big", MESSAGES)
    generated_s = time.monotonic() - t0
    pop3 = start_pop3(start_server, work_dir, users={"big": "pw"}, scheme="SHA512-CRYPT",
                      spool=spool)
    figures: dict[str, object] = dict(messages=MESSAGES, mbox_mb=round(size / 2**20, 1),
                                      generated_s=round(generated_s, 1))
    with RssSampler(pop3.smtp, interval=0.05) as rss:
        with pop3.wire() as wire:
            assert wire.cmd("USER big").startswith(b"+OK")
            took, status, _ = timed(wire, "PASS pw", multi=False)
            assert status == b"+OK Logged in.\r\n", status
            figures["first_login_s"] = round(took, 2)
            took, status, body = timed(wire, "LIST", multi=True)
            assert status.startswith(f"+OK {MESSAGES} messages (".encode())
            lines = body[:-3].split(b"\r\n")[:-1]
            assert len(lines) == MESSAGES and lines[-1].startswith(f"{MESSAGES} ".encode())
            figures["list_s"] = round(took, 3)
            assert took < LIST_BOUND_S, figures
            took, status, body = timed(wire, "UIDL", multi=True)
            assert body.count(b"\r\n") == MESSAGES + 1
            figures["uidl_s"] = round(took, 3)
            took, status, _ = timed(wire, "STAT", multi=False)
            assert status.startswith(f"+OK {MESSAGES} ".encode())
            figures["stat_s"] = round(took, 4)
            sizes = [int(line.split()[1]) for line in lines]
            assert int(status.split()[2]) == sum(sizes)
            for n in (1, MESSAGES // 2, MESSAGES):
                _, sent = wire.retr(n)
                want = visible(stored_copy(generated_content(n - 1), n - 1))
                assert unstuff(sent) == want and sizes[n - 1] == len(want), n
            wire.cmd("QUIT")
        with pop3.wire() as wire:
            assert wire.cmd("USER big").startswith(b"+OK")
            took, status, _ = timed(wire, "PASS pw", multi=False)
            assert status.startswith(b"+OK")
            figures["second_login_s"] = round(took, 3)
            took, _, _ = timed(wire, "LIST", multi=True)
            figures["second_list_s"] = round(took, 3)
            assert took < LIST_BOUND_S, figures
            assert wire.cmd(f"DELE {MESSAGES // 2}").startswith(b"+OK")
            started = time.monotonic()
            assert wire.cmd("QUIT") == b"+OK Bye\r\n"
            figures["quit_with_one_dele_s"] = round(time.monotonic() - started, 2)
    figures["worker_rss_mb"] = round(rss.peak("worker") / 2**20, 1)
    record_figures("pop3.large_mailbox", **figures)
    assert rss.peak("worker") < WORKER_RSS_BOUND, figures
    stored = split_mbox(pop3.smtp.raw("big"))
    assert len(stored) == MESSAGES - 1
    for n in (0, MESSAGES // 2 - 2, MESSAGES // 2 - 1, MESSAGES - 2):
        original = n if n < MESSAGES // 2 - 1 else n + 1
        assert stored[n] == stored_copy(generated_content(original), original)
