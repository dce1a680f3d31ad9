"""Settings: ``config.yaml`` plus ``PRESQUE_<SECTION>_<KEY>`` environment overrides.

:func:`load_settings` is the only place that reads YAML or the environment for the broker; every
other module receives a :class:`Settings` (frozen dataclasses) from its caller.

Resolution order, later wins: built-in defaults, the YAML file, environment variables. Values from
the environment are strings and are coerced to the field's type (lists are comma-separated; the two
structured fields, ``queues.limits`` and ``auth.tokens``, take a YAML/JSON document). Unknown keys
and bad values raise :class:`~broker.errors.ConfigError` with a message that names the key, e.g.
``limits.max_body: expected an integer, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from broker.coerce import bounded, build, coerce, field_names, show, suggest
from broker.errors import ConfigError

__all__ = [
    "AuthSettings",
    "AuthToken",
    "ConfigError",
    "LimitSettings",
    "QueueLimit",
    "QueueSettings",
    "RedisSettings",
    "Roles",
    "ServerSettings",
    "Settings",
    "WebSocketSettings",
    "load_settings",
    "parse_settings",
]

ENV_PREFIX = "PRESQUE_"
DEFAULT_CONFIG_FILE = "config.yaml"
REDIS_URL_SCHEMES = ("redis", "rediss", "unix")

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
AppendFsync = Literal["everysec", "always", "no"]
Role = Literal["produce", "consume", "admin"]


def _empty() -> tuple[str, ...]:
    return ()


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The HTTP/WebSocket listener. ``allowed_origins`` empty means same-origin only."""

    host: str = "127.0.0.1"
    port: int = bounded(5000, ge=0, le=65535)
    workers: int = bounded(1, ge=1)
    allowed_origins: tuple[str, ...] = field(default_factory=_empty)
    cors_origins: tuple[str, ...] = field(default_factory=_empty)
    log_json: bool = False
    log_level: LogLevel = "info"
    instance_heartbeat: float = bounded(5.0, gt=0)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the data lives.

    ``url`` is the address to connect to: presque's ``host``/``port`` form is turned into
    ``redis://host:port/db`` at load. With no url, host, cluster or sentinel the broker runs an
    embedded ``redis-server`` under ``data_dir`` (:attr:`embedded`).
    """

    url: str | None = None
    host: str | None = None
    port: int | None = bounded(None, ge=1, le=65535)
    db: int = bounded(0, ge=0)
    password: str | None = field(default=None, repr=False)
    cluster: bool = False
    cluster_nodes: tuple[str, ...] = field(default_factory=_empty)
    sentinel_master: str | None = None
    sentinels: tuple[str, ...] = field(default_factory=_empty)
    data_dir: str = "./data"
    appendfsync: AppendFsync = "everysec"
    socket_timeout: float = bounded(5.0, gt=0)
    allow_eviction: bool = False

    @property
    def display_url(self) -> str | None:
        """``url`` with any password masked, for logs."""
        if self.url is None:
            return None
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()

    @property
    def embedded(self) -> bool:
        """True when the broker must start its own ``redis-server``."""
        return self.url is None and not self.cluster and self.sentinel_master is None


@dataclass(frozen=True, slots=True)
class QueueLimit:
    """Per-queue caps enforced across all broker processes (``None`` = no cap)."""

    max_inflight: int | None = bounded(None, ge=1)
    rate: float | None = bounded(None, gt=0)


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """Defaults of the queue model; ``limits`` maps queue-name globs to :class:`QueueLimit`."""

    default_lease: float = bounded(30.0, gt=0)
    max_lease: float = bounded(3600.0, gt=0)
    max_attempts: int = bounded(5, ge=1)
    backoff_base: float = bounded(1.0, ge=0)
    backoff_max: float = bounded(300.0, ge=0)
    default_priority: int = bounded(5, ge=0, le=9)
    reap_interval: float = bounded(1.0, gt=0)
    # How long an acked job's id is remembered, so that a late ack/nack/touch for it answers
    # 409 (stale token) rather than 404 (unknown job). Costs ~80 bytes per ack in the window.
    tombstone_ttl: float = bounded(60.0, ge=0)
    limits: Mapping[str, QueueLimit] = field(
        default_factory=lambda: types.MappingProxyType({}), metadata={"parse": lambda v, k, e: _parse_limits(v, k)}
    )

    def limit_for(self, queue: str) -> QueueLimit | None:
        """The limit of the first glob in ``limits`` that matches ``queue``, or None."""
        for pattern, limit in self.limits.items():
            if fnmatch.fnmatchcase(queue, pattern):
                return limit
        return None


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Input limits; sizes are in bytes, durations in seconds."""

    max_body: int = bounded(1_048_576, ge=1)
    max_batch: int = bounded(1000, ge=1)
    max_frame: int = bounded(1_048_576, ge=1)
    max_wait: float = bounded(30.0, gt=0)
    max_subscriptions: int = bounded(100, ge=1)
    max_channels: int = bounded(100, ge=1)
    max_watches: int = bounded(100, ge=1)
    max_errors: int = bounded(100, ge=0)
    max_connections: int = bounded(10_000, ge=1)
    max_prefetch: int = bounded(1000, ge=1)
    max_desc: int = bounded(100, ge=1)


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """Keepalive and flow control of WebSocket connections.

    ``send_buffer`` is the number of bytes of queued outbound frames beyond which a subscriber is
    paused until its socket drains.
    """

    ping_interval: float = bounded(20.0, gt=0)
    ping_timeout: float = bounded(20.0, gt=0)
    idle_timeout: float = bounded(300.0, gt=0)
    send_buffer: int = bounded(262_144, ge=1)
    stats_interval: float = bounded(1.0, gt=0)


