"""What the ``presque`` command line shows on a terminal: tables and a progress line."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

STATS_COLUMNS = (
    ("queue", "QUEUE"),
    ("ready", "READY"),
    ("delayed", "DELAYED"),
    ("leased", "LEASED"),
    ("dead", "DEAD"),
    ("paused", "PAUSED"),
    ("pushed", "PUSHED"),
    ("processed", "PROCESSED"),
    ("failed", "FAILED"),
    ("consumers", "CONSUMERS"),
    ("push_rate", "PUSH/S"),
    ("ack_rate", "ACK/S"),
)


def compact(value: Any) -> str:
    """Compact JSON text."""
    return orjson.dumps(value).decode()


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    texts = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in texts)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [values[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in texts)])


def stats_table(stats: dict[str, Any]) -> str:
    """``GET /stats`` as a table: one row per queue, then the totals."""
    queues: dict[str, dict[str, Any]] = stats.get("queues", {})
    rows = [[name, *(q.get(key) for key, _ in STATS_COLUMNS[1:])] for name, q in sorted(queues.items())]
    totals = stats.get("totals", {})
    rows.append(["(total)", *(None if key == "paused" else totals.get(key) for key, _ in STATS_COLUMNS[1:])])
    head = f"{len(queues)} queues, {len(stats.get('workers', []))} workers"
    return head + "\n" + table([h for _, h in STATS_COLUMNS], rows)


def dead_table(dead: dict[str, Any]) -> str:
    rows = []
    for job in dead.get("jobs", []):
        failed = job.get("failed_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failed)) if failed else None
        rows.append(
            [
                job["id"],
                job.get("attempt"),
                when,
                _clip(job.get("last_error") or "", 60),
                _clip(compact(job.get("body")), 60),
            ]
        )
    total = dead.get("total", len(rows))
    return f"{total} dead jobs\n" + table(["ID", "ATTEMPTS", "FAILED AT", "LAST ERROR", "BODY"], rows)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class Progress:
    """A one-line progress display on a terminal's stderr (nothing when stderr is not a TTY).

    The percentage comes from the bytes read when stdin is a regular file; otherwise the line
    shows the count and the rate only.
    """

    def __init__(self, label: str, stream: TextIO | None = None, source: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.started = time.monotonic()
        self._shown = 0.0
        self.total_bytes = 0
        source = source or sys.stdin
        try:
            info = os.fstat(source.fileno())
            if stat.S_ISREG(info.st_mode):
                self.total_bytes = info.st_size
        except (OSError, ValueError, AttributeError):
            pass

    def update(self, done: int, bytes_read: int = 0, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._shown < 0.1):
            return
        self._shown = now
        rate = done / max(now - self.started, 1e-9)
        text = f"{self.label}: {done:,} jobs  {rate:,.0f}/s"
        if self.total_bytes:
            fraction = min(1.0, bytes_read / self.total_bytes)
            filled = int(fraction * 30)
            text = f"[{'#' * filled}{' ' * (30 - filled)}] {fraction:4.0%}  " + text
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
