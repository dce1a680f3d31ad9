"""QueueService: every queue operation, as calls of the Lua scripts in ``broker/lua``.

This is the one place that knows how jobs move between the ready, delayed, leased and dead
sets. Every state change is a single script call, hence atomic: a broker process killed at any
moment leaves each job wholly in one state. Operations take batches where the wire allows it,
because a Redis round trip, not a command, is what bounds throughput.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster

from broker import keys
from broker.config import QueueLimit
from broker.errors import JobExists, NoJob, QueueClosed, StaleToken, UnknownJob
from broker.models import (
    COUNTERS,
    DeadJob,
    Delivery,
    JobState,
    JobView,
    Meta,
    PushOptions,
    QueueInfo,
    new_job_id,
    new_token_prefix,
)
from broker.pipe import PipedScript
from broker.scripts import Scripts

# Chunk size of operations that walk a whole queue (purge, retry all): bounds how long one
# script call may keep Redis busy.
CHUNK = 1000


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """What the queue service needs from the settings."""

    backoff_base: float = 1.0
    backoff_max: float = 300.0
    tombstone_ttl: float = 60.0
    reap_limit: int = 1000


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What a fetch got: jobs, or why none (and when to try again)."""

    jobs: list[Delivery]
    paused: bool = False
    limited: bool = False  # rate limit or max_inflight reached
    retry_in: float | None = None  # rate limited: seconds until a token is available
    empty: bool = False  # no ready job (as opposed to: the ones popped had expired)
    next_run_at: float | None = None  # no ready job left: when the next delayed job becomes ready
    more: bool = False  # jobs taken, and ready jobs are left: fetching again finds some


@dataclass(frozen=True, slots=True)
class NackOutcome:
    """Where a nacked job went."""

    outcome: str  # ready | delayed | dead | expired
    run_at: float


@dataclass(frozen=True, slots=True)
class ReapResult:
    lease_expired: int
    dead_lettered: int
    promoted: int
    expired: int
    more: bool
    # (id, outcome) of each job whose lease lapsed: ready | delayed | dead | expired, as for a nack.
    lapsed: tuple[tuple[str, str], ...] = ()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _f(value: bytes | str) -> float:
    return float(_s(value))


def _status_error(status: int) -> Exception | None:
    if status == 0:
        return UnknownJob()
    if status == -1:
        return StaleToken()
    return None


def _pushed(raw: list[Any]) -> list[str | JobExists]:
    """push.lua's reply: per job its id, or a JobExists naming the job that holds its uniq key."""
    out: list[str | JobExists] = []
    for item in raw:
        text = _s(item)
        out.append(JobExists(text[1:]) if text.startswith("!") else text)
    return out


def _push_args(
    queue: str, jobs: Sequence[tuple[bytes, PushOptions]], count_failure: bool, all_or_nothing: bool
) -> list[Any]:
    args: list[Any] = [keys.wake_channel(queue), int(count_failure), int(all_or_nothing)]
    if len(jobs) == 1:  # push.lua's flat layout: for one job, an argument fewer
        body, opts = jobs[0]
        args += [new_job_id(), body, opts.priority, opts.delay, opts.ttl, opts.uniq, opts.max_attempts]
    else:
        # The grouped layout: the options once per run of jobs sharing them (a batch, or
        # coalesced pushes without options share one), then id and body of each job.
        last: PushOptions | None = None
        for body, opts in jobs:
            if opts is not last and opts != last:
                args += ["", opts.priority, opts.delay, opts.ttl, opts.uniq, opts.max_attempts]
                last = opts
            args += [new_job_id(), body]
    return args


def _fetched(queue: str, raw: list[Any]) -> FetchResult:
    """fetch.lua's reply."""
    status, hint = int(raw[0]), _s(raw[1])
    if status == -1:
        return FetchResult([], paused=True)
    if status == -2:
        return FetchResult([], limited=True, retry_in=float(hint))
    if status == -3:
        return FetchResult([], limited=True)
    if status == 0:
        return FetchResult([], empty=True, next_run_at=float(hint) if hint else None)
    jobs = []
    for i in range(2, len(raw), 5):
        token = _s(raw[i + 1])
        jobs.append(
            Delivery(
                id=_s(raw[i]),
                queue=queue,
                body=raw[i + 3],
                attempt=int(raw[i + 2]),
                token=token or None,
                latency=_f(raw[i + 4]),
            )
        )
    if hint == "+":
        return FetchResult(jobs, more=True)
    return FetchResult(jobs, next_run_at=float(hint) if hint else None)


