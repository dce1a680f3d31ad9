"""A lean ASGI path for the hot push routes: ``POST``/``PUT /q/{queue}`` and ``POST /qb/{queue}``.

Through Starlette, one pushed job costs the broker about as much CPU again as the framework's
no-op request: four middlewares, the router, a ``Request``, ``QueryParams`` of an empty query
string, the body streamed through ``request.stream()``, a ``Response`` assembled header by
header. :class:`FastPush` sits in front of all that (``app.BrokerApp`` calls it first) and serves
those routes itself, giving the same answers:

- It answers a request only when it can answer exactly as the app would. Anything else goes to
  the app untouched: other routes and methods, a ``root_path``, a cross-origin request (an
  ``Origin`` header while CORS is on), a missing or refused token, the in-flight limit reached,
  a bad queue name, query parameter or body, a body over ``limits.max_body``, a client gone while
  sending it. When the body was already read, the app gets the same messages replayed, so its
  own validation refuses the request with its own status and JSON. Validation has no side
  effect, so running it twice is harmless, and only bad requests pay for it.
- What the middlewares do to a request it answers, it does too: the request id (in the logs'
  context and the ``X-Request-Id`` header, ``logs.RequestIdMiddleware``), CORS's ``Vary: Origin``
  on a same-origin request, the in-flight count and the token check of ``auth.AccessMiddleware``
  (the same instance's counter, the same ``ROUTE_ROLES`` and token functions), and the app's
  exception handlers for what the push itself raises (409 for a ``uniq`` clash, 503 when Redis
  is away, 500 for anything unexpected, re-raised as ``ServerErrorMiddleware`` does).

Its pieces serve :mod:`broker.httpproto` too, which answers the same requests below ASGI:
:meth:`FastPush.admit` (may this path serve the request, as its headers and query tell),
:meth:`FastPush.jobs` (the body's jobs, or None), :meth:`FastPush.created` and
:meth:`FastPush.refused` (the answer, headers in the app's order).

tests/test_fastpush.py sends a matrix of good and bad requests to both paths and compares
status, headers and body, through uvicorn's protocol and the broker's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import params
from broker.auth import ROUTE_ROLES, AccessMiddleware, Need, bearer, find_token, may
from broker.config import Settings
from broker.logs import REQUEST_ID, accepted_id, new_id
from broker.models import QUEUE_NAME_RE, PushOptions

__all__ = ["Admitted", "Answer", "FastPush"]

Handler = Callable[[Request, Exception], Awaitable[Response]]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body

CONTENT_TYPE = (b"content-type", b"application/json")
VARY = (b"vary", b"Origin")  # what CORSMiddleware adds to the answer of a request without Origin


class _Fallback(Exception):
    """The request is the app's to answer (raised before any side effect)."""


class Admitted(NamedTuple):
    """A push request this path serves, as far as its headers and query tell."""

    runtime: Any  # the app's Runtime
    queue: str
    batch: bool  # POST /qb/: a batch
    count_failure: bool  # PUT /q/: a re-queue after failure
    opts: PushOptions
    request_id: str


