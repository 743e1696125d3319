"""debezium_<c> on a real Kafka-protocol broker (Tansu), SecantusDB and the sandbox.

The messages are the ones the real Debezium connector produced (tests/capture/envelopes/) or,
for the ledger scenarios, messages of exactly that shape for the writes the ledger makes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from bson import ObjectId
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from fixtures.kafka import (
    DebeziumLedger,
    captured_for,
    committed_offsets,
    make_debezium_pipeline,
    produce,
    product,
)
from fixtures.pipeline import hour
from fixtures.sandbox import TENANT_A, TEST_KEY_A

from certyo_dagster.fields import DEAD_LETTERS_COLLECTION
from certyo_dagster.ship import debezium as ship
from certyo_dagster.ship.debezium import DebeziumIngestError, DebeziumIngestor
from certyo_dagster.ship.errors import CertyoError
from certyo_dagster.source.kafka import KafkaResource, probe_lag

HARNESS = Path(__file__).with_name("debezium_harness.py")
BULK = "/api/v1/records/bulk"
RECORDS = "/api/v1/records"


def _counts(result) -> dict:
    events = result.get_asset_materialization_events()
    assert len(events) == 1
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


@pytest.mark.parametrize("mode", ["schemas_off", "schemas_on"])
def test_captured_envelopes_ship_once_and_commit_to_the_end(debezium_pipeline, mode):
    p = debezium_pipeline
    sent = produce(p.broker.bootstrap, p.topic(), captured_for(mode, p.spec().database))
    assert sent == 20
    first = _counts(p.run())
    assert first["messages"] == 20
    assert first["accepted"] == 17 and first["tombstones_skipped"] == 3
    assert first["dead_lettered"] == 0 and first["caught_up"] is True
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: 20}
    records = p.certyo_records()
    assert len(records) == 17
    assert sorted({r["operationType"] for r in records}) == ["delete", "insert", "update", "upsert"]
    # Caught up: the sensor sees no lag, and another run reads nothing.
    tick = p.tick()
    assert not tick.run_requests, tick
    second = _counts(p.run())
    assert second["messages"] == 0 and second["caught_up"] is True
    assert len(p.certyo_records()) == 17


def _history(ledger: DebeziumLedger, documents: int = 40) -> None:
    """Inserts, $set updates, whole-document replaces and deletes (with tombstones)."""
    ids = [ObjectId() for _ in range(documents - 4)] + ["sku-1", "sku-2", 7, 8]
    for n, doc_id in enumerate(ids):
        ledger.write(product(doc_id, 0, ts=hour(1, second=n)))
    for n, doc_id in enumerate(ids[: documents // 2]):
        ledger.update(doc_id, {"stock": 5, "updatedAt": hour(2, second=n)})
    for n, doc_id in enumerate(ids[documents // 2 : documents // 2 + 6]):
        ledger.write(product(doc_id, 2, ts=hour(3, second=n), note="replaced"))
    for doc_id in ids[-6:-2]:
        ledger.delete(doc_id)


def _sent_history(p, documents: int) -> tuple[DebeziumLedger, int]:
    """`_history` sent to the topic; with the topic's end offset (its 4 deletes each add a
    tombstone)."""
    ledger = p.ledger()
    _history(ledger, documents=documents)
    ledger.send()
    return ledger, len(ledger.events) + 4


def _harness(p, point: str, **options) -> subprocess.Popen:
    args = [
        sys.executable,
        str(HARNESS),
        p.resources["mongo"].uri,
        p.spec().database,
        p.broker.bootstrap,
        p.sandbox.base_url,
        point,
    ]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "CERTYO_API_KEY": TEST_KEY_A, "CERTYO_TENANT_ID": TENANT_A}
    tests_dir = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """The exit status and the output (stdout last: the counts line ends it)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, err + out


