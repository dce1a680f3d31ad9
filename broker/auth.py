"""Access control: bearer tokens, the role each HTTP route needs, and admission limits.

Auth is on when ``auth.tokens`` lists at least one token. Each token holds roles (``produce``,
``consume``, ``admin``) on queue-name globs (:class:`~broker.config.AuthToken`). Over HTTP the
token comes in ``Authorization: Bearer <token>``; :class:`AccessMiddleware` finds the route a
request is for, looks up the role it needs in :data:`ROUTE_ROLES`, and answers 401 (no or unknown
token) or 403 (the token lacks the role) before the route runs. WebSockets authenticate in
``broker/ws.py`` with the same :func:`find_token` (header, ``?token=`` or an ``auth`` frame).

Tokens are compared in constant time over their SHA-256 digests, so neither a token's content
nor its length shows in response times, and they are never logged.

``docs/security.md`` has the same table as :data:`ROUTE_ROLES`, for readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.config import AuthToken, Role, Settings
from broker.models import dumps

log = logging.getLogger("presque.auth")

ROLES: tuple[Role, ...] = ("produce", "consume", "admin")
READ: tuple[Role, ...] = ("consume", "admin")  # may see job bodies
ALL = "*"  # the name a broker-wide route asks about: only the glob "*" matches it
UNLIMITED_PATHS = frozenset({"/health"})  # answered even at the concurrency limit
_CONVERTER = re.compile(r":\w+}")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def find_token(settings: Settings, presented: str) -> AuthToken | None:
    """The configured token equal to ``presented``, or None.

    Every configured token is compared, in constant time over fixed-length digests, so the time
    taken says nothing about which token (or how much of one) matched.
    """
    wanted = _digest(presented)
    found = None
    for candidate in settings.auth.tokens:
        if hmac.compare_digest(_digest(candidate.token), wanted):
            found = candidate
    return found


def bearer(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or another scheme."""
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def presented_token(conn: HTTPConnection) -> str | None:
    """A WebSocket's token: the ``Authorization`` header, else the ``token`` query parameter."""
    return bearer(conn.headers) or conn.query_params.get("token") or None


# -- which route needs which role ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Need:
    """What a route asks of a token: one of ``roles`` on the route's queue (or on ``*``).

    Args:
        roles: any one of these suffices.
        everything: the route covers every queue: the role must be held on the name ``*``.
        refine: for routes whose need depends on the query: ``(query) -> Need``.
        queue_param: the query parameter naming the queue, for routes without ``{queue}``.
    """

    roles: tuple[Role, ...]
    everything: bool = False
    refine: Callable[[QueryParams], Need] | None = None
    queue_param: str | None = None

    def resolve(self, query: QueryParams) -> Need:
        return self.refine(query) if self.refine is not None else self


def _status_need(query: QueryParams) -> Need:
    with_desc = query.get("with_desc") not in (None, "", "0", "false")
    return Need(READ) if with_desc else Need(ROLES)


def _workers_need(query: QueryParams) -> Need:
    if query.get("queue_name") is not None:
        return Need(ROLES, queue_param="queue_name")
    return Need(("admin",), everything=True)


PRODUCE = Need(("produce",))
CONSUME = Need(("consume",))
ADMIN = Need(("admin",))
ADMIN_ALL = Need(("admin",), everything=True)

