"""The exception tree of presque.

Every error the broker can report derives from :class:`BrokerError` and carries the wire data it
maps to: an HTTP status and a short snake_case ``code`` used in WebSocket ``error`` frames. The
translation to HTTP responses and frames happens only at the edges (``http.py``,
``delivery.py``); the rest of the code raises these.

    BrokerError
    ├── ConfigError            bad config.yaml / environment (start-up only)
    ├── RedisSetupError        Redis unusable: too old, evicting, ...
    ├── BadRequest (400)       bad_field
    │   ├── BadJSON            bad_json
    │   └── BadQueueName       bad_queue
    ├── Unauthorized (401)     unauthorized
    ├── Forbidden (403)        forbidden
    ├── NotFound (404)         not_found
    │   ├── NoJob              no_job
    │   ├── QueueClosed        queue_closed
    │   └── UnknownJob         unknown_job
    ├── Conflict (409)
    │   ├── StaleToken         stale_token
    │   └── JobExists          job_exists (carries the existing id)
    ├── TooLarge (413)         too_large
    └── Unavailable (503)      unavailable (Redis down; carries Retry-After)
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every presque error.

    Attributes:
        status: the HTTP status this error answers with.
        code: the WebSocket error code (snake_case).
    """

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def payload(self) -> dict[str, object]:
        """The JSON body sent to the client: at least ``{"error": message}``."""
        return {"error": self.message}


class ConfigError(BrokerError):
    """config.yaml or an environment override is invalid (raised at start-up)."""


class RedisSetupError(BrokerError):
    """Redis cannot be used safely: too old, or configured to evict keys."""


class BadRequest(BrokerError):
    status = 400
    code = "bad_field"


class BadJSON(BadRequest):
    code = "bad_json"


class BadQueueName(BadRequest):
    code = "bad_queue"


class Unauthorized(BrokerError):
    status = 401
    code = "unauthorized"


class Forbidden(BrokerError):
    status = 403
    code = "forbidden"


class NotFound(BrokerError):
    status = 404
    code = "not_found"


class NoJob(NotFound):
    code = "no_job"

    def __init__(self, message: str = "no job") -> None:
        super().__init__(message)


class QueueClosed(NotFound):
    code = "queue_closed"

    def __init__(self, message: str = "queue is closed") -> None:
        super().__init__(message)


class UnknownJob(NotFound):
    code = "unknown_job"

    def __init__(self, message: str = "unknown job") -> None:
        super().__init__(message)


class Conflict(BrokerError):
    status = 409
    code = "conflict"


class StaleToken(Conflict):
    code = "stale_token"

    def __init__(self, message: str = "stale lease token: the lease expired or the job was re-leased") -> None:
        super().__init__(message)


class JobExists(Conflict):
    """A push with a ``uniq`` key whose job is still pending, delayed or leased."""

    code = "job_exists"

    def __init__(self, existing_id: str) -> None:
        super().__init__("job already exists")
        self.existing_id = existing_id

    def payload(self) -> dict[str, object]:
        return {"error": self.message, "id": self.existing_id}


class TooLarge(BrokerError):
    status = 413
    code = "too_large"


class Unavailable(BrokerError):
    """Redis does not answer; the client should retry after ``retry_after`` seconds."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str = "redis unavailable", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
