"""Schemathesis against a live `memstream serve` (issue 14 item 4, issue 24): every check, bounded in time.

The real stack: the session broker and Redis, a worker, LanceDB on disk, the server with API keys. Schemathesis
loads /openapi.json, generates valid and invalid requests for every operation with one tenant's admin key and fails
on any 5xx, any response outside the document, any invalid request accepted or valid one refused, any route that
ignores authentication, and any object of that tenant another tenant's key can read (object_level_authorization,
with the other tenant as its peer).

Two runs: the examples, coverage and fuzzing phases (each operation alone), and the stateful phase, which chains
operations along the document's links (a batch's memory is read, changed, deleted and read again by its id).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
import yaml

from infra.api_keys import KeyStore, Role
from infra.settings import Settings
from tests.integration.helpers import (
    ServeProcess,
    WorkerProcess,
    make_settings,
    unique_tag,
)

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 12  # per operation and phase: about 2,000 requests, ~30 s on 2 cores
RUN_TIMEOUT_S = 150

# ?wait holds a request open until the worker has materialized its events (up to 600 s): a fuzzed event that
# never materializes would hold one example for that long. Fixed to 0 here; the other parameters are fuzzed.
CONFIG = """
[parameters]
"query.wait" = 0
"""

STATEFUL_SCENARIOS = 20  # sequences of up to max-steps (STATEFUL_CONFIG) linked calls each
STATEFUL_TIMEOUT_S = 120

# Writes go through Kafka: a memory is readable once the worker applied its event. In the stateful phase every
# write waits for that (?wait, the API's own way), so a GET right after a batch finds the memory and a GET right
# after a DELETE answers 404 (schemathesis' use_after_free fails a 200 there), as a client following the links
# expects. These writes only publish events that materialize (adds, and changes of memories that exist), so the
# wait is the worker's latency; 30 s bounds a stuck one. /v1/events publishes whatever it is sent: it waits at
# most 5 s. tenant_id (optional, and refused unless it is the key's) is the key's, so that chains are not cut by
# a 403: the other run fuzzes it.
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")  # a deleted memory's history is kept: see there
STATEFUL_CONFIG = """
[parameters]
"query.wait" = 0
"query.tenant_id" = "@TENANT@"

[phases.stateful]
max-steps = 20

[[operations]]
include-operation-id = ["batchMemories", "updateMemory", "deleteMemory", "deleteMemories"]
parameters = { "query.wait" = 30 }

