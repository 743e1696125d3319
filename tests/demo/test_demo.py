"""The demo catalog and churn, on SecantusDB (what `make run` starts)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from bson import Binary, DBRef, Decimal128, Int64, ObjectId
from bson.binary import UUID_SUBTYPE

from certyo_dagster.sanitize.documents import sanitize_document
from certyo_dagster.source.mongo import close_all_clients, open_client
from certyo_demo import catalog
from certyo_demo.cli import main as demo_main
from certyo_demo.store import churn, seed_catalog

NOW = datetime(2026, 3, 1, 12, 30, 0)


@pytest.fixture
def database(secantus) -> Iterator[str]:
    """A database of this test's own on the shared server, dropped afterwards."""
    name = f"certyo_demo_{uuid4().hex[:12]}"
    close_all_clients()
    try:
        yield name
    finally:
        open_client(secantus.uri).drop_database(name)
        close_all_clients()


@pytest.fixture
def products(secantus, database: str) -> Any:
    return open_client(secantus.uri)[database]["products"]


def _types(value: Any, found: set[type]) -> None:
    found.add(type(value))
    if isinstance(value, dict):
        for v in value.values():
            _types(v, found)
    elif isinstance(value, list):
        for v in value:
            _types(v, found)


def test_catalog_is_deterministic_and_spread_over_the_hours() -> None:
    first = catalog.catalog(400, seed=7, now=NOW, hours=4)
    assert first == catalog.catalog(400, seed=7, now=NOW, hours=4)
    assert first != catalog.catalog(400, seed=8, now=NOW, hours=4)
    assert len({d["_id"] for d in first}) == 400
    assert len({d["sku"] for d in first}) == 400
    stamps = [d["updatedAt"] for d in first]
    assert all(NOW - timedelta(hours=4) <= t < NOW for t in stamps)
    assert all(t.tzinfo is None and t.microsecond % 1000 == 0 for t in stamps)
    hours = Counter(t.replace(minute=0, second=0, microsecond=0) for t in stamps)
    assert len(hours) >= 4  # several hourly partitions have data
    assert max(Counter(stamps).values()) > 1  # ties the extract must page through


def test_catalog_uses_every_bson_type_and_sanitizes() -> None:
    docs = catalog.catalog(200, seed=1, now=NOW, hours=4)
    found: set[type] = set()
    for doc in docs:
        _types(doc, found)
    assert {ObjectId, Decimal128, Binary, Int64, datetime, DBRef, list, dict, float, bool} <= found
    first = docs[0]
    assert first["productUuid"].subtype == UUID_SUBTYPE
    assert bytes(first["thumbnail"]).startswith(b"\x89PNG")
    assert len(first["thumbnail"]) < 200
    assert any(d["reviews"] for d in docs) and all(d["variants"] for d in docs)
    assert any(int(d["eventSeq"]) > 2**53 for d in docs)
    for doc in docs:
        sanitize_document(doc)  # raises PoisonDocumentError naming the field otherwise


def test_seed_writes_the_catalog_once(products: Any) -> None:
    first = seed_catalog(products, count=300, seed=3, hours=4, now=NOW)
    assert (first.inserted, first.already_seeded) == (300, False)
    again = seed_catalog(products, count=300, seed=3, hours=4, now=NOW)
    assert (again.inserted, again.existing, again.already_seeded) == (0, 300, True)
    assert products.count_documents({}) == 300
    stored = products.find_one({})
    assert isinstance(stored["price"], Decimal128)
    assert stored["updatedAt"] < NOW


def test_churn_edits_inserts_and_deletes_without_touching_certyo_fields(products: Any) -> None:
    seed_catalog(products, count=60, seed=3, hours=4, now=NOW)
    products.update_many({}, {"$set": {"certyo_status": "anchored", "certyo_hash": "h0"}})
    before = {d["_id"]: d for d in products.find({})}
    ticks = iter(NOW + timedelta(minutes=m) for m in range(1, 100))

    stats = churn(
        products, interval=0, changes=10, max_iterations=5, seed=11, clock=lambda: next(ticks)
    )

    assert stats.ticks == 5
    assert stats.edited > 0 and stats.inserted > 0
    assert stats.soft_deleted + stats.hard_deleted > 0
    after = {d["_id"]: d for d in products.find({})}
    assert len(before) - len(after) + stats.inserted == stats.hard_deleted
    assert products.count_documents({"active": False}) == stats.soft_deleted
    changed = [d for i, d in after.items() if i not in before or d != before[i]]
    assert changed
    for doc in changed:
        assert doc["updatedAt"] > NOW  # always bumped to "now"
        if doc["_id"] in before:
            # certyo_* fields are the pipeline's: churn never writes them
            assert doc["certyo_status"] == "anchored" and doc["certyo_hash"] == "h0"
        else:
            assert not any(k.startswith("certyo_") for k in doc)


def test_edit_never_names_a_certyo_field() -> None:
    rng = random.Random(5)
    doc = catalog.product(rng, 1, NOW)
    for _ in range(200):
        changes = catalog.edit(rng, doc, NOW)
        assert "updatedAt" in changes
        assert not any(k.startswith("certyo_") for k in changes)


def test_cli_seed_and_churn(secantus, database: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MONGO_URI", secantus.uri)
    monkeypatch.setenv("MONGO_DATABASE", database)
    assert demo_main(["seed", "--count", "50"]) == 0
    assert "seeded 50 products" in capsys.readouterr().out
    assert demo_main(["seed", "--count", "50"]) == 0
    assert "already seeded (50 documents): nothing to do" in capsys.readouterr().out
    assert demo_main(["churn", "--interval", "0.01", "--max-iterations", "2"]) == 0
    assert "churn stopped after 2 ticks" in capsys.readouterr().out


def test_cli_without_mongo_uri_says_where_to_get_it_in_one_line(capsys, monkeypatch) -> None:
    monkeypatch.delenv("MONGO_URI", raising=False)
    assert demo_main(["seed", "--count", "5"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "certyo-demo: MONGO_URI is not set: for the database `make run` started, "
        "`source .certyo_run/env.sh` first\n"
    )


def test_cli_rejects_a_bad_count(capsys) -> None:
    with pytest.raises(SystemExit):
        demo_main(["seed", "--count", "-3"])
    assert "--count" in capsys.readouterr().err


def test_churn_process_stops_on_sigterm(secantus, database: str) -> None:
    env = {"MONGO_URI": secantus.uri, "MONGO_DATABASE": database, "PATH": os.environ["PATH"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "certyo_demo", "churn", "--interval", "30"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "churn tick 1" in proc.stdout.readline() + proc.stdout.readline()
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "churn stopped after 1 ticks" in out


def test_demo_summary_names_what_is_missing() -> None:
    from certyo_demo.driver import DemoOutcome, demo_partitions, render_summary

    good = DemoOutcome({"anchored": 10}, 10, 10, 2, 0, ["2026-03-01-10:00"], [])
    assert good.problems() == []
    assert "batches anchored" in render_summary(good)
    bad = DemoOutcome(
        {"anchored": 7, "pending": 3}, 10, 8, 0, 2, ["2026-03-01-10:00"], ["verify_products"]
    )
    assert bad.problems() == [
        "dagster run failed: verify_products",
        "3 of 10 documents are not anchored",
        "the sandbox stored 8 records for 10 docs",
        "the sandbox anchored no batch",
        "2 records still wait for a batch",
    ]
    assert demo_partitions(NOW, 2) == ["2026-03-01-10:00", "2026-03-01-11:00", "2026-03-01-12:00"]