@dataclass(frozen=True, slots=True)
class Roles:
    """Queue-name globs a token may act on, per role."""

    produce: tuple[str, ...] = field(default_factory=_empty)
    consume: tuple[str, ...] = field(default_factory=_empty)
    admin: tuple[str, ...] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class AuthToken:
    """One bearer token. ``token`` is kept out of ``repr`` so it never reaches a log."""

    token: str = field(repr=False)
    name: str
    roles: Roles = field(default_factory=Roles)

    def allows(self, role: Role, queue: str) -> bool:
        """Whether this token holds ``role`` on ``queue``."""
        globs: tuple[str, ...] = getattr(self.roles, role)
        return any(fnmatch.fnmatchcase(queue, g) for g in globs)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Access control: off when no token is configured."""

    tokens: tuple[AuthToken, ...] = field(
        default_factory=tuple, metadata={"parse": lambda v, k, e: _parse_tokens(v, k, e)}
    )

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the broker is configured with, one attribute per ``config.yaml`` section."""

    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    queues: QueueSettings = field(default_factory=QueueSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "queues": QueueSettings,
    "limits": LimitSettings,
    "websocket": WebSocketSettings,
    "auth": AuthSettings,
}


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from a YAML file and the environment.

    Args:
        path: the config file (``presque serve --config``). When None, ``./config.yaml`` is read if
            it exists, else the built-in defaults are used.
        env: the environment to take ``PRESQUE_<SECTION>_<KEY>`` overrides and ``env:NAME`` token
            references from; ``os.environ`` when None.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: the file is missing (when named) or not valid YAML, or a key is unknown, or a
            value has the wrong type or is out of range. The message names the key.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        data = _read_yaml(default) if default.is_file() else {}
    else:
        data = _read_yaml(Path(path))
    return parse_settings(data, environ)


