"""certyo-sandbox ingest, validation, idempotency, tenant isolation and query, over real HTTP."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import requests
from fixtures.sandbox import TENANT_A, TENANT_B, TEST_KEY_A, TEST_KEY_B
from fixtures.sandbox import post_json as post
from fixtures.sandbox import sample_record as make_record

from certyo_dagster.prove.hashing import record_hash


def query(sandbox, key: str = TEST_KEY_A, **params: Any) -> requests.Response:
    return requests.get(
        sandbox.base_url + "/api/v1/records", params=params, headers={"X-API-Key": key}, timeout=10
    )


def assert_error(response: requests.Response, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message", "errors"}
    assert field in body["message"] or any(field in e["field"] for e in body["errors"]), body
    return body


def test_healthz_needs_no_key(sandbox):
    response = requests.get(sandbox.base_url + "/healthz", timeout=5)
    assert response.json() == {"status": "ok"}


def test_single_record_is_accepted_with_the_project_record_hash(sandbox):
    record = make_record()
    response = post(sandbox, "/api/v1/records", record)
    assert response.status_code == 202
    body = response.json()
    assert body["recordId"] == "r1"
    assert body["tenantId"] == TENANT_A
    assert body["recordHash"] == record_hash(record["recordPayload"])
    assert body["idempotencyReplayed"] is False
    assert body["recordVersion"] == "1"
    assert body["acceptedAt"].endswith("Z")


def test_bulk_returns_results_in_request_order(sandbox):
    records = [make_record(f"r{i}", recordPayload={"n": i}) for i in range(5)]
    response = post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records})
    assert response.status_code == 202
    body = response.json()
    assert (body["tenantId"], body["accepted"], body["replayed"]) == (TENANT_A, 5, 0)
    assert [r["recordId"] for r in body["results"]] == [f"r{i}" for i in range(5)]
    assert [r["recordHash"] for r in body["results"]] == [record_hash({"n": i}) for i in range(5)]


@pytest.mark.parametrize(
    ("key", "status"),
    [(None, 401), ("", 401), ("cty_not_a_key", 401)],
    ids=["none", "empty", "bad"],
)
def test_missing_or_unknown_api_key_is_401(sandbox, key, status):
    response = post(sandbox, "/api/v1/records", make_record(), key=None, headers=(
        {} if key is None else {"X-API-Key": key}
    ))  # fmt: skip
    assert_error(response, status, "X-API-Key")
    assert query(sandbox, key="cty_not_a_key").status_code == 401


def test_api_key_never_appears_in_responses(sandbox):
    response = post(sandbox, "/api/v1/records", make_record(tenant=TENANT_B))
    assert response.status_code == 403
    assert TEST_KEY_A not in response.text


def test_other_tenants_id_is_403(sandbox):
    assert_error(post(sandbox, "/api/v1/records", make_record(tenant=TENANT_B)), 403, "tenantId")
    bulk = {"tenantId": TENANT_B, "records": [make_record(tenant=TENANT_B)]}
    assert_error(post(sandbox, "/api/v1/records/bulk", bulk), 403, "tenantId")
    verify = {"tenantId": TENANT_B, "database": "d", "collection": "c", "recordId": "r"}
    assert_error(post(sandbox, "/api/v1/verify/record", verify), 403, "tenantId")


def _nested(depth: int) -> dict:
    """A payload `depth` objects deep: JSON parsers and RFC 8785 take it, storage cannot."""
    payload: dict = {"leaf": 1}
    for _ in range(depth - 1):
        payload = {"n": payload}
    return payload


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"database": None}, "database"),
        ({"collection": ""}, "collection"),
        ({"recordId": 42}, "recordId"),
        ({"recordPayload": None}, "recordPayload"),
        ({"recordPayload": ["not", "an", "object"]}, "recordPayload"),
        ({"recordPayload": {"big": 2**53}}, "recordPayload"),
        ({"recordPayload": {"big": -(2**63)}}, "recordPayload"),
        ({"recordVersion": 2}, "recordVersion"),
        ({"clientId": ["x"]}, "clientId"),
        ({"operationType": "replace"}, "operationType"),
        ({"sourceTimestamp": "yesterday"}, "sourceTimestamp"),
        ({"sourceTimestamp": "2026-04-14T10:30:00"}, "sourceTimestamp"),
        ({"sourceTimestamp": 1713090600}, "sourceTimestamp"),
        ({"idempotencyKey": 7}, "idempotencyKey"),
        ({"recordpayload": {}}, "recordpayload"),
        ({"recordPayload": _nested(255)}, "recordPayload"),
        ({"recordPayload": _nested(300)}, "recordPayload"),
    ],
)
def test_each_validation_rule_is_a_400_naming_the_field(sandbox, change, field):
    record = make_record()
    for name, value in change.items():
        if value is None:
            record.pop(name, None)
        else:
            record[name] = value
    body = assert_error(post(sandbox, "/api/v1/records", record), 400, field)
    assert body["error"] == "validation_failed"
    assert sandbox.stats()["records_stored"] == 0


def test_malformed_and_truncated_json_is_400(sandbox):
    for raw in (b'{"tenantId": "tenant-a", "recor', b"", b"[1, 2", b"\xff\xfe"):
        response = requests.post(
            sandbox.base_url + "/api/v1/records",
            data=raw,
            headers={"X-API-Key": TEST_KEY_A, "Content-Type": "application/json"},
            timeout=5,
        )
        assert_error(response, 400, "body")


def test_body_that_is_not_an_object_is_400(sandbox):
    assert_error(post(sandbox, "/api/v1/records", [make_record()]), 400, "body")
    assert_error(post(sandbox, "/api/v1/records/bulk", "records"), 400, "body")


def test_wrong_content_type_is_415(sandbox):
    response = requests.post(
        sandbox.base_url + "/api/v1/records",
        data=b"tenantId=tenant-a",
        headers={"X-API-Key": TEST_KEY_A, "Content-Type": "application/x-www-form-urlencoded"},
        timeout=5,
    )
    assert_error(response, 415, "Content-Type")


def test_bulk_of_1001_records_is_413_and_empty_bulk_is_400(sandbox):
    records = [make_record(f"r{i}") for i in range(1001)]
    body = assert_error(
        post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records}),
        413,
        "records",
    )
    assert "1000" in body["message"]
    assert_error(
        post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": []}), 400, "records"
    )
    assert_error(post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A}), 400, "records")
    assert sandbox.stats()["records_stored"] == 0


def test_bulk_with_invalid_records_is_rejected_whole_with_indexes(sandbox):
    records = [make_record(f"r{i}") for i in range(6)]
    records[1]["recordPayload"] = "text"
    records[4]["operationType"] = "merge"
    body = assert_error(
        post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records}),
        400,
        "records[1].recordPayload",
    )
    assert sorted({e["index"] for e in body["errors"]}) == [1, 4]
    assert any(e["field"] == "records[4].operationType" for e in body["errors"])
    assert sandbox.stats()["records_stored"] == 0
    assert query(sandbox).json()["records"] == []


def test_bulk_record_may_inherit_the_envelope_tenant(sandbox):
    record = make_record()
    del record["tenantId"]
    response = post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": [record]})
    assert response.status_code == 202
    assert query(sandbox).json()["records"][0]["tenantId"] == TENANT_A


def test_idempotent_replay_returns_the_stored_response_and_stores_nothing(sandbox):
    record = make_record(idempotencyKey="productdb.products.r1.1713090600000")
    first = post(sandbox, "/api/v1/records", record).json()
    # Same record with keys in another order is the same canonical record.
    reordered = dict(reversed(list(record.items())))
    second = post(sandbox, "/api/v1/records", reordered)
    assert second.status_code == 202
    assert second.json() == {**first, "idempotencyReplayed": True}
    stats = sandbox.stats()
    assert stats["records_stored"] == 1
    assert stats["idempotent_replays"] == 1


def test_reusing_an_idempotency_key_for_another_record_is_422(sandbox):
    post(sandbox, "/api/v1/records", make_record(idempotencyKey="k1"))
    changed = make_record(idempotencyKey="k1", recordPayload={"name": "Toaster"})
    body = assert_error(post(sandbox, "/api/v1/records", changed), 422, "idempotencyKey")
    assert body["error"] == "idempotency_conflict"
    assert sandbox.stats()["records_stored"] == 1


def test_bulk_replays_and_conflicts_are_reported_by_index(sandbox):
    records = [make_record(f"r{i}", idempotencyKey=f"k{i}") for i in range(3)]
    post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records[:2]})
    replay = post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records})
    assert replay.status_code == 202
    body = replay.json()
    assert (body["accepted"], body["replayed"]) == (1, 2)
    assert [r["idempotencyReplayed"] for r in body["results"]] == [True, True, False]

    conflicting = [make_record("r9", idempotencyKey="k9"), make_record("rX", idempotencyKey="k1")]
    body = assert_error(
        post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": conflicting}),
        422,
        "records[1].idempotencyKey",
    )
    assert [e["index"] for e in body["errors"]] == [1]
    assert sandbox.stats()["records_stored"] == 3  # r9 was not half-accepted


def test_tenants_are_isolated_in_query_verify_and_idempotency(sandbox):
    a = post(sandbox, "/api/v1/records", make_record("shared", idempotencyKey="same-key"))
    b = post(
        sandbox,
        "/api/v1/records",
        make_record("shared", tenant=TENANT_B, idempotencyKey="same-key", recordPayload={"b": 1}),
        key=TEST_KEY_B,
    )
    assert a.status_code == b.status_code == 202
    assert b.json()["idempotencyReplayed"] is False
    assert b.json()["tenantId"] == TENANT_B
    assert b.json()["recordHash"] != a.json()["recordHash"]

    only_b = post(
        sandbox, "/api/v1/records", make_record("b-only", tenant=TENANT_B), key=TEST_KEY_B
    )
    assert only_b.status_code == 202
    records_a = query(sandbox).json()["records"]
    assert [(r["recordId"], r["tenantId"]) for r in records_a] == [("shared", TENANT_A)]
    assert query(sandbox, recordId="b-only").json() == {"records": [], "nextCursor": None}
    verify = {"tenantId": TENANT_A, "database": "productdb", "collection": "products"}
    missing = post(sandbox, "/api/v1/verify/record", {**verify, "recordId": "b-only"})
    assert_error(missing, 404, "recordId")


def test_query_returns_stored_fields_and_pages_in_insertion_order(sandbox):
    records = [make_record(f"r{i:02d}", recordPayload={"n": i}) for i in range(25)]
    records[3]["clientId"] = "mongo-poller"
    post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records})
    post(sandbox, "/api/v1/records", make_record("other", collection="orders"))

    seen, cursor, pages = [], None, 0
    while True:
        params = {"collection": "products", "limit": 10}
        if cursor:
            params["cursor"] = cursor
        body = query(sandbox, **params).json()
        seen += body["records"]
        pages += 1
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert pages == 3
    assert [r["recordId"] for r in seen] == [f"r{i:02d}" for i in range(25)]
    third = seen[3]
    assert third["clientId"] == "mongo-poller"
    assert third["recordPayload"] == {"n": 3}
    assert third["recordHash"] == record_hash({"n": 3})
    assert third["recordVersion"] == "1"
    assert {"acceptedAt", "sourceTimestamp", "operationType"} <= set(third)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": 1001}, "limit"), ({"limit": 0}, "limit"), ({"limit": "ten"}, "limit"),
     ({"cursor": "not-a-cursor"}, "cursor"), ({"colection": "typo"}, "colection"),
     ({"limit": "\u00b2"}, "limit"),
     ({"cursor": base64.urlsafe_b64encode(b"seq:99999999999999999999999").decode()}, "cursor")],
)  # fmt: skip
def test_bad_query_parameters_are_400(sandbox, params, field):
    assert_error(query(sandbox, **params), 400, field)


def test_verify_before_anchoring_is_verified_but_not_on_chain(sandbox):
    post(sandbox, "/api/v1/records", make_record())
    body = post(
        sandbox,
        "/api/v1/verify/record",
        {"tenantId": TENANT_A, "database": "productdb", "collection": "products", "recordId": "r1"},
    ).json()
    assert body["verified"] is True
    assert body["anchoredOnChain"] is False
    assert body["transactionHash"] is None
    assert body["merkleProof"] is None


def test_verify_bad_body_is_400_and_unknown_record_404(sandbox):
    assert_error(post(sandbox, "/api/v1/verify/record", {"tenantId": TENANT_A}), 400, "database")
    unknown = {"tenantId": TENANT_A, "database": "d", "collection": "c", "recordId": "nope"}
    assert_error(post(sandbox, "/api/v1/verify/record", unknown), 404, "recordId")
