"""Scoped vector searches answered from a reader's hot copy of the user's vectors (processors/hot_vectors.py):
the same results as LanceDB's search on a real stack, and never staler than the user's generation.

One worker for the module (the session broker and Redis, LanceDB on disk), readers opened per test."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest

from infra.read_cache import scope_field
from infra.settings import Settings
from processors.hot_vectors import WarmTrigger
from processors.keyword import terms
from processors.model import Hit, ScopeQuery
from streams.runtime.reading import ReadService, SearchRequest
from streams.surface.api import MemoryPublisher, MemoryReader
from tests.integration.helpers import WorkerProcess, make_settings, run_cli, unique_tag, wait_for, write_jsonl

pytestmark = pytest.mark.slow

WAIT_S = 60
TOPICS = ("cooking", "travel", "music", "work", "family", "sport")
QUERIES = ("cooking", "travel and music", "work", "family sport", "music about cooking", "ana memory 7")


@pytest.fixture(scope="module")
def hot_worker(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Settings]:
    base = tmp_path_factory.mktemp("hot-worker")
    settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    proc = WorkerProcess(settings, base / "worker.log").start()
    try:
        yield settings
    finally:
        proc.interrupt()
        code, _ = proc.wait_stopped()
        assert code == 0, proc.log_tail()
        assert "Traceback" not in proc.log(), proc.log_tail()


async def publish_indexed(settings: Settings, bodies: list[dict[str, Any]]) -> None:
    async with MemoryPublisher(settings) as pub:
        events = [await pub.publish_one(b) for b in bodies]
        await pub.flush()
        missing = await pub.wait_materialized(events, timeout=WAIT_S, indexed=True)
    assert not missing, missing


async def index_settled(vectors: Any) -> bool:
    backlog = await vectors.backlog()
    return bool(backlog.unindexed_rows == 0 and not backlog.missing)


def spread_over_agents_and_runs(tenant: str, user: str, i: int) -> dict[str, Any]:
    """The scope of a user's i-th memory: agents a1, a2 and none in turn, every fourth in run r1."""
    return {
        "tenant_id": tenant,
        "user_id": user,
        "agent_id": ("a1", "a2", None)[i % 3],
        "run_id": "r1" if i % 4 == 0 else None,
        "memory_id": f"{user}-{i}",
    }


async def totals(reads: ReadService) -> Counter[str]:
    """The reader's counters since it started (its flusher moves them out of ``counters`` every second)."""
    await reads.flush_counters()
    return reads.totals


def shape(hits: list[Hit]) -> list[tuple[str, int, str | None, str | None, str]]:
    return [(h.row.memory_id, h.row.version, h.row.scope.agent_id, h.row.scope.run_id, h.row.text) for h in hits]


def assert_same_top_k(got: list[Hit], want: list[Hit], scores: dict[str, float]) -> None:
    """The same top-k: the same scores rank by rank, each hit a memory the LanceDB path scores the same, and the
    same memories wherever no other memory of the scope scores within rounding of them. Among exact ties LanceDB
    returns an arbitrary few at the cut; the hot copy breaks them by key."""
    assert len(got) == len(want)
    assert len({h.row.memory_id for h in got}) == len(got)
    for g, w in zip(got, want, strict=True):
        assert abs(g.score - w.score) < 1e-5 and abs(scores[g.row.memory_id] - g.score) < 1e-5, (g, w)
        tied = sum(abs(score - w.score) < 1e-5 for score in scores.values()) > 1
        assert tied or shape([g]) == shape([w]), (g, w)
    for a, b in pairwise(got):
        assert a.score > b.score or a.row.key < b.row.key


