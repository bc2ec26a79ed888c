import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from infra import services
from infra.kafka import ensure_topics
from infra.settings import Settings
from processors.model import InRecord
from schemas.events import encode
from streams.runtime.stores import Runtime
from streams.tools.bench_data import synthetic_events

SIZE = int(sys.argv[1]) if len(sys.argv) > 1 else 56
PRELOAD = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
T = {}


def timed(name, fn):
    async def w(*a, **k):
        t = time.perf_counter()
        try:
            return await fn(*a, **k)
        finally:
            T.setdefault(name, []).append((time.perf_counter() - t) * 1000)

    return w


async def main():
    d = Path(tempfile.mkdtemp())
    b = services.start_broker(d / "b")
    r = services.start_redis(d / "r")
    s = Settings(
        home=d,
        kafka_bootstrap=services.kafka_url(b.host, b.port),
        redis_url=services.redis_url(r.host, r.port),
        embedder="hash",
    )
    await ensure_topics(s)
    rt = await Runtime.open(s)
    st = rt.stores
    st.vectors.upsert = timed("lancedb", st.vectors.upsert)
    st.cache.apply = timed("redis", st.cache.apply)
    pub = rt.publisher
    orig = pub.publish

    async def p(topic, recs):
        t = time.perf_counter()
        try:
            return await orig(topic, recs)
        finally:
            T.setdefault("publish " + topic.split(".")[-1], []).append((time.perf_counter() - t) * 1000)

    pub.publish = p
    st.counters.add = timed("counters", st.counters.add)
    ev = list(synthetic_events(PRELOAD + SIZE * 60, users=200))
    off = 0

    def recs(n):
        nonlocal off
        out = [InRecord(s.topics.events, 0, off + i, e.key, encode(e)) for i, e in enumerate(ev[off : off + n])]
        off += n
        return out

    for _ in range(PRELOAD // 2000):
        await rt.ingest.process(recs(2000))
    T.clear()
    tot = []
    prep = []
    for _ in range(60):
        w = recs(SIZE)
        t = time.perf_counter()
        pw = await rt.ingest.prepare(w)
        prep.append((time.perf_counter() - t) * 1000)
        await rt.ingest.write(pw)
        tot.append((time.perf_counter() - t) * 1000)
    def med(x):
        return statistics.median(x)
    print(
        f"window {SIZE} on {PRELOAD} rows: total p50 {med(tot):.1f} max {max(tot):.1f}; prepare {med(prep):.1f}; "
        + ", ".join(f"{k} {med(v):.1f}" for k, v in sorted(T.items()))
    )
    await rt.close()
    r.stop()
    b.stop()


asyncio.run(main())
