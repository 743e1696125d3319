"""Batch flushing, Merkle proofs and restart persistence of certyo-sandbox."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from fixtures.sandbox import TENANT_A, TEST_KEY_A
from fixtures.sandbox import post_json as post
from fixtures.sandbox import sample_record as make_record

from certyo_dagster.prove.hashing import record_hash_bytes
from certyo_dagster.prove.merkle import verify_inclusion

WHERE = {"tenantId": TENANT_A, "database": "productdb", "collection": "products"}


def verify(sandbox, record_id: str, **extra: Any) -> dict[str, Any]:
    response = post(sandbox, "/api/v1/verify/record", {**WHERE, "recordId": record_id, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def proof_holds(body: dict[str, Any], leaf: bytes | None = None) -> bool:
    proof = body["merkleProof"]
    return verify_inclusion(
        proof["leafIndex"],
        proof["treeSize"],
        leaf if leaf is not None else record_hash_bytes(body["recordHash"]),
        [bytes.fromhex(node) for node in proof["auditPath"]],
        bytes.fromhex(body["merkleRoot"]),
    )


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def ingest(sandbox, ids: list[str]) -> None:
    records = [make_record(i, recordPayload={"id": i}) for i in ids]
    response = post(sandbox, "/api/v1/records/bulk", {"tenantId": TENANT_A, "records": records})
    assert response.status_code == 202, response.text


def test_flush_by_count_anchors_a_batch_with_valid_proofs(sandbox_factory):
    sandbox = sandbox_factory(flush_records=7)
    ingest(sandbox, [f"r{i}" for i in range(10)])
    stats = sandbox.stats()
    assert (stats["batches_anchored"], stats["pending_records"]) == (1, 3)

    for i in (0, 3, 6):
        body = verify(sandbox, f"r{i}")
        assert body["anchoredOnChain"] is True
        assert body["transactionHash"].startswith("0x") and len(body["transactionHash"]) == 66
        assert len(body["merkleRoot"]) == 64
        assert body["merkleProof"]["treeSize"] == 7
        assert body["merkleProof"]["leafIndex"] == i
        assert body["ipfsCid"].startswith("bafy")
        assert proof_holds(body)
    assert verify(sandbox, "r8")["anchoredOnChain"] is False


def test_flipped_byte_in_proof_or_leaf_is_rejected(sandbox):
    ingest(sandbox, [f"r{i}" for i in range(5)])
    sandbox.flush()
    body = verify(sandbox, "r2")
    assert proof_holds(body)
    leaf = bytearray(record_hash_bytes(body["recordHash"]))
    leaf[5] ^= 0x80
    assert not proof_holds(body, bytes(leaf))
    node = bytearray(bytes.fromhex(body["merkleProof"]["auditPath"][1]))
    node[31] ^= 0x01
    body["merkleProof"]["auditPath"][1] = node.hex()
    assert not proof_holds(body)


def test_flush_by_time(sandbox_factory):
    sandbox = sandbox_factory(flush_seconds=0.2)
    ingest(sandbox, ["a", "b", "c"])
    wait_until(lambda: sandbox.stats()["batches_anchored"] == 1)
    body = verify(sandbox, "b")
    assert body["anchoredOnChain"] is True
    assert body["merkleProof"]["treeSize"] == 3
    assert proof_holds(body)


def test_anchor_delay_keeps_a_flushed_batch_off_chain_for_a_while(sandbox_factory):
    sandbox = sandbox_factory(anchor_delay_seconds=3.0)  # room for a loaded CI machine
    ingest(sandbox, ["a", "b"])
    sandbox.flush()
    body = verify(sandbox, "a")
    assert body["anchoredOnChain"] is False
    assert body["transactionHash"] is None
    assert proof_holds(body)  # already in a Merkle tree, not yet on chain
    wait_until(lambda: verify(sandbox, "a")["anchoredOnChain"])
    assert verify(sandbox, "a")["blockNumber"] > 0


def test_batches_get_increasing_blocks_and_distinct_transactions(sandbox):
    ingest(sandbox, ["a"])
    sandbox.flush()
    ingest(sandbox, ["b"])
    sandbox.flush()
    first, second = verify(sandbox, "a"), verify(sandbox, "b")
    assert second["blockNumber"] > first["blockNumber"]
    assert second["transactionHash"] != first["transactionHash"]
    # A single-leaf tree has an empty audit path and the leaf hash as root.
    assert first["merkleProof"]["auditPath"] == [] and proof_holds(first)


def test_verify_by_record_hash_picks_that_version(sandbox):
    post(sandbox, "/api/v1/records", make_record("doc", recordPayload={"v": 1}))
    second = post(
        sandbox, "/api/v1/records", make_record("doc", recordPayload={"v": 2}, recordVersion="2")
    ).json()
    sandbox.flush()
    latest = verify(sandbox, "doc")
    assert (latest["recordHash"], latest["recordVersion"]) == (second["recordHash"], "2")
    old = post(sandbox, "/api/v1/records", make_record("x", recordPayload={"v": 1})).json()
    first_version = verify(sandbox, "doc", recordHash=old["recordHash"])
    assert first_version["recordVersion"] == "1"
    assert proof_holds(first_version)
    missing = post(
        sandbox,
        "/api/v1/verify/record",
        {**WHERE, "recordId": "doc", "recordHash": "sha256:" + "0" * 64},
    )
    assert missing.status_code == 404


def test_tamper_proof_fault_corrupts_exactly_one_verify_response(sandbox):
    ingest(sandbox, [f"r{i}" for i in range(4)])
    sandbox.flush()
    sandbox.script_faults([{"action": "tamper_proof"}])
    post(sandbox, "/api/v1/records", make_record("unrelated"))  # not a verify: fault waits
    tampered = verify(sandbox, "r1")
    assert not proof_holds(tampered)
    assert proof_holds(verify(sandbox, "r1"))


def test_tamper_proof_flips_the_root_when_the_path_is_empty(sandbox):
    ingest(sandbox, ["only"])
    sandbox.flush()
    honest = verify(sandbox, "only")
    sandbox.script_faults([{"action": "tamper_proof"}])
    tampered = verify(sandbox, "only")
    assert tampered["merkleRoot"] != honest["merkleRoot"]
    assert not proof_holds(tampered)


@pytest.mark.parametrize("flush_before_restart", [False, True])
def test_records_batches_and_keys_survive_a_restart(
    sandbox_factory, tmp_path, flush_before_restart
):
    sandbox = sandbox_factory(db_path=str(tmp_path / "sandbox.db"))
    record = make_record("p1", idempotencyKey="key-p1")
    accepted = post(sandbox, "/api/v1/records", record).json()
    ingest(sandbox, ["p2", "p3"])
    if flush_before_restart:
        sandbox.flush()
    sandbox.stop()

    sandbox.config.flush_seconds = 0.3
    sandbox.start()
    replay = post(sandbox, "/api/v1/records", record)
    assert replay.json() == {**accepted, "idempotencyReplayed": True}
    assert sandbox.stats()["records_stored"] == 3
    # Accepted-but-unanchored records still anchor after the restart.
    wait_until(lambda: verify(sandbox, "p3")["anchoredOnChain"])
    body = verify(sandbox, "p1")
    assert body["anchoredOnChain"] and proof_holds(body)
    assert sandbox.stats()["batches_anchored"] == 1
    records = requests.get(
        sandbox.base_url + "/api/v1/records", headers={"X-API-Key": TEST_KEY_A}, timeout=5
    ).json()["records"]
    assert [r["recordId"] for r in records] == ["p1", "p2", "p3"]


def test_thousand_record_batch_proofs_all_verify(sandbox):
    ingest(sandbox, [f"r{i}" for i in range(1000)])
    assert sandbox.stats()["batches_anchored"] == 1
    for i in (0, 1, 511, 512, 998, 999):
        body = verify(sandbox, f"r{i}")
        assert body["merkleProof"]["treeSize"] == 1000
        assert proof_holds(body)
