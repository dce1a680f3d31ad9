"""The Redis key schema: every key and channel name presque uses, and nothing else (no I/O).

A queue's keys share the hash tag ``{queue}`` so that they live on one Redis Cluster slot and
one Lua script may touch all of them. Queue names are validated before they get here (they
cannot contain braces), so the tag is always the queue name itself.

Per queue ``q``:

========================  ======  ====================================================
key                       type    content
========================  ======  ====================================================
presque:{q}:ready         zset    id -> (9 - priority) * 2**48 + seq   (ZPOPMIN order)
presque:{q}:delayed       zset    id -> run_at (unix seconds)
presque:{q}:leased        zset    id -> lease deadline (unix seconds)
presque:{q}:dead          zset    id -> failed_at
presque:{q}:expiry        zset    id -> expire_at, only for jobs pushed with a ttl
presque:{q}:body          hash    id -> the job body, bytes exactly as pushed
presque:{q}:meta          hash    id -> JSON array, see ``models.Meta``
presque:{q}:uniq          hash    uniq key -> id, while that job is pending/delayed/leased
presque:{q}:stats         hash    counters since creation (pushed, processed, ...)
presque:{q}:state         hash    paused flag, rate-limit bucket
presque:{q}:done          zset    id -> completed_at, recent acks (to answer 409, not 404)
presque:{q}:lease         hash    id -> ``token attempt lease uniq`` of each leased job (see
                                  ``lua/_lib.lua``), so fetch and ack never rewrite the meta
presque:{q}:workers       set     worker ids registered on the queue (``/w/``)
presque:{q}:latency       hash    delivery latency histogram since creation: bucket index ->
                                  count, ``sum`` -> seconds (``/metrics``; see ``stats.py``)
========================  ======  ====================================================

Global (one slot each, never touched together with a queue's keys in one script):
``presque:queues`` (set of queue names), ``presque:workers`` (hash worker id -> JSON),
``presque:processes`` (hash process id -> JSON heartbeat), ``presque:hist:*`` (stats history).

Pub/sub channels: ``presque:wake:<q>`` (a queue got work: deliverers re-fetch),
``presque:events:<q>`` (job lifecycle events, published only while someone watches),
``presque:msg:<channel>`` (user broadcast channels).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "presque"

QUEUES = f"{PREFIX}:queues"
WORKERS = f"{PREFIX}:workers"
PROCESSES = f"{PREFIX}:processes"
WATCHED = f"{PREFIX}:watched"  # hash: queue (or "*") -> until when someone watches its events
REAPER_LOCK = f"{PREFIX}:reaper"
HISTORY_LOCK = f"{PREFIX}:hist:lock"
HISTORY_SECONDS = f"{PREFIX}:hist:1s"
HISTORY_MINUTES = f"{PREFIX}:hist:1m"

WAKE_CHANNEL_PREFIX = f"{PREFIX}:wake:"
EVENTS_CHANNEL_PREFIX = f"{PREFIX}:events:"
MESSAGE_CHANNEL_PREFIX = f"{PREFIX}:msg:"
CONTROL_CHANNEL = f"{PREFIX}:control"

# Ready-set scores: priority bands of 2**48 sequence numbers each. Higher priority sorts first
# under ZPOPMIN; within a band the push sequence keeps FIFO order. 10 * 2**48 < 2**53, so every
# score is an exact double.
SEQ_SPAN = 2**48


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue, in the order the Lua scripts expect them (see ``lua/*.lua``)."""

    ready: str
    delayed: str
    leased: str
    dead: str
    expiry: str
    body: str
    meta: str
    uniq: str
    stats: str
    state: str
    done: str
    lease: str
    workers: str
    latency: str

    def all(self) -> list[str]:
        """Every key of the queue, in the order that all Lua scripts receive as KEYS."""
        return [
            self.ready,
            self.delayed,
            self.leased,
            self.dead,
            self.expiry,
            self.body,
            self.meta,
            self.uniq,
            self.stats,
            self.state,
            self.done,
            self.lease,
        ]


def queue_keys(queue: str) -> QueueKeys:
    """The keys of ``queue`` (a validated queue name)."""
    base = f"{PREFIX}:{{{queue}}}:"
    return QueueKeys(
        ready=base + "ready",
        delayed=base + "delayed",
        leased=base + "leased",
        dead=base + "dead",
        expiry=base + "expiry",
        body=base + "body",
        meta=base + "meta",
        uniq=base + "uniq",
        stats=base + "stats",
        state=base + "state",
        done=base + "done",
        lease=base + "lease",
        workers=base + "workers",
        latency=base + "latency",
    )


def wake_channel(queue: str) -> str:
    """Channel on which a queue announces new ready work (payload: ``0`` or the next run_at)."""
    return WAKE_CHANNEL_PREFIX + queue


def events_channel(queue: str) -> str:
    """Channel carrying a queue's job lifecycle events."""
    return EVENTS_CHANNEL_PREFIX + queue


def message_channel(channel: str) -> str:
    """Redis channel behind a user's broadcast channel."""
    return MESSAGE_CHANNEL_PREFIX + channel


def watch_key(queue: str) -> str:
    """Set while some connection watches the queue's events (expires unless refreshed)."""
    return f"{PREFIX}:{{{queue}}}:watched"
