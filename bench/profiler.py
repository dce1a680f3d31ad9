"""Profilers attached to a broker process during the measured window of chosen scenarios.

- ``py-spy``: Python stacks (``--format raw``, collapsed); summarise with ``bench/hotspots.py``.
  Samples of a process that is runnable but waiting for a CPU count too, so on a busy machine
  the lines right after a system call (socket writes) are over-represented.
- ``perf``: on-CPU samples only (``cpu-clock``), kernel and native code included: how the CPU
  time splits between the kernel (system calls, loopback TCP), the interpreter and native
  extensions. Written as a ``perf report`` text file.
- ``strace``: system-call counts and times (``strace -c``); it slows the broker a lot, so only
  the counts per job are meaningful.
- ``cprofile``: the broker runs under ``bench/cprofile_broker.py``; exact call counts and CPU
  time (``time.thread_time``) per function, written as ``pstats`` text sorted by own time.
"""

from __future__ import annotations

import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

TOOLS = ("py-spy", "perf", "strace", "cprofile")
PERF_REPORT = (
    "perf",
    "report",
    "--stdio",
    "--no-children",
    "--sort",
    "dso,sym",
    "--percent-limit",
    "0.3",
    "-g",
    "none",
)


class Profiler:
    """Call it with (scenario key, pid, seconds) at the start of a window; ``finish`` at the end of the run."""

    def __init__(self, directory: Path, keys: set[str], tool: str = "py-spy") -> None:
        if tool not in TOOLS:
            raise ValueError(f"unknown profiler {tool!r}: choose from {', '.join(TOOLS)}")
        self.directory = directory
        self.keys = keys
        self.tool = tool
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.cprofiles: list[Path] = []
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, key: str, pid: int, seconds: float) -> None:
        if key not in self.keys:
            return
        secs = str(max(1, round(seconds)))
        if self.tool == "cprofile":
            (self.directory / ".next").write_text(key)
            os.kill(pid, signal.SIGUSR1)
            threading.Timer(seconds, os.kill, (pid, signal.SIGUSR2)).start()
            self.cprofiles.append(self.directory / f"{key}.prof")
            return
        if self.tool == "py-spy":
            binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            out = self.directory / f"{key}.pyspy.txt"
            cmd = [binary, "record", "--pid", str(pid), "--duration", secs, "--rate", "250"]
            cmd += ["--format", "raw", "--output", str(out), "--nonblocking"]
        elif self.tool == "perf":
            out = self.directory / f"{key}.perf.data"
            cmd = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid), "-o", str(out)]
            cmd += ["--", "sleep", secs]
        else:
            out = self.directory / f"{key}.strace.txt"
            cmd = ["timeout", "-s", "INT", secs, "strace", "-c", "-f", "-p", str(pid), "-o", str(out)]
        self.procs.append(
            (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True), out)
        )

    def broker_command(self) -> list[str] | None:
        """How to start a broker so that this profiler can work on it (None: as usual)."""
        if self.tool != "cprofile":
            return None
        return [sys.executable, str(Path(__file__).with_name("cprofile_broker.py"))]

    def broker_env(self) -> dict[str, str]:
        return {"PRESQUE_BENCH_CPROFILE": str(self.directory.resolve())} if self.tool == "cprofile" else {}

    def finish(self) -> None:
        for path in self.cprofiles:
            if path.exists():
                text = io.StringIO()
                stats = pstats.Stats(str(path), stream=text)
                stats.sort_stats("tottime").print_stats(60)
                stats.sort_stats("cumulative").print_stats(60)
                path.with_suffix(".txt").write_text(text.getvalue())
        for proc, out in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait(10)
            if self.tool == "perf" and out.exists():
                report = out.with_suffix(".txt")
                with report.open("w") as f:
                    subprocess.run(
                        [*PERF_REPORT, "-i", str(out)],
                        stdout=f,
                        stderr=subprocess.DEVNULL,
                        check=False,
                    )
