"""``python -m broker serve`` under cProfile, switched on and off by signals (``--profiler cprofile``).

cProfile counts every call exactly and, timed with ``time.thread_time``, charges only CPU time —
unlike a sampler, it is not misled by a busy machine. SIGUSR1 starts a profile; SIGUSR2 stops it
and writes it to ``$PRESQUE_BENCH_CPROFILE/<name>.prof``, ``<name>`` being the content of the
file ``.next`` there (the scenario's key).

    PRESQUE_BENCH_CPROFILE=DIR python bench/cprofile_broker.py serve --port ...
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

OUT = Path(os.environ.get("PRESQUE_BENCH_CPROFILE", "."))
current: list[cProfile.Profile] = []


def start(signum: int, frame: FrameType | None) -> None:
    profile = cProfile.Profile(time.thread_time)
    current.append(profile)
    profile.enable()


def stop(signum: int, frame: FrameType | None) -> None:
    if not current:
        return
    profile = current.pop()
    profile.disable()
    name = (OUT / ".next").read_text().strip() or "profile"
    profile.dump_stats(str(OUT / f"{name}.prof"))


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from broker.cli import main

    sys.exit(main(sys.argv[1:]))
