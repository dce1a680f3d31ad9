"""Instructions redis-server executes per job of push, fetch and ack, for source trees side by side.

    .venv/bin/python bench/lua_instructions.py TREE_A TREE_B [--jobs 600]

Runs a private ``redis-server`` under valgrind's callgrind for each tree (AOF ``everysec`` as
``make run``, ``hz 1`` so that the idle timer adds little), loads that tree's push, fetch and
ack scripts, and counts the instructions of each step at 1, 3, 10 and 100 jobs per call: zero
the counters (``callgrind_control -z``), run the step, dump them (``-d``). Unlike CPU time,
instruction counts do not move with the machine's load, so small differences between trees show.
The scripts are called directly with the arguments ``QueueService`` builds (the client's speed
does not matter here); each tree gets the keys its own ``_lib.lua`` expects.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

BATCHES = (1, 3, 10, 100)
STEPS = ("push", "fetch", "ack")
KEY_NAMES = ("ready", "delayed", "leased", "dead", "expiry", "body", "meta", "uniq", "stats", "state", "done", "lease")


def script_source(tree: Path, name: str) -> str:
    """The script as the tree sends it (its ``broker.scripts.script_source``: a lean front, or
    ``_lib.lua`` in front of the body), or ``_lib.lua`` and the body for trees without that."""
    code = "import sys; from broker.scripts import script_source; sys.stdout.write(script_source(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode == 0:
        return done.stdout
    lua = tree / "broker" / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def queue_keys(tree: Path, queue: str) -> list[str]:
    """The KEYS the tree's scripts take: as many as its ``_lib.lua`` names."""
    count = max(int(i) for i in re.findall(r"KEYS\[(\d+)\]", (tree / "broker/lua/_lib.lua").read_text()))
    return [f"presque:{{{queue}}}:{name}" for name in KEY_NAMES[:count]]


class Callgrind:
    """A redis-server under callgrind, and its instruction counter."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.out = workdir / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}", "redis-server"]
        command += ["--port", str(port), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        command += ["--hz", "1", "--dir", str(workdir)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=port)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], stdout=subprocess.DEVNULL, check=True)

    def instructions(self, step: Callable[[], None]) -> int:
        """Instructions redis-server executed while ``step`` ran."""
        self.control("-z")
        step()
        before = set(self.out.parent.glob(self.out.name + ".*"))
        self.control("-d")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for dump in set(self.out.parent.glob(self.out.name + ".*")) - before:
                found = re.search(r"^totals: (\d+)", dump.read_text(), re.M)
                if found:
                    return int(found.group(1))
            time.sleep(0.1)
        raise TimeoutError("callgrind wrote no dump")

    def stop(self) -> None:
        self.client.shutdown(nosave=True)
        self.proc.wait(timeout=60)


def measure(tree: Path, jobs: int, port: int) -> dict[tuple[str, int], float]:
    workdir = Path(tempfile.mkdtemp(prefix="presque-instr-"))
    server = Callgrind(workdir, port)
    try:
        scripts: dict[str, Any] = {name: server.client.register_script(script_source(tree, name)) for name in STEPS}
        # Trees whose push.lua takes the grouped layout get it for calls of several jobs, as their
        # QueueService sends it.
        grouped = "grouped" in (tree / "broker/lua/push.lua").read_text()
        out: dict[tuple[str, int], float] = {}
        serial = 0
        for batch in BATCHES:
            queue = f"instr-{batch}"
            keys = queue_keys(tree, queue)
            leased: list[tuple[bytes, bytes]] = []

            def push(keys: list[str] = keys, batch: int = batch, queue: str = queue) -> None:
                nonlocal serial
                for _ in range(jobs // batch):
                    args: list[Any] = [f"presque:wake:{queue}", 0, 0]
                    if grouped and batch > 1:  # the options once, then id and body per job
                        args += ["", 5, 0.0, 0.0, "", 5]
                    for _ in range(batch):
                        serial += 1
                        args += [f"{serial:021x}", b'{"n":1}']
                        if not grouped or batch == 1:
                            args += [5, 0.0, 0.0, "", 5]
                    scripts["push"](keys=keys, args=args)

            def fetch(keys: list[str] = keys, batch: int = batch, leased: list[tuple[bytes, bytes]] = leased) -> None:
                for _ in range(jobs // batch):
                    raw = scripts["fetch"](keys=keys, args=[batch, 30.0, os.urandom(9).hex(), 0, 0])
                    leased.extend((raw[i], raw[i + 1]) for i in range(2, len(raw), 5))

            def ack(keys: list[str] = keys, batch: int = batch, queue: str = queue, leased: list[Any] = leased) -> None:
                for i in range(0, len(leased), batch):
                    args: list[Any] = [f"presque:wake:{queue}", 0]
                    for job_id, token in leased[i : i + batch]:
                        args += [job_id, token]
                    assert all(status == 1 for status in scripts["ack"](keys=keys, args=args))

            for name, step in (("push", push), ("fetch", fetch), ("ack", ack)):
                out[(name, batch)] = server.instructions(step) / jobs
        return out
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--jobs", type=int, default=600, help="jobs per step")
    args = parser.parse_args(argv)
    if not shutil.which("valgrind"):
        print("valgrind is not installed", file=sys.stderr)
        return 1
    results = [measure(tree, args.jobs, 6390 + i) for i, tree in enumerate(args.trees)]
    print(f"redis-server instructions per job (callgrind), {args.jobs:,} jobs per step")
    print(f"{'step':<7}{'batch':>6}" + "".join(f"{tree.name[:14]:>16}" for tree in args.trees))
    for name in (*STEPS, "total"):
        for batch in BATCHES:
            steps = STEPS if name == "total" else (name,)
            cells = [sum(result[(step, batch)] for step in steps) for result in results]
            first = cells[0]
            row = "".join(f"{c:>10,.0f} {(c - first) / first * 100:+4.0f}%" for c in cells)
            print(f"{name:<7}{batch:>6}{row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
