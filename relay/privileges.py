"""Giving root up: the workers run as ``server.user`` / ``server.group``.

Why: port 25 needs root (or CAP_NET_BIND_SERVICE), but nothing that talks to the
internet should run as root. As in Postfix (``master`` stays root, ``smtpd`` runs as
``mail_owner``), the supervisor stays root and never reads a byte from the network; each
worker gives root up as the very first thing it does after the fork, before it opens the
spool, a log or accepts a connection. The listening sockets it needs were bound by the
supervisor just before that fork (``relay.inbound.listener.hand_over``), so a worker that
is restarted after a crash gets its port-25 socket without any privilege.

Contract:

- ``resolve(user, group)``: the ``Identity`` to become, or None when both are "" (no
  change). ``group`` "" means the user's primary group. ValueError naming what is
  unknown (the config turns it into an error naming the key).
- ``switch_problem(identity)``: why this process cannot become ``identity`` (it is not
  root and not already that user), or None.
- ``drop_privileges(identity)``: supplementary groups, then the gid, then the uid, in
  that order (once the uid is gone, the groups can no longer be changed), each real,
  effective and saved (``setres[ug]id``), then a check that root cannot be regained.
  A no-op when the process already is ``identity``. Raises ``PrivilegeError``.

This module imports nothing of relay: the config validates names with it.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

__all__ = ["Identity", "PrivilegeError", "drop_privileges", "lookup_group", "lookup_user",
           "resolve", "switch_problem"]


class PrivilegeError(Exception):
    """The process could not become the configured user, or could become root again."""


@dataclass(frozen=True)
class Identity:
    """Who the workers run as. ``uid`` None: only the group changes."""

    user: str
    uid: int | None
    group: str
    gid: int
    #: Supplementary groups (the user's, from the group database, read once at start so
    #: a worker restarted later needs no lookup).
    groups: tuple[int, ...]

    def describe(self) -> str:
        """``server.user "relay" (uid 998, gid 998)`` for error messages."""
        if self.uid is None:
            return f'server.group "{self.group}" (gid {self.gid})'
        return f'server.user "{self.user}" (uid {self.uid}, gid {self.gid})'


def lookup_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of ``name`` (or of a numeric uid); ValueError if there is none."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if name.isascii() and name.isdigit():
        try:
            return pwd.getpwuid(int(name))
        except KeyError:
            pass
    raise ValueError(f'no such user "{name}" on this machine (see getent passwd)')


def lookup_group(name: str) -> grp.struct_group:
    """The group entry of ``name`` (or of a numeric gid); ValueError if there is none."""
    try:
        return grp.getgrnam(name)
    except KeyError:
        pass
    if name.isascii() and name.isdigit():
        try:
            return grp.getgrgid(int(name))
        except KeyError:
            pass
    raise ValueError(f'no such group "{name}" on this machine (see getent group)')


def resolve(user: str, group: str) -> Identity | None:
    """The identity ``server.user``/``server.group`` name, None for "no change"."""
    if not user and not group:
        return None
    gid = lookup_group(group).gr_gid if group else None
    if not user:
        assert gid is not None
        return Identity("", None, group, gid, (gid,))
    entry = lookup_user(user)
    if gid is None:
        gid = entry.pw_gid
        group = _group_name(gid)
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    return Identity(entry.pw_name, entry.pw_uid, group, gid, groups)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _already(identity: Identity) -> bool:
    uid_ok = identity.uid is None or os.getresuid() == (identity.uid,) * 3
    return uid_ok and os.getresgid() == (identity.gid,) * 3


def switch_problem(identity: Identity) -> str | None:
    """None when this process can become ``identity`` (it is root, or already it)."""
    if os.geteuid() == 0 or _already(identity):
        return None
    me = pwd.getpwuid(os.geteuid()).pw_name if _has_uid(os.geteuid()) else str(os.geteuid())
    return (f"the relay runs as uid {os.geteuid()} ({me}), not as root, so it cannot switch "
            f"to {identity.describe()}: start it as root, or remove the setting "
            "(see README.md, Deploy)")


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def drop_privileges(identity: Identity) -> None:
    """Become ``identity`` for good (see the module docstring)."""
    if _already(identity):
        return
    try:
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        if identity.uid is not None:
            os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot switch to {identity.describe()}: "
                             f"{e.strerror or e}") from None
    _verify(identity)


def _verify(identity: Identity) -> None:
    """Every id is the new one, and asking for root back fails."""
    if os.getresgid() != (identity.gid,) * 3 or set(os.getgroups()) - set(identity.groups):
        raise PrivilegeError(f"the groups did not change to {identity.describe()}")
    if identity.uid is None:
        return
    if os.getresuid() != (identity.uid,) * 3:
        raise PrivilegeError(f"the uid did not change to {identity.describe()}")
    if identity.uid == 0:
        return
    regains = [lambda: os.setuid(0), lambda: os.seteuid(0)]
    if identity.gid != 0:
        regains.append(lambda: os.setgid(0))
    for regain in regains:
        try:
            regain()
        except PermissionError:
            continue
        raise PrivilegeError(f"root could be regained after switching to "
                             f"{identity.describe()}")
