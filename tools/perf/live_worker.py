import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

from infra import services
from infra.kafka import KafkaPublisher, ensure_topics
from infra.settings import Settings
from schemas.events import encode
from streams.runtime.worker_process import WorkerProcess
from streams.tools.bench_data import synthetic_events

N = int(sys.argv[1])
extra = dict(a.split("=") for a in sys.argv[2:])


async def main():
    d = Path(tempfile.mkdtemp())
    b = services.start_broker(d / "b")
    r = services.start_redis(d / "r")
    s = Settings(
        home=d,
        kafka_bootstrap=services.kafka_url(b.host, b.port),
        redis_url=services.redis_url(r.host, r.port),
        embedder="hash",
        log_level="DEBUG",
        reconcile_interval_s=0,
        worker_role="inline",  # one process to py-spy and measure, as before the supervisor
        **{k: int(v) for k, v in extra.items()},
    )
    await ensure_topics(s)
    pub = await KafkaPublisher.start(s)
    evs = list(synthetic_events(N, users=max(100, N // 50)))
    await pub.publish(s.topics.events, [(e.key, encode(e)) for e in evs])
    await pub.stop()
    t0 = time.monotonic()
    w = WorkerProcess(s, d / "worker.log")
    log = d / "worker.log"
    total = 0
    spied = set()
    while total < N:
        await asyncio.sleep(1)
        total = sum(int(x) for x in re.findall(r"window of (\d+) records", log.read_text(errors="replace")))
        for frac, name in ((0.1, "early"), (0.75, "late")):
            if total >= frac * N and name not in spied:
                spied.add(name)
                await asyncio.create_subprocess_exec(
                    ".venv/bin/py-spy",
                    "record",
                    "--format",
                    "raw",
                    "-r",
                    "50",
                    "-d",
                    "8",
                    "-o",
                    f"/tmp/exp/spy-{name}.txt",
                    "-p",
                    str(w.proc.pid),
                    "--nonblocking",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
        if time.monotonic() - t0 > 900:
            break
    await asyncio.sleep(2)
    text = log.read_text(errors="replace")
    w.stop()
    wins = [(float(ms), int(n)) for n, ms in re.findall(r"window of (\d+) records in ([\d.]+) ms", text)]
    k = len(wins) // 10
    def rate(ws):
        return sum(n for _, n in ws) / (sum(ms for ms, _ in ws) / 1000)
    print(
        f"N={N} {extra}: windows {len(wins)}; in-window rate first10% {rate(wins[:k]):.0f}/s last10% {rate(wins[-k:]):.0f}/s; wall {time.monotonic() - t0:.0f}s, peak RSS {w.peak_rss_mb()}"
    )
    print("\n".join(l[:200] for l in text.splitlines() if "maintenance" in l))
    r.stop()
    b.stop()


asyncio.run(main())
