"""Writing the demo catalog into MongoDB: seed once, then churn."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from certyo_demo import catalog

log = logging.getLogger("certyo_demo")

SEED_BATCH = 500


def utcnow() -> datetime:
    """Now, as the naive UTC datetime pymongo stores and returns."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class SeedResult:
    inserted: int
    existing: int

    @property
    def already_seeded(self) -> bool:
        return self.inserted == 0 and self.existing > 0


def seed_catalog(
    collection: Any,
    count: int = 3000,
    seed: int = 42,
    hours: float = 4.0,
    now: datetime | None = None,
) -> SeedResult:
    """Insert the demo catalog unless the collection already holds documents.

    A collection that has any document is left alone, so seeding twice, or seeding a real
    collection by mistake, writes nothing.
    """
    existing = collection.count_documents({})
    if existing:
        return SeedResult(inserted=0, existing=existing)
    docs = catalog.catalog(count, seed, now or utcnow(), hours)
    for start in range(0, len(docs), SEED_BATCH):
        collection.insert_many(docs[start : start + SEED_BATCH])
    return SeedResult(inserted=len(docs), existing=0)


@dataclass
class ChurnStats:
    edited: int = 0
    inserted: int = 0
    soft_deleted: int = 0
    hard_deleted: int = 0
    ticks: int = 0


def churn_tick(
    collection: Any, rng: random.Random, changes: int, now: datetime, stats: ChurnStats
) -> None:
    """Make `changes` edits: mostly updates, some inserts, a few soft and hard deletes."""
    live = [d["_id"] for d in collection.find({"active": True}, {"_id": 1})]
    for _ in range(changes):
        action = rng.choices(["edit", "insert", "soft", "hard"], weights=[75, 12, 9, 4])[0]
        if action == "insert" or not live:
            doc = catalog.product(rng, rng.randint(900_000, 999_999), now)
            collection.insert_one(doc)
            stats.inserted += 1
            continue
        doc_id = rng.choice(live)
        if action == "hard":
            collection.delete_one({"_id": doc_id})
            live.remove(doc_id)
            stats.hard_deleted += 1
        elif action == "soft":
            collection.update_one({"_id": doc_id}, {"$set": catalog.soft_delete(now)})
            live.remove(doc_id)
            stats.soft_deleted += 1
        else:
            current = collection.find_one({"_id": doc_id})
            if current is None:  # deleted by someone else since the listing
                continue
            collection.update_one({"_id": doc_id}, {"$set": catalog.edit(rng, current, now)})
            stats.edited += 1


def churn(
    collection: Any,
    interval: float = 5.0,
    changes: int = 3,
    max_iterations: int | None = None,
    seed: int | None = None,
    stop: threading.Event | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> ChurnStats:
    """Keep editing the catalog every `interval` seconds until stopped or out of iterations."""
    rng = random.Random(seed)
    stop = stop or threading.Event()
    stats = ChurnStats()
    while max_iterations is None or stats.ticks < max_iterations:
        churn_tick(collection, rng, changes, clock(), stats)
        stats.ticks += 1
        log.info(
            "churn tick %d: %d edited, %d inserted, %d soft-deleted, %d hard-deleted so far",
            stats.ticks,
            stats.edited,
            stats.inserted,
            stats.soft_deleted,
            stats.hard_deleted,
        )
        if max_iterations is not None and stats.ticks >= max_iterations:
            break
        if stop.wait(interval):
            break
    return stats
