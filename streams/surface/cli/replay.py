"""``memstream replay``, ``rebuild``, ``migrate`` and ``tail``: the log made useful (registered in
streams/surface/cli/main.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

import orjson

from infra.log_reader import StartAt
from infra.settings import Settings
from processors.model import ScopeQuery
from processors.pipeline import CHANGES_APPLIED, CHANGES_NONE
from processors.replay import SOURCES, ReplayFilter
from schemas.errors import ConfigError
from streams.runtime.changes import START_BEGINNING, START_NOW, ChangeFeed, parse_start
from streams.runtime.stores import resolve_services
from streams.surface.api import dumps

EXIT_OK = 0
EXIT_FAILED = 1

TIME_HELP = "milliseconds since the epoch or an ISO-8601 time (UTC unless it names a zone), by record timestamp"


def add_parsers(sub: Any) -> None:
    """Add the four commands to the ``memstream`` sub-command parser."""
    p = sub.add_parser(
        "replay",
        help="re-materialize a range of the log into the serving stores (idempotent; no consumer group)",
        description="Reads the embedded topic (vectors included: no re-embedding) or the raw events topic "
        "(re-embedded) from --from to --until (default: the whole log to its current end) and applies it with "
        "the version guard: nothing newer than a replayed event is changed. Changes it makes are announced on "
        "the change feed (--no-changes: not). The live worker's consumer group is not touched.",
    )
    p.add_argument("--source", choices=SOURCES, default="embedded", help="topic to replay (default embedded)")
    p.add_argument(
        "--from",
        dest="start",
        default=START_BEGINNING,
        help=f"beginning (default), offsets per partition as P:O,P:O, or a time: {TIME_HELP}",
    )
    p.add_argument("--until", help=f"stop before: offsets per partition P:O,P:O, or a time ({TIME_HELP})")
    p.add_argument("--tenant", help="only memories of this tenant")
    p.add_argument("--user", help="only memories of this user")
    p.add_argument("--no-changes", action="store_true", help="do not announce replayed changes on the change feed")
    p.add_argument("--window", type=int, default=5_000, help="records per write (default 5000)")
    _json(p)

    p = sub.add_parser(
        "rebuild",
        help="rebuild LanceDB and Redis from the log into a new generation, verify it, switch atomically",
        description="Fills a new LanceDB table and Redis namespace from the whole log while the serving ones "
        "keep serving, checks that both agree, then switches the active pointer (readers and the worker follow "
        "it within MEMSTREAM_POINTER_CHECK_MS) and catches up with what arrived meanwhile. Refuses a log whose "
        "beginning retention has deleted. Exit 1 when the new generation is not consistent (nothing switched).",
    )
    p.add_argument("--source", choices=SOURCES, help="embedded (default for the same model) or events")
    _rebuild_options(p)

    p = sub.add_parser(
        "migrate",
        help="re-embed everything with another embedder into a new generation, then switch (model migration)",
        description="A rebuild with another embedding model, from the raw events topic: the old generation keeps "
        "serving until the new one is complete and verified. Afterwards run the worker and readers with the new "
        "MEMSTREAM_EMBEDDER (and MEMSTREAM_HASH_DIM): a worker of the old model holds its window and says so, "
        "a reader of the old model fails with the model it needs.",
    )
    p.add_argument("--to", dest="to_embedder", required=True, choices=["minilm", "hash"], help="the new embedder")
    p.add_argument("--hash-dim", type=int, help="dimension of the hash embedder (default MEMSTREAM_HASH_DIM)")
    p.add_argument("--source", choices=SOURCES, default="events", help="events (default) or embedded")
    _rebuild_options(p)

    p = sub.add_parser(
        "tail",
        help="print the change feed as JSON lines (per memory in order)",
        description="One JSON object per line: the change event (schemas/json/change-event.schema.json) plus "
        "'feed' (the change record's partition, offset and timestamp). Without --follow it stops at the end.",
    )
    p.add_argument("--from", dest="start", default=START_BEGINNING, help=f"beginning (default), now, or {TIME_HELP}")
    p.add_argument("--user", help="only changes of this user")
    p.add_argument("--tenant", help="only changes of this tenant")
    p.add_argument("--follow", action="store_true", help="keep printing new changes until Ctrl-C")
    p.add_argument("--group", help="read as this consumer group and commit after each printed batch")


def _rebuild_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop-previous", action="store_true", help="drop the previous generation after the switch")
    p.add_argument(
        "--allow-incomplete-log",
        action="store_true",
        help="with --allow-loss: build even when retention removed the log's beginning",
    )
    p.add_argument(
        "--allow-loss",
        action="store_true",
        help="build from the log alone and switch even if the new generation holds fewer memories than the serving "
        "one (by default what the log lacks is copied from the serving generation, and a generation that would "
        "still hold less is refused)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=5_000,
        help="records per read of the log (default 5000; the new generation is written in larger appends)",
    )
    _json(p)


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


# --------------------------------------------------------------------------------------------- parsing


def parse_offsets(text: str) -> dict[int, int] | None:
    """``0:120,1:88`` -> {0: 120, 1: 88}; None when ``text`` is not of that form."""
    if ":" not in text or "T" in text:
        return None
    out: dict[int, int] = {}
    for part in text.split(","):
        partition, _, offset = part.partition(":")
        if not (partition.strip().isdigit() and offset.strip().isdigit()):
            return None
        out[int(partition)] = int(offset)
    return out


def replay_range(start: str, until: str | None) -> tuple[StartAt, int | None, dict[int, int] | None]:
    """(where to start, end time, end offsets) from the --from and --until texts."""
    offsets = parse_offsets(start)
    if offsets is not None:
        begin = StartAt(offsets=offsets)
    else:
        moment = parse_start(start)
        if moment == START_NOW:
            raise ConfigError("replay --from now would replay nothing: give beginning, offsets or a time")
        begin = StartAt(timestamp_ms=moment) if isinstance(moment, int) else StartAt()
    until_ts: int | None = None
    until_offsets: dict[int, int] | None = None
    if until is not None:
        until_offsets = parse_offsets(until)
        if until_offsets is None:
            end = parse_start(until)
            if not isinstance(end, int):
                raise ConfigError(f"--until must be offsets P:O,... or a time, not {until!r}")
            until_ts = end
    return begin, until_ts, until_offsets


# --------------------------------------------------------------------------------------------- commands


def _bar(what: str, as_json: bool) -> Any:
    from streams.surface.console import progress_bar

    return progress_bar(what, unit="events", enabled=not as_json, total=0)


def _progress(bar: Any) -> Any:
    from streams.runtime.replay import Progress

    if bar is None:
        return None

    def total(n: int) -> None:
        bar.total = n
        bar.refresh()

    return Progress(total=total, advance=bar.update)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from streams.runtime.replay import replay

    settings = resolve_services(settings, start=False)
    begin, until_ts, until_offsets = replay_range(args.start, args.until)
    only = ReplayFilter(
        scope=ScopeQuery(tenant_id=args.tenant, user_id=args.user) if args.tenant or args.user else None,
        from_ts=begin.timestamp_ms,
        until_ts=until_ts,
        until_offsets=until_offsets,
    )
    bar = _bar("replaying", args.json)
    try:
        report = asyncio.run(
            replay(
                settings,
                source=args.source,
                start=begin,
                only=only,
                changes=CHANGES_NONE if args.no_changes else CHANGES_APPLIED,
                progress=_progress(bar),
                window=args.window,
            )
        )
    finally:
        if bar is not None:
            bar.close()
    figures = report.to_dict()
    if args.json:
        print(dumps(figures))
    else:
        print(
            f"replayed {figures['replayed']} of {figures['records']} records from {args.source} in "
            f"{figures['seconds']}s ({figures['events_per_s']:,.0f} records/s): {figures['applied']} applied, "
            f"{figures['current']} already current, {figures['stale']} stale; {figures['outside_range']} outside "
            f"the range, {figures['outside_scope']} outside the scope, {figures['invalid']} invalid, "
            f"{figures['reembedded']} re-embedded, {figures['changes_emitted']} changes announced"
        )
    return EXIT_OK


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    return _rebuild(args, settings, settings, args.source)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    target = settings.with_(embedder=args.to_embedder, **({"hash_dim": args.hash_dim} if args.hash_dim else {}))
    target.validate()
    return _rebuild(args, settings, target, args.source)


def _rebuild(args: argparse.Namespace, settings: Settings, target: Settings, source: str | None) -> int:
    from streams.runtime.replay import rebuild

    settings = resolve_services(settings, start=False)
    target = target.with_(kafka_bootstrap=settings.kafka_bootstrap, redis_url=settings.redis_url)
    bar = _bar("rebuilding", args.json)
    try:
        result = asyncio.run(
            rebuild(
                settings,
                target=target,
                source=source,
                progress=_progress(bar),
                allow_incomplete_log=args.allow_incomplete_log,
                allow_loss=args.allow_loss,
                drop_previous=args.drop_previous,
                window=args.window,
            )
        )
    finally:
        if bar is not None:
            bar.close()
    out = result.to_dict()
    if args.json:
        print(dumps(out))
    else:
        built, first = out["built"], out["first_pass"]
        print(
            f"generation {built['number']} ({built['table']}, {built['model']} {built['dim']}-d) built from "
            f"{out['source']}: {first['replayed']} events in {first['seconds']}s "
            f"({first['events_per_s']:,.0f} records/s), {first['reembedded']} re-embedded"
        )
        if out["from_snapshot"]:
            print(f"{out['from_snapshot']} memories the log no longer holds copied from the serving generation")
        v = out["verify"]
        print(f"verify: {'consistent' if v['consistent'] else 'INCONSISTENT'}, {v['live_memories']} live memories")
        if result.switched:
            caught = out["catch_up"]["replayed"] if out["catch_up"] else 0
            print(f"switched from generation {out['previous']['number']}; caught up {caught} events")
        else:
            print(f"NOT switched: generation {out['previous']['number']} still serves", file=sys.stderr)
    return EXIT_OK if result.switched else EXIT_FAILED


def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)
    scope = ScopeQuery(tenant_id=args.tenant, user_id=args.user) if args.tenant or args.user else None
    start = parse_start(args.start)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail(settings, start=start, scope=scope, follow=args.follow, group=args.group))
    return EXIT_OK


async def tail(
    settings: Settings, *, start: str | int, scope: ScopeQuery | None, follow: bool, group: str | None
) -> int:
    """Print JSON lines until the end of the feed (or forever with ``follow``); returns how many."""
    printed = 0
    out = sys.stdout
    async with ChangeFeed(settings, group_id=group, start=start, scope=scope, follow=follow) as feed:
        async for batch in feed.batches():
            out.write("".join(orjson.dumps(item.to_dict()).decode() + "\n" for item in batch))
            out.flush()
            printed += len(batch)
            await feed.commit()  # printed and flushed: a restarted `tail --group` goes on after it
    return printed
