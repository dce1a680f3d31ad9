from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from broker.config import (
    AuthToken,
    QueueLimit,
    Roles,
    Settings,
    load_settings,
    parse_settings,
)
from broker.errors import BrokerError, ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = parse_settings({})
    assert s == Settings()
    assert (s.server.host, s.server.port, s.server.workers) == ("127.0.0.1", 5000, 1)
    assert s.server.allowed_origins == ()
    assert s.redis.url is None and s.redis.embedded
    assert s.redis.data_dir == "./data" and s.redis.appendfsync == "everysec"
    assert s.queues.default_lease == 30.0 and s.queues.max_attempts == 5 and s.queues.default_priority == 5
    assert s.limits.max_body == 1_048_576 and s.limits.max_batch == 1000 and s.limits.max_wait == 30.0
    assert s.websocket.send_buffer == 262_144
    assert not s.auth.enabled


def test_shipped_config_yaml_is_the_defaults() -> None:
    # Keeps the documented file and the code in step: the shipped file changes nothing.
    assert load_settings(REPO / "config.yaml", env={}) == Settings()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.port = 1  # type: ignore[misc]


def test_config_error_is_a_broker_error() -> None:
    assert issubclass(ConfigError, BrokerError)


def test_explicit_path(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 6001\nlimits:\n  max_body: 10\n")
    s = load_settings(str(path), env={})
    assert s.server.port == 6001 and s.limits.max_body == 10


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_config_yaml_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "server:\n  port: 6002\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(env={}).server.port == 6002


def test_no_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(env={}) == Settings()


def test_empty_file_and_empty_sections(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), env={}) == Settings()
    assert load_settings(write(tmp_path, "auth:\nqueues:\n"), env={}) == Settings()


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(write(tmp_path, "server: [\n"), env={})


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), env={})


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^server: expected a mapping"):
        parse_settings({"server": 5})


def test_unknown_section_and_key() -> None:
    with pytest.raises(ConfigError, match=r"^srever: unknown section \(did you mean 'server'\?\)"):
        parse_settings({"srever": {}})
    with pytest.raises(ConfigError, match=r"^limits\.max_bdy: unknown key \(did you mean 'max_body'\?\)"):
        parse_settings({"limits": {"max_bdy": 1}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"limits": {"max_body": "abc"}}, "limits.max_body: expected an integer, got 'abc'"),
        ({"limits": {"max_body": True}}, "limits.max_body: expected an integer, got True"),
        ({"limits": {"max_body": 0}}, "limits.max_body: must be at least 1, got 0"),
        ({"queues": {"default_lease": "soon"}}, "queues.default_lease: expected a number, got 'soon'"),
        ({"queues": {"default_lease": 0}}, "queues.default_lease: must be greater than 0, got 0.0"),
        ({"queues": {"default_priority": 10}}, "queues.default_priority: must be at most 9, got 10"),
        ({"server": {"port": 70000}}, "server.port: must be at most 65535, got 70000"),
        ({"server": {"log_json": "maybe"}}, "server.log_json: expected true or false, got 'maybe'"),
        ({"server": {"log_level": "loud"}}, "server.log_level: expected one of debug, info, warning"),
        ({"server": {"host": ["a"]}}, "server.host: expected a string, got a list"),
        ({"server": {"allowed_origins": 5}}, "server.allowed_origins: expected a list of strings, got 5"),
        ({"server": {"allowed_origins": [{"a": 1}]}}, "server.allowed_origins[0]: expected a string"),
        ({"redis": {"appendfsync": "sometimes"}}, "redis.appendfsync: expected one of everysec, always, no"),
        ({"queues": {"default_lease": 100, "max_lease": 10}}, "queues.default_lease: 100.0 is above"),
        ({"queues": {"backoff_max": float("inf")}}, "queues.backoff_max: expected a number, got inf"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert str(info.value).startswith(message)


def test_yaml_scalars_are_coerced() -> None:
    s = parse_settings(
        {
            "server": {"port": "6003", "instance_heartbeat": 2, "allowed_origins": "https://a, https://b"},
            "limits": {"max_body": 2048.0},
            "redis": {"password": 1234, "appendfsync": False},  # YAML reads a bare `no` as false
        }
    )
    assert s.server.port == 6003 and s.server.instance_heartbeat == 2.0
    assert s.server.allowed_origins == ("https://a", "https://b")
    assert s.limits.max_body == 2048
    assert s.redis.password == "1234" and s.redis.appendfsync == "no"


def test_appendfsync_no_from_yaml_file(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "redis:\n  appendfsync: no\n"), env={}).redis.appendfsync == "no"


