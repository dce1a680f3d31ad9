"""The plain fast lane of a WebSocket session: the two frames of every job without command objects.

A plain push or a plain ack (no option, no ``result``) is applied to the session in one step and
handed straight to the I/O layer's sink (:meth:`PlainLane.set_plain_sink`), which reports its
outcome with :meth:`PlainLane.plain_done` / :meth:`PlainLane.plain_failed`.
:meth:`broker.protocol.Session.receive` and :meth:`~broker.protocol.Session.receive_frames` try
this lane first; every other frame, and every invalid one, takes the general path
(``broker/session_commands.py``). Sans-I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from broker.commands import Command
from broker.frames import NAME_RE, encode, error_frame, plain_ack, plain_push, pushed_frame
from broker.session_core import SessionCore

# The I/O layer's fast lane for the two frames of every job (Session.set_plain_sink): a plain push
# ``(ref, queue, body_json)`` and a plain ack ``(ref, queue, job_id, token)``, already applied to
# the session. True if it took the frame; False to have it returned as a command as usual.
PlainPush = Callable[[str | None, str, bytes], bool]
PlainAck = Callable[[str | None, str, str, str], bool]


class PlainLane(SessionCore):
    """The plain fast lane of a :class:`broker.protocol.Session`."""

    def set_plain_sink(self, push: PlainPush, ack: PlainAck) -> None:
        """Take plain pushes and acks (no option, no ``result``) straight to the I/O layer.

        :meth:`receive` then applies such a frame and hands it to ``push`` / ``ack`` rather than
        returning a command (it returns the command as usual when the sink answers False). The
        credit plain acks return reaches :attr:`on_credit` at :meth:`flush_credit`, once per queue:
        the I/O layer must call it after a run of frames, and before it waits for anything.
        """
        self._sink_push, self._sink_ack = push, ack

    def flush_credit(self) -> None:
        """Report to :attr:`on_credit` the queues whose credit plain acks returned since the last call."""
        due = self._credit_due
        if due:
            on_credit = self.on_credit
            if on_credit is not None:
                for queue in due:
                    on_credit(queue)
            due.clear()

    def _plain(self, obj: dict[str, Any]) -> list[Command] | None:
        # The two frames of every job in their plainest form, in one step: what _handle, parse and
        # _apply would do with them, without their dispatch. None for anything else, including
        # every invalid frame, which the general path then answers with its own errors.
        if not self._authenticated:
            return None
        # Members: op, the two checked below, and maybe ref; nothing else (len() costs less than
        # comparing the keys with a set, and says the same once those are there).
        size = len(obj)
        if size != 3 and (size != 4 or "ref" not in obj):
            return None
        op = obj.get("op")
        if op == "push":
            queue, ref = obj.get("queue"), obj.get("ref")
            if type(queue) is not str or "body" not in obj or not (ref is None or type(ref) is str):
                return None
            if queue != self._valid_queue:
                if NAME_RE.fullmatch(queue) is None:
                    return None
                self._valid_queue = queue
            if self._authorize is not None and not self._authorize("produce", queue):
                return None
            try:
                body = orjson.dumps(obj["body"])
            except TypeError:  # nested too deeply to write: the general path says so
                return None
            self._errors = 0
            assert self._sink_push is not None
            return [] if self._sink_push(ref, queue, body) else [plain_push(ref, queue, body)]
        if op == "ack":
            job_id, token, ref = obj.get("id"), obj.get("token"), obj.get("ref")
            if type(job_id) is not str or type(token) is not str or not (job_id and token):
                return None
            if not (ref is None or type(ref) is str):
                return None
            queue = self._owner.get(job_id)
            if queue is None:
                return None
            in_flight = self._subs[queue].in_flight
            if in_flight[job_id] != token:
                return None
            # As _apply's _forget, its credit reported at flush_credit.
            del self._owner[job_id]
            del in_flight[job_id]
            due = self._credit_due
            if due is None:
                self._credit_due = {queue}  # made on the first ack: an idle connection holds no set
            else:
                due.add(queue)
            self._errors = 0
            assert self._sink_ack is not None
            return [] if self._sink_ack(ref, queue, job_id, token) else [plain_ack(ref, queue, job_id, token)]
        return None

    def plain_done(self, ref: str | None, job_id: str | None = None) -> None:
        """:meth:`command_done` for a frame the plain sink took: a push's new ``job_id``, or an ack."""
        if job_id is not None:
            self._send(pushed_frame(job_id, ref))
        elif ref is not None:
            self._send(encode({"op": "ok", "ref": ref}))

    def plain_failed(self, ref: str | None, code: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        """:meth:`command_failed` for a frame the plain sink took (nothing to undo for those)."""
        self._send(error_frame(code, message, ref, extra))