def test_consumer_sigkilled_mid_batch_three_times_loses_nothing_and_only_replays(
    debezium_pipeline,
):
    p = debezium_pipeline
    ledger = p.ledger()
    _history(ledger)
    ledger.send()
    committed = []
    for point in ("after_post", "after_write_back", "before_post"):
        code, output = _finish(_harness(p, point, batch_size=12))
        assert code == -signal.SIGKILL, output
        committed.append(committed_offsets(p.broker.bootstrap, p.group(), p.topic())[0])
    # Each killed run committed only the batches Certyo had acknowledged before it died; the
    # one killed in its second write-back had committed its first batch (batches are written
    # back and committed in order, whatever is in flight).
    assert committed == sorted(committed) and committed[1] > max(committed[0], 0), committed
    result = _counts(p.run(batch_size=12))
    assert result["caught_up"] is True
    counts = ledger.check()
    counts.assert_clean("debezium: SIGKILL x3")
    assert counts.replays > 0


def test_two_overlapping_runs_rebalance_with_no_loss_and_no_duplicates(
    secantus_db, sandbox, kafka_broker
):
    p = make_debezium_pipeline(secantus_db, sandbox, kafka_broker, partitions=2)
    ledger = p.ledger()
    # Enough messages that the first member, with its batches in flight, is still reading
    # when the second one has started and joined, even on a busy machine where starting an
    # interpreter takes seconds. (Slower batches would not do: a rebalance waits for the
    # batches in flight.)
    _history(ledger, documents=300)
    ledger.send()
    first = _harness(p, "none", batch_size=5, slow_ms=400, max_seconds=60)
    # The second member joins while the first is mid-way (it has committed a batch, so it
    # owns the partitions): the group rebalances.
    deadline = time.monotonic() + 60
    while (
        time.monotonic() < deadline
        and max(committed_offsets(p.broker.bootstrap, p.group(), p.topic()).values()) < 0
    ):
        time.sleep(0.2)
    second = _harness(p, "none", batch_size=5, slow_ms=400, max_seconds=60)
    results = []
    for process in (first, second):
        code, output = _finish(process)
        assert code == 0, output
        results.append(json.loads(output.strip().splitlines()[-1]))
    assert all(r["success"] for r in results), results
    # Both members read messages: the partitions were shared after the rebalance, which
    # took the first member's partition away mid-way and assigned again.
    assert all(r["messages"] > 0 for r in results), results
    assert results[0]["partition_assignments"] >= 2, results
    print("overlapping runs:", [(r["messages"], r["replayed"]) for r in results])
    # The next run starts from the committed offsets and reads whatever is left. It runs in
    # a group that starts from those offsets: when both members leave while the group is
    # still rebalancing, Tansu 0.6.0 never assigns a partition in it again (see
    # tests/fixtures/kafka.py).
    final = _counts(p.in_group(f"{p.group()}-next").run())
    assert final["caught_up"] is True
    counts = ledger.check()
    counts.assert_clean("debezium: two overlapping runs")


def test_a_certyo_outage_commits_no_offset_and_the_next_run_ships_everything(
    debezium_pipeline,
):
    p = debezium_pipeline
    ledger = p.ledger()
    _history(ledger, documents=20)
    ledger.send()
    # Both ingest endpoints: with batches in flight, the last (short) batch goes to the
    # single-record endpoint while the first is still being retried.
    p.sandbox.script_faults(
        [
            {"status": 503, "times": 1000, "path": BULK},
            {"status": 503, "times": 1000, "path": RECORDS},
        ]
    )
    failed = p.run(raise_on_error=False, batch_size=15)
    assert not failed.success
    message = str(failed.all_events[-1].event_specific_data)
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic())[0] < 0, message
    p.sandbox.clear_faults()  # the fault on /api/v1/records would also answer the query
    assert p.certyo_records() == []
    assert _counts(p.run(batch_size=15))["caught_up"] is True
    ledger.check().assert_clean("debezium: Certyo outage")


