"""A broker subprocess shared by the tests of one module (client, worker and CLI tests).

Those tests use queue names of their own, so one broker per module is enough and saves starting
one per test. It runs on the session's Redis Cluster when the suite runs with
``PRESQUE_TEST_TOPOLOGY=cluster``, else on a redis-server of its own (never on the shared
session server, which other tests flush).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.servers import BrokerServer, RedisServer

_names = itertools.count()


def qname(prefix: str = "q") -> str:
    """A queue (or channel) name no other test uses: the module's tests share one broker."""
    return f"{prefix}-{time.monotonic_ns()}-{next(_names)}"


def module_broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, config: Mapping[str, Any] | None = None
) -> Iterator[BrokerServer]:
    """Yield a started :class:`BrokerServer` (and its Redis), stopped afterwards."""
    directory = tmp_path_factory.mktemp("module-broker")
    redis: RedisServer | None = None
    if os.environ.get("PRESQUE_TEST_TOPOLOGY", "single") == "cluster":
        url: str = request.getfixturevalue("redis_cluster").url
    else:
        redis = RedisServer(directory / "redis").start()
        url = redis.url
    try:
        with BrokerServer(directory / "broker", url, config=config) as broker:
            yield broker
    finally:
        if redis is not None:
            redis.stop()
