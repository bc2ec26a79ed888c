from pathlib import Path

import orjson

from streams.tools.model_alone import texts_of, thread_counts


def test_the_texts_are_those_the_worker_embeds(tmp_path: Path) -> None:
    lines = [
        {"op": "add", "memory_id": "m1", "user_id": "u", "text": "likes tea"},
        {"op": "delete", "memory_id": "m1", "user_id": "u"},
        {"memory_id": "m2", "user_id": "u", "text": "plays chess"},  # op defaults to add
        {"op": "update", "memory_id": "m2", "user_id": "u", "text": "plays go"},
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    assert texts_of(path) == ["likes tea", "plays chess", "plays go"]


def test_one_thread_and_every_usable_core_are_measured() -> None:
    counts = thread_counts()
    assert counts[0] == 1 and counts == sorted(set(counts)) and 1 <= len(counts) <= 2
