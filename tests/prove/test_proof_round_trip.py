"""Round trip: ingest, anchor on a local chain, verify, export bundles, verify them offline.

Everything is real: SecantusDB, the sandbox over HTTP anchoring on ganache, Dagster runs,
the `certyo-proof` CLI. The chain is this test module's own, so it can be stopped to show
that bundles still verify without it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from bson import Decimal128, ObjectId
from fixtures.chain import deploy_reverter, rpc, send_transaction
from fixtures.pipeline import hour, make_pipeline, pk
from fixtures.sandbox import TENANT_A, TEST_KEY_A, sandbox_test_config

from certyo_dagster.proof_cli import EXIT_OK, EXIT_REJECTED, EXIT_UNCHECKED, main, run_verify
from certyo_dagster.prove.bundle import bundle_digest, decode_bundle, encode_bundle
from certyo_dagster.prove.chain import EvmRpc
from certyo_dagster.prove.verifier import verify_bundle_bytes
from certyo_demo.servers import LocalChain, free_port
from certyo_sandbox.server import SandboxServer

DOCS = 6


@pytest.fixture(scope="module")
def own_chain(tmp_path_factory) -> Iterator[LocalChain]:
    chain = LocalChain(log_path=tmp_path_factory.mktemp("own-chain") / "ganache.log")
    try:
        yield chain.start()
    finally:
        chain.stop()


@pytest.fixture
def anchored(mongo, own_chain, monkeypatch, tmp_path):
    """A collection whose DOCS documents were ingested, anchored on the chain and verified."""
    with SandboxServer(sandbox_test_config(chain_rpc=own_chain.url)) as sandbox:
        pipeline = make_pipeline(mongo, sandbox)
        products = pipeline.db["products"]
        products.insert_many(
            [
                {
                    "_id": ObjectId(),
                    "sku": f"K-{i}",
                    "name": "Kettle é" if i % 2 else "Toaster",
                    "price": Decimal128(Decimal("19.90")),
                    "tags": ["kitchen", i],
                    "updatedAt": hour(1, minute=i, ms=7 * i),
                }
                for i in range(DOCS)
            ]
        )
        products.insert_one({"_id": 42, "sku": "int-id", "updatedAt": hour(1, minute=30)})
        pipeline.materialize(pk(1))
        sandbox.flush()
        pipeline.run_job("verify_products")
        assert products.count_documents({"certyo_status": "anchored"}) == DOCS + 1
        for name, value in {
            "MONGO_URI": mongo.uri,
            "MONGO_DATABASE": mongo.database,
            "CERTYO_COLLECTIONS": "products",
            "CERTYO_BASE_URL": sandbox.base_url,
            "CERTYO_API_KEY": TEST_KEY_A,
            "CERTYO_TENANT_ID": TENANT_A,
        }.items():
            monkeypatch.setenv(name, value)
        yield pipeline, sandbox, products


def export_all(folder: Path) -> list[Path]:
    assert (
        main(["export", "--collection", "products", "--since", "2026-01-01", "--out", str(folder)])
        == 0
    )
    return sorted(folder.glob("*.proof.json"))


def test_round_trip_with_the_chain_reachable(anchored, own_chain, tmp_path, capsys):
    pipeline, sandbox, products = anchored
    files = export_all(tmp_path / "bundles")
    assert len(files) == DOCS + 1
    capsys.readouterr()
    assert run_verify([str(tmp_path / "bundles")], rpc_url=own_chain.url) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == DOCS + 1
    assert all(line.startswith("VERIFIED") and "checked on chain 1337" in line for line in lines)
    for path in files:
        bundle = decode_bundle(path.read_bytes())
        doc = products.find_one({"certyo_record_hash": bundle["record"]["recordHash"]})
        assert doc is not None
        assert bundle["anchor"]["transactionHash"] == doc["certyo_tx_hash"]
        assert bundle["anchor"]["blockNumber"] == doc["certyo_block_number"]
        assert bundle["inclusionProof"]["root"] == doc["certyo_merkle_root"]
        assert bundle["document"]["version"] == doc["certyo_version"]
        tx = rpc(own_chain.url, "eth_getTransactionByHash", bundle["anchor"]["transactionHash"])
        assert tx["input"] == "0x" + bundle["inclusionProof"]["root"]


def test_one_document_by_id_and_an_older_version_from_certyo(anchored, own_chain, tmp_path):
    pipeline, sandbox, products = anchored
    doc = products.find_one({"sku": "K-1"})
    first = doc["certyo_version"]
    out = tmp_path / "one.proof.json"
    assert (
        main(["export", "--collection", "products", "--id", str(doc["_id"]), "--out", str(out)])
        == 0
    )
    assert verify_bundle_bytes(out.read_bytes()).ok
    assert main(["export", "--collection", "products", "--id", "42", "--out", str(tmp_path)]) == 0
    (by_int,) = tmp_path.glob("*.42.*.proof.json")
    assert decode_bundle(by_int.read_bytes())["document"]["id"] == 42

    # A new version is ingested and anchored; the first stays provable from Certyo's copy.
    products.update_one(
        {"_id": doc["_id"]}, {"$set": {"name": "Renamed", "updatedAt": hour(1, 50)}}
    )
    pipeline.materialize(pk(1))
    sandbox.flush()
    pipeline.run_job("verify_products")
    old = tmp_path / "old.proof.json"
    args = ["export", "--collection", "products", "--id", str(doc["_id"]), "--version", str(first)]
    assert main([*args, "--out", str(old)]) == 0
    old_bundle = decode_bundle(old.read_bytes())
    assert old_bundle["document"]["version"] == first
    assert '"name":"Kettle é"' in old_bundle["record"]["canonicalPayload"]
    with EvmRpc(own_chain.url) as node:
        assert verify_bundle_bytes(old.read_bytes(), rpc=node).ok
        assert verify_bundle_bytes(out.read_bytes(), rpc=node).ok


def test_export_refuses_what_it_cannot_prove(anchored, tmp_path, capsys):
    pipeline, sandbox, products = anchored
    products.insert_one({"_id": "fresh", "updatedAt": hour(1, 55)})
    assert (
        main(["export", "--collection", "products", "--id", "fresh", "--out", str(tmp_path)])
        == EXIT_REJECTED
    )
    assert "not anchored" in capsys.readouterr().err
    assert main(["export", "--collection", "products", "--id", "nope"]) == EXIT_REJECTED
    err = capsys.readouterr().err
    assert "no document with _id 'nope'" in err
    assert TEST_KEY_A not in err and list(tmp_path.iterdir()) == []


def chain_tampered(bundle: dict, **anchor) -> bytes:
    changed = copy.deepcopy(bundle)
    changed["anchor"].update(anchor)
    changed["bundleDigest"] = bundle_digest(changed)
    return encode_bundle(changed)


def test_the_chain_step_rejects_wrong_anchors(anchored, own_chain, tmp_path):
    (path, *_) = export_all(tmp_path)
    bundle = decode_bundle(path.read_bytes())
    root = bundle["inclusionProof"]["root"]
    with EvmRpc(own_chain.url) as node:
        assert verify_bundle_bytes(path.read_bytes(), rpc=node).ok
        cases = {
            "unknown transaction": chain_tampered(bundle, transactionHash="0x" + "ab" * 32),
            "wrong block": chain_tampered(bundle, blockNumber=bundle["anchor"]["blockNumber"] + 1),
            "wrong chain": chain_tampered(bundle, chainId=137),
        }
        other_hash, other = send_transaction(
            own_chain.url, to="0x" + "11" * 20, data="0x" + "22" * 32
        )
        cases["a transaction holding a different root"] = chain_tampered(
            bundle, transactionHash=other_hash, blockNumber=int(other["blockNumber"], 16)
        )
        reverter = deploy_reverter(own_chain.url)
        reverted_hash, reverted = send_transaction(
            own_chain.url, to=reverter, data="0x" + root, gas=hex(60_000)
        )
        assert reverted["status"] == "0x0"
        cases["a reverted transaction carrying the root"] = chain_tampered(
            bundle, transactionHash=reverted_hash, blockNumber=int(reverted["blockNumber"], 16)
        )
        expected = {
            "unknown transaction": "has no transaction",
            "wrong block": "the bundle says block",
            "wrong chain": "the node is on chain 1337, the bundle names chain 137",
            "a transaction holding a different root": "not the root " + root,
            "a reverted transaction carrying the root": "reverted (receipt status 0x0)",
        }
        for name, data in cases.items():
            assert verify_bundle_bytes(data).ok, name  # offline these are claims only
            verdict = verify_bundle_bytes(data, name, rpc=node)
            assert (verdict.verdict, verdict.step) == ("rejected", "chain"), name
            assert expected[name] in verdict.message, (name, verdict.message)


def test_bundles_verify_with_the_chain_gone_and_without_rpc(anchored, own_chain, tmp_path):
    folder = tmp_path / "bundles"
    files = export_all(folder)
    # Any process: the CLI as an auditor runs it, with none of the pipeline's settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "CERTYO"))}
    program = Path(sys.executable).with_name("certyo-proof")
    assert program.exists()
    own_chain.stop()
    try:
        offline = subprocess.run(
            [str(program), "verify", str(folder)], env=env, capture_output=True, text=True
        )
        assert offline.returncode == EXIT_OK, offline.stdout + offline.stderr
        assert offline.stdout.count("VERIFIED") == len(files)
        assert "chain not checked" in offline.stdout
        dead = f"http://127.0.0.1:{free_port()}"
        unchecked = subprocess.run(
            [str(program), "verify", *map(str, files), "--rpc", dead, "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert unchecked.returncode == EXIT_UNCHECKED
        answers = [json.loads(line) for line in unchecked.stdout.splitlines()]
        assert [a["verdict"] for a in answers] == ["unchecked"] * len(files)
        assert all(a["failedStep"] == "chain" for a in answers)
        # A changed byte is still rejected, naming the step.
        broken = bytearray(files[0].read_bytes())
        broken[broken.index(b'"blockNumber":') + 14] ^= 1
        files[0].write_bytes(bytes(broken))
        rejected = subprocess.run(
            [str(program), "verify", str(folder)], env=env, capture_output=True, text=True
        )
        assert rejected.returncode == EXIT_REJECTED
        assert "REJECTED" in rejected.stdout and (
            "digest failed" in rejected.stdout or "format failed" in rejected.stdout
        )

    finally:
        own_chain.start()  # a fresh chain for the tests after this one


def test_export_never_prints_secrets(anchored, secantus, monkeypatch, tmp_path, capsys):
    port = free_port()
    password = "pw-Secret-9f2c"  # noqa: S105 - a placeholder that must not appear
    monkeypatch.setenv(
        "MONGO_URI", f"mongodb://certyo:{password}@127.0.0.1:{port}/?serverSelectionTimeoutMS=500"
    )
    status = main(
        ["export", "--collection", "products", "--since", "2026-01-01", "--out", str(tmp_path)]
    )
    assert status == EXIT_REJECTED
    captured = capsys.readouterr()
    assert "certyo:***@" in captured.err or "ServerSelectionTimeoutError" in captured.err
    for secret in (password, TEST_KEY_A):
        assert secret not in captured.out + captured.err
    monkeypatch.setenv("MONGO_URI", secantus.uri)
    monkeypatch.setenv("CERTYO_API_KEY", "cty_wrong_key_0123456789")
    assert (
        main(
            ["export", "--collection", "products", "--since", "2026-01-01", "--out", str(tmp_path)]
        )
        == EXIT_REJECTED
    )
    captured = capsys.readouterr()
    assert "cty_wrong_key_0123456789" not in captured.out + captured.err
    assert "401" in captured.err or "API key" in captured.err
