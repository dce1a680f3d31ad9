"""Compare broker source trees on the same scenarios, interleaved, to judge an optimisation.

    .venv/bin/python bench/ab.py A_DIR B_DIR [C_DIR ...] [--only e2e,push] [--rounds 3] [--duration 3]

Runs ``bench/run.py --json`` for each tree in turn, ``--rounds`` times (A B A B ...), so that a
busy machine slows every tree alike, then prints per scenario the median of jobs/s, of the
broker's and Redis's CPU time per job (the steadier figures) and, for latency rows (``--only
latency``), of p50 and p99, for each tree. A tree is any directory holding a ``broker``
package, e.g. ``git archive <commit> | tar -x -C DIR`` or a patched copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = Path(__file__).with_name("run.py")
# Per scenario, the median of each figure it has: rates and CPU, and for the latency rows
# (``--only latency``) the percentiles.
FIGURES = (
    ("jobs_per_s", "jobs/s", ",.1f"),
    ("broker_us_per_job", "broker µs/job", ",.1f"),
    ("redis_us_per_job", "Redis µs/job", ",.1f"),
    ("p50_ms", "p50 ms", ".3f"),
    ("p99_ms", "p99 ms", ".3f"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--only", default="push,e2e")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    results: dict[int, list[dict[str, dict[str, float]]]] = {i: [] for i in range(len(args.trees))}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, tree in enumerate(args.trees):
                out = Path(tmp) / f"{i}-{r}.json"
                cmd = [sys.executable, str(RUN), "--quick", "--only", args.only, "--duration", str(args.duration)]
                cmd += ["--src", str(tree), "--json", str(out)]
                print(f"round {r + 1}/{args.rounds}: {tree}", file=sys.stderr, flush=True)
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                if out.exists():
                    rows = json.loads(out.read_text())["rows"]
                    results[i].append({row["key"]: row["figures"] for row in rows})
    keys = [k for k in (results[0][0] if results[0] else {}) if not k.startswith(("base_", "noop_"))]
    print(f"{'scenario':<22}" + "".join(f" | {t.name[:24]:>24}" for t in args.trees))
    for key in keys:
        for figure, label, fmt in FIGURES:
            cells = []
            for i in range(len(args.trees)):
                values = [run[key][figure] for run in results[i] if key in run and run[key].get(figure) is not None]
                cells.append(f"{statistics.median(values):>24{fmt}}" if values else f"{'-':>24}")
            if any(c.strip() != "-" for c in cells):
                print(f"{key + ' ' + label:<22}" + "".join(f" | {c}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