class FastPush:
    """Serves the push routes before the app's middleware stack; everything else goes to the app.

    Args:
        settings: the broker settings (limits, auth, CORS, queue defaults).

    Call :meth:`bind` with the app once it exists, and build the app's access middleware with
    :meth:`access_middleware`, so that both paths share one in-flight count.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_body = settings.limits.max_body
        self.max_batch = settings.limits.max_batch
        self.max_connections = settings.limits.max_connections
        self.auth = settings.auth.enabled
        self.cors = bool(settings.server.cors_origins)
        self.defaults = params.push_options({}, settings.queues)
        # The role a push route needs on its queue; None: a rule this path does not apply (a
        # route open to all, missing from the table, or depending on the query), so with auth on
        # such requests go to AccessMiddleware.
        self.needs: dict[tuple[str, str], Need | None] = {}
        for prefix, method in (("/q/", "POST"), ("/q/", "PUT"), ("/qb/", "POST")):
            need = ROUTE_ROLES.get((f"{prefix}{{queue}}", method))
            plain = need is not None and need.refine is None and need.queue_param is None
            self.needs[prefix, method] = need if plain else None
        self.app: Starlette | None = None
        self.fallback: ASGIApp = _unbound
        self.handlers: dict[Any, Handler] = {}
        self.on_unexpected: Handler = _no_handler
        self.gate: AccessMiddleware | None = None
        self.served = 0  # requests answered here rather than by the app (tests look)
        self.served_below = 0  # of which broker.httpproto answered without ASGI

    def bind(self, app: Starlette, fallback: ASGIApp) -> None:
        """Serve for ``app`` (its ``state.runtime`` pushes, its exception handlers answer errors);
        send every request this path does not serve to ``fallback`` (the app's own stack)."""
        self.app = app
        self.fallback = fallback
        self.handlers = {key: h for key, h in app.exception_handlers.items() if key not in (500, Exception)}
        self.on_unexpected = app.exception_handlers[Exception]  # ServerErrorMiddleware's handler

    def access_middleware(self, app: ASGIApp, settings: Settings, routes: Sequence[BaseRoute]) -> AccessMiddleware:
        """The app's ``AccessMiddleware`` (Starlette calls this when it builds its stack), kept so
        that requests served here count against the same ``limits.max_connections``."""
        self.gate = AccessMiddleware(app, settings, routes)
        return self.gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (admitted := self.admit(scope)) is not None:
            await self._serve(scope, receive, send, admitted)
        else:
            await self.fallback(scope, receive, send)

    def admit(self, scope: Scope) -> Admitted | None:
        """What serving this request needs, when it is a push this path answers as the app would
        (on its headers and query); None: the app's to answer. ``scope`` needs ``method``,
        ``path``, ``root_path``, ``query_string`` and ``headers``. Has no side effect but the
        token in ``scope["state"]``, as ``AccessMiddleware`` leaves it."""
        path: str = scope["path"]
        if path.startswith("/q/"):
            queue, batch = path[3:], False
        elif path.startswith("/qb/"):
            queue, batch = path[4:], True
        else:
            return None
        method: str = scope["method"]
        if not (method == "POST" or (method == "PUT" and not batch)) or not QUEUE_NAME_RE.fullmatch(queue):
            return None
        gate = self.gate
        runtime = getattr(self.app.state, "runtime", None) if self.app is not None else None
        if gate is None or runtime is None or scope.get("root_path"):
            return None  # not started yet, or mounted: the app decides
        if gate.in_flight >= self.max_connections:
            return None
        client_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if client_id is None:
                    client_id = value
            elif name == b"origin":
                if self.cors:
                    return None  # a cross-origin request: CORSMiddleware's answer
            elif name == b"content-length" and not (value.isdigit() and int(value) <= self.max_body):
                if not _length_ok(value, self.max_body):
                    return None
        query: bytes = scope["query_string"]
        try:
            if self.auth:
                self._authorize(scope, ("/qb/" if batch else "/q/", method), queue)
            if not query:
                opts = self.defaults
            else:
                opts = params.push_options(QueryParams(query), self.settings.queues, allow_uniq=not batch)
        except Exception:
            return None
        request_id = accepted_id(client_id) if client_id is not None else None
        return Admitted(runtime, queue, batch, method == "PUT", opts, request_id or new_id())

    async def _serve(self, scope: Scope, receive: Receive, send: Send, admitted: Admitted) -> None:
        scope["app"] = self.app
        messages: list[Message] = []
        gate = self.gate
        assert gate is not None  # admit() saw it
        gate.in_flight += 1
        try:
            body = await self._read(receive, messages)
            jobs = self.jobs(body, admitted.batch) if body is not None else None
            if jobs is not None:
                token = REQUEST_ID.set(admitted.request_id)
                await self._push(scope, receive, send, admitted, jobs)
                REQUEST_ID.reset(token)
                return
        finally:
            gate.in_flight -= 1
        await self.fallback(scope, _replay(messages, receive), send)

    def _authorize(self, scope: Scope, route: tuple[str, str], queue: str) -> None:
        """What ``AccessMiddleware.check`` does for this route; raises _Fallback on any refusal."""
        need = self.needs[route]
        if need is None:  # pragma: no cover - not with today's ROUTE_ROLES
            raise _Fallback
        presented = bearer(Headers(raw=scope["headers"]))
        token = find_token(self.settings, presented) if presented is not None else None
        if token is None or not may(token, need, queue):
            raise _Fallback
        scope.setdefault("state", {})["token"] = token

    async def _read(self, receive: Receive, messages: list[Message]) -> bytes | None:
        """The body, or None when it goes over ``limits.max_body`` or the client left. Every
        message received is appended to ``messages``, for the app to see again."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def jobs(self, body: bytes, batch: bool) -> bytes | list[bytes] | None:
        """The job body (or a batch's bodies) read from a request's body (at most
        ``limits.max_body`` bytes), validated as ``http.push_job`` (or ``push_batch``) does; None
        when the app would refuse it."""
        try:
            if batch:
                return self._batch(orjson.loads(body))
            if body.strip():
                orjson.loads(body)
                return body
        except Exception:
            pass
        return None

    def _batch(self, data: Any) -> list[bytes] | None:
        """A batch's job bodies re-encoded, as ``http.push_batch`` accepts them; else None."""
        if isinstance(data, dict) and len(data) == 1 and "jobs" in data:
            data = data["jobs"]
        if not isinstance(data, list) or not 0 < len(data) <= self.max_batch:
            return None
        dumps = orjson.dumps
        return [dumps(job) for job in data]

    async def _push(
        self, scope: Scope, receive: Receive, send: Send, admitted: Admitted, jobs: bytes | list[bytes]
    ) -> None:
        """Push, then answer as the route and the middlewares around it would."""
        self.served += 1
        started = False
        try:
            try:
                if isinstance(jobs, bytes):
                    job_id = await admitted.runtime.push(
                        admitted.queue, jobs, admitted.opts, count_failure=admitted.count_failure
                    )
                    status, headers, content = self.created(admitted, job_id)
                else:
                    ids = await admitted.runtime.push_batch(admitted.queue, jobs, admitted.opts)
                    status, headers, content = self.created(admitted, ids)
            except Exception as exc:
                answer = await self.refused(scope, admitted, exc)
                if answer is None:  # pragma: no cover - a push raises BrokerError or RedisError
                    raise
                status, headers, content = answer
            started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
        except Exception as exc:  # pragma: no cover - kept so that a bug answers as through the app
            # ServerErrorMiddleware's part: the 500 handler, outside the request id, then re-raise.
            response = await self.on_unexpected(Request(scope), exc)
            if not started:
                await response(scope, receive, send)
            raise

    def created(self, admitted: Admitted, pushed: str | list[str]) -> Answer:
        """The route's answer to a push that worked: the job's id, or the batch's ids."""
        name = admitted.queue
        if isinstance(pushed, str):
            job_id = pushed.encode()
            content = b'{"id":"%s","queue":"%s"}' % (job_id, name.encode())
            headers = [(b"location", b"/j/%s/%s" % (name.encode(), job_id)), (b"content-length", b"%d" % len(content))]
        else:
            content = orjson.dumps({"ids": pushed, "queue": name})
            headers = [(b"content-length", b"%d" % len(content))]
        headers.append(CONTENT_TYPE)
        return 201, self._finish(headers, admitted), content

    async def refused(self, scope: Scope, admitted: Admitted, exc: Exception) -> Answer | None:
        """The app's exception handler's answer to what a push raised (``scope``: the request's);
        None when no handler takes it (ServerErrorMiddleware's case)."""
        handler = self._handler(exc)
        if handler is None:  # pragma: no cover - a push raises BrokerError or RedisError
            return None
        response = await handler(Request(scope), exc)
        return response.status_code, self._finish([*response.raw_headers], admitted), bytes(response.body)

    def _finish(self, headers: list[tuple[bytes, bytes]], admitted: Admitted) -> list[tuple[bytes, bytes]]:
        """What the middlewares add: CORS's ``Vary``, then the request id."""
        if self.cors:
            headers.append(VARY)
        headers.append((b"x-request-id", admitted.request_id.encode()))
        return headers

    def _handler(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None  # pragma: no cover - see _push


def _length_ok(value: bytes, limit: int) -> bool:
    """Whether ``http.read_body`` goes on reading with this ``Content-Length`` (it refuses a
    declared size over the limit before reading)."""
    declared = value.decode("latin-1")
    return not declared.isdigit() or (declared.isascii() and int(declared) <= limit)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` again before asking ``receive`` for more."""
    pending = list(reversed(messages))

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()  # pragma: no cover - the app stops reading where this path stopped

    return replay


async def _unbound(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover - misuse
    raise RuntimeError("FastPush.bind() was not called")


async def _no_handler(request: Request, exc: Exception) -> Response:  # pragma: no cover - misuse
    raise RuntimeError("FastPush.bind() was not called") from exc
