"""The netns harness's pure parts: run ids in names, why it cannot run, and the chaos CLI's network scenarios."""

from __future__ import annotations

import pytest

from streams.surface.cli import main as cli
from streams.tools import chaos, netns


def test_a_name_carries_the_pid_of_the_run_that_made_it() -> None:
    assert netns._run_pid("msn1a8a-sink1") == 0x1A8A
    assert netns._run_pid("msn1a8a-br") == 0x1A8A  # the dash ends the run id: "br" is not more hex digits
    assert netns._run_pid("msn1a8abr") is None
    assert netns._run_pid("eth0") is None


def test_without_root_the_harness_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "root" in (netns.unavailable() or "")


def test_without_iproute2_the_harness_says_which_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else f"/usr/sbin/{tool}")
    assert "'tc'" in (netns.unavailable() or "")


def test_the_network_scenarios_are_named_alike_and_run_only_when_asked() -> None:
    assert cli.NETWORK_SCENARIOS == chaos.NETWORK_SCENARIOS
    assert not set(cli.NETWORK_SCENARIOS) & set(cli.CHAOS_SCENARIOS)  # the default set needs no root
    args = cli.build_parser().parse_args(
        ["chaos", "--scenario", "partition", "--partition", "5", "--redis-unreachable", "2", "--link-delay", "10"]
    )
    assert (args.scenario, args.partition, args.redis_unreachable, args.link_delay) == (["partition"], 5, 2, 10)
