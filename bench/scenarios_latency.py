"""Scenarios 5 and 6: push-to-delivery latency at a fixed load, and 10,000 idle WebSockets."""

from __future__ import annotations

from typing import Any

from bench.context import Bench, other_cpu
from bench.harness import Group
from bench.procs import rss_bytes
from bench.report import Row, Target, latency_ms, progress

HTTP_POOL = 16  # connections of the paced HTTP producer (enough for 5,000/s at ~1 ms each)
IDLE_PROCS = 4
IDLE_RATE = 200  # jobs/s pushed to the idle consumers while measuring their latency


def latency(b: Bench, via: str, rate: int) -> Row:
    """Open-loop pushes at ``rate``/s over ``via`` (http or ws); one WS consumer, prefetch 100."""
    queue = f"latency-{via}-{rate}"
    group = Group().add("ws_consume", address=b.address, queue=queue, prefetch=100, consumers=1)
    if via == "http":
        group.add("http_paced", address=b.address, path=f"/q/{queue}", rate=rate, connections=HTTP_POOL)
    else:
        group.add("ws_paced", address=b.address, queue=queue, rate=rate)
    m = b.run(f"latency_{via}_{rate}", group, [queue])
    b.purge(queue)
    figures = b.figures(m, "processed")
    producer = m.results[1] if len(m.results) > 1 and isinstance(m.results[1], dict) else {}
    figures["producer_late"] = producer.get("late", 0)
    targets = []
    if rate == 1000:
        targets = [Target("p50_ms", "<=", 0.5, "p50 ≤ 0.5 ms"), Target("p99_ms", "<=", 2.0, "p99 ≤ 2 ms")]
    short = figures["jobs_per_s"] < 0.95 * rate
    return Row(
        f"latency_{via}_{rate}",
        f"5. Push→delivery latency, {via.upper()} push, {rate:,}/s",
        figures,
        baseline="latency",
        targets=targets,
        note="offered load not sustained: a backlog built up" if short else "",
    )


def idle_connections(b: Bench, n: int) -> Row:
    """``n`` subscribed, idle WebSockets on a fresh broker: memory each, and delivery latency."""
    b.stop_brokers()
    broker = b.start_broker()
    queue = "idle"
    # Warm the broker up (imports, first connection, first push) so the RSS difference is the
    # connections' alone.
    warm = Group().add("ws_idle", address=b.address, queue=queue, n=10)
    warm.add("http_paced", address=b.address, path=f"/q/{queue}", rate=100, connections=2)
    b.run("idle_warmup", warm, [queue], duration=1.0)
    before = rss_bytes(broker.pid)
    seen: dict[str, Any] = {}

    def on_ready(infos: list[Any]) -> None:
        seen["rss"] = rss_bytes(broker.pid)
        seen["connected"] = sum(i["connected"] for i in infos if isinstance(i, dict))
        seen["failures"] = [f for i in infos if isinstance(i, dict) for f in i.get("failures", [])]
        progress(f"    {seen['connected']:,} connected, broker RSS {seen['rss'] / 2**20:.0f} MiB")

    group = Group()
    for i in range(IDLE_PROCS):
        share = n // IDLE_PROCS + (1 if i < n % IDLE_PROCS else 0)
        group.add("ws_idle", address=b.address, queue=queue, n=share, prefetch=1)
    group.add("http_paced", address=b.address, path=f"/q/{queue}", rate=IDLE_RATE, connections=4)
    m = b.run("idle", group, [queue], on_ready=on_ready)
    connected = seen.get("connected", 0)
    figures: dict[str, Any] = {
        "connections": connected,
        "kb_per_connection": (seen["rss"] - before) / connected / 1000 if connected else None,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": seen.get("rss", 0) / 2**20,
        "closed_early": sum(r.get("closed_early", 0) for r in m.results if isinstance(r, dict)),
        "connect_failures": seen.get("failures", []),
        "broker_cpu": m.broker_cpu,
        "redis_cpu": m.redis_cpu,
        "client_cpu": m.client_cpu,
        "other_cpu": other_cpu(m),
        **latency_ms(m.latencies()),
    }
    b.purge(queue)
    kb = figures["kb_per_connection"]
    return Row(
        "idle",
        f"6. {n:,} idle subscribed WebSockets, 1 process",
        figures,
        baseline="latency",
        # The connection target only means something at its own scale (not with --quick's 2,000).
        targets=([Target("connections", ">=", 10_000, "10,000 held")] if n >= 10_000 else [])
        + [Target("kb_per_connection", "<=", 30, "≤ 30 KB each")],
        note=(f"{kb:.1f} KB/connection; " if kb is not None else "") + f"latency at {IDLE_RATE}/s",
    )