def test_poison_messages_become_dead_letters_and_the_offset_moves_past(debezium_pipeline):
    p = debezium_pipeline
    ledger = p.ledger()
    _history(ledger, documents=12)
    good_key, good_value = ledger.pending[0]
    wrong_op = json.loads(good_value)
    wrong_op["op"] = "t"
    poison = [
        (good_key, good_value[:-9]),  # broken JSON
        (good_key, json.dumps(wrong_op)),  # an unknown op
        (ledger.writer.key("someone-else"), good_value),  # the key does not match _id
    ]
    ledger.send(extra=poison)
    result = p.run()
    counts = _counts(result)
    assert counts["dead_lettered"] == 3, counts
    assert counts["dead_letter_reasons"] == {"bad_json": 1, "unknown_op": 1, "key_mismatch": 1}
    end = len(ledger.events) + 4  # the 4 deletes each add a tombstone
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: end + 3}
    letters = list(p.db[DEAD_LETTERS_COLLECTION].find({}, sort=[("offset", 1)]))
    assert [(d["topic"], d["partition"], d["offset"]) for d in letters] == [
        (p.topic(), 0, end),
        (p.topic(), 0, end + 1),
        (p.topic(), 0, end + 2),
    ]
    assert all(d["stage"] == "debezium" and d["resolvedAt"] is None for d in letters)
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "no_dead_letters" and check.passed is False
    ledger.check().assert_clean("debezium: poison messages")


def test_an_update_with_after_null_ships_its_update_description_in_both_schema_modes(
    debezium_pipeline,
):
    p = debezium_pipeline
    ledger = p.ledger()
    for schemas in (False, True):
        ledger.writer.schemas = schemas
        ledger.write(product(f"doomed-{schemas}", 0, ts=hour(1)))
        ledger.write(product(f"kept-{schemas}", 0, ts=hour(1)))
        ledger.update_then_delete(f"doomed-{schemas}", {"stock": 99})
        ledger.update(f"kept-{schemas}", {"stock": 1, "updatedAt": hour(2)})
        ledger.send()
        counts = _counts(p.run())
        assert counts["after_null_updates"] == 1 and counts["dead_lettered"] == 0
        ledger.check().assert_clean(f"debezium: after null, schemas={schemas}")
    deltas = [r for r in p.certyo_records() if "_updateDescription" in r["recordPayload"]]
    assert len(deltas) == 2
    assert deltas[0]["recordPayload"]["_updateDescription"]["updatedFields"] == [
        {"field": "stock", "value": 99}
    ]


def test_the_sensor_finds_lag_by_reading_when_the_high_watermark_is_too_low(debezium_pipeline):
    p = debezium_pipeline
    ledger = p.ledger()
    ledger.write(product("a", 0, ts=hour(1)))
    ledger.send()  # one record batch of one message
    for n in range(5):
        ledger.write(product(f"b{n}", 0, ts=hour(1, second=n + 1)))
    ledger.send()  # one record batch of five messages
    tick = p.tick()
    assert len(tick.run_requests) == 1
    _counts(p.run())
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: 6}
    assert not p.tick().run_requests
    # Rewind the group to offset 2. Tansu reports the high watermark as 2 here (the base of
    # the last batch + 1), so watermarks alone would say the group is caught up.
    c = Consumer({"bootstrap.servers": p.broker.bootstrap, "group.id": p.group()})
    low, high = c.get_watermark_offsets(TopicPartition(p.topic(), 0), timeout=10)
    c.commit(offsets=[TopicPartition(p.topic(), 0, 2)], asynchronous=False)
    c.close()
    lag = probe_lag(p.kafka, p.spec())
    assert lag.has_lag and lag.committed == {0: 2}, (lag, low, high)
    [request] = p.tick().run_requests
    assert request.run_key.startswith("0:2:")
    counts = _counts(p.run())
    assert counts["messages"] == 4 and counts["replayed"] == 4
    ledger.check().assert_clean("debezium: lag by reading")


def test_verification_labels_the_shipped_documents_anchored(debezium_pipeline):
    p = debezium_pipeline
    ledger = p.ledger()
    _history(ledger, documents=10)
    ledger.send()
    counts = _counts(p.run())
    assert counts["written_back"] == 6  # each document still there (4 were deleted), once
    doc = p.db["products"].find_one({"certyo_status": "pending"})
    assert doc is not None and isinstance(doc["certyo_version"], int)
    p.sandbox.flush()
    verify = p.run_job("verify_products")
    assert verify.success
    assert p.db["products"].count_documents({"certyo_status": "anchored"}) == 6
    audit = p.run_job("tamper_audit_products")
    assert audit.success
    p.db["products"].update_one({"_id": doc["_id"]}, {"$set": {"price": "0.00"}})
    audit = p.run_job("tamper_audit_products", raise_on_error=False)
    [check] = [c for c in audit.get_asset_check_evaluations() if not c.passed]
    assert check is not None


