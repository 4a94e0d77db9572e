"""The master: supervises the worker processes and the delivery process.

Owns: forking workers and the delivery process, reaping them, replacing the dead,
killing the hung (no heartbeat for worker_timeout), throttling workers that die at
start-up, and the signals of SPEC §4 (TERM/INT graceful stop, QUIT fast stop, HUP
reload, TTIN/TTOU scale, USR1 reopen logs). The loop is gunicorn's arbiter: sleep
until a signal or a second passes, then reap, murder, manage.
Must not: speak SMTP, or do work in a signal handler (handlers only queue the
signal; a wake-up byte ends the sleep).
Runs unprivileged: root was dropped before the master was made.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import time
from typing import Callable, Mapping

from setproctitle import setproctitle

from .. import config as configuration
from .. import credentials, logs
from ..config import Config
from ..layout import DEFAULT_SPOOL
from ..service import Service
from ..store.delivery import Delivery
from .listeners import Listener
from .scoreboard import DELIVERY, WORKER
from .shared import SharedMemory
from .worker import WORKER_BOOT_ERROR, Worker

log = logging.getLogger("ccsmtp.master")

SLEEP_S = 1.0
QUICK_DEATH_S = 2.0        # a child that dies sooner than this failed to start
MAX_QUICK_DEATHS = 10      # in a row: stop instead of fork-looping
KILL_GRACE_S = 5.0         # past graceful_timeout, before SIGKILL
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)


class MasterError(Exception):
    pass


@dataclasses.dataclass
class Child:
    pid: int
    slot: int
    kind: int               # scoreboard.WORKER or scoreboard.DELIVERY
    worker_id: int          # the worker's number (0 for delivery)
    generation: int
    started: float          # time.monotonic()
    retiring: bool = False
    killed: bool = False    # we sent SIGKILL (hung), so its death is not a start-up failure

    @property
    def role(self) -> str:
        return f"worker {self.worker_id}" if self.kind == WORKER else "delivery"


class Master:
    def __init__(self, config: Config, listeners: list[Listener], services: Mapping[str, Service],
                 loaded: credentials.Credentials, shared: SharedMemory,
                 reload_config: Callable[[], Config]):
        self.config = config
        self.listeners = listeners
        self.services = services
        self.credentials = loaded
        self.shared = shared
        self.scoreboard = shared.scoreboard
        self.anvil = shared.anvil
        self.reload_config = reload_config
        self.pid = os.getpid()
        self.num_workers = config.workers
        self.generation = 0
        self.children: dict[int, Child] = {}
        self.signals: list[int] = []
        self.quick_deaths = 0
        self.next_spawn_at = 0.0
        self.stop_mode: str | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        # Workers tell delivery "something is queued" through this datagram pair.
        self.notify_send, self.notify_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Children tell the master "I am retiring" here, as Postfix's status pipe, so
        # that a replacement starts at once instead of when the retiree exits.
        self.status_recv, self.status_send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for sock in (self._wakeup_r, self._wakeup_w, self.notify_send, self.status_recv,
                     self.status_send):
            sock.setblocking(False)

    # --- the loop -------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self._set_title()
        log.info("master started: %d worker(s) on %s, spool %s", self.num_workers,
                 ", ".join(str(a) for a in self.config.listen), self.config.spool_dir)
        try:
            while self.stop_mode is None:
                self.manage_delivery()
                self.manage_workers()
                self.sleep()
                self.handle_signals()
                self.reap_children()
                self.murder_workers()
        except MasterError as e:
            log.critical("%s", e)
            self.stop_mode = "fast"
            self.stop()
            return 1
        return self.stop()

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum: int, frame: object) -> None:
        # NO LOGGING, just queue the signal (gunicorn #3198): the loop does the work.
        self.signals.append(signum)

    def sleep(self, timeout: float = SLEEP_S) -> None:
        try:
            ready, _, _ = select.select([self._wakeup_r, self.status_recv], [], [], timeout)
        except InterruptedError:
            return
        if self._wakeup_r in ready:
            try:
                while self._wakeup_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        if self.status_recv in ready:
            self.read_status()

    def read_status(self) -> None:
        """'retiring PID' from a child: count it out now and start its successor."""
        while True:
            try:
                message = self.status_recv.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            words = message.split()
            if len(words) == 2 and words[0] == b"retiring" and words[1].isdigit():
                child = self.children.get(int(words[1]))
                if child is not None:
                    child.retiring = True

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_mode = "graceful"
            elif signum == signal.SIGQUIT:
                self.stop_mode = "fast"
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self.num_workers += 1
                log.info("SIGTTIN: %d worker(s)", self.num_workers)
            elif signum == signal.SIGTTOU:
                self.num_workers = max(1, self.num_workers - 1)
                log.info("SIGTTOU: %d worker(s)", self.num_workers)
            elif signum == signal.SIGUSR1:
                logs.reopen()
                self._signal_all(signal.SIGUSR1)
                log.info("SIGUSR1: log file reopened")

    # --- children -----------------------------------------------------------------------

    def workers(self, current_only: bool = True) -> list[Child]:
        return [c for c in self.children.values() if c.kind == WORKER
                and not (current_only and (c.retiring or c.generation != self.generation))]

    def manage_workers(self) -> None:
        active = sorted(self.workers(), key=lambda c: c.worker_id)
        while len(active) > self.num_workers:
            newest = active.pop()
            self._retire(newest)
        missing = self.num_workers - len(active)
        if missing > 0 and time.monotonic() >= self.next_spawn_at:
            used = {c.worker_id for c in active}
            for worker_id in [i for i in range(1, self.num_workers + missing + 1) if i not in used][:missing]:
                self.spawn_worker(worker_id)
        self._set_title()

    def manage_delivery(self) -> None:
        alive = [c for c in self.children.values() if c.kind == DELIVERY
                 and not c.retiring and c.generation == self.generation]
        if not alive and time.monotonic() >= self.next_spawn_at:
            self.spawn_delivery()

    def spawn_worker(self, worker_id: int) -> None:
        def body(slot: int) -> int:
            return Worker(worker_id, slot, self.config, self.listeners, self.services,
                          self.credentials, self.shared, self.notify_send,
                          self.status_send, self.pid).run()
        self._fork(WORKER, worker_id, body)

    def spawn_delivery(self) -> None:
        def body(slot: int) -> int:
            for listener in self.listeners:
                listener.sock.close()   # delivery never accepts connections
            def heartbeat(delivered: int) -> None:
                # Copies delivered count as served: a delivery process killed from
                # outside after its first delivery did not fail to start (_after_death).
                self.scoreboard.beat(slot, delivered, served=delivered)
            return Delivery(self.config, self.notify_recv, heartbeat, self.pid).run()
        self._fork(DELIVERY, 0, body)

    def _fork(self, kind: int, worker_id: int, body: Callable[[int], int]) -> None:
        slot = self.scoreboard.free_slot({c.slot for c in self.children.values()})
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._leave_master_behind()
                code = body(slot)
            except BaseException:
                log.exception("child process failed")
            finally:
                logs.unbatch()
                logging.shutdown()
                os._exit(code)
        self.scoreboard.claim(slot, pid, kind, worker_id, self.generation)
        child = Child(pid, slot, kind, worker_id, self.generation, time.monotonic())
        self.children[pid] = child
        log.debug("started %s, pid %d", child.role, pid)

    def _leave_master_behind(self) -> None:
        """In a new child: drop the master's signal handling and its wake-up pipe."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self._wakeup_r.close()
        self._wakeup_w.close()
        self.status_recv.close()

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            served = self.scoreboard.read(child.slot).served
            self.scoreboard.release(child.slot)
            self.anvil.wipe(child.slot)
            self._after_death(child, status, served)

    def _after_death(self, child: Child, status: int, served: int = 0) -> None:
        what = child.role
        code = os.waitstatus_to_exitcode(status)
        if code == WORKER_BOOT_ERROR:
            raise MasterError(f"{what} could not start (exit {code}; its error is above): "
                              "stopping, as another would fail the same way")
        if child.retiring or self.stop_mode is not None:
            log.debug("%s (pid %d) exited", what, child.pid)
            return
        uptime = time.monotonic() - child.started
        if code == 0:   # retired by itself (recycling, memory) without telling us first
            log.info("%s (pid %d) retired after %.1f s; replacing it", what, child.pid, uptime)
            return
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        log.warning("%s (pid %d) died: %s after %.1f s; replacing it", what, child.pid, how, uptime)
        # As Postfix: only a child that dies before serving its first client failed to
        # start; one killed from outside (kill -9, the OOM killer) after serving did not.
        if uptime < QUICK_DEATH_S and not child.killed and not served:
            self.quick_deaths += 1
            if self.quick_deaths >= MAX_QUICK_DEATHS:
                raise MasterError(f"{MAX_QUICK_DEATHS} processes in a row died at start-up; "
                                  "giving up (see the log above)")
            # Back off 0.1 s, 0.2 s, ... up to 5 s between attempts.
            self.next_spawn_at = time.monotonic() + min(5.0, 0.1 * 2 ** self.quick_deaths)
        else:
            self.quick_deaths = 0

    def murder_workers(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            info = self.scoreboard.read(child.slot)
            if child.killed or now - info.heartbeat <= self.config.worker_timeout_s:
                continue
            log.error("pid %d (slot %d) sent no heartbeat for %.0f s: killing it", child.pid,
                      child.slot, now - info.heartbeat)
            child.killed = True
            self._kill(child.pid, signal.SIGKILL)

    def _retire(self, child: Child) -> None:
        child.retiring = True
        self._kill(child.pid, signal.SIGUSR2 if child.kind == WORKER else signal.SIGTERM)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            self._kill(pid, sig)

    # --- reload and stop ----------------------------------------------------------------

    def reload(self) -> None:
        try:
            new = self.reload_config()
        except configuration.ConfigError as e:
            log.error("SIGHUP: reload failed, keeping the running configuration: %s", e)
            return
        # spool_group too: the spool's group was set as root at start.
        fixed = ("listen", "user", "group", "spool_dir", "spool_group")
        changed = [name for name in fixed if getattr(new, name) != getattr(self.config, name)]
        if changed:
            log.warning("SIGHUP: %s cannot change without a restart; keeping the old value(s)",
                        ", ".join(changed))
            new = dataclasses.replace(new, **{name: getattr(self.config, name) for name in changed})
        logs.set_level(new.log_level)
        self.credentials = credentials.reload(new, self.credentials)
        self.config = new
        self.num_workers = new.workers
        self.generation += 1
        old = list(self.children.values())
        # New processes first, so no connection finds nobody accepting; the new
        # delivery waits for the old one's lock, so the two never overlap.
        self.next_spawn_at = 0.0
        self.manage_delivery()
        self.manage_workers()
        for child in old:
            self._retire(child)
        log.info("SIGHUP: configuration reloaded; %d new worker(s) took over", self.num_workers)

    def stop(self) -> int:
        fast = self.stop_mode == "fast"
        log.info("%s stop: stopping %d worker(s)", "fast" if fast else "graceful",
                 len(self.workers(current_only=False)))
        setproctitle(f"ccsmtp: master [{'fast' if fast else 'graceful'} stop]{self._spool_mark()}")
        for listener in self.listeners:
            listener.sock.close()
        worker_signal = signal.SIGQUIT if fast else signal.SIGTERM
        for child in self.workers(current_only=False):
            self._kill(child.pid, worker_signal)
        self._wait_for(lambda c: c.kind == WORKER, self.config.graceful_timeout_s)
        # Only now stop delivery: every message the workers acknowledged is queued.
        delivery_signal = signal.SIGQUIT if fast else signal.SIGTERM
        for child in list(self.children.values()):
            self._kill(child.pid, delivery_signal)
        self._wait_for(lambda c: True, self.config.graceful_timeout_s)
        log.info("master stopped")
        return 0

    def _wait_for(self, which: Callable[[Child], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s + KILL_GRACE_S
        while any(which(c) for c in self.children.values()):
            if time.monotonic() > deadline:
                for child in [c for c in self.children.values() if which(c)]:
                    log.warning("pid %d did not stop in time: killing it", child.pid)
                    self._kill(child.pid, signal.SIGKILL)
                deadline = float("inf")
            self.sleep(0.1)
            if signal.SIGQUIT in self.signals:   # a fast stop overrides a graceful one
                self._signal_all(signal.SIGQUIT)
            self.signals.clear()
            self.reap_children()

    def _set_title(self) -> None:
        listen = " ".join(str(a) for a in self.config.listen)
        setproctitle(f"ccsmtp: master -w {self.num_workers} {listen}{self._spool_mark()}")

    def _spool_mark(self) -> str:
        """The end of the title, ' -s SPOOL', unless the spool is the default:
        ccsmtp-status finds each instance's spool there, the one place of a process
        that dropped root which its own user can still read (tools/status.py)."""
        spool = self.config.spool_dir
        return "" if spool == DEFAULT_SPOOL else f" -s {spool}"

