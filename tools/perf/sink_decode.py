"""The index sink's decode per embedded record, and the ingest side's encode (issue 23, item 2).

Runs ``decode_all(records, decode_embedded)`` as ``IndexProcessor.prepare`` does, over records written as the
code in the working tree writes them: with ``schemas.events.encode_embedded`` (the vector in a record header)
when it exists, else ``encode`` (base64 in the JSON). Run it once on each side of a change to compare:
``.venv/bin/python tools/perf/sink_decode.py [DIM]``. Process time, best of 7 passes over 20k records.
"""

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from processors.model import InRecord
from processors.pipeline import decode_all
from processors.publishing import EventFactory
from schemas import events as ev

N = 20_000
DIM = int(sys.argv[1]) if len(sys.argv) > 1 else 384
TEXT = "The user prefers the new data platform migration at work and mentioned it twice this week (note {})."


def items() -> list[ev.EmbeddedEvent]:
    factory = EventFactory()
    rng = np.random.default_rng(1)
    out = []
    for i in range(N):
        event = factory.from_input(
            {
                "user_id": f"user-{i % 1000:05d}",
                "agent_id": "agent-1",
                "memory_id": f"m{i:08d}",
                "text": TEXT.format(i),
                "metadata": {"source": "bench", "turn": i},
            }
        )
        vector = rng.standard_normal(DIM).astype("<f4").tobytes()
        out.append(ev.EmbeddedEvent(event, "all-MiniLM-L6-v2", DIM, vector, f"h{i}", ev.SourceRef("events", 0, i)))
    return out


def best_us(action: Callable[[], Any]) -> float:
    times = []
    for _ in range(7):
        started = time.process_time()
        action()
        times.append(time.process_time() - started)
    return min(times) / N * 1e6


def main() -> None:
    embedded = items()
    encode_embedded = getattr(ev, "encode_embedded", None)  # absent before the vector moved to a header
    if encode_embedded is not None:
        written = [encode_embedded(it) for it in embedded]
        records = [
            InRecord("embedded", 0, i, it.event.key, value, headers=headers)
            for i, (it, (value, headers)) in enumerate(zip(embedded, written, strict=True))
        ]
        kwargs = {"headers": True}
    else:
        records = [InRecord("embedded", 0, i, it.event.key, ev.encode(it)) for i, it in enumerate(embedded)]
        kwargs = {}

    def encode() -> None:
        for it in embedded:
            encode_embedded(it) if encode_embedded is not None else ev.encode(it)

    def decode() -> None:
        good, dead = decode_all(records, ev.decode_embedded, stage="index", **kwargs)
        assert not dead and [g.vector for _, g in good] == [it.vector for it in embedded]

    where = "header" if encode_embedded is not None else "base64 in JSON"
    print(
        f"vector {where}, dim {DIM}: decode {best_us(decode):.1f} us/record, encode {best_us(encode):.1f} us/record, "
        f"value {len(records[0].value)} bytes"
    )


if __name__ == "__main__":
    main()
