"""ccsmtp-queue: list and manage the mail queue, as Postfix's mailq/postqueue/postsuper.

    ccsmtp-queue [-s SPOOL | -c CONFIG] [--json]           list queued and failed copies
    ccsmtp-queue ... --flush                               retry every deferred copy now
    ccsmtp-queue ... --requeue ID[.MAILBOX] ...|all        failed copies back into the queue
    ccsmtp-queue ... --delete ID[.MAILBOX] ...             remove queued or failed copies

Owns: reading the queue log (store/queue.py: queued()), the failed copies
(store/failed.py) and what delivery last said about them (store/delivery_state.py:
the last error of each deferred copy, whether the destination is reachable), and
the three actions: --flush leaves a flag file that the delivery process looks for
at least once a second (it then tries every deferred copy at once, backoff or not);
--requeue appends each failed copy to the queue log as a worker's committer would
(a new queue ID, its old arrival time), waits until the record is durable, removes
the failed file and wakes delivery the same way (only while ccsmtp runs: after a
crash the log's shared state is rebuilt at start-up, and an append before that
could overwrite acknowledged records); --delete takes queued copies out
(a "-" line in the log's done file, which delivery reads within a second) or removes
failed files.
Safe while the server runs: it only reads the log, appends to it under the log's own
locks, and writes done lines delivery already expects from this tool.
Must not: deliver anything itself, or write as root: run as root it becomes the owner
of SPOOL/.ccsmtp first, so every file it creates is one the server can use.
Fails: one line on stderr; exit 2 for usage (bad option, bad config), 1 for runtime
(no queue in the spool, permission denied, no such ID, I/O errors).

An ID is a queue ID as the log and `250 ... queued as ID` show it (every copy of that
message), or ID.MAILBOX for one copy. A requeued copy has a new queue ID, printed.

JSON (--json), for the listing:
    spool
    queued   [{id, received_at, age_s, size, sender,
               recipients: [{address, mailbox, last_error, attempts, next_attempt}]}]
             (last_error null: never deferred, or delivery has not said yet)
    failed   [{id, name, mailbox, recipient, sender, size, received_at, failed_at,
               reason, destination}]
    delivery the delivery state (delivery_state.py), or null
and for the actions: {"flushed": true}, {"requeued": [{id, name, new_id}]},
{"deleted": [{id, mailbox, where}]} ("queue" or "failed").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn, Sequence

from ..config import ConfigError, build
from ..layout import DEFAULT_SPOOL, DELIVERY_LOCK, STATE_DIR, state_path
from ..process import privileges
from ..store import delivery_state, failed, queue
from ..store.fsutil import lock_ofd

PROG = "ccsmtp-queue"


class Failure(Exception):
    """A runtime failure (exit 1); str() is the one line to show."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _die(2, f"{message} (see {PROG} --help)")


def _die(status: int, message: object) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(status)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="List ccsmtp's mail queue (queued and failed copies) "
                "or act on it; safe while the server runs.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-s", "--spool", metavar="SPOOL",
                       help=f"the spool directory (default {DEFAULT_SPOOL})")
    where.add_argument("-c", "--config", metavar="CONFIG", help="ccsmtp's TOML config: its spool")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--flush", action="store_true",
                        help="make delivery retry every deferred copy now (as postqueue -f)")
    action.add_argument("--requeue", nargs="+", metavar="ID",
                        help="put failed copies back into the queue: ID, ID.MAILBOX or all")
    action.add_argument("--delete", nargs="+", metavar="ID",
                        help="remove queued or failed copies: ID or ID.MAILBOX (as postsuper -d)")
    p.add_argument("--json", action="store_true", help="print JSON (see the module documentation)")
    return p


def spool_of(args: argparse.Namespace) -> str:
    if args.config:
        try:
            return build({}, args.config).spool_dir
        except ConfigError as e:
            _die(2, e)
    return os.path.abspath(args.spool or DEFAULT_SPOOL)