async def test_hot_copy_gives_the_lancedb_path_results(hot_worker: Settings) -> None:
    """Every query, sub-scope and k: the same memories in the same order, with the same cosine scores."""
    tenant = f"t{unique_tag()}"
    bodies = [
        {
            **spread_over_agents_and_runs(tenant, user, i),
            "text": f"{user} memory {i} about {TOPICS[i % len(TOPICS)]} and {TOPICS[(i * 5) % len(TOPICS)]}",
            "metadata": {"n": i % 3},
        }
        for user in ("ana", "bo")
        for i in range(40)
    ]
    await publish_indexed(hot_worker, bodies)
    async with MemoryReader(hot_worker) as hot, MemoryReader(hot_worker.with_(read_hot_vectors_mb=0)) as lance:
        compared = distinct = 0
        for query in QUERIES:
            for agent, run in ((None, None), ("a1", None), ("a2", None), (None, "r1"), ("a1", "r1"), ("zz", None)):
                for k, filters in ((1, None), (5, None), (10, {"n": 1}), (50, None)):
                    request = SearchRequest(query, tenant, "ana", agent, run, k, filters)
                    conditions = request.validate()
                    # the stores' path itself, below the result caches both readers share in Redis
                    got = await hot.reads._search_store(request, conditions)
                    want = await lance.reads._search_store(request, conditions)
                    everything = SearchRequest(query, tenant, "ana", agent, run, 100, filters)
                    scores = {h.row.memory_id: h.score for h in await lance.reads._search_store(everything, conditions)}
                    assert_same_top_k(got, want, scores)
                    compared += len(want)
                    distinct += len({round(h.score, 4) for h in want})
        assert compared > 500 and distinct > 100  # many distinct scores, not a comparison of ties
        counts = await totals(hot.reads)
        # one build of ana's copy served every search; bo's rows were never read into it
        assert counts["read_hot_vectors_builds"] == 1 and counts["read_hot_vectors_hits"] >= 100, counts
        assert len(hot.reads.hot_vectors) == 1
        assert "read_hot_vectors_builds" not in await totals(lance.reads)


async def test_a_write_waited_with_publish_wait_is_in_the_very_next_search(hot_worker: Settings) -> None:
    """The copy is filed under the user's generation: an update or delete of one memory (in the fresh tail, not
    yet in LanceDB) moves it, so the next search rebuilds the copy and sees the change."""
    settings = hot_worker
    tenant = f"t{unique_tag()}"
    scope = {"tenant_id": tenant, "user_id": "cy", "agent_id": "chef"}
    await publish_indexed(
        settings,
        [{**scope, "memory_id": f"m{i}", "text": f"Cy note {i} about {TOPICS[i % len(TOPICS)]}"} for i in range(20)]
        + [{**scope, "memory_id": "m-city", "text": "Cy lives in Porto"}],
    )

    async def publish_wait(name: str, line: dict[str, Any]) -> None:
        cli = await run_cli(settings, "publish", str(write_jsonl(settings.home / name, [line])), "--wait", "--json")
        assert cli.rc == 0 and cli.json()["materialized"] == 1, cli

    async with MemoryReader(settings) as reader:

        async def top() -> list[str]:
            hits = await reader.search("Cy lives in Porto", tenant_id=tenant, user_id="cy", agent_id="chef", k=50)
            return [h.row.text for h in hits]

        assert (await top())[0] == "Cy lives in Porto"
        builds = (await totals(reader.reads))["read_hot_vectors_builds"]
        assert builds == 1

        await publish_wait(
            "update.jsonl", {**scope, "op": "update", "memory_id": "m-city", "text": "Cy moved to Lisbon"}
        )
        texts = await top()
        assert "Cy moved to Lisbon" in texts and "Cy lives in Porto" not in texts and len(texts) == 21

        await publish_wait("delete.jsonl", {**scope, "op": "delete", "memory_id": "m-city"})
        texts = await top()
        assert not any("Porto" in t or "Lisbon" in t for t in texts) and len(texts) == 20
        # both changes were answered by rebuilt copies, not by LanceDB's search
        assert (await totals(reader.reads))["read_hot_vectors_builds"] == builds + 2