class QueueService:
    """Queue operations on one Redis deployment. Safe to share by every request of a process.

    Args:
        redis: a redis.asyncio ``Redis`` or ``RedisCluster`` client (``decode_responses=False``).
        policy: backoff and housekeeping settings.
        limits: a function giving the delivery limits of a queue (or None for none).
    """

    def __init__(
        self,
        redis: Any,
        policy: QueuePolicy | None = None,
        limits: Callable[[str], QueueLimit | None] | None = None,
    ) -> None:
        self.redis = redis
        self.policy = policy or QueuePolicy()
        self.scripts = Scripts.register(redis)
        self._limits = limits
        self._known: set[str] = set()
        self._adding: dict[str, asyncio.Future[Any]] = {}

    @property
    def pipelined(self) -> bool:
        """True when the hot scripts go through the script pipe, which sends calls in order."""
        return isinstance(self.scripts.push, PipedScript)

    def limit_for(self, queue: str) -> QueueLimit | None:
        return self._limits(queue) if self._limits else None

    async def remember(self, queue: str) -> None:
        """Add ``queue`` to the registry of queues (``/status/``, stats)."""
        # The queue registry is a global key (another Cluster slot than the queue's), so it
        # cannot be updated in the push script; SADD is idempotent and only sent once per process.
        if queue in self._known:
            return
        # One SADD for every push waiting for it; they resume in the order they began to wait,
        # so two push calls in flight (batching.py) still reach Redis in order.
        adding = self._adding.get(queue)
        if adding is None:
            adding = self._adding[queue] = asyncio.ensure_future(self.redis.sadd(keys.QUEUES, queue))
            adding.add_done_callback(lambda done: self._added(queue, done))
        await asyncio.shield(adding)

    def _added(self, queue: str, done: asyncio.Future[Any]) -> None:
        del self._adding[queue]
        if not done.cancelled() and done.exception() is None:
            self._known.add(queue)

    # -- pushing --------------------------------------------------------------------------------

    async def push_many(
        self,
        queue: str,
        jobs: Sequence[tuple[bytes, PushOptions]],
        *,
        count_failure: bool = False,
        all_or_nothing: bool = False,
    ) -> list[str | JobExists]:
        """Push jobs in one atomic call.

        Args:
            queue: a validated queue name.
            jobs: (body, options) pairs; bodies are stored byte for byte.
            count_failure: count each job as a failure too (presque's ``PUT``).
            all_or_nothing: if any job's uniq key is taken, push none.

        Returns:
            Per job, its new id, or a JobExists naming the job that holds its uniq key.
        """
        await self.remember(queue)
        args = _push_args(queue, jobs, count_failure, all_or_nothing)
        return _pushed(await self.scripts.push(keys=keys.queue_keys(queue).all(), args=args))

    async def push_fetch(
        self,
        queue: str,
        jobs: Sequence[tuple[bytes, PushOptions]],
        *,
        count: int,
        lease: float = 0.0,
        count_failure: bool = False,
    ) -> tuple[list[str | JobExists], FetchResult]:
        """:meth:`push_many`, then :meth:`fetch` of up to ``count`` jobs, in one atomic call.

        For a broker whose subscribers wait for work: the wake-up of the push and the fetch it
        would cause are saved (``push_fetch.lua``).
        """
        await self.remember(queue)
        args = self._fetch_args(queue, count, lease) + _push_args(queue, jobs, count_failure, False)
        pushed, fetched = await self.scripts.push_fetch(keys=keys.queue_keys(queue).all(), args=args)
        return _pushed(pushed), _fetched(queue, fetched)

    async def push(self, queue: str, body: bytes, opts: PushOptions, *, count_failure: bool = False) -> str:
        """Push one job and return its id; raises JobExists on a uniq conflict."""
        (result,) = await self.push_many(queue, [(body, opts)], count_failure=count_failure)
        if isinstance(result, JobExists):
            raise result
        return result

    # -- taking ---------------------------------------------------------------------------------

    async def fetch(self, queue: str, *, count: int = 1, lease: float = 0.0) -> FetchResult:
        """Take up to ``count`` jobs, leased for ``lease`` seconds, or destructively if 0."""
        args = self._fetch_args(queue, count, lease)
        return _fetched(queue, await self.scripts.fetch(keys=keys.queue_keys(queue).all(), args=args))

    def _fetch_args(self, queue: str, count: int, lease: float) -> list[Any]:
        limit = self.limit_for(queue)
        return [
            count,
            lease,
            new_token_prefix(),
            (limit.max_inflight or 0) if limit else 0,
            (limit.rate or 0) if limit else 0,
        ]

    async def fetch_one(self, queue: str, *, lease: float = 0.0) -> Delivery:
        """Take one job (HTTP ``GET /q/``); raises NoJob or QueueClosed."""
        while True:
            result = await self.fetch(queue, count=1, lease=lease)
            if result.jobs:
                return result.jobs[0]
            if result.paused:
                raise QueueClosed()
            if result.limited or result.empty:
                raise NoJob()
            # Every job popped had outlived its ttl and was dropped: look again.

    # -- settling -------------------------------------------------------------------------------

    async def ack_many(self, queue: str, items: Sequence[tuple[str, str]]) -> list[Exception | None]:
        """Acknowledge leased jobs; per item None, UnknownJob or StaleToken."""
        limit = self.limit_for(queue)
        notify = int(bool(limit and limit.max_inflight))
        args: list[Any] = [keys.wake_channel(queue), notify]
        for job_id, token in items:
            args += [job_id, token]
        raw = await self.scripts.ack(keys=keys.queue_keys(queue).all(), args=args)
        return [_status_error(int(status)) for status in raw]

    async def ack(self, queue: str, job_id: str, token: str) -> None:
        """Acknowledge one leased job; raises UnknownJob (404) or StaleToken (409)."""
        (error,) = await self.ack_many(queue, [(job_id, token)])
        if error:
            raise error

    async def nack(
        self, queue: str, job_id: str, token: str, *, delay: float | None = None, error: str = ""
    ) -> NackOutcome:
        """Fail a leased job: it retries after ``delay`` (default: backoff) or is dead-lettered."""
        args = [
            keys.wake_channel(queue),
            job_id,
            token,
            -1 if delay is None else delay,
            error,
            self.policy.backoff_base,
            self.policy.backoff_max,
            random.randrange(1 << 31),
        ]
        raw = await self.scripts.nack(keys=keys.queue_keys(queue).all(), args=args)
        failure = _status_error(int(raw[0]))
        if failure:
            raise failure
        return NackOutcome(_s(raw[1]), _f(raw[2]))

    async def touch(self, queue: str, job_id: str, token: str, lease: float = 0.0) -> float:
        """Extend a lease to ``lease`` seconds from now (0: as taken); returns the new deadline."""
        raw = await self.scripts.touch(keys=keys.queue_keys(queue).all(), args=[job_id, token, lease])
        failure = _status_error(int(raw[0]))
        if failure:
            raise failure
        return _f(raw[1])

    async def release(self, queue: str, items: Iterable[tuple[str, str]]) -> int:
        """Return leased jobs to the queue at once, without counting a failure."""
        args: list[Any] = [keys.wake_channel(queue)]
        for job_id, token in items:
            args += [job_id, token]
        if len(args) == 1:
            return 0
        return int(await self.scripts.release(keys=keys.queue_keys(queue).all(), args=args))

    # -- housekeeping ---------------------------------------------------------------------------

    async def reap(self, queue: str) -> ReapResult:
        """Expire lapsed leases, promote due delayed jobs and drop ttl-expired ones in ``queue``."""
        args = [
            keys.wake_channel(queue),
            self.policy.reap_limit,
            self.policy.backoff_base,
            self.policy.backoff_max,
            random.randrange(1 << 31),
            self.policy.tombstone_ttl,
        ]
        raw = await self.scripts.reap(keys=keys.queue_keys(queue).all(), args=args)
        lease_expired, dead_lettered, promoted, expired, more = (int(x) for x in raw[:5])
        lapsed = tuple((_s(raw[i]), _s(raw[i + 1])) for i in range(5, len(raw), 2))
        return ReapResult(lease_expired, dead_lettered, promoted, expired, bool(more), lapsed)

    async def queues(self) -> list[str]:
        """Every queue name ever pushed to, sorted."""
        return sorted(_s(name) for name in await self.redis.smembers(keys.QUEUES))

    # -- control --------------------------------------------------------------------------------

    async def pause(self, queue: str) -> None:
        """Stop handing out jobs of ``queue`` (pushes are still accepted)."""
        await self.remember(queue)
        await self.redis.hset(keys.queue_keys(queue).state, "paused", "1")

    async def resume(self, queue: str) -> None:
        """Hand out jobs again, and wake every deliverer of the queue."""
        await self.redis.hdel(keys.queue_keys(queue).state, "paused")
        await self.redis.publish(keys.wake_channel(queue), "0")

    async def is_paused(self, queue: str) -> bool:
        return bool(await self.redis.hexists(keys.queue_keys(queue).state, "paused"))

    async def purge(self, queue: str) -> int:
        """Remove every ready and delayed job; returns how many."""
        total = 0
        qkeys = keys.queue_keys(queue).all()
        while removed := int(await self.scripts.purge(keys=qkeys, args=[CHUNK])):
            total += removed
        return total

    # -- reading --------------------------------------------------------------------------------

    async def info(self, queue: str) -> QueueInfo:
        """Sizes, counters and pause flag of one queue, as one consistent snapshot."""
        return self._parse_info(queue, await self.scripts.info(keys=keys.queue_keys(queue).all(), args=[]))

    async def info_many(self, queues: Sequence[str]) -> list[QueueInfo]:
        """``info`` for many queues in one round trip (concurrent calls on a Redis Cluster)."""
        if not queues:
            return []
        if isinstance(self.redis, RedisCluster):
            # redis-py refuses scripts in a cluster pipeline; one call per queue, all at once.
            return list(await asyncio.gather(*(self.info(queue) for queue in queues)))
        # As a context manager: a pipeline whose SCRIPT EXISTS check fails (Redis frozen or gone)
        # keeps its connection until reset, which execute() alone does not do on that path.
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                await self.scripts.info(keys=keys.queue_keys(queue).all(), args=[], client=pipe)
            raw = await pipe.execute()
        return [self._parse_info(q, r) for q, r in zip(queues, raw, strict=True)]

    @staticmethod
    def _parse_info(queue: str, raw: list[Any]) -> QueueInfo:
        counters = dict.fromkeys(COUNTERS, 0)
        for i in range(7, len(raw), 2):
            name = _s(raw[i])
            if name in counters:
                counters[name] = int(raw[i + 1])
        oldest = _s(raw[5])
        return QueueInfo(
            queue=queue,
            ready=int(raw[0]),
            delayed=int(raw[1]),
            leased=int(raw[2]),
            dead=int(raw[3]),
            paused=_s(raw[4]) == "1",
            counters=counters,
            oldest_run_at=float(oldest) if oldest else None,
            now=_f(raw[6]),
        )

    async def job(self, queue: str, job_id: str) -> JobView:
        """One job's state; raises UnknownJob when it does not exist (any more)."""
        raw = await self.scripts.job(keys=keys.queue_keys(queue).all(), args=[job_id])
        if not raw:
            raise UnknownJob("no such job")
        meta = orjson.loads(raw[1])
        return JobView(
            id=job_id,
            queue=queue,
            state=JobState(_s(raw[0])),
            attempt=int(meta[Meta.ATTEMPT - 1]),
            priority=int(meta[Meta.PRIORITY - 1]),
            created_at=float(meta[Meta.CREATED_AT - 1]),
            run_at=float(meta[Meta.RUN_AT - 1]),
            last_error=meta[Meta.LAST_ERROR - 1] or None,
            body=raw[2],
            failures=int(meta[Meta.FAILURES - 1]),
            max_attempts=int(meta[Meta.MAX_ATTEMPTS - 1]),
        )

    async def peek(self, queue: str, count: int) -> list[tuple[str, bytes]]:
        """(id, body) of the next ``count`` ready jobs in delivery order."""
        raw = await self.scripts.peek(keys=keys.queue_keys(queue).all(), args=[count])
        return [(_s(raw[i]), raw[i + 1]) for i in range(0, len(raw), 2)]

    # -- dead letters ---------------------------------------------------------------------------

    async def dead_list(self, queue: str, offset: int = 0, limit: int = 50) -> tuple[int, list[DeadJob]]:
        """(total, page) of the dead-letter list, oldest failure first."""
        raw = await self.scripts.dead_list(keys=keys.queue_keys(queue).all(), args=[offset, limit])
        jobs = []
        for i in range(1, len(raw), 3):
            meta = orjson.loads(raw[i + 1])
            jobs.append(
                DeadJob(
                    id=_s(raw[i]),
                    body=raw[i + 2],
                    attempt=int(meta[Meta.ATTEMPT - 1]),
                    last_error=meta[Meta.LAST_ERROR - 1] or None,
                    failed_at=float(meta[Meta.FAILED_AT - 1]),
                )
            )
        return int(raw[0]), jobs

    async def dead_retry(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Move dead jobs (these ids, or all) back to the ready set; returns how many."""
        qkeys = keys.queue_keys(queue).all()
        channel = keys.wake_channel(queue)
        if ids is not None:
            if not ids:
                return 0
            return int(await self.scripts.dead_retry(keys=qkeys, args=[channel, CHUNK, *ids]))
        total = 0
        while moved := int(await self.scripts.dead_retry(keys=qkeys, args=[channel, CHUNK])):
            total += moved
        return total

    async def dead_delete(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead jobs (these ids, or all) for good; returns how many."""
        qkeys = keys.queue_keys(queue).all()
        if ids is not None:
            if not ids:
                return 0
            return int(await self.scripts.dead_delete(keys=qkeys, args=[CHUNK, *ids]))
        total = 0
        while deleted := int(await self.scripts.dead_delete(keys=qkeys, args=[CHUNK])):
            total += deleted
        return total
