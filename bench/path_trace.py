"""Where a job's push-to-delivery time goes inside the broker, at low load (HTTP push).

    .venv/bin/python bench/path_trace.py TREE [TREE ...] [--rounds 2]

For each tree (a directory holding a ``broker`` package, e.g. ``git archive main | tar -x -C
DIR``) a copy is made with timestamps (``time.monotonic``, the clock the load generators stamp
their bodies with, which also tells the jobs apart) at four points of the HTTP push path: the request read
(``LeanHttpProtocol.on_message_complete``), the ``push_fetch`` call written to Redis
(``_Link.write``), its reply read (``_Link.data_received``) and the job frame written to the
subscriber (``QueueFeed._deal``). ``bench/run.py --quick --only latency`` then runs against each
copy in turn, ``--rounds`` times, and the medians of each step at 1,000 jobs/s are printed.

The steps inside the broker (read → written, reply → dealt) are its own Python, far steadier on
a noisy machine than the end-to-end latency, which adds the hops between processes: the tool
to judge a change to the path. The copies are patched by text; a tree whose lines moved makes
the patch fail loudly rather than measure the wrong thing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = Path(__file__).with_name("run.py")

TRACE_MODULE = '''"""Timestamps along a push's path (written by bench/path_trace.py; not part of the broker).

Each job is known by its body's client stamp ("t"), so that overlapping requests keep apart."""
import json, os, re, time
now = time.monotonic
T_RE = re.compile(rb'"t":([0-9.]+)')
records = {}
def _key(body):
    m = T_RE.search(body) if isinstance(body, (bytes, bytearray)) else None
    return m.group(1) if m else None
def _mark(key, name):
    record = records.get(key) if key is not None else None
    if record is not None and name not in record:
        record[name] = now()
def start(body):
    key = _key(body)
    if key is not None:
        records[key] = {"t0": float(key), "read": now()}
        if len(records) % 500 == 0:
            with open(os.environ["BENCH_PATH_TRACE"] + f".{os.getpid()}", "w") as f:
                json.dump(list(records.values()), f)
def written(name, args):
    for arg in args:
        key = _key(arg)
        if key is not None:
            _mark(key, "written_" + name)
def replied(name, reply):
    if name == "push_fetch" and isinstance(reply, list) and len(reply) == 2 and len(reply[1]) > 5:
        for i in range(5, len(reply[1]), 5):
            _mark(_key(reply[1][i]), "reply_" + name)
def dealt(jobs):
    for job in jobs:
        _mark(_key(job.body), "dealt")
'''

PATCHES = [
    (
        "broker/httpproto.py",
        "        jobs = fast.jobs(bytes(lean.body), admitted.batch)\n",
        "        from broker import _path_trace; _path_trace.start(bytes(lean.body))\n"
        "        jobs = fast.jobs(bytes(lean.body), admitted.batch)\n",
    ),
    (
        "broker/pipe.py",
        "            self.transport.write(call.packed)\n",
        "            from broker import _path_trace; _path_trace.written(call.script.name, call.args)\n"
        "            self.transport.write(call.packed)\n",
    ),
    (
        "broker/pipe.py",
        "            call = pending.popleft()\n",
        "            call = pending.popleft()\n"
        "            from broker import _path_trace\n"
        "            if call is not None: _path_trace.replied(call.script.name, reply)\n",
    ),
    (
        "broker/feed.py",
        "            conn.flush()\n",
        "            conn.flush()\n        from broker import _path_trace; _path_trace.dealt(jobs)\n",
    ),
]

STEPS = [
    ("t0", "read", "client stamp → request read"),
    ("read", "written_push_fetch", "request read → call written"),
    ("written_push_fetch", "reply_push_fetch", "call written → reply read (Redis)"),
    ("reply_push_fetch", "dealt", "reply read → job frame written"),
    ("t0", "dealt", "client stamp → job frame written"),
]
WINDOW = 2000  # the records of the HTTP 1,000/s row (2 s in --quick), which runs first


def patched_copy(tree: Path, into: Path) -> Path:
    copy = into / tree.name
    shutil.copytree(tree, copy, ignore=shutil.ignore_patterns(".venv", ".git", "data", "__pycache__"))
    (copy / "broker" / "_path_trace.py").write_text(TRACE_MODULE)
    for name, old, new in PATCHES:
        path = copy / name
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{tree}: cannot patch {name}: {old.strip()!r} not found once")
        path.write_text(text.replace(old, new))
    return copy


def one_run(copy: Path, trace: Path) -> dict[str, float]:
    for old in trace.parent.glob(trace.name + ".*"):
        old.unlink()
    env = {**os.environ, "BENCH_PATH_TRACE": str(trace)}
    out = trace.with_suffix(".bench.json")
    cmd = [sys.executable, str(RUN), "--quick", "--only", "latency", "--src", str(copy), "--json", str(out)]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=env)
    files = sorted(trace.parent.glob(trace.name + ".*"))
    records = json.loads(files[0].read_text())[:WINDOW] if files else []
    complete = [r for r in records if r.get("t0") and all(k in r for _, k, _ in STEPS)]
    medians: dict[str, float] = {"jobs": float(len(complete))}
    for start, end, label in STEPS:
        values = [(r[end] - r[start]) * 1e6 for r in complete]
        medians[label] = statistics.median(values) if values else float("nan")
    if out.exists():
        rows = {row["key"]: row["figures"] for row in json.loads(out.read_text())["rows"]}
        medians["end to end p50 (bench)"] = (rows.get("latency_http_1000", {}).get("p50_ms") or 0) * 1000
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="presque-trace-") as tmp:
        copies = [patched_copy(tree.resolve(), Path(tmp) / str(i)) for i, tree in enumerate(args.trees)]
        runs: list[list[dict[str, float]]] = [[] for _ in copies]
        for r in range(args.rounds):
            for i, copy in enumerate(copies):
                print(f"round {r + 1}/{args.rounds}: {args.trees[i]}", file=sys.stderr, flush=True)
                runs[i].append(one_run(copy, Path(tmp) / f"trace-{i}"))
    labels = [label for _, _, label in STEPS] + ["end to end p50 (bench)", "jobs"]
    print(f"{'median µs, HTTP push at 1,000/s':<36}" + "".join(f" | {t.name[:18]:>18}" for t in args.trees))
    for label in labels:
        cells = [
            statistics.median(run[label] for run in tree_runs) if tree_runs else float("nan") for tree_runs in runs
        ]
        print(f"{label:<36}" + "".join(f" | {c:>18.1f}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