# (path template, method) -> Need; None: open to anyone. A route missing here is refused (403)
# when auth is on, so that a new route is never open by accident; tests/test_auth.py checks that
# every route of the app is listed.
ROUTE_ROLES: Mapping[tuple[str, str], Need | None] = {
    ("/q/{queue}", "POST"): PRODUCE,
    ("/q/{queue}", "PUT"): PRODUCE,
    ("/q/{queue}", "GET"): CONSUME,
    ("/q/{queue}", "DELETE"): ADMIN,
    ("/qb/{queue}", "POST"): PRODUCE,
    ("/qb/{queue}", "GET"): CONSUME,
    ("/j/{queue}", "GET"): Need(ROLES),
    ("/j/{queue}/{id}", "GET"): Need(READ),
    ("/j/{queue}/{id}/{action}", "POST"): CONSUME,
    ("/status/", "GET"): ADMIN_ALL,
    ("/status", "GET"): ADMIN_ALL,
    ("/status/{queue}", "GET"): Need(ROLES, refine=_status_need),
    ("/control/{queue}", "GET"): Need(ROLES),
    ("/control/{queue}", "POST"): ADMIN,
    ("/dead/{queue}", "GET"): ADMIN,
    ("/dead/{queue}", "DELETE"): ADMIN,
    ("/dead/{queue}/retry", "POST"): ADMIN,
    ("/dead/{queue}/{id}", "DELETE"): ADMIN,
    ("/w/", "GET"): Need(ROLES, refine=_workers_need),
    ("/w/{queue}", "POST"): CONSUME,
    ("/w/{queue}", "DELETE"): CONSUME,
    ("/stats", "GET"): ADMIN_ALL,
    ("/stats/history", "GET"): ADMIN_ALL,
    ("/metrics", "GET"): ADMIN_ALL,
    ("/health", "GET"): None,
    ("/openapi.json", "GET"): None,
    ("/asyncapi.json", "GET"): None,
    ("/auth", "GET"): None,  # answers for the token it is shown, if any
    ("/", "GET"): None,
}


def route_template(route: BaseRoute) -> str:
    """A route's path without converters: ``/j/{queue}/{id}/{action:str}`` -> ``/j/{queue}/{id}/{action}``."""
    path: str = getattr(route, "path", "")
    return _CONVERTER.sub("}", path)


def may(token: AuthToken, need: Need, queue: str | None) -> bool:
    """Whether ``token`` meets ``need`` on ``queue`` (the route's ``{queue}``, if it has one)."""
    name = ALL if need.everything or queue is None else queue
    return any(token.allows(role, name) for role in need.roles)


# -- the HTTP middleware ---------------------------------------------------------------------------


def json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps({"error": message}), status, headers=headers, media_type="application/json")


UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="presque"'}


