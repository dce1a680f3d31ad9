"""The client's wire: a tiny keep-alive HTTP/1.1 client on asyncio streams, and error mapping.

The broker answers every JSON route with a ``Content-Length`` body (Starlette ``Response`` with
bytes), so this client needs no more than that; it also reads chunked bodies, for proxies.
Broker errors (an HTTP status with ``{"error": ...}``, or a WebSocket ``error`` frame) become the
typed exceptions of :mod:`broker.errors`; failures of the connection itself become the three
client-side classes defined here:

    BrokerError
    ├── ConnectionLost          the connection dropped before the broker answered
    │   └── PushUnconfirmed     ... and that request was a push: it may or may not exist
    └── Unavailable (503)
        └── BrokerUnreachable   the broker cannot be reached at all
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson

from broker.errors import (
    BadJSON,
    BadQueueName,
    BadRequest,
    BrokerError,
    Conflict,
    Forbidden,
    JobExists,
    NoJob,
    NotFound,
    QueueClosed,
    StaleToken,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownJob,
)

MAX_HEADER_BYTES = 65536


class ConnectionLost(BrokerError):
    """The connection to the broker dropped before its answer arrived.

    The request may or may not have taken effect on the broker.
    """

    code = "connection_lost"


class PushUnconfirmed(ConnectionLost):
    """A push was sent but its ``pushed`` confirmation never arrived (the socket dropped).

    The job may exist or not: the client never resends it by itself. Push with a ``uniq`` key and
    retry: a second push of a job that did land answers :class:`~broker.errors.JobExists` with its id.

    Attributes:
        queue: the queue pushed to.
        uniq: the push's ``uniq`` key, if any.
    """

    code = "push_unconfirmed"

    def __init__(self, queue: str, uniq: str | None = None) -> None:
        super().__init__(f"push to {queue!r} unconfirmed: the connection dropped before the broker answered")
        self.queue = queue
        self.uniq = uniq


class BrokerUnreachable(Unavailable):
    """The broker cannot be reached (refused, timed out, handshake failed)."""

    code = "unreachable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=1)


_BY_CODE: dict[str, type[BrokerError]] = {
    "bad_json": BadJSON,
    "bad_frame": BadRequest,
    "unknown_op": BadRequest,
    "bad_field": BadRequest,
    "bad_queue": BadQueueName,
    "too_many": BadRequest,
    "not_subscribed": Conflict,
    "already_subscribed": Conflict,
    "unknown_job": UnknownJob,
    "stale_token": StaleToken,
    "too_large": TooLarge,
    "forbidden": Forbidden,
    "unauthorized": Unauthorized,
    "no_job": NoJob,
    "queue_closed": QueueClosed,
    "not_found": NotFound,
    "conflict": Conflict,
    "unavailable": Unavailable,
}

_BY_STATUS: dict[int, type[BrokerError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: StaleToken,
    413: TooLarge,
    503: Unavailable,
}


def _build(kind: type[BrokerError], message: str, payload: Mapping[str, Any]) -> BrokerError:
    if kind is JobExists:
        return JobExists(str(payload.get("id", "")))
    return kind(message)


def error_from_frame(frame: Mapping[str, Any]) -> BrokerError:
    """The exception for a WebSocket ``error`` frame (by its ``code``)."""
    code = str(frame.get("code", "internal"))
    message = str(frame.get("error", "broker error"))
    if code == "job_exists":
        return JobExists(str(frame.get("id", "")))
    exc = _build(_BY_CODE.get(code, BrokerError), message, frame)
    exc.code = code  # the precise wire code (several codes share a class)
    return exc


def error_from_http(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> BrokerError:
    """The exception for an HTTP error answer: by status, refined by the message and payload."""
    try:
        payload = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    message = str(payload.get("error") or f"HTTP {status}")
    kind: type[BrokerError] | None = _BY_CODE.get(str(payload.get("code", "")))
    if kind is None:
        kind = _BY_STATUS.get(status, BrokerError)
        lowered = message.lower()
        if status == 400 and "queue name" in lowered:
            kind = BadQueueName
        elif status == 400 and "json" in lowered:
            kind = BadJSON
        elif status == 404 and message == "no job":
            kind = NoJob
        elif status == 404 and message == "queue is closed":
            kind = QueueClosed
        elif status == 404 and "job" in lowered:
            kind = UnknownJob
        elif status == 409 and "id" in payload:
            kind = JobExists
    exc = _build(kind, message, payload)
    if isinstance(exc, Unavailable) and headers is not None:
        with contextlib.suppress(ValueError):
            exc.retry_after = int(headers.get("retry-after", "1"))
    if kind is BrokerError:
        exc.status = status
    return exc


@dataclass(slots=True)
class Response:
    """An HTTP answer: status, lower-cased headers, body bytes."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the broker is, from its base URL."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    prefix: str  # path prefix, no trailing slash

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"broker URL must be http(s)://host[:port], got {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"

    @property
    def ws_url(self) -> str:
        return ("wss" if self.scheme == "https" else "ws") + self.base[len(self.scheme) :] + "/ws"


