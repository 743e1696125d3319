"""CertyoClient over real HTTP against certyo-sandbox: retries, replays, errors, paging.

Sleeps are recorded instead of slept, so retry timing is asserted exactly without waiting.
"""

from __future__ import annotations

import logging
import threading
import uuid

import orjson
import pytest

from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.errors import (
    CertyoAuthError,
    CertyoError,
    CertyoIdempotencyConflictError,
    CertyoNotFoundError,
    CertyoRateLimitedError,
    CertyoUnavailableError,
    CertyoValidationError,
)

KEY_A = "cty_sandbox_test_key_a"
KEY_B = "cty_sandbox_test_key_b"
BULK = "/api/v1/records/bulk"
SINGLE = "/api/v1/records"


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(sandbox, sleeps):
    clients: list[CertyoClient] = []

    def make(**overrides) -> CertyoClient:
        settings = {
            "base_url": sandbox.base_url,
            "api_key": KEY_A,
            "tenant_id": "tenant-a",
            "sleep": sleeps.append,
        }
        settings.update(overrides)
        client = CertyoClient(**settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def records(count: int, collection: str = "products", start: int = 0) -> list[dict]:
    return [
        {
            "database": "productdb",
            "collection": collection,
            "recordId": f"doc-{i:05d}",
            "recordPayload": {"sku": f"SKU-{i}", "price": i},
            "operationType": "upsert",
            "sourceTimestamp": "2026-04-14T10:30:00.123+00:00",
            "idempotencyKey": f"productdb/{collection}/doc-{i:05d}/1713090600123",
        }
        for i in range(start, start + count)
    ]


def post_bulk(client: CertyoClient, batch: list[dict]) -> dict:
    """One bulk call of `batch`, each record under the client's tenant."""
    body = {"tenantId": client.tenant_id, "records": [{**r, "tenantId": client.tenant_id}
                                                       for r in batch]}  # fmt: skip
    return client.post_bulk_body(orjson.dumps(body), len(batch))


def calls(sandbox, status: int) -> int:
    return sandbox.stats()["requests_by_status"].get(str(status), 0)


# --- retries ------------------------------------------------------------------------------


def test_503s_are_retried_with_full_jitter_backoff(sandbox, make_client, sleeps):
    sandbox.script_faults([{"status": 503, "times": 3, "path": BULK}])
    response = post_bulk(make_client(), records(5))
    assert response["accepted"] == 5
    assert calls(sandbox, 503) == 3
    assert len(sleeps) == 3
    for sleep, ceiling in zip(sleeps, [1.0, 2.0, 4.0], strict=True):
        assert 0.0 <= sleep <= ceiling


def test_backoff_is_capped(sandbox, make_client, sleeps):
    sandbox.script_faults([{"status": 502, "times": 3}])
    make_client(backoff_initial_seconds=2.0, backoff_max_seconds=3.0).ingest_record(records(1)[0])
    assert len(sleeps) == 3
    assert all(0.0 <= s <= 3.0 for s in sleeps)


def test_429_waits_exactly_the_retry_after_capped(sandbox, make_client, sleeps):
    sandbox.script_faults(
        [
            {"status": 429, "retry_after": 2, "path": SINGLE},
            {"status": 429, "retry_after": 45, "path": SINGLE},
        ]
    )
    receipt = make_client(max_retry_after_seconds=10.0).ingest_record(records(1)[0])
    assert receipt["recordId"] == "doc-00000"
    assert sleeps == [2.0, 10.0]


def test_persistent_503_gives_up_with_unavailable_after_the_retries(sandbox, make_client, sleeps):
    sandbox.script_faults([{"status": 503, "times": 4, "path": BULK}])
    with pytest.raises(CertyoUnavailableError) as info:
        post_bulk(make_client(), records(3))
    assert info.value.status_code == 503
    assert "POST /api/v1/records/bulk" in str(info.value)
    assert "after 3 retries" in str(info.value)
    assert len(sleeps) == 3
    assert calls(sandbox, 503) == 4
    assert sandbox.stats()["records_stored"] == 0


def test_persistent_429_gives_up_with_rate_limited(sandbox, make_client, sleeps):
    sandbox.script_faults([{"status": 429, "retry_after": 1, "times": 3}])
    with pytest.raises(CertyoRateLimitedError) as info:
        make_client(max_retries=2).ingest_record(records(1)[0])
    assert info.value.status_code == 429
    assert sleeps == [1.0, 1.0]


def test_connection_dropped_after_the_request_is_retried_as_an_idempotent_replay(
    sandbox, make_client
):
    sandbox.script_faults([{"action": "close_after", "path": BULK}])
    response = post_bulk(make_client(), records(5))
    # The first attempt was stored, then its answer lost: the retry sent the same keys.
    assert response["replayed"] == 5
    assert all(r["idempotencyReplayed"] for r in response["results"])
    stats = sandbox.stats()
    assert stats["records_stored"] == 5
    assert stats["idempotent_replays"] == 5


def test_connection_dropped_before_processing_is_retried(sandbox, make_client):
    sandbox.script_faults([{"action": "close_before", "path": SINGLE}])
    receipt = make_client().ingest_record(records(1)[0])
    assert receipt["idempotencyReplayed"] is False
    assert sandbox.stats()["records_stored"] == 1


def test_read_timeout_is_retried_and_the_retry_is_a_replay(sandbox, make_client):
    sandbox.script_faults([{"action": "delay", "seconds": 4.0, "path": SINGLE}])
    receipt = make_client(read_timeout=2.0).ingest_record(records(1)[0])
    assert receipt["idempotencyReplayed"] is True
    assert sandbox.stats()["records_stored"] == 1


def test_nothing_listening_is_unavailable(sandbox, make_client, sleeps):
    port = sandbox.port
    sandbox.stop()
    with pytest.raises(CertyoUnavailableError) as info:
        make_client(base_url=f"http://127.0.0.1:{port}", max_retries=1).ingest_record({})
    assert info.value.status_code is None
    assert "POST /api/v1/records failed after 1 retries" in str(info.value)
    assert len(sleeps) == 1


def test_the_api_key_appears_in_no_error_or_log(sandbox, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    sandbox.script_faults([{"status": 503, "times": 4}, {"action": "close_after"}])
    client = make_client()
    failures = []
    with pytest.raises(CertyoUnavailableError) as info:
        client.ingest_record(records(1)[0])
    failures.append(info.value)
    client.ingest_record(records(1)[0])  # the dropped connection, then a replay
    with pytest.raises(CertyoValidationError) as info:
        post_bulk(client, [{"recordId": "x"}])
    failures.append(info.value)
    with pytest.raises(CertyoAuthError) as info:
        make_client(tenant_id="tenant-b").ingest_record(records(1)[0])
    failures.append(info.value)
    port = sandbox.port
    sandbox.stop()
    with pytest.raises(CertyoUnavailableError) as info:
        make_client(base_url=f"http://127.0.0.1:{port}", max_retries=1).ingest_record({})
    failures.append(info.value)

    assert "urllib3" in caplog.text  # debug logging of the HTTP stack really was on
    assert KEY_A not in caplog.text
    for failure in failures:
        assert KEY_A not in str(failure)
        assert KEY_A not in repr(failure)
        assert KEY_A not in repr(vars(failure))


# --- error mapping ------------------------------------------------------------------------


def test_unknown_key_is_an_auth_error(make_client):
    with pytest.raises(CertyoAuthError) as info:
        make_client(api_key="cty_not_a_real_key").ingest_record(records(1)[0])
    assert info.value.status_code == 401
    assert "check CERTYO_API_KEY" in str(info.value)


def test_tenant_of_another_key_is_an_auth_error(make_client):
    with pytest.raises(CertyoAuthError) as info:
        post_bulk(make_client(api_key=KEY_B, tenant_id="tenant-a"), records(2))
    assert info.value.status_code == 403


def test_invalid_bulk_records_are_named_by_index(sandbox, make_client):
    batch = records(5)
    del batch[1]["recordId"]
    batch[3]["recordPayload"] = "not an object"
    with pytest.raises(CertyoValidationError) as info:
        post_bulk(make_client(), batch)
    error = info.value
    assert error.status_code == 400
    assert sorted({e["index"] for e in error.errors}) == [1, 3]
    assert "records[1].recordId" in str(error)
    assert "records[3].recordPayload" in str(error)
    assert sandbox.stats()["records_stored"] == 0


def test_reused_idempotency_key_with_other_content_is_a_conflict(make_client):
    client = make_client()
    record = records(1)[0]
    client.ingest_record(record)
    changed = {**record, "recordPayload": {"sku": "changed"}}
    with pytest.raises(CertyoIdempotencyConflictError) as info:
        client.ingest_record(changed)
    assert info.value.status_code == 422


def test_a_record_for_another_tenant_is_refused_before_sending(sandbox, make_client):
    with pytest.raises(ValueError, match="tenant-b"):
        make_client().ingest_record({**records(1)[0], "tenantId": "tenant-b"})
    assert sandbox.stats()["requests_by_status"] == {}


# --- ingestion shapes ---------------------------------------------------------------------


def test_bulk_size_is_checked_before_sending(sandbox, make_client):
    client = make_client()
    with pytest.raises(ValueError, match="1 to 1000"):
        post_bulk(client, records(1001))
    with pytest.raises(ValueError, match="1 to 1000"):
        client.post_bulk_body(b'{"tenantId":"tenant-a","records":[]}', 0)
    assert sandbox.stats()["requests_by_status"] == {}


def test_post_bulk_body_sends_a_pre_encoded_batch(make_client):
    client = make_client()
    body = orjson.dumps({"tenantId": "tenant-a", "records": records(4)})
    response = client.post_bulk_body(body, 4)
    assert [r["recordId"] for r in response["results"]] == [f"doc-{i:05d}" for i in range(4)]
    with pytest.raises(CertyoError, match="returned 4 results for 5 records"):
        client.post_bulk_body(body, 5)


def test_concurrent_bulk_posts_share_the_pool(sandbox, make_client, caplog):
    caplog.set_level(logging.WARNING, logger="urllib3")
    client = make_client(pool_maxsize=8)
    results: dict[int, list[dict]] = {}

    def post(worker: int) -> None:
        batch = records(50, collection=f"c{worker}")
        results[worker] = post_bulk(client, batch)["results"]

    threads = [threading.Thread(target=post, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(8))
    assert sandbox.stats()["records_stored"] == 400
    assert "Connection pool is full" not in caplog.text


# --- reading ------------------------------------------------------------------------------


def test_verify_returns_the_anchoring_proof(sandbox, make_client):
    client = make_client()
    receipt = client.ingest_record(records(1)[0])
    sandbox.flush()
    result = client.verify_record("productdb", "products", "doc-00000", receipt["recordHash"])
    assert result["verified"] is True
    assert result["anchoredOnChain"] is True
    assert result["recordHash"] == receipt["recordHash"]
    assert result["merkleProof"]["treeSize"] == 1


def test_verify_of_an_unknown_record_is_not_found(make_client):
    with pytest.raises(CertyoNotFoundError) as info:
        make_client().verify_record("productdb", "products", "no-such-" + uuid.uuid4().hex)
    assert info.value.status_code == 404
    assert "POST /api/v1/verify/record" in str(info.value)


def test_query_records_follows_cursors_across_pages(sandbox, make_client):
    client = make_client()
    post_bulk(client, records(25, collection="paged") + records(5, collection="other"))
    before = calls(sandbox, 200)
    found = list(client.query_records(database="productdb", collection="paged", page_size=10))
    assert [r["recordId"] for r in found] == [f"doc-{i:05d}" for i in range(25)]
    assert calls(sandbox, 200) - before == 3
    one = list(client.query_records(collection="other", record_id="doc-00002"))
    assert [(r["collection"], r["recordId"]) for r in one] == [("other", "doc-00002")]


def test_query_page_size_is_checked(make_client):
    with pytest.raises(ValueError, match="page_size"):
        next(make_client().query_records(page_size=1001))


def test_requests_reuse_one_kept_alive_connection(make_client, caplog):
    caplog.set_level(logging.DEBUG, logger="urllib3")
    client = make_client()
    for record in records(5):
        client.ingest_record(record)
    post_bulk(client, records(20, start=10))
    list(client.query_records())
    assert caplog.text.count("Starting new HTTP connection") == 1
    assert caplog.text.count("POST /api/v1/records HTTP/1.1") == 5
