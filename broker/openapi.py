"""The OpenAPI 3.1 document served at ``/openapi.json`` (filled in by the API docs work)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from broker.models import dumps

DOCUMENT: dict[str, object] = {"openapi": "3.1.0", "info": {"title": "presque", "version": "0.1.0"}, "paths": {}}


async def openapi_json(request: Request) -> Response:
    return Response(dumps(DOCUMENT), media_type="application/json")
