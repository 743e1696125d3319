"""A made-up product catalog: pure functions from a random generator to MongoDB documents.

The documents look like a real e-commerce catalog and carry every BSON type the sanitizer
has to handle (Decimal128 prices, UUIDs as Binary subtype 4, small Binary thumbnails, naive
UTC datetimes, Int64 counters, one of them past 2^53, ObjectId references, a DBRef, nested
arrays of sub-documents), so the demo exercises the same code paths a production collection
would. Nothing here does I/O.
"""

from __future__ import annotations

import random
import struct
import uuid
import zlib
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from bson import Binary, DBRef, Decimal128, Int64, ObjectId

TIMESTAMP_FIELD = "updatedAt"

_CATEGORIES = {
    "Lighting": (["Desk Lamp", "Floor Lamp", "Pendant Light", "LED Strip"], (19, 240)),
    "Furniture": (["Oak Desk", "Office Chair", "Bookshelf", "Side Table"], (49, 899)),
    "Kitchen": (["Chef Knife", "Cast Iron Pan", "Kettle", "Coffee Grinder"], (12, 310)),
    "Audio": (["Headphones", "Bluetooth Speaker", "Turntable", "Soundbar"], (29, 640)),
    "Outdoor": (["Camping Tent", "Trail Backpack", "Sleeping Bag", "Headlamp"], (15, 420)),
    "Garden": (["Hose Reel", "Pruning Shears", "Raised Bed", "Watering Can"], (9, 190)),
}
_ADJECTIVES = ["Aurora", "Nordic", "Summit", "Harbor", "Cedar", "Vertex", "Lumen", "Atlas"]
_BRANDS = ["Northwind", "Contoso", "Fabrikam", "Tailspin", "Wingtip", "Litware"]
_COLORS = ["black", "white", "oak", "slate", "sand", "forest", "copper"]
_SIZES = ["S", "M", "L", "XL"]
_REVIEW_TITLES = ["Great value", "Does the job", "Not as pictured", "Love it", "Sturdy", "Meh"]
_AUTHORS = ["amira", "bo", "carla", "dmitri", "eun-ji", "femi", "greta", "hugo", "ines"]
_SUPPLIER_IDS = [ObjectId(f"65a0000000000000000000{n:02x}") for n in range(1, 13)]
# Past 2^53: a JSON number would silently lose precision, so the sanitizer must not emit one.
_EVENT_SEQ_BASE = 2**53 + 1


def ms(ts: datetime) -> datetime:
    """`ts` truncated to milliseconds, the precision BSON stores."""
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def _object_id(rng: random.Random, at: datetime) -> ObjectId:
    seconds = int((at - datetime(1970, 1, 1)).total_seconds())
    return ObjectId(struct.pack(">I", seconds) + rng.randbytes(8))


def _uuid(rng: random.Random) -> Binary:
    return Binary.from_uuid(uuid.UUID(bytes=rng.randbytes(16), version=4))