def test_the_kafka_password_appears_in_no_event_log_or_metadata(
    secantus_db, sandbox, kafka_broker, monkeypatch
):
    import dagster as dg

    monkeypatch.setenv("TEST_KAFKA_PASSWORD", "kafka-pw-never-logged")
    p = make_debezium_pipeline(
        secantus_db,
        sandbox,
        kafka_broker,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="certyo",
        sasl_password=dg.EnvVar("TEST_KAFKA_PASSWORD"),
    )
    # The broker does not speak SASL: the run gets no partition and ends, or fails.
    result = p.run(raise_on_error=False, max_seconds=8)
    text = "\n".join(repr(event) for event in result.all_events)
    logs = p.instance.all_logs(result.run_id)
    text += "\n".join(repr(entry) for entry in logs)
    assert "kafka-pw-never-logged" not in text


class _OutOfOrderCertyo:
    """The real client, but the call holding the first document is answered only after three
    later calls were, and the call holding `failing` fails: a Certyo (or a gateway) that
    answers concurrent calls in any order and refuses one of them."""

    def __init__(self, real, failing: str) -> None:
        self._real, self._failing = real, failing
        self._later_answered = threading.Semaphore(0)
        self.concurrent: bool | None = None
        self.answered: list[int] = []  # the first document number of each acknowledged call
        self.failed: tuple[int, int] | None = None  # first document number, records

    def ingest_record(self, record):
        return self._real.ingest_record(record)

    def post_bulk_body(self, body, count):
        ids = [r["recordId"] for r in orjson.loads(body)["records"]]
        first = int(ids[0].split("-")[1])
        if first == 0:
            self.concurrent = all(self._later_answered.acquire(timeout=20) for _ in range(3))
        try:
            if self._failing in ids:
                self.failed = (first, count)
                raise CertyoError("503 from a gateway", status_code=503)
            response = self._real.post_bulk_body(body, count)
            self.answered.append(first)
            return response
        finally:
            if first != 0:
                self._later_answered.release()


def _ingestor(
    p, kafka: KafkaResource | None = None, client: Any = None, **options
) -> DebeziumIngestor:
    """What debezium_products runs, with this test's options."""
    return DebeziumIngestor(
        database=p.db,
        spec=p.spec(),
        kafka=kafka or p.kafka,
        client=client or p.resources["certyo"].get_client(),
        tenant_id=TENANT_A,
        run_id="ingestor",
        max_seconds=30,
        **options,
    )


def test_batches_in_flight_commit_in_kafka_order_and_stop_at_the_first_failed_batch(
    debezium_pipeline,
):
    p = debezium_pipeline
    total = 48
    ledger = p.ledger()
    for n in range(total):
        ledger.write(product(f"doc-{n:03d}", 0, ts=hour(1, second=n)))
    ledger.send()
    client = _OutOfOrderCertyo(p.resources["certyo"].get_client(), failing="doc-020")
    ingestor = _ingestor(p, client=client, batch_size=12, max_in_flight=4)
    with pytest.raises(DebeziumIngestError) as failed:
        ingestor.run()
    # Later batches were shipped, and acknowledged, while the first was still in flight.
    assert client.concurrent is True
    assert client.answered.index(0) >= 2, client.answered
    # Offset n is document n. Everything before the failed batch is committed and written
    # back; the batches Certyo acknowledged after it are stored but not committed.
    assert client.failed is not None
    failed_at, failed_size = client.failed
    assert failed_at > 0
    assert failed.value.report.committed == {0: failed_at}
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: failed_at}
    assert p.db["products"].count_documents({"certyo_status": "pending"}) == failed_at
    stored = len(p.certyo_records())
    assert stored > failed_at and stored <= total - failed_size
    # The next run reads from the failed batch on: what Certyo holds comes back as replays.
    again = _counts(p.run(batch_size=12))
    assert again["accepted"] == total - stored and again["replayed"] == stored - failed_at
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: total}
    ledger.check().assert_clean("debezium: batches answered out of order")


