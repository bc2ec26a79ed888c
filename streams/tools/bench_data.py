"""Synthetic memory events for benchmarks: realistic lengths, many users, some updates and deletes."""

from __future__ import annotations

import random
from collections.abc import Iterator

from processors.publishing import EventFactory, HybridClock
from schemas.events import MemoryEvent

SUBJECTS = ("prefers", "dislikes", "is learning", "recently tried", "wants to plan", "often talks about", "avoids")
OBJECTS = (
    "spicy Thai food",
    "long distance running",
    "Portuguese lessons on Tuesday evenings",
    "jazz piano and late night concerts",
    "a trip to Lisbon with the family in May",
    "vegetarian recipes without mushrooms",
    "morning meetings before nine",
    "the new data platform migration at work",
    "hiking in the Alps during the summer",
    "science fiction novels by Ursula K. Le Guin",
    "sourdough bread baked on weekends",
    "a border collie called Pixel",
)
DETAILS = (
    "and mentioned it twice this week",
    "because a friend recommended it",
    "since moving to a new city last year",
    "although the schedule is tight",
    "and asked the assistant to keep reminding them",
    "after a long conversation about health and habits",
)


def synthetic_events(n: int, *, users: int = 1_000, seed: int = 7) -> Iterator[MemoryEvent]:
    """``n`` events: ~85% adds, 10% updates and 5% deletes of earlier memories, 20-40 words each."""
    rng = random.Random(seed)
    factory = EventFactory(HybridClock())
    alive: list[tuple[str, str]] = []
    for i in range(n):
        user = f"user-{rng.randrange(users):05d}"
        roll = rng.random()
        if roll < 0.10 and alive:
            memory_id, owner = alive[rng.randrange(len(alive))]
            yield factory.from_input({"op": "update", "memory_id": memory_id, "user_id": owner, "text": _text(rng, i)})
        elif roll < 0.15 and alive:
            memory_id, owner = alive.pop(rng.randrange(len(alive)))
            yield factory.from_input({"op": "delete", "memory_id": memory_id, "user_id": owner})
        else:
            memory_id = f"m{seed}-{i:08d}"
            alive.append((memory_id, user))
            yield factory.from_input(
                {
                    "memory_id": memory_id,
                    "user_id": user,
                    "agent_id": f"agent-{rng.randrange(8)}",
                    "text": _text(rng, i),
                    "metadata": {"source": "bench", "turn": i},
                }
            )


def _text(rng: random.Random, i: int) -> str:
    return (
        f"The user {rng.choice(SUBJECTS)} {rng.choice(OBJECTS)} {rng.choice(DETAILS)}; "
        f"they {rng.choice(SUBJECTS)} {rng.choice(OBJECTS)} {rng.choice(DETAILS)} (note {i})."
    )
