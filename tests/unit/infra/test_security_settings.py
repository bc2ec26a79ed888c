"""Kafka SASL/TLS settings reach every client, secrets never show; malformed addresses are one clear line."""

from __future__ import annotations

import ssl

import faust
import pytest

from infra.kafka import consumer_config, producer_config, security_config
from infra.redis_store import connect
from infra.settings import Settings, redact_url
from schemas.errors import ConfigError
from streams.runtime.app import faust_settings

SASL = {
    "MEMSTREAM_KAFKA_BOOTSTRAP": "b1.example:9093,b2.example:9093",
    "MEMSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "MEMSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "MEMSTREAM_KAFKA_SASL_USERNAME": "svc-memstream",
    "MEMSTREAM_KAFKA_SASL_PASSWORD": "hunter2-s3cret",
    "MEMSTREAM_REDIS_URL": "redis://default:redis-s3cret@cache.example:6379/0",
}


def test_sasl_ssl_reaches_producers_consumers_and_admins() -> None:
    settings = Settings.from_env(SASL)
    for config in (producer_config(settings), consumer_config(settings, group_id="g"), security_config(settings)):
        assert config["bootstrap_servers"] == "b1.example:9093,b2.example:9093"
        assert config["security_protocol"] == "SASL_SSL"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("svc-memstream", "hunter2-s3cret")
        assert isinstance(config["ssl_context"], ssl.SSLContext) and config["ssl_context"].check_hostname


def test_faust_gets_the_same_credentials() -> None:
    credentials = faust_settings(Settings.from_env(SASL))["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("svc-memstream", "hunter2-s3cret")
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.ssl_context is not None


def test_plaintext_is_the_default_and_adds_nothing() -> None:
    settings = Settings.from_env({})
    assert security_config(settings) == {"bootstrap_servers": "", "security_protocol": "PLAINTEXT"}
    assert "broker_credentials" not in faust_settings(settings)


def test_tls_without_sasl_and_a_missing_ca_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        Settings.from_env({"MEMSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "MEMSTREAM_KAFKA_SSL_CAFILE": "/nope.pem"})
    settings = Settings.from_env({"MEMSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL"})
    assert "sasl_mechanism" not in security_config(settings)
    assert isinstance(faust_settings(settings)["broker_credentials"], faust.SSLCredentials)


def test_secrets_never_show_in_repr_or_public() -> None:
    settings = Settings.from_env(SASL)
    for text in (repr(settings), str(settings), str(settings.public())):
        assert "hunter2-s3cret" not in text and "redis-s3cret" not in text
    public = settings.public()
    assert public["kafka_sasl_password"] == "***"
    assert public["redis_url"] == "redis://default:***@cache.example:6379/0"
    # child processes still get the real values
    assert settings.to_env()["MEMSTREAM_KAFKA_SASL_PASSWORD"] == "hunter2-s3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://u@h:1", "redis://u@h:1"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("rediss://u:p:q@h", "rediss://u:***@h"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEMSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "must be one of PLAINTEXT, SSL"),
        ({"MEMSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "MEMSTREAM_KAFKA_SASL_MECHANISM must be one of"),
        (
            {"MEMSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MEMSTREAM_KAFKA_SASL_MECHANISM": "PLAIN"},
            "are both needed",
        ),
        ({"MEMSTREAM_KAFKA_SASL_USERNAME": "u"}, "SASL_\\* are set but"),
        ({"MEMSTREAM_KAFKA_BOOTSTRAP": "kafka://b:9092"}, "is not host:port"),
        ({"MEMSTREAM_KAFKA_BOOTSTRAP": "b:notaport"}, "is not host:port"),
        ({"MEMSTREAM_KAFKA_BOOTSTRAP": "b"}, "is not host:port"),
        ({"MEMSTREAM_REDIS_URL": "localhost:6379"}, "is not a Redis URL"),
        ({"MEMSTREAM_REDIS_URL": "http://u:topsecret@h"}, "is not a Redis URL"),
    ],
)
def test_bad_security_or_addresses_fail_with_one_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        Settings.from_env(env)
    assert "topsecret" not in str(refused.value)


def test_a_redis_url_the_driver_cannot_parse_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="MEMSTREAM_REDIS_URL is not a Redis URL"):
        connect("redis://localhost:notaport/0")


def test_bootstrap_lists_and_ipv6_are_accepted() -> None:
    Settings.from_env({"MEMSTREAM_KAFKA_BOOTSTRAP": "a:9092, b:9093,[::1]:9094"})