async def test_one_scan_warms_every_users_copy_at_the_generation_read_before_it(hot_worker: Settings) -> None:
    """Issue 24: right after a bulk load every user's copy is cold, and building them one by one costs a LanceDB
    scan (~4-5 ms of CPU) per user. Many builds in a short time start one scan of the tenant that builds them all;
    the copies it built answer as the one-by-one ones do, and a write after it still reaches the next search."""
    settings = hot_worker
    tenant = f"t{unique_tag()}"
    users = [f"u{n:02d}" for n in range(12)]
    bodies = [
        {
            "tenant_id": tenant,
            "user_id": user,
            "memory_id": f"{user}-{i}",
            "text": f"{user} memory {i} about {TOPICS[i % len(TOPICS)]}",
        }
        for user in users
        for i in range(8)
    ]
    await publish_indexed(settings, bodies)
    async with MemoryReader(settings) as hot, MemoryReader(settings.with_(read_hot_vectors_mb=0)) as lance:
        reads = hot.reads
        reads.warm_trigger = WarmTrigger(builds=3, window_s=60.0, every_s=600.0)
        for user in users[:3]:  # three builds one by one: the third starts the warm
            await hot.search("cooking", tenant_id=tenant, user_id=user, k=5)
        assert reads._warming is not None
        assert await reads._warming == len(users) - 3  # the three built already are kept
        before = Counter(await totals(reads))  # a copy: totals() returns the live counter
        assert before["read_hot_vectors_builds"] == 3 and before["read_hot_vectors_warmed"] == len(users) - 3
        for user in users:
            request = SearchRequest("travel and music", tenant, user, None, None, 5, None)
            got = await reads._search_store(request, request.validate())
            want = await lance.reads._search_store(request, request.validate())
            everything = SearchRequest("travel and music", tenant, user, None, None, 100, None)
            scores = {h.row.memory_id: h.score for h in await lance.reads._search_store(everything, [])}
            assert len(scores) == 8 and got
            assert_same_top_k(got, want, scores)
        after = await totals(reads)
        assert after["read_hot_vectors_builds"] == 3, after  # every user answered from a copy the scan built
        assert after["read_hot_vectors_hits"] - before["read_hot_vectors_hits"] == len(users)

        line = {"tenant_id": tenant, "user_id": users[5], "memory_id": "new", "text": "a new note about jazz"}
        written = write_jsonl(settings.home / "w.jsonl", [line])
        cli = await run_cli(settings, "publish", str(written), "--wait", "--json")
        assert cli.rc == 0 and cli.json()["materialized"] == 1, cli
        hits = await hot.search("a new note about jazz", tenant_id=tenant, user_id=users[5], k=1)
        assert [h.row.memory_id for h in hits] == ["new"]
        assert (await totals(reads))["read_hot_vectors_builds"] == 4  # the write moved the generation: rebuilt


