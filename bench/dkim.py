"""The ``dkim`` scenario: every message RSA-2048 DKIM-signed, end to end to the sink.

The issue: "every message RSA-2048 signed, 2 KB and 100 KB, end to end to the sink. The
peer is what operators actually run: Postfix with the OpenDKIM milter ... signing the
same messages with the same key. Goal: >= 2x Postfix+OpenDKIM end to end in the same
run, and signing must cost the relay at most 25% of its unsigned e2e rate."

Contract: ``await run_dkim(scenario, peer_name, processes, ...)`` returns result rows
with the keys of ``bench.scenarios.run_one``'s rows (``msg_s`` = ``e2e_msg_s``,
``latency_p50_ms``, ``cpu_s_per_1000``, ``complete``, ...) plus ``size_bytes``,
``expect_signed`` (the row is meant to be signed), ``signed_messages`` (messages the sink
received with a ``DKIM-Signature:`` field in their header), ``signed_share`` (of the
messages it received) and ``signed`` (every received message signed, at least one).

For every size in ``scenario.dkim_sizes`` (2 KB and 100 KB; a message count, or
``scenario.load.duration`` seconds of load), each row against a fresh server and sink,
``scenario.load`` otherwise (20 sessions, 1 recipient, 20 domains, From:
``bench@sender.test``):

* ``relay``: ``dkim <size> signed`` (the relay signs every message at intake with
  ``bench_key()``: a ``[[dkim.signers]]`` block for ``sender.test``, selector ``bench``,
  the relay's default fields, relaxed/relaxed) then ``dkim <size> unsigned`` (the same
  load, no signer);
* ``postfix+opendkim`` (OpenDKIM on a loopback TCP socket) and ``postfix+opendkim-unix``
  (on a unix-domain socket, Debian's default): ``dkim <size> signed``, OpenDKIM signing
  with the same key;
* any other peer (``postfix``, ``direct``): ``dkim <size> unsigned``.

The key is generated once per bench process (``bench_key``) and written into each
server's temp dir, so every signing peer of a run signs with the same key. Nothing
verifies the signatures here (that needs DNS; the relay's tests verify them with dkimpy
and opendkim-testmsg): the sink only checks that the field is there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import msgspec

from bench.peers import DkimKey
from bench.scenarios import Scenario, run_one

__all__ = ["DKIM_DOMAIN", "DKIM_SELECTOR", "SIGNING_PEERS", "bench_key", "row_name",
           "run_dkim", "size_label", "variants_for"]

#: The From: domain of every bench message (``bench.loadgen.make_body``) and the d= of
#: the signatures.
DKIM_DOMAIN = "sender.test"
DKIM_SELECTOR = "bench"
#: Peers that sign (the relay also runs the unsigned rows).
SIGNING_PEERS = ("relay", "postfix+opendkim", "postfix+opendkim-unix")


@functools.cache
def bench_key() -> DkimKey:
    """The run's RSA-2048 key for ``sender.test``, selector ``bench`` (one per process)."""
    return DkimKey.generate(domain=DKIM_DOMAIN, selector=DKIM_SELECTOR, bits=2048)


def size_label(size: int) -> str:
    """``2048`` -> ``2KB``, ``102400`` -> ``100KB``."""
    return f"{size // 1024}KB" if size % 1024 == 0 else f"{size}B"


def row_name(size: int, signed: bool) -> str:
    """The ``scenario`` field of a row: ``dkim 2KB signed``, ``dkim 100KB unsigned``."""
    return f"dkim {size_label(size)} {'signed' if signed else 'unsigned'}"


def variants_for(peer_name: str) -> tuple[bool, ...]:
    """The rows (signed?) a peer runs per size: the relay both, Postfix + OpenDKIM signed,
    any other peer unsigned."""
    if peer_name == "relay":
        return (True, False)
    return (True,) if peer_name in SIGNING_PEERS else (False,)


async def run_dkim(scenario: Scenario, peer_name: str, processes: int = 2,
                   show_progress: bool = True,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The scenario's rows against ``peer_name``: see the module docstring."""
    rows: list[dict[str, Any]] = []
    for size, messages in scenario.dkim_sizes:
        for signed in variants_for(peer_name):
            load = msgspec.structs.replace(scenario.load, sizes=[(size, 1.0)],
                                           messages=messages)
            how = ("signed with RSA-2048" if signed else "unsigned")
            variant = dataclasses.replace(
                scenario, name=row_name(size, signed), driver="loadgen", load=load,
                dkim=bench_key() if signed else None,
                description=f"{size_label(size)} messages {how}, end to end")
            row = await run_one(variant, peer_name, processes, show_progress, log)
            delivered = row.get("delivered_messages") or 0
            n_signed = row.get("signed_messages", 0)
            row.update({"size_bytes": size, "expect_signed": signed,
                        "signed_share": n_signed / delivered if delivered else None,
                        "signed": delivered > 0 and n_signed == delivered})
            if log and not row.get("error"):
                log(f"   {row['scenario']}: {n_signed} of {delivered} delivered messages "
                    f"signed")
            rows.append(row)
    return rows