def test_env_overrides_every_type(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 6004\n  log_json: true\n")
    env = {
        "PRESQUE_SERVER_PORT": "6005",
        "PRESQUE_SERVER_LOG_JSON": "false",
        "PRESQUE_SERVER_ALLOWED_ORIGINS": "https://a.example, https://b.example,",
        "PRESQUE_SERVER_LOG_LEVEL": "DEBUG",
        "PRESQUE_LIMITS_MAX_BODY": "2097152",
        "PRESQUE_QUEUES_BACKOFF_BASE": "0.5",
        "PRESQUE_REDIS_ALLOW_EVICTION": "yes",
        "PRESQUE_REDIS_DATA_DIR": "/var/lib/presque",
        "PRESQUE_WEBSOCKET_SEND_BUFFER": "1_000",
    }
    s = load_settings(path, env=env)
    assert s.server.port == 6005 and s.server.log_json is False
    assert s.server.allowed_origins == ("https://a.example", "https://b.example")
    assert s.server.log_level == "debug"
    assert s.limits.max_body == 2_097_152
    assert s.queues.backoff_base == 0.5
    assert s.redis.allow_eviction is True and s.redis.data_dir == "/var/lib/presque"
    assert s.websocket.send_buffer == 1000


def test_env_empty_value_clears_an_optional() -> None:
    s = parse_settings({"redis": {"url": "redis://h:1/0"}}, env={"PRESQUE_REDIS_URL": ""})
    assert s.redis.url is None and s.redis.embedded


def test_load_settings_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRESQUE_SERVER_PORT", "6006")
    assert load_settings().server.port == 6006


def test_env_bad_value_names_variable_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({}, env={"PRESQUE_LIMITS_MAX_BODY": "abc"})
    assert str(info.value) == "limits.max_body (PRESQUE_LIMITS_MAX_BODY): expected an integer, got 'abc'"


def test_env_unknown_key_in_known_section() -> None:
    with pytest.raises(ConfigError, match=r"^PRESQUE_LIMITS_MAX_BODDY: unknown setting limits\.max_boddy"):
        parse_settings({}, env={"PRESQUE_LIMITS_MAX_BODDY": "1"})


def test_env_variables_outside_sections_are_not_settings() -> None:
    env = {"PRESQUE_URL": "http://x", "PRESQUE_TEST_REDIS_BIN": "/bin/false", "PATH": "/bin"}
    assert parse_settings({}, env=env) == Settings()


def test_redis_host_port_form() -> None:
    r = parse_settings({"redis": {"host": "10.0.0.5", "port": 6380, "db": 2}}).redis
    assert r.url == "redis://10.0.0.5:6380/2"
    assert not r.embedded
    assert parse_settings({"redis": {"host": "cache"}}).redis.url == "redis://cache:6379/0"
    assert parse_settings({"redis": {"port": 7000}}).redis.url == "redis://127.0.0.1:7000/0"
    assert parse_settings({"redis": {"host": "::1", "port": 7000}}).redis.url == "redis://[::1]:7000/0"


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://u:p@h:6380/1", "unix:///tmp/redis.sock?db=3"])
def test_redis_url_schemes(url: str) -> None:
    r = parse_settings({"redis": {"url": url}}).redis
    assert r.url == url and not r.embedded


def test_redis_bad_url_and_conflicts() -> None:
    with pytest.raises(ConfigError, match=r"^redis\.url: scheme must be one of"):
        parse_settings({"redis": {"url": "http://h:1"}})
    with pytest.raises(ConfigError, match=r"^redis\.url: give either"):
        parse_settings({"redis": {"url": "redis://h:1", "host": "h"}})
    with pytest.raises(ConfigError, match=r"^redis\.host: not a host name"):
        parse_settings({"redis": {"host": "a/b"}})


def test_env_redis_url_replaces_a_host_port_file(tmp_path: Path) -> None:
    path = write(tmp_path, "redis:\n  host: old\n  port: 1\n")
    assert load_settings(path, env={"PRESQUE_REDIS_URL": "redis://new:2/0"}).redis.url == "redis://new:2/0"
    path = write(tmp_path, "redis:\n  url: redis://old:1/0\n")
    assert load_settings(path, env={"PRESQUE_REDIS_HOST": "new"}).redis.url == "redis://new:6379/0"


def test_display_url_masks_password() -> None:
    r = parse_settings({"redis": {"url": "redis://user:s3cret@h:1/0"}}).redis
    assert r.display_url == "redis://user:***@h:1/0"
    assert "s3cret" not in repr(parse_settings({"redis": {"password": "s3cret"}}))
    assert parse_settings({"redis": {"url": "redis://h:1/0"}}).redis.display_url == "redis://h:1/0"
    assert Settings().redis.display_url is None


def test_redis_cluster_and_sentinel() -> None:
    r = parse_settings({"redis": {"cluster": True, "cluster_nodes": ["a:7000", "b:7001"]}}).redis
    assert r.cluster and r.cluster_nodes == ("a:7000", "b:7001") and not r.embedded
    r = parse_settings({"redis": {"cluster": ["a:7000"]}}).redis
    assert r.cluster and r.cluster_nodes == ("a:7000",)
    r = parse_settings({}, env={"PRESQUE_REDIS_CLUSTER": "1", "PRESQUE_REDIS_CLUSTER_NODES": "a:1,b:2"}).redis
    assert r.cluster and r.cluster_nodes == ("a:1", "b:2")
    r = parse_settings({"redis": {"sentinel_master": "m", "sentinels": ["s1:26379", "s2:26379"]}}).redis
    assert r.sentinel_master == "m" and not r.embedded
    with pytest.raises(ConfigError, match=r"^redis\.cluster: needs"):
        parse_settings({"redis": {"cluster": True}})
    with pytest.raises(ConfigError, match=r"^redis\.cluster_nodes\[1\]: expected host:port, got 'b'"):
        parse_settings({"redis": {"cluster": True, "cluster_nodes": ["a:1", "b"]}})
    with pytest.raises(ConfigError, match=r"^redis\.sentinel_master: needs"):
        parse_settings({"redis": {"sentinel_master": "m"}})
    with pytest.raises(ConfigError, match=r"^redis\.sentinel_master: needs"):
        parse_settings({"redis": {"sentinels": ["s:1"]}})
    with pytest.raises(ConfigError, match=r"^redis\.cluster: cannot be combined"):
        parse_settings({"redis": {"cluster": True, "url": "redis://h:1", "sentinel_master": "m", "sentinels": ["s:1"]}})


def test_queue_limits_first_match_wins() -> None:
    q = parse_settings(
        {"queues": {"limits": {"images.*": {"max_inflight": 8, "rate": 50}, "*": {"max_inflight": 100}, "x": None}}}
    ).queues
    assert q.limit_for("images.thumbs") == QueueLimit(max_inflight=8, rate=50.0)
    assert q.limit_for("mail") == QueueLimit(max_inflight=100, rate=None)
    assert list(q.limits) == ["images.*", "*", "x"]
    assert parse_settings({}).queues.limit_for("any") is None
    with pytest.raises(TypeError):
        q.limits["new"] = QueueLimit()  # type: ignore[index]


def test_queue_limits_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"^queues\.limits\.a\*\.max_inflight: must be at least 1"):
        parse_settings({"queues": {"limits": {"a*": {"max_inflight": 0}}}})
    with pytest.raises(ConfigError, match=r"^queues\.limits\.a\*\.burst: unknown key"):
        parse_settings({"queues": {"limits": {"a*": {"burst": 3}}}})
    with pytest.raises(ConfigError, match=r"^queues\.limits: expected a mapping"):
        parse_settings({"queues": {"limits": ["a"]}})


