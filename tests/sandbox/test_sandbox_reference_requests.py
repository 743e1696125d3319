"""The sandbox accepts every request the Certyo reference documents, as its examples send them.

The request shapes are rebuilt from the facts the reference states about its example programs
(certyo-mongodb-integration.md): the Python polling worker sends `isoformat()` of pymongo's
naive datetimes, a constant recordVersion "1" and per-day keys; the Node.js change-stream
watcher sends `toISOString()` times, the resume token's `_data` as recordVersion and a
`{_id, _deleted}` payload for deletes; the verification worker sends only tenantId, database,
collection and recordId. A stand-in that refused them would hide how Certyo really behaves.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import pytest
import requests
from bson import ObjectId
from fixtures.sandbox import TENANT_A, TEST_KEY_A, post_json

START = datetime(2026, 4, 14, 10, 30)  # naive, as pymongo returns dates


def poller_record(index: int) -> dict:
    """One record as the reference polling worker builds it from a product document."""
    doc_id = ObjectId(f"665a1b2c3d4e5f6a7b8c{index:04x}")
    updated = START + timedelta(seconds=index, microseconds=index * 1000)
    payload = {
        "_id": str(doc_id),
        "sku": f"SKU-{index}",
        "price": 19.99,
        "supplier": str(ObjectId("65a000000000000000000001")),
        "updatedAt": updated.isoformat(),
    }
    return {
        "tenantId": TENANT_A,
        "database": "productdb",
        "collection": "products",
        "recordId": str(doc_id),
        "recordVersion": "1",
        "operationType": "upsert",
        "recordPayload": payload,
        "sourceTimestamp": updated.isoformat(),  # no offset: valid ISO 8601
        "idempotencyKey": f"mongo-poll-products-{doc_id}-{updated:%Y-%m-%d}",
    }


def watcher_record(operation: str, doc_id: str, token_data: str) -> dict:
    """One record as the reference change-stream watcher builds it from a change event."""
    payload = (
        {"_id": doc_id, "_deleted": True}
        if operation == "delete"
        else {"_id": doc_id, "name": "Kettle", "stock": 3}
    )
    return {
        "tenantId": TENANT_A,
        "database": "productdb",
        "collection": "products",
        "recordId": doc_id,
        "recordVersion": token_data,
        "operationType": operation,
        "recordPayload": payload,
        "sourceTimestamp": "2026-04-14T10:30:00.000Z",
        "idempotencyKey": f"mongo-products-{doc_id}-{token_data[:16]}",
    }


@pytest.fixture
def lenient_sandbox(sandbox_factory):
    """A sandbox with the default (non-strict) validation `certyo-sandbox` starts with."""
    return sandbox_factory(strict=False)


def test_the_polling_workers_full_bulk_call_is_accepted_and_kept_as_sent(lenient_sandbox, caplog):
    records = [poller_record(i) for i in range(1000)]
    with caplog.at_level(logging.WARNING, logger="certyo_sandbox"):
        response = post_json(
            lenient_sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records}
        )
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 1000
    stored = requests.get(
        lenient_sandbox.base_url + "/api/v1/records",
        params={"recordId": records[7]["recordId"]},
        headers={"X-API-Key": TEST_KEY_A},
        timeout=10,
    ).json()["records"]
    assert [r["sourceTimestamp"] for r in stored] == [records[7]["sourceTimestamp"]]
    # Accepted, but said once in the log and counted, so a stricter reading is visible.
    warnings = [r.getMessage() for r in caplog.records if "UTC offset" in r.getMessage()]
    assert len(warnings) == 1 and "1000 ×" in warnings[0]
    leniencies = lenient_sandbox.stats()["leniencies"]
    assert leniencies == {"sourceTimestamp without a UTC offset (read as UTC)": 1000}


def test_the_polling_workers_single_calls_are_accepted(lenient_sandbox):
    for i in range(3):
        response = post_json(lenient_sandbox, "/api/v1/records", poller_record(i))
        assert response.status_code == 202, response.text
        assert response.json()["recordHash"].startswith("sha256:")


def test_the_watchers_insert_update_and_delete_records_are_accepted(lenient_sandbox):
    doc_id = "665a1b2c3d4e5f6a7b8c9d0e"
    # Resume tokens of events one second apart: their first 16 hex characters differ.
    tokens = [f"8265F1A2{s:02X}000000012B022C0100296E5A1004" for s in (0xB3, 0xB4, 0xB5)]
    for operation, token in zip(("insert", "update", "delete"), tokens, strict=True):
        record = watcher_record(operation, doc_id, token)
        response = post_json(lenient_sandbox, "/api/v1/records", record)
        assert response.status_code == 202, response.text
        assert response.json()["idempotencyReplayed"] is False
    assert lenient_sandbox.stats()["leniencies"] == {}  # nothing here stretches the reference


def test_the_watchers_16_character_key_makes_a_second_change_in_the_same_second_a_conflict(
    lenient_sandbox,
):
    """Pitfall: the watcher keys on 16 hex characters of the token, which drop the low byte
    of the increment, so the second change of a second reuses the first one's key."""
    doc_id = "665a1b2c3d4e5f6a7b8c9d0e"
    first = watcher_record("insert", doc_id, "8265F1A2B3000000012B022C0100296E5A1004")
    second = watcher_record("update", doc_id, "8265F1A2B3000000022B022C0100296E5A1004")
    assert first["idempotencyKey"] == second["idempotencyKey"]
    assert post_json(lenient_sandbox, "/api/v1/records", first).status_code == 202
    response = post_json(lenient_sandbox, "/api/v1/records", second)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "idempotencyKey"


