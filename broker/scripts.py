"""Loads the Lua scripts in ``broker/lua`` and registers them once per Redis client.

Each script is prefixed with ``_lib.lua`` (shared helpers: key names, the metadata layout, the
failure/backoff logic), since Redis scripts cannot import one another. redis-py sends them with
EVALSHA and reloads them by itself after a Redis restart (NOSCRIPT).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from typing import Any

LUA_PACKAGE = "broker.lua"


@cache
def script_source(name: str) -> str:
    """The full source of ``lua/<name>.lua``, with the shared library in front."""
    lua = resources.files(LUA_PACKAGE)
    lib = (lua / "_lib.lua").read_text(encoding="utf-8")
    body = (lua / f"{name}.lua").read_text(encoding="utf-8")
    return f"{lib}\n{body}"


@dataclass(frozen=True)
class Scripts:
    """The registered scripts; call one as ``await scripts.push(keys=..., args=...)``."""

    push: Any
    fetch: Any
    ack: Any
    nack: Any
    touch: Any
    release: Any
    reap: Any
    info: Any
    job: Any
    peek: Any
    purge: Any
    dead_list: Any
    dead_retry: Any
    dead_delete: Any

    @classmethod
    def register(cls, client: Any) -> Scripts:
        """Register every script with ``client`` (a redis.asyncio Redis or RedisCluster)."""
        return cls(**{f.name: client.register_script(script_source(f.name)) for f in fields(cls)})
