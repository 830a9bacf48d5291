"""A real redis-server on 127.0.0.1:<free port>, without persistence, for cluster tests.

Use it by re-exporting the fixture in a test module (there is no shared conftest):

    from tests.integration import redisproc as _redisproc
    redis_server = _redisproc.redis_server

    async def test_x(redis_server):
        redis = redis_server()           # started, answering PING
        config = f'[cluster]\\nredis = "{redis.url}"\\n'
        redis.kill()                     # SIGKILL (Redis "down")
        redis.start()                    # again on the same port, empty
        redis.pause(); redis.resume()    # SIGSTOP / SIGCONT (Redis "slow")
        redis.cli("ZCARD", key)          # a redis-cli command's output

``redis-server`` comes from the distribution (``scripts/install-sysdeps``); the process
is ``bench.cluster.RedisServer`` (the bench's cluster scenario runs the same): no
snapshot, no append-only file, no service, its directory in the test's tmp dir,
readiness asked with ``redis-cli PING``. Every server is killed when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.cluster import REDIS_SERVER, RedisServer

__all__ = ["RedisServer", "redis_server"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Factory: ``redis_server()`` starts one more server and returns it."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed (scripts/install-sysdeps installs it)")
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}").start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