def path(*segments: str, query: Mapping[str, Any] | None = None) -> str:
    """``/a/b?x=1`` from segments (each percent-quoted) and a query without None values."""
    text = "/" + "/".join(quote(s, safe="") for s in segments)
    if query:
        pairs = {k: v for k, v in query.items() if v is not None}
        if pairs:
            text += "?" + urlencode(pairs)
    return text


class _Conn:
    __slots__ = ("reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HTTPTransport:
    """A pool of keep-alive HTTP/1.1 connections to one broker.

    Args:
        endpoint: the broker.
        headers: sent with every request (``Authorization``).
        timeout: seconds for connecting, and for each answer.
        max_connections: connections open at once; more requests wait.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        max_connections: int = 8,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._headers = dict(headers or {})
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl = ssl.create_default_context() if endpoint.scheme == "https" else None

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one request and read its answer (any status).

        A request that fails on a reused keep-alive connection before any answer byte (the
        broker closed it while idle) is sent again once on a fresh connection.

        Raises:
            BrokerUnreachable: cannot connect, or no answer within the timeout.
            ConnectionLost: the connection broke while the answer was awaited.
        """
        wait = self.timeout if timeout is None else timeout
        raw = self._encode(method, self.endpoint.prefix + target, body, headers)
        async with self._slots:
            for attempt in (1, 2):
                conn = await self._acquire(wait)
                reused = conn.used
                try:
                    conn.writer.write(raw)
                    response, keep = await asyncio.wait_for(self._read(conn.reader, method), wait)
                except TimeoutError:
                    conn.close()
                    raise BrokerUnreachable(
                        f"no answer from the broker at {self.endpoint.base} within {wait:g}s"
                    ) from None
                except (OSError, asyncio.IncompleteReadError, _Early) as exc:
                    conn.close()
                    if reused and attempt == 1 and isinstance(exc, _Early):
                        continue
                    raise ConnectionLost(f"connection to the broker at {self.endpoint.base} lost: {exc}") from None
                except BaseException:
                    conn.close()
                    raise
                conn.used = True
                if keep:
                    self._idle.append(conn)
                else:
                    conn.close()
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self, timeout: float) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.close()
        ep = self.endpoint
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(ep.host, ep.port, ssl=self._ssl, limit=MAX_HEADER_BYTES * 4), timeout
            )
        except TimeoutError:
            raise BrokerUnreachable(f"cannot reach the broker at {ep.base}: connect timed out") from None
        except OSError as exc:
            raise BrokerUnreachable(f"cannot reach the broker at {ep.base}: {exc.strerror or exc}") from None
        return _Conn(reader, writer)

    def _encode(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.endpoint.host}:{self.endpoint.port}"]
        merged = {**self._headers, **(headers or {})}
        if body is not None:
            merged.setdefault("Content-Type", "application/json")
        lines += [f"{k}: {v}" for k, v in merged.items()]
        payload = body or b""
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(payload)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload

    @staticmethod
    async def _read(reader: asyncio.StreamReader, method: str) -> tuple[Response, bool]:
        try:
            first = await reader.readline()
        except ConnectionResetError:
            first = b""
        if not first:
            raise _Early("closed by the broker")
        try:
            version, status_text = first.decode("latin-1").split(" ", 2)[:2]
            status = int(status_text)
        except ValueError:
            raise ConnectionLost(f"bad HTTP status line {first[:80]!r}") from None
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
            return Response(status, headers, body), False
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return Response(status, headers, body), keep

    async def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._idle.pop().close()


class _Early(Exception):
    """The connection closed before any byte of the answer (a stale keep-alive connection)."""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readline()
