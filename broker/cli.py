"""The ``presque`` command line: ``serve`` runs the broker; every other command is a client.

Client commands find the broker with ``--url`` (else ``$PRESQUE_URL``, else
http://127.0.0.1:5000) and authenticate with ``--token`` (else ``$PRESQUE_TOKEN``). On failure
they print one line, ``presque: <why>``, to stderr and exit 1 (2 for bad usage); ``--json``
prints machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from broker.errors import BrokerError
from broker.models import parse_json, validate_queue

DEFAULT_URL = "http://127.0.0.1:5000"
TIMEOUT = 5.0  # seconds before "broker down" is reported
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class CLIError(Exception):
    """A failure reported as one line, exit status 1."""


def _serve(args: argparse.Namespace) -> int:
    from broker.config import Settings, load_settings
    from broker.supervisor import serve

    settings: Settings = load_settings(args.config)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    workers = settings.server.workers if args.workers is None else args.workers
    return serve(settings, host=host, port=port, workers=workers)


# -- client commands ------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from broker.client import Client

    url = args.url or os.environ.get("PRESQUE_URL") or DEFAULT_URL
    token = args.token or os.environ.get("PRESQUE_TOKEN") or None
    try:
        return Client(url, token=token, timeout=args.timeout)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def client_command(fn: Callable[[Any, argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    """Run ``fn(client, args)`` on an event loop with a client that is closed afterwards."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        # The client logs reconnection attempts; a command reports its failure in one line instead.
        logging.getLogger("presque").addHandler(logging.NullHandler())

        async def main() -> int:
            async with _client(args) as client:
                return await fn(client, args)

        return asyncio.run(main())

    return run


async def _reachable(client: Any) -> None:
    """Fail at once when nothing listens at the broker's address.

    The WebSocket keeps retrying a refused connection until the timeout (a broker restarting);
    one HTTP request tells a broker that is down from one that is slow.
    """
    from broker.transport import BrokerUnreachable

    try:
        await client.health()
    except BrokerUnreachable:
        raise
    except BrokerError:
        pass  # the command itself reports what is wrong


def _out(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    from broker.terminal import compact

    print(compact(data) if args.json or text is None else text, flush=True)


def _json_arg(text: str) -> Any:
    return parse_json(text.encode())


@client_command
async def _push(client: Any, args: argparse.Namespace) -> int:
    validate_queue(args.queue)
    await _reachable(client)
    options = {
        "priority": args.priority,
        "delay": args.delay,
        "uniq": args.uniq,
        "ttl": args.ttl,
        "max_attempts": args.max_attempts,
    }
    if args.body is not None:
        job_id = await client.push(args.queue, _json_arg(args.body), **options)
        _out(args, {"id": job_id, "queue": args.queue}, job_id)
        return 0
    return await _push_stdin(client, args, {k: v for k, v in options.items() if v is not None})


async def _push_stdin(client: Any, args: argparse.Namespace, options: dict[str, Any]) -> int:
    from broker.lines import push_lines

    result = await push_lines(client, args.queue, sys.stdin.buffer, options)
    if args.json:
        _out(args, {"queue": args.queue, "pushed": result.pushed, "seconds": round(result.seconds, 3)})
    elif result.pushed > 1 or result.shown:
        rate = result.pushed / max(result.seconds, 1e-9)
        print(
            f"pushed {result.pushed:,} jobs to {args.queue} in {result.seconds:.2f}s ({rate:,.0f}/s)", file=sys.stderr
        )
    if result.error is not None:
        raise CLIError(f"{result.error} ({result.pushed:,} jobs pushed before the error)")
    return 0


@client_command
async def _fetch(client: Any, args: argparse.Namespace) -> int:
    job = await client.fetch(args.queue, args.lease, wait=args.wait)
    if job is None:
        raise CLIError(f"no job in {args.queue}")
    from broker.terminal import compact

    data = {"id": job.id, "queue": job.queue, "attempt": job.attempt, "token": job.token, "body": job.body}
    if args.json:
        _out(args, data)
    elif job.token is None:
        print(compact(job.body))
    else:
        print(f"id: {job.id}\ntoken: {job.token}\nattempt: {job.attempt}\nbody: {compact(job.body)}")
    return 0


@client_command
async def _stats(client: Any, args: argparse.Namespace) -> int:
    from broker.terminal import compact, stats_table

    tty = sys.stdout.isatty()
    while True:
        stats = await client.stats()
        if args.json:
            print(compact(stats), flush=True)
        else:
            text = stats_table(stats)
            if args.watch and tty:
                text = "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S") + f"  {client.url}\n" + text
            print(text, flush=True)
        if not args.watch:
            return 0
        await asyncio.sleep(args.interval)


def _control(action: str) -> Callable[[argparse.Namespace], int]:
    @client_command
    async def run(client: Any, args: argparse.Namespace) -> int:
        await getattr(client, action)(args.queue)
        past = {"pause": "paused", "resume": "resumed", "purge": "purged"}[action]
        _out(args, {"queue": args.queue, "status": past}, f"{past} {args.queue}")
        return 0

    return run


@client_command
async def _dead(client: Any, args: argparse.Namespace) -> int:
    from broker.terminal import dead_table

    if args.action == "list":
        dead = await client.dead(args.queue, offset=args.offset, limit=args.limit)
        _out(args, dead, dead_table(dead))
    elif args.action == "retry":
        count = await client.retry_dead(args.queue, args.ids or None)
        _out(args, {"queue": args.queue, "retried": count}, f"retried {count} dead jobs of {args.queue}")
    else:
        if args.ids:
            raise CLIError("dead purge takes no job ids: it deletes every dead job")
        await client.purge_dead(args.queue)
        _out(args, {"queue": args.queue, "status": "purged"}, f"purged the dead jobs of {args.queue}")
    return 0


