"""ship_in_order against the sandbox: order, dead letters, reused keys, the stopped prefix."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from fixtures.sandbox import TENANT_A

from certyo_dagster.sanitize.records import EncodedRecord, encode_record
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.ordered import ShipStoppedError, ship_in_order

SPEC = CollectionSpec("shop", "orders", capture="change_stream")
WHEN = datetime(2026, 12, 1, tzinfo=timezone.utc)


def _records(n: int, tag: str = "a") -> list[EncodedRecord]:
    return [
        encode_record(
            SPEC,
            TENANT_A,
            doc_id=i,
            operation="insert",
            document={"_id": i, "tag": tag},
            source_time=WHEN,
            version=f"{i:020d}-x",
            idempotency_key=f"k-{i}",
        )
        for i in range(n)
    ]


def _invalid(record: EncodedRecord) -> EncodedRecord:
    body = orjson.loads(record.json)
    body["sourceTimestamp"] = "not a time"
    return record._replace(json=orjson.dumps(body))


@pytest.mark.parametrize("count", [5, 30])
def test_acks_come_back_in_order_with_invalid_records_set_aside(certyo_client, count):
    records = _records(count)
    records[3] = _invalid(records[3])
    acks, requests = ship_in_order(certyo_client, TENANT_A, records)
    assert [a.index for a in acks] == list(range(count))
    assert acks[3].status == "rejected" and "sourceTimestamp" in acks[3].reason
    assert all(a.status == "accepted" and a.record_hash for i, a in enumerate(acks) if i != 3)
    assert requests == (count if count <= 10 else 2)  # singles, or one refused bulk + its retry


def test_a_key_reused_for_another_payload_is_recorded_not_rejected(certyo_client):
    ship_in_order(certyo_client, TENANT_A, _records(12))
    acks, _ = ship_in_order(certyo_client, TENANT_A, _records(6) + _records(12, tag="b")[6:])
    assert [a.status for a in acks] == ["replayed"] * 6 + ["recorded"] * 6


def test_an_outage_stops_with_the_acknowledged_prefix(certyo_client, sandbox):
    single = "/api/v1/records"
    passes = {"action": "delay", "seconds": 0, "times": 2, "path": single}
    sandbox.script_faults([passes, {"path": single, "status": 503, "times": 20}])
    records = _records(5)
    with pytest.raises(ShipStoppedError) as stopped:
        ship_in_order(certyo_client, TENANT_A, records)
    # A batch counts as acknowledged only whole: the two records Certyo stored before the
    # outage are not in the prefix, so the position stays before them and they are sent again.
    assert stopped.value.acks == []
    assert stopped.value.requests >= 1
    sandbox.clear_faults()
    acks, _ = ship_in_order(certyo_client, TENANT_A, records)
    assert [(a.index, a.status) for a in acks] == [
        (0, "replayed"),
        (1, "replayed"),
        (2, "accepted"),
        (3, "accepted"),
        (4, "accepted"),
    ]