def test_a_run_reads_and_ships_while_the_group_forms_and_keeps_it_on_assignment(
    debezium_pipeline,
):
    p = debezium_pipeline
    ledger, end = _sent_history(p, documents=40)
    report = _ingestor(p, batch_size=10).run()
    # The first batch was read before the group had assigned anything (the join takes
    # seconds), and Certyo held records before the first commit.
    assert report.caught_up and report.read_ahead > 0, report
    assert report.first_message_seconds < 1.0, report
    assert report.messages == end and report.read_ahead_dropped == 0, report
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: end}
    ledger.check().assert_clean("debezium: read ahead of the group join")
    # Without it, a new group's member reads nothing until the join is over.
    fresh = KafkaResource(bootstrap_servers=p.broker.bootstrap, group_id=f"{p.group()}-2")
    waited = _ingestor(p, kafka=fresh, batch_size=10, read_ahead_messages=0).run()
    assert waited.caught_up and waited.read_ahead == 0 and waited.messages == end, waited
    assert waited.first_message_seconds > report.first_message_seconds + 0.5, waited
    assert waited.replayed == report.accepted, waited


def test_read_ahead_of_a_partition_whose_offset_moved_during_the_join_is_dropped(
    debezium_pipeline, monkeypatch
):
    p = debezium_pipeline
    ledger, end = _sent_history(p, documents=20)
    moved_to = 7
    committer = Consumer({"bootstrap.servers": p.broker.bootstrap, "group.id": p.group()})
    try:
        committer.commit(offsets=[TopicPartition(p.topic(), 0, moved_to)], asynchronous=False)
    finally:
        committer.close()
    begin = ship._ReadAhead.begin

    def begin_then_someone_commits(self, timeout: float = 10.0) -> None:
        # As if the run had read the committed offsets (none yet) just before another
        # member committed offset 7: what it reads ahead from the beginning is not its own.
        begin(self, timeout)
        self.start = {0: -1}
        self.reader.assign([TopicPartition(p.topic(), 0, OFFSET_BEGINNING)])

    monkeypatch.setattr(ship._ReadAhead, "begin", begin_then_someone_commits)
    report = _ingestor(p, batch_size=5).run()
    assert report.caught_up and report.read_ahead == 0, report
    assert report.read_ahead_dropped > 0, report
    # The member read from the moved offset on; only those messages were its own.
    assert report.messages == end - moved_to, report
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: end}


def test_a_record_certyo_refuses_while_the_group_forms_becomes_a_dead_letter_with_its_message(
    debezium_pipeline,
):
    p = debezium_pipeline
    ledger = p.ledger()
    for n in range(6):
        ledger.write(product(f"doc-{n}", 0, ts=hour(1, second=n)))
    _first_key, first_value = ledger.pending[0]
    ledger.send()
    p.sandbox.script_faults([{"status": 422, "times": 1, "path": RECORDS}])
    # One record per batch: each goes to the single-record endpoint, and the first is refused
    # while the run still waits for the group (so its batch was kept in its slim form).
    report = _ingestor(p, batch_size=1).run()
    assert report.caught_up and report.read_ahead == 6, report
    assert report.dead_lettered == 1 and report.accepted == 5, report
    [letter] = p.db[DEAD_LETTERS_COLLECTION].find({"reason": "certyo_validation"})
    assert (letter["topic"], letter["partition"], letter["offset"]) == (p.topic(), 0, 0)
    assert json.loads(letter["value"]) == json.loads(first_value)
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: 6}
    assert p.db["products"].count_documents({"certyo_status": "pending"}) == 5


def test_a_run_whose_read_ahead_cannot_start_waits_for_the_group_and_ships_everything(
    debezium_pipeline, monkeypatch
):
    p = debezium_pipeline
    ledger, end = _sent_history(p, documents=12)

    def broker_times_out(self, timeout: float = 10.0) -> None:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    monkeypatch.setattr(ship._ReadAhead, "begin", broker_times_out)
    logged: list[str] = []
    report = _ingestor(p, batch_size=5, log=logged.append).run()
    assert report.caught_up and report.read_ahead == 0 and report.messages == end, report
    assert report.first_message_seconds > report.first_assignment_seconds, report
    assert any("no read-ahead" in line for line in logged), logged
    assert committed_offsets(p.broker.bootstrap, p.group(), p.topic()) == {0: end}
    ledger.check().assert_clean("debezium: no read-ahead")
