"""What the CLI, the demo and the tools print: progress bars and the verify, reconcile, stats and chaos reports."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import orjson


def progress_bar(what: str, *, unit: str, enabled: bool, total: int | None = None) -> Any:
    """A tqdm bar on a terminal (never in --json mode or when stderr is a file or a pipe)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc=what, unit=f" {unit}", total=total, file=sys.stderr, leave=False)


def print_reconcile(report: dict[str, Any], out: TextIO) -> None:
    verdict = "CONSISTENT" if report["consistent"] else "INCONSISTENT"
    counts = report["counts"]
    seconds = (report["finished_ts"] - report["started_ts"]) / 1000
    print(
        f"reconciled {report['scope']} in {seconds:.1f}s: {verdict}; log {counts.get('log_memories', 0)} memories "
        f"({counts.get('log_records', 0)} records); repaired {counts.get('repaired', 0)}, "
        f"unrepaired {counts.get('unrepaired', 0)}, held back {counts.get('held_back', 0)}",
        file=out,
    )
    found = {k: v for k, v in counts.items() if v and k.split("_", 1)[0] in ("lancedb", "redis")}
    if found:
        print("  found: " + ", ".join(f"{k} {v}" for k, v in sorted(found.items())), file=out)
    for note in report.get("notes", []):
        print(f"  note: {note}", file=out)


def print_verify(report: dict[str, Any], out: TextIO) -> None:
    verdict = "CONSISTENT" if report["consistent"] else "INCONSISTENT"
    print(
        f"{verdict}: {report['live_memories']} live memories, {report['tombstones']} tombstones; "
        f"lancedb {report['lancedb_memories']} rows, redis {report['redis_memories']} keys",
        file=out,
    )
    for kind in ("missing_in_redis", "missing_in_lancedb", "version_mismatch", "content_mismatch"):
        if report[kind]:
            print(f"  {kind}: {report[kind]} (e.g. {', '.join(report['examples'].get(kind, []))})", file=out)
    if report.get("fresh_tail"):
        print(
            f"  {report['fresh_tail']} memories were still waiting for the index sink after {report['index_wait_s']}s "
            "(is `memstream worker` running with the sink, role all or sink?)",
            file=out,
        )


def print_stats(figures: dict[str, int], out: TextIO) -> None:
    width = max((len(name) for name in figures), default=0)
    for name, value in figures.items():
        print(f"{name:>{width}}: {value}", file=out)
    if figures.get("lancedb_unindexed_rows") or figures.get("lancedb_missing_indexes"):
        # searches scan what the indexes do not cover: say who fixes it, and when
        print(
            "  note: LanceDB rows not covered by its indexes yet; the index sink brings them up to date once it has "
            "been idle MEMSTREAM_SINK_IDLE_MS (or MEMSTREAM_SINK_INDEX_ROWS pile up under load)",
            file=out,
        )


def print_chaos(r: dict[str, Any], out: TextIO) -> None:
    seconds = "never" if r["seconds_to_converge"] is None else f"{r['seconds_to_converge']}s"
    print(
        f"  {'PASS' if r['passed'] else 'FAIL'} {r['scenario']}: {r['fault']}\n"
        f"    published {r['events_published']} events ({r['memories']} memories), faults {r['faults_injected']}, "
        f"poison {r['poison_published']} -> dead-lettered {r['dead_lettered']}\n"
        f"    lost {r['lost']}, duplicated {r['duplicated']}, stale {r['stale']}, unexpected {r['unexpected']}, "
        f"stores consistent {r['consistent']}; converged in {seconds} after the fault (wall {r['wall_s']}s)\n"
        f"    counters {r['counters']}",
        file=out,
    )
    if r["reads_asked"]:
        print(f"    reads found {r['reads_found']} of {r['reads_asked']}", file=out)
    if r["figures"]:
        print(f"    figures {orjson.dumps(r['figures']).decode()}", file=out)
