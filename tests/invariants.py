"""The storage invariant of a queue, checked against Redis itself after every path of a test.

Every job id is in ``body`` ⇔ in ``meta`` ⇔ in exactly one of ready/delayed/leased/dead; the
``uniq`` hash only names live (not dead) jobs that carry that key; only waiting jobs are in
``expiry``; every leased job, and no other, has an entry in the ``lease`` hash (its token, this
lease deadline as in ``leased``, this delivery's attempt, its lease seconds and whether it holds a
uniq key), and no meta holds a token
(a lease taken by the version before the lease hash existed keeps its token in its meta instead:
tests that build such a job pass ``legacy`` with its id).
"""

from __future__ import annotations

from typing import Any

import orjson

from broker import keys
from broker.models import Meta


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: Any) -> set[str]:
    return {_text(v) for v in values}


async def check_queue(redis: Any, queue: str, legacy: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """Assert the invariant for ``queue``; returns its ids per state (``ready``, ``delayed``, ...).

    ``legacy``: leased jobs whose lease is in their meta (as the previous version stored it).
    """
    k = keys.queue_keys(queue)
    body = _texts(await redis.hkeys(k.body))
    metas = {
        (i.decode() if isinstance(i, bytes) else i): orjson.loads(m) for i, m in (await redis.hgetall(k.meta)).items()
    }
    states = {
        "ready": _texts(await redis.zrange(k.ready, 0, -1)),
        "delayed": _texts(await redis.zrange(k.delayed, 0, -1)),
        "leased": _texts(await redis.zrange(k.leased, 0, -1)),
        "dead": _texts(await redis.zrange(k.dead, 0, -1)),
    }
    assert body == set(metas), f"body without meta: {body - set(metas)}; meta without body: {set(metas) - body}"
    placed: dict[str, str] = {}
    for state, ids in states.items():
        for job_id in ids:
            assert job_id not in placed, f"{job_id} is both {placed[job_id]} and {state}"
            placed[job_id] = state
    assert set(placed) == body, f"orphans: in no set {body - set(placed)}; set entries without job {set(placed) - body}"

    uniq = {
        (u.decode() if isinstance(u, bytes) else u): (i.decode() if isinstance(i, bytes) else i)
        for u, i in (await redis.hgetall(k.uniq)).items()
    }
    for key, job_id in uniq.items():
        assert job_id in metas, f"uniq {key!r} names a job that does not exist: {job_id}"
        assert placed[job_id] != "dead", f"uniq {key!r} is held by dead job {job_id}"
        assert metas[job_id][Meta.UNIQ - 1] == key, f"uniq {key!r} -> {job_id}, whose meta says otherwise"
    for job_id, meta in metas.items():
        if meta[Meta.UNIQ - 1] and placed[job_id] != "dead":
            assert uniq.get(meta[Meta.UNIQ - 1]) == job_id, f"live job {job_id} lost its uniq key"
        has_token = bool(meta[Meta.TOKEN - 1])
        assert has_token == (job_id in legacy), f"{job_id} ({placed[job_id]}) token in meta={meta[Meta.TOKEN - 1]!r}"

    leases = {_text(i): _text(e) for i, e in (await redis.hgetall(k.lease)).items()}
    assert set(leases) == states["leased"] - legacy, (
        f"lease entries of jobs not leased: {set(leases) - states['leased']}; "
        f"leased jobs without one: {states['leased'] - legacy - set(leases)}"
    )
    deadlines = {_text(i): d for i, d in await redis.zrange(k.leased, 0, -1, withscores=True)}
    for job_id, entry in leases.items():
        token, deadline, attempt, lease, has_uniq = entry.split(" ")
        meta = metas[job_id]
        where = f"{job_id}: lease entry {entry!r}, leased until {deadlines[job_id]}, meta {meta}"
        assert token and float(lease) > 0, where
        assert float(deadline) == deadlines[job_id], where
        assert int(attempt) == meta[Meta.ATTEMPT - 1] + 1, where
        assert has_uniq == ("1" if meta[Meta.UNIQ - 1] else "0"), where

    expiry = _texts(await redis.zrange(k.expiry, 0, -1))
    waiting = states["ready"] | states["delayed"]
    assert expiry <= waiting, f"expiry entries of jobs that are not waiting: {expiry - waiting}"
    return states