async def test_warmed_copies_give_the_lancedb_paths_vector_results_and_a_scoped_bm25(hot_worker: Settings) -> None:
    """A warm's copies hold no rows (issue 24): a search reads its hits' rows by key. Vector searches (filters
    included) give what the LanceDB path gives: the same memories, versions, texts and metadata, in the same order
    with the same scores. A hybrid search's keyword leg is the copy's BM25 over the user's own memories
    (processors/keyword.py), not LanceDB's over the whole table (other tenants' memories in its statistics), so its
    ranks may legitimately differ from LanceDB's: it must equal a BM25 computed here from the user's texts, agree
    with LanceDB's best hit where that hit is clear-cut, and leave LanceDB's full-text index unasked."""
    tenant = f"t{unique_tag()}"
    # every topic a distinct number of times in each memory: no two memories score the same against a query (an
    # exact tie ranks by key in the copy and arbitrarily in LanceDB, and would move the fusion's ranks)
    bodies = [
        {
            "tenant_id": tenant,
            "user_id": user,
            "agent_id": ("a1", None)[i % 2],
            "memory_id": f"{user}-{i}",
            "text": " ".join(
                [user, "memory", str(i)] + [t for j, t in enumerate(TOPICS) for _ in range(i * (2 * j + 3) % 31 + 1)]
            ),
            "metadata": {"n": i % 3, "i": i},
        }
        for user in ("ana", "bo")
        for i in range(30)
    ]
    await publish_indexed(hot_worker, bodies)
    async with MemoryReader(hot_worker) as hot, MemoryReader(hot_worker.with_(read_hot_vectors_mb=0)) as lance:
        # both paths' keyword leg is LanceDB's BM25: compared while the sink folds rows into the full-text index,
        # the two would be scored against different statistics (a fresh clone's suite saw ranks 1 and 2 swap)
        vectors = hot.reads.stores.vectors
        await vectors.ensure_text_index()
        await wait_for(
            lambda: index_settled(vectors), timeout=WAIT_S, what="the sink to fold every row into the indexes"
        )
        assert await hot.reads.warm_hot_vectors(tenant) == 2
        user = scope_field(tenant, "ana", None)
        copy = hot.reads.hot_vectors.get(user, await hot.reads.redis_cache.token(user, content_only=True) or b"")
        assert copy is not None and copy.rows is None  # columnar: the rows are read for the hits only
        compared = clear_cut = 0
        for query in (*QUERIES[:-1], "ana memory 7 work", "7"):
            for agent in (None, "a1"):
                # "7": a word of one memory only, to compare the keyword legs; its cosines tie (hash embedder)
                for k, filters in ((1, None), (5, None), (10, {"n": 1}), (40, None)) if query != "7" else ():
                    request = SearchRequest(query, tenant, "ana", agent, None, k, filters)
                    got = await hot.reads._search_store(request, request.validate())
                    want = await lance.reads._search_store(request, request.validate())
                    assert full_shape(got) == full_shape(want), (query, agent, k)
                    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
                    compared += len(want)
                request = SearchRequest(query, tenant, "ana", agent, None, 40, None, mode="hybrid")
                keyword = await hot.reads._hot_text_ranking(copy, request, {}, 40)
                reference = reference_bm25([b for b in bodies if b["user_id"] == "ana"], agent, query)
                assert keyword is not None and [h.row.memory_id for h in keyword] == [m for m, _ in reference]
                assert [h.score for h in keyword] == pytest.approx([score for _, score in reference], rel=1e-9)
                by_id = {b["memory_id"]: b for b in bodies}
                assert all(h.row.text == by_id[h.row.memory_id]["text"] for h in keyword)  # rows read by key
                # the best hit under any statistics: the one memory of the sub-scope holding a query term. Where
                # several do, the table's statistics (other tenants' shorter texts in the mean length) may rank
                # them otherwise: "ana memory 7 work" is ana-0 in LanceDB, ana-7 (the only "7") in the copy
                if len(reference) == 1:
                    indexed = await vectors.text_search(query, request.scope, 1)
                    assert indexed[0].row.memory_id == keyword[0].row.memory_id, (query, agent)
                    clear_cut += 1
                hybrid = await hot.reads._search_store(dataclasses.replace(request, k=10), request.validate())
                assert len(hybrid) == 10 and len({h.row.memory_id for h in hybrid}) == 10
                assert all(h.row.text == by_id[h.row.memory_id]["text"] for h in hybrid)
                assert all(agent is None or h.row.scope.agent_id == agent for h in hybrid)
        assert compared > 150 and clear_cut == 1
        counts = await totals(hot.reads)
        assert counts["read_hot_vectors_builds"] == 0 and counts["read_hot_vectors_hits"] >= 48, counts
        assert counts["read_hot_keyword_hits"] >= 12 and "read_text_rows_moved" not in counts, counts


