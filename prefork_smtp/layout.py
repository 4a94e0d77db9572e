"""Where ccsmtp keeps its own files in the spool: the layout, in one place.

Every plain file directly in SPOOL is a mailbox (SPEC §6), named by the rule below;
everything of ccsmtp's own (queue, scoreboard, delivery's lock and journal, mailbox
state) lives under SPOOL/.ccsmtp/, a name no mailbox can have.
Depends on nothing of ours.
"""

from __future__ import annotations

import os
import re

DEFAULT_SPOOL = "/var/spool/ccsmtp"
STATE_DIR = ".ccsmtp"
SCOREBOARD = "scoreboard"
DELIVERY_LOCK = "delivery.lock"
DELIVERY_JOURNAL = "delivery.journal"
DELIVERY_STATE = "delivery.state"  # delivery's view of the queue, for ccsmtp-queue and -status
FLUSH_REQUEST = "flush"            # ccsmtp-queue --flush: retry every deferred copy now
FAILED_DIR = "failed"              # copies refused for good (5xx), until requeued or deleted


# SPEC §6: [a-z0-9._-], never a leading '.', never ending in '.lock', at most 250 octets
# so that NAME.lock still fits in the 255-octet file name limit.
MAX_MAILBOX_NAME = 250
_SAFE_NAME = re.compile(rf"[a-z0-9_-][a-z0-9._-]{{0,{MAX_MAILBOX_NAME - 1}}}")


def is_safe_mailbox(name: str) -> bool:
    return bool(_SAFE_NAME.fullmatch(name)) and not name.endswith(".lock")


def mailbox_path(spool_dir: str, mailbox: str) -> str:
    """SPOOL/NAME, for a safe NAME only: nothing is ever written outside SPOOL."""
    if not is_safe_mailbox(mailbox):
        raise ValueError(f"unsafe mailbox name {mailbox!r}")
    return os.path.join(spool_dir, mailbox)


def state_path(spool_dir: str, *names: str) -> str:
    """SPOOL/.ccsmtp/NAME...: one of ccsmtp's own files or directories."""
    return os.path.join(spool_dir, STATE_DIR, *names)
