"""Redis CPU per job of each queue script, alone, at several batch sizes.

    .venv/bin/python bench/lua_cost.py [--src DIR] [--jobs 20000]

Starts a private ``redis-server`` (``make run``'s settings: AOF, ``appendfsync everysec``) and
calls the broker's own :class:`QueueService` against it: push in batches, fetch (leased) in
batches, ack in batches — and, for reference, LPUSH and RPOP of the same number of items.
Redis's CPU time (``INFO cpu``, user + system, all threads) and its command statistics are
read around each step, so the figures do not depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import commandstats, redis_cpu
from bench.procs import REPO, RedisProc

BATCHES = (1, 10, 100)


async def measure_step(sync_client: Any, label: str, jobs: int, step: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    sync_client.config_resetstat()
    before = redis_cpu(sync_client)
    await step()
    cpu = redis_cpu(sync_client) - before
    calls, usec = commandstats(sync_client)
    inner = {k: v for k, v in calls.items() if k not in ("evalsha", "config|resetstat", "info")}
    return {
        "step": label,
        "us_per_job": cpu / jobs * 1e6,
        "script_us_per_job": usec.get("evalsha", 0) / jobs,
        "commands_per_job": sum(inner.values()) / jobs,
        "top": sorted(((k, round(v / jobs, 2)) for k, v in inner.items()), key=lambda kv: -kv[1])[:6],
    }


async def run(url: str, sync_client: Any, jobs: int) -> list[dict[str, Any]]:
    import redis.asyncio as aredis

    from broker.models import PushOptions
    from broker.queue import QueueService
    from broker.redis import create_redis  # noqa: F401  (imported for the same client set-up)

    client = aredis.Redis.from_url(url)
    queues = QueueService(client)
    opts = PushOptions()
    body = b'{"n":1}'
    out = []
    for batch in BATCHES:
        queue = f"cost-{batch}"
        leased: list[tuple[str, str]] = []

        async def push(queue: str = queue, batch: int = batch) -> None:
            for _ in range(jobs // batch):
                await queues.push_many(queue, [(body, opts)] * batch)

        async def fetch(queue: str = queue, batch: int = batch, leased: list[tuple[str, str]] = leased) -> None:
            for _ in range(jobs // batch):
                result = await queues.fetch(queue, count=batch, lease=30.0)
                leased.extend((d.id, d.token or "") for d in result.jobs)

        async def ack(queue: str = queue, batch: int = batch, leased: list[tuple[str, str]] = leased) -> None:
            for i in range(0, len(leased), batch):
                await queues.ack_many(queue, leased[i : i + batch])

        await queues.remember(queue)
        out.append(await measure_step(sync_client, f"push, {batch}/call", jobs, push))
        out.append(await measure_step(sync_client, f"fetch leased, {batch}/call", jobs, fetch))
        out.append(await measure_step(sync_client, f"ack, {batch}/call", jobs, ack))

    async def lpush() -> None:
        for _ in range(jobs):
            await client.lpush("cost-list", body)

    async def rpop() -> None:
        for _ in range(jobs):
            await client.rpop("cost-list")

    out.append(await measure_step(sync_client, "LPUSH, 1/call", jobs, lpush))
    out.append(await measure_step(sync_client, "RPOP, 1/call", jobs, rpop))
    await client.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO, help="take the broker's code from this source tree")
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.src.resolve()))
    workdir = Path(tempfile.mkdtemp(prefix="presque-luacost-"))
    redis_proc = RedisProc(workdir).start()
    try:
        rows = asyncio.run(run(redis_proc.url(), redis_proc.client(), args.jobs))
    finally:
        redis_proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"Redis CPU per job, {args.jobs:,} jobs per step")
    print(f"{'step':<26} {'Redis µs/job':>12} {'in scripts':>10} {'cmds/job':>9}  most frequent inner commands")
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in r["top"])
        print(
            f"{r['step']:<26} {r['us_per_job']:>12.1f} {r['script_us_per_job']:>10.1f} "
            f"{r['commands_per_job']:>9.2f}  {top}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
