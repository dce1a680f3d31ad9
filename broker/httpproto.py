"""LeanHttpProtocol: uvicorn's httptools protocol, answering plain pushes below ASGI.

With :mod:`broker.fastpush` in front of Starlette, a pushed job still costs the broker what
uvicorn spends on any ASGI request: a scope, a ``RequestResponseCycle`` with its
``asyncio.Event``, a task running the app's coroutine, ``receive`` awaited for the body, and two
``send`` calls, each writing to the socket. For ``POST``/``PUT /q/{queue}`` and ``POST
/qb/{queue}`` this subclass does without all of it when it can: the request line and headers as
uvicorn parses them are shown to :meth:`FastPush.admit`, the body is collected from the parser's
callbacks and checked by :meth:`FastPush.jobs`, a job goes to the push coalescer with a callback
(``Runtime.push_soon``: no task, no future), and the answer — :meth:`FastPush.created`'s, the
same bytes uvicorn would write — goes out in one ``transport.write``.

Everything else takes uvicorn's own path, unchanged: other routes and methods, anything
``admit`` refuses (auth, CORS, the in-flight limit, bad query or headers), an upgrade,
``Expect: 100-continue``, a chunked body, a percent-encoded path, a request pipelined behind one
still in progress. A request whose body turns out bad (or too big), or whose client leaves while
sending it, is handed over to uvicorn's ``RequestResponseCycle`` with the body read so far, so
the app answers (or sees the disconnect) exactly as if it had had the request from the start.
What a push raises is answered by the app's exception handlers (:meth:`FastPush.refused`), in a
task, as rarely as pushes fail. A batch (``/qb/``) awaits ``Runtime.push_batch`` in a task: one
per hundred jobs is cheap.

Keep-alive, ``Connection: close``, HTTP/1.0, graceful shutdown (the lean request has the
``keep_alive`` and ``response_complete`` that uvicorn's ``shutdown`` looks at), the keep-alive
timer and pipelining (``on_response_complete`` starts the next request) work as for any request.
Only a plain stack is served so: the app itself (or behind uvicorn's proxy-headers middleware,
which changes nothing a push answer shows), no root path, no ``limit_concurrency``, no access log
(uvicorn's, at level INFO).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import httptools
from starlette.requests import Request
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from broker.fastpush import Admitted, Answer, FastPush
from broker.logs import REQUEST_ID

__all__ = ["LeanHttpProtocol"]

SERVER_ERROR: Answer = (
    500,
    [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"), (b"connection", b"close")],
    b"Internal Server Error",
)  # what uvicorn answers when the app fails before starting its response


class _Lean:
    """A push request served here; looks enough like uvicorn's cycle for its ``shutdown``."""

    __slots__ = ("admitted", "body", "keep_alive", "pushing", "response_complete", "scope")

    def __init__(self, scope: Any, admitted: Admitted, keep_alive: bool) -> None:
        self.scope = scope
        self.admitted = admitted
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.pushing = False  # the body is complete and handed to the runtime
        self.response_complete = False


def lean_path(config: Config) -> FastPush | None:
    """The app's lean push path when uvicorn serves it with nothing this protocol would skip."""
    app = config.loaded_app
    if isinstance(app, ProxyHeadersMiddleware):
        app = app.app
    fast = getattr(app, "fast_push", None)
    if not isinstance(fast, FastPush) or config.root_path or config.limit_concurrency is not None:
        return None
    return fast


class LeanHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol``, serving plain pushes itself (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's access log line would show the client as the proxy headers make it: not here.
        logs_access = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self.fast = None if logs_access else lean_path(config)
        self.lost = False

    # -- the parser's callbacks -------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        lean = self._admit()
        if lean is None:
            super().on_headers_complete()
            return
        assert self.fast is not None and self.fast.gate is not None  # admit() saw them
        self.fast.gate.in_flight += 1
        self.cycle = lean  # type: ignore[assignment]

    def _admit(self) -> _Lean | None:
        """A lean request when this one is a push the lean path admits; else None."""
        fast = self.fast
        cycle = self.cycle
        if fast is None or self.expect_100_continue or (cycle is not None and not cycle.response_complete):
            return None
        url = self.url
        if not url.startswith((b"/q/", b"/qb/")) or b"%" in url:
            return None
        parser = self.parser
        method = parser.get_method()
        if (method != b"POST" and method != b"PUT") or parser.should_upgrade():
            return None
        for name, _ in self.headers:
            if name == b"transfer-encoding":
                return None
        http_version = parser.get_http_version()
        scope: Any = self.scope
        scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        parsed = httptools.parse_url(url)
        scope["path"] = parsed.path.decode("ascii")
        scope["raw_path"] = parsed.path
        scope["query_string"] = parsed.query or b""
        admitted = fast.admit(scope)
        if admitted is None:
            return None
        return _Lean(scope, admitted, http_version != "1.0" and parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        lean: RequestResponseCycle | _Lean = self.cycle
        if type(lean) is not _Lean:
            super().on_body(body)
            return
        lean.body += body
        assert self.fast is not None
        if len(lean.body) > self.fast.max_body:  # pragma: no cover - admit() saw a Content-Length within it
            self._hand_over(lean, more_body=True)

    def on_message_complete(self) -> None:
        lean: RequestResponseCycle | _Lean = self.cycle
        if type(lean) is not _Lean:
            super().on_message_complete()
            return
        fast = self.fast
        assert fast is not None
        admitted = lean.admitted
        jobs = fast.jobs(bytes(lean.body), admitted.batch)
        if jobs is None:
            self._hand_over(lean, more_body=False)
            return
        lean.pushing = True
        lean.body = bytearray()
        fast.served += 1
        fast.served_below += 1
        if isinstance(jobs, bytes):
            admitted.runtime.push_soon(
                admitted.queue, jobs, admitted.opts, partial(self._pushed, lean), count_failure=admitted.count_failure
            )
        else:
            self._in_task(self._push_batch(lean, jobs))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        lean: RequestResponseCycle | _Lean = self.cycle
        if type(lean) is _Lean:
            if lean.pushing:
                self.cycle = None  # type: ignore[assignment]  # _reply will see self.lost
            else:
                self._hand_over(lean, more_body=True)  # the app sees the client leave, as it would have
        super().connection_lost(exc)

    # -- answering ---------------------------------------------------------------------------------

    def _pushed(self, lean: _Lean, result: str | list[str] | BaseException) -> None:
        """The push is done (a coalescer callback): answer, at once unless it failed."""
        if isinstance(result, BaseException):
            self._in_task(self._refuse(lean, result))
            return
        assert self.fast is not None
        self._reply(lean, self.fast.created(lean.admitted, result))

    async def _push_batch(self, lean: _Lean, jobs: list[bytes]) -> None:
        admitted = lean.admitted
        try:
            ids = await admitted.runtime.push_batch(admitted.queue, jobs, admitted.opts)
        except BaseException as exc:
            await self._refuse(lean, exc)
            return
        self._pushed(lean, ids)

    async def _refuse(self, lean: _Lean, exc: BaseException) -> None:
        """Answer what the push raised, as the app's exception handlers would."""
        fast = self.fast
        assert fast is not None
        REQUEST_ID.set(lean.admitted.request_id)  # this task's context only: the handlers log with it
        answer = None
        if isinstance(exc, Exception):
            try:
                answer = await fast.refused(lean.scope, lean.admitted, exc)
            except Exception as failed:  # pragma: no cover - the handlers answer, they do not raise
                exc = failed
        if answer is not None:
            self._reply(lean, answer)
            return
        # Not with today's pushes, which raise BrokerError or RedisError. As through ASGI: the 500
        # handler's answer (outside the middlewares), uvicorn's log line, the connection closed.
        REQUEST_ID.set(None)
        if isinstance(exc, Exception):
            response = await fast.on_unexpected(Request(lean.scope), exc)
            answer = (response.status_code, [*response.raw_headers], bytes(response.body))
        else:
            answer = SERVER_ERROR
            lean.keep_alive = False
        self.logger.error("Exception in ASGI application\n", exc_info=exc)
        self._reply(lean, answer)
        self.transport.close()

    def _reply(self, lean: _Lean, answer: Answer) -> None:
        """Write the whole answer at once, then go on as uvicorn does after a response."""
        if self.flow.write_paused and not self.lost:
            self._in_task(self._reply_drained(lean, answer))
            return
        assert self.fast is not None and self.fast.gate is not None
        self.fast.gate.in_flight -= 1
        if self.lost or self.transport.is_closing():
            return  # as uvicorn's send to a disconnected client: nothing written, no response counted
        status, headers, content = answer
        out = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            out += (name, b": ", value, b"\r\n")
        for name, value in headers:
            out += (name, b": ", value, b"\r\n")
        if not lean.keep_alive:
            out.append(b"connection: close\r\n")
        out += (b"\r\n", content)
        self.transport.write(b"".join(out))
        lean.response_complete = True
        if not lean.keep_alive:
            self.transport.close()
        self.on_response_complete()

    async def _reply_drained(self, lean: _Lean, answer: Answer) -> None:
        await self.flow.drain()  # as uvicorn's send: the client reads what it has first
        self._reply(lean, answer)

    def _in_task(self, coro: Any) -> None:
        """Run ``coro`` in a task that uvicorn's shutdown waits for, like a request's."""
        task = self.loop.create_task(coro)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _hand_over(self, lean: _Lean, *, more_body: bool) -> None:
        """Give the request, with the body read so far, to uvicorn's cycle and the app."""
        assert self.fast is not None and self.fast.gate is not None
        self.fast.gate.in_flight -= 1
        cycle = RequestResponseCycle(
            scope=lean.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=lean.keep_alive,
            on_response=self.on_response_complete,
        )
        cycle.body = lean.body
        cycle.more_body = more_body
        cycle.message_event.set()
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        self.cycle = cycle
        self._start_asgi_task(cycle, self.app)
