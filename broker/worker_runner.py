"""Running workers: signals, several processes, and loading ``module:Class``.

One process: SIGTERM or SIGINT stops taking jobs and lets the running ones finish within the
worker's ``grace``; whatever is left goes back to the queue when the connection closes; exit 0.
A second signal exits at once (status 128 + signal number).

``processes=N`` forks N children running the same code. The parent forwards the first
SIGTERM/SIGINT as SIGTERM (the children ignore SIGINT, so a terminal's Ctrl-C, which reaches the
whole process group, is not counted twice), SIGKILLs them on a second signal, restarts a child
that died unexpectedly (with backoff), and exits 0 once all have stopped. A child whose parent
disappeared stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from broker.worker import Worker

log = logging.getLogger("presque.worker")

WorkerFactory = Callable[[], "Worker"]


def load_worker_class(spec: str) -> type[Worker]:
    """Import ``module:Class`` (the module from the working directory first).

    Raises:
        ValueError: a bad spec, a missing module or class, or a class that is not a Worker.
    """
    from broker.worker import Worker

    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"expected module:Class, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise ValueError(f"{spec!r} is not a broker.Worker subclass")
    return cls


def run(factory: WorkerFactory, *, processes: int = 1) -> int:
    """Run workers made by ``factory`` until signalled; returns the exit status (0)."""
    if processes <= 1:
        return run_one(factory())
    return Supervisor(factory, processes).run()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        loop = asyncio.new_event_loop()
    return loop


def run_one(worker: Worker, *, managed: bool = False) -> int:
    """Run one worker in this process until SIGTERM/SIGINT (or :meth:`Worker.stop`).

    Args:
        managed: a child of :class:`Supervisor`: ignore SIGINT, treat every SIGTERM as the first,
            and stop when the parent is gone.
    """
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    signals = [0]
    parent = os.getppid()

    def on_signal(signum: int) -> None:
        signals[0] += 1
        if signals[0] > 1 and not managed:
            log.warning("second signal: exiting at once")
            logging.shutdown()
            os._exit(128 + signum)
        if signals[0] == 1:
            log.info("received %s: stopping", signal.Signals(signum).name)
            worker.stop()

    async def orphan_watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                log.warning("parent process gone: stopping")
                worker.stop()
                return

    async def main() -> None:
        watch = asyncio.create_task(orphan_watch()) if managed else None
        try:
            await worker.serve()
        finally:
            if watch is not None:
                watch.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
    if managed:
        loop.add_signal_handler(signal.SIGINT, lambda: None)
    else:
        loop.add_signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
    try:
        loop.run_until_complete(main())
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    if any(t.name.startswith("presque-") and t.is_alive() for t in threading.enumerate()):
        # A plain `def work` still running past the grace period: threads cannot be cancelled.
        # Its job was handed back when the connection closed; do not wait for it.
        logging.shutdown()
        os._exit(0)
    return 0


def _child(factory: WorkerFactory) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(run_one(factory(), managed=True))


class Supervisor:
    """Runs ``processes`` worker children and forwards signals to them."""

    def __init__(self, factory: WorkerFactory, processes: int) -> None:
        self.factory = factory
        self.processes = processes
        methods = multiprocessing.get_all_start_methods()
        self.context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.children: dict[int, BaseProcess] = {}
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.signals = 0
        self.last_signal = 0

    def _start(self, slot: int) -> None:
        name = f"presque-worker-{slot}"
        proc = self.context.Process(target=_child, args=(self.factory,), name=name)  # type: ignore[attr-defined]
        proc.start()
        self.children[slot] = proc
        self.started_at[slot] = time.monotonic()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        self.last_signal = signum
        if self.signals == 1:
            log.info("received %s: stopping %d worker processes", signal.Signals(signum).name, len(self.children))
            self._send(signal.SIGTERM)
        else:
            log.warning("second signal: killing worker processes")
            self._send(signal.SIGKILL)

    def _send(self, sig: int) -> None:
        for proc in self.children.values():
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        restart_at: dict[int, float] = {}
        try:
            for slot in range(self.processes):
                self._start(slot)
            while self.children or (restart_at and not self.signals):
                if self.signals and restart_at:
                    restart_at.clear()
                now = time.monotonic()
                for slot, when in list(restart_at.items()):
                    if now >= when:
                        del restart_at[slot]
                        self._start(slot)
                sentinels = [p.sentinel for p in self.children.values()]
                if sentinels:
                    multiprocessing.connection.wait(sentinels, timeout=0.2)
                else:
                    time.sleep(0.2)
                for slot, proc in list(self.children.items()):
                    if proc.is_alive():
                        continue
                    proc.join()
                    del self.children[slot]
                    if self.signals:
                        continue
                    ran = time.monotonic() - self.started_at[slot]
                    self.failures[slot] = 0 if ran > 60 else self.failures.get(slot, 0) + 1
                    delay = min(30.0, 0.5 * 2 ** self.failures[slot])
                    log.error("worker process %s exited with %s; restarting in %.1fs", proc.pid, proc.exitcode, delay)
                    restart_at[slot] = time.monotonic() + delay
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 128 + self.last_signal if self.signals > 1 else 0
