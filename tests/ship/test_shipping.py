"""The shipping rules against a real certyo-sandbox over HTTP, without Dagster or MongoDB.

Single calls for 10 records or fewer, bulk chunks by count and by bytes, 413 halving down to
one record, in-order delivery when a later batch finishes first, and a stream that stops at
its first failed batch.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from fixtures.sandbox import TENANT_A, TEST_KEY_A

from certyo_dagster.sanitize.records import CertyoRecordEncoder, EncodedRecord
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.errors import CertyoUnavailableError
from certyo_dagster.ship.shipping import (
    ACCEPTED,
    BULK_MAX_BYTES,
    BULK_MAX_RECORDS,
    REJECTED,
    REPLAYED,
    SINGLE_ENDPOINT_MAX,
    Checkpoint,
    Shipper,
    ShippingFailedError,
)

BULK = "/api/v1/records/bulk"
SPEC = CollectionSpec("productdb", "products")
T0 = datetime(2026, 11, 1, 9, 0)


def encoded(start: int, count: int, **extra: Any) -> list[EncodedRecord]:
    encoder = CertyoRecordEncoder(SPEC, TENANT_A)
    return [
        encoder.encode({"_id": f"doc-{i:05d}", "updatedAt": T0 + timedelta(seconds=i), **extra})
        for i in range(start, start + count)
    ]


class ObservedClient:
    """The real client, with a note of every call it makes and of when each bulk call ends."""

    def __init__(self, client: CertyoClient) -> None:
        self.client = client
        self.singles = 0
        self.bulk_sizes: list[int] = []
        self.bulk_finished: list[str] = []  # first recordId of each bulk call, as it returns
        self.bulk_started = threading.Event()
        self._lock = threading.Lock()

    def ingest_record(self, record: dict) -> dict:
        with self._lock:
            self.singles += 1
        return self.client.ingest_record(record)

    def post_bulk_body(self, body: bytes, count: int) -> dict:
        first = orjson.loads(body)["records"][0]["recordId"]
        with self._lock:
            self.bulk_sizes.append(count)
        self.bulk_started.set()
        try:
            return self.client.post_bulk_body(body, count)
        finally:
            with self._lock:
                self.bulk_finished.append(first)


@pytest.fixture
def client(sandbox):
    with CertyoClient(
        sandbox.base_url,
        TEST_KEY_A,
        TENANT_A,
        max_retries=0,
        read_timeout=10.0,
        pool_maxsize=8,
    ) as real:
        yield ObservedClient(real)


def stream(*batches: list[EncodedRecord], first: int = 0):
    """(record, context) pairs, a checkpoint after each batch; the context is the recordId."""
    for n, batch in enumerate(batches, start=first):
        for record in batch:
            yield record, record.record_id
        yield Checkpoint(f"after batch {n}")


def record_ids(batch) -> list[str]:
    return [shipped.context for shipped in batch]


def test_ten_records_go_one_by_one_and_eleven_in_one_bulk_call(sandbox, client):
    shipper = Shipper(client, TENANT_A)
    ten, eleven = encoded(0, SINGLE_ENDPOINT_MAX), encoded(100, SINGLE_ENDPOINT_MAX + 1)

    first, second = shipper.ship(stream(ten, eleven))

    assert (client.singles, client.bulk_sizes) == (10, [11])
    assert (first.requests, second.requests) == (10, 1)
    assert record_ids(first) == [r.record_id for r in ten]
    assert record_ids(second) == [r.record_id for r in eleven]
    assert {s.outcome for s in [*first, *second]} == {ACCEPTED}
    assert all(s.receipt["recordHash"].startswith("sha256:") for s in second)
    assert [first.checkpoint, second.checkpoint] == ["after batch 0", "after batch 1"]
    assert sandbox.stats()["records_stored"] == 21
    assert list(shipper.ship([])) == []


def test_a_batch_over_1000_records_is_sent_in_chunks_of_1000_in_order(sandbox, client):
    records = encoded(0, 2500)
    answer = Shipper(client, TENANT_A).ship_batch(records)

    assert client.bulk_sizes == [1000, 1000, 500]
    assert answer.requests == 3
    assert [r["recordId"] for r in answer.receipts] == [r.record_id for r in records]
    assert all(r["tenantId"] == TENANT_A for r in answer.receipts)
    assert sandbox.stats()["records_stored"] == 2500


def test_chunks_end_where_the_next_record_would_pass_the_byte_limit():
    records = encoded(0, 30)
    size = len(records[0].json) + 1  # each record and its comma
    assert all(len(r.json) + 1 == size for r in records)
    shipper = Shipper(None, TENANT_A, max_request_bytes=size * 7)

    assert list(shipper.chunks(records)) == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)]
    assert list(Shipper(None, TENANT_A).chunks(encoded(0, 2001))) == [
        (0, 1000),
        (1000, 2000),
        (2000, 2001),
    ]
    # One record larger than the limit still travels, alone.
    assert list(Shipper(None, TENANT_A, max_request_bytes=10).chunks(records[:2])) == [
        (0, 1),
        (1, 2),
    ]
    assert BULK_MAX_RECORDS == 1000 and BULK_MAX_BYTES == 8 * 1024 * 1024


def test_bulk_bodies_are_split_by_bytes_and_every_record_arrives_in_order(sandbox, client):
    records = encoded(0, 60, blob="x" * 200)
    limit = (len(records[0].json) + 1) * 25
    (batch,) = Shipper(client, TENANT_A, max_request_bytes=limit).ship(stream(records))

    assert client.bulk_sizes == [25, 25] and client.singles == 10  # the last 10: one by one
    assert batch.requests == 12
    assert [s.receipt["recordId"] for s in batch] == [r.record_id for r in records]
    assert sandbox.stats()["records_stored"] == 60


def test_the_bulk_body_joins_the_encoded_records_without_encoding_them_again():
    records = encoded(0, 2)
    body = Shipper(None, TENANT_A).bulk_body(records)
    assert body == b'{"tenantId":"tenant-a","records":[' + records[0].json + b"," + (
        records[1].json + b"]}"
    )
    assert orjson.loads(body)["records"] == [r.as_record() for r in records]


def test_a_413_is_halved_until_it_fits_and_a_single_record_too_large_is_rejected(
    sandbox_factory,
):
    small = encoded(0, 39)
    huge = encoded(39, 1, blob="x" * 6000)
    sandbox = sandbox_factory(max_body_bytes=5000)
    with CertyoClient(sandbox.base_url, TEST_KEY_A, TENANT_A, max_retries=0) as real:
        observed = ObservedClient(real)
        (batch,) = Shipper(observed, TENANT_A).ship(stream(small + huge))

    # 40 records: refused; 20 + 20: refused; 10 + 10 + 10 + 10: the single endpoint.
    assert observed.bulk_sizes == [40, 20, 20]
    assert observed.singles == 40
    assert batch.requests == 3 + 40
    shipped = list(batch)
    assert [s.outcome for s in shipped] == [ACCEPTED] * 39 + [REJECTED]
    assert "413" in shipped[-1].rejection and shipped[0].rejection is None
    assert batch.rejections == {39: shipped[-1].rejection}
    assert sandbox.stats()["requests_by_status"]["413"] == 4
    assert sandbox.stats()["records_stored"] == 39


def test_a_scripted_413_on_the_bulk_endpoint_halves_the_chunk(sandbox, client):
    sandbox.script_faults([{"status": 413, "times": 1, "path": BULK}])
    records = encoded(0, 30)
    (batch,) = Shipper(client, TENANT_A).ship(stream(records))

    assert client.bulk_sizes == [30, 15, 15]
    assert batch.requests == 3
    assert batch.contexts == [r.record_id for r in records]
    assert {s.outcome for s in batch} == {ACCEPTED}


def test_invalid_records_in_a_bulk_call_are_rejected_and_the_rest_sent_again(sandbox, client):
    records = encoded(0, 20)
    bad = records[4]._replace(json=records[4].json.replace(b'"operationType":"upsert"', b'"x":1'))
    records[4] = bad
    (batch,) = Shipper(client, TENANT_A).ship(stream(records))

    assert client.bulk_sizes == [20, 19]
    shipped = list(batch)
    assert [s.outcome for s in shipped].count(REJECTED) == 1
    assert shipped[4].outcome == REJECTED and shipped[4].receipt is None
    assert "operationType" in shipped[4].rejection
    assert sandbox.stats()["records_stored"] == 19


def test_a_resent_batch_comes_back_replayed(sandbox, client):
    records = encoded(0, 12)
    shipper = Shipper(client, TENANT_A)
    list(shipper.ship(stream(records)))
    (again,) = shipper.ship(stream(records))
    assert {s.outcome for s in again} == {REPLAYED}
    assert sandbox.stats()["records_stored"] == 12


def test_batches_arrive_in_stream_order_when_a_later_one_finishes_first(sandbox, client):
    sandbox.script_faults([{"action": "delay", "seconds": 1.0, "path": BULK, "times": 1}])
    first, second, third = encoded(0, 20), encoded(100, 20), encoded(200, 20)

    def items():
        yield from stream(first)
        # Let the first bulk call reach the sandbox (and its delay) before the others.
        assert client.bulk_started.wait(10)
        time.sleep(0.2)
        yield from stream(second, third, first=1)

    delivered = list(Shipper(client, TENANT_A, max_in_flight=3).ship(items()))

    assert client.bulk_finished[-1] == first[0].record_id  # it finished last...
    assert [record_ids(b)[0] for b in delivered] == [  # ...and was delivered first
        first[0].record_id,
        second[0].record_id,
        third[0].record_id,
    ]
    assert [b.checkpoint for b in delivered] == ["after batch 0", "after batch 1", "after batch 2"]


def test_a_failed_batch_stops_the_stream_and_later_acknowledged_batches_are_reported(
    sandbox, client
):
    sandbox.script_faults([{"status": 503, "times": 1, "path": BULK}])
    ahead, failing, later_a, later_b = (
        encoded(0, 5),
        encoded(100, 20),
        encoded(200, 20),
        (encoded(300, 20)),
    )
    never_read = encoded(400, 20)
    pulled: list[str] = []

    def items():
        yield from stream(ahead)  # five records: the single endpoint, untouched by the fault
        yield from stream(failing, first=1)
        assert client.bulk_started.wait(10)
        time.sleep(0.2)
        for item in stream(later_a, later_b, never_read, first=2):
            pulled.append(item)
            yield item

    delivered = []
    shipper = Shipper(client, TENANT_A, max_in_flight=3)
    with pytest.raises(ShippingFailedError) as caught:
        for batch in shipper.ship(items()):
            delivered.append(batch)

    assert [record_ids(b) for b in delivered] == [[r.record_id for r in ahead]]
    failure = caught.value
    assert isinstance(failure.cause, CertyoUnavailableError)
    assert (failure.delivered_batches, failure.delivered_records) == (1, 5)
    assert failure.last_checkpoint == "after batch 0"
    assert [record_ids(b)[0] for b in failure.later_batches] == [
        later_a[0].record_id,
        later_b[0].record_id,
    ]
    assert all(s.outcome == ACCEPTED for b in failure.later_batches for s in b)
    assert (never_read[0], never_read[0].record_id) not in pulled  # it stopped at the failure
    assert sandbox.stats()["records_stored"] == 5 + 40


def test_positions_without_records_come_back_in_order(sandbox, client):
    records = encoded(0, 15)
    items = [Checkpoint("nothing yet"), *stream(records), Checkpoint("skipped batch")]
    delivered = list(Shipper(client, TENANT_A).ship(items))

    assert [(len(b.records), b.checkpoint) for b in delivered] == [
        (0, "nothing yet"),
        (15, "after batch 0"),
        (0, "skipped batch"),
    ]


def test_a_batch_closes_at_batch_size_without_a_checkpoint(sandbox, client):
    records = encoded(0, 25)
    delivered = list(
        Shipper(client, TENANT_A, batch_size=10).ship((r, r.record_id) for r in records)
    )
    assert [len(b.records) for b in delivered] == [10, 10, 5]
    assert [b.checkpoint for b in delivered] == [None, None, None]
    assert client.singles == 25


def test_an_error_of_the_input_comes_after_what_it_handed_over(sandbox, client):
    records = encoded(0, 20)

    def items():
        yield from stream(records)
        raise OSError("the source went away")

    delivered = []
    with pytest.raises(OSError, match="the source went away"):
        for batch in Shipper(client, TENANT_A).ship(items()):
            delivered.append(batch)
    assert [len(b.records) for b in delivered] == [20]
    assert sandbox.stats()["records_stored"] == 20


def test_settings_out_of_range_are_refused():
    for bad in ({"batch_size": 0}, {"batch_size": 1001}, {"max_in_flight": 0}):
        with pytest.raises(ValueError):
            Shipper(None, TENANT_A, **bad)
