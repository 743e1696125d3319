"""The query shapes the pipeline sends, run on montydb (the demo store) and on mongomock.

Each test runs once per store and asserts results a user would see: documents shipped once
and in order, write-backs that skip edited documents, values that come back as they went in.
"""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from pymongo import InsertOne, UpdateOne
from pymongo.errors import DuplicateKeyError

from certyo_dagster.source.embedded import EmbeddedStoreError, embedded_path, open_embedded_client
from certyo_dagster.source.mongo import close_all_clients, open_client, upsert_with_retry

TS = "updatedAt"
T0 = datetime(2026, 3, 1, 10, 0, 0)


@pytest.fixture(params=["montydb", "mongomock"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An empty `productdb` on the store named by the parameter, reached via open_client."""
    if request.param == "montydb":
        close_all_clients()
        client = open_client(f"montydb://{tmp_path}/mongo")
        try:
            yield client["productdb"]
        finally:
            close_all_clients()
    else:
        target = request.getfixturevalue("mongo")
        yield open_client(target.uri)[target.database]


def _window_page(
    collection: Any, start: datetime, end: datetime, after: tuple[datetime, Any] | None, n: int
) -> list[dict]:
    """One page of the extract query, exactly as the pipeline builds it."""
    clauses: list[dict] = [{TS: {"$gte": start, "$lt": end}}]
    if after is not None:
        t, last_id = after
        clauses.append({"$or": [{TS: {"$gt": t}}, {TS: t, "_id": {"$gt": last_id}}]})
    return list(
        collection.find({"$and": clauses}, sort=[(TS, 1), ("_id", 1)], batch_size=n, limit=n)
    )


def _seed_ties(collection: Any) -> list[dict]:
    # 5 timestamps x 5 documents: every page boundary of size 4 falls inside a run of ties.
    docs = [
        {"_id": ObjectId(), TS: T0 + timedelta(minutes=10 * (i % 5)), "n": i} for i in range(25)
    ]
    docs.append({"_id": ObjectId(), TS: T0 - timedelta(minutes=1), "n": -1})  # before window
    docs.append({"_id": ObjectId(), TS: T0 + timedelta(hours=1), "n": 99})  # at window end
    collection.insert_many(docs)
    return docs


def test_keyset_pages_ship_every_document_once_in_order(db: Any) -> None:
    products = db["products"]
    docs = _seed_ties(products)
    start, end = T0, T0 + timedelta(hours=1)

    shipped: list[dict] = []
    after = None
    while page := _window_page(products, start, end, after, 4):
        shipped.extend(page)
        after = (page[-1][TS], page[-1]["_id"])

    expected = sorted((d for d in docs if start <= d[TS] < end), key=lambda d: (d[TS], d["_id"]))
    assert [d["_id"] for d in shipped] == [d["_id"] for d in expected]
    assert len(shipped) == 25


def test_find_one_sorted_and_count(db: Any) -> None:
    products = db["products"]
    docs = _seed_ties(products)
    latest = products.find_one({TS: {"$lt": T0 + timedelta(hours=1)}}, sort=[(TS, -1), ("_id", -1)])
    in_window = [d for d in docs if d[TS] < T0 + timedelta(hours=1)]
    assert latest["_id"] == max(in_window, key=lambda d: (d[TS], d["_id"]))["_id"]
    assert products.count_documents({TS: {"$gte": T0, "$lt": T0 + timedelta(hours=1)}}) == 25
    assert products.count_documents({}) == 27


def test_conditional_write_back_skips_a_document_edited_since_it_was_read(db: Any) -> None:
    products = db["products"]
    products.insert_one({"_id": "p1", TS: T0, "name": "Lamp"})
    read = products.find_one({"_id": "p1"})
    products.update_one({"_id": "p1"}, {"$set": {"name": "Desk lamp", TS: T0 + timedelta(1)}})

    stale = products.update_one({"_id": "p1", TS: read[TS]}, {"$set": {"certyo_status": "pending"}})
    assert stale.matched_count == 0
    assert "certyo_status" not in products.find_one({"_id": "p1"})

    current = products.find_one({"_id": "p1"})
    fresh = products.update_one(
        {"_id": "p1", TS: current[TS]}, {"$set": {"certyo_status": "pending", "certyo_hash": "h"}}
    )
    assert fresh.matched_count == 1
    stored = products.find_one({"_id": "p1"})
    assert stored["certyo_status"] == "pending"
    assert stored["name"] == "Desk lamp"


def test_cursor_upserts_create_then_update_one_row(db: Any) -> None:
    cursors = db["_certyo_cursors"]
    cursors.create_index([("updated", 1)])
    first = cursors.update_one(
        {"_id": "poll_products"}, {"$set": {"ts": T0, "last_id": "a"}}, upsert=True
    )
    assert first.upserted_id == "poll_products"
    cursors.update_one(
        {"_id": "poll_products"}, {"$set": {"ts": T0 + timedelta(1), "last_id": "b"}}, upsert=True
    )
    assert list(cursors.find({})) == [
        {"_id": "poll_products", "ts": T0 + timedelta(1), "last_id": "b"}
    ]


def test_dead_letters_insert_rejects_duplicates_and_upsert_counts_attempts(db: Any) -> None:
    dead = db["_certyo_dead_letters"]
    dead.insert_one({"_id": "k1", "attempts": 1, "error": "HTTP 500"})
    with pytest.raises(DuplicateKeyError):
        dead.insert_one({"_id": "k1", "attempts": 1})
    dead.update_one(
        {"_id": "k1"}, {"$inc": {"attempts": 1}, "$set": {"error": "HTTP 503"}}, upsert=True
    )
    dead.update_one(
        {"_id": "k2"}, {"$inc": {"attempts": 1}, "$setOnInsert": {"firstSeenAt": T0}}, upsert=True
    )
    dead.update_one(
        {"_id": "k2"},
        {"$inc": {"attempts": 1}, "$setOnInsert": {"firstSeenAt": T0 + timedelta(1)}},
        upsert=True,
    )
    assert sorted(dead.find({}), key=lambda d: d["_id"]) == [
        {"_id": "k1", "attempts": 2, "error": "HTTP 503"},
        {"_id": "k2", "attempts": 2, "firstSeenAt": T0},
    ]


def test_pending_documents_page_by_id_and_bulk_write_marks_them(db: Any) -> None:
    products = db["products"]
    ids = [ObjectId() for _ in range(7)]
    products.insert_many(
        [
            {"_id": i, TS: T0, "certyo_status": "pending" if n != 3 else "anchored"}
            for n, i in enumerate(ids)
        ]
    )
    seen: list[ObjectId] = []
    last = None
    while True:
        flt: dict = {"certyo_status": "pending"}
        if last is not None:
            flt["_id"] = {"$gt": last}
        page = list(products.find(flt, sort=[("_id", 1)], limit=2))
        if not page:
            break
        seen.extend(d["_id"] for d in page)
        last = page[-1]["_id"]
    assert seen == sorted(ids[:3] + ids[4:])

    result = products.bulk_write(
        [UpdateOne({"_id": i, TS: T0}, {"$set": {"certyo_status": "anchored"}}) for i in seen]
        + [UpdateOne({"_id": ids[0], TS: T0 + timedelta(1)}, {"$set": {"x": 1}})],
        ordered=False,
    )
    assert (result.matched_count, result.modified_count) == (6, 6)
    assert products.count_documents({"certyo_status": "anchored"}) == 7

    inserted = products.bulk_write([InsertOne({"_id": "new", TS: T0})])
    assert inserted.inserted_count == 1


def test_bson_values_round_trip(db: Any) -> None:
    products = db["products"]
    token = uuid.UUID("12345678-1234-5678-1234-567812345678")
    doc = {
        "_id": ObjectId("65f000000000000000000001"),
        TS: datetime(2026, 3, 1, 10, 0, 0, 123456),
        "price": Decimal128("1234.50"),
        "uuid": Binary.from_uuid(token),
        "thumbnail": Binary(b"\x89PNG\r\n\x00\xff"),
        "views": Int64(2**62),
        "supplier": ObjectId("65f000000000000000000002"),
        "variants": [{"sku": "A-1", "price": Decimal128("9.99"), "tags": ["red", "xl"]}],
    }
    products.insert_one(dict(doc))
    stored = products.find_one({"_id": doc["_id"]})

    assert stored[TS] == datetime(2026, 3, 1, 10, 0, 0, 123000)  # BSON keeps milliseconds
    assert stored[TS].tzinfo is None
    assert stored["price"] == Decimal128("1234.50")
    assert isinstance(stored["uuid"], Binary) and stored["uuid"].as_uuid() == token
    # pymongo and montydb give subtype-0 Binary back as bytes; mongomock as Binary.
    assert bytes(stored["thumbnail"]) == b"\x89PNG\r\n\x00\xff"
    assert stored["views"] == 2**62
    assert stored["supplier"] == doc["supplier"]
    assert stored["variants"] == doc["variants"]
    # Equality on a Decimal128 and a datetime value finds the document back.
    assert products.count_documents({"price": Decimal128("1234.50"), TS: stored[TS]}) == 1


def test_upsert_with_retry_updates_after_losing_an_insert_race(db: Any) -> None:
    cursors = db["_certyo_cursors"]

    class LosesFirstRace:
        """The other process inserts the row between our read and our insert."""

        def __init__(self) -> None:
            self.calls = 0

        def update_one(self, flt: dict, update: dict, upsert: bool = False) -> Any:
            self.calls += 1
            if self.calls == 1:
                cursors.insert_one({"_id": flt["_id"], "ts": T0})
                raise DuplicateKeyError("E11000 duplicate key error")
            return cursors.update_one(flt, update, upsert=upsert)

        def find_one(self, flt: dict) -> Any:
            return cursors.find_one(flt)

    racing = LosesFirstRace()
    stored = upsert_with_retry(racing, {"_id": "poll_products"}, {"$set": {"last_id": "z"}})
    assert racing.calls == 2
    assert stored == {"_id": "poll_products", "ts": T0, "last_id": "z"}


def test_upsert_with_retry_returns_the_winner_when_the_filter_no_longer_matches(db: Any) -> None:
    dead = db["_certyo_dead_letters"]
    dead.insert_one({"_id": "k1", "version": 1})
    stored = upsert_with_retry(dead, {"_id": "k1", "version": 2}, {"$set": {"error": "x"}})
    assert stored == {"_id": "k1", "version": 1}


def test_embedded_uri_needs_a_directory(tmp_path: Path) -> None:
    for uri in ("montydb://", "montydb://:memory:", f"montydb://{tmp_path}?x=1"):
        with pytest.raises(EmbeddedStoreError, match="MONGO_URI"):
            embedded_path(uri)
    assert embedded_path(f"montydb://{tmp_path}/m") == tmp_path / "m"


def test_store_with_another_engine_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / ".monty.storage").write_text("flatfile")
    with pytest.raises(EmbeddedStoreError, match="flatfile"):
        open_embedded_client(f"montydb://{tmp_path}/m")


def test_threads_share_one_client_without_losing_writes(tmp_path: Path) -> None:
    client = open_embedded_client(f"montydb://{tmp_path}/m")
    counters = client["productdb"]["counters"]
    counters.insert_one({"_id": "c", "n": 0})
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(15):
                counters.find_one({"_id": "c"})
                counters.update_one({"_id": "c"}, {"$inc": {"n": 1}})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert counters.find_one({"_id": "c"})["n"] == 90


def _bump_in_process(uri: str, times: int) -> None:
    counters = open_embedded_client(uri)["productdb"]["counters"]
    for _ in range(times):
        counters.update_one({"_id": "c"}, {"$inc": {"n": 1}})


def test_processes_sharing_the_store_do_not_overwrite_each_other(tmp_path: Path) -> None:
    """montydb updates are read-modify-write; the write lock keeps concurrent edits."""
    uri = f"montydb://{tmp_path}/m"
    open_embedded_client(uri)["productdb"]["counters"].insert_one({"_id": "c", "n": 0})
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_bump_in_process, args=(uri, 40)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert open_embedded_client(uri)["productdb"]["counters"].find_one({"_id": "c"})["n"] == 120


def test_updates_by_id_read_one_row_instead_of_the_collection(tmp_path: Path, monkeypatch) -> None:
    """Write-back of a partition is one update per document; a scan each would take minutes."""
    client = open_embedded_client(f"montydb://{tmp_path}/m")
    products = client["productdb"]["products"]
    products.insert_many([{"_id": ObjectId(), TS: T0, "n": i} for i in range(50)])
    products.insert_one({"_id": 7, TS: T0})  # numeric _id: int and Int64 must still match
    target = products.find_one({"n": 17})
    engine = type(client._client._storage._conn)

    def no_scan(*_: Any) -> Any:
        raise AssertionError("full collection scan")

    with monkeypatch.context() as patch:
        patch.setattr(engine, "read_all", no_scan)
        assert products.update_one({"_id": target["_id"], TS: T0}, {"$set": {"x": 1}}).matched_count
        assert products.find_one({"_id": target["_id"]})["x"] == 1
        assert products.count_documents({"_id": target["_id"], TS: T0 + timedelta(1)}) == 0
        assert products.find_one({"_id": ObjectId()}) is None
    assert products.update_one({"_id": Int64(7)}, {"$set": {"x": 2}}).matched_count == 1
    assert products.find_one({"_id": 7})["x"] == 2
    assert client["productdb"].list_collection_names() == ["products"]


def test_the_pipeline_keyset_builders_page_mixed_id_types(db: Any) -> None:
    """extract.py and verify.py as they are, not copies of their filters."""
    from certyo_dagster.capture.polling import VersionKey, iter_window_batches
    from certyo_dagster.settings import CollectionSpec
    from certyo_dagster.verify.pending import iter_status_pages

    spec = CollectionSpec("productdb", "products")
    products = db["products"]
    docs = _seed_ties(products)
    # _ids of several BSON types at one timestamp: keyset order follows BSON type order.
    mixed = [{"_id": 5, TS: T0}, {"_id": "five", TS: T0}, {"_id": Binary(b"5", 0x80), TS: T0}]
    products.insert_many(mixed)
    products.update_many({}, {"$set": {"certyo_status": "pending"}})

    end = T0 + timedelta(hours=1)
    batches = list(iter_window_batches(products, spec, T0, end, batch_size=4))
    shipped = [d["_id"] for b in batches for d in b]
    assert len(shipped) == len(set(shipped)) == 28
    assert shipped[:4] == [
        5,
        "five",
        Binary(b"5", 0x80),
        min(d["_id"] for d in docs if d[TS] == T0),
    ]
    for after in (5, "five", Binary(b"5", 0x80)):
        resumed = iter_window_batches(
            products, spec, T0, end, batch_size=4, after=VersionKey(T0, after)
        )
        assert [d["_id"] for b in resumed for d in b] == shipped[shipped.index(after) + 1 :]

    pending = [
        d["_id"] for page in iter_status_pages(products, "pending", page_size=3) for d in page
    ]
    assert pending == [5, "five", Binary(b"5", 0x80)] + sorted(d["_id"] for d in docs)


def test_the_pipeline_counts_and_cursor_mirror(db: Any) -> None:
    from certyo_dagster.capture.cursors import read_cursor_mirror, write_cursor_mirror
    from certyo_dagster.capture.polling import VersionKey, count_untimestamped
    from certyo_dagster.settings import CollectionSpec

    spec = CollectionSpec("productdb", "products")
    products = db["products"]
    _seed_ties(products)
    products.insert_many(
        [{"_id": "no-ts"}, {"_id": "null-ts", TS: None}, {"_id": "s", TS: "x"}, {"_id": "n", TS: 7}]
    )
    assert count_untimestamped(products, spec) == 4

    write_cursor_mirror(db, spec, VersionKey(T0, "five"))
    assert read_cursor_mirror(db, spec).position == VersionKey(T0, "five")
