import pytest

from infra.settings import Settings
from streams.surface.cli.main import build_parser, settings_from


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for command in (
        "up",
        "down",
        "status",
        "worker",
        "publish",
        "search",
        "get",
        "verify",
        "stats",
        "demo",
        "bench",
        "mcp",
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: memstream" in capsys.readouterr().out


def test_flags_override_the_environment() -> None:
    args = build_parser().parse_args(["--embedder", "hash", "worker", "--engine", "faust"])
    settings = settings_from(args, {"MEMSTREAM_EMBEDDER": "minilm", "MEMSTREAM_PARTITIONS": "3"})
    assert (settings.embedder, settings.engine, settings.partitions) == ("hash", "faust", 3)
    assert settings_from(build_parser().parse_args(["stats"]), {}) == Settings.from_env({})


def test_search_needs_a_user() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "what does alice eat"])


def test_search_takes_a_user_or_the_whole_tenant_and_get_takes_a_tenant() -> None:
    parser = build_parser()
    args = parser.parse_args(["search", "q", "--whole-tenant", "--tenant", "t2"])
    assert (args.user, args.whole_tenant, args.tenant) == (None, True, "t2")
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "q", "--user", "alice", "--whole-tenant"])
    assert parser.parse_args(["get", "m1"]).tenant == "default"
    assert parser.parse_args(["get", "m1", "--tenant", "t2"]).tenant == "t2"
