"""Loads the Lua scripts in ``broker/lua`` and registers them once per Redis client.

Each script is prefixed with ``_lib.lua`` (shared helpers: key names, the metadata layout, the
failure/backoff logic), since Redis scripts cannot import one another, except the lean fronts
(:data:`FRONTED`: push_fetch and ack), which handle their common case without it. The hot scripts
(those called for every job: push, fetch, ack, release, nack, touch) go through a
:class:`~broker.pipe.ScriptPipe`, a raw pipelined connection that costs a tenth of redis-py's
client CPU per call; the others through redis-py. Both send EVALSHA and load a script again
after a Redis restart (NOSCRIPT).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from typing import Any

from broker.pipe import PipedScript, ScriptPipe

LUA_PACKAGE = "broker.lua"
# Called once or more per job: worth the pipe (docs/performance.md, item 1).
HOT = frozenset({"push", "fetch", "push_fetch", "ack", "release", "nack", "touch"})
# Scripts that run others' bodies: each body is wrapped as a local function ``<name>_script(ARGV,
# redis)`` in front of the script's own, which calls it with the ARGV (and the ``redis``) it
# chooses. The bodies stay in one file each, and a change to one reaches every script that runs it.
COMPOSED: dict[str, tuple[str, ...]] = {"push_then_fetch": ("push", "fetch")}
# Scripts with a lean front: ``lua/<name>.lua`` runs without the shared library and handles the
# common case itself; for the others it calls ``general_script(ARGV, redis)``, the general
# script (with its library and bodies) wrapped as a local function. Every call of a script runs
# its top level, so the library's closures (~20) are made on the general path only.
FRONTED: dict[str, str] = {"push_fetch": "push_then_fetch", "ack": "ack_general"}


def _read(name: str) -> str:
    return (resources.files(LUA_PACKAGE) / f"{name}.lua").read_text(encoding="utf-8")


@cache
def script_source(name: str) -> str:
    """The full source of ``lua/<name>.lua``, with the shared library (and the bodies it runs,
    see :data:`COMPOSED`) in front, or, for a script of :data:`FRONTED`, its general script."""
    general = FRONTED.get(name)
    if general is not None:
        return f"local function general_script(ARGV, redis)\n{script_source(general)}\nend\n{_read(name)}"
    parts = [_read("_lib")]
    for inner in COMPOSED.get(name, ()):
        parts.append(f"local function {inner}_script(ARGV, redis)\n{_read(inner)}\nend")
    parts.append(_read(name))
    return "\n".join(parts)


@dataclass(frozen=True)
class Scripts:
    """The registered scripts; call one as ``await scripts.push(keys=..., args=...)``."""

    push: Any
    fetch: Any
    push_fetch: Any
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
        """Register every script with ``client`` (a redis.asyncio Redis or RedisCluster).

        The hot scripts share one :class:`~broker.pipe.ScriptPipe` on the client, unless the
        client cannot have one (:meth:`ScriptPipe.open`): then they stay with redis-py too.
        """
        scripts = {f.name: client.register_script(script_source(f.name)) for f in fields(cls)}
        pipe = ScriptPipe.open(client)
        if pipe is not None:
            for name in HOT:
                scripts[name] = PipedScript(pipe, scripts[name], name)
        return cls(**scripts)