def become_spool_owner(spool: str) -> None:
    """As root, act as the user who owns SPOOL/.ccsmtp (the ccsmtp user): files this
    tool creates (a queue segment, a data file, the flag) must be the server's."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(state_path(spool))
    except FileNotFoundError:
        raise Failure(f"no queue in {spool} ({state_path(spool)} does not exist: has ccsmtp "
                      "run with this spool?)") from None
    if st.st_uid == 0:
        return
    try:
        privileges.drop(privileges.Identity("", st.st_uid, st.st_gid))
    except privileges.PrivilegeError as e:
        raise Failure(str(e)) from None


def check_queue(spool: str) -> None:
    control = os.path.join(queue.queue_paths(spool)["log"], "control")
    try:
        os.stat(control)
    except FileNotFoundError:
        raise Failure(f"no queue in {spool} ({control} does not exist: has ccsmtp run with "
                      "this spool?)") from None
    except PermissionError:
        raise Failure(f"cannot read {os.path.join(spool, STATE_DIR)}: run as root or as the "
                      "ccsmtp user") from None
    if not os.access(control, os.R_OK | os.W_OK):
        raise Failure(f"cannot use {control}: run as root or as the ccsmtp user")


# --- the listing ------------------------------------------------------------------------

def listing(spool: str) -> dict[str, Any]:
    now = time.time()
    state = delivery_state.read(spool)
    deferred = (state or {}).get("deferred") or {}
    unreachable = (state or {}).get("unreachable")
    queued_out = []
    for entry in queue.queued(spool):
        recipients = []
        for rcpt in entry.recipients:
            error = deferred.get(entry.queue_id, {}).get(rcpt.mailbox)
            if error is None and unreachable:
                error = {"error": f"{state.get('destination')} unreachable: {unreachable['error']}",
                         "attempts": unreachable["attempts"],
                         "next_attempt": unreachable["next_attempt"]}
            recipients.append({"address": rcpt.address, "mailbox": rcpt.mailbox,
                               "last_error": error["error"] if error else None,
                               "attempts": error["attempts"] if error else 0,
                               "next_attempt": error["next_attempt"] if error else None})
        queued_out.append({"id": entry.queue_id, "received_at": entry.received_at,
                           "age_s": round(max(0.0, now - entry.received_at), 1),
                           "size": entry.size, "sender": entry.sender,
                           "recipients": recipients})
    failed_out = [{"id": c.queue_id, "name": c.name, "mailbox": c.mailbox,
                   "recipient": c.recipient, "sender": c.message.envelope.mail_from,
                   "size": c.size, "received_at": c.message.received_at,
                   "failed_at": c.failed_at, "reason": c.reason, "destination": c.destination}
                  for c in failed.listing(spool)]
    return {"spool": spool, "queued": queued_out, "failed": failed_out, "delivery": state}


def format_listing(data: dict[str, Any]) -> str:
    """mailq's layout: ID, size, age, sender; the last error in parentheses; then the
    recipients it applies to. A failed copy's ID ends in '!' (as mailq marks held mail)."""
    queued_list, failed_list = data["queued"], data["failed"]
    if not queued_list and not failed_list:
        return "Mail queue is empty" + _delivery_note(data["delivery"])
    now = time.time()
    lines = [f"{'-Queue ID-':<24} {'--Size--':>8} {'--Age--':>8}  -Sender/Recipient-------"]
    for message in queued_list:
        lines.append(f"{message['id']:<24} {message['size']:>8} {_age(message['age_s']):>8}  "
                     f"{message['sender'] or '<>'}")
        by_error: dict[str | None, list[str]] = {}
        for rcpt in message["recipients"]:
            by_error.setdefault(rcpt["last_error"], []).append(_recipient(rcpt))
        for error, recipients in by_error.items():
            if error:
                lines.append(f"{'':<24} ({error})")
            lines += [f"{'':<43}{r}" for r in recipients]
        lines.append("")
    for copy in failed_list:
        lines.append(f"{copy['id'] + '!':<24} {copy['size']:>8} "
                     f"{_age(now - copy['received_at']):>8}  {copy['sender'] or '<>'}")
        lines.append(f"{'':<24} (failed {_age(now - copy['failed_at'])} ago: {copy['reason']})")
        lines.append(f"{'':<43}{_recipient(copy)}")
        lines.append("")
    size = sum(m["size"] for m in queued_list) + sum(c["size"] for c in failed_list)
    copies = sum(len(m["recipients"]) for m in queued_list)
    lines.append(f"-- {_kbytes(size)} Kbytes: {len(queued_list)} queued message(s) "
                 f"({copies} cop{'y' if copies == 1 else 'ies'}), {len(failed_list)} failed "
                 f"cop{'y' if len(failed_list) == 1 else 'ies'}" + _delivery_note(data["delivery"]))
    return "\n".join(lines)


def _recipient(rcpt: dict[str, Any]) -> str:
    address = rcpt.get("address") or rcpt.get("recipient")
    return address if address.lower().split("@")[0] == rcpt["mailbox"] \
        else f"{address} (mailbox {rcpt['mailbox']})"


def _delivery_note(state: dict[str, Any] | None) -> str:
    if not state or not state.get("unreachable"):
        return ""
    down = state["unreachable"]
    now = time.time()
    return (f"; {state.get('destination', 'the destination')} unreachable for "
            f"{_age(now - down['since'])}, next attempt in "
            f"{_age(max(0.0, down['next_attempt'] - now))}")