def parse_settings(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from an already-parsed config mapping (what ``config.yaml`` holds).

    Unlike :func:`load_settings`, this never looks at ``os.environ``: ``env`` defaults to empty.
    Handy for tests and embedding: ``parse_settings({"redis": {"url": url}})``.

    Raises:
        ConfigError: as :func:`load_settings`.
    """
    env = {} if env is None else env
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    for name in data:
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section{suggest(str(name), _SECTIONS)}")
    overrides = _env_overrides(env)
    data = _redis_forms(data, overrides.get("redis", {}))
    sections = {name: build(cls, name, data.get(name), env, overrides.get(name, {})) for name, cls in _SECTIONS.items()}
    sections["redis"] = _finish_redis(sections["redis"])
    queues: QueueSettings = sections["queues"]
    if queues.default_lease > queues.max_lease:
        raise ConfigError(f"queues.default_lease: {queues.default_lease} is above queues.max_lease {queues.max_lease}")
    return Settings(**sections)


def _redis_forms(data: Mapping[str, Any], env_redis: Mapping[str, Any]) -> Mapping[str, Any]:
    """Normalise the redis section's alternative forms before it is built.

    ``url`` and ``host``/``port`` exclude each other within one source; across sources the
    environment wins, so ``PRESQUE_REDIS_URL`` works on top of a ``redis: {host, port}`` file.
    ``cluster: [host:port, ...]`` (issue 8's short form) is ``cluster: true`` plus the nodes.
    """
    raw = data.get("redis")
    if not isinstance(raw, Mapping):
        return data
    if isinstance(raw.get("cluster"), list):
        raw = {**raw, "cluster": True, "cluster_nodes": raw["cluster"]}
    if "url" in env_redis:
        raw = {k: v for k, v in raw.items() if k not in ("host", "port")}
    elif "host" in env_redis or "port" in env_redis:
        raw = {k: v for k, v in raw.items() if k != "url"}
    return {**data, "redis": raw}


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return {} if data is None else data


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, tuple[str, str]]]:
    """``{section: {key: (text, variable name)}}`` from ``PRESQUE_<SECTION>_<KEY>`` variables.

    Variables that name no section (``PRESQUE_URL`` for the client, ``PRESQUE_TEST_*``) are not
    settings and are left alone; an unknown key inside a known section is an error.
    """
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :]
        for section, cls in _SECTIONS.items():
            prefix = section.upper() + "_"
            if rest.startswith(prefix):
                key = rest[len(prefix) :].lower()
                if key not in field_names(cls):
                    raise ConfigError(f"{var}: unknown setting {section}.{key}{suggest(key, field_names(cls))}")
                found.setdefault(section, {})[key] = (text, var)
                break
    return found


def _parse_limits(value: Any, key: str) -> Mapping[str, QueueLimit]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of queue-name glob to limits, got {show(value)}")
    limits = {str(glob): build(QueueLimit, f"{key}.{glob}", entry, {}) for glob, entry in value.items()}
    return types.MappingProxyType(limits)


def _parse_tokens(value: Any, key: str, env: Mapping[str, str]) -> tuple[AuthToken, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of tokens, got {show(value)}")
    tokens: list[AuthToken] = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping with token, name and roles, got {show(entry)}")
        for k in entry:
            if k not in ("token", "name", "roles"):
                raise ConfigError(f"{where}.{k}: unknown key{suggest(str(k), ('token', 'name', 'roles'))}")
        secret = coerce(entry.get("token"), str, f"{where}.token", from_env=False) if "token" in entry else ""
        if secret.startswith("env:"):
            var = secret[len("env:") :]
            if var not in env:
                raise ConfigError(f"{where}.token: environment variable {var} is not set")
            secret = env[var]
        if not secret:
            raise ConfigError(f"{where}.token: must be a non-empty string")
        if any(t.token == secret for t in tokens):
            raise ConfigError(f"{where}.token: the same token is configured twice")
        name = coerce(entry.get("name", f"token{i}"), str, f"{where}.name", from_env=False)
        roles = build(Roles, f"{where}.roles", entry.get("roles"), env)
        tokens.append(AuthToken(token=secret, name=name, roles=roles))
    return tuple(tokens)


def _finish_redis(r: RedisSettings) -> RedisSettings:
    """Check the combinations and turn presque's ``host``/``port`` form into ``url``."""
    if r.url is not None:
        if r.host is not None or r.port is not None:
            raise ConfigError("redis.url: give either redis.url or redis.host/redis.port, not both")
        scheme = urlsplit(r.url).scheme
        if scheme not in REDIS_URL_SCHEMES:
            raise ConfigError(f"redis.url: scheme must be one of redis://, rediss://, unix://, got {r.url!r}")
    elif r.host is not None or r.port is not None:
        host = r.host or "127.0.0.1"
        if not host or any(c in host for c in "/@? "):
            raise ConfigError(f"redis.host: not a host name, got {r.host!r}")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 literal
        r = dataclasses.replace(r, url=f"redis://{host}:{r.port or 6379}/{r.db}")
    for name in ("cluster_nodes", "sentinels"):
        for i, node in enumerate(getattr(r, name)):
            host, sep, port = node.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"redis.{name}[{i}]: expected host:port, got {node!r}")
    if r.cluster and not r.cluster_nodes and r.url is None:
        raise ConfigError("redis.cluster: needs redis.cluster_nodes or redis.url for the startup nodes")
    if r.cluster and r.sentinel_master is not None:
        raise ConfigError("redis.cluster: cannot be combined with redis.sentinel_master")
    if (r.sentinel_master is None) != (not r.sentinels):
        raise ConfigError("redis.sentinel_master: needs redis.sentinels (host:port list), and the reverse")
    return r
