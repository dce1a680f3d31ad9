"""presque: a WebSocket-first job and message queue broker on Redis.

The public names are imported on first use, so that ``import broker`` stays light (a worker
does not load the server, a broker process does not load the client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.app import create_app
    from broker.client import Client
    from broker.config import Settings
    from broker.sync_client import SyncClient
    from broker.worker import Worker

__all__ = ["BrokerError", "Client", "Settings", "SyncClient", "Worker", "__version__", "create_app"]
__version__ = "0.1.0"

_LAZY = {
    "Client": "broker.client",
    "SyncClient": "broker.sync_client",
    "Worker": "broker.worker",
    "create_app": "broker.app",
    "Settings": "broker.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
