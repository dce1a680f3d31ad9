"""``make bench``: every scenario of the performance issue, against a raw-Redis baseline.

Starts its own ``redis-server`` (the settings of ``make run``: AOF, ``appendfsync everysec``)
and ``python -m broker serve`` processes, runs each scenario for a bounded time with load
generators in other processes, and prints a table with each figure's ratio to the baseline and
the issue's targets. ``--json PATH`` also writes every figure as JSON.

    .venv/bin/python bench/run.py [--quick] [--json PATH] [--only KEY,...] [--profile DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scenarios_consume, scenarios_latency, scenarios_push
from bench.baseline import run_baseline, run_framework
from bench.context import Bench, other_cpu, redis_cost
from bench.harness import Measurement
from bench.procs import REPO, RedisProc, raise_nofile
from bench.profiler import TOOLS, Profiler
from bench.report import Row, cpu_index, header, latency_ms, machine, now_iso, progress, table, write_json

BUSY = 0.3  # cores used by other processes beyond which a scenario's figures are suspect
GROUPS = ("push", "consume", "e2e", "latency", "idle", "scale")


def baseline_rows(b: Bench, warmup: float, duration: float) -> list[Row]:
    progress("baseline (raw redis-py on the same Redis) ...")
    m = run_baseline(b.client, b.redis_url, [p.pid for p in b.brokers], warmup, duration)
    lpush = m["lpush"].commands.get("lpush", 0) / m["lpush"].duration
    brpop = m["brpop"].commands.get("brpop", 0) / m["brpop"].duration
    lat = latency_ms(m["latency"].latencies())
    lpush_cost = redis_cost(m["lpush"], lpush * m["lpush"].duration)
    brpop_cost = redis_cost(m["brpop"], brpop * m["brpop"].duration)
    b.baseline = {
        "lpush": lpush,
        "brpop": brpop,
        "latency": lat["p50_ms"] or 0.0,
        "redis_us_per_job": lpush_cost.get("redis_us_per_job", 0.0) + brpop_cost.get("redis_us_per_job", 0.0),
        "redis_cmds_per_job": 2.0,
    }
    b.details["baseline"] = {k: {"rates": v.rates, "commands": v.commands} for k, v in m.items()}
    progress("framework ceiling (no-op Starlette app, no Redis) ...")
    fw = run_framework(b.workdir, b.client, warmup, duration)
    http = fw["http"]
    http_rate = http.client_sum("count") / http.duration
    frames = fw["ws"].client_sum("count") / fw["ws"].duration
    b.baseline["noop_http"] = http_rate
    b.baseline["noop_ws_frames"] = frames

    def per_op(m: Measurement, rate: float) -> dict[str, float]:
        return {"broker_us_per_job": m.broker_cpu[0] / rate * 1e6} if rate else {}

    return [
        Row("base_lpush", "0. Baseline: redis-py LPUSH pipeline, 100/round trip", {"jobs_per_s": lpush, **lpush_cost}),
        Row("base_brpop", "0. Baseline: redis-py BRPOP, one per job", {"jobs_per_s": brpop, **brpop_cost}),
        Row(
            "base_latency",
            "0. Baseline: LPUSH → BRPOP latency, 1,000/s",
            {**lat},
            note=f"LPUSH+BRPOP cost {b.baseline['redis_us_per_job']:.1f} µs of Redis CPU per job",
        ),
        Row(
            "noop_http",
            "0. Ceiling: no-op Starlette POST, 64 conns",
            {
                "jobs_per_s": http_rate,
                **latency_ms(http.latencies()),
                "broker_cpu": http.broker_cpu,
                "client_cpu": http.client_cpu,
                "other_cpu": other_cpu(http),
                **per_op(http, http_rate),
            },
            note="requests/s; the HTTP framework alone, no Redis",
        ),
        Row(
            "noop_ws",
            "0. Ceiling: no-op Starlette WebSocket frames out",
            {
                "jobs_per_s": frames,
                "broker_cpu": fw["ws"].broker_cpu,
                "client_cpu": fw["ws"].client_cpu,
                "other_cpu": other_cpu(fw["ws"]),
                **per_op(fw["ws"], frames),
            },
            note="frames/s on one connection",
        ),
    ]


def scenarios(b: Bench, only: set[str], idle: int) -> list[tuple[str, Callable[[], list[Row]]]]:
    out: list[tuple[str, Callable[[], list[Row]]]] = []
    if "push" in only:
        out += [
            ("HTTP push, 1 connection", lambda: [scenarios_push.http_single(b, 1)]),
            ("HTTP push, 64 connections", lambda: [scenarios_push.http_single(b, 64)]),
            ("HTTP batch push", lambda: [scenarios_push.http_batch(b)]),
            ("WebSocket push", lambda: [scenarios_push.ws_push(b)]),
        ]
    if "consume" in only:
        for prefetch in (1, 100):
            for consumers in (1, 4):
                out.append(
                    (
                        f"WS consume p{prefetch} c{consumers}",
                        lambda p=prefetch, c=consumers: [scenarios_consume.consume(b, p, c)],  # type: ignore[misc]
                    )
                )
    state: dict[str, Row] = {}
    if "e2e" in only or "scale" in only:

        def e2e() -> list[Row]:
            row, m = scenarios_consume.end_to_end(b)
            state["e2e"] = row
            return [row, scenarios_consume.redis_cost_row(b, m)]

        out.append(("end to end + Redis cost", e2e))
    if "latency" in only:
        for via in ("http", "ws"):
            for rate in (1000, 5000):
                out.append(
                    (
                        f"latency {via} {rate}/s",
                        lambda v=via, r=rate: [scenarios_latency.latency(b, v, r)],  # type: ignore[misc]
                    )
                )
    if "scale" in only:
        out.append(("scale-out", lambda: [scenarios_consume.scale_out(b, state["e2e"])]))
    if "idle" in only:
        # Last: it restarts the broker to measure memory from a clean process.
        out.append((f"{idle:,} idle WebSockets", lambda: [scenarios_latency.idle_connections(b, idle)]))
    return out


def ratios(b: Bench, rows: list[Row]) -> None:
    for row in rows:
        base = b.baseline.get(row.baseline or "")
        f = row.figures
        if not base:
            continue
        if row.baseline in ("lpush", "brpop") and f.get("jobs_per_s"):
            row.ratio = f["jobs_per_s"] / base
        elif row.baseline == "latency" and f.get("p50_ms") is not None:
            row.ratio = f["p50_ms"] / base
        elif row.baseline == "redis_us_per_job" and f.get("redis_us_per_job") is not None:
            row.ratio = f["redis_us_per_job"] / base
        f["ratio"] = row.ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows, 2,000 idle connections (~1 min)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--only", help=f"comma-separated scenario groups: {','.join(GROUPS)} (default: all)")
    parser.add_argument("--idle", type=int, help="idle WebSockets of scenario 6 (default 10000, --quick 2000)")
    parser.add_argument("--duration", type=float, help="seconds measured per scenario (default 4, --quick 2)")
    parser.add_argument("--tcp", action="store_true", help="brokers reach Redis over TCP, not its unix socket")
    parser.add_argument("--profile", type=Path, help="profile the broker during some scenarios, into this directory")
    parser.add_argument("--profile-keys", default="e2e,http_single_64", help="scenarios to profile")
    parser.add_argument("--profiler", choices=TOOLS, default="py-spy", help="see bench/profiler.py")
    parser.add_argument(
        "--src", type=Path, default=REPO, help="run the broker from this source tree (e.g. an export of another commit)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, AOF)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(GROUPS)
    unknown = only - set(GROUPS)
    if unknown:
        parser.error(f"unknown scenario group(s) {sorted(unknown)}: choose from {', '.join(GROUPS)}")
    warmup, duration = (0.5, 2.0) if args.quick else (1.0, 4.0)
    duration = args.duration or duration
    idle = args.idle or (2000 if args.quick else 10_000)
    raise_nofile()

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="presque-bench-"))
    redis_proc = RedisProc(workdir / "redis").start()
    b = Bench(workdir, redis_proc, args.tcp, warmup, duration, args.quick, args.src.resolve())
    profiler = Profiler(args.profile, set(args.profile_keys.split(",")), args.profiler) if args.profile else None
    b.profiler = profiler
    info = {"date": now_iso(), **machine(args.src), "redis": redis_proc.version(), "quick": args.quick}
    progress(header(info))
    rows: list[Row] = []
    failed = 0
    try:
        b.start_broker()
        rows += baseline_rows(b, warmup, duration)
        for title, run in scenarios(b, only, idle):
            progress(f"{title} ... ({time.monotonic() - started:.0f} s)")
            try:
                rows += run()
            except Exception as exc:
                failed += 1
                traceback.print_exc()
                rows.append(Row(title.replace(" ", "_"), title, {}, note=f"FAILED: {exc!r}"[:200]))
                if not b.brokers:
                    b.start_broker()
    finally:
        b.stop_brokers()
        redis_proc.stop()
        if profiler is not None:
            profiler.finish()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ratios(b, rows)
    info["cpu_index_end_us"] = cpu_index()
    elapsed = time.monotonic() - started
    info["elapsed_s"] = round(elapsed, 1)
    print(header(info))
    print()
    print(table(rows))
    print()
    print(f"CPU index at the end: {info['cpu_index_end_us']} µs (sum(range(1000)); ~8-10 µs on an idle core).")
    print(f"{len(rows)} rows in {elapsed:.0f} s; xbase: jobs/s ÷ the baseline's (LPUSH for pushes, BRPOP for")
    print("consumption), or for latencies p50 ÷ the LPUSH→BRPOP p50, or Redis µs/job ÷ LPUSH+BRPOP's.")
    busy = [r for r in rows if (r.figures.get("other_cpu") or 0) > BUSY]
    if busy:
        worst = max(r.figures["other_cpu"] for r in busy)
        print(
            f"WARNING: other processes kept up to {worst:.1f} cores busy during {len(busy)} scenarios (the 'other' "
            "CPU figure): rates and latencies are low there; µs/job figures hold up better. Rerun on a quiet machine."
        )
    if args.json:
        write_json(args.json, info, rows, {"baseline": b.baseline, "details": b.details})
        print(f"JSON written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