@client_command
async def _publish(client: Any, args: argparse.Namespace) -> int:
    data = _json_arg(args.data)
    await _reachable(client)
    await client.publish(args.channel, data)
    _out(args, {"channel": args.channel, "status": "published"}, f"published to {args.channel}")
    return 0


@client_command
async def _listen(client: Any, args: argparse.Namespace) -> int:
    from broker.terminal import compact

    validate_queue(args.channel)
    await _reachable(client)
    messages = client.listen(args.channel)
    try:
        count = 0
        async for data in messages:
            print(compact(data), flush=True)
            count += 1
            if args.count and count >= args.count:
                break
    finally:
        await messages.aclose()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from broker.worker_runner import load_worker_class, run

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    try:
        cls = load_worker_class(args.spec)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    url = args.url or os.environ.get("PRESQUE_URL") or DEFAULT_URL
    factory = functools.partial(
        cls,
        url,
        token=args.token or os.environ.get("PRESQUE_TOKEN") or None,
        queues=args.queue,
        concurrency=args.concurrency,
        grace=args.grace,
        lease=args.lease,
    )
    try:
        factory()  # fail here, once, on a bad configuration rather than in every child
        for queue in args.queue or cls.queues:
            validate_queue(queue)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return run(factory, processes=args.processes)


# -- parser ---------------------------------------------------------------------------------------


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"broker URL (default: $PRESQUE_URL, else {DEFAULT_URL})"
    )
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (default: $PRESQUE_TOKEN)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help=f"seconds to wait for the broker (default {TIMEOUT:g})"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _client_options()
    parser = argparse.ArgumentParser(prog="presque", description="A WebSocket-first job queue broker on Redis.")
    parser.set_defaults(url=None, token=None, json=False, timeout=TIMEOUT)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(func=func)
        return sub

    serve = commands.add_parser("serve", help="run the broker (HTTP + WebSocket)", description="Run the broker.")
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 5000)")
    serve.add_argument("--config", help="config file (default: ./config.yaml when present)")
    serve.add_argument(
        "--workers", type=int, help="broker processes sharing the port (default: server.workers, 1); see docs/deploy.md"
    )
    serve.set_defaults(func=_serve)

    push = command("push", "push a job (JSON argument), or JSON lines from stdin in batches", _push)
    push.add_argument("queue", help="queue name")
    push.add_argument("body", nargs="?", help="the job as JSON; omit to read one job per line from stdin")
    push.add_argument("--priority", type=int, help="0-9, higher first (default 5)")
    push.add_argument("--delay", type=float, help="seconds before the job is ready")
    push.add_argument("--uniq", help="uniqueness key: no second job with it while one is pending")
    push.add_argument("--ttl", type=float, help="drop the job if not taken within this many seconds")
    push.add_argument("--max-attempts", type=int, help="failures before dead-lettering (default 5)")

    fetch = command("fetch", "take one job: destructive (prints its body), or leased with --lease", _fetch)
    fetch.add_argument("queue", help="queue name")
    fetch.add_argument("--lease", type=float, help="lease the job for this many seconds; prints id, token and body")
    fetch.add_argument("--wait", type=float, help="wait up to this many seconds (max 30) for a job")

    worker = command("worker", "run a Worker subclass: presque worker module:Class", _worker)
    worker.add_argument(
        "spec", metavar="module:Class", help="the Worker subclass (the module is imported from the working directory)"
    )
    worker.add_argument("--queue", action="append", help="queue to work on (repeatable; overrides the class's queues)")
    worker.add_argument("--concurrency", type=int, help="jobs run at once per process (default: the class's)")
    worker.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    worker.add_argument("--grace", type=float, help="seconds running jobs get to finish on SIGTERM (default 30)")
    worker.add_argument("--lease", type=float, help="lease of each job in seconds, renewed while it runs (default 30)")
    worker.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    stats = command("stats", "queue sizes, counters and rates", _stats)
    stats.add_argument("--watch", action="store_true", help="refresh as a live table until Ctrl-C")
    stats.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")

    for action, text in (
        ("pause", "stop handing out a queue's jobs (pushes still accepted)"),
        ("resume", "hand out a paused queue's jobs again"),
        ("purge", "delete a queue's ready and delayed jobs"),
    ):
        command(action, text, _control(action)).add_argument("queue", help="queue name")

    dead = command("dead", "dead-letter list: list, retry or purge a queue's dead jobs", _dead)
    dead.add_argument("action", choices=["list", "retry", "purge"])
    dead.add_argument("queue", help="queue name")
    dead.add_argument("ids", nargs="*", help="retry: only these job ids (default: all)")
    dead.add_argument("--limit", type=int, default=50, help="list: jobs shown (default 50)")
    dead.add_argument("--offset", type=int, default=0, help="list: jobs skipped (default 0)")

    listen = command("listen", "print every message published on a channel (one JSON per line)", _listen)
    listen.add_argument("channel")
    listen.add_argument("--count", type=int, help="exit after this many messages")

    publish = command("publish", "broadcast a JSON message to a channel's listeners", _publish)
    publish.add_argument("channel")
    publish.add_argument("data", help="the message as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``presque`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (BrokerError, CLIError) as exc:
        message = exc.message if isinstance(exc, BrokerError) else str(exc)
        print(f"presque: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0 if args.command in ("listen", "stats") else 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