def thumbnail_png(rgb: tuple[int, int, int], size: int = 4) -> bytes:
    """A valid `size`x`size` single-colour PNG (about 70 bytes): a stand-in thumbnail."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * size
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * size))
        + chunk(b"IEND", b"")
    )


def _money(rng: random.Random, low: float, high: float) -> Decimal128:
    cents = rng.randint(int(low * 100), int(high * 100))
    return Decimal128(Decimal(cents).scaleb(-2) + Decimal("0.00"))


def review(rng: random.Random, at: datetime) -> dict[str, Any]:
    rating = rng.choices([1, 2, 3, 4, 5], weights=[1, 1, 2, 4, 5])[0]
    return {
        "reviewId": _uuid(rng),
        "author": rng.choice(_AUTHORS),
        "rating": rating,
        "title": rng.choice(_REVIEW_TITLES),
        "body": f"{rating}/5 after {rng.randint(1, 52)} weeks of use.",
        "createdAt": ms(at),
        "helpfulVotes": Int64(rng.randint(0, 5000)),
        "verifiedPurchase": rng.random() < 0.8,
    }


def product(rng: random.Random, index: int, updated_at: datetime) -> dict[str, Any]:
    """Product number `index` of the catalog, last updated at `updated_at` (naive UTC)."""
    category = rng.choice(sorted(_CATEGORIES))
    kinds, (low, high) = _CATEGORIES[category]
    kind = rng.choice(kinds)
    created_at = ms(updated_at - timedelta(days=rng.randint(1, 700), seconds=rng.randint(0, 86399)))
    price = _money(rng, low, high)
    sku = f"{category[:3].upper()}-{index:06d}"
    variants = [
        {
            "sku": f"{sku}-{color[:2].upper()}{size}",
            "color": color,
            "size": size,
            "price": _money(rng, low, high),
            "stock": rng.randint(0, 400),
            "barcode": f"{rng.randint(10**12, 10**13 - 1)}",
        }
        for color in rng.sample(_COLORS, rng.randint(1, 3))
        for size in rng.sample(_SIZES, rng.randint(1, 2))
    ]
    reviews = [
        review(rng, created_at + timedelta(days=rng.randint(0, 300)))
        for _ in range(rng.randint(0, 4))
    ]
    supplier = rng.choice(_SUPPLIER_IDS)
    return {
        "_id": _object_id(rng, created_at),
        "sku": sku,
        "name": f"{rng.choice(_ADJECTIVES)} {kind}",
        "brand": rng.choice(_BRANDS),
        "category": category,
        "description": f"A {kind.lower()} from the {category.lower()} range.",
        "price": price,
        "currency": "USD",
        "taxRate": rng.choice([0.0, 0.07, 0.2]),
        "active": True,
        "tags": rng.sample(
            ["new", "sale", "eco", "bestseller", "gift", "bulky"], rng.randint(0, 3)
        ),
        "productUuid": _uuid(rng),
        "supplierId": supplier,
        "supplier": DBRef("suppliers", supplier),
        "thumbnail": Binary(thumbnail_png(tuple(rng.randbytes(3)))),
        "dimensions": {
            "widthCm": round(rng.uniform(2, 200), 1),
            "heightCm": round(rng.uniform(2, 200), 1),
            "weightKg": round(rng.uniform(0.05, 60), 2),
        },
        "variants": variants,
        "reviews": reviews,
        "views": Int64(rng.randint(0, 2**40)),
        "eventSeq": Int64(_EVENT_SEQ_BASE + index),
        "discontinuedAt": None,
        "createdAt": created_at,
        TIMESTAMP_FIELD: ms(updated_at),
    }


def catalog(count: int, seed: int, now: datetime, hours: float) -> list[dict[str, Any]]:
    """`count` products with `updatedAt` spread over the `hours` before `now` (naive UTC).

    About one in ten is stamped on the minute, sharing its timestamp with others as a bulk
    import would:
    the extract must page through such ties without losing or repeating documents.
    """
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}")
    if hours <= 0:
        raise ValueError(f"hours must be positive, got {hours}")
    rng = random.Random(seed)
    span_ms = int(hours * 3600 * 1000)
    docs = []
    for index in range(count):
        offset = timedelta(milliseconds=rng.randint(1, span_ms))
        updated_at = now - offset
        if rng.random() < 0.1:
            updated_at = updated_at.replace(second=0, microsecond=0)
        docs.append(product(rng, index, updated_at))
    return docs


def edit(rng: random.Random, doc: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A `$set` a shop employee might make to `doc` now. Never touches `certyo_*` fields."""
    changes: dict[str, Any] = {TIMESTAMP_FIELD: ms(now)}
    choice = rng.randrange(4)
    if choice == 0:
        changes["price"] = _money(rng, 5, 900)
    elif choice == 1 and doc.get("variants"):
        i = rng.randrange(len(doc["variants"]))
        changes[f"variants.{i}.stock"] = rng.randint(0, 400)
    elif choice == 2:
        changes["reviews"] = [*doc.get("reviews", []), review(rng, now)][-6:]
    else:
        changes["tags"] = rng.sample(
            ["new", "sale", "eco", "bestseller", "gift"], rng.randint(0, 3)
        )
    return changes


def soft_delete(now: datetime) -> dict[str, Any]:
    """The `$set` that retires a product without removing it."""
    return {"active": False, "discontinuedAt": ms(now), TIMESTAMP_FIELD: ms(now)}