def reference_bm25(bodies: list[dict[str, Any]], agent: str | None, query: str) -> list[tuple[str, float]]:
    """BM25 written out here (k1 1.2, b 0.75, lance's idf) over one user's memories (N, document frequencies and
    the mean length are the user's; a text without a term counts in neither): the memories of the agent (None:
    all) that hold a query term, best first, ties by memory key. The terms are LanceDB's tokens
    (processors/keyword.py terms, checked against LanceDB's own index in tests/integration/test_keyword.py)."""
    docs = {b["memory_id"]: terms(b["text"]) for b in bodies}
    n_docs = sum(1 for d in docs.values() if d)
    mean = sum(len(d) for d in docs.values()) / n_docs
    scored = []
    for body in bodies:
        if agent is not None and body.get("agent_id") != agent:
            continue
        doc = docs[body["memory_id"]]
        score = 0.0
        for term in set(terms(query)):
            tf = doc.count(term)
            if tf:
                n = sum(1 for d in docs.values() if term in d)
                score += (
                    math.log(1 + (n_docs - n + 0.5) / (n + 0.5))
                    * tf
                    * 2.2
                    / (tf + 1.2 * (0.25 + 0.75 * len(doc) / mean))
                )
        if score > 0:
            scored.append((body["memory_id"], score))
    return sorted(scored, key=lambda m: (-m[1], m[0]))


def full_shape(hits: list[Hit]) -> list[tuple[Any, ...]]:
    """What a caller sees of each hit but its score (compared within float32 rounding)."""
    return [(*shape([h])[0], h.row.metadata, h.row.created_at, h.row.updated_at) for h in hits]


async def test_a_hit_is_never_another_version_than_the_one_the_copy_ranked(hot_worker: Settings) -> None:
    """A columnar copy reads its hits' rows by key at search time. A write landing between the read of the
    user's generation and that read (simulated: the copy of before the write filed under the generation after it)
    must not give one version's score with another's text and metadata, nor a deleted memory: such a search is
    answered by LanceDB and the fresh tail, as if no copy were held."""
    settings = hot_worker
    tenant = f"t{unique_tag()}"
    scope = {"tenant_id": tenant, "user_id": "dee"}
    await publish_indexed(
        settings,
        # topics a distinct number of times: no ties against the query, whose topic words every note shares
        [
            {
                **scope,
                "memory_id": f"m{i}",
                "text": " ".join(["note"] + [t for j, t in enumerate(TOPICS) for _ in range(i * (2 * j + 3) % 31 + 1)]),
            }
            for i in range(12)
        ]
        + [{**scope, "memory_id": "m-city", "text": "Dee lives in Porto", "metadata": {"city": "porto"}}],
    )
    user = scope_field(tenant, "dee", None)

    async def publish_wait(name: str, line: dict[str, Any], reader: MemoryReader) -> None:
        """The write in both stores and out of the fresh tail: the state each comparison below is made in (`--wait`
        alone returns once Redis holds it, and the sink's LanceDB write and clear then land between searches)."""
        path = str(write_jsonl(settings.home / name, [line]))
        cli = await run_cli(settings, "publish", path, "--wait", "--indexed", "--json")
        assert cli.rc == 0 and cli.json()["materialized"] == 1, cli

        async def tail_cleared() -> bool:
            return not await reader.stores.cache.pending_rows(ScopeQuery(tenant_id=tenant, user_id="dee"))

        await wait_for(tail_cleared, timeout=WAIT_S, what="the sink to clear the write from the fresh tail")

    async with MemoryReader(settings) as hot, MemoryReader(settings.with_(read_hot_vectors_mb=0)) as lance:
        reads = hot.reads
        request = SearchRequest("Dee lives in Porto for cooking and travel", tenant, "dee", None, None, 5, None)

        async def search(reader: MemoryReader, mode: str = "vector") -> list[tuple[Any, ...]]:
            asked = dataclasses.replace(request, mode=mode)
            return full_shape(await reader.reads._search_store(asked, asked.validate()))

        assert await reads.warm_hot_vectors(tenant) == 1
        stale = reads.hot_vectors.get(user, await reads.redis_cache.token(user, content_only=True) or b"")
        assert stale is not None and stale.rows is None
        first = await search(hot)
        assert first[0][4] == "Dee lives in Porto" and first[0][5] == {"city": "porto"} and first == await search(lance)

        for name, line in (
            (
                "update.jsonl",
                {
                    **scope,
                    "op": "update",
                    "memory_id": "m-city",
                    "text": "Dee moved to Lisbon",
                    "metadata": {"city": "lisbon"},
                },
            ),
            ("delete.jsonl", {**scope, "op": "delete", "memory_id": "m-city"}),
        ):
            await publish_wait(name, line, hot)
            gen = await reads.redis_cache.token(user, content_only=True)
            assert gen is not None
            reads.hot_vectors.put(user, gen, stale)  # the race: ranked before the write, filed after it
            moved = (await totals(reads))["read_hot_vectors_moved"]
            for mode in ("vector", "hybrid"):  # hybrid: the copy's ranking is its vector leg
                got = await search(hot, mode)
                assert got == await search(lance, mode), (name, mode)
                assert not any(row[4] == "Dee lives in Porto" or row[5] == {"city": "porto"} for row in got), got
            assert (await totals(reads))["read_hot_vectors_moved"] == moved + 2


