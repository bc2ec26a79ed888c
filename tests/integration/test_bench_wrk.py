"""The serve benchmark's wrk driver (streams/tools/bench_user.py) sends what the aiohttp driver sends: each phase's
requests, checked by a real HTTP server that records them, and wrk's own counts read back."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from streams.tools.bench_user import PHASES, drive_wrk, free_port

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")

USERS = 50


class Recorder:
    """Answers 200 to well-formed requests of the benchmark's shapes and 400 to anything else."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        self.bad: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer k-123":
            self.bad.append(f"authorization {request.headers.get('Authorization')!r}")
            return web.Response(status=401)
        if request.method == "GET":
            self.seen.append(("GET", request.path, dict(request.query)))
            return web.json_response({})
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            self.bad.append(f"not JSON: {await request.text()!r}")
            return web.Response(status=400)
        self.seen.append(("POST", request.path, body))
        return web.json_response({"hits": []})


@pytest.fixture
async def server() -> Any:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield recorder, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("phase", [p for p in PHASES if p != "search_single"])
async def test_wrk_sends_each_phase_requests_of_the_benchmarks_shape(
    server: tuple[Recorder, str], phase: str, tmp_path: Path
) -> None:
    recorder, url = server
    driven = await drive_wrk(url, "k-123", phase, connections=4, seconds=1, users=USERS, script_dir=tmp_path)

    assert recorder.bad == []
    # wrk counts the answers it read: those still in flight when the time ran out reached the server uncounted
    assert 10 < driven.requests <= len(recorder.seen) <= driven.requests + 4, (driven, len(recorder.seen))
    assert not driven.errors and driven.p50_ms is not None and driven.p99_ms is not None
    assert 0 < driven.p50_ms <= driven.p99_ms
    assert driven.driver_cpu_s > 0
    users: Counter[str] = Counter()
    for method, path, data in recorder.seen:
        if phase == "context":
            assert (method, path) == ("GET", "/v1/context")
            users[data["user_id"]] += 1
            continue
        assert (method, path) == ("POST", "/v1/search") and data["k"] == 10
        if phase == "search_cached":
            assert data == {"query": "what does the user say about jazz", "user_id": "user-00001", "k": 10}
            continue
        assert len(data["query"].split()) == 4
        if phase == "search_tenant":
            assert data["all_users"] is True and "user_id" not in data
        else:
            users[data["user_id"]] += 1
            assert data.get("mode") == ("hybrid" if phase == "search_hybrid" else None)
    if phase not in ("search_cached", "search_tenant"):
        # random users, as the aiohttp driver picks them: spread over the whole range
        assert all(u.startswith("user-000") and int(u[5:]) < USERS for u in users)
        assert len(users) > USERS // 2


async def test_wrk_counts_error_answers(server: tuple[Recorder, str], tmp_path: Path) -> None:
    """A server refusing the key: wrk's non-2xx count comes back as the phase's errors."""
    recorder, url = server
    driven = await drive_wrk(
        url, "wrong", "search_uncached", connections=2, seconds=1, users=USERS, script_dir=tmp_path
    )
    assert driven.requests > 0 and driven.errors == Counter({"non-2xx": driven.requests})
    assert len(recorder.bad) >= driven.requests and recorder.seen == []
