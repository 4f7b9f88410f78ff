"""The tiers' Redis URLs as the operator renders them: the KV chunks' own server
(spec.kvRedis -> SPECDEC_KV_REDIS_URL) and the operator's default server for resources naming
none, whose password reaches their pods only by secretKeyRef."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

OWNER = {"metadata": {"name": "d", "namespace": "team-a", "uid": "u"}}
DEFAULT_URL = "redis://:s3cret@rel-specdec-redis.specdec.svc:6379/0"


def tier_env(raw: dict[str, Any], **kw: Any) -> tuple[dict[str, Any], str]:
    """(env by name: value or valueFrom, the whole pod as YAML) of the target tier."""
    from specdec_operator import resources
    from specdec_operator.spec import parse

    spec = parse({"model": {"name": "m"}, **raw})
    pod = resources.deployment(OWNER, spec, "target", 1, **kw)["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}
    return env, yaml.safe_dump(pod)


def ref(name: str, key: str = "url") -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}


def test_kv_redis_from_a_secret_next_to_the_state_one() -> None:
    env, _ = tier_env({"redis": {"urlSecretRef": {"name": "state"}}, "kvRedis": {"urlSecretRef": {"name": "kv"}}})
    assert env["SPECDEC_REDIS_URL"] == ref("state")
    assert env["SPECDEC_KV_REDIS_URL"] == ref("kv")
    env, _ = tier_env({"redis": {"url": "redis://r:6379/0"}, "kvRedis": {"url": "redis://k:6379/0"}})
    assert env["SPECDEC_KV_REDIS_URL"] == "redis://k:6379/0"


def test_without_kv_redis_the_chunks_share_the_state_server() -> None:
    env, _ = tier_env({"redis": {"urlSecretRef": {"name": "state", "key": "u"}}})
    assert env["SPECDEC_REDIS_URL"] == ref("state", "u")
    assert "SPECDEC_KV_REDIS_URL" not in env


@pytest.mark.parametrize(
    ("kv", "problem"),
    [
        ({"url": "redis://k:1/0", "urlSecretRef": {"name": "kv"}}, "spec.kvRedis: set url or urlSecretRef"),
        ({"urlSecretRef": {"key": "url"}}, "spec.kvRedis.urlSecretRef.name is required"),
    ],
)
def test_kv_redis_refuses_what_is_ambiguous_or_incomplete(kv: dict[str, Any], problem: str) -> None:
    from specdec_operator.spec import parse

    with pytest.raises(ValueError, match=problem):
        parse({"model": {"name": "m"}, "kvRedis": kv})


def test_a_resource_naming_no_redis_gets_the_default_by_secret_ref() -> None:
    from specdec_operator.resources import DefaultRedis

    default = DefaultRedis(DEFAULT_URL, ("rel-specdec-redis-auth", "url"), ("rel-specdec-kv-redis-auth", "url"))
    env, pod = tier_env({}, default_redis=default)
    assert env["SPECDEC_REDIS_URL"] == ref("rel-specdec-redis-auth")
    assert env["SPECDEC_KV_REDIS_URL"] == ref("rel-specdec-kv-redis-auth")
    assert "s3cret" not in pod
    # Its own Redis: its chunks stay there (the default KV server belongs with the default Redis).
    env, _ = tier_env({"redis": {"urlSecretRef": {"name": "mine"}}}, default_redis=default)
    assert env["SPECDEC_REDIS_URL"] == ref("mine") and "SPECDEC_KV_REDIS_URL" not in env
    # No Secret named: the URL without its password, as before.
    env, pod = tier_env({}, default_redis=DefaultRedis(DEFAULT_URL))
    assert env["SPECDEC_REDIS_URL"] == "redis://rel-specdec-redis.specdec.svc:6379/0" and "s3cret" not in pod


def test_operator_config_reads_the_default_url_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from specdec_operator.config import OperatorConfig

    monkeypatch.setenv("SPECDEC_OPERATOR_REDIS_URL_SECRET", "rel-specdec-redis-auth")
    monkeypatch.setenv("SPECDEC_OPERATOR_KV_REDIS_URL_SECRET", "rel-specdec-kv-redis-auth")
    monkeypatch.setenv("SPECDEC_OPERATOR_KV_REDIS_URL_SECRET_KEY", "kv-url")
    config = OperatorConfig.from_env()
    assert config.default_redis_secret == ("rel-specdec-redis-auth", "url")
    assert config.default_kv_redis_secret == ("rel-specdec-kv-redis-auth", "kv-url")
    monkeypatch.delenv("SPECDEC_OPERATOR_REDIS_URL_SECRET")
    assert OperatorConfig.from_env().default_redis_secret is None