[[operations]]
include-operation-id = "publishEvents"
parameters = { "query.wait" = 5 }
"""


@dataclass(frozen=True)
class Live:
    url: str
    tenant: str
    key: str  # an admin key of the tenant
    other_key: str  # an admin key of another tenant


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Live]:
    """A `memstream serve` with a worker behind it, and an admin key of each of two tenants."""
    base = tmp_path_factory.mktemp("contract")
    settings: Settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    keys = KeyStore(settings.keys_path)
    tenant = f"t{unique_tag()}"
    _, key = keys.create(tenant, Role.ADMIN)
    _, other_key = keys.create(f"o{unique_tag()}", Role.ADMIN)
    worker = WorkerProcess(settings, base / "worker.log").start()
    server = ServeProcess(settings, base / "serve.log").start()
    try:
        yield Live(server.url, tenant, key, other_key)
    finally:
        server.interrupt()
        worker.interrupt()  # both stop, whatever the checks below find
        server_code = server.wait_stopped()
        worker_code, _ = worker.wait_stopped()
    assert server_code == 0, server.log_text()
    assert "Traceback" not in server.log_text(), server.log_text()[-5000:]
    assert worker_code == 0, worker.log_tail()


async def _schemathesis(live: Live, workdir: Path, config: str, timeout_s: float, *args: str) -> str:
    """Run `st run` on the server's document with every check and both modes, as the tenant's admin key with the
    other tenant's as its peer; its output once it passed.

    The peer is what object_level_authorization needs: it replays the tenant's reads of its own memories with
    the other tenant's key and fails if that key gets the same object (the tenant wall). The document is fetched
    first (it needs a key; [auth.wfc] signs the calls only)."""
    auth = workdir / "auth.json"
    auth.write_text(
        json.dumps(
            {
                "auth": [
                    {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {key}"}]}
                    for name, key in (("owner", live.key), ("other_tenant", live.other_key))
                ]
            }
        )
    )
    config_file = workdir / "schemathesis.toml"
    config_file.write_text(
        f'{config}\n[auth.wfc]\npath = "{auth}"\nuser = "owner"\npeers = ["owner", "other_tenant"]\n'
    )
    document = workdir / "openapi.json"
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {live.key}"}) as http,
        http.get(f"{live.url}/openapi.json") as response,
    ):
        assert response.status == 200, await response.text()
        document.write_bytes(await response.read())
    st = Path(sys.executable).parent / "st"
    proc = await asyncio.create_subprocess_exec(
        str(st),
        "--config-file",
        str(config_file),
        "run",
        str(document),
        "--url",
        live.url,
        "--checks",
        "all",
        "--mode",
        "all",
        "--seed",
        "14",
        "--workers",
        "1",
        "--request-timeout",
        "45",
        "--no-color",
        *args,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"schemathesis did not finish within {timeout_s}s") from None
    text = out.decode(errors="replace")
    (workdir / "schemathesis.log").write_text(text)  # whole, for a failure the message below cuts short
    failures = text.find("FAILURES")
    assert proc.returncode == 0, text[failures : failures + 12_000] if failures >= 0 else text[-12_000:]
    assert "No issues found" in text or "passed" in text, text[-3_000:]
    return text


async def test_schemathesis_finds_nothing(live: Live, tmp_path: Path) -> None:
    await _schemathesis(
        live,
        tmp_path,
        CONFIG,
        RUN_TIMEOUT_S,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
    )


def _stateful_calls(cassette: Path) -> list[tuple[str, str, int, Any]]:
    """(method, path, status, JSON body or None) of each call the stateful phase made, in order."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: the pure-Python one takes seconds
    calls = []
    for interaction in yaml.load(cassette.read_text(), Loader=loader)["http_interactions"]:
        if interaction.get("phase", {}).get("name") != "stateful" or interaction.get("response") is None:
            continue
        request, response = interaction["request"], interaction["response"]
        path = re.sub(r"^https?://[^/]+", "", request["uri"]).split("?")[0]
        body = (response.get("body") or {}).get("string")
        try:
            parsed = json.loads(body) if body else None
        except ValueError:  # text/plain (metrics, a context block)
            parsed = None
        calls.append((request["method"], unquote(path), int(response["status"]["code"]), parsed))
    return calls


async def test_schemathesis_stateful_finds_nothing_and_follows_the_links(live: Live, tmp_path: Path) -> None:
    """Every check over chains of calls along the document's links, each write waited for; and the chains are
    real: a memory a write made is read back by its id, and a memory deleted by its id is then not found."""
    config = f'hooks = "{HOOKS}"\n{STATEFUL_CONFIG.replace("@TENANT@", live.tenant)}'
    cassette = tmp_path / "stateful.yaml"
    await _schemathesis(
        live,
        tmp_path,
        config,
        STATEFUL_TIMEOUT_S,
        "--phases",
        "stateful",
        # Schemathesis starts its chains from the operations it judges "likely to succeed" alone: the writes
        # name a user, tenant, agent and run no operation returns, so a listing without path parameters is the
        # only one, and a random user's listing is empty: no chain would start. Without it the writes start them
        # (the listing's links are followed by clients; the other run tests the listing itself).
        "--exclude-operation-id",
        "listMemories",
        "--max-examples",
        str(STATEFUL_SCENARIOS),
        "--report",
        "vcr",
        "--report-vcr-path",
        str(cassette),
    )
    calls = _stateful_calls(cassette)
    written: set[str] = set()
    read_back: set[str] = set()
    deleted: set[str] = set()
    gone: set[str] = set()
    for method, path, status, body in calls:
        one = re.fullmatch(r"/v1/memories/([^/]+)", path)
        if (method, path, status) == ("POST", "/v1/memories/batch", 200):
            written |= {r["id"] for r in body["results"] if r.get("status") == "searchable"}
        elif (method, path, status) == ("POST", "/v1/events", 200):
            late = set(body.get("not_materialized", []))
            written |= {a["memory_id"] for a in body["accepted"] if a["op"] != "delete"} - late
        elif one and method == "GET" and status == 200 and one[1] in written:
            read_back.add(one[1])
        elif one and method == "DELETE" and status == 200 and body.get("status") == "searchable":
            deleted.add(one[1])
        elif one and method == "GET" and status == 404 and one[1] in deleted:
            gone.add(one[1])
    assert read_back, f"no memory a write made was read back by id in {len(calls)} stateful calls"
    assert gone, f"no memory deleted by id was then looked up in {len(calls)} stateful calls"
