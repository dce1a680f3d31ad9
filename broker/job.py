"""Jobs as a worker sees them, and how their outcome travels back to the broker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from broker.client import Client
from broker.errors import BrokerError, StaleToken, Unavailable, UnknownJob
from broker.link import backoff
from broker.transport import ConnectionLost

log = logging.getLogger("presque.worker")


class Job:
    """A job handed to :meth:`Worker.work`.

    Attributes:
        id: the job's id.
        queue: the queue it came from.
        attempt: deliveries so far, 1 on the first.
        body: the decoded JSON body.
        token: its lease token.
    """

    __slots__ = ("_epoch", "_lost", "_report", "_touched", "attempt", "body", "id", "queue", "token")

    def __init__(self, frame: dict[str, Any], epoch: int, report: Callable[[Job, Any], None]) -> None:
        self.id: str = frame["id"]
        self.queue: str = frame["queue"]
        self.attempt: int = int(frame.get("attempt", 1))
        self.body: Any = frame.get("body")
        self.token: str = frame.get("token", "")
        self._report = report
        self._epoch = epoch  # the connection it came on: the only one that holds it
        self._touched = time.monotonic()
        self._lost = False

    def progress(self, data: Any) -> None:
        """Report progress (any JSON): a ``progress`` event for the queue's watchers.

        Fire and forget; callable from ``async`` and plain ``work`` alike. It also extends the lease.
        """
        self._report(self, data)

    def __repr__(self) -> str:
        return f"<Job {self.queue}/{self.id} attempt {self.attempt}>"


class JobChannel:
    """Settles, touches and reports a worker's jobs.

    Over the WebSocket connection that delivered the job while it is open (the broker ties a
    job to that connection); over HTTP with the job's token once it is gone (the broker
    restarted, the network dropped) or while the worker drains (an HTTP ack returns no credit,
    so the broker sends no new job). Acks and nacks are retried while the broker reports Redis
    unavailable, up to about one lease.

    Args:
        client: the worker's client.
        lease: the jobs' lease, in seconds.
        on_ok: called after each settle the broker confirmed (Redis answers again).
    """

    def __init__(self, client: Client, lease: float, on_ok: Callable[[], None]) -> None:
        self.client = client
        self.lease = lease
        self.on_ok = on_ok
        self.draining = False

    async def settle(self, job: Job, op: str, extra: dict[str, Any]) -> None:
        """Ack or nack: over the socket the job came on; else (reconnected, draining) over HTTP."""
        link = self.client.link
        if not self.draining and job._epoch == link.epoch:
            frame = {"op": op, "id": job.id, "token": job.token, **extra}
            try:
                try:
                    await link.request(frame, epoch=job._epoch)
                except TypeError:  # a result that is not JSON
                    frame["result"] = repr(extra.get("result"))
                    await link.request(frame, epoch=job._epoch)
                self.on_ok()
                return
            except (UnknownJob, StaleToken) as exc:
                return self.lost(job, exc)
            except (Unavailable, ConnectionLost):
                pass  # the broker still has the lease in Redis: settle over HTTP below
            except BrokerError as exc:
                log.error("could not %s job %s: %s", op, job.id, exc.message)
                return
        await self._settle_http(job, op, extra)

    async def _settle_http(self, job: Job, op: str, extra: dict[str, Any]) -> None:
        deadline = time.monotonic() + max(self.lease, 5.0)
        attempt = 0
        while True:
            try:
                if op == "ack":
                    await self.client.ack(job.queue, job.id, job.token)
                else:
                    await self.client.nack(job.queue, job.id, job.token, error=extra.get("error"))
                self.on_ok()
                return
            except (UnknownJob, StaleToken) as exc:
                return self.lost(job, exc)
            except (Unavailable, ConnectionLost) as exc:
                if time.monotonic() > deadline:
                    log.warning("gave up trying to %s job %s (%s): it will run again", op, job.id, exc.message)
                    return
            except BrokerError as exc:
                log.error("could not %s job %s: %s", op, job.id, exc.message)
                return
            await asyncio.sleep(backoff(attempt, 0.2, 2.0))
            attempt += 1

    def lost(self, job: Job, exc: BrokerError) -> None:
        if not job._lost:
            job._lost = True
            log.warning(
                "job %s/%s lost its lease (%s): the broker will deliver it again", job.queue, job.id, exc.message
            )

    async def progress(self, job: Job, frame: dict[str, Any], running: Callable[[Job], bool]) -> None:
        try:
            await self.client.link.request(frame, epoch=job._epoch)
        except (UnknownJob, StaleToken) as exc:
            # The broker runs a connection's frames concurrently: a progress right before the
            # ack may reach Redis after it. Only a job still running has lost its lease.
            if running(job):
                self.lost(job, exc)
        except TypeError:
            log.warning("job %s: progress data is not JSON: %.80r", job.id, frame["data"])
        except BrokerError as exc:
            log.debug("progress of %s not sent: %s", job.id, exc.message)

    async def touch(self, job: Job) -> None:
        link = self.client.link
        try:
            try:
                await link.request({"op": "touch", "id": job.id, "token": job.token}, epoch=job._epoch)
            except ConnectionLost:
                await self.client.touch(job.queue, job.id, job.token)
        except (UnknownJob, StaleToken) as exc:
            self.lost(job, exc)
        except BrokerError as exc:
            log.debug("touch of %s failed: %s", job.id, exc.message)
