"""A worker process: accepts from the shared listeners and runs many sessions.

Owns: the event loop of one worker, its listeners' accept side, starting the
service of each listener (it knows no protocol: services.py hands it a Service per
listener), the heartbeat and process title, and stopping (graceful on TERM: stop
accepting, 421 to idle sessions, let open transactions finish within
graceful_timeout; fast on QUIT), retiring after max_sessions_per_worker or over
max_worker_rss, and exiting when the master is gone.
Must not: open mailboxes (delivery does) or run as root (the master dropped it).
Exit codes: 0 after a stop or retirement; WORKER_BOOT_ERROR, after one log line, if
it cannot start serving (its event loop cannot be set up, a service cannot start,
e.g. the queue is no longer writable, or a listener is unusable): a fresh worker
would fail the same way, so the master stops rather than fork-loop. Short of a
resource at start (EMFILE, ENOMEM...) it exits 1 instead: that may pass, and the
master's back-off for children that die at start-up retries a few times first.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import random
import signal
import socket
import time
from typing import Callable, Mapping

import psutil
from setproctitle import setproctitle

from .. import logs
from ..auth.login import LoginChecker
from ..auth.throttle import ThrottleRegion
from ..config import SERVICE_FAMILIES, Config, ListenAddress
from ..credentials import Credentials
from ..service import RunningService, Service, SessionHooks, WorkerContext
from .anvil import AnvilRegion
from .listeners import Listener
from .scoreboard import Scoreboard
from .shared import SharedMemory

log = logging.getLogger("ccsmtp.worker")

WORKER_BOOT_ERROR = 3
# How many connections one wake-up of a worker may accept: small, so that a burst is
# spread over the workers instead of landing on whichever woke first.
ACCEPT_BATCH = 16
LISTEN_BACKLOG = 4096
HEARTBEAT_S = 1.0
RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# How a worker stops: RETIRE lets sessions end by themselves (reload, recycling),
# GRACEFUL says 421 to idle sessions at once (SIGTERM), FAST drops them (SIGQUIT).
RETIRE, GRACEFUL, FAST = "retire", "graceful", "fast"
STOP_MODES = ("", RETIRE, GRACEFUL, FAST)
RSS_CHECK_S = 5.0


class WorkerBootError(Exception):
    """This worker cannot start serving; str() names what failed, __cause__ why."""


def _describe(error: BaseException | None) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error) or type(error).__name__


class WorkerHooks(SessionHooks):
    """Session counters, plus connections per client over all workers (anvil)."""

    def __init__(self, limit: int, region: AnvilRegion, scoreboard: Scoreboard):
        super().__init__()
        self.limit = limit
        self.region = region
        self.scoreboard = scoreboard
        self.live_slots: list[int] = []
        self.on_broken: Callable[[object], None] | None = None
        self.refresh()

    def refresh(self) -> None:
        # Scanning the whole scoreboard per connection would cost more than it saves.
        self.live_slots = [info.slot for info in self.scoreboard.live()]
        if self.region.slot not in self.live_slots:
            self.live_slots.append(self.region.slot)

    def admit(self, client_ip: str) -> bool:
        if not self.limit:
            return True
        self.region.add(client_ip, +1)
        return self.region.anvil.total(client_ip, self.live_slots) <= self.limit

    def release(self, client_ip: str) -> None:
        if self.limit:
            self.region.add(client_ip, -1)

    def broken(self, why: object) -> None:
        if self.on_broken is not None:
            self.on_broken(why)

    def sessions_per_family(self) -> tuple[int, ...]:
        counts = dict.fromkeys(SERVICE_FAMILIES, 0)
        for session in self.sessions:
            counts[session.family] += 1
        return tuple(counts.values())


class Worker:
    def __init__(self, worker_id: int, slot: int, config: Config,
                 listeners: list[Listener], services: Mapping[str, Service],
                 loaded: Credentials, shared: SharedMemory,
                 notify: socket.socket | None,
                 status: socket.socket | None, master_pid: int):
        self.worker_id = worker_id
        self.slot = slot
        self.config = config
        self.listeners = listeners
        self.services = services
        self.credentials = loaded
        self.notify = notify
        self.shared = shared
        self.scoreboard = shared.scoreboard
        self.master_pid = master_pid
        self.status = status
        self.hooks = WorkerHooks(config.max_connections_per_client,
                                 AnvilRegion(shared.anvil, slot), shared.scoreboard)
        self.hooks.on_broken = self._broke
        self.sessions_served = 0
        self.max_sessions = self._jittered(config.max_sessions_per_worker)
        self._stop: asyncio.Event | None = None
        self._mode = ""
        self._told_master = False
        self._title = ""

    @staticmethod
    def _jittered(limit: int) -> int:
        # gunicorn's max_requests_jitter: workers started together do not retire together.
        return limit + random.randint(0, max(limit // 10, 0)) if limit else 0

    def run(self) -> int:
        self._reset_signals()
        setproctitle(f"ccsmtp: worker {self.worker_id} [starting]")
        try:
            runner = asyncio.Runner()
            runner.get_loop()   # the selector and self-pipe: descriptors, memory
        except Exception as e:
            return self._cannot_start("cannot set up its event loop", e)
        try:
            with runner:
                runner.run(self._serve())
        except WorkerBootError as e:
            return self._cannot_start(str(e), e.__cause__)
        except Exception:
            log.exception("worker %d crashed", self.worker_id)
            return 1
        return 0

    def _cannot_start(self, what: str, error: BaseException | None) -> int:
        """One log line; the exit code tells the master whether to try again."""
        reason = _describe(error)
        if isinstance(error, MemoryError) or (isinstance(error, OSError)
                                               and error.errno in RESOURCE_ERRNOS):
            log.error("worker %d cannot start: %s: %s (short of a resource: may pass)",
                      self.worker_id, what, reason)
            return 1
        log.critical("worker %d cannot start: %s: %s", self.worker_id, what, reason)
        return WORKER_BOOT_ERROR

    @staticmethod
    def _reset_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            # The master decides; a terminal's Ctrl-C must not cut transactions short.
            signal.signal(sig, signal.SIG_IGN)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.stop, GRACEFUL)
        loop.add_signal_handler(signal.SIGQUIT, self.stop, FAST)
        loop.add_signal_handler(signal.SIGUSR2, self.stop, RETIRE)
        loop.add_signal_handler(signal.SIGUSR1, logs.reopen)
        logs.batch_writes(functools.partial(self._schedule_log_flush, loop))
        login = LoginChecker(self.credentials.users, ThrottleRegion(self.shared.throttle, self.slot),
                             self.config.domains)
        running = await self._start_services(loop, login)
        heartbeat = loop.create_task(self._heartbeat())
        log.debug("worker %d serving", self.worker_id)
        await self._stop.wait()
        # Stop accepting, but never close the servers: a socket accepted in the last
        # wake-up gets its transport in a task that has not run yet, and a closed
        # server drops it without a greeting (asyncio says so only in debug mode).
        # Two turns of the loop let those tasks start their sessions, so that
        # _finish_sessions sees them. The process exit closes the listeners.
        for listener in self.listeners:
            loop.remove_reader(listener.sock.fileno())
        for _ in range(2):
            await asyncio.sleep(0)
        await self._finish_sessions()
        heartbeat.cancel()
        for service in running.values():
            await service.close()
        login.close()

    async def _start_services(self, loop: asyncio.AbstractEventLoop,
                              login: LoginChecker) -> dict[str, RunningService]:
        """Start the service of each listener and accept on it; WorkerBootError if not."""
        context = WorkerContext(self.worker_id, self.config, self.hooks, self.notify,
                                tls=self.credentials.tls, login=login)
        running: dict[str, RunningService] = {}
        for listener in self.listeners:
            service = self.services[listener.address.service]
            if service.family not in running:
                try:
                    running[service.family] = service.start(context)
                except Exception as e:
                    raise WorkerBootError(f"the {service.name} service") from e
            factory = functools.partial(self._new_session, running[service.family],
                                        listener.address)
            try:
                await loop.create_server(factory, sock=listener.sock, backlog=ACCEPT_BATCH)
                # create_server shrank the kernel's queue to the batch
                listener.sock.listen(LISTEN_BACKLOG)
            except Exception as e:
                raise WorkerBootError(f"listener {listener.address}") from e
        return running

    @staticmethod
    def _schedule_log_flush(loop: asyncio.AbstractEventLoop) -> None:
        try:   # from any thread (the commit thread logs too)
            loop.call_soon_threadsafe(loop.call_later, logs.BATCH_S, logs.flush_pending)
        except RuntimeError:
            pass   # the loop is closed; the process flushes as it exits

    def _broke(self, why: object) -> None:
        log.error("worker %d is short of resources (%s): retiring it", self.worker_id, why)
        self.stop(RETIRE)

    @staticmethod
    def _loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's reports, in our log. Running out of descriptors or buffers is a
        known condition (asyncio retries the accept a second later): one line, no
        traceback."""
        error = context.get("exception")
        message = context.get("message", "event loop error")
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            log.warning("%s: %s; retrying", message, error.strerror)
        else:
            log.error("%s", message, exc_info=error)

    def _beat(self) -> None:
        self.scoreboard.beat(self.slot, self.hooks.messages, self.sessions_served,
                             self.hooks.sessions_per_family())

    def _new_session(self, service: RunningService, listener: ListenAddress) -> asyncio.Protocol:
        self.sessions_served += 1
        if self.sessions_served == 1:
            self._beat()   # from now on a death is not a start-up failure
        if self.max_sessions and self.sessions_served >= self.max_sessions:
            log.info("worker %d retiring after %d sessions", self.worker_id, self.sessions_served)
            self.stop(RETIRE)
        return service.new_session(listener)

    def stop(self, mode: str) -> None:
        # A later, harder request wins: retire < graceful < fast.
        if STOP_MODES.index(mode) > STOP_MODES.index(self._mode):
            self._mode = mode
        if mode == RETIRE and not self._told_master:
            self._tell_master_retiring()
        if self._stop is not None:
            self._stop.set()

    def _tell_master_retiring(self) -> None:
        self._told_master = True
        if self.status is not None:
            try:
                self.status.send(b"retiring %d" % os.getpid())
            except OSError:
                pass   # the master will see the exit instead

    async def _finish_sessions(self) -> None:
        if self._mode == RETIRE:
            # Retiring (reload, recycling, master gone): sessions end by themselves.
            await self._wait_for_sessions(self.config.graceful_timeout_s, RETIRE)
        if self._mode in (RETIRE, GRACEFUL):
            for session in list(self.hooks.sessions):
                session.shutdown()   # 421 now if idle, after its transaction otherwise
            await self._wait_for_sessions(self.config.graceful_timeout_s, GRACEFUL)
        for session in list(self.hooks.sessions):
            session.abort()
        await asyncio.sleep(0)   # let connection_lost callbacks run

    async def _wait_for_sessions(self, timeout_s: float, mode: str) -> None:
        deadline = time.monotonic() + timeout_s
        while self.hooks.sessions and time.monotonic() < deadline and self._mode == mode:
            self._show_title()
            await asyncio.sleep(0.05)

    async def _heartbeat(self) -> None:
        next_rss_check = time.monotonic() + RSS_CHECK_S
        process = psutil.Process()
        while True:
            self._beat()
            self.hooks.refresh()
            self._show_title()
            if os.getppid() != self.master_pid and not self._mode:
                log.warning("worker %d: master is gone, finishing sessions", self.worker_id)
                self.stop(RETIRE)
            if self.config.max_worker_rss_bytes and time.monotonic() >= next_rss_check:
                next_rss_check = time.monotonic() + RSS_CHECK_S
                rss = process.memory_info().rss
                if rss > self.config.max_worker_rss_bytes:
                    log.info("worker %d retiring: RSS %d > max_worker_rss", self.worker_id, rss)
                    self.stop(RETIRE)
            await asyncio.sleep(HEARTBEAT_S)

    def _show_title(self) -> None:
        title = (f"ccsmtp: worker {self.worker_id} [{len(self.hooks.sessions)} sessions, "
                 f"{self.hooks.messages} msgs]")
        if title != self._title:
            setproctitle(title)
            self._title = title
