"""Rows of the benchmark table: figures, their ratio to the baseline, and the issue's targets."""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import subprocess
import sys
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_ms(values: Sequence[float]) -> dict[str, float | None]:
    def ms(q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else v * 1000

    return {"p50_ms": ms(50), "p99_ms": ms(99), "p99.9_ms": ms(99.9), "samples": len(values)}


@dataclass
class Target:
    """``figure`` compared with ``value`` by ``op`` (">=" or "<=")."""

    figure: str
    op: str
    value: float
    label: str

    def met(self, figures: dict[str, Any]) -> bool | None:
        got = figures.get(self.figure)
        if got is None:
            return None
        compare = operator.ge if self.op == ">=" else operator.le
        return bool(compare(got, self.value))


@dataclass
class Row:
    """One line of the table."""

    key: str
    title: str
    figures: dict[str, Any]
    baseline: str | None = None  # figure of the baseline this row's main figure is compared with
    ratio: float | None = None
    targets: list[Target] = field(default_factory=list)
    note: str = ""

    def verdicts(self) -> list[tuple[Target, bool | None]]:
        return [(t, t.met(self.figures)) for t in self.targets]


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{round(value):,}"


def _ms(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


COLUMNS = (
    "scenario",
    "jobs/s",
    "xbase",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "CPU % broker·Redis·clients·other",
    "broker µs/job",
    "Redis µs/job",
    "target",
)


def _cpu(f: dict[str, Any]) -> str:
    broker = f.get("broker_cpu")
    if broker is None:
        return "-"
    parts = ["+".join(f"{c * 100:.0f}" for c in broker)]
    for key in ("redis_cpu", "client_cpu", "other_cpu"):
        parts.append("-" if f.get(key) is None else f"{f[key] * 100:.0f}")
    return "·".join(parts)


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (readable as plain text too)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        f = row.figures
        verdict = "; ".join(
            f"{t.label}: {'met' if ok else 'NOT met' if ok is not None else 'n/a'}" for t, ok in row.verdicts()
        )
        cells = [
            row.title,
            _num(f.get("jobs_per_s")),
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            _ms(f.get("p50_ms")),
            _ms(f.get("p99_ms")),
            _ms(f.get("p99.9_ms")),
            _cpu(f),
            _num(f.get("broker_us_per_job"), 1) if f.get("broker_us_per_job") is not None else "-",
            _num(f.get("redis_us_per_job"), 1) if f.get("redis_us_per_job") is not None else "-",
            (verdict + (" — " if verdict and row.note else "") + row.note) or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(src: Path) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "cpu_index_us": cpu_index(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": _git_commit(src),
    }


def cpu_index() -> float:
    """Best time of ``sum(range(1000))`` in µs: how fast this machine runs Python right now.

    About 8-10 µs on an idle modern x86 core; a figure two or three times higher says the machine
    was busy (shared cores), and every other figure of the run is low in the same proportion.
    """
    return round(min(timeit.repeat("sum(range(1000))", number=2000, repeat=9)) / 2000 * 1e6, 1)


def _git_commit(src: Path) -> str:
    """The commit of ``src`` (with ``+`` when its tree has changes), or its .commit file, or ''."""
    stamp = src / ".commit"
    if stamp.is_file():
        return stamp.read_text().strip()
    try:
        run = {"capture_output": True, "text": True, "timeout": 5, "cwd": src}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()  # type: ignore[call-overload]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "broker"], **run).stdout.strip()  # type: ignore[call-overload]
        return head + ("+" if dirty else "")
    except OSError:
        return ""


def header(info: dict[str, Any]) -> str:
    return (
        f"presque bench — {info['date']} — {info['nproc']} x {info['cpu']} — Python {info['python']} — "
        f"Redis {info['redis']} — commit {info['commit']} — CPU index {info['cpu_index_us']} µs"
        f"{' — quick' if info.get('quick') else ''}"
    )


def write_json(path: Path, info: dict[str, Any], rows: Sequence[Row], extra: dict[str, Any]) -> None:
    data = {
        "info": info,
        "rows": [
            {
                **asdict(r),
                "verdicts": [{"target": t.label, "met": ok} for t, ok in r.verdicts()],
            }
            for r in rows
        ],
        **extra,
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
