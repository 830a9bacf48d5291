"""Start-up checks: everything a worker would trip over, found before any is forked.

``preflight(config, source)`` returns one line per problem (``[]`` when the relay can
start), each naming the file and the dotted key, e.g.
``conf/relay.toml: spool.path: cannot create /x/y: Not a directory``. It starts nothing:

- ``inbound.listen``: every address has a port;
- ``inbound.tls_cert`` / ``tls_key``: each file can be read, and the pair loads
  (``relay.inbound.tls.server_ssl_context``, which the workers use);
- ``dkim.signers[].key``: each DKIM key loads and fits its ``algorithm``
  (``relay.dkim.check_keys``, the loading the intake's signing stage does);
- ``spool.path``: is a directory or can be created (mkdir -p), and a file can be created
  and removed in it;
- ``log.events`` and ``log.mail_log`` (unless "", or "-"/"stderr" for the mail log): its
  directory exists or can be created, and the file can be
  opened for appending (an existing file is never truncated; a missing one is not
  created: a probe file in its directory stands in for it).

Relative paths mean what they mean to the rest of the relay: relative to the current
directory. With ``dry_run=True`` (``relay check-config``) the directories it had to
create are removed again, so a check leaves nothing behind.

``probe_listen(config, source)`` is the one check that needs the moment of start-up:
it binds each ``inbound.listen`` address the way a worker does
(``relay.inbound.listener.bind_listeners``, SO_REUSEPORT) and closes it at once. The
supervisor runs it before forking; ``check-config`` does not, since a running relay (or
a port below 1024 for a user who cannot bind it) would say nothing about the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from relay.config import Config, ConfigError
from relay.dkim import check_keys
from relay.inbound.listener import bind_listeners, listen_address
from relay.inbound.tls import server_ssl_context

__all__ = ["StartupError", "preflight", "probe_listen"]

EX_CONFIG = 78


class StartupError(Exception):
    """The relay cannot start: one line per problem, and the exit status to use."""

    def __init__(self, problems: list[str], code: int = EX_CONFIG) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.code = code


def preflight(config: Config, source: str, *, dry_run: bool = False) -> list[str]:
    """Every problem that would stop the workers from starting, one line each."""
    problems: list[str] = []
    made: list[Path] = []
    try:
        for i, spec in enumerate(config.inbound.listen):
            try:
                listen_address(spec)
            except ValueError as e:
                problems.append(f"{source}: inbound.listen[{i}]: {e}")
        problems += _check_tls(config, source)
        problems += check_keys(config, source)
        problem = _check_spool(config.spool.path, made)
        if problem:
            problems.append(f"{source}: spool.path: {problem}")
        for key, path in (("log.events", config.log.events),
                          ("log.mail_log", config.log.mail_log)):
            if path and path not in ("-", "stderr"):
                problem = _check_events(path, made)
                if problem:
                    problems.append(f"{source}: {key}: {problem}")
    finally:
        if dry_run:
            for d in reversed(made):
                with contextlib.suppress(OSError):  # not empty: someone else uses it now
                    d.rmdir()
    return problems


def probe_listen(config: Config, source: str) -> list[str]:
    """Bind (and at once close) each listening address as a worker would."""
    problems = []
    addresses = [("inbound.listen", config.inbound.listen), ("http.listen", config.http.listen),
                 ("admin.listen", config.admin.listen)]
    for key, specs in addresses:
        for i, spec in enumerate(specs):
            try:
                for sock in bind_listeners([spec]):
                    sock.close()
            except ValueError as e:  # no port: preflight reports it too
                problems.append(f"{source}: {key}[{i}]: {e}")
            except OSError as e:
                problems.append(
                    f"{source}: {key}[{i}]: cannot listen on {spec}: {_reason(e)}"
                )
    return problems


def _check_tls(config: Config, source: str) -> list[str]:
    inbound = config.inbound
    if not inbound.tls_cert:
        return []
    problems = []
    for key in ("tls_cert", "tls_key"):
        path = getattr(inbound, key)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            problems.append(f"{source}: inbound.{key}: cannot read {path}: {_reason(e)}")
    if problems:
        return problems
    try:
        server_ssl_context(inbound, source)
    except ConfigError as e:
        return [str(e)]
    return []


def _check_spool(path: str, made: list[Path]) -> str | None:
    problem = _makedirs(Path(path), made)
    if problem:
        return problem
    failed = _probe_file(Path(path))
    if failed is None:
        return None
    step, e = failed
    return f"cannot {step} files in {path}: {_reason(e)}"


def _probe_file(directory: Path) -> tuple[str, OSError] | None:
    """Create and remove a probe file in ``directory``: None, or the step that failed
    ("create" or "remove") and why."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=directory)
    except OSError as e:
        return "create", e
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError as e:
        return "remove", e
    return None


def _check_events(path: str, made: list[Path]) -> str | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        return f"cannot open {path}: {_reason(e)}"
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return f"{path} is a directory"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY))
        except OSError as e:
            return f"cannot open {path} for appending: {_reason(e)}"
        return None
    parent = Path(path).parent
    problem = _makedirs(parent, made)
    if problem:
        return problem
    failed = _probe_file(parent)
    if failed is not None and failed[0] == "create":  # a leftover probe harms nothing
        return f"cannot create {path}: {_reason(failed[1])}"
    return None


def _makedirs(path: Path, made: list[Path]) -> str | None:
    """mkdir -p, top down, recording each directory it created; a problem or None."""
    for d in [*reversed(path.parents), path]:
        try:
            st = os.stat(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            return f"cannot create {path}: {_reason(e)}"
        else:
            if stat.S_ISDIR(st.st_mode):
                continue
            if d == path:
                return f"{path} exists and is not a directory"
            return f"cannot create {path}: {os.strerror(errno.ENOTDIR)}"
        try:
            os.mkdir(d)
        except OSError as e:
            if isinstance(e, FileExistsError) and d.is_dir():  # a concurrent mkdir
                continue
            return f"cannot create {path}: {_reason(e)}"
        made.append(d)
    return None


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
