"""The ``observability`` scenario: what the mail log and the metrics cost the e2e rate.

The issue: "Metrics and the mail log together may cost at most 3% of the e2e rate: show
it with ``make bench`` on and off in the same run."

Contract: ``await run_observe(scenario, peer_name, processes, ...)`` returns rows with the
keys of ``bench.scenarios.run_one``'s rows, each against a fresh relay and sink, with
``scenario.load`` (the ``e2e`` mix) both times:

* ``observability off``: the bench's relay as every other scenario runs it: no mail log
  (``log.mail_log = ""``) and no admin listener (``admin.listen = []``), so nothing
  scrapes ``/metrics``;
* ``observability on``: the same relay with the mail log written to a file
  (``log.mail_log``, level info: a line per reception and per delivery) and the admin
  listener on, scraped by the bench every ``SCRAPE_INTERVAL`` (1 s: Prometheus's default
  is 15 s, so this is the harsher case). Extra keys: ``scrapes`` (answered with 200),
  ``mail_log_lines``, and ``on_off_ratio`` (this row's ``msg_s`` over the off row's of
  the same call).

What "off" cannot turn off: each worker's in-memory counters (``relay.events.Metrics``)
and the once-a-second snapshot each worker writes for the scrape (``publish_snapshots``)
run whatever the config says, so both rows pay for them; the on/off difference is the
mail log, serving ``/metrics`` and the scrapes. bench/README.md says how the counters'
own share was measured (a py-spy profile of the off row).

The two rows alternate their order from one call to the next (``--repeat 3`` runs off,
on / on, off / off, on), so a machine that speeds up or slows down during a run does not
favour either; compare medians over the rounds. Other peers get the off row only.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import httpx
import trio

from bench.peers import PeerError, RelayPeer, free_port
from bench.scenarios import Scenario, _measure, run_one, run_with_peer
from bench.sink import Sink

__all__ = ["ROW_OFF", "ROW_ON", "SCRAPE_INTERVAL", "run_observe"]

ROW_OFF, ROW_ON = "observability off", "observability on"
SCRAPE_INTERVAL = 1.0
#: Odd calls run the on row first.
_calls = itertools.count()


class _ObservedRelayPeer(RelayPeer):
    """The bench's relay with the mail log and the admin listener on."""

    def __init__(self, setup: Any) -> None:
        super().__init__(setup)
        self.admin_port = free_port()
        self.mail_log = self.tmp / "mail.log"

    def config_text(self) -> str:
        text = super().config_text()
        for old, new in (("[log]\n", f'[log]\nmail_log = "{self.mail_log}"\n'),
                         ("[admin]\nlisten = []\n",
                          f'[admin]\nlisten = ["127.0.0.1:{self.admin_port}"]\n')):
            if old not in text:
                raise PeerError(f"the relay peer's config has no {old.strip()!r} to change")
            text = text.replace(old, new, 1)
        return text


async def _scrape(port: int, stats: dict[str, int]) -> None:
    """GET /metrics every SCRAPE_INTERVAL until cancelled; count the 200s."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
                if response.status_code == 200 and b"total_messages" in response.content:
                    stats["scrapes"] += 1
            except httpx.HTTPError:
                stats["failed_scrapes"] += 1
            await trio.sleep(SCRAPE_INTERVAL)


async def _run_on(scenario: Scenario, processes: int, show_progress: bool,
                  log: Callable[[str], None] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": ROW_ON, "peer": "relay",
                           "description": "e2e, mail log on, /metrics scraped every second"}
    variant = dataclasses.replace(scenario, name=ROW_ON, driver="loadgen")
    sink = Sink(behaviours=dict(scenario.behaviours))
    stats = {"scrapes": 0, "failed_scrapes": 0}

    async def measure(peer: _ObservedRelayPeer) -> None:
        async with trio.open_nursery() as scraping:
            scraping.start_soon(_scrape, peer.admin_port, stats)
            await _measure(variant, peer, sink, row, processes, show_progress)
            scraping.cancel_scope.cancel()
        row.update(stats)
        row["mail_log_lines"] = await trio.to_thread.run_sync(_count_lines, peer)

    await run_with_peer(variant, "relay", sink, row, measure, log,
                        make=lambda _name, setup: _ObservedRelayPeer(setup))
    return row


def _count_lines(peer: _ObservedRelayPeer) -> int:
    with open(peer.mail_log, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


async def run_observe(scenario: Scenario, peer_name: str, processes: int = 2,
                      show_progress: bool = True,
                      log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The scenario's rows against ``peer_name``: see the module docstring."""
    off = dataclasses.replace(scenario, name=ROW_OFF, driver="loadgen",
                              description="e2e, no mail log, no /metrics")
    if peer_name != "relay":
        return [await run_one(off, peer_name, processes, show_progress, log)]
    on_first = next(_calls) % 2 == 1
    rows: dict[str, dict[str, Any]] = {}
    for which in ((ROW_ON, ROW_OFF) if on_first else (ROW_OFF, ROW_ON)):
        rows[which] = (await _run_on(scenario, processes, show_progress, log)
                       if which == ROW_ON else
                       await run_one(off, peer_name, processes, show_progress, log))
    on_row, off_row = rows[ROW_ON], rows[ROW_OFF]
    if on_row.get("msg_s") and off_row.get("msg_s"):
        on_row["on_off_ratio"] = on_row["msg_s"] / off_row["msg_s"]
        if log:
            log(f"   observability: e2e {off_row['msg_s']:.0f} msg/s off, "
                f"{on_row['msg_s']:.0f} msg/s on ({on_row['on_off_ratio']:.3f}; "
                f"{on_row.get('scrapes', 0)} scrapes, {on_row.get('mail_log_lines', 0)} "
                "mail log lines)")
    return [rows[ROW_OFF], rows[ROW_ON]]