def test_the_verification_workers_request_is_answered_with_the_fields_it_reads(lenient_sandbox):
    record = poller_record(1)
    assert post_json(lenient_sandbox, "/api/v1/records", record).status_code == 202
    lenient_sandbox.flush()
    body = {k: record[k] for k in ("tenantId", "database", "collection", "recordId")}
    response = post_json(lenient_sandbox, "/api/v1/verify/record", body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["verified"] is True and result["anchoredOnChain"] is True
    assert result["recordHash"].startswith("sha256:")
    assert result["transactionHash"].startswith("0x")


def test_unknown_and_empty_fields_are_accepted_with_a_warning_unless_strict(
    lenient_sandbox, sandbox
):
    record = poller_record(2) | {"clientId": "", "source": "etl"}
    lenient = post_json(lenient_sandbox, "/api/v1/records", record)
    assert lenient.status_code == 202, lenient.text
    assert lenient_sandbox.stats()["leniencies"] == {
        "empty clientId (treated as absent)": 1,
        "sourceTimestamp without a UTC offset (read as UTC)": 1,
        "unknown record field 'source' (ignored)": 1,
    }
    strict = post_json(sandbox, "/api/v1/records", record)
    assert strict.status_code == 400
    fields = {e["field"] for e in strict.json()["errors"]}
    assert fields == {"clientId", "source", "sourceTimestamp"}


def test_strict_mode_refuses_a_timestamp_without_offset_naming_the_field(sandbox):
    records = [poller_record(i) for i in range(12)]
    response = post_json(
        sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records}
    )
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert len(errors) == 12
    assert errors[0]["field"] == "records[0].sourceTimestamp"
    assert "UTC offset" in errors[0]["message"]


@pytest.mark.parametrize(
    "value",
    ["2026-04-14T10:30:00Z", "2026-04-14T10:30:00.123+02:00", "2026-04-14T10:30:00.000z"],
)
def test_timestamps_with_an_offset_need_no_leniency(lenient_sandbox, value):
    record = poller_record(3) | {"sourceTimestamp": value}
    assert post_json(lenient_sandbox, "/api/v1/records", record).status_code == 202
    assert lenient_sandbox.stats()["leniencies"] == {}


def test_a_date_without_a_time_is_iso_8601_too(lenient_sandbox):
    record = poller_record(4) | {"sourceTimestamp": "2026-04-14"}
    assert post_json(lenient_sandbox, "/api/v1/records", record).status_code == 202
    assert lenient_sandbox.stats()["leniencies"] == {
        "sourceTimestamp that is a date without a time (read as 00:00 UTC)": 1
    }


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01T00:00:00", "", 1713090600])
def test_what_is_not_iso_8601_is_refused_in_either_mode(lenient_sandbox, value):
    record = poller_record(5) | {"sourceTimestamp": value}
    response = post_json(lenient_sandbox, "/api/v1/records", record)
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "sourceTimestamp"
