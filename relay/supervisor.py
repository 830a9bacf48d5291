"""The supervisor: forks the workers, restarts the ones that die, relays signals.

It holds no LMDB environment and no trio loop, so a fork never copies anything a child
must not inherit. It binds each worker's listening sockets (SO_REUSEPORT, one set per
worker) just before forking that worker and closes its own copies right after: the
child takes them over (``relay.inbound.listener.hand_over``), so the supervisor never
holds a listening socket while the relay runs, a dead worker's share of new connections
goes to the others, and a restarted worker gets its sockets from a process that can
still bind port 25. It waits for signals synchronously with
``sigtimedwait`` (SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1 blocked and collected), which
keeps the control flow a plain loop.

- A worker that exits while the relay is running is restarted after a backoff that
  doubles (``server.restart_backoff_min`` .. ``_max``) while workers keep dying young, and
  resets after one has lived a minute.
- SIGTERM/SIGINT: forwarded to every worker; after ``server.shutdown_timeout`` plus a
  margin, stragglers get SIGKILL. Exit status 0 when the workers stopped cleanly.
- SIGHUP: the file is validated first; an invalid one is logged (naming the key) and
  nothing else happens. A valid one is forwarded to the workers, which reload it.
- SIGUSR1: forwarded to the workers, which reopen their log files (logrotate).
- A worker that exits with status 78 (EX_CONFIG: a ConfigError escaped it) in its first
  ``STABLE_AFTER`` seconds could not start, and a restart would fail the same way: its
  error is logged once, the other workers are stopped, and ``run`` returns 78. (The
  worker does not report readiness to the supervisor; today a ConfigError escapes it
  only during start-up, since a failed reload is logged and the running config stays.)

Before forking, ``run`` takes ``<spool>/relay.lock`` (``flock``, non-blocking, our pid
written into it) so that a second relay on the same spool refuses to start, as Postfix
does; the workers inherit the descriptor, so the lock is held while any process of this
relay lives, and the kernel drops it when the last one dies (a stale file from a killed
relay blocks nothing; when the pid in it is dead but the lock is held, its workers are
given ``DYING_GRACE`` seconds to finish dying). ``relay queue`` does not take it. Then
each ``inbound.listen`` address is bound once and closed (``relay.preflight.probe_listen``).
Either failure raises ``StartupError`` before any worker exists.

Privileges (``server.user``/``server.group``, ``relay.privileges``): the supervisor stays
root; each forked child gives root up before it runs any worker code. Before the first
fork, as root, the supervisor makes the relay's own files the user's: every entry of the
spool directory owned by root is given to user:group (a root-owned entry is what an
earlier root run, ``relay queue`` as root or this start created; an entry of some third
user is refused, naming it), and each log file is created (mode 0640) or, when root owns
it, given to the user; the log directories are left alone. Then a child that has
dropped to the user runs ``preflight`` and reads the config file (the workers re-read
it on SIGHUP): whatever the user could not open is a ``StartupError`` naming the key,
the path and the user. A relay not started as root with ``server.user`` set refuses to
start, unless it already runs as that user (systemd ``User=``), which is a no-op. The
identity is fixed at start: a SIGHUP that changes it is logged as needing a restart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config, ConfigError, reload_config
from relay.http.metrics import write_supervisor_snapshot
from relay.inbound.listener import bind_listeners, hand_over
from relay.model import ascii_int
from relay.preflight import StartupError, preflight, probe_listen
from relay.privileges import (
    Identity,
    PrivilegeError,
    drop_privileges,
    lookup_group,
    lookup_user,
    resolve,
    switch_problem,
)
from relay.spool import pid_alive

__all__ = ["Supervisor"]

log = logging.getLogger("relay.supervisor")

HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
STABLE_AFTER = 60.0
KILL_MARGIN = 5.0
EX_TEMPFAIL, EX_CONFIG = 75, 78
LOCK_FILE = "relay.lock"
#: How long a new relay waits for the workers of a relay whose supervisor has died.
DYING_GRACE = 5.0


@dataclass
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    backoff: float = 0.0
    restart_at: float | None = None
    #: Read end of the pipe on which the worker reports a ConfigError before exiting 78.
    error_fd: int = -1


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
        self.exit_code = 0
        #: Restarts of each worker (after it died), for ``GET /metrics``.
        self.restarts = {i: 0 for i in range(self.nworkers)}
        #: Who the workers run as (``server.user``/``group`` at start), None: unchanged.
        self.identity: Identity | None = None

    def run(self) -> int:
        """Lock the spool, probe the listening addresses, then fork and supervise the
        workers until they have stopped. Raises StartupError when it cannot start."""
        source = self.config_path or "config"
        self.identity = worker_identity(self.config, source)
        lock_fd = lock_spool(self.config.spool.path)
        try:
            if self.identity is not None and self.identity.uid not in (None, 0):
                problems = give_files(self.identity, self.config, source)
                problems = problems or probe_as(self.identity, self.config, self.config_path,
                                                source)
                if problems:
                    raise StartupError(problems, EX_CONFIG)
            problems = probe_listen(self.config, source)
            if problems:
                raise StartupError(problems, EX_CONFIG)
            return self._supervise()
        finally:
            for slot in self.slots:
                _close_error_fd(slot)
            os.close(lock_fd)

    def _supervise(self) -> int:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            for slot in self.slots:
                self._spawn(slot, old_mask)
            log.info("supervisor %d: %d workers started", os.getpid(), self.nworkers)
            write_supervisor_snapshot(self.config.spool.path, self.restarts)
            while True:
                timeout = self._next_timeout()
                info = signal.sigtimedwait(HANDLED, timeout)
                if info is not None:
                    self._on_signal(info.si_signo)
                self._reap()
                if self.stopping:
                    if not any(s.pid for s in self.slots):
                        log.info("supervisor: all workers stopped")
                        return self.exit_code
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
            self._stop()
        elif signo == signal.SIGHUP and not self.stopping:
            self._reload()
        elif signo == signal.SIGUSR1:
            # logrotate moved the log files: the workers reopen theirs (the supervisor
            # writes only to the process log, which is not reopened).
            for slot in self.slots:
                if slot.pid:
                    _kill(slot.pid, signal.SIGUSR1)

    def _stop(self) -> None:
        self.stopping = True
        self.kill_at = time.monotonic() + self.config.server.shutdown_timeout + KILL_MARGIN
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid:
                _kill(slot.pid, signal.SIGTERM)

    def _reload(self) -> None:
        if not self.config_path:
            log.warning("reload: no config file to reload")
            return
        new = reload_config(self.config_path, log)
        if new is None:
            return
        # What would stop a (re)started worker (a TLS or DKIM key that does not load)
        # keeps the running config, as a syntax error does.
        problems = preflight(new, str(self.config_path), dry_run=True)
        if problems:
            for problem in problems:
                log.error("reload failed, keeping the running config: %s", problem)
            return
        if new.server.resolved_workers() != self.nworkers:
            log.warning("reload: server.workers changes need a restart")
        if (new.server.user, new.server.group) != (self.config.server.user,
                                                   self.config.server.group):
            log.warning("reload: server.user and server.group changes need a restart")
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
            error = _read_error(slot)
            how = _describe(status)
            if self.stopping:
                log.info("worker %d (pid %d) %s", slot.index, pid, how)
                continue
            lived = time.monotonic() - slot.started
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EX_CONFIG:
                if lived < STABLE_AFTER:
                    # It could not start; restarting cannot help. Stop the relay.
                    log.error("worker %d (pid %d) could not start: %s; stopping", slot.index,
                              pid, error or "configuration error (exit status 78)")
                    self.exit_code = EX_CONFIG
                    self._stop()
                    continue
                how = f"{how}: {error}" if error else how
            cfg = self.config.server
            if lived >= STABLE_AFTER:
                slot.backoff = cfg.restart_backoff_min
            else:
                slot.backoff = min(max(slot.backoff * 2, cfg.restart_backoff_min),
                                   cfg.restart_backoff_max)
            slot.restart_at = time.monotonic() + slot.backoff
            log.error("worker %d (pid %d) %s; restarting in %.1fs", slot.index, pid, how,
                      slot.backoff)
            self.restarts[slot.index] = self.restarts.get(slot.index, 0) + 1
            write_supervisor_snapshot(self.config.spool.path, self.restarts)

    def _restart_due(self, old_mask: set[signal.Signals]) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                self._spawn(slot, old_mask)

    def _spawn(self, slot: _Slot, old_mask: set[signal.Signals]) -> None:
        _close_error_fd(slot)
        try:
            sockets = bind_worker_sockets(self.config)
        except OSError as e:  # e.g. the port was taken while the worker was down
            slot.backoff = min(max(slot.backoff * 2, self.config.server.restart_backoff_min),
                               self.config.server.restart_backoff_max)
            slot.restart_at = time.monotonic() + slot.backoff
            log.error("worker %d: cannot listen: %s; trying again in %.1fs", slot.index,
                      e.strerror or e, slot.backoff)
            return
        error_r, error_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except BaseException:
            os.close(error_r)
            os.close(error_w)
            _close_sockets(sockets)
            raise
        if pid == 0:  # the child
            code = 0
            try:
                os.close(error_r)
                for other in self.slots:
                    _close_error_fd(other)
                # A SIGUSR1 or SIGHUP sent before the worker listens for it must not kill
                # it (their default action): ignored until the worker's trio loop takes
                # them over. (Its socket is listening from the start, so a test or an
                # operator may well signal a worker that is still starting.)
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                hand_over(sockets)
                if self.identity is not None:  # before any worker code runs
                    drop_privileges(self.identity)
                self.worker_main(self.config, self.config_path, slot.index, self.nworkers)
            except (ConfigError, PrivilegeError) as e:
                # The supervisor logs it (once, however many workers fail alike).
                try:
                    os.write(error_w, str(e).encode(errors="replace")[:4000])
                except OSError:
                    log.error("worker %d: %s", slot.index, e)
                code = EX_CONFIG
            except BaseException:
                log.exception("worker %d crashed", slot.index)
                code = 70  # EX_SOFTWARE
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(error_w)
        _close_sockets(sockets)  # the worker has them now
        os.set_blocking(error_r, False)
        slot.error_fd = error_r
        slot.pid = pid
        slot.started = time.monotonic()


def bind_worker_sockets(config: Config) -> dict[str, list[socket.socket]]:
    """One worker's listening sockets (``inbound``, ``http`` and ``admin`` ``listen``), by
    spec; all or none (OSError)."""
    sockets: dict[str, list[socket.socket]] = {}
    try:
        for spec in [*config.inbound.listen, *config.http.listen, *config.admin.listen]:
            sockets.setdefault(spec, []).extend(bind_listeners([spec]))
    except BaseException:
        _close_sockets(sockets)
        raise
    return sockets


def _close_sockets(sockets: dict[str, list[socket.socket]]) -> None:
    for socks in sockets.values():
        for sock in socks:
            sock.close()


def worker_identity(config: Config, source: str) -> Identity | None:
    """Who the workers become; StartupError when the names are unknown (a file checked
    at load time can meet a machine without them) or this process cannot switch."""
    server = config.server
    for key, name, lookup in (("server.user", server.user, lookup_user),
                              ("server.group", server.group, lookup_group)):
        try:
            if name:
                lookup(name)
        except ValueError as e:
            raise StartupError([f"{source}: {key}: {e}"]) from None
    identity = resolve(server.user, server.group)
    problem = switch_problem(identity) if identity is not None else None
    if problem:
        raise StartupError([f"{source}: server.user: {problem}"])
    return identity


def give_files(identity: Identity, config: Config, source: str) -> list[str]:
    """As root, before the first fork: the spool's root-owned entries and the log files
    become ``identity``'s (see the module docstring); one line per problem."""
    assert identity.uid is not None
    uid, gid = identity.uid, identity.gid
    spool = Path(config.spool.path)
    # The supervisor writes its metrics snapshot there as root: the directory must be
    # the workers' before that, or they could not write theirs.
    (spool / "metrics").mkdir(parents=True, exist_ok=True)
    problems = []
    for path in [spool, *_tree(spool)]:
        st = path.lstat()
        if st.st_uid == 0 and uid != 0:
            os.lchown(path, uid, gid)
        elif st.st_uid != uid:
            problems.append(f"{source}: spool.path: {path} belongs to uid {st.st_uid}, not to "
                            f"{identity.describe()}: chown -R "
                            f"{identity.user}:{identity.group} {spool}")
    for key, target in (("log.events", config.log.events), ("log.mail_log", config.log.mail_log)):
        if not target or target in ("-", "stderr"):
            continue
        try:
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY, 0o640)
            try:
                if os.fstat(fd).st_uid == 0 and uid != 0:
                    os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        except OSError as e:
            problems.append(f"{source}: {key}: cannot create {target}: {e.strerror or e}")
    return problems


