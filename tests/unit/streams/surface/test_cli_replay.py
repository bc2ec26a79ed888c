"""Parsing of the replay and tail ranges."""

from __future__ import annotations

import pytest

from infra.log_reader import StartAt
from schemas.errors import ConfigError
from streams.runtime.changes import parse_start
from streams.surface.cli.main import build_parser
from streams.surface.cli.replay import parse_offsets, replay_range


def test_offsets_per_partition() -> None:
    assert parse_offsets("0:120,1:88") == {0: 120, 1: 88}
    assert parse_offsets("3:0") == {3: 0}
    assert parse_offsets("2026-11-25T10:00:00") is None
    assert parse_offsets("beginning") is None
    assert parse_offsets("0:x") is None


def test_start_is_beginning_now_or_a_time() -> None:
    assert parse_start("beginning") == "beginning" and parse_start("now") == "now"
    assert parse_start("1795622922734") == 1795622922734
    assert parse_start("2026-11-25T10:00:00") == 1795600800000  # UTC when no zone is named
    assert parse_start("2026-11-25T11:00:00+01:00") == 1795600800000
    with pytest.raises(ConfigError, match="--from must be"):
        parse_start("yesterday")


def test_replay_range() -> None:
    assert replay_range("beginning", None) == (StartAt(), None, None)
    assert replay_range("0:5,1:7", "0:9") == (StartAt(offsets={0: 5, 1: 7}), None, {0: 9})
    assert replay_range("1000", "2000") == (StartAt(timestamp_ms=1000), 2000, None)
    with pytest.raises(ConfigError, match="replay nothing"):
        replay_range("now", None)
    with pytest.raises(ConfigError, match="--until"):
        replay_range("beginning", "beginning")


def test_commands_are_registered_with_help() -> None:
    parser = build_parser()
    args = parser.parse_args(["migrate", "--to", "hash", "--hash-dim", "64", "--json"])
    assert (args.command, args.to_embedder, args.hash_dim, args.json) == ("migrate", "hash", 64, True)
    args = parser.parse_args(["tail", "--from", "now", "--user", "u1", "--follow"])
    assert (args.start, args.user, args.follow, args.group) == ("now", "u1", True, None)
    args = parser.parse_args(["replay", "--source", "events", "--from", "0:3", "--until", "1700000000000"])
    assert (args.source, args.start, args.until) == ("events", "0:3", "1700000000000")