def test_queue_limits_from_env() -> None:
    q = parse_settings({}, env={"PRESQUE_QUEUES_LIMITS": '{"a*": {"rate": 2.5}}'}).queues
    assert q.limit_for("ab") == QueueLimit(rate=2.5)
    with pytest.raises(ConfigError, match=r"^queues\.limits \(PRESQUE_QUEUES_LIMITS\): invalid YAML"):
        parse_settings({}, env={"PRESQUE_QUEUES_LIMITS": "{a: ["})


def test_auth_tokens() -> None:
    a = parse_settings(
        {
            "auth": {
                "tokens": [
                    {"token": "env:PROD_TOKEN", "name": "producer", "roles": {"produce": ["jobs.*"]}},
                    {"token": "t2", "roles": {"consume": "a,b", "admin": ["*"]}},
                ]
            }
        },
        env={"PROD_TOKEN": "p-secret"},
    ).auth
    assert a.enabled
    assert a.tokens[0] == AuthToken(token="p-secret", name="producer", roles=Roles(produce=("jobs.*",)))
    assert a.tokens[1].name == "token1" and a.tokens[1].roles.consume == ("a", "b")
    assert a.tokens[0].allows("produce", "jobs.mail") and not a.tokens[0].allows("consume", "jobs.mail")
    assert a.tokens[1].allows("admin", "anything")
    assert "p-secret" not in repr(a)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([{"token": "env:MISSING"}], "auth.tokens[0].token: environment variable MISSING is not set"),
        ([{"name": "x"}], "auth.tokens[0].token: must be a non-empty string"),
        ([{"token": "a"}, {"token": "a"}], "auth.tokens[1].token: the same token is configured twice"),
        ([{"token": "a", "secret": 1}], "auth.tokens[0].secret: unknown key"),
        ([{"token": "a", "roles": {"write": ["*"]}}], "auth.tokens[0].roles.write: unknown key"),
        (["a"], "auth.tokens[0]: expected a mapping"),
        ({"a": 1}, "auth.tokens: expected a list"),
    ],
)
def test_auth_token_errors(tokens: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"auth": {"tokens": tokens}}, env={})
    assert str(info.value).startswith(message)


def test_auth_tokens_from_env() -> None:
    env = {"PRESQUE_AUTH_TOKENS": '[{"token": "env:T", "name": "n"}]', "T": "x"}
    assert parse_settings({}, env=env).auth.tokens == (AuthToken(token="x", name="n"),)


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path, env={})


def test_null_structured_fields_are_empty() -> None:
    s = parse_settings({"queues": {"limits": None}, "auth": {"tokens": None}})
    assert s == Settings()
