"""The reconciler's timer gives way to the cost of the last reconciliation (streams/runtime/app.py), and a fold of
the log holds one Scope per distinct scope (processors/reconcile.py LogFold)."""

from __future__ import annotations

import time
import tracemalloc

import orjson
import pytest

from infra.settings import Settings
from processors.model import InRecord
from processors.reconcile import LogFold
from schemas.consistency import ReconcileRequest
from schemas.events import encode
from streams.runtime.app import TIMER_RECONCILE_SHARE, WorkerService


def test_a_timer_request_waits_out_a_share_of_the_last_reconciliations_cost(caplog: pytest.LogCaptureFixture) -> None:
    service = WorkerService(Settings.from_env({}), loop=None)
    assert not service.timer_reconcile_too_soon("first")  # nothing ran yet
    took = 12.0
    wait_s = took / TIMER_RECONCILE_SHARE - took  # 108 s after a 12 s run, at a 10% share
    service.last_reconcile = (time.monotonic() - (wait_s - 5), took)
    with caplog.at_level("INFO"):
        assert service.timer_reconcile_too_soon("early")
    assert "timer reconciliation early skipped: the last one took 12s" in caplog.text
    service.last_reconcile = (time.monotonic() - (wait_s + 1), took)
    assert not service.timer_reconcile_too_soon("due")


def _record(i: int, user: str, partition: int = 0) -> InRecord:
    body = {
        "memory_id": f"m{i:06d}",
        "tenant_id": "acme",
        "user_id": user,
        "agent_id": None,
        "run_id": None,
        "version": 1,
        "event_id": f"{i:032x}",
        "content_hash": f"{i:064x}",
        "op": "add",
        "ts": 1_765_000_000_000 + i,
    }
    return InRecord(topic="t", partition=partition, offset=i, key=None, value=orjson.dumps(body))


def test_a_fold_shares_one_scope_per_distinct_scope_and_keeps_owners_only_for_other_users() -> None:
    records = [_record(i, f"u{i % 7}") for i in range(5_000)]
    fold = LogFold(ReconcileRequest("r", 0, reason="timer"))
    tracemalloc.start()
    fold.add(records)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(fold.entries) == 5_000 and len({id(e.scope) for e in fold.entries.values()}) == 7
    assert not fold.owners  # every memory is in entries: its entry says its owner
    assert held / 5_000 < 520  # ~430 bytes per memory; ~640 with a Scope and owner string per entry
    # a memory first seen for u1 stays u1's: a later event naming u2 is refused, whoever the request is for
    one = LogFold(ReconcileRequest("r", 0, user_id="u2", reason="manual"))
    one.add([_record(1, "u1"), _record(1, "u2"), _record(2, "u2")])
    assert one.owners == {"acme/m000001": "u1"} and one.scope_mismatch == 1 and list(one.entries) == ["acme/m000002"]
    whole = LogFold(ReconcileRequest("r", 0, reason="manual"))
    whole.add([_record(1, "u1"), _record(1, "u2")])
    assert whole.scope_mismatch == 1 and whole.entries["acme/m000001"].scope.user_id == "u1"


class _Tail:
    def __init__(self, left: int) -> None:
        self.left = left

    async def pending_count(self) -> int:
        return self.left


class _Counters:
    def __init__(self) -> None:
        self.added: list[dict[str, int]] = []

    async def add(self, counts: dict[str, int]) -> None:
        self.added.append(dict(counts))


class _Stores:
    def __init__(self, left: int) -> None:
        self.cache = _Tail(left)
        self.counters = _Counters()


class _Runtime:
    """Only what handle_reconcile touches before it would run a reconciliation: a run would fail on these."""

    def __init__(self, left: int) -> None:
        self.stores = _Stores(left)
        self.publisher = None


async def test_a_timer_request_while_the_sink_is_behind_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    service = WorkerService(Settings.from_env({}).with_(reconcile_grace_s=0), loop=None)
    runtime = _Runtime(left=1_234)
    service.runtime = runtime  # type: ignore[assignment]
    request = ReconcileRequest("tick", 0, reason="timer")
    record = InRecord(topic="r", partition=0, offset=7, key=None, value=encode(request))
    with caplog.at_level("WARNING"):
        await service.handle_reconcile(record)
    assert "timer reconciliation tick skipped: 1234 memories not yet in LanceDB" in caplog.text
    assert runtime.stores.counters.added == [{"reconciles_skipped": 1}]
    # a request for a reason runs whatever the lag: here it reaches the reconciler, which these fakes cannot serve
    asked = InRecord(topic="r", partition=0, offset=8, key=None, value=encode(ReconcileRequest("op", 0)))
    with caplog.at_level("WARNING"), pytest.raises(AttributeError):
        await service.handle_reconcile(asked)
    assert "reconciling with 1234 memories not yet in LanceDB" in caplog.text
    assert runtime.stores.counters.added == [{"reconciles_skipped": 1}]
