"""Where LanceDB lives: a local directory, or an object store (s3://) with storage options from settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.settings import REDACTED, Settings, is_object_store_uri, parse_storage_options
from schemas.errors import ConfigError

AWS = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
    "AWS_REGION": "eu-west-1",
    "AWS_ALLOW_HTTP": "true",
}


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("s3://bucket/path", True),
        ("s3+ddb://bucket/path?ddbTableName=t", True),
        ("gs://bucket/path", True),
        ("az://container/path", True),
        ("file:///tmp/lancedb", False),
        ("/tmp/lancedb", False),
        ("relative/lancedb", False),
        ("", False),
    ],
)
def test_object_store_uris_are_told_from_local_paths(uri: str, remote: bool) -> None:
    assert is_object_store_uri(uri) is remote


def test_an_s3_uri_takes_the_standard_aws_variables_as_storage_options() -> None:
    settings = Settings.from_env({"MEMSTREAM_LANCEDB_URI": "s3://memories/prod", **AWS})
    assert settings.lancedb_on_object_store and settings.lancedb_path == "s3://memories/prod"
    assert settings.lancedb_storage == {
        "aws_endpoint": "http://127.0.0.1:9000",
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "wJalrXUtnFEMI",
        "aws_region": "eu-west-1",
        "allow_http": "true",
    }


def test_aws_region_wins_over_the_default_region_and_settings_win_over_both() -> None:
    env = {"MEMSTREAM_LANCEDB_URI": "s3://b/p", "AWS_DEFAULT_REGION": "us-east-2", "AWS_REGION": "eu-west-1"}
    assert Settings.from_env(env).lancedb_storage == {"aws_region": "eu-west-1"}
    options = json.dumps({"aws_region": "ap-south-1", "allow_http": True, "timeout": 60})
    settings = Settings.from_env({**env, "MEMSTREAM_LANCEDB_STORAGE_OPTIONS": options})
    assert settings.lancedb_storage == {"aws_region": "ap-south-1", "allow_http": "true", "timeout": "60"}


def test_the_aws_variables_are_left_alone_for_a_local_directory() -> None:
    settings = Settings.from_env({"MEMSTREAM_HOME": "/tmp/h", **AWS})
    assert not settings.lancedb_on_object_store
    assert settings.lancedb_storage == {} and settings.lancedb_storage_options == ""


def test_child_processes_get_the_resolved_options_without_the_aws_variables() -> None:
    """`memstream worker` passes settings to its children as MEMSTREAM_*: the options travel in one variable."""
    parent = Settings.from_env({"MEMSTREAM_LANCEDB_URI": "s3://b/p", **AWS})
    child = Settings.from_env(parent.to_env())
    assert child.lancedb_storage == parent.lancedb_storage and child == parent


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEMSTREAM_LANCEDB_STORAGE_OPTIONS": '{"timeout": "60s"}'}, "object-store MEMSTREAM_LANCEDB_URI"),
        ({"MEMSTREAM_LANCEDB_URI": "s3://b/p", "MEMSTREAM_LANCEDB_STORAGE_OPTIONS": "timeout=60s"}, "is not JSON"),
        ({"MEMSTREAM_LANCEDB_URI": "s3://b/p", "MEMSTREAM_LANCEDB_STORAGE_OPTIONS": '["a"]'}, "JSON object"),
        ({"MEMSTREAM_LANCEDB_URI": "s3://b/p", "MEMSTREAM_LANCEDB_STORAGE_OPTIONS": '{"a": {}}'}, r"\['a'\]"),
        ({"MEMSTREAM_LANCEDB_URI": "s3:///path"}, "names no bucket"),
    ],
)
def test_bad_storage_settings_fail_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_credentials_in_storage_options_are_never_shown() -> None:
    settings = Settings.from_env({"MEMSTREAM_LANCEDB_URI": "s3://b/p", **AWS, "AWS_SESSION_TOKEN": "FwoGZX"})
    shown = json.loads(settings.public()["lancedb_storage_options"])
    assert shown["aws_secret_access_key"] == REDACTED and shown["aws_session_token"] == REDACTED
    assert shown["aws_access_key_id"] == "AKIDEXAMPLE" and shown["aws_endpoint"] == "http://127.0.0.1:9000"
    assert "wJalrXUtnFEMI" not in repr(settings) and "FwoGZX" not in repr(settings)


def test_options_set_in_code_for_a_local_directory_are_not_passed_to_it() -> None:
    settings = Settings(home=Path("/tmp/h"), lancedb_storage_options='{"aws_region": "x"}')
    assert settings.lancedb_storage == {}


def test_parse_storage_options_of_nothing_is_empty() -> None:
    assert parse_storage_options("") == parse_storage_options("  ") == {}
