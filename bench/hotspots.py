"""Summarise a ``py-spy record --format raw`` profile: where the broker's time goes.

    .venv/bin/python bench/hotspots.py PROFILE.txt [--top 25] [--under FUNCTION]

Prints the share of samples in each part of the broker (a stack counts for every part it passes
through), then the functions with the most samples on top of the stack (self) and anywhere in the
stack (inclusive). ``--under`` keeps only stacks through that function.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

LINE_NO = re.compile(r":\d+\)$")

# Parts of the broker, each recognised by a function somewhere in the stack.
PARTS = (
    ("HTTP request/response (uvicorn + Starlette + handler)", "RequestResponseCycle.run_asgi"),
    ("  response writes (uvicorn RequestResponseCycle.send)", "RequestResponseCycle.send"),
    ("WebSocket frames in (Connection._read_loop)", "Connection._read_loop"),
    ("WebSocket frames out (Connection._write_loop)", "Connection._write_loop"),
    ("WebSocket commands (Connection._guarded: push/ack tasks)", "Connection._guarded"),
    ("push coalescer flush (Runtime._flush_pushes)", "Runtime._flush_pushes"),
    ("ack coalescer flush (QueueService.ack_many)", "QueueService.ack_many"),
    ("queue feed: fetch + deal (QueueFeed._run)", "QueueFeed._run"),
    ("pub/sub notifier", "Notifier._run"),
    ("housekeeping (reaper, heartbeat, stats)", "Runtime._housekeeping"),
    ("redis-py: packing commands (pack_command)", "AbstractConnection.pack_command"),
    ("redis-py: socket writes (StreamWriter.writelines)", "StreamWriter.writelines"),
    ("redis-py: reading replies (read_response)", "read_response"),
    ("asyncio: creating tasks (create_task)", "create_task"),
)


def frame_name(frame: str, keep_line: bool) -> str:
    frame = frame.strip()
    if not keep_line:
        frame = LINE_NO.sub(")", frame)
    # Shorten site-packages paths to the package's own path.
    return re.sub(r"\(/.*?/site-packages/", "(", re.sub(r"\(/.*?/(broker|bench)/", r"(\1/", frame))


def load(path: Path, keep_line: bool, under: str | None) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f, keep_line) for f in stack.split(";")]
        if under and not any(under in f for f in frames):
            continue
        stacks.append((frames, int(count)))
    return stacks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--under", help="only stacks that pass through a frame containing this text")
    parser.add_argument("--lines", action="store_true", help="tell lines of a function apart")
    args = parser.parse_args(argv)
    stacks = load(args.profile, args.lines, args.under)
    total = sum(c for _, c in stacks)
    if not total:
        print("no samples")
        return 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    print(f"{total} samples in {args.profile}" + (f" under {args.under!r}" if args.under else ""))
    print("\n-- parts (inclusive) --")
    for label, marker in PARTS:
        count = sum(c for frames, c in stacks if any(marker in f for f in frames))
        print(f"{100 * count / total:6.1f}%  {label}")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"\n-- {title} --")
        for name, count in counter.most_common(args.top):
            print(f"{100 * count / total:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # piped into head
        sys.exit(0)
