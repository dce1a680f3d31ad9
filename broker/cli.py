"""The ``presque`` command line: a thin layer over the app (``serve``) and the client."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from broker.config import Settings, load_settings
from broker.errors import BrokerError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from broker.app import create_app

    settings: Settings = load_settings(args.config)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        loop="auto",
        http="auto",
        ws="websockets-sansio",
        log_level=settings.server.log_level,
        access_log=False,
        ws_max_size=settings.limits.max_frame,
        ws_ping_interval=settings.websocket.ping_interval,
        ws_ping_timeout=settings.websocket.ping_timeout,
        timeout_graceful_shutdown=10,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="presque", description="A WebSocket-first job queue broker on Redis.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the broker (HTTP + WebSocket)")
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 5000)")
    serve.add_argument("--config", help="config file (default: ./config.yaml when present)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``presque`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BrokerError as exc:
        print(f"presque: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