def _tree(top: Path) -> list[Path]:
    """Everything under ``top`` (not following symbolic links)."""
    found = []
    for root, dirs, files in os.walk(top):
        found += [Path(root) / name for name in (*dirs, *files)]
    return found


def probe_as(identity: Identity, config: Config, config_path: str | None,
             source: str) -> list[str]:
    """``preflight`` and a read of the config file in a child that has become
    ``identity``: what the workers will not be able to open, one line each."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: report, never return
        code = 0
        try:
            os.close(read_fd)
            drop_privileges(identity)
            problems = preflight(config, source, dry_run=True)
            if config_path:
                try:
                    with open(config_path, "rb"):
                        pass
                except OSError as e:
                    problems.append(f"{source}: cannot read the config file (the workers "
                                    f"re-read it on SIGHUP): {e.strerror or e}")
            os.write(write_fd, "\n".join(problems).encode(errors="replace"))
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.write(write_fd, f"{source}: server.user: {e}".encode(errors="replace"))
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    return [f"{line} (as {identity.describe()})" for line in lines if line]


def lock_spool(spool_path: str) -> int:
    """Take ``<spool>/relay.lock`` (flock, non-blocking) and write our pid into it; the
    descriptor, which holds the lock. StartupError when another relay holds it."""
    path = Path(spool_path) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    except OSError as e:
        raise StartupError([f"cannot open the lock file {path}: {e.strerror}"]) from None
    dying_until = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise StartupError([f"cannot lock {path}: {e.strerror}"]) from None
        holder = _lock_holder(fd)
        pid = ascii_int(holder, max_digits=10)
        if pid is None or (pid != os.getpid() and pid_alive(pid)):
            os.close(fd)
            raise StartupError(
                [f"spool {spool_path} is in use by another relay (pid {holder})"], EX_TEMPFAIL
            )
        # Its supervisor is gone but a worker still holds the lock: after a kill -9 of
        # the whole process group the workers are still exiting (one may be finishing
        # an fdatasync). Give them a moment; orphans that keep running keep the spool.
        now = time.monotonic()
        if dying_until is None:
            dying_until = now + DYING_GRACE
        if now >= dying_until:
            os.close(fd)
            raise StartupError(
                [f"spool {spool_path} is in use by another relay (pid {holder}, which has "
                 "exited; its workers still run)"], EX_TEMPFAIL
            )
        time.sleep(0.02)
    # Write first, then cut: a reader never sees an empty file once a pid was in it
    # (the new pid ends with a newline, so its first line is always ours).
    data = f"{os.getpid()}\n".encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    return fd


def _lock_holder(fd: int, wait: float = 1.0) -> str:
    """The pid in a lock file someone else holds; it writes it just after locking, so a
    brand-new file may be empty for a moment."""
    deadline = time.monotonic() + wait
    while True:
        first = os.pread(fd, 64, 0).split(b"\n", 1)[0].strip()
        if first.isdigit():
            return first.decode()
        if time.monotonic() >= deadline:
            return "unknown"
        time.sleep(0.01)


def _read_error(slot: _Slot) -> str:
    """What the worker wrote on its error pipe before exiting (it has exited: all of it
    is there), and close the pipe."""
    if slot.error_fd < 0:
        return ""
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(slot.error_fd, 4096):
            chunks.append(chunk)
    _close_error_fd(slot)
    return b"".join(chunks).decode(errors="replace").strip()


def _close_error_fd(slot: _Slot) -> None:
    if slot.error_fd >= 0:
        os.close(slot.error_fd)
        slot.error_fd = -1


def _kill(pid: int, signo: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signo)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
