"""The shared memory the master makes before it forks, which every child inherits.

Owns: nothing of its own; it names the tables that cross process boundaries so that
they travel together: the scoreboard (heartbeats, counters), the anvil (connections
per client IP) and the login throttle (failed logins per client address).
"""

from __future__ import annotations

import dataclasses

from ..auth.throttle import Throttle
from .anvil import Anvil
from .scoreboard import Scoreboard


@dataclasses.dataclass(frozen=True)
class SharedMemory:
    scoreboard: Scoreboard
    anvil: Anvil
    throttle: Throttle