class AccessMiddleware:
    """ASGI middleware: the HTTP concurrency limit, then auth (when tokens are configured).

    Beyond ``limits.max_connections`` HTTP requests in progress in this process, a request is
    answered 503 with ``Retry-After: 1`` at once (``/health`` is always answered). WebSocket
    connections are counted and limited separately, by ``broker/ws.py``.

    Args:
        app: the ASGI app to protect (the router).
        settings: the broker settings (``auth``, ``limits.max_connections``).
        routes: the app's routes, to learn which one a request is for.
    """

    def __init__(self, app: ASGIApp, settings: Settings, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.settings = settings
        self.routes = list(routes)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limited = scope["path"] not in UNLIMITED_PATHS
        if limited and self.in_flight >= self.settings.limits.max_connections:
            message = f"too many requests in progress (limits.max_connections = {self.settings.limits.max_connections})"
            await json_error(503, message, {"Retry-After": "1"})(scope, receive, send)
            return
        if self.settings.auth.enabled:
            refusal = self.check(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if not limited:
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def match(self, scope: Scope) -> tuple[BaseRoute, Mapping[str, str]] | None:
        """The route that will serve this request and its path parameters; None if none fully matches."""
        for route in self.routes:
            found, child = route.matches(scope)
            if found is Match.FULL:
                return route, child.get("path_params", {})
        return None

    def check(self, scope: Scope) -> Response | None:
        """None when the request may go on, else the 401 or 403 response to send."""
        matched = self.match(scope)
        if matched is None:
            return None  # the router answers 404 or 405
        route, params = matched
        if isinstance(route, Mount):
            return None  # static files: the dashboard's page and scripts are public
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        key = (route_template(route), method)
        if key in ROUTE_ROLES and ROUTE_ROLES[key] is None:
            return None
        conn = HTTPConnection(scope)
        presented = bearer(conn.headers)
        if presented is None:
            return json_error(401, "authentication required: send Authorization: Bearer <token>", UNAUTHORIZED_HEADERS)
        token = find_token(self.settings, presented)
        if token is None:
            return json_error(401, "invalid token", UNAUTHORIZED_HEADERS)
        scope.setdefault("state", {})["token"] = token
        need = ROUTE_ROLES.get(key)
        if need is None:
            return json_error(403, f"no role grants {method} {key[0]}")
        need = need.resolve(conn.query_params)
        queue = params.get("queue")
        if need.queue_param is not None:
            queue = conn.query_params.get(need.queue_param)
        if may(token, need, queue):
            return None
        on = "every queue ('*')" if need.everything or queue is None else f"queue {queue[:140]!r}"
        roles = " or ".join(need.roles)
        return json_error(403, f"token {token.name!r} lacks the {roles} role on {on}")


# -- GET /auth: what the caller's token may do -----------------------------------------------------


def grants(token: AuthToken | None) -> dict[str, list[str]]:
    """``{role: [globs]}``: everything (``["*"]``) when auth is off."""
    if token is None:
        return {role: [ALL] for role in ROLES}
    return {role: list(getattr(token.roles, role)) for role in ROLES}


async def whoami(request: Request) -> Response:
    """GET /auth: whether auth is on, and the name and roles of the token sent (if any).

    The dashboard asks this first: 200 with ``"name": null`` and no roles means it must ask for a
    token; an unknown token is 401.
    """
    settings: Settings = request.app.state.settings
    enabled = settings.auth.enabled
    token = None
    body: dict[str, object]
    if enabled:
        presented = bearer(request.headers)
        if presented is not None:
            token = find_token(settings, presented)
            if token is None:
                return json_error(401, "invalid token", UNAUTHORIZED_HEADERS)
        if token is None:
            body = {"auth": True, "name": None, "roles": {role: [] for role in ROLES}}
            return Response(dumps(body), media_type="application/json")
    body = {"auth": enabled, "name": token.name if token else None, "roles": grants(token)}
    return Response(dumps(body), media_type="application/json")


def auth_routes() -> list[Route]:
    return [Route("/auth", whoami, methods=["GET"])]


# -- keeping tokens out of the logs ---------------------------------------------------------------

_SECRET_PATTERNS = (
    (re.compile(r"(?i)(\btoken=)[^&\s\"']+"), r"\1***"),  # ?token= in a WebSocket URL
    (re.compile(r"(?i)(\bbearer\s+)[^\s\"',]+"), r"\1***"),  # an Authorization header
    (re.compile(r'("token"\s*:\s*")(?:[^"\\]|\\.)*"'), r'\1***"'),  # an auth (or ack) frame
)


class Redactor:
    """Replaces tokens in log text: the configured ones, and whatever sits where a token goes."""

    def __init__(self, settings: Settings) -> None:
        self.secrets = sorted({t.token for t in settings.auth.tokens}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        for pattern, replacement in _SECRET_PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def clean(self, value: object) -> object:
        """``value`` itself when it shows no secret, else its redacted text."""
        if value is None or isinstance(value, int | float):
            return value
        text = value if isinstance(value, str) else str(value)
        redacted = self.redact(text)
        return value if redacted == text else redacted


@contextlib.contextmanager
def redacted_logs(settings: Settings) -> Iterator[None]:
    """While inside, every log record of the process has its tokens replaced by ``***``.

    uvicorn logs WebSocket request paths (``/ws?token=...``) at info level, and the websockets
    library logs whole frames (an ``auth`` frame's token) at debug level; neither can be told not
    to. So the records are cleaned where they are made, whichever logger or handler they go to.
    Each argument is cleaned on its own, so formatters that read ``record.args`` still work.
    """
    if not settings.auth.enabled:
        yield
        return
    redactor = Redactor(settings)
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if isinstance(record.msg, str):
            record.msg = redactor.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redactor.clean(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: redactor.clean(v) for k, v in record.args.items()}
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)


# -- start-up check --------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` (what the server binds to) is only reachable from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def warn_if_exposed(host: str, settings: Settings) -> bool:
    """Log a loud warning when the broker listens beyond loopback with auth off.

    Call it where the listening address is known (``presque serve``), before serving.

    Returns:
        True if it warned.
    """
    if settings.auth.enabled or is_loopback(host):
        return False
    log.warning(
        "\n%s\n  presque listens on %s WITHOUT AUTHENTICATION: anyone who can reach this address can push,\n"
        "  take, purge and delete jobs. Configure auth.tokens (see docs/security.md) or bind to 127.0.0.1.\n%s",
        "!" * 100,
        host,
        "!" * 100,
    )
    return True
