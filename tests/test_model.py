"""The queue against a reference model: hypothesis drives random operations, nothing may diverge.

A ``RuleBasedStateMachine`` runs push / fetch (destructive, leased, short-leased) / ack / nack /
touch / release / lease expiry / pause / resume / purge / dead-letter retry and delete on a real
Redis through :class:`broker.queue.QueueService` — and push, fetch, ack, control and the queue
figures through the real HTTP API of a ``presque serve`` process — and checks after every step
that Redis holds exactly what a small in-Python model says: which job is in which state, the
delivery order, attempts, counters, uniq keys, and the storage invariant (``tests/invariants.py``).

Lease expiry is real: short leases (50 ms) run out, then the test calls the reaper
(``QueueService.reap``) itself; the broker process's own reaper is set to once an hour so that
it never reaps behind the model's back. Backoff is 0, so a failed job is ready again at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from broker import keys
from broker.errors import JobExists, StaleToken, UnknownJob
from broker.models import COUNTERS, PushOptions
from broker.queue import QueuePolicy, QueueService
from tests.cluster import async_client_for
from tests.invariants import check_queue
from tests.servers import BrokerServer

T = TypeVar("T")
pytestmark = pytest.mark.core  # the scripts against the model, on Redis 6.2 too (`make test`)

SHORT_LEASE = 0.05
LONG_LEASE = 600.0
FAR = 3600.0  # a delay that never comes due during a run
MAX_ATTEMPTS = (1, 2, 5)
UNIQS = ("", "", "", "u1", "u2")
_queues = itertools.count()


@dataclass
class Job:
    id: str
    priority: int
    seq: int
    max_attempts: int
    uniq: str
    state: str  # ready | delayed | leased | dead
    attempt: int = 0
    failures: int = 0
    token: str | None = None
    short: bool = False  # leased for SHORT_LEASE: only release or expiry may settle it
    dead_key: tuple[int, str] = (0, "")  # the dead-letter list's order: failure time, then id


@dataclass
class Model:
    """What Redis should hold for one queue."""

    jobs: dict[str, Job] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    paused: bool = False
    acked: set[str] = field(default_factory=set)  # tombstones: a late ack is stale, not unknown
    gone: set[str] = field(default_factory=set)  # fetched destructively, purged or deleted
    old_tokens: list[tuple[str, str]] = field(default_factory=list)
    calls: int = 0  # script calls that can fail jobs: jobs failed by one call share its Redis time

    def in_state(self, state: str, *, short: bool | None = None) -> list[Job]:
        found = [j for j in self.jobs.values() if j.state == state and (short is None or j.short == short)]
        return sorted(found, key=lambda j: j.seq)

    def ready_order(self) -> list[Job]:
        return sorted(self.in_state("ready"), key=lambda j: (9 - j.priority, j.seq))

    def uniq_holder(self, uniq: str) -> Job | None:
        for job in self.jobs.values():
            if job.uniq == uniq and job.state != "dead":
                return job
        return None

    def push(self, job_id: str, priority: int, delayed: bool, uniq: str, max_attempts: int) -> Job:
        self.counters["pushed"] += 1
        job = Job(job_id, priority, self.counters["pushed"], max_attempts, uniq, "delayed" if delayed else "ready")
        self.jobs[job_id] = job
        return job

    def take(self, count: int) -> list[Job]:
        taken = self.ready_order()[:count]
        for job in taken:
            job.attempt += 1
        return taken

    def lease(self, job: Job, token: str, short: bool) -> None:
        job.state, job.token, job.short = "leased", token, short

    def drop(self, job: Job, *, acked: bool) -> None:
        del self.jobs[job.id]
        (self.acked if acked else self.gone).add(job.id)

    def retire_token(self, job: Job) -> None:
        assert job.token is not None
        self.old_tokens.append((job.id, job.token))
        job.token, job.short = None, False

    def fail(self, job: Job, *, delay: float | None) -> str:
        """A nack or an expired lease (backoff 0: ready again at once unless a delay is given)."""
        self.retire_token(job)
        job.failures += 1
        self.counters["failed"] += 1
        if job.failures >= job.max_attempts:
            job.state = "dead"
            job.dead_key = (self.calls, job.id)
            self.counters["dead_lettered"] += 1
            return "dead"
        self.counters["retried"] += 1
        job.state = "delayed" if delay else "ready"
        return job.state


class QueueMachine(RuleBasedStateMachine):
    """One queue, driven through QueueService (most rules) and the HTTP API (rules named http_*)."""

    # Set by the test before the machine runs.
    loop: asyncio.AbstractEventLoop
    redis: aioredis.Redis
    service: QueueService
    http: httpx.Client

    def __init__(self) -> None:
        super().__init__()
        self.queue = f"model.{next(_queues)}"
        self.model = Model()
        self.bodies = itertools.count()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    # -- pushing ----------------------------------------------------------------------------------

    PUSHES = st.lists(
        st.tuples(st.sampled_from((0, 5, 9)), st.booleans(), st.sampled_from(UNIQS), st.sampled_from(MAX_ATTEMPTS)),
        min_size=1,
        max_size=4,
    )

    @initialize(pushes=PUSHES)
    def start(self, pushes: list[tuple[int, bool, str, int]]) -> None:
        self.push(pushes)

    @rule(pushes=PUSHES)
    def push(self, pushes: list[tuple[int, bool, str, int]]) -> None:
        for priority, delayed, uniq, max_attempts in pushes:
            opts = PushOptions(priority=priority, delay=FAR if delayed else 0.0, uniq=uniq, max_attempts=max_attempts)
            holder = self.model.uniq_holder(uniq) if uniq else None
            body = orjson.dumps({"n": next(self.bodies)})
            if holder is not None:
                with pytest.raises(JobExists) as refused:
                    self.run(self.service.push(self.queue, body, opts))
                assert refused.value.existing_id == holder.id
                continue
            job_id = self.run(self.service.push(self.queue, body, opts))
            self.model.push(job_id, priority, delayed, uniq, max_attempts)

    @rule(priority=st.sampled_from((0, 9)), uniq=st.sampled_from(UNIQS))
    def http_push(self, priority: int, uniq: str) -> None:
        params: dict[str, Any] = {"priority": priority}
        if uniq:
            params["uniq"] = uniq
        response = self.http.post(f"/q/{self.queue}", params=params, content=orjson.dumps({"h": next(self.bodies)}))
        holder = self.model.uniq_holder(uniq) if uniq else None
        if holder is not None:
            assert response.status_code == 409, response.text
            assert response.json() == {"error": "job already exists", "id": holder.id}
            return
        assert response.status_code == 201, response.text
        self.model.push(response.json()["id"], priority, False, uniq, 5)

    # -- taking -----------------------------------------------------------------------------------

    @rule(
        count=st.integers(1, 3), kind=st.sampled_from(("destructive", "long", "long", "short")), via_http=st.booleans()
    )
    def fetch(self, count: int, kind: str, via_http: bool) -> None:
        if via_http and kind != "short":  # (HTTP leases are 1 s at least: too long to wait out)
            self.http_fetch(leased=kind == "long")
            return
        lease = {"destructive": 0.0, "long": LONG_LEASE, "short": SHORT_LEASE}[kind]
        result = self.run(self.service.fetch(self.queue, count=count, lease=lease))
        if self.model.paused:
            assert result.paused and not result.jobs
            return
        expected = self.model.take(count)
        assert [(j.id, j.attempt) for j in result.jobs] == [(j.id, j.attempt) for j in expected]
        assert result.empty == (not expected)
        for delivery, job in zip(result.jobs, expected, strict=True):
            if kind == "destructive":
                assert delivery.token is None
                self.model.drop(job, acked=False)
                self.model.counters["processed"] += 1
            else:
                assert delivery.token
                self.model.lease(job, delivery.token, short=kind == "short")

    def http_fetch(self, *, leased: bool) -> None:
        params = {"lease": LONG_LEASE} if leased else {}
        response = self.http.get(f"/q/{self.queue}", params=params)
        if self.model.paused:
            assert response.status_code == 404 and response.json() == {"error": "queue is closed"}
            return
        expected = self.model.take(1)
        if not expected:
            assert response.status_code == 404 and response.json() == {"error": "no job"}
            return
        (job,) = expected
        assert response.status_code == 200, response.text
        assert response.headers["X-Presque-Job-Id"] == job.id
        assert response.headers["X-Presque-Attempt"] == str(job.attempt)
        if leased:
            self.model.lease(job, response.headers["X-Presque-Lease-Token"], short=False)
        else:
            assert "X-Presque-Lease-Token" not in response.headers
            self.model.drop(job, acked=False)
            self.model.counters["processed"] += 1

    # -- settling ---------------------------------------------------------------------------------

    @precondition(lambda self: self.model.in_state("leased"))
    @rule(
        data=st.data(),
        action=st.sampled_from(("ack", "ack", "http_ack", "nack", "nack", "nack_later", "touch", "release")),
    )
    def settle(self, data: st.DataObject, action: str) -> None:
        """A consumer settles a job it holds: ack (direct or HTTP), nack, touch, or goes away (release).

        A short lease may have run out already, so only a release (which takes expired leases
        too) is certain for it; its other fate is :meth:`expire`.
        """
        job = data.draw(st.sampled_from(self.model.in_state("leased")))
        token = job.token
        assert token is not None
        if job.short or action == "release":
            assert self.run(self.service.release(self.queue, [(job.id, token)])) == 1
            self.model.retire_token(job)
            job.state = "ready"  # at once, at its place, not a failure
        elif action == "ack":
            assert self.run(self.service.ack_many(self.queue, [(job.id, token)])) == [None]
            self.ack_in_model(job)
        elif action == "http_ack":
            response = self.http.post(f"/j/{self.queue}/{job.id}/ack", json={"token": token})
            assert response.status_code == 200 and response.json() == {"id": job.id, "status": "acked"}
            self.ack_in_model(job)
        elif action == "touch":
            before = time.time()
            deadline = self.run(self.service.touch(self.queue, job.id, token, LONG_LEASE))
            assert deadline >= before + LONG_LEASE - 5
        else:
            delay = FAR if action == "nack_later" else None
            self.model.calls += 1
            outcome = self.run(self.service.nack(self.queue, job.id, token, delay=delay, error="boom"))
            assert outcome.outcome == self.model.fail(job, delay=delay)

    def ack_in_model(self, job: Job) -> None:
        self.model.retire_token(job)
        self.model.drop(job, acked=True)
        self.model.counters["processed"] += 1

    @rule(data=st.data(), via_http=st.booleans())
    def ack_stale(self, data: st.DataObject, via_http: bool) -> None:
        """An ack with a token that is no longer the job's: refused, nothing completes twice
        (404 for a job that is gone without an ack, or never was)."""
        job_id, token = data.draw(st.sampled_from([*self.model.old_tokens, ("no-such-job", "t")]))
        unknown = job_id in self.model.gone or job_id == "no-such-job"
        if via_http:
            response = self.http.post(f"/j/{self.queue}/{job_id}/ack", json={"token": token})
            assert response.status_code == (404 if unknown else 409), response.text
        else:
            (error,) = self.run(self.service.ack_many(self.queue, [(job_id, token)]))
            assert isinstance(error, UnknownJob if unknown else StaleToken), error

    @precondition(lambda self: self.model.in_state("leased", short=True))
    @rule()
    def expire(self) -> None:
        """Let every short lease run out, then reap: each counts as a failure."""
        short = self.model.in_state("leased", short=True)
        leased_key = keys.queue_keys(self.queue).leased
        deadline = max(self.run(self.redis.zmscore(leased_key, [j.id for j in short])))
        give_up = time.monotonic() + 5
        while self.redis_time() <= deadline:
            assert time.monotonic() < give_up, "Redis time does not advance"
            time.sleep(0.005)
        result = self.run(self.service.reap(self.queue))
        self.model.calls += 1
        outcomes = [self.model.fail(job, delay=None) for job in short]
        assert result.lease_expired == len(short)
        assert result.dead_lettered == outcomes.count("dead")
        assert (result.promoted, result.expired, result.more) == (0, 0, False)

    def redis_time(self) -> float:
        seconds, micros = self.run(self.redis.time())
        return float(seconds) + micros / 1e6

    # -- control ----------------------------------------------------------------------------------

    @rule(paused=st.sampled_from((True, False, False)), via_http=st.booleans())
    def control(self, paused: bool, via_http: bool) -> None:
        if via_http:
            response = self.http.post(f"/control/{self.queue}", json={"status": "stop" if paused else "start"})
            assert response.json() == {"queue": self.queue, "response": "updated"}
        elif paused:
            self.run(self.service.pause(self.queue))
        else:
            self.run(self.service.resume(self.queue))
        self.model.paused = paused

    @rule(now=st.sampled_from((True, False, False, False)))
    def purge(self, now: bool) -> None:
        if not now:  # (a purge empties the queue: not too often, or little else gets tested)
            return
        waiting = self.model.in_state("ready") + self.model.in_state("delayed")
        assert self.run(self.service.purge(self.queue)) == len(waiting)
        for job in waiting:
            self.model.drop(job, acked=False)

    # -- dead letters -----------------------------------------------------------------------------

    @precondition(lambda self: self.model.in_state("dead"))
    @rule(data=st.data(), action=st.sampled_from(("retry", "retry_all", "delete")))
    def dead_letters(self, data: st.DataObject, action: str) -> None:
        dead = sorted(self.model.in_state("dead"), key=lambda j: j.dead_key)
        if action == "delete":
            job = data.draw(st.sampled_from(dead))
            assert self.run(self.service.dead_delete(self.queue, [job.id])) == 1
            self.model.drop(job, acked=False)
            return
        everything = action == "retry_all"
        jobs = dead if everything else data.draw(st.lists(st.sampled_from(dead), min_size=1, unique_by=lambda j: j.id))
        ids = None if everything else [j.id for j in jobs]
        assert self.run(self.service.dead_retry(self.queue, ids)) == len(jobs)
        # In the order the script walks them (the ids as given, or the dead-letter list's order),
        # each takes its uniq key back unless a live job holds it.
        for job in jobs:
            if job.uniq and self.model.uniq_holder(job.uniq) is not None:
                job.uniq = ""  # its key was taken by a newer job meanwhile
            job.state, job.failures = "ready", 0
        self.model.counters["retried"] += len(jobs)

    # -- the comparison ---------------------------------------------------------------------------

    @invariant()
    def redis_matches_the_model(self) -> None:
        states = self.run(check_queue(self.redis, self.queue))
        for state in ("ready", "delayed", "leased", "dead"):
            assert states[state] == {j.id for j in self.model.in_state(state)}, state
        order = self.run(self.service.peek(self.queue, 1000))
        assert [job_id for job_id, _ in order] == [j.id for j in self.model.ready_order()]
        info = self.run(self.service.info(self.queue))
        assert info.counters == self.model.counters
        assert info.paused == self.model.paused
        for job in self.model.jobs.values():
            view = self.run(self.service.job(self.queue, job.id))
            assert (view.state, view.attempt, view.failures) == (job.state, job.attempt, job.failures), job
        uniq = self.run(self.redis.hgetall(keys.queue_keys(self.queue).uniq))
        live = {j.uniq: j.id for j in self.model.jobs.values() if j.uniq and j.state != "dead"}
        assert {k.decode(): v.decode() for k, v in uniq.items()} == live

    @invariant()
    def http_figures_match(self) -> None:
        if not self.model.counters["pushed"]:
            return
        figures = self.http.get(f"/j/{self.queue}").json()
        sizes = {s: len(self.model.in_state(s)) for s in ("ready", "delayed", "leased", "dead")}
        assert {s: figures[s] for s in sizes} == sizes
        assert figures["job_count"] == sizes["ready"]
        assert figures["job_processed"] == self.model.counters["processed"]
        assert figures["job_failed"] == self.model.counters["failed"]
        assert figures["paused"] == self.model.paused


@pytest.fixture
def machine_env(redis_url: str, make_broker: Any) -> Iterator[None]:
    broker: BrokerServer = make_broker(redis_url, config={"queues": {"reap_interval": 3600.0, "backoff_base": 0}})
    loop = asyncio.new_event_loop()
    client = async_client_for(redis_url)  # a cluster client under PRESQUE_TEST_TOPOLOGY=cluster
    QueueMachine.loop = loop
    QueueMachine.redis = client
    QueueMachine.service = QueueService(client, QueuePolicy(backoff_base=0.0, backoff_max=0.0))
    with httpx.Client(base_url=broker.url, timeout=10) as http:
        QueueMachine.http = http
        try:
            yield
        finally:
            loop.run_until_complete(client.aclose())
            loop.close()


def test_queue_matches_the_reference_model(machine_env: None) -> None:
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(
            max_examples=50,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            database=None,
            # No shrinking: against real servers it can outlast the test's timeout; the failing
            # run is printed step by step anyway.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
