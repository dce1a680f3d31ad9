"""The ``presque`` command line end to end, against a real broker subprocess and Redis.

Most commands run in-process through ``broker.cli.main`` (the same code as the console script);
those whose process behaviour matters (stdin pipes, exit within 5 s, ``listen``) run as
subprocesses. Every test checks what happened to the jobs, not only the exit status.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from broker import SyncClient
from broker.cli import build_parser, main
from broker.errors import UnknownJob
from broker.terminal import Progress, stats_table
from tests.servers import REPO, BrokerServer, free_port, wait_for_sync
from tests.shared_broker import module_broker, qname


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerServer]:
    yield from module_broker(request, tmp_path_factory)


@pytest.fixture
def client(server: BrokerServer) -> Iterator[SyncClient]:
    with SyncClient(server.url) as c:
        yield c


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def presque(
    *argv: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "broker", *argv], input=stdin, capture_output=True, env=full_env, timeout=30
    )


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = ["serve", "push", "fetch", "worker", "stats", "pause", "resume", "purge", "dead", "listen", "publish"]
    for command in [[], *([c] for c in commands)]:
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args([*command, "--help"])
        assert caught.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: presque")
    assert all(c in build_parser().format_help() for c in commands)


def test_push_one_job_and_fetch_it(
    server: BrokerServer, client: SyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    q = qname()
    code, out, _ = run(capsys, "push", q, '{"to": "a@example.com"}', "--url", server.url, "--priority", "7")
    assert code == 0
    job_id = out.strip()
    job = client.job(q, job_id)
    assert (job["state"], job["priority"], job["body"]) == ("ready", 7, {"to": "a@example.com"})

    code, out, _ = run(capsys, "push", q, "[1, 2]", "--url", server.url, "--json", "--delay", "60", "--uniq", "k")
    assert code == 0
    pushed = orjson.loads(out)
    assert pushed["queue"] == q and client.job(q, pushed["id"])["state"] == "delayed"

    code, out, _ = run(capsys, "fetch", q, "--url", server.url)  # destructive: prints the body
    assert (code, orjson.loads(out)) == (0, {"to": "a@example.com"})
    with pytest.raises(UnknownJob):
        client.job(q, job_id)
    code, _, err = run(capsys, "fetch", q, "--url", server.url)
    assert (code, err) == (1, f"presque: no job in {q}\n")


def test_fetch_with_a_lease(server: BrokerServer, client: SyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    q = qname()
    job_id = client.push(q, {"n": 1})
    code, out, _ = run(capsys, "fetch", q, "--lease", "30", "--url", server.url)
    assert code == 0
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["id"] == job_id and fields["attempt"] == "1" and orjson.loads(fields["body"]) == {"n": 1}
    assert client.job(q, job_id)["state"] == "leased"
    client.ack(q, job_id, fields["token"])  # the printed token is the lease's
    client.push(q, {"n": 2})
    code, out, _ = run(capsys, "fetch", q, "--lease", "30", "--json", "--url", server.url)
    data = orjson.loads(out)
    assert data["body"] == {"n": 2} and data["token"] and data["queue"] == q


def test_push_json_lines_from_stdin_in_batches(server: BrokerServer, client: SyncClient) -> None:
    q = qname()
    lines = b"".join(orjson.dumps({"n": n}) + b"\n" for n in range(2500)) + b"\n"  # a blank line is skipped
    result = presque("push", q, "--url", server.url, stdin=lines)
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().startswith(f"pushed 2,500 jobs to {q} in ")
    assert client.queue_info(q)["ready"] == 2500
    assert [client.fetch(q).body for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]  # type: ignore[union-attr]

    # With per-job options the lines are pushed one by one, each with them.
    q2 = qname()
    result = presque("push", q2, "--priority", "2", "--json", env={"PRESQUE_URL": server.url}, stdin=b"1\n2\n3\n")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["pushed"] == 3
    job = client.fetch(q2, lease=10)
    assert job is not None and client.job(q2, job.id)["priority"] == 2


def test_bad_input_is_one_line_and_pushes_nothing(
    server: BrokerServer, client: SyncClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    q = qname()
    code, _, err = run(capsys, "push", q, "{not json", "--url", server.url)
    assert code == 1 and err.startswith("presque: invalid JSON") and err.count("\n") == 1
    code, _, err = run(capsys, "push", "bad name", "1", "--url", server.url)
    assert code == 1 and err.startswith("presque: invalid queue name") and err.count("\n") == 1
    code, _, err = run(capsys, "pause", ".hidden", "--url", server.url)
    assert code == 1 and "invalid queue name" in err
    code, _, err = run(capsys, "publish", "chan", "nope", "--url", server.url)
    assert code == 1 and err.startswith("presque: invalid JSON")
    code, _, err = run(capsys, "stats", "--url", "ftp://nowhere")
    assert code == 1 and "broker URL" in err
    assert q not in client.queues()

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"ok": 1}\n{"ok": 2}\n{oops\n{"ok": 4}\n')))
    code, _, err = run(capsys, "push", q, "--url", server.url)
    assert code == 1
    message = err.splitlines()[-1]
    assert message.startswith("presque: line 3: invalid JSON") and message.endswith("jobs pushed before the error)")
    # Lines are pushed in batches as they are read: the batch holding the bad line and all after it
    # are not pushed; earlier batches are, and the message counts them.
    pushed = int(message.rsplit("(", 1)[1].split()[0])
    assert pushed in (0, 1, 2) and client.queue_info(q)["ready"] == pushed


def test_broker_down_fails_within_five_seconds() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["push", "q", "1"], ["stats"], ["publish", "c", "1"]):
        started = time.monotonic()
        result = presque(*argv, "--url", url)
        assert result.returncode == 1
        assert result.stderr.decode().startswith("presque: cannot reach the broker")
        assert result.stderr.count(b"\n") == 1
        assert time.monotonic() - started < 7  # 5 s at most for the broker, plus start-up


def test_stats(server: BrokerServer, client: SyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    q = qname()
    client.push_many(q, [1, 2, 3])
    code, out, _ = run(capsys, "stats", "--url", server.url)
    assert code == 0
    (row,) = [line.split() for line in out.splitlines() if line.startswith(q)]
    assert row[1:4] == ["3", "0", "0"]  # ready, delayed, leased
    code, out, _ = run(capsys, "stats", "--json", "--url", server.url)
    assert orjson.loads(out)["queues"][q]["ready"] == 3


def test_stats_watch_is_a_live_table(server: BrokerServer, client: SyncClient) -> None:
    q = qname()
    client.push(q, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "broker", "stats", "--watch", "--json", "--interval", "0.2", "--url", server.url]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        try:
            first = orjson.loads(stdout.readline())
            client.push(q, 2)
            wait_for_sync(lambda: orjson.loads(stdout.readline())["queues"][q]["ready"] == 2, 10)
            assert first["queues"][q]["ready"] == 1
        finally:
            proc.send_signal(2)  # Ctrl-C ends a watch normally
            assert proc.wait(10) == 0


def test_stats_table_and_progress_rendering() -> None:
    stats = {
        "queues": {"emails": {"ready": 1200, "delayed": 0, "leased": 3, "dead": 1, "paused": True, "push_rate": 2.5}},
        "totals": {"ready": 1200, "leased": 3},
        "workers": [{}],
    }
    text = stats_table(stats)
    assert text.splitlines()[0] == "1 queues, 1 workers"
    assert text.splitlines()[2].split()[:7] == ["emails", "1,200", "0", "3", "1", "yes", "-"]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress("pushing", stream=screen, source=io.StringIO())
    progress.update(1500, force=True)
    progress.finish()
    assert "pushing: 1,500 jobs" in screen.getvalue()


def test_pause_resume_purge(server: BrokerServer, client: SyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    q = qname()
    client.push_many(q, [1, 2])
    assert run(capsys, "pause", q, "--url", server.url) == (0, f"paused {q}\n", "")
    assert client.queue_info(q)["paused"] is True
    assert run(capsys, "fetch", q, "--url", server.url)[1:] == ("", "presque: queue is closed\n")
    code, out, _ = run(capsys, "resume", q, "--json", "--url", server.url)
    assert (code, orjson.loads(out)) == (0, {"queue": q, "status": "resumed"})
    assert client.queue_info(q)["paused"] is False
    assert run(capsys, "purge", q, "--url", server.url)[0] == 0
    assert client.queue_info(q)["ready"] == 0


def test_dead_list_retry_purge(server: BrokerServer, client: SyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    q = qname()
    ids = []
    for n in range(3):
        client.push(q, {"n": n}, max_attempts=1)
        job = client.fetch(q, lease=30)
        assert job is not None
        client.nack(q, job.id, job.token or "", error=f"boom {n}")
        ids.append(job.id)
    code, out, _ = run(capsys, "dead", "list", q, "--url", server.url)
    assert code == 0 and out.startswith("3 dead jobs") and "boom 1" in out
    code, out, _ = run(capsys, "dead", "list", q, "--json", "--url", server.url)
    assert {j["id"] for j in orjson.loads(out)["jobs"]} == set(ids)

    assert run(capsys, "dead", "retry", q, ids[0], "--url", server.url)[1] == f"retried 1 dead jobs of {q}\n"
    assert client.job(q, ids[0])["state"] == "ready"
    assert run(capsys, "dead", "retry", q, "--json", "--url", server.url)[1] == f'{{"queue":"{q}","retried":2}}\n'
    assert client.queue_info(q)["ready"] == 3

    for _ in ids[:2]:  # kill two again, then purge them
        job = client.fetch(q, lease=30)
        assert job is not None
        client.nack(q, job.id, job.token or "", error="again")
    assert client.dead(q)["total"] == 2
    assert run(capsys, "dead", "purge", q, "--url", server.url)[0] == 0
    assert client.dead(q)["total"] == 0 and client.queue_info(q)["ready"] == 1
    assert run(capsys, "dead", "purge", q, "x", "--url", server.url)[0] == 1


def test_listen_and_publish(server: BrokerServer, capsys: pytest.CaptureFixture[str]) -> None:
    channel = qname("chan")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
    env.update(PYTHONPATH=str(REPO), PRESQUE_URL=server.url)
    cmd = [sys.executable, "-m", "broker", "listen", channel, "--count", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        # Channels are at-most-once: publish until the listener (once it listens) got two.
        deadline = time.monotonic() + 20
        n = 0
        while proc.poll() is None and time.monotonic() < deadline:
            code, out, _ = run(capsys, "publish", channel, orjson.dumps({"n": n}).decode(), "--url", server.url)
            assert (code, out) == (0, f"published to {channel}\n")
            n += 1
            try:
                proc.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    received = [orjson.loads(line) for line in stdout.splitlines()]
    assert len(received) == 2 and received[1]["n"] == received[0]["n"] + 1


def test_worker_command_errors(
    server: BrokerServer, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the worker command puts the cwd on it
    (tmp_path / "notaworker.py").write_text("class Thing:\n    pass\n")
    for spec, message in (
        ("nosuchmodule:Worker", "cannot import 'nosuchmodule'"),
        ("notaworker:Thing", "'notaworker:Thing' is not a broker.Worker subclass"),
        ("no-colon", "expected module:Class"),
    ):
        code, _, err = run(capsys, "worker", spec, "--url", server.url)
        assert (code, err.startswith(f"presque: {message}")) == (1, True), err
    (tmp_path / "noqueues.py").write_text(
        "from broker import Worker\n\nclass W(Worker):\n    async def work(self, job):\n        pass\n"
    )
    code, _, err = run(capsys, "worker", "noqueues:W", "--url", server.url)
    assert code == 1 and "has no queues" in err
    code, _, err = run(capsys, "worker", "noqueues:W", "--queue", "bad name", "--url", server.url)
    assert code == 1 and "invalid queue name" in err
