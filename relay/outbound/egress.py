"""Egress sources and pools: which local address a job leaves from (``[egress]``).

A job's pool was chosen at intake (``relay.intake.pools``); here a source of that pool
is chosen for each job by smooth weighted round robin (nginx's: over any window, each
source's share follows its weight, and no source gets two in a row that another was
owed), skipping sources that cannot carry it now: one whose address could not be bound
(suspended for ``BIND_RETRY`` seconds), one over its warm-up cap of the day, one whose
path to this destination is suspended. When none can, the job waits (``None``).

Warm-up caps are per source per UTC day, across every worker: each worker counts what
it hands to a source and publishes its count through the spool
(``relay.spool.shaping.UsageStore``) at most once a second, reading the others' counts
at the same time; a cap can therefore be passed by at most about one second of the
node's traffic through that source (stated in the docs, checked by a test).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import NamedTuple

from relay.config import EgressConfig, EgressSource

__all__ = ["BIND_RETRY", "Egress", "Path", "utc_day"]

#: How long a source whose address cannot be bound is left out before it is tried again.
BIND_RETRY = 300.0


def utc_day(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date().isoformat()


class Egress:
    """The sources and pools of one config, and the state of their choice."""

    def __init__(self, config: EgressConfig) -> None:
        self.config = config
        self._current: dict[tuple[str, str], int] = {}
        #: Source -> Unix time until which it is left out (its address did not bind).
        self.unbindable: dict[str, float] = {}
        #: Today's counts: (day, source) -> messages handed to it, this worker's own
        #: (``local``) and every other worker's (``others``, from the spool).
        self.day = ""
        self.local: dict[str, int] = {}
        self.others: dict[str, int] = {}
        self.unpublished = False

    def reconfigure(self, config: EgressConfig) -> None:
        """A reloaded config: new pools and sources; what was learned (unbindable
        sources, today's counts) is kept, the round robin starts afresh."""
        self.config = config
        self._current = {}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def source(self, name: str) -> EgressSource | None:
        return self.config.sources.get(name)

    def pool_of(self, pool: str | None) -> str:
        return pool if pool in self.config.pools else self.config.default_pool

    def choose(self, pool: str | None, now: float, count: int,
               path_open: Callable[[str], bool]) -> str | None:
        """A source of ``pool`` for a job of ``count`` messages, counted against its cap;
        None when no source of the pool can take it now."""
        name = self.pool_of(pool)
        members = [m for m in self.config.pools[name].sources
                   if self.usable(m.source, now, count) and path_open(m.source)]
        if not members:
            return None
        total = 0
        best = None
        for m in members:
            key = (name, m.source)
            self._current[key] = self._current.get(key, 0) + m.weight
            total += m.weight
            if best is None or self._current[key] > self._current[(name, best.source)]:
                best = m
        assert best is not None
        self._current[(name, best.source)] -= total
        self.count(best.source, now, count)
        return best.source

    def usable(self, source: str, now: float, count: int = 1) -> bool:
        if self.unbindable.get(source, 0.0) > now:
            return False
        cap = self.cap(source, now)
        return cap is None or self.used(source, now) + count <= cap

    def cap(self, source: str, now: float) -> int | None:
        src = self.config.sources.get(source)
        return src.daily_cap(utc_day(now)) if src is not None else None

    def used(self, source: str, now: float) -> int:
        self._roll(now)
        return self.local.get(source, 0) + self.others.get(source, 0)

    def count(self, source: str, now: float, n: int) -> None:
        self._roll(now)
        if self.cap(source, now) is not None:
            self.local[source] = self.local.get(source, 0) + n
            self.unpublished = True

    def _roll(self, now: float) -> None:
        day = utc_day(now)
        if day != self.day:
            self.day, self.local, self.others = day, {}, {}

    def next_day(self, now: float) -> float:
        """Unix time of the next UTC midnight (when the caps start over)."""
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        midnight = datetime.datetime.combine(today + datetime.timedelta(days=1),
                                             datetime.time(), datetime.UTC)
        return midnight.timestamp()


class Path(NamedTuple):
    """A destination as seen from one egress source: the engine's unit of delivery."""

    #: ``SOURCE->DESTINATION`` (``relay.spool.shaping.path_key``).
    key: str
    destination: str
    source: str
    source_address: str
    helo_name: str
