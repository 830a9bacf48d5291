"""The supervisor: forks the workers, restarts the ones that die, relays signals.

It holds no sockets, no LMDB environment and no trio loop, so a fork never copies
anything a child must not inherit. It waits for signals synchronously with
``sigtimedwait`` (SIGCHLD, SIGTERM, SIGINT, SIGHUP blocked and collected), which keeps the
control flow a plain loop.

- A worker that exits while the relay is running is restarted after a backoff that
  doubles (``server.restart_backoff_min`` .. ``_max``) while workers keep dying young, and
  resets after one has lived a minute.
- SIGTERM/SIGINT: forwarded to every worker; after ``server.shutdown_timeout`` plus a
  margin, stragglers get SIGKILL. Exit status 0 when the workers stopped cleanly.
- SIGHUP: the file is validated first; an invalid one is logged (naming the key) and
  nothing else happens. A valid one is forwarded to the workers, which reload it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Config, ConfigError, reload_config

__all__ = ["Supervisor"]

log = logging.getLogger("relay.supervisor")

HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STABLE_AFTER = 60.0
KILL_MARGIN = 5.0


@dataclass
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    backoff: float = 0.0
    restart_at: float | None = None


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        worker_main: Callable[[Config, str | None, int, int], None],
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.worker_main = worker_main
        self.nworkers = config.server.resolved_workers()
        self.slots = [_Slot(i) for i in range(self.nworkers)]
        self.stopping = False
        self.kill_at = math.inf

    def run(self) -> int:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            for slot in self.slots:
                self._spawn(slot, old_mask)
            log.info("supervisor %d: %d workers started", os.getpid(), self.nworkers)
            while True:
                timeout = self._next_timeout()
                info = signal.sigtimedwait(HANDLED, timeout)
                if info is not None:
                    self._on_signal(info.si_signo)
                self._reap()
                if self.stopping:
                    if not any(s.pid for s in self.slots):
                        log.info("supervisor: all workers stopped")
                        return 0
                    if time.monotonic() >= self.kill_at:
                        for slot in self.slots:
                            if slot.pid:
                                log.error("worker %d (pid %d) did not stop: SIGKILL",
                                          slot.index, slot.pid)
                                _kill(slot.pid, signal.SIGKILL)
                        self.kill_at = math.inf
                else:
                    self._restart_due(old_mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _next_timeout(self) -> float:
        """Seconds until the next restart or kill deadline (at most one: reaping also
        runs on that tick, in case a SIGCHLD was coalesced)."""
        deadlines = [s.restart_at for s in self.slots if s.restart_at is not None]
        if self.stopping:
            deadlines.append(self.kill_at)
        return min(1.0, max(0.0, min(deadlines, default=math.inf) - time.monotonic()))

    def _on_signal(self, signo: int) -> None:
        if signo in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
            log.info("supervisor: %s, stopping workers", signal.Signals(signo).name)
            self.stopping = True
            self.kill_at = time.monotonic() + self.config.server.shutdown_timeout + KILL_MARGIN
            for slot in self.slots:
                slot.restart_at = None
                if slot.pid:
                    _kill(slot.pid, signal.SIGTERM)
        elif signo == signal.SIGHUP and not self.stopping:
            self._reload()

    def _reload(self) -> None:
        if not self.config_path:
            log.warning("reload: no config file to reload")
            return
        new = reload_config(self.config_path, log)
        if new is None:
            return
        if new.server.resolved_workers() != self.nworkers:
            log.warning("reload: server.workers changes need a restart")
        self.config = new
        log.info("supervisor: reloading %s", self.config_path)
        for slot in self.slots:
            if slot.pid:
                _kill(slot.pid, signal.SIGHUP)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            how = _describe(status)
            if self.stopping:
                log.info("worker %d (pid %d) %s", slot.index, pid, how)
                continue
            lived = time.monotonic() - slot.started
            cfg = self.config.server
            if lived >= STABLE_AFTER:
                slot.backoff = cfg.restart_backoff_min
            else:
                slot.backoff = min(max(slot.backoff * 2, cfg.restart_backoff_min),
                                   cfg.restart_backoff_max)
            slot.restart_at = time.monotonic() + slot.backoff
            log.error("worker %d (pid %d) %s; restarting in %.1fs", slot.index, pid, how,
                      slot.backoff)

    def _restart_due(self, old_mask: set[signal.Signals]) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                self._spawn(slot, old_mask)

    def _spawn(self, slot: _Slot, old_mask: set[signal.Signals]) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                self.worker_main(self.config, self.config_path, slot.index, self.nworkers)
            except ConfigError as e:
                log.error("worker %d: %s", slot.index, e)
                code = 78  # EX_CONFIG
            except BaseException:
                log.exception("worker %d crashed", slot.index)
                code = 70  # EX_SOFTWARE
            finally:
                logging.shutdown()
                os._exit(code)
        slot.pid = pid
        slot.started = time.monotonic()


def _kill(pid: int, signo: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signo)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
