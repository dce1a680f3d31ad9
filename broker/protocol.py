"""The WebSocket session as a sans-I/O state machine: frames in, commands and frames out.

A :class:`Session` owns everything one connection knows — its subscriptions with their credit and
in-flight jobs, its channels and watches, its authentication — and nothing else: no socket, no
Redis, no clock. The I/O layer (``broker/connection.py``) drives it:

1. every received frame goes to :meth:`Session.receive`, which answers protocol errors itself and
   returns the :data:`Command` objects to execute, in frame order;
2. the I/O layer executes each command against the queue service, in order, and reports the
   outcome with :meth:`Session.command_done` / :meth:`Session.command_failed` (or
   :meth:`Session.command_raised`; :meth:`Session.authenticated` for :class:`Auth`);
3. it feeds jobs and broadcasts in with :meth:`Session.deliver`, :meth:`Session.message`,
   :meth:`Session.stats`, :meth:`Session.event`, asking :meth:`Session.credit` how many jobs each
   subscription may take (:attr:`Session.on_credit` tells when a job it held let go) and reporting
   its socket backlog with :meth:`Session.set_send_backlog`;
4. after each of these calls it sends :meth:`Session.data_to_send` and, once
   :attr:`Session.close_code` is set, closes the socket with that code;
5. when the socket is gone it calls :meth:`Session.close` and returns the jobs it lists.

The two frames of every job, a plain push and a plain ack, may skip the command objects: with
:meth:`Session.set_plain_sink` the session hands them to the I/O layer as it reads them (a run
of frames at a time with :meth:`Session.receive_frames`), and the I/O layer reports their outcome
with :meth:`Session.plain_done` / :meth:`Session.plain_failed`.

:class:`Session` is assembled from parts that work on one state, each in its own module:
``broker/session_core.py`` (the state: subscriptions, credit, in-flight jobs, deliveries, output
and closing), ``broker/session_plain.py`` (the plain fast lane) and ``broker/session_commands.py``
(command handling and replies). This module holds its input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from broker.commands import Command, Lease
from broker.frames import CloseCode, ErrorCode, FrameError, SessionLimits, decode, error_frame, read_ref
from broker.session_commands import CommandHandling
from broker.session_core import Authorize, SessionState, Subscription
from broker.session_plain import PlainLane

__all__ = ["Authorize", "Command", "Lease", "Session", "SessionLimits", "SessionState", "Subscription"]


class Session(PlainLane, CommandHandling):
    """The protocol state of one WebSocket connection.

    Not thread-safe; every method is synchronous and cheap. Invariants: a manual-ack
    subscription never holds more than ``prefetch`` jobs; every client frame with a ``ref`` gets
    exactly one reply; jobs held by the connection are only ever handed back through
    :meth:`close`, :class:`Unsubscribe` ``release``, or a ``False`` from :meth:`deliver`.

    Args:
        limits: per-connection limits.
        authorize: decides ``(role, name)``; None allows everything.
        auth_required: refuse every op but ``auth`` until :meth:`authenticated` is called.
    """

    # --- input --------------------------------------------------------------------------------

    def receive(self, data: str | bytes) -> list[Command]:
        """Handle one client frame (``str`` for a text frame, ``bytes`` for a binary one).

        Returns:
            The commands to execute, in order (zero or one today). Protocol errors are answered
            here, and may set :attr:`close_code`. Frames received while closing are ignored.
        """
        if self.state is not SessionState.OPEN:
            return []
        if self._sink_push is not None and type(data) is str and 4 * len(data) <= self.limits.max_frame:
            # A text frame surely within max_frame (a str is at most 4 UTF-8 bytes a character).
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None  # the general path answers bad_json
            if type(obj) is dict:
                cmds = self._plain(obj)
                return self.receive_object(obj) if cmds is None else cmds
        # A str is at least len(data) UTF-8 bytes and at most 4 per character: encode only if unsure.
        size = len(data)
        if isinstance(data, str) and 4 * size > self.limits.max_frame:
            size = len(data.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_frame:
            self._send(error_frame(ErrorCode.TOO_LARGE, f"frame of {size} bytes over max_frame", None))
            self.start_close(CloseCode.MESSAGE_TOO_BIG, "frame too big")
            return []
        ref = None
        try:
            obj = decode(data)
            ref = read_ref(obj)
            return self._handle(obj, ref)
        except FrameError as exc:
            self._protocol_error(exc, ref)
            return []

    def receive_frames(self, frames: Iterable[str | bytes]) -> Iterator[Command]:
        """:meth:`receive` each frame in turn, yielding the commands to execute.

        Execute each command before asking for the next: the frames after it are not read until
        then. Before each command and at the end, the credit of plain acks is told
        (:meth:`flush_credit`).
        """
        # receive()'s first case inlined: a run of plain pushes and acks costs one call, not one per frame.
        max_chars = self.limits.max_frame // 4
        loads, plain, open_ = orjson.loads, self._plain, SessionState.OPEN
        for data in frames:
            if self.state is not open_:
                break  # receive() would ignore the rest
            cmds: list[Command] | None = None
            if self._sink_push is not None and type(data) is str and len(data) <= max_chars:
                try:
                    obj = loads(data)
                except orjson.JSONDecodeError:
                    obj = None
                if type(obj) is dict:
                    cmds = plain(obj)
                    if cmds is None:
                        cmds = self.receive_object(obj)
            if cmds is None:
                cmds = self.receive(data)
            if cmds:
                self.flush_credit()
                yield from cmds
        self.flush_credit()

    def receive_object(self, obj: Mapping[str, Any]) -> list[Command]:
        """Like :meth:`receive` for a frame that is already a JSON object.

        For frames the I/O layer makes up, e.g. the implicit subscribe of ``/ws/{queue}``.
        """
        if self.state is not SessionState.OPEN:
            return []
        ref = None
        try:
            ref = read_ref(obj)
            return self._handle(obj, ref)
        except FrameError as exc:
            self._protocol_error(exc, ref)
            return []
