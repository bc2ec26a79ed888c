import asyncio
import tempfile
import time
from pathlib import Path

from infra import services
from infra.kafka import KafkaPublisher, ensure_topics
from infra.log_reader import LogReader, StartAt
from infra.settings import Settings


async def main():
    d = Path(tempfile.mkdtemp())
    b = services.start_broker(d)
    s = Settings(
        home=d,
        kafka_bootstrap=services.kafka_url(b.host, b.port),
        redis_url="redis://x",
        topic_prefix="x.",
        partitions=4,
        embedder="hash",
    )
    await ensure_topics(s)
    pub = await KafkaPublisher.start(s)
    val = b"x" * 2000
    t = s.topics.events
    for chunk in range(40):
        t0 = time.perf_counter()
        await pub.publish(t, [(f"k{chunk}-{i}".encode(), val) for i in range(10000)])
        pt = time.perf_counter() - t0
        # time to read the chunk just written (from its offsets)
        async with await LogReader.open(s, t) as r:
            ends = await r.watermarks()
            starts = {p: max(0, e - 2500) for p, e in ends.items()}
            await r.seek(StartAt(offsets=starts))
            t0 = time.perf_counter()
            n = 0
            async for w in r.read_to_end():
                n += len(w)
            rt = time.perf_counter() - t0
        if chunk % 5 == 0 or chunk == 39:
            print(
                f"{(chunk + 1) * 10}k records: publish 10k {10000 / pt:.0f}/s; read last ~{n} {n / rt:.0f}/s",
                flush=True,
            )
    await pub.stop()
    b.stop()


asyncio.run(main())