async def test_a_context_block_from_the_copy_is_the_block_lancedb_gives(hot_worker: Settings) -> None:
    """A block built from the user's copy (a row copy, a warm's columnar copy whose rows are read by key, with a
    fresh-tail update and delete on top) lists the same memories in the same bytes as one built from LanceDB's scan,
    for the user and for each agent; the copy served them, no scan did."""
    settings = hot_worker
    tenant = f"t{unique_tag()}"
    bodies = [
        {
            **spread_over_agents_and_runs(tenant, user, i),
            "text": f"{user} memory {i} about {TOPICS[i % len(TOPICS)]}",
            "metadata": {"importance": i % 4},
        }
        for user in ("ana", "bo")
        for i in range(24)
    ]
    await publish_indexed(settings, bodies)
    changes = [
        {**bodies[3], "op": "update", "text": "ana moved to Lisbon", "metadata": {"importance": 9}},
        {k: v for k, v in bodies[5].items() if k not in ("text", "metadata")} | {"op": "delete"},
    ]
    async with MemoryPublisher(settings) as pub:  # materialized (the fresh tail), not waited into LanceDB
        events = [await pub.publish_one(b) for b in changes]
        await pub.flush()
        assert not await pub.wait_materialized(events, timeout=WAIT_S)
    async with MemoryReader(settings) as hot, MemoryReader(settings.with_(read_hot_vectors_mb=0)) as lance:
        for warmed in (False, True):
            if warmed:
                hot.reads.hot_vectors.clear()
                await hot.reads.warm_hot_vectors(tenant)
            for user in ("ana", "bo"):
                for agent in (None, "a1", "a2", "zz"):
                    for budget in (40, 2_000):
                        got = await hot.reads._build_context(tenant, user, agent, budget)
                        want = await lance.reads._build_context(tenant, user, agent, budget)
                        assert got == want, (warmed, user, agent, budget)
                        assert agent == "zz" or budget == 40 or len(got.memory_ids) >= 6, got
        block = await hot.reads._build_context(tenant, "ana", None, 2_000)
        assert "ana moved to Lisbon" in block.text and "ana-5" not in block.memory_ids
        counts = await totals(hot.reads)
        assert counts["read_hot_context_builds"] == 33, counts  # every block above, none from a scan
        assert "read_hot_vectors_moved" not in counts, counts
