"""Parsing and validation of request parameters (query strings and JSON fields), no I/O.

Every function raises ``BadRequest`` naming the parameter and what was wrong with it, so that a
client always learns which of its inputs was refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from broker.config import QueueSettings
from broker.errors import BadRequest
from broker.models import PushOptions, parse_priority

MAX_DELAY = 10 * 365 * 86400.0  # ten years: beyond this, it is a mistake (ms instead of s?)


def number(name: str, value: Any, *, minimum: float = 0.0, maximum: float | None = None) -> float:
    """A finite number within bounds (strings are parsed, bools refused)."""
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(result) or result < minimum or (maximum is not None and result > maximum):
        bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"at least {minimum:g}"
        raise BadRequest(f"{name} must be {bound}, got {value!r}")
    return result


def integer(name: str, value: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number within bounds."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None
    if result < minimum or (maximum is not None and result > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise BadRequest(f"{name} must be {bound}, got {value!r}")
    return result


def push_options(params: Mapping[str, Any], queues: QueueSettings, *, allow_uniq: bool = True) -> PushOptions:
    """PushOptions from ``delayed`` (epoch), ``delay``, ``priority``, ``uniq``, ``ttl``, ``max_attempts``.

    ``delayed`` and ``delay`` are exclusive. A ``delayed`` time in the past means ready now.
    """
    delay = 0.0
    if params.get("delayed") is not None and params.get("delay") is not None:
        raise BadRequest("give either delayed (a Unix time) or delay (seconds), not both")
    if params.get("delayed") is not None:
        run_at = number("delayed", params["delayed"])
        delay = max(0.0, run_at - time.time())
        if delay > MAX_DELAY:
            raise BadRequest(f"delayed must be within ten years from now, got {params['delayed']!r}")
    elif params.get("delay") is not None:
        delay = number("delay", params["delay"], maximum=MAX_DELAY)
    uniq = params.get("uniq")
    if uniq is not None:
        if not allow_uniq:
            raise BadRequest("uniq is not supported on batch pushes: push such jobs one by one")
        if not isinstance(uniq, str) or not 1 <= len(uniq) <= 256:
            raise BadRequest(f"uniq must be a string of 1-256 characters, got {uniq!r}")
    return PushOptions(
        priority=parse_priority(params["priority"]) if params.get("priority") is not None else queues.default_priority,
        delay=delay,
        ttl=number("ttl", params["ttl"], maximum=MAX_DELAY) if params.get("ttl") is not None else 0.0,
        uniq=uniq or "",
        max_attempts=(
            integer("max_attempts", params["max_attempts"], minimum=1, maximum=1000)
            if params.get("max_attempts") is not None
            else queues.max_attempts
        ),
    )


def lease_seconds(value: Any, queues: QueueSettings, name: str = "lease") -> float:
    """A lease duration, 1 second at least and ``queues.max_lease`` at most."""
    return number(name, value, minimum=1.0, maximum=queues.max_lease)


def token(body: Mapping[str, Any]) -> str:
    """The lease token of an ack/nack/touch body."""
    value = body.get("token")
    if not isinstance(value, str) or not value:
        raise BadRequest("token is required: the lease token the job was delivered with")
    return value


def json_object(value: Any, what: str = "body") -> dict[str, Any]:
    """``value`` if it is a JSON object, else BadRequest."""
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value
