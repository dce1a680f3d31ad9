"""Scenarios 4, 7 and 8: WebSocket consumers with manual ack, end to end, scale-out, Redis cost."""

from __future__ import annotations

from typing import Any

from bench.context import BODY, Bench
from bench.harness import CTX, Group, Measurement
from bench.report import Row, Target

E2E_PREFETCH = 100
E2E_WINDOW = 500  # unconfirmed pushes per producer connection
# Confirmed pushes not yet acked beyond which the producers wait: enough that consumers never find
# the queue empty, bounded so that what is measured is a rate the broker sustains (pushed = acked).
E2E_BACKLOG = 4_000
PREFILL_RATE = 30_000  # jobs/s the pre-filled queue must last for


def consume(b: Bench, prefetch: int, consumers: int) -> Row:
    """A pre-filled queue drained by ``consumers`` WebSockets with manual ack."""
    queue = f"consume-p{prefetch}-c{consumers}"
    # Enough for the window at beyond the target rate; if the queue still runs dry, the row says so.
    b.prefill(queue, int(PREFILL_RATE * (b.warmup + b.duration + 0.5)) // 1000 * 1000)
    procs = min(consumers, 2)
    group = Group()
    for i in range(procs):
        share = consumers // procs + (1 if i < consumers % procs else 0)
        group.add("ws_consume", address=b.address, queue=queue, prefetch=prefetch, consumers=share)
    m = b.run(f"consume_p{prefetch}_c{consumers}", group, [queue])
    left = b.ready(queue)
    b.purge(queue)
    figures = b.figures(m, "processed", latency=False)
    figures["left_in_queue"] = left
    return Row(
        f"consume_p{prefetch}_c{consumers}",
        f"4. WS consume, prefetch {prefetch}, {consumers} consumer{'s' if consumers > 1 else ''}",
        figures,
        baseline="brpop",
        note="pre-filled queue, acked jobs/s" + ("" if left else "; QUEUE RAN DRY: the figure is a floor"),
    )


def end_to_end_run(b: Bench, key: str) -> Measurement:
    """Producers and consumers at once: 2 pushing WebSockets (one process), 2 x 2 consumers, in a
    closed loop: producers wait while more than ``E2E_BACKLOG`` pushed jobs are not acked yet.

    With several brokers, producer connections and consumer processes are spread over them, so
    the client side is the same whatever the number of brokers.
    """
    queue = key.replace("_", "-")
    addresses = [list(broker.address) for broker in b.brokers]
    acked = CTX.Value("q", 0)  # the consumers' acks, which hold the producers back (closed loop)
    group = Group().add(
        "ws_push",
        addresses=[addresses[i % len(addresses)] for i in range(2)],
        queue=queue,
        window=E2E_WINDOW,
        body=BODY,
        acked=acked,
        backlog=E2E_BACKLOG,
    )
    for i in range(2):
        group.add(
            "ws_consume",
            address=addresses[i % len(addresses)],
            queue=queue,
            prefetch=E2E_PREFETCH,
            consumers=2,
            acked=acked,
        )
    m = b.run(key, group, [queue])
    b.purge(queue)
    return m


def _e2e_figures(b: Bench, m: Measurement) -> dict[str, Any]:
    figures = b.figures(m, "processed", latency=False)
    figures["pushed_per_s"] = m.rates.get("pushed", 0.0)
    figures["backlog_growth_per_s"] = m.rates.get("pushed", 0.0) - m.rates.get("processed", 0.0)
    return figures


def end_to_end(b: Bench) -> tuple[Row, Measurement]:
    m = end_to_end_run(b, "e2e")
    figures = _e2e_figures(b, m)
    row = Row(
        "e2e",
        f"4. End to end: push → WS → ack, prefetch {E2E_PREFETCH}",
        figures,
        baseline="brpop",
        targets=[Target("jobs_per_s", ">=", 25_000, "≥ 25,000/s"), Target("ratio", ">=", 2.5, "≥ 2.5x BRPOP")],
        note=f"pushed {figures['pushed_per_s']:,.0f}/s",
    )
    return row, m


def scale_out(b: Bench, one: Row) -> Row:
    """The end-to-end run with two broker processes on the same Redis."""
    b.start_broker()
    try:
        m = end_to_end_run(b, "scale_out")
    finally:
        second = b.brokers.pop()
        second.stop()
    figures = _e2e_figures(b, m)
    single = one.figures.get("jobs_per_s") or 0.0
    figures["vs_one_broker"] = figures["jobs_per_s"] / single if single else None
    vs = figures["vs_one_broker"]
    return Row(
        "scale_out",
        "7. Scale-out: end to end, 2 brokers",
        figures,
        baseline="brpop",
        note=f"{vs:.2f}x one broker" if vs is not None else "",
    )


def redis_cost_row(b: Bench, m: Measurement) -> Row:
    """Redis commands and CPU per job of the end-to-end run (push + deliver + ack)."""
    figures = b.figures(m, "processed", latency=False)
    keep = ("redis_cmds_per_job", "redis_scripts_per_job", "redis_us_per_job", "redis_cpu")
    figures = {k: figures[k] for k in keep if k in figures}
    top = sorted(m.commands.items(), key=lambda kv: -kv[1])[:8]
    jobs = m.rates.get("processed", 0.0) * m.duration
    figures["commands"] = {name: calls / jobs for name, calls in top} if jobs else {}
    note = (
        f"{figures.get('redis_cmds_per_job', 0):.2f} commands/job incl. Lua, "
        f"{figures.get('redis_scripts_per_job', 0):.3f} script calls/job"
    )
    return Row(
        "redis_cost",
        "8. Redis cost per job, push + deliver + ack",
        figures,
        baseline="redis_us_per_job",
        targets=[Target("redis_cmds_per_job", "<=", 6, "≤ 6 cmds/job")],
        note=note,
    )
