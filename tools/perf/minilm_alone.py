"""The MiniLM model alone on the texts `memstream bench --scenario publish-wait --events N` publishes, at 1 torch
thread and one per usable core (streams/tools/model_alone.py, which that bench runs after a MiniLM publish-wait):
the "model's best rate on this machine" that issue 23's MiniLM target compares the pipeline with.

    PYTHONPATH=. .venv/bin/python tools/perf/minilm_alone.py 2000
"""

from __future__ import annotations

import sys

import orjson

from schemas.events import Op
from streams.tools.bench_data import synthetic_events
from streams.tools.model_alone import measure


def main(n: int) -> None:
    # the same file publish-wait writes (seed 41, users max(100, n // 50)): the texts the worker embeds
    texts = [e.text for e in synthetic_events(n, users=max(100, n // 50), seed=41) if e.op is not Op.DELETE and e.text]
    print(orjson.dumps(measure(texts)).decode())  # what `bench --scenario publish-wait --embedder minilm` runs


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000)
