"""aiosmtpd-durable: the aiosmtpd peer of the benchmark (not part of ccsmtp).

An aiosmtpd 1.4.6 server whose handler appends each message to one mbox file per
recipient (mboxrd: From_ line, >From quoting, LF line ends, a blank line after
each message) under an fcntl lock, fsyncs, and only then answers 250 -- the same
promise ccsmtp and Postfix make. The append runs in a thread (asyncio.to_thread)
so that other sessions go on while one fsyncs: the best a plain aiosmtpd handler
does without a queue of its own.

Run by bench/run.py with aiosmtpd on PYTHONPATH; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import re
import signal
import threading
import time

from aiosmtpd.smtp import SMTP

SAFE_LOCAL = re.compile(r"[a-z0-9._-]{1,200}")
FROM_LINE = re.compile(rb"(?m)^(>*From )")


class MboxHandler:
    def __init__(self, mail_dir: str, domain: str):
        self.mail_dir = mail_dir
        self.domain = domain.lower()
        self.locks: dict[str, threading.Lock] = {}

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain or not SAFE_LOCAL.fullmatch(local.lower()):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        try:
            await asyncio.to_thread(self.deliver, envelope)
        except OSError as e:
            return f"451 4.3.0 cannot append: {e.strerror}"
        return "250 2.0.0 Ok: queued"

    def deliver(self, envelope) -> None:
        content = envelope.original_content.replace(b"\r\n", b"\n")
        quoted = FROM_LINE.sub(rb">\1", content)
        if not quoted.endswith(b"\n"):
            quoted += b"\n"
        sender = envelope.mail_from or "MAILER-DAEMON"
        stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
        record = b"From %s %s\nReturn-Path: <%s>\n" % (
            sender.encode(), stamp.encode(), (envelope.mail_from or "").encode()) + quoted + b"\n"
        for rcpt in envelope.rcpt_tos:
            name = rcpt.rpartition("@")[0].lower()
            lock = self.locks.setdefault(name, threading.Lock())
            with lock:
                self.append(os.path.join(self.mail_dir, name), record)

    @staticmethod
    def append(path: str, record: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--mail-dir", required=True)
    p.add_argument("--max-size", type=int, default=104_857_600)
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    handler = MboxHandler(args.mail_dir, args.domain)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def factory() -> SMTP:
        return SMTP(handler, hostname="aiosmtpd.bench.test", data_size_limit=args.max_size,
                    decode_data=False)

    server = loop.run_until_complete(loop.create_server(factory, host, int(port), backlog=4096))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
