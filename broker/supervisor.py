"""``presque serve``: one broker process, or ``--workers N`` of them sharing one port.

With N > 1 the parent process binds the port, starts the embedded ``redis-server`` once (when no
Redis is configured), and runs N worker processes (``spawn``ed, each a whole broker: its own
uvicorn, runtime and Redis connections) that accept connections on the shared socket. The
parent keeps them running: a worker that dies is started again, while its leases come back
through the others' reaper (``broker/runtime.py``). On SIGTERM or SIGINT the parent asks every
worker to shut down gracefully (WebSocket ``shutdown`` frames, leases returned), waits for them,
then stops the embedded Redis.

Workers share nothing but Redis: queues, leases, pause flags, rate limits, counters, the worker
and process registries and pub/sub all live there, so any worker may serve any client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import types
from multiprocessing.context import SpawnProcess
from multiprocessing.reduction import ForkingPickler
from types import FrameType
from typing import Any

from broker.auth import warn_if_exposed
from broker.config import Settings
from broker.errors import ConfigError
from broker.logs import setup_logging

log = logging.getLogger("presque.supervisor")

STARTUP_FAILURE = 3  # uvicorn's exit status when the app's lifespan startup fails
STOP_TIMEOUT = 30.0  # graceful WebSocket shutdown (10 s) + uvicorn's own (10 s), and some margin
RESTART_PAUSE = 1.0  # at most one restart per second for each worker slot
PARENT_CHECK = 1.0  # how often a worker checks that its parent still lives


def serve(settings: Settings, *, host: str, port: int, workers: int = 1) -> int:
    """Run the broker until SIGINT/SIGTERM; returns the exit status.

    Args:
        settings: the broker's settings.
        host: address to listen on.
        port: port to listen on.
        workers: broker processes sharing the port.

    Raises:
        ConfigError: ``workers`` is below 1.
        RedisSetupError: the configured Redis is unreachable or would lose jobs.
    """
    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    setup_logging(settings.server)
    warn_if_exposed(host, settings)
    if not settings.redis.embedded:
        from broker.redis import preflight

        asyncio.run(preflight(settings.redis))
    if workers == 1:
        _run_worker(settings, None, host, port, None)
        return 0
    from broker.embedded import EmbeddedRedis

    embedded = EmbeddedRedis.from_settings(settings.redis) if settings.redis.embedded else None
    if embedded is not None:
        embedded.start()
        log.info("embedded redis-server started for %d workers, data in %s", workers, settings.redis.data_dir)
    try:
        url = embedded.url if embedded is not None else None
        return Supervisor(settings, host=host, port=port, workers=workers, redis_url=url).run()
    finally:
        if embedded is not None:
            embedded.stop()


def _run_worker(
    settings: Settings, redis_url: str | None, host: str, port: int, sockets: list[socket.socket] | None
) -> None:
    from broker.app import create_app
    from broker.server import PresqueServer, uvicorn_config

    app = create_app(settings, redis_url=redis_url)
    # log_config=None: uvicorn's records go through our handler (setup_logging), not its own.
    config = uvicorn_config(app, settings, host=host, port=port, log_config=None)
    PresqueServer(config, app).run(sockets=sockets)


def _worker_main(settings: Settings, redis_url: str | None, host: str, port: int, sock: socket.socket) -> None:
    """A worker process: logging, an orphan check, then one whole broker on the shared socket."""
    setup_logging(settings.server)
    parent = os.getppid()

    def orphan_watch() -> None:
        # A supervisor killed with SIGKILL cannot stop its workers: they stop themselves, gracefully.
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK)
        log.warning("supervisor (pid %d) is gone: shutting down", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphan_watch, name="presque-orphan-watch", daemon=True).start()
    _run_worker(settings, redis_url, host, port, [sock])


def _mapping_proxy(mapping: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(mapping)


def _reduce_mapping_proxy(proxy: types.MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return _mapping_proxy, (dict(proxy),)


class Supervisor:
    """Runs ``workers`` broker processes on one listening socket and keeps them running.

    Args:
        settings: the broker's settings (sent to every worker).
        host: address to listen on.
        port: port to listen on (0: any free port, see :attr:`port` once started).
        workers: how many processes.
        redis_url: the Redis every worker connects to instead of the configured one (the
            embedded server's).
    """

    def __init__(self, settings: Settings, *, host: str, port: int, workers: int, redis_url: str | None) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.workers = workers
        self.redis_url = redis_url
        self.processes: list[SpawnProcess | None] = [None] * workers
        self._started_at = [0.0] * workers
        self._stop = threading.Event()
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        """Serve until a signal asks to stop; 1 if a worker could not start (its log says why)."""
        from broker.server import uvicorn_config

        # The settings travel to the workers pickled; their read-only mappings become plain
        # mappings on the way and read-only again on arrival.
        ForkingPickler.register(types.MappingProxyType, _reduce_mapping_proxy)

        sock = uvicorn_config(None, self.settings, host=self.host, port=self.port, log_config=None).bind_socket()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        status = 0
        try:
            log.info("supervisor (pid %d) starting %d workers", os.getpid(), self.workers)
            for slot in range(self.workers):
                self._start(slot, sock)
            while not self._stop.wait(0.2):
                status = self._check(sock)
                if status:
                    break
        finally:
            self._stop_all()
            sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("supervisor stopped")
        return status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def _start(self, slot: int, sock: socket.socket) -> None:
        process = self._context.Process(
            target=_worker_main,
            args=(self.settings, self.redis_url, self.host, self.port, sock),
            name=f"presque-worker-{slot}",
        )
        process.start()
        self.processes[slot] = process
        self._started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %s)", slot, process.pid)

    def _check(self, sock: socket.socket) -> int:
        for slot, process in enumerate(self.processes):
            if process is None or process.exitcode is None:
                continue
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %d (pid %s) could not start: stopping", slot, process.pid)
                return 1
            if time.monotonic() - self._started_at[slot] < RESTART_PAUSE:
                continue
            log.warning("worker %d (pid %s) died with status %s: starting another", slot, process.pid, process.exitcode)
            process.close()
            self._start(slot, sock)
        return 0

    def _stop_all(self) -> None:
        running = [p for p in self.processes if p is not None and p.exitcode is None]
        for process in running:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.warning("worker (pid %s) did not stop in %.0fs: killing it", process.pid, STOP_TIMEOUT)
                process.kill()
                process.join()
