"""A destination's limits behind one interface: node-local here, shared by a cluster of
nodes through Redis in ``relay.outbound.cluster`` (DESIGN.md, "Seams").

A destination (``relay.outbound.destination``) is paced by three things, which it only
ever reaches through these protocols:

- ``RateLimiter`` for its message rate and its connection rate: ``try_acquire()`` (never
  blocks: a transaction pipelined behind another goes only if a token is there now),
  ``acquire()`` (waits, FIFO among waiters) and ``reconfigure(rate)``: the rate THIS
  node may use now. Shaping lowers it (``PathShaping``); a shared limiter keeps the
  configured limit as the cluster's total, so shaping can only lower what one node takes.
- ``ConnectionSlots`` for ``max_connections``: ``await acquire()`` gives a ``Lease`` (or
  None when none came within a short wait: the caller looks at its state and asks again)
  that the connection holds until it ends, then ``release()``s. A lease may be
  ``revoked`` (a shared limit fell back to this node's share and the node holds more
  than that): the connection then ends after its current transaction.
- ``LimitsFactory.make(key, limits, local)`` builds a destination's ``DestinationLimits``
  from its resolved ``Limits``; ``refresh`` applies a reloaded config (SIGHUP).

The local implementation is today's: the rate limiters ARE ``TokenBucket``s (no wrapper,
so the per-message path costs exactly what it did), and the connection count is the
destination's own ``active < max_connections``: ``LocalSlots`` grants at once and keeps
no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from relay.config import Limits
from relay.outbound.throttle import TokenBucket, rate_from_config

__all__ = ["LOCAL_LIMITS", "ConnectionSlots", "DestinationLimits", "Lease", "LimitsFactory",
           "LocalLimits", "LocalSlots", "RateLimiter"]


class RateLimiter(Protocol):
    """Tokens for messages or connections (``TokenBucket`` is the local one)."""

    def try_acquire(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are there now; never blocks, never awaits."""
        ...

    async def acquire(self, n: float = 1.0) -> None:
        """Wait (FIFO among waiters) until ``n`` tokens are there, then take them."""
        ...

    def reconfigure(self, rate: float | None, burst: float | None = None) -> None:
        """The rate (per second, None: unlimited) this node may use from now on."""
        ...


class Lease(Protocol):
    """One connection's slot, held while the connection lives."""

    #: True when the connection should end after its current transaction.
    revoked: bool

    def release(self) -> None:
        """Give the slot back (idempotent; never blocks)."""
        ...


class ConnectionSlots(Protocol):
    async def acquire(self) -> Lease | None:
        """A slot, or None when none came within a short wait (ask again)."""
        ...

    def reconfigure(self, limit: int) -> None:
        """A new ``max_connections`` (SIGHUP); leases held stay valid."""
        ...


class _LocalLease:
    """The lease of a node-local limit: nothing to give back."""

    __slots__ = ()
    revoked = False

    def release(self) -> None:
        return None


_LOCAL_LEASE = _LocalLease()


class LocalSlots:
    """``max_connections`` of one node: the destination counts its own connections
    (``active``), so every request is granted at once."""

    async def acquire(self) -> Lease:
        return _LOCAL_LEASE

    def reconfigure(self, limit: int) -> None:
        return None


@dataclass
class DestinationLimits:
    """What paces one destination: its message rate, connection rate, connection slots."""

    message: RateLimiter
    connection: RateLimiter
    slots: ConnectionSlots


class LimitsFactory(Protocol):
    def make(self, key: str, limits: Limits, local: frozenset[str]) -> DestinationLimits:
        """The limits of destination ``key``; ``local`` names the limits written
        ``local:`` (``OutboundConfig.local_limits``), which stay this node's own."""
        ...

    def refresh(self, key: str, current: DestinationLimits, limits: Limits,
                local: frozenset[str]) -> DestinationLimits:
        """``current`` after a reload: the same objects reconfigured, or new ones where
        a limit changed scope (leases of the old ones are released to them)."""
        ...


class LocalLimits:
    """Every limit node-local: token buckets and the destination's own count."""

    def make(self, key: str, limits: Limits, local: frozenset[str]) -> DestinationLimits:
        # Burst 1 for messages: sends are spread evenly, so no window ever exceeds the
        # rate (+1). The destination sets the rate it uses (shaping's) right after.
        return DestinationLimits(
            message=TokenBucket(rate_from_config(limits.max_message_rate), 1),
            connection=TokenBucket(rate_from_config(limits.max_connection_rate)),
            slots=LocalSlots())

    def refresh(self, key: str, current: DestinationLimits, limits: Limits,
                local: frozenset[str]) -> DestinationLimits:
        # The buckets keep their earned tokens: the destination reconfigures them.
        return current


#: The factory of a node without ``[cluster] redis``.
LOCAL_LIMITS = LocalLimits()