def _age(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _kbytes(size: int) -> int:
    return (size + 1023) // 1024


# --- the actions ------------------------------------------------------------------------

def _split_id(text: str) -> tuple[str, str | None]:
    queue_id, dot, mailbox = text.partition(".")
    if not queue_id or not queue_id.isalnum():
        raise Failure(f"{text!r} is not a queue ID (as in '250 2.0.0 Ok: queued as ID'), "
                      "or ID.MAILBOX")
    return queue_id, (mailbox if dot else None)


def flush(spool: str) -> dict[str, Any]:
    delivery_state.request_flush(spool)
    return {"flushed": True, "delivery_running": delivery_running(spool)}


def delivery_running(spool: str) -> bool:
    """Whether a delivery process runs for this spool: it holds delivery.lock (and it
    is forked only after the master brought the queue log to a known state)."""
    try:
        fd = os.open(state_path(spool, DELIVERY_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        lock_ofd(fd, wait=False, shared=True)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)      # closing the description drops a lock we got
    return False


def requeue(spool: str, ids: Sequence[str]) -> dict[str, Any]:
    if not delivery_running(spool):
        # After a crash the log's shared state is rebuilt when ccsmtp starts; an
        # append before that could land on acknowledged records.
        raise Failure(f"ccsmtp is not running with spool {spool}: start it, then requeue "
                      "(the queue log is put in order at its start)")
    copies = failed.listing(spool)
    if list(ids) == ["all"]:
        chosen = copies
        if not chosen:
            raise Failure("there are no failed copies to requeue")
    else:
        chosen = []
        for text in ids:
            queue_id, mailbox = _split_id(text)
            found = [c for c in copies if c.queue_id == queue_id
                     and (mailbox is None or c.mailbox == mailbox)]
            if not found:
                raise Failure(f"no failed copy {text} (see {PROG}); nothing requeued")
            chosen += [c for c in found if c not in chosen]
    done = []
    for copy in chosen:
        try:
            new_id = failed.requeue(spool, copy)
        except (OSError, queue.QueueError, ValueError) as e:
            raise Failure(f"cannot requeue {copy.name}: {e}"
                          + (f" (requeued before it: {', '.join(d['name'] for d in done)})"
                             if done else "")) from None
        done.append({"id": copy.queue_id, "name": copy.name, "new_id": new_id})
    delivery_state.request_flush(spool)
    return {"requeued": done}


def delete(spool: str, ids: Sequence[str]) -> dict[str, Any]:
    wanted = [_split_id(text) for text in ids]
    queued_now = queue.queued(spool)
    copies = failed.listing(spool)
    done: list[dict[str, str]] = []
    removed: set[tuple[str, str]] = set()
    for (queue_id, mailbox), text in zip(wanted, ids):
        found = False
        for entry in queued_now:
            if entry.queue_id != queue_id:
                continue
            for rcpt in entry.recipients:
                if (mailbox is None or rcpt.mailbox == mailbox) and \
                        (queue_id, rcpt.mailbox) not in removed:
                    # The listing above is what delivery had left: no second scan of
                    # the log per copy (queue.remove_copy's) is needed.
                    queue.mark_done(spool, entry.segment, [(queue_id, rcpt.mailbox)],
                                    removed=True)
                    removed.add((queue_id, rcpt.mailbox))
                    done.append({"id": queue_id, "mailbox": rcpt.mailbox, "where": "queue"})
                    found = True
        for copy in copies:
            if copy.queue_id == queue_id and (mailbox is None or copy.mailbox == mailbox):
                try:
                    failed.remove(spool, copy)
                except FileNotFoundError:
                    continue
                done.append({"id": queue_id, "mailbox": copy.mailbox, "where": "failed"})
                found = True
        if not found:
            raise Failure(f"no queued or failed copy {text} (see {PROG})"
                          + (f"; deleted before it: {_done_names(done)}" if done else ""))
    return {"deleted": done}


def _done_names(done: list[dict[str, str]]) -> str:
    return ", ".join(f"{d['id']}.{d['mailbox']}" for d in done)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spool = spool_of(args)
    try:
        become_spool_owner(spool)
        check_queue(spool)
        if args.flush:
            result = flush(spool)
            text = ("delivery will retry every deferred copy now" if result["delivery_running"]
                    else "no delivery process is running: the request waits for its next start")
        elif args.requeue:
            result = requeue(spool, args.requeue)
            text = "\n".join(f"requeued {d['name']} as {d['new_id']}" for d in result["requeued"])
        elif args.delete:
            result = delete(spool, args.delete)
            text = "\n".join(f"deleted {d['id']}.{d['mailbox']} "
                             f"({'queued' if d['where'] == 'queue' else 'failed'})"
                             for d in result["deleted"])
        else:
            result = listing(spool)
            text = format_listing(result)
    except Failure as e:
        _die(1, e)
    except PermissionError as e:
        _die(1, f"{e.filename or spool}: permission denied (run as root or as the ccsmtp user)")
    except (OSError, queue.QueueError) as e:
        _die(1, e)
    print(json.dumps(result, indent=2) if args.json else text)
    return 0

